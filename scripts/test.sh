#!/usr/bin/env bash
# One command for the tests: sets up .venv if needed (the lock), then runs the suite on every core.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
# pytest-xdist, one worker per core; worksteal: a worker that runs out takes tests queued on
# the other, so one long test (a fused training step, a generation) does not leave a core idle
# (the 20 slowest tests are listed at the end: where the next minutes of the suite are)
python -m pytest -n auto --dist worksteal --durations=20 "$@"
