"""A model called under ``torch.autocast``: its casts written out as ops of the program.

torch.export traces above autocast: a ``linear`` of float32 tensors traced under a bfloat16
autocast is recorded as ``linear`` with a bfloat16 result, and the bfloat16 copies of its input,
weight and bias that autocast makes inside the call are no values of the graph. Run as captured,
those copies were memory no plan counted (an MLP at memsched's minimum held 2.4x its budget)
and a program captured under autocast depended on the caller still being under it. So each op is
run again on its traced values under the autocast it was captured with, the casts autocast makes
of its arguments are recorded, and each becomes an ``aten._to_copy`` node the op then reads: the
program computes what it computed under autocast with autocast off, every copy is a value the
planner places and frees, and the runtime runs programs with autocast off (``no_autocast``).

The autocast a call runs under is part of its signature (``autocast_state``): a call under
another autocast, or none, is captured and planned again.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import UnsupportedModelError

_DEVICE_TYPES = ("cpu", "cuda")
_TO_COPY = torch.ops.aten._to_copy.default


def autocast_state() -> tuple:
    """The autocast this thread runs under: (device type, dtype) for each device type it is on."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in _DEVICE_TYPES if torch.is_autocast_enabled(d))


@contextlib.contextmanager
def no_autocast():
    """Autocast off on every device type where it is on (programs carry their casts)."""
    with contextlib.ExitStack() as stack:
        for device_type, _ in autocast_state():
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


@contextlib.contextmanager
def autocast_as(state: tuple):
    """Autocast on as ``state`` (``autocast_state()``) says, its cast cache off: a trace's casts
    are of FakeTensors, which a cache kept past the trace (the caller's autocast still open)
    could hand to the next one."""
    with contextlib.ExitStack() as stack:
        for device_type, dtype in state:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=False))
        yield


class _CastRecorder(TorchDispatchMode):
    """The casts autocast makes of the tensors it is handed: id(argument) -> cast dtype."""

    def __init__(self, arguments: list):
        super().__init__()
        self.ids, self.casts = {id(a) for a in arguments}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TO_COPY and args and id(args[0]) in self.ids and "dtype" in kwargs:
            self.casts[id(args[0])] = kwargs["dtype"]
        return func(*args, **kwargs)


def _casts_of(node: fx.Node) -> dict[fx.Node, torch.dtype]:
    """The graph values autocast casts when ``node`` runs on its traced values, and to what."""
    values = fx.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    leaves = [v for v in pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]
    if not leaves:
        return {}
    fake_mode = torch._guards.detect_fake_mode(leaves)
    try:
        by_autocast = _recorded_casts(node, values, leaves, fake_mode, casting=True)
    except Exception as exc:
        raise UnsupportedModelError(
            f"memsched: could not run {node.target} ({node.name}) again on its traced values under "
            f"torch.autocast, to write out the casts autocast makes inside it ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); call the model outside autocast, or cast the model") from exc
    try:   # an op that casts of itself (``to``) casts without autocast too
        by_op = _recorded_casts(node, values, leaves, fake_mode, casting=False)
    except Exception:   # it needs autocast's casts to run at all (a convolution of mixed dtypes)
        by_op = {}
    casts = {}
    for arg in node.all_input_nodes:
        v = arg.meta.get("val")
        dtype = by_autocast.get(id(v)) if isinstance(v, torch.Tensor) else None
        if dtype is not None and dtype != v.dtype and by_op.get(id(v)) != dtype:
            casts[arg] = dtype
    return casts


def _recorded_casts(node: fx.Node, values, leaves: list, fake_mode, casting: bool) -> dict:
    with fake_mode or contextlib.nullcontext(), _autocast_off_unless(casting), _CastRecorder(leaves) as recorder:
        node.target(*values[0], **values[1])
    return recorder.casts


def _autocast_off_unless(on: bool):
    return contextlib.nullcontext() if on else no_autocast()


def make_casts_explicit(gm: fx.GraphModule) -> int:
    """Write out, as ``_to_copy`` nodes, the casts the autocast now on makes of each ATen op's
    arguments; returns how many. Call under the autocast the graph was traced with."""
    if not autocast_state():
        return 0
    graph, made = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        casts = _casts_of(node)
        for arg, dtype in casts.items():
            with graph.inserting_before(node):
                cast = graph.call_function(_TO_COPY, (arg,), {"dtype": dtype})
            v = arg.meta["val"]
            with torch._guards.detect_fake_mode([v]) or contextlib.nullcontext():
                cast.meta["val"] = _TO_COPY(v, dtype=dtype)
            for key in ("nn_module_stack", "stack_trace"):   # the layer it belongs to (frontend/repeats.py)
                if key in node.meta:
                    cast.meta[key] = node.meta[key]
            node.replace_input_with(arg, cast)
            made += 1
    if made:
        graph.lint()
        gm.recompile()
    return made
