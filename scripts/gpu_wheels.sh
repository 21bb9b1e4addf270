#!/usr/bin/env bash
# Wheels the GPU machine lacks (its image has torch, transformers, pytest, hypothesis, numpy, rich,
# absl-py, pandas, attrs, xxhash, safetensors; not ortools or jsonschema), fetched here into .whl/ (git-ignored) for Python 3.12 on x86-64,
# at the lock's versions. benchmarks/gpu_check.sh installs them there; carry ".whl" with it.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pin() { grep -E "^$1==" requirements/dev.lock | head -1 | sed 's/ .*//'; }
for pkg in ortools immutabledict protobuf jsonschema jsonschema-specifications referencing rpds-py; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$(pin "$pkg")"
done
ls -la .whl
