"""Fused regions compiled by Inductor: C++/OpenMP kernels on CPU, Triton on CUDA.

A region (ir/regions.py) is compiled at its first call, from its graph and the real tensors it
is called with: ``torch._inductor.compile`` traces the graph's ATen ops again and generates
the kernels (no Dynamo: no guards to check at each call). Kernels are cached in this process
by the region's structure and the inputs' shapes, strides, dtypes and devices, so identical
layers compile once; Inductor's own on-disk cache (its FX graph cache, which it only consults
when the example inputs carry a shape environment: ``_example_inputs``) makes a later
process's compile quick.
Nothing compiled is ever stored in a plan file: a loaded plan compiles its regions again.
"""
from __future__ import annotations

import threading
import time
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from ..cost_models.measures import record_time
from ..cost_models.op_scratch import allocator_peak
from ..errors import BudgetExceededError, warn_at_caller
from ..ir.regions import Region
from ..ir.units import format_bytes

_KERNELS: dict[tuple, Callable] = {}
_COMPILE_S: dict[tuple, float] = {}
_PEAK: dict[tuple, int] = {}      # bytes the CPU allocator held at most during a kernel's first call
_UNCOMPILED: dict[tuple, str] = {}  # kernels Inductor could not compile: their error
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
        on_cpu = all(a.device.type == "cpu" for a in args if isinstance(a, torch.Tensor))
        if key not in _PEAK and on_cpu and not torch.autograd.profiler._is_profiler_enabled:
            out = self._first_call(fn, key, args)
        elif on_cpu:   # a CPU kernel is done when it returns: its time is the call's
            t = time.perf_counter()
            out = fn(*args)
            record_time(self.region.key, time.perf_counter() - t)
        else:
            out = fn(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    def _first_call(self, fn, key, args):
        """Run the kernel under the profiler's allocator events, once per kernel: the bytes it
        allocates at most (outputs included) must stay within what the region declares, which
        the plan counted; more is a broken bound, reported rather than run past."""
        out, peak = allocator_peak(fn, args)
        _PEAK[key] = peak
        if peak > self.region.nbytes:
            raise BudgetExceededError(
                f"a fused region ({len(self.region.ops)} ops: {', '.join(self.region.ops[:4])} ...) allocated "
                f"{format_bytes(peak)}, more than the {format_bytes(self.region.nbytes)} the plan counted for "
                f"it; please report this (fuse=False avoids it)")
        return out


def _compile(region: Region, key: tuple, args) -> Callable:
    with _LOCK:
        fn = _KERNELS.get(key)
        if fn is None:
            t = time.perf_counter()
            gm = torch.fx.GraphModule(torch.nn.Module(), _plain_copy(region.graph.graph))
            try:
                with torch.no_grad():
                    fn = torch._inductor.compile(gm, _example_inputs(args))
            except Exception as exc:  # noqa: BLE001 - reported, and the region still runs
                fn = _uncompiled(region, gm, key, exc)
            _KERNELS[key] = fn
            _COMPILE_S[key] = time.perf_counter() - t
    return fn


def _example_inputs(args) -> list:
    """The region's inputs as FakeTensors of a mode with a shape environment, their shapes and
    strides static: given real tensors, Inductor makes a mode without one and then bypasses its
    FX graph cache ("No shape env"), so every process generated every kernel's code again."""
    mode = FakeTensorMode(shape_env=ShapeEnv())
    return [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]


def _uncompiled(region: Region, gm: torch.fx.GraphModule, key: tuple, exc: Exception) -> Callable:
    """A region Inductor cannot compile runs its ops one by one, as without fusion (same values,
    no more bytes than its ops make), with a warning naming Inductor's error. Seen so far: a
    graph whose eager strides Inductor's fake tracing does not reproduce (a ``cat`` onto an
    empty cache, then a ``view`` of it: GPT-Neo's training step)."""
    _UNCOMPILED[key] = f"{type(exc).__name__}: {exc}"
    warn_at_caller(f"memsched: Inductor could not compile a fused region ({len(region.ops)} ops: "
                  f"{', '.join(region.ops[:4])} ...), so it runs op by op: {type(exc).__name__}: "
                   f"{str(exc)[:300]}", RuntimeWarning)
    return gm


def uncompiled() -> dict[tuple, str]:
    """Per region kernel Inductor could not compile (region key, input layout): its error."""
    return dict(_UNCOMPILED)


def _plain_copy(graph: torch.fx.Graph) -> torch.fx.Graph:
    """The graph without the planner's metadata (FakeTensors of another mode): Inductor traces
    the real inputs itself. Each dense output is asked for in the layout the plan traced
    (``inductor_force_stride_order``: no copy when Inductor makes it so, one otherwise): Inductor
    lays a result out as its own fake tracing says, which is not always the CPU kernels' layout
    the plan traced (an upsampled channels-last input came back contiguous, so the next region's
    inputs were laid out otherwise than planned and its concatenation was copied once more: 30 KiB
    past its region's bytes, UperNet). Only a layout other than row-major is asked for, which
    Inductor does not give a fresh buffer unasked: forcing a row-major buffer another kernel
    reads through a view copied it (GPT-Neo)."""
    from torch._inductor import inductor_prims   # noqa: F401  (registers prims.inductor_force_stride_order)
    from torch._prims_common import is_non_overlapping_and_dense_or_false as dense

    out = torch.fx.Graph()
    env: dict = {}
    values = out.graph_copy(graph, env)
    # (a view, of an input or of a value made inside, is left as it comes: forcing its layout
    # copies it where Inductor's view of its own buffer is laid out otherwise)
    traced = [o.meta.get("val") if isinstance(o, torch.fx.Node) and not _a_view(o) else None
              for o in _outputs(graph)]
    force = torch.ops.prims.inductor_force_stride_order.default
    if isinstance(values, (list, tuple)) and len(values) == len(traced):
        values = type(values)(
            out.call_function(force, (v, list(t.stride())))
            if isinstance(v, torch.fx.Node) and isinstance(t, torch.Tensor) and t.dim() > 1
            and dense(t) and not t.is_contiguous() else v
            for v, t in zip(values, traced))
    out.output(values)
    for n in out.nodes:
        n.meta.clear()
    return out


_UNANNOTATED_VIEWS = frozenset({torch.ops.aten._unsafe_view.default, torch.ops.aten.reshape.default})


def _a_view(node: torch.fx.Node) -> bool:
    return getattr(node.target, "is_view", False) or node.target in _UNANNOTATED_VIEWS


def _outputs(graph: torch.fx.Graph) -> list:
    args = next(n for n in reversed(graph.nodes) if n.op == "output").args[0]
    return list(args) if isinstance(args, (list, tuple)) else [args]


def measured_peaks() -> dict[tuple, int]:
    """Per compiled kernel (region key, input layout): the allocator bytes its first call held
    at most, on CPU."""
    return dict(_PEAK)


def compiled_count() -> int:
    """How many kernels this process compiled (distinct regions and shapes)."""
    return len(_KERNELS)


def compile_seconds() -> float:
    """Seconds this process spent compiling regions."""
    return sum(_COMPILE_S.values())
