"""Simulator: replay a scheduled program on a hardware profile.

One queue for compute and one per link direction; a transfer starts when its link is free and
its source is ready, a wait stalls compute until its fetch landed, and a free of an offloaded
tensor stalls until the copy has read it. Device bytes come from the IR's one memory walk
(``ir/memory.py``), so the result is the predicted time and the predicted memory timeline.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from ..ir.kinds import fetch_links, offload_links
from ..ir.memory import DeviceMemory
from ..ir.meta import info
from ..ir.ops import Op, op_of, register
from ..ir.regions import region_of
from .hardware import LOCAL_CPU, Hardware
from .op_cost import op_time, region_time
from .measures import measured_time


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
    contention_s: float = 0.0                         # compute delayed by copies taking its cores


class _Clock:
    """Where compute stands, when each link is next free, and when each move is done."""

    def __init__(self, hw: Hardware):
        self.hw, self.dev = hw, hw.device_type
        self.now = self.compute = self.stall = 0.0
        self.link_free: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.release_at: dict[str, float] = {}   # offloaded value -> when its copy has read it
        self.moved: dict[str, int] = {}
        self.spans: list[Span] = []

    def run_links(self, links, t, nbytes, name):
        for link in links:
            start = max(t, self.link_free.get(link, 0.0))
            t = start + nbytes / self.hw.bandwidth(link)
            self.link_free[link] = t
            self.moved[link] = self.moved.get(link, 0) + nbytes
            self.spans.append(Span(link, name, start, t))
        return t

    def wait_until(self, t):
        if t > self.now:
            self.stall += t - self.now
            self.now = t

    def compute_node(self, n):
        t = op_time(n, self.hw)
        if self.dev == "cuda":
            # kernels run while the CPU goes on: the line's own cost shows only where the GPU
            # would otherwise wait for it (tiny kernels)
            self.run_compute(n, max(t, self.hw.runtime_op_s))
        else:
            self.run_compute(n, t)
            self.runtime(self.hw.runtime_op_s)   # its output tracked, on the same core

    def region(self, n):
        reg = region_of(n)
        # measured times are this machine's: they price the local CPU profile, not a preset
        measured = measured_time(reg.key) if self.hw.name == LOCAL_CPU else None
        self.run_compute(n, measured if measured is not None else region_time(reg.graph, self.hw))
        self.runtime(self.hw.runtime_op_s)

    def run_compute(self, n, dt):
        self.spans.append(Span("compute", n.name, self.now, self.now + dt))
        self.now += dt
        self.compute += dt

    def runtime(self, dt):
        """The runtime's own work on the calling thread (issuing, waiting, freeing): it delays
        the compute after it but is not compute."""
        self.now += dt

    def prefetch(self, n):
        self.runtime(self.hw.runtime_move_s)
        ready = self.done.get(n.args[0].name, 0.0)
        links = fetch_links(info(n).tier, self.dev)
        self.done[n.name] = self.run_links(links, max(self.now, ready), info(n).nbytes, n.name)

    def wait(self, n):
        self.wait_until(self.done[n.args[0].name])
        self.runtime(self.hw.runtime_op_s)

    def offload(self, n):
        self.runtime(self.hw.runtime_move_s)
        x, tier = n.args
        links = offload_links(tier, self.dev)
        first = self.run_links(links[:1], self.now, info(n).nbytes, n.name)
        self.done[n.name] = self.run_links(links[1:], first, info(n).nbytes, n.name)
        # a CPU device writes disk straight from the device tensor; a GPU frees after d2h
        self.release_at[x.name] = first if self.dev == "cuda" else self.done[n.name]

    def free(self, n):
        self.runtime(self.hw.runtime_op_s)
        for x in n.args:
            if x.name in self.release_at:
                self.wait_until(self.release_at.pop(x.name))


_TIME = register("simulator", {
    Op.PREFETCH: _Clock.prefetch,
    Op.WAIT: _Clock.wait,
    Op.OFFLOAD: _Clock.offload,
    Op.FREE: _Clock.free,
    Op.BOUNDARY: _Clock.compute_node,
    Op.REGION: _Clock.region,
})


def simulate(gm: fx.GraphModule, hw: Hardware) -> SimResult:
    clock, memory = _Clock(hw), DeviceMemory(hw.alloc_block_bytes, hw.workspace_bytes)
    timeline = []
    for n in gm.graph.nodes:
        op = op_of(n)
        if op is not None:
            _TIME[op](clock, n)
        elif n.op == "call_function":
            clock.compute_node(n)
        memory.visit(n)
        timeline.append((n.name, memory.current))
    contention = _core_contention(clock, hw)
    return SimResult(clock.now + contention, clock.compute, clock.stall, memory.peak, timeline, clock.moved,
                     clock.spans, contention)


def _core_contention(clock: _Clock, hw: Hardware) -> float:
    """On a CPU device every move is a copy a worker thread makes (a memcpy, a read or write of
    the page cache, its checksum), on the cores compute runs on: the cores torch's threads leave
    spare absorb them for the length of the step, the rest of their busy time delays compute.
    A whole-step balance, not a timeline: bursts above the spare cores are not seen."""
    if hw.device_type != "cpu" or not hw.cpu_cores or not hw.compute_threads:
        return 0.0
    busy = sum(s.end - s.start for s in clock.spans if s.stream != "compute")
    spare = max(hw.cpu_cores - hw.compute_threads, 0) * clock.now
    return max(busy - spare, 0.0)
