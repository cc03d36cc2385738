#!/usr/bin/env bash
# Creates the device-side venv: PLAIN onnxruntime (no training build, no torch) plus the sdk's
# dependencies, and fedclip itself without its extras. It is what a Jetson-class board or any
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
"$DIR/bin/python" -m pip install -q "${ORT_SPEC:-onnxruntime>=1.16}" "${NUMPY_SPEC:-numpy>=1.24,<3}" "pillow>=10" "pyyaml>=6" \
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
