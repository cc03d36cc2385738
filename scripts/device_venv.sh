#!/usr/bin/env bash
# Creates the device-side venv: PLAIN onnxruntime (no training build, no torch): fedclip installed
# editable with its `agent` extra. It is what a Jetson-class board or any
# machine without an onnxruntime-training wheel runs; the step-graph backend needs nothing more.
# Usage: bash scripts/device_venv.sh [DIR]          (default DIR: .venv-device)
#        PYTHON=python3.10 bash scripts/device_venv.sh .venv-device-310
#        PYTHON=python3.10 ORT_SPEC=onnxruntime==1.16.3 NUMPY_SPEC="numpy<2" \
#          bash scripts/device_venv.sh .venv-device-ort116
#          (1.16.3 is the newest onnxruntime pip offers a manylinux2014-only aarch64 board; onnxruntime
#          before 1.19 is built against numpy 1)
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-.venv-device}
PY=${PYTHON:-python3}
if ! "$PY" -c 'pass' >/dev/null 2>&1; then
  # pyenv keeps the other interpreters off PATH (or behind shims that refuse); look there too.
  want=${PY#python}
  for cand in "$HOME"/.pyenv/versions/"$want"*/bin/python; do
    [ -x "$cand" ] && PY=$cand && break
  done
fi
"$PY" -c 'pass' >/dev/null 2>&1 || { echo "device_venv: interpreter $PY not found" >&2; exit 2; }

if [ ! -x "$DIR/bin/python" ]; then
  "$PY" -m venv "$DIR"
fi
"$DIR/bin/python" -m pip install -q --upgrade pip
# The runtime first (ORT_SPEC/NUMPY_SPEC may pin an older pair), then fedclip with its `agent` extra:
# the core dependencies come from pyproject.toml, and the constraint keeps pip from upgrading the
# pinned runtime to satisfy the extra.
"$DIR/bin/python" -m pip install -q "${ORT_SPEC:-onnxruntime>=1.16}" "${NUMPY_SPEC:-numpy>=1.24,<3}"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
"$DIR/bin/python" -m pip freeze | grep -iE '^(onnxruntime|numpy)==' >"$constraints"
"$DIR/bin/python" -m pip install -q -c "$constraints" -e '.[agent]'
"$DIR/bin/python" - <<'PY'
import importlib.util, sys
import onnxruntime
assert importlib.util.find_spec("torch") is None, "torch must not be installed in the device venv"
import fedclip.sdk.manifest  # noqa: F401
from fedclip.device_agent.ort_loader import check_single_build
check_single_build()  # one onnxruntime build only
print(f"device_venv: {sys.prefix} ready (Python {sys.version.split()[0]}, onnxruntime {onnxruntime.__version__})")
PY
