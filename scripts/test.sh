#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs every test, the VM tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "== running the tests"
exec .venv/bin/python -m pytest "$@"
