import os
import sys

import pytest
from hypothesis import settings

# CI draws the same examples every run (a red CI must mean a change broke something, not that a
# new random graph was drawn); elsewhere every run explores new ones. A failure prints the
# example's blob, so one found locally can be replayed with @reproduce_failure.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "default")

# bit-for-bit comparisons with eager: BLAS must not change its thread count (and with it the
# order of its sums) with the machine's load between the eager run and the compiled one
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")

# pytest-xdist runs one worker per core: each worker's BLAS/OpenMP takes its share of the cores,
# not all of them (two workers each spinning two OpenMP threads on two cores wait on each other)
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    # and Inductor compiles its kernels in the worker itself: a pool of compile subprocesses per
    # worker only competes for the same cores (test_fusion from a cold cache: 300 s against 369 s)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _workers))

# tests import the zoo and helpers as plain modules
sys.path.insert(0, os.path.dirname(__file__))
# a per-run calibration cache, so tests never depend on a developer's cached profile
os.environ.setdefault("MEMSCHED_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "memsched"))
# every plan the tests make is checked by the independent verifier right after planning
os.environ.setdefault("MEMSCHED_VERIFY", "1")


@pytest.fixture
def measures_cache(tmp_path, monkeypatch):
    """An empty cache of measured times (cost_models/measures.py) for one test."""
    from memsched.cost_models import measures

    monkeypatch.setenv("MEMSCHED_CACHE_DIR", str(tmp_path))
    measures.forget()
    yield tmp_path
    measures.forget()
