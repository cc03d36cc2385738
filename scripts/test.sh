#!/usr/bin/env bash
# Sets up everything the tests need and runs the whole suite (the README's test command).
# Besides the coordinator/dev venv (.venv) it makes the device venvs the device tests run in: plain
# onnxruntime, no torch, on Python 3.11, 3.10 and 3.12 (.venv-device, -310, -312), and checks that
# every device package has an aarch64 wheel (scripts/check_aarch64.sh), and type-checks before testing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/device_venv.sh .venv-device
PYTHON=python3.10 bash scripts/device_venv.sh .venv-device-310
PYTHON=python3.12 bash scripts/device_venv.sh .venv-device-312
bash scripts/check_aarch64.sh
bash scripts/typecheck.sh  # mypy (pinned in the dev extra) over sdk, device_agent, coordinator, exporters
exec .venv/bin/python -m pytest -q "$@"
