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

An op whose autocast casts values it makes itself (``einsum``: autocast casts the ``bmm``
inside it) cannot say so by casting its arguments: it is replaced by its ATen ops traced under
autocast, casts included. An autocast the model opens in its forward, which torch.export keeps
as one op around a subgraph, is inlined, its casts written out under its own autocast.

The autocast a call runs under is part of its signature (``autocast_state``): a call under
another autocast, or none, is captured and planned again.
"""
from __future__ import annotations

import contextlib

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from ..errors import UnsupportedModelError
from .fake import eager_meta
from .inline import drop_unused_subgraphs, inline_call

_DEVICE_TYPES = ("cpu", "cuda")
_TO_COPY = torch.ops.aten._to_copy.default


def autocast_state() -> tuple:
    """The autocast this thread runs under: (device type, dtype, cast cache on) for each device
    type it is on."""
    cache = torch.is_autocast_cache_enabled()
    return tuple((d, torch.get_autocast_dtype(d), cache) for d in _DEVICE_TYPES if torch.is_autocast_enabled(d))


@contextlib.contextmanager
def no_autocast():
    """Autocast off on every device type where it is on (programs carry their casts)."""
    with contextlib.ExitStack() as stack:
        for device_type, *_ in autocast_state():
            stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


@contextlib.contextmanager
def autocast_as(state: tuple):
    """Autocast on as ``state`` (``autocast_state()``) says. Its cast cache as the caller's: in
    a training step's trace a weight that several ops read is cast once, as eager casts it, so
    its gradient sums as eager's does; the cache's keys are the trace's own fresh leaves, which
    no other trace sees."""
    with contextlib.ExitStack() as stack:
        for device_type, dtype, cache in state:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=cache))
        yield


class _CastRecorder(TorchDispatchMode):
    """The casts made of the tensors an op is handed (id(argument) -> cast dtype), and how many
    of values it made itself (a composite's autocast-listed op inside it: einsum's bmm)."""

    def __init__(self, arguments: list):
        super().__init__()
        self.ids, self.casts, self.inner = {id(a) for a in arguments}, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TO_COPY and args and "dtype" in kwargs:
            if id(args[0]) in self.ids:
                self.casts[id(args[0])] = kwargs["dtype"]
            elif kwargs["dtype"] != args[0].dtype:
                self.inner += 1
        return func(*args, **kwargs)


def _casts_of(node: fx.Node) -> dict[fx.Node, torch.dtype] | None:
    """The graph values autocast casts when ``node`` runs on its traced values, and to what;
    None where it casts values the op makes inside itself (no cast of its arguments says that)."""
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
        by_op = _CastRecorder([])
    if by_autocast.inner > by_op.inner:
        return None
    by_autocast, by_op = by_autocast.casts, by_op.casts
    casts = {}
    for arg in node.all_input_nodes:
        v = arg.meta.get("val")
        dtype = by_autocast.get(id(v)) if isinstance(v, torch.Tensor) else None
        if dtype is not None and dtype != v.dtype and by_op.get(id(v)) != dtype:
            casts[arg] = dtype
    return casts


def _recorded_casts(node: fx.Node, values, leaves: list, fake_mode, casting: bool) -> _CastRecorder:
    """``node`` run on its traced values (autocast on or off), its casts recorded."""
    with fake_mode or contextlib.nullcontext(), _autocast_off_unless(casting), _CastRecorder(leaves) as recorder:
        node.target(*values[0], **values[1])
    return recorder


def _autocast_off_unless(on: bool):
    return contextlib.nullcontext() if on else no_autocast()


def make_casts_explicit(gm: fx.GraphModule, nodes=None) -> int:
    """Write out, as ``_to_copy`` nodes, the casts the autocast now on makes of the arguments of
    each ATen op (of ``nodes``, default all); returns how many. Call under the autocast the
    graph was traced with."""
    if not autocast_state():
        return 0
    graph, made = gm.graph, 0
    for node in list(gm.graph.nodes if nodes is None else nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        casts = _casts_of(node)
        if casts is None:
            made += _decompose(gm, node)
            continue
        for arg, dtype in casts.items():
            with graph.inserting_before(node):
                cast = graph.call_function(_TO_COPY, (arg,), {"dtype": dtype})
            v = arg.meta["val"]
            with torch._guards.detect_fake_mode([v]) or contextlib.nullcontext():
                cast.meta["val"] = _TO_COPY(v, dtype=dtype)
            _part_of(cast, node)
            node.replace_input_with(arg, cast)
            made += 1
    if made:
        graph.lint()
        gm.recompile()
    return made


def _part_of(new: fx.Node, node: fx.Node) -> None:
    """``new`` belongs to the module ``node`` does (the layers of frontend/repeats.py)."""
    for key in ("nn_module_stack", "stack_trace"):
        if key in node.meta:
            new.meta[key] = node.meta[key]


def _decompose(gm: fx.GraphModule, node: fx.Node) -> int:
    """Replace ``node`` by its ATen ops traced under the autocast now on (``make_fx`` traces
    below autocast: its casts are ops of the trace, those of values made inside included);
    returns how many casts that wrote out."""
    flat, spec = pytree.tree_flatten((node.args, node.kwargs))
    at = [i for i, a in enumerate(flat) if isinstance(a, fx.Node)]

    def call(*tensors):
        parts = list(flat)
        for i, t in zip(at, tensors):
            parts[i] = t
        args, kwargs = pytree.tree_unflatten(parts, spec)
        return node.target(*args, **kwargs)

    vals = [flat[i].meta["val"] for i in at]
    # (eager_meta: each op's result laid out as its CPU kernel lays it out, as the run will)
    with torch._guards.detect_fake_mode(vals) or contextlib.nullcontext(), eager_meta():
        traced = make_fx(call, tracing_mode="real", record_module_stack=False)(*vals)
    env = dict(zip([n for n in traced.graph.nodes if n.op == "placeholder"], [flat[i] for i in at]))
    graph = gm.graph
    with graph.inserting_before(node):
        for tn in traced.graph.nodes:
            if tn.op not in ("placeholder", "output"):
                env[tn] = graph.node_copy(tn, lambda x: env[x])
                _part_of(env[tn], node)
    out = traced.graph.output_node().args[0]
    node.replace_all_uses_with(pytree.tree_map(lambda x: env[x] if isinstance(x, fx.Node) else x, out))
    graph.erase_node(node)
    return sum(1 for tn in traced.graph.nodes if tn.target is _TO_COPY)


def inline_autocast_regions(gm: fx.GraphModule) -> int:
    """Inline the autocasts a model opens in its forward (torch.export's ``wrap_with_autocast``
    around a subgraph): each region's ops run in the program, their casts written out under
    the region's own autocast (none where it turns autocast off: the program runs with it off).
    As one op, a region's casts and temporaries were memory no plan counted. Returns how many."""
    inlined = 0
    while True:   # outermost first: a region inside one comes up with its copy
        node = next((n for n in gm.graph.nodes if n.op == "call_function"
                     and type(n.target).__name__ == "WrapWithAutocast"), None)
        if node is None:
            break
        device_type, dtype, enabled, cache, getter, *inputs = node.args
        copied = inline_call(gm, node, getter, inputs)
        inlined += 1
        if enabled:
            with no_autocast(), autocast_as(((device_type, dtype, cache),)):
                make_casts_explicit(gm, copied)
    if inlined:
        drop_unused_subgraphs(gm)
        gm.graph.lint()
        gm.recompile()
    return inlined
