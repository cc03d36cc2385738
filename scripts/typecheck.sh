#!/usr/bin/env bash
# Type-checks fedclip with the pinned mypy (settings: [tool.mypy] in pyproject.toml).
# The top-level folders install as fedclip.<folder> (pyproject's package-dir), a layout mypy cannot
# see through the editable install's import hook; a tree of symlinks in .mypy_tree/ gives it that.
# Checked: fedclip.sdk, fedclip.device_agent, fedclip.coordinator and fedclip.exporters; arguments,
# when given, replace that list (e.g. `-p fedclip.exporters`).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .mypy_tree/fedclip
for pkg in sdk device_agent exporters coordinator; do
  ln -sfn "$PWD/$pkg" ".mypy_tree/fedclip/$pkg"
done
if [ $# -eq 0 ]; then
  set -- -p fedclip.sdk -p fedclip.device_agent -p fedclip.coordinator -p fedclip.exporters
fi
MYPYPATH="$PWD/.mypy_tree" .venv/bin/python -m mypy "$@"
