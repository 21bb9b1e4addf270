#!/usr/bin/env bash
# One command for the tests: sets up .venv if needed (the lock), then runs the suite on every core.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest -n auto "$@"   # pytest-xdist: one worker per core
