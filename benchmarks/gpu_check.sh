#!/usr/bin/env bash
# The first thing to run on a GPU machine: the CUDA tests, then the GPU measurements as one table.
# Uses the machine's own torch (+CUDA), transformers and pytest; memsched's other needs (ortools)
# come as wheels made here with scripts/gpu_wheels.sh and carried as .whl. With the device tool:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# Output also goes to $OUT/gpu_check.log when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
log="${OUT:-/tmp}/gpu_check.log"
{
    python3 -c "import torch, memsched; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
    # the whole pytest log goes to $OUT; the summary lines come here
    timeout 250 python3 -m pytest -p no:cacheprovider -q -n 4 --timeout 200 --durations=8 tests/test_cuda.py -rfEs \
        > "${OUT:-/tmp}/pytest.log" 2>&1
    echo "pytest rc=$?"; grep -E "passed|failed|PASSED|FAILED|ERROR|SKIPPED|^[0-9.]+s " "${OUT:-/tmp}/pytest.log" | tail -40
    timeout 210 python3 benchmarks/gpu_check.py "$@"
} 2>&1 | tee "$log"
