#!/usr/bin/env bash
# Sets up everything the tests need and runs the whole suite (the README's test command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
