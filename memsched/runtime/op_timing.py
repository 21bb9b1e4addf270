"""Measured op prices: a few calls of each scheduled program on a CPU device run with every
ATen op timed, and the times are recorded under each call's structure key (ir/op_keys.py) in
the measures that price later plans (cost_models/measures.py), as fused regions' times are.
The roofline then prices only ops this machine has not run yet. CUDA ops are not timed here:
the host sees their launch, not their run."""
from __future__ import annotations

import time

from torch.utils._python_dispatch import TorchDispatchMode

from ..cost_models.measures import record_times
from ..ir.op_keys import op_key

TIMED_CALLS = (1, 2)   # which calls of a program are timed (not the first: it warms up)


class OpTimer(TorchDispatchMode):
    """Within the block, each ATen op call on this thread is timed; ``record`` hands the times
    to the measures."""

    def __init__(self):
        super().__init__()
        self.times: list[tuple[str, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key = op_key(func, args, kwargs)
        t = time.perf_counter()
        out = func(*args, **kwargs)
        self.times.append((key, time.perf_counter() - t))
        return out

    def record(self) -> None:
        record_times(self.times)
        self.times = []
