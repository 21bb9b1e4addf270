#!/usr/bin/env bash
# Run every benchmark in its short form (--quick), one after another (never in parallel: they
# time the same 2 cores). Full runs and options: run the scripts one by one (see README.md).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
    . .venv/bin/activate
fi
status=0
for script in planning_time overhead disk_streaming generation checkpoint_generation train_planning train_frontier floor_survey chunked_ops kernel_ops; do
    echo "=== benchmarks/${script}.py --quick ==="
    python "benchmarks/${script}.py" --quick || { echo "!!! ${script} failed (exit $?)"; status=1; }
    echo
done
exit $status
