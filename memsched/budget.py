"""Parse budgets ("8GB", "512MiB", "50%", 10**9) into bytes and print byte counts."""
from __future__ import annotations

import math
import numbers
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
# an upper-case prefix before a lower-case b is the usual spelling of bits (8Gb = 1 GB)
_BITS = re.compile(r"^[KMGT]i?b$")


def _from_text(budget: str, device_capacity: int | None) -> int:
    m = _PATTERN.match(budget)
    if not m:
        raise ValueError(f"budget {budget!r} is not valid: use {_ACCEPTED}")
    number, unit = float(m.group(1)), m.group(2)
    if _BITS.match(unit):
        raise ValueError(f"budget {budget!r} is in bits ({unit}); memsched budgets are bytes: "
                         f"write {m.group(1)}{unit[:-1]}B")
    if unit == "%":
        if device_capacity is None:
            raise ValueError(f"budget {budget!r} is a percentage but the device capacity is unknown")
        if not 0 < number <= 100:
            raise ValueError(f"budget {budget!r}: a percentage must be in (0, 100]")
        return int(device_capacity * number / 100)
    if unit.upper() in _UNITS:
        return int(number * _UNITS[unit.upper()])
    raise ValueError(f"budget {budget!r} has unknown unit {unit!r}: use {_ACCEPTED}")


def parse_budget(budget, device_capacity: int | None = None, *, over_capacity: bool = True) -> int:
    """Return the budget in bytes; ValueError naming the accepted forms for anything else.

    With ``over_capacity=False`` and a known ``device_capacity``, a budget larger than the device
    is refused (running on this device could not honour it)."""
    if isinstance(budget, bool):
        raise ValueError(f"budget {budget!r} is not valid: use {_ACCEPTED}")
    if isinstance(budget, numbers.Integral):  # int, numpy integers
        value = int(budget)
    elif isinstance(budget, numbers.Real) and math.isfinite(budget) and float(budget).is_integer():
        value = int(budget)
    elif isinstance(budget, str):
        value = _from_text(budget, device_capacity)
    else:
        raise ValueError(f"budget {budget!r} ({type(budget).__name__}) is not valid: use {_ACCEPTED}")
    if value <= 0:
        less = " (less than one byte: a bare number is bytes; give a unit, \"512MB\")" if isinstance(budget, str) else ""
        raise ValueError(f"budget must be positive, got {budget!r}{less}")
    if not over_capacity and device_capacity is not None and value > device_capacity:
        raise ValueError(
            f"budget {format_bytes(value)} is more than the device has ({format_bytes(device_capacity)}); "
            f"give a budget it can hold, or pass allow_over_capacity=True to plan for a larger machine")
    return value
