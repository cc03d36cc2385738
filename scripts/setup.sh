#!/usr/bin/env bash
# Sets up the coordinator/dev environment in .venv (idempotent; a second run installs nothing new).
# Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11), "fedclip coordinator needs Python 3.11 (onnxruntime-training has no newer wheel)"'

# Debian packages: mosquitto for the tests' real broker, nats-server for the broker-cluster test,
# Fashion-MNIST for the demo's real data, chromium and its driver for the dashboard's browser test.
need=()
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null || need+=(mosquitto)
[ -x /usr/sbin/nats-server ] || command -v nats-server >/dev/null || need+=(nats-server)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${need[*]} with apt-get"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: please install ${need[*]} (Debian packages); continuing without them" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[coordinator,dev]'
echo "setup: .venv ready ($(.venv/bin/python -c 'import fedclip.sdk, onnxruntime; print("onnxruntime", onnxruntime.__version__)'))"
