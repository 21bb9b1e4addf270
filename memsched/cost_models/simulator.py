"""Simulator: replay a scheduled program on a hardware profile.

One queue for compute and one per link direction; a transfer starts when its link is free and
its source is ready, a wait stalls compute until its fetch landed, and a free of an offloaded
tensor stalls until the copy has read it. Device bytes are tracked per storage at every node,
so the result is the predicted time and the predicted memory timeline of the schedule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef

from ..runtime import ops
from .hardware import Hardware
from .links import fetch_links, offload_links
from .op_cost import estimate_op_time


@dataclass
class Span:
    stream: str      # "compute" or a link name
    name: str
    start: float
    end: float


@dataclass
class SimResult:
    time_s: float
    compute_s: float
    stall_s: float
    peak_device_bytes: int
    timeline: list[tuple[str, int]]                   # (node, device bytes after it)
    bytes_moved: dict = field(default_factory=dict)   # link -> bytes
    spans: list[Span] = field(default_factory=list)


def _leaves(val):
    return [t for t in pytree.tree_leaves(val) if isinstance(t, torch.Tensor)]


def simulate(gm: fx.GraphModule, hw: Hardware) -> SimResult:
    dev = hw.device_type
    held: dict[object, list[int]] = {}   # storage key -> [bytes, refs]
    keys_of: dict[str, list[object]] = {}
    cur = peak = 0

    restored_as: dict[object, object] = {}  # views of a restored value share its fetch

    def hold(name, keys_sizes):
        nonlocal cur, peak
        keys_sizes = [(restored_as.get(k, k), nb) for k, nb in keys_sizes]
        keys_of[name] = [k for k, _ in keys_sizes]
        for key, nbytes in keys_sizes:
            e = held.get(key)
            if e is None:
                held[key] = [nbytes, 1]
                cur += nbytes
            else:
                e[1] += 1
        peak = max(peak, cur)

    def drop(name):
        nonlocal cur
        for key in keys_of.pop(name, []):
            e = held[key]
            e[1] -= 1
            if e[1] == 0:
                del held[key]
                cur -= e[0]

    def storage(t):
        return StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()

    now = compute = stall = 0.0
    link_free = {}
    done: dict[str, float] = {}
    release_at: dict[str, float] = {}
    moved: dict[str, int] = {}
    spans: list[Span] = []
    timeline = []

    def run_links(links, t, nbytes, name):
        for link in links:
            start = max(t, link_free.get(link, 0.0))
            t = start + nbytes / hw.bandwidth(link)
            link_free[link] = t
            moved[link] = moved.get(link, 0) + nbytes
            spans.append(Span(link, name, start, t))
        return t

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            tier = n.meta.get("memsched.tier", "device")
            if tier == "device":
                hold(n.name, [storage(t) for t in _leaves(n.meta.get("val"))])
        elif n.op == "call_function":
            if n.target is ops.prefetch:
                nbytes = n.meta["memsched.nbytes"]
                src = n.args[0]
                ready = done.get(src.name, 0.0)
                done[n.name] = run_links(fetch_links(n.meta["memsched.tier"], dev), max(now, ready), nbytes, n.name)
                hold(n.name, [(("fetch", n.name), nbytes)])
            elif n.target is ops.wait:
                p = n.args[0]
                if done[p.name] > now:
                    stall += done[p.name] - now
                    now = done[p.name]
                keys_of[n.name] = keys_of.pop(p.name)
                for t in _leaves(n.meta.get("val")):
                    restored_as[storage(t)[0]] = ("fetch", p.name)
            elif n.target is ops.offload:
                x, tier = n.args
                links = offload_links(tier, dev)
                first = run_links(links[:1], now, n.meta["memsched.nbytes"], n.name)
                done[n.name] = run_links(links[1:], first, n.meta["memsched.nbytes"], n.name)
                # a CPU device writes disk straight from the device tensor; a GPU frees after d2h
                release_at[x.name] = first if dev == "cuda" else done[n.name]
            elif n.target is ops.free:
                for x in n.args:
                    if x.name in release_at:
                        t = release_at.pop(x.name)
                        if t > now:
                            stall += t - now
                            now = t
                    drop(x.name)
            else:
                dt = estimate_op_time(n, hw)
                spans.append(Span("compute", n.name, now, now + dt))
                now += dt
                compute += dt
                hold(n.name, [storage(t) for t in _leaves(n.meta.get("val"))])
        timeline.append((n.name, cur))
    return SimResult(now, compute, stall, peak, timeline, moved, spans)
