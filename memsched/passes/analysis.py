"""Analysis: steps, storages, their kinds, sizes, events and the live-bytes profile.

Placement decides per *storage*, not per fx value: views share their base's storage, so they
follow it. A storage's events are the steps where any value aliasing it is defined or read;
between two events it is idle, and an idle gap is what placement can fill with an offload.
Results are stored on the graph (``info(node).step`` and ``.storages``) and returned as one
frozen ``Program``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import numpy as np
import torch

from ..cost_models.op_scratch import hold_kernel_storages, op_scratch_bytes
from ..frontend.capture import Captured
from ..ir import ops
from ..ir.effects import written_args
from ..ir.kinds import PERSISTENT, Kind
from ..ir.meta import annotate, info
from ..ir.tensors import allocated, storage_key, storage_nbytes, tensor_leaves
from .recipes import find_recipes, written_storages

START = -1  # virtual step before the program: weights and inputs are defined here


@dataclass(frozen=True)
class Storage:
    id: int
    name: str                 # the fx value that created it
    nbytes: int
    kind: Kind                # weight / buffer / constant / input / activation
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
    storages: tuple[int, ...]  # storages of its tensor leaves
    single_tensor: bool       # a plain tensor (not a tuple/list) a move restores in its own
                              # memory format (``movable``): can be moved between tiers
    fills: bool = False       # a dense tensor at offset 0 spanning its whole storage: restored,
                              # it has the storage's layout, so views of it can be re-made on it


@dataclass(frozen=True)
class Program:
    """Everything later stages read about the captured graph."""

    steps: tuple[str, ...]        # call_function node names in execution order
    storages: tuple[Storage, ...]
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
    # storages the program may hand back off the device, offloaded for good once last read:
    # parameter gradients, and with ``host_outputs`` every output of an inference program
    deliverable: frozenset = frozenset()
    # value -> the one value it is a view of, made by an op that only reinterprets that value's
    # storage (view, transpose, split + getitem, detach...): re-run on a restored base, it
    # rebuilds the view (lets a storage with several live aliases move: passes/views.py)
    view_of: dict = field(default_factory=dict)
    # device bytes a library holds beside the tensors throughout (cuBLAS's workspace): in every
    # peak and minimum, never in ``live_bytes``, which counts the program's storages
    workspace_bytes: int = 0

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def peak_bytes(self) -> int:
        return max(int(self.live_bytes.max()) if len(self.live_bytes) else 0, self.start_bytes) + self.workspace_bytes

    def bytes_of(self, kind: str) -> int:
        return sum(b.nbytes for b in self.storages if b.kind == kind)


def movable(val) -> bool:
    """A plain tensor a move can restore in its own memory format, never taking more bytes than
    its storage: a dense one (its elements fill their span, any dimension order: it comes back
    with its strides) or a row-major view that skips elements (a slice: it comes back compacted,
    in the same dimension order). A view that repeats elements (an ``expand``: stride 0) stays
    on the device: its copy would take more bytes than the storage placement counts (many times
    more), and come back with other strides than its readers were traced with; so does a view
    that skips elements in another dimension order (it would come back row-major)."""
    if not isinstance(val, torch.Tensor):
        return False
    dims = [(st, sz) for st, sz in zip(val.stride(), val.shape) if sz != 1]
    need, dense = 1, True
    for stride, size in sorted(dims):
        if stride < need:
            return False  # overlapping: some element is reached twice
        dense = dense and stride == need
        need = stride * size
    strides = [st for st, _ in dims]
    return dense or strides == sorted(strides, reverse=True)


def fills_storage(val) -> bool:
    """A dense tensor at storage offset 0 whose elements are exactly its storage's bytes."""
    if not isinstance(val, torch.Tensor) or not movable(val) or val.storage_offset() != 0:
        return False
    return val.numel() * val.element_size() == storage_nbytes(val)


