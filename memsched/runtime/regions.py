"""Fused regions compiled by Inductor: C++/OpenMP kernels on CPU, Triton on CUDA.

A region (ir/regions.py) is compiled at its first call, from its graph and the real tensors it
is called with: ``torch._inductor.compile`` traces the graph's ATen ops again and generates
the kernels (no Dynamo: no guards to check at each call). Kernels are cached in this process
by the region's structure and the inputs' shapes, strides, dtypes and devices, so identical
layers compile once; Inductor's own on-disk cache makes a later process's compile quick.
Nothing compiled is ever stored in a plan file: a loaded plan compiles its regions again.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from ..ir.regions import Region

_KERNELS: dict[tuple, Callable] = {}
_COMPILE_S: dict[tuple, float] = {}
_LOCK = threading.Lock()


def _signature(args) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device) if isinstance(a, torch.Tensor) else repr(a)
                 for a in args)


class RegionKernel:
    """Calls one region's compiled kernel (compiling it at the first call on these shapes)."""

    def __init__(self, region: Region):
        self.region = region

    def __call__(self, *args):
        key = (self.region.key, _signature(args))
        fn = _KERNELS.get(key)
        if fn is None:
            fn = _compile(self.region, key, args)
        out = fn(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def _compile(region: Region, key: tuple, args) -> Callable:
    with _LOCK:
        fn = _KERNELS.get(key)
        if fn is None:
            t = time.perf_counter()
            gm = torch.fx.GraphModule(torch.nn.Module(), _plain_copy(region.graph.graph))
            with torch.no_grad():
                fn = torch._inductor.compile(gm, list(args))
            _KERNELS[key] = fn
            _COMPILE_S[key] = time.perf_counter() - t
    return fn


def _plain_copy(graph: torch.fx.Graph) -> torch.fx.Graph:
    """The graph without the planner's metadata (FakeTensors of another mode): Inductor traces
    the real inputs itself."""
    out = torch.fx.Graph()
    out.output(out.graph_copy(graph, {}))
    for n in out.nodes:
        n.meta.clear()
    return out


def compiled_count() -> int:
    """How many kernels this process compiled (distinct regions and shapes)."""
    return len(_KERNELS)


def compile_seconds() -> float:
    """Seconds this process spent compiling regions."""
    return sum(_COMPILE_S.values())
