#!/usr/bin/env bash
# Creates the device-side venv: PLAIN onnxruntime (no training build, no torch) plus the sdk's
# dependencies, and fedclip itself without its extras. It is what a Jetson-class board or any
# machine without an onnxruntime-training wheel runs; the step-graph backend needs nothing more.
# Usage: bash scripts/device_venv.sh [DIR]          (default DIR: .venv-device)
#        PYTHON=python3.10 bash scripts/device_venv.sh .venv-device-310
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${1:-.venv-device}
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null; then
  # pyenv keeps the other interpreters off PATH; look there before giving up.
  want=${PY#python}
  for cand in "$HOME"/.pyenv/versions/"$want"*/bin/python; do
    [ -x "$cand" ] && PY=$cand && break
  done
fi
command -v "$PY" >/dev/null || { echo "device_venv: interpreter $PY not found" >&2; exit 2; }

if [ ! -x "$DIR/bin/python" ]; then
  "$PY" -m venv "$DIR"
fi
"$DIR/bin/python" -m pip install -q --upgrade pip
"$DIR/bin/python" -m pip install -q "onnxruntime>=1.17" "numpy>=1.24,<3" "pillow>=10" "pyyaml>=6" \
  "paho-mqtt>=2.0,<3" "safetensors>=0.4" "typer>=0.12" "rich>=13"
# --no-deps: the extras would pull torch or onnxruntime-training, which a device does not have.
"$DIR/bin/python" -m pip install -q --no-deps -e .
"$DIR/bin/python" - <<'PY'
import importlib.util, sys
import onnxruntime
assert importlib.util.find_spec("torch") is None, "torch must not be installed in the device venv"
import fedclip.sdk.manifest  # noqa: F401
print(f"device_venv: {sys.prefix} ready (Python {sys.version.split()[0]}, onnxruntime {onnxruntime.__version__})")
PY