def view_sources(graph: torch.fx.Graph, values: dict) -> dict[str, str]:
    """Value -> the value it is a view of: an op reading one value, writing nothing, drawing no
    random numbers, whose outputs all lie in that value's storages."""
    out: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_function" or ops.is_inserted(node) or written_args(node):
            continue
        if node.target is operator.getitem:
            reads = [node.args[0]] if isinstance(node.args[0], torch.fx.Node) else []
        elif isinstance(node.target, torch._ops.OpOverload):
            if torch.Tag.nondeterministic_seeded in node.target.tags:
                continue
            reads = node.all_input_nodes
        else:
            continue
        mine = values[node.name]["storages"]
        if len(reads) == 1 and mine and set(mine) <= set(values[reads[0].name]["storages"]):
            out[node.name] = reads[0].name
    return out


class _Walk:
    """One pass over the captured graph: steps, the storages each value uses, the steps each
    storage is defined or read at, and each value's definition and last use."""

    def __init__(self, kinds: dict, block: int):
        self.kinds, self.block = kinds, block
        self.steps: list[str] = []
        self.ids: dict = {}                      # storage key -> storage id
        self.first_value: list[str] = []         # storage id -> the value that created it
        self.nbytes: list[int] = []
        self.kind: list[Kind] = []
        self.events: list[set[int]] = []
        self.aliases: list[list[str]] = []
        self.values: dict[str, dict] = {}

    def storages_of(self, node: torch.fx.Node, step: int, kind: Kind) -> tuple[int, ...]:
        ids = []
        for t in tensor_leaves(node.meta.get("val")):
            key = storage_key(t)
            sid = self.ids.get(key)
            if sid is None:
                sid = self.ids[key] = len(self.first_value)
                self.first_value.append(node.name)
                self.nbytes.append(allocated(storage_nbytes(t), self.block))
                self.kind.append(kind)
                self.events.append({step})
                self.aliases.append([])
            if node.name not in self.aliases[sid]:
                self.aliases[sid].append(node.name)
            ids.append(sid)
        return tuple(ids)

    def _scratch(self, node: torch.fx.Node, step: int) -> None:
        """What the op holds inside itself (``info(node).scratch``): a storage of its step alone,
        of no value, so every peak and minimum counts it while the op runs and no move or free
        concerns it."""
        nbytes = info(node).scratch or 0
        if nbytes > 0:
            self.first_value.append(node.name)
            self.nbytes.append(allocated(nbytes, self.block))
            self.kind.append(Kind.ACTIVATION)
            self.events.append({step})
            self.aliases.append([])

    def read(self, name: str, step: int) -> None:
        for sid in self.values[name]["storages"]:
            self.events[sid].add(step)
        self.values[name]["last_use"] = step

    def visit(self, node: torch.fx.Node) -> None:
        if node.op == "placeholder":
            step, ids = START, self.storages_of(node, START, self.kinds.get(node.name, Kind.INPUT))
        elif node.op == "call_function":
            step = len(self.steps)
            self.steps.append(node.name)
            # getitem reads only what it extracts; every other op reads all of its inputs
            for inp in [node.args[0]] if node.target is operator.getitem else node.all_input_nodes:
                self.read(inp.name, step)
            ids = self.storages_of(node, step, Kind.ACTIVATION)
            for sid in ids:
                self.events[sid].add(step)
            annotate(node, step=step)
            self._scratch(node, step)
        elif node.op == "get_attr":  # a submodule of a higher-order op: code, not data
            self.values[node.name] = {"step": START, "last_use": START, "storages": (), "single_tensor": False}
            return
        elif node.op == "output":
            return
        else:
            raise NotImplementedError(f"unexpected fx node {node.op} {node.target}")
        annotate(node, storages=ids)
        val = node.meta.get("val")
        self.values[node.name] = {"step": step, "last_use": step, "storages": ids,
                                  "single_tensor": movable(val), "fills": fills_storage(val)}

    def finish(self, output_node: torch.fx.Node) -> tuple[Storage, ...]:
        """The program end reads the outputs; returns the storages."""
        end = len(self.steps)
        outputs = set()
        for inp in output_node.all_input_nodes:
            self.read(inp.name, end)
            outputs.update(self.values[inp.name]["storages"])
        return tuple(Storage(i, self.first_value[i], self.nbytes[i], self.kind[i], i in outputs,
                             tuple(sorted(self.events[i])), tuple(self.aliases[i]))
                     for i in range(len(self.first_value)))


