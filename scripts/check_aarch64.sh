#!/usr/bin/env bash
# Checks that every package a device venv needs has a binary wheel for aarch64 Linux (Jetson-class
# boards, Python 3.10), for both the manylinux2014 and the manylinux_2_28 tags: a package without
# one would make `pip install 'fedclip[agent]'` compile from source (or fail) on the board.
# Downloads the wheels only (no install); fails loudly naming every package that has none.
# Usage: bash scripts/check_aarch64.sh    (PYTHON_VERSION=3.10 by default)
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/python -m pip}
PYV=${PYTHON_VERSION:-3.10}
PACKAGES=(onnxruntime numpy pillow pyyaml paho-mqtt safetensors typer rich regex cryptography prometheus-client)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

missing=()
for pkg in "${PACKAGES[@]}"; do
  # paho-mqtt, typer, rich and prometheus-client are pure Python: their py3-none-any wheel counts as a binary wheel.
  if ! $PIP download -q --only-binary=:all: --no-deps --python-version "$PYV" \
    --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 -d "$tmp" "$pkg" >"$tmp/log" 2>&1; then
    missing+=("$pkg")
    sed 's/^/    /' "$tmp/log" | tail -3 >&2
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "check_aarch64: NO aarch64 wheel for Python $PYV: ${missing[*]}" >&2
  exit 1
fi
echo "check_aarch64: all ${#PACKAGES[@]} device packages have aarch64 wheels for Python $PYV:"
ls "$tmp" | grep -v '^log$' | sed 's/^/  /'
