"""Rematerialization under fusion: pointwise values the backward reads are recomputed there
instead of saved, where that is cheaper than saving them.

Autograd saves what each op's backward formula reads: for GPT-2's tanh GELU, the input, the
tanh, ``0.5 * x``, ``1 + tanh`` and the output -- five tensors of the MLP's width, where one
(the input) determines the rest. With fusion on (``fuse=True``), a chain of pointwise ops
recomputed right before the backward op that reads it joins that op's compiled region: it
costs its arithmetic, and the values it rebuilds are never written to memory. Saving costs a
write in the forward (unless a library op reads the value there anyway) and a read in the
backward, and holds the bytes across the step. So a value is recomputed when

    chain FLOPs / rate  [+ write and read, if a library op reads it in the backward]
        <  read in the backward  [+ write, if only pointwise ops read it in the forward]

and the chain reads nothing that is not saved already (or a weight): the saved set only
shrinks. The choice is the min-cut partitioner's for fused graphs, priced by the same roofline
as the fused regions (cost_models/op_cost.py). Without fusion the recomputed ops would run one
by one and the pass does nothing; dropping a value to fit a budget stays the placement's
choice (RECOMPUTE), which this pass leaves open for what it keeps.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from ..cost_models.hardware import Hardware
from ..frontend.repeats import realiased_val, remade_val
from ..ir.effects import written_args
from ..ir.graph_module import lazy_graph_module
from ..ir.meta import annotate
from ..ir.ops import Op, op_of
from ..ir.tensors import storages
from .fusion import fused_op_time, fusible, pointwise

MAX_CHAIN = 16  # ops recomputed for one value at most


AGAIN = "_again"   # suffix of a recomputed copy's name


@dataclass(frozen=True)
class Remat:
    """What the pass did: values no longer saved, their bytes, the ops it added."""

    values: tuple[str, ...]
    nbytes: int
    ops: int

    def note(self) -> str:
        from ..budget import format_bytes

        if not self.values:
            return "nothing is cheaper to recompute than to save"
        return (f"{len(self.values)} saved value(s) recomputed in the backward "
                f"({format_bytes(self.nbytes)}, {self.ops} ops)")


def _keys(n: fx.Node) -> frozenset:
    return frozenset(k for k, _ in storages(n.meta.get("val")))


def _bytes(n: fx.Node) -> int:
    return sum(dict(storages(n.meta.get("val"))).values())


def _view(n: fx.Node) -> bool:
    return fusible(n) and n.target is not operator.getitem and n.target.is_view


class _Joint:
    """The joint graph split at its boundary: which forward storages the backward reads."""

    def __init__(self, graph: fx.Graph, weights: frozenset):
        self.weights = weights           # placeholders the step holds throughout
        nodes = list(graph.nodes)
        cut = next(i for i, n in enumerate(nodes) if op_of(n) is Op.BOUNDARY)
        self.forward = nodes[:cut]
        self.backward = nodes[cut + 1:]
        self.fwd_set = set(self.forward)
        self.written = frozenset(k for n in nodes for w in written_args(n) for k in _keys(w))
        self.saved: set = set()          # storage keys the backward reads
        for n in self.backward:
            for x in n.all_input_nodes:
                if x in self.fwd_set:
                    self.saved |= _keys(x)

    def clonable(self, n: fx.Node) -> bool:
        return (n in self.fwd_set and n.op == "call_function" and (pointwise(n) or _view(n))
                and not (_keys(n) & self.written)
                and not any(_keys(x) & self.written for x in n.all_input_nodes))

    def available(self, n: fx.Node) -> bool:
        """Read where it is in the backward: a weight, or a storage that stays saved."""
        if n.op == "placeholder":
            return n.name in self.weights or (bool(_keys(n)) and _keys(n) <= self.saved)
        return n in self.fwd_set and bool(_keys(n)) and _keys(n) <= self.saved


def _chain(j: _Joint, v: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """The forward ops that rebuild ``v`` from available values (in program order), and the
    values they read that are not saved (they would have to be); None past ``MAX_CHAIN``."""
    members, leaves, seen = [], [], set()

    def visit(n: fx.Node, depth: int = 1) -> bool:
        if depth > MAX_CHAIN:   # as many members at least: too long (and no deep recursion)
            return False
        seen.add(n)
        for x in n.all_input_nodes:
            if x in seen or j.available(x):
                continue
            if j.clonable(x):
                if not visit(x, depth + 1):
                    return False
            else:
                seen.add(x)
                leaves.append(x)
        members.append(n)
        return len(members) <= MAX_CHAIN

    return (members, leaves) if visit(v) else None


def _library_reader(readers) -> bool:
    """Some reader is not pointwise: the value is materialized for it."""
    return any(op_of(u) is not None or not pointwise(u) for u in readers)


def _readers(j: _Joint, v: fx.Node, backward: bool) -> list[fx.Node]:
    """Who reads ``v`` through any chain of views, in the backward or in the forward."""
    out, stack = [], [v]
    while stack:
        for u in stack.pop().users:
            if _view(u):
                stack.append(u)
            elif (u in j.fwd_set) != backward:
                out.append(u)
    return out


def _worth_it(j: _Joint, v: fx.Node, members, hw: Hardware) -> bool:
    nbytes = _bytes(v)
    io = nbytes / hw.mem_bw
    recompute = sum(fused_op_time(m, hw) or 0.0 for m in members) + (2 * io if _library_reader(_readers(j, v, True)) else 0.0)
    keep = io + (0.0 if _library_reader(_readers(j, v, False)) else io)
    return recompute < keep


def rematerialize(gm: fx.GraphModule, hw: Hardware, weights=frozenset()) -> tuple[fx.GraphModule, Remat]:
    """``gm``'s joint graph with the saved pointwise values that are cheaper to recompute
    recomputed in the backward (module docstring): a new program, or ``gm`` itself when none is.
    ``weights``: the placeholders held through the step (weights, buffers), which a chain may
    read; an input placeholder it reads must be read by the backward already."""
    if not any(op_of(n) is Op.BOUNDARY for n in gm.graph.nodes):
        return gm, Remat((), 0, 0)
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    j = _Joint(graph, frozenset(weights))
    makers: dict = {}   # storage key -> how many forward ops (views aside) make a value on it
    for o in j.forward:
        if not _view(o):
            for k in _keys(o):
                makers[k] = makers.get(k, 0) + 1
    dropped, nbytes = [], 0
    for v in j.forward:
        keys = _keys(v)
        if not pointwise(v) or not keys or not keys <= j.saved or not j.clonable(v):
            continue
        if any(makers[k] > 1 for k in keys):
            continue   # its storage is another op's too (an output aliasing an input)
        j.saved -= keys             # tentatively: the chain must not read v itself
        found = _chain(j, v)
        if found is None or found[1] or not _worth_it(j, v, found[0], hw):
            j.saved |= keys
            continue
        dropped.append(v.name)
        nbytes += _bytes(v)
    if not dropped:
        return gm, Remat((), 0, 0)
    ops = _rewrite(graph, j)
    for n in reversed(j.forward):   # the aliases autograd saved them through, now unread
        if not n.users and (_view(n) or pointwise(n)):
            graph.erase_node(n)
    graph.lint()
    return lazy_graph_module(gm, graph, class_name="Remat"), Remat(tuple(dropped), nbytes, ops)


def _rewrite(graph: fx.Graph, j: _Joint) -> int:
    """Each backward node reads clones of the forward values no longer saved, made right before
    it (once each: a clone made for an earlier node is reused)."""
    env: dict[fx.Node, fx.Node] = {}

    def dropped(a: fx.Node) -> bool:
        return a in j.fwd_set and not j.available(a)

    def clone(x: fx.Node, before: fx.Node) -> fx.Node:
        """``x`` remade before ``before``, its dropped inputs first (depth first, in argument
        order). Iterative: a layer recomputed whole is a chain of hundreds of ops (a CvT stage)."""
        if not dropped(x):
            return x
        stack = [x]
        while stack:
            n = stack[-1]
            if n in env:
                stack.pop()
                continue
            pending = [a for a in n.all_input_nodes if dropped(a) and a not in env]
            if pending:
                stack.extend(reversed(pending))
                continue
            stack.pop()
            args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a: env[a] if dropped(a) else a)
            with graph.inserting_before(before):
                new = graph.create_node("call_function", n.target, args, kwargs, name=n.name + AGAIN)
            new.meta = dict(n.meta)
            new.meta["val"] = remade_val(n, new)   # a storage of its own, or its new input's
            annotate(new, made_by="remat")
            env[n] = new
        return env[x]

    traced: dict[fx.Node, object] = {}   # backward values moved onto a clone: their traced value

    for n in j.backward:
        pairs = []

        def swap(a: fx.Node) -> fx.Node:
            b = clone(a, n)
            pairs.append((traced.get(a, a.meta.get("val")), b.meta.get("val")))
            return b
        n.args, n.kwargs = fx.map_arg((n.args, n.kwargs), swap)
        # a view of a swapped input (or of a value already moved) views the clone now: else the
        # analysis would see the dropped storage read in the backward and keep it alive
        moved = realiased_val(n.meta.get("val"), [o for o, _ in pairs], [v for _, v in pairs])
        if moved is not None:
            traced[n] = n.meta["val"]
            n.meta["val"] = moved
    return len(env)