def _live_bytes(storages, end: int) -> np.ndarray:
    """Device bytes live at each step if nothing ever moves: a storage from its first to its
    last event; the model's own tensors (weights, buffers, constants) for the whole program."""
    diff = np.zeros(end + 2, dtype=np.int64)
    for b in storages:
        if b.kind in PERSISTENT and len(b.events) == 1:
            continue  # never read: stays with the model, off the device
        lo = 0 if b.kind in PERSISTENT or b.def_step == START else b.def_step
        hi = end - 1 if b.kind in PERSISTENT else min(b.last_step, end - 1)
        if end and hi >= lo:
            diff[lo] += b.nbytes
            diff[hi + 1] -= b.nbytes
    return np.cumsum(diff[:end]) if end else np.zeros(0, dtype=np.int64)


def analyze(captured: Captured, block: int = 1, workspace: int = 0, device_type: str = "cpu",
            host_outputs: bool = False) -> Program:
    """Compute steps, storages, values and the live-bytes profile; annotate the nodes. Bytes are
    counted as the device's allocator counts them: each storage in whole ``block``-byte blocks,
    and a ``workspace`` held beside them throughout (``Hardware``'s ``alloc_block_bytes`` and
    ``workspace_bytes``); an op measured to hold scratch inside itself on ``device_type``
    (cost_models/op_scratch.py) holds it at its step. ``host_outputs``: the caller takes the
    outputs on the host, so each may leave the device once made (a prompt's KV cache entries)."""
    graph = captured.gm.graph
    for node in graph.nodes:
        hold_kernel_storages(node, device_type)
        scratch = op_scratch_bytes(node, device_type)
        if scratch or info(node).scratch:
            annotate(node, scratch=scratch or None)
    walk = _Walk({p.name: p.kind for p in captured.placeholders}, block)
    for node in graph.nodes:
        walk.visit(node)
    storages = walk.finish(graph.output_node())
    values = walk.values
    # before the first step every input is held, read or not, beside the model's tensors
    start = sum(b.nbytes for b in storages if b.def_step == START and (b.kind not in PERSISTENT or len(b.events) > 1))
    vals = {k: Value(k, v["step"], v["last_use"], v["storages"], v["single_tensor"], v.get("fills", False))
            for k, v in values.items()}
    written = written_storages(graph, values)
    boundary, user_held = None, frozenset()
    for node in graph.nodes:
        if ops.op_of(node) is ops.Op.BOUNDARY:
            boundary = info(node).step
            user_held = frozenset(b for a in node.all_input_nodes for b in values[a.name]["storages"])
    pinned = frozenset(b.id for b in storages if b.kind in PERSISTENT and b.id in written)
    recipes = find_recipes(graph, vals, written) if boundary is not None else {}
    kinds = {b.id: b.kind for b in storages}
    deliverable = frozenset(b for n in graph.output_node().all_input_nodes
                            if info(n).kind == Kind.GRAD or (host_outputs and boundary is None)
                            for b in values[n.name]["storages"]
                            if kinds[b] not in PERSISTENT and kinds[b] != Kind.INPUT)
    return Program(tuple(walk.steps), storages, vals, _live_bytes(storages, len(walk.steps)), int(start),
                   boundary, user_held, pinned, recipes, deliverable - user_held, view_sources(graph, values),
                   workspace)
