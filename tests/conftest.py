import os
import sys

# tests import the zoo and helpers as plain modules
sys.path.insert(0, os.path.dirname(__file__))
# a per-run calibration cache, so tests never depend on a developer's cached profile
os.environ.setdefault("MEMSCHED_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "memsched"))
# every plan the tests make is checked by the independent verifier right after planning
os.environ.setdefault("MEMSCHED_VERIFY", "1")
