#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the main job: a uballoon host and a guest on this
# machine, inflating and deflating real memory, with a table of what the host got back.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
