import os
import sys

# bit-for-bit comparisons with eager: BLAS must not change its thread count (and with it the
# order of its sums) with the machine's load between the eager run and the compiled one
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")

# tests import the zoo and helpers as plain modules
sys.path.insert(0, os.path.dirname(__file__))
# a per-run calibration cache, so tests never depend on a developer's cached profile
os.environ.setdefault("MEMSCHED_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "memsched"))
# every plan the tests make is checked by the independent verifier right after planning
os.environ.setdefault("MEMSCHED_VERIFY", "1")
