"""Measured op prices: a few calls of each scheduled program on a CPU device run with every
ATen op timed, and the times are recorded under each call's structure key (ir/op_keys.py) in
the measures that price later plans (cost_models/measures.py), as fused regions' times are.
The roofline then prices only ops this machine has not run yet. CUDA ops are not timed here:
the host sees their launch, not their run.

The ops are timed as the program calls them, through a torch function mode: a composite op
(``linear``, ``einsum``, ``matmul``) is timed whole, under the key of the node that calls it.
(A dispatch mode sees it only as the ops it is made of, ``t`` and ``addmm``, keyed otherwise:
a decode step's linears and attention einsums, 90% of its compute, were never priced by what
they took.) While an op runs the mode is off, so the ops inside it are not timed again."""
from __future__ import annotations

import contextlib
import time

import torch
from torch.overrides import TorchFunctionMode, _get_current_function_mode, _pop_mode_temporarily

from ..cost_models.measures import record_times
from ..ir.op_keys import op_key

TIMED_CALLS = (1, 2)   # which calls of a program are timed (not the first: it warms up)


class OpTimer(TorchFunctionMode):
    """Within the block, each ATen op the program calls on this thread is timed (other torch
    calls, the runtime's own, pass untimed); ``record`` hands the times to the measures."""

    def __init__(self):
        super().__init__()
        self.times: list[tuple[str, float]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not isinstance(func, torch._ops.OpOverload):
            return func(*args, **kwargs)
        key = op_key(func, args, kwargs)
        t = time.perf_counter()
        out = func(*args, **kwargs)
        self.times.append((key, time.perf_counter() - t))
        return out

    @contextlib.contextmanager
    def paused(self):
        """Off the mode stack within the block: a fused region (timed as one, by its runner;
        Inductor may compile it there) runs as it would untimed."""
        if _get_current_function_mode() is not self:
            yield
            return
        with _pop_mode_temporarily():
            yield

    def record(self) -> None:
        record_times(self.times)
        self.times = []
