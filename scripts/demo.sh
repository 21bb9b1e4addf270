#!/usr/bin/env bash
# One command for the demo: sets up .venv if needed, then streams a GPT-2 decoder from disk.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
python examples/stream_gpt2_from_disk.py "$@"
