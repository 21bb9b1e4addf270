"""What the runtime measured on this machine, kept across processes: fused regions' times and
the rates of memsched's offload file.

The runtime times each CPU call of a region's compiled kernel (runtime/regions.py), and every
ATen op of a program's first few calls (runtime/op_timing.py); the times are recorded here by
structure key (ir/regions.py: a region's ops and its inputs' layouts; ir/op_keys.py: an op and
its arguments) and torch's thread count. The simulator prices
a region by its measured time when the plan uses this machine's profile, so a plan made after
the same regions ran -- in this process or an earlier one -- is priced by what its kernels took,
not by the roofline. Each step also records the rate its disk reads and writes ran at on the
offload file, on the worker threads, while compute ran beside them (runtime/transfer.py): the
local profile prices the page-cache path by them (cost_models/hardware.py ``page_cached``)
instead of by its probe of an idle machine, which measured 2-3x faster than steps ran.
The measures are saved as JSON beside the hardware profile
(``$MEMSCHED_CACHE_DIR``, default ``~/.cache/memsched``), one file per torch version (its
compiler makes the kernels), when the process exits; a missing, unreadable or malformed file
is ignored and measured again.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import threading
from pathlib import Path

import torch

SAMPLES = 8   # the last calls kept per region; their median is its price
GiB = 1 << 30
MIN_RATE_BYTES = 1 << 20   # a step moving less tells little about a link's rate

_LOCK = threading.Lock()
_TIMES: dict[str, list[float]] = {}
_state = {"loaded": False, "dirty": False, "hooked": False}


def cache_path() -> Path:
    root = os.environ.get("MEMSCHED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "memsched")
    return Path(root) / f"regions-cpu-torch{torch.__version__.split('+')[0]}.json"


def _entry(key: str) -> str:
    """A region's entry: its structure and the threads its kernel ran on (a CPU kernel's time
    scales with them)."""
    return f"{key}/{torch.get_num_threads()}t"


def _seconds(x) -> bool:
    """A time a region could have taken: a finite number of seconds, not negative."""
    return type(x) in (int, float) and math.isfinite(x) and 0 <= x < 1e6


def _read(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
        return {k: [float(x) for x in v][-SAMPLES:] for k, v in d.get("times", {}).items()
                if isinstance(k, str) and isinstance(v, list) and v and all(_seconds(x) for x in v)}
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
        return {}   # missing or malformed: measured again


def _load() -> None:
    if _state["loaded"]:
        return
    for k, v in _read(cache_path()).items():
        _TIMES.setdefault(k, v)
    _state["loaded"] = True


def _changed() -> None:
    _state["dirty"] = True
    if not _state["hooked"]:
        atexit.register(save)
        _state["hooked"] = True


def record_time(key: str, seconds: float) -> None:
    """One measured time under ``key``; a time no call could take (negative, NaN, infinite) is
    dropped, as it would be when read back from the file."""
    record_times([(key, seconds)])


def record_times(items: list[tuple[str, float]]) -> None:
    """``record_time`` for each (key, seconds), under one lock (a step times thousands of ops)."""
    kept = [(key, seconds) for key, seconds in items if _seconds(seconds)]
    if not kept:
        return
    with _LOCK:
        _load()
        for key, seconds in kept:
            samples = _TIMES.setdefault(_entry(key), [])
            samples.append(seconds)
            del samples[:-SAMPLES]
        _changed()


def measured_time(key: str) -> float | None:
    """The median of the last timed calls of regions (or ops) with this structure on as many
    threads as torch runs now, or None."""
    with _LOCK:
        _load()
        samples = sorted(_TIMES.get(_entry(key), ()))
    return samples[len(samples) // 2] if samples else None


def _rate_key(device_type: str, link: str) -> str:
    return f"offload-file/{device_type}/{link}"


def record_rate(device_type: str, link: str, nbytes: int, seconds: float) -> None:
    """One step's ``nbytes`` over ``link`` ("disk_read", "disk_write") of the offload file in
    ``seconds`` of the worker's time, for a ``device_type`` device (ignored below MIN_RATE_BYTES)."""
    if nbytes >= MIN_RATE_BYTES and seconds > 0:
        record_time(_rate_key(device_type, link), seconds * GiB / nbytes)


MAX_RATE = 1e12   # bytes/s: no file is read or written faster; a cache file saying so is not believed


def measured_rate(device_type: str, link: str) -> float | None:
    """Bytes/s of ``link`` on the offload file over the last steps (the median), or None."""
    s_per_gib = measured_time(_rate_key(device_type, link))
    return GiB / s_per_gib if s_per_gib and GiB / s_per_gib <= MAX_RATE else None


def save() -> None:
    """Write this process's measures into the cache file (merged with what other processes
    wrote meanwhile: theirs for regions this one never ran). Never raises."""
    with _LOCK:
        if not _state["dirty"]:
            return
        path = cache_path()
        times = _read(path)
        times.update(_TIMES)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"times": times}))
            os.replace(tmp, path)   # atomic: a concurrent reader never sees half a file
            _state["dirty"] = False
        except OSError:
            pass   # an unwritable cache: measured again next time


def forget() -> None:
    """Drop what this process holds and read the cache file again at the next query (tests)."""
    with _LOCK:
        _TIMES.clear()
        _state["loaded"] = _state["dirty"] = False
