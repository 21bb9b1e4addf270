#!/usr/bin/env bash
# Creates .venv with the CPU build of torch pinned (a bare `torch` requirement would pull a
# multi-GB CUDA build) and installs memsched with its dev extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
