"""Analysis: steps, buffers (storages), their kinds, sizes, events and the live-bytes profile.

Placement decides per *buffer* (a storage), not per fx value: views share their base's
storage, so they follow it. A buffer's events are the steps where any value aliasing it is
defined or read; between two events it is idle, and an idle gap is what placement can fill
with an offload. Results are stored on the graph (``node.meta["memsched.step"]``,
``node.meta["memsched.buffers"]``) and returned as one frozen ``Program``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef

from ..compiler.capture import INPUT, PERSISTENT, Captured, written_args
from ..runtime import ops

ACTIVATION, OUTPUT = "activation", "output"
START = -1  # virtual step before the program: weights and inputs are defined here


def tensor_leaves(val) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(val) if isinstance(x, torch.Tensor)]


@dataclass(frozen=True)
class Buffer:
    id: int
    name: str                 # the fx value that created it
    nbytes: int
    kind: str                 # weight / buffer / constant / input / activation
    is_output: bool
    events: tuple[int, ...]   # sorted steps where it is defined or used; START for placeholders,
                              # ``n_steps`` (the program end) for outputs
    values: tuple[str, ...]   # fx values that alias it (the creator first)

    @property
    def def_step(self) -> int:
        return self.events[0]

    @property
    def last_step(self) -> int:
        return self.events[-1]


@dataclass(frozen=True)
class Value:
    name: str
    step: int                 # defining step (START for placeholders)
    last_use: int             # last step reading it (its own step if unused; n_steps if an output)
    buffers: tuple[int, ...]  # buffers of its tensor leaves
    single_tensor: bool       # a plain tensor (not a tuple/list): can be moved between tiers


@dataclass(frozen=True)
class Program:
    """Everything later stages read about the captured graph."""

    steps: tuple[str, ...]        # call_function node names in execution order
    buffers: tuple[Buffer, ...]
    values: dict[str, Value]
    live_bytes: np.ndarray        # device bytes live at each step if nothing ever moves
    start_bytes: int = 0          # bytes held before the first step (model tensors and inputs)
    # training steps: the forward ends at ``boundary``; the caller holds the forward outputs
    # (``user_held``) from there on; ``pinned`` model tensors are updated in place (batch norm
    # statistics) and stay resident; ``recipes`` say how a value can be recomputed
    boundary: int | None = None
    user_held: frozenset = frozenset()
    pinned: frozenset = frozenset()
    recipes: dict = field(default_factory=dict)
    grads: frozenset = frozenset()   # buffers of parameter gradients (outputs of the step)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def peak_bytes(self) -> int:
        return max(int(self.live_bytes.max()) if len(self.live_bytes) else 0, self.start_bytes)

    def bytes_of(self, kind: str) -> int:
        return sum(b.nbytes for b in self.buffers if b.kind == kind)


def storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (NotImplementedError, RuntimeError):  # sparse / opaque tensors: count the view
        return t.numel() * t.element_size()


def analyze(captured: Captured) -> Program:
    """Compute steps, buffers, values and the live-bytes profile; annotate node.meta."""
    graph = captured.gm.graph
    kinds = {p.name: p.kind for p in captured.placeholders}
    storage_to_buffer: dict[StorageWeakRef, int] = {}
    buf_name, buf_bytes, buf_kind, buf_events, buf_values = [], [], [], [], []
    values: dict[str, dict] = {}
    steps: list[str] = []

    def buffers_for(node: torch.fx.Node, step: int, kind: str) -> tuple[int, ...]:
        ids = []
        for t in tensor_leaves(node.meta.get("val")):
            key = StorageWeakRef(t.untyped_storage())
            bid = storage_to_buffer.get(key)
            if bid is None:
                bid = len(buf_name)
                storage_to_buffer[key] = bid
                buf_name.append(node.name)
                buf_bytes.append(storage_nbytes(t))
                buf_kind.append(kind)
                buf_events.append({step})
                buf_values.append([])
            if node.name not in buf_values[bid]:
                buf_values[bid].append(node.name)
            ids.append(bid)
        return tuple(ids)

    for node in graph.nodes:
        if node.op == "placeholder":
            bids = buffers_for(node, START, kinds.get(node.name, INPUT))
            step = START
        elif node.op == "call_function":
            step = len(steps)
            steps.append(node.name)
            # getitem reads only what it extracts; every other op reads all of its inputs
            if node.target is operator.getitem:
                used = [node.args[0]]
            else:
                used = node.all_input_nodes
            for inp in used:
                for bid in values[inp.name]["buffers"]:
                    buf_events[bid].add(step)
                values[inp.name]["last_use"] = step
            bids = buffers_for(node, step, ACTIVATION)
            for bid in bids:
                buf_events[bid].add(step)
            node.meta["memsched.step"] = step
        elif node.op == "output":
            continue
        elif node.op == "get_attr":  # a submodule of a higher-order op: code, not data
            values[node.name] = {"step": START, "last_use": START, "buffers": (), "single_tensor": False}
            continue
        else:
            raise NotImplementedError(f"unexpected fx node {node.op} {node.target}")
        node.meta["memsched.buffers"] = bids
        val = node.meta.get("val")
        values[node.name] = {
            "step": step, "last_use": step, "buffers": bids,
            "single_tensor": isinstance(val, torch.Tensor),
        }
    end = len(steps)
    output_node = graph.output_node()
    outputs = set()
    for inp in output_node.all_input_nodes:
        values[inp.name]["last_use"] = end
        for bid in values[inp.name]["buffers"]:
            buf_events[bid].add(end)
            outputs.add(bid)

    buffers = tuple(
        Buffer(i, buf_name[i], buf_bytes[i], buf_kind[i], i in outputs,
               tuple(sorted(buf_events[i])), tuple(buf_values[i]))
        for i in range(len(buf_name))
    )
    # live bytes per step: a buffer is live from its first to its last event; the model's
    # own tensors (weights, buffers, constants) for the whole program
    diff = np.zeros(end + 2, dtype=np.int64)
    for b in buffers:
        if b.kind in PERSISTENT and len(b.events) == 1:
            continue  # never read: stays with the model, off the device
        lo = 0 if b.kind in PERSISTENT or b.def_step == START else b.def_step
        hi = end - 1 if b.kind in PERSISTENT else min(b.last_step, end - 1)
        if end and hi >= lo:
            diff[lo] += b.nbytes
            diff[hi + 1] -= b.nbytes
    live = np.cumsum(diff[:end]) if end else np.zeros(0, dtype=np.int64)
    # before the first step every input is held, read or not, beside the model's tensors
    start = sum(b.nbytes for b in buffers if b.def_step == START and (b.kind not in PERSISTENT or len(b.events) > 1))
    vals = {k: Value(k, v["step"], v["last_use"], v["buffers"], v["single_tensor"]) for k, v in values.items()}
    written = _written_buffers(graph, values)
    boundary = user_held = None
    for node in graph.nodes:
        if node.op == "call_function" and node.target is ops.boundary:
            boundary = node.meta["memsched.step"]
            user_held = frozenset(b for a in node.all_input_nodes for b in values[a.name]["buffers"])
    pinned = frozenset(b.id for b in buffers if b.kind in PERSISTENT and b.id in written)
    recipes = find_recipes(graph, vals, written) if boundary is not None else {}
    grads = frozenset(b for n in output_node.all_input_nodes if n.meta.get("memsched.kind") == "grad"
                      for b in values[n.name]["buffers"])
    return Program(tuple(steps), buffers, vals, live, int(start), boundary, user_held or frozenset(),
                   pinned, recipes, grads - (user_held or frozenset()))


@dataclass(frozen=True)
class Recipe:
    """How to recompute a value: re-run ``op`` (then take item ``index`` of its tuple)."""

    value: str
    op: str                   # the node to re-run
    index: int | None         # getitem index when ``value`` is one output of a tuple op
    inputs: tuple[str, ...]   # values the op reads
    step: int                 # the op's step (its cost is that step's time)
    extra_bytes: int          # other outputs of a tuple op, held for a moment


def _written_buffers(graph: torch.fx.Graph, values: dict) -> set[int]:
    """Buffers some op writes in place."""
    out: set[int] = set()
    for node in graph.nodes:
        if node.op == "call_function":
            for target in written_args(node):
                out.update(values[target.name]["buffers"])
    return out


def _recomputable(node: torch.fx.Node, written: set[int], values) -> bool:
    """Deterministic, out of place, returns fresh storage, and reads nothing written in place
    (re-running it later must give the same bits)."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    schema = node.target._schema
    if any(a.alias_info is not None for a in schema.arguments) or any(r.alias_info is not None for r in schema.returns):
        return False
    if written_args(node):
        return False
    if torch.Tag.nondeterministic_seeded in node.target.tags or torch.Tag.inplace_view in node.target.tags:
        return False
    return not any(b in written for a in node.all_input_nodes for b in values[a.name].buffers)


def find_recipes(graph: torch.fx.Graph, values: dict, written: set[int]) -> dict[str, Recipe]:
    out: dict[str, Recipe] = {}
    for node in graph.nodes:
        val = values.get(node.name)
        if val is None or not val.single_tensor or node.op != "call_function":
            continue
        if node.target is operator.getitem and isinstance(node.args[0], torch.fx.Node):
            op, index = node.args[0], node.args[1]
            outs = op.meta.get("val")
            if not isinstance(outs, (tuple, list)):
                continue
            others = [t for i, t in enumerate(outs) if i != index and isinstance(t, torch.Tensor)]
            extra = sum(storage_nbytes(t) for t in others)
        else:
            op, index, extra = node, None, 0
        if not _recomputable(op, written, values):
            continue
        out[node.name] = Recipe(node.name, op.name, index, tuple(a.name for a in op.all_input_nodes),
                                values[op.name].step, extra)
    return out
