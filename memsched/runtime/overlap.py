"""How well a call overlaps its copies with compute, read off a CUDA profiler timeline.

The planner assumes host->device and device->host copies run beside the kernels (lesson 4);
this measures it: the time copies ran, the part of it during which a kernel ran too, and the
CPU calls that block on the GPU (stream, event and device synchronisations) -- each one drains
the queue of work the CPU had run ahead with.
"""
from __future__ import annotations

from typing import Callable

SYNC_CALLS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize")


def merged(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The union of [start, end) intervals, as disjoint sorted intervals."""
    out: list[list[float]] = []
    for start, end in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(a, b) for a, b in out]


def covered(intervals: list[tuple[float, float]], by: list[tuple[float, float]]) -> float:
    """The length of ``intervals`` (their union) that ``by`` (its union) also covers."""
    a, b = merged(intervals), merged(by)
    total, j = 0.0, 0
    for start, end in a:
        while j < len(b) and b[j][1] <= start:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            total += max(0.0, min(end, b[k][1]) - max(start, b[k][0]))
            k += 1
    return total


def length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in merged(intervals))


def overlap_report(fn: Callable[[], object]) -> dict:
    """Run ``fn`` once under the profiler (CUDA activities) and report, in milliseconds:
    h2d_ms / d2h_ms (copy time), kernel_ms, overlapped (the fraction of copy time a kernel ran
    beside), cpu_syncs (blocking synchronisation calls the calling thread made inside ``fn``:
    each drains the GPU queue) and worker_syncs (those of memsched's transfer threads)."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("memsched.overlap_report"):
            fn()
        torch.cuda.synchronize()
    events = list(prof.events())
    call = next(e for e in events if e.name == "memsched.overlap_report")
    copies: dict[str, list] = {"h2d": [], "d2h": []}
    kernels, syncs, worker_syncs = [], 0, 0
    for e in events:
        name = e.name
        if any(s in name for s in SYNC_CALLS):
            inside = call.time_range.start <= e.time_range.start <= call.time_range.end
            if e.thread == call.thread:
                syncs += inside
            else:
                worker_syncs += 1
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        span = (e.time_range.start, e.time_range.end)
        if "Memcpy HtoD" in name:
            copies["h2d"].append(span)
        elif "Memcpy DtoH" in name:
            copies["d2h"].append(span)
        elif "Memcpy" not in name and "Memset" not in name:
            kernels.append(span)
    moved = copies["h2d"] + copies["d2h"]
    copy_us = length(moved)
    return {"h2d_ms": length(copies["h2d"]) / 1e3, "d2h_ms": length(copies["d2h"]) / 1e3,
            "kernel_ms": length(kernels) / 1e3,
            "overlapped": covered(moved, kernels) / copy_us if copy_us else 0.0,
            "cpu_syncs": syncs, "worker_syncs": worker_syncs}
