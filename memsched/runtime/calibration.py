"""What the runtime itself costs on the calling thread, measured for the local hardware profile.

A scheduled program is Python: every line tracks its op's output with the device accountant or
frees a value, and every inserted transfer is issued to a worker and waited for. On a CPU those
costs are tens of microseconds, as large as a small op's kernel, so a plan that splits a layer
into many small ops or moves many small tensors is slower than the roofline says. The simulator
charges them per line (``runtime_op_s``) and per transfer (``runtime_move_s``).
"""
from __future__ import annotations

import statistics
import time

import torch

from ..cost_models.hardware import set_runtime_probe
from .accounting import DeviceAccountant
from .stores import HostCopy, HostPool, Layout
from .transfer import TransferEngine


def _median_s(fn, reps: int) -> float:
    for _ in range(10):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def line_cost(device: torch.device, reps: int = 300) -> float:
    """A program line around the cheapest op: a view called as the program calls ops, its output
    tracked and later released (the kernel-free part of every line)."""
    acct = DeviceAccountant(1 << 62)
    x = torch.ones(4, 8, device=device)
    view = torch.ops.aten.view.default._op

    def line():
        v = view(x, [8, 4])
        acct.track(v)
        acct.release(v)
    return _median_s(line, reps)


def move_cost(device: torch.device, reps: int = 100) -> float:
    """A transfer as the program makes one: issue a fetch of a small host copy, wait for it,
    free it (worker hand-off and wake-up included: the calling thread waits for them)."""
    engine = TransferEngine(device, None, HostPool(pinned=False))
    src = torch.ones(256, device="cpu")
    copy = HostCopy(src, Layout.of(src), None)
    acct = DeviceAccountant(1 << 62)
    try:
        def move():
            t = engine.wait(engine.fetch(copy))
            acct.track(t)
            acct.release(t)
        return _median_s(move, reps)
    finally:
        engine.close()


def runtime_costs(device: torch.device) -> tuple[float, float]:
    return line_cost(device), move_cost(device)


set_runtime_probe(runtime_costs)
