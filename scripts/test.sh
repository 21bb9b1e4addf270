#!/usr/bin/env bash
# One command for the tests: sets up .venv if needed, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest "$@"
