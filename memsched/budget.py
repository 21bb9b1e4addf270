"""Parse budgets ("8GB", "512MiB", "50%", 10**9) into bytes and print byte counts."""
from __future__ import annotations

import re

from .ir.units import format_bytes  # noqa: F401  (re-exported: memsched.format_bytes)

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}
_ACCEPTED = ('an int of bytes, or a string like "8GB" (10^9), "8GiB" (2^30), "512MB", '
             '"512MiB", "1.5TB", or "50%" of the device capacity')
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*|%)\s*$")


def parse_budget(budget, device_capacity: int | None = None) -> int:
    """Return the budget in bytes; ValueError naming the accepted forms for anything else."""
    if isinstance(budget, bool):
        raise ValueError(f"budget {budget!r} is not valid: use {_ACCEPTED}")
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, float) and budget.is_integer():
        value = int(budget)
    elif isinstance(budget, str):
        m = _PATTERN.match(budget)
        if not m:
            raise ValueError(f"budget {budget!r} is not valid: use {_ACCEPTED}")
        number, unit = float(m.group(1)), m.group(2).upper()
        if unit == "%":
            if device_capacity is None:
                raise ValueError(f"budget {budget!r} is a percentage but the device capacity is unknown")
            if not 0 < number <= 100:
                raise ValueError(f"budget {budget!r}: a percentage must be in (0, 100]")
            value = int(device_capacity * number / 100)
        elif unit in _UNITS:
            value = int(number * _UNITS[unit])
        else:
            raise ValueError(f"budget {budget!r} has unknown unit {m.group(2)!r}: use {_ACCEPTED}")
    else:
        raise ValueError(f"budget {budget!r} ({type(budget).__name__}) is not valid: use {_ACCEPTED}")
    if value <= 0:
        raise ValueError(f"budget must be positive, got {budget!r}")
    return value
