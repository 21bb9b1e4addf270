"""Rewriting: turn a placement into a scheduled fx graph with prefetch/wait/offload/free nodes.

The scheduled graph keeps the captured compute nodes in order and inserts, per segment:
prefetches for the next segment's fetches at its start, a wait right before the first use of
each fetched value, an offload right after the last use before an evicted gap, and frees
right after last uses (for offloaded values at the segment end, once the copy has left).
Every inserted node records the pass that made it (``info(node).made_by``).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from ..frontend.capture import Captured
from ..ir import ops
from ..ir.kinds import PERSISTENT, Kind, Tier
from ..ir.graph_module import lazy_graph_module
from ..ir.meta import annotate, info
from ..ir.tensors import value_nbytes
from .analysis import START, Program
from .placement import KEEP, RECOMPUTE, REFETCH, Placement
from .recipes import recompute_chain
from .segments import Segments

PASS = "placement"


@dataclass
class _Fetch:
    key: tuple           # ("init", buffer) or ("gap", gap id), as in Placement.early
    value: str           # captured value restored on the device
    source: str          # captured placeholder (home) or None when the source is an offload
    gap: int | None      # gap id for an evicted gap, None for a model tensor's first fetch
    tier: str
    target_step: int
    nbytes: int


def _moved_bytes(node: fx.Node) -> int:
    """Bytes a move of this value copies and re-allocates: the value itself (a view moves
    without the rest of its base), as the runtime's transfer engine does."""
    return value_nbytes(node.meta["val"])


def _placeholder_tiers(program: Program, placement: Placement, nodes: dict) -> dict[str, Tier]:
    """Where each model tensor's placeholder lives: resident, homed, or unused."""
    tiers: dict[str, Tier] = {}
    for b in program.storages:
        if b.kind not in PERSISTENT:
            continue
        if len(b.events) == 1:
            tiers[b.values[0]] = Tier.UNUSED
        else:
            tiers[b.values[0]] = Tier.DEVICE if b.id in placement.resident else Tier(placement.home[b.id])
        for alias in b.values[1:]:  # a tied duplicate: merged at capture, never read
            if nodes[alias].op == "placeholder":
                tiers[alias] = Tier.UNUSED
    return tiers


def _fetches(program: Program, placement: Placement, nodes: dict) -> list[_Fetch]:
    """The first fetch of every non-resident model tensor, and the fetch ending every evicted
    gap (a delivered gradient is never fetched back: the step returns its copy)."""
    out: list[_Fetch] = []
    for b in program.storages:
        if b.kind in PERSISTENT and len(b.events) > 1 and b.id not in placement.resident:
            first = next(e for e in b.events if e != START)
            out.append(_Fetch(("init", b.id), b.values[0], b.values[0], None, placement.home[b.id],
                              first, _moved_bytes(nodes[b.values[0]])))
    for gap in placement.gaps:
        choice = placement.gap_choice[gap.id]
        if choice in (KEEP, RECOMPUTE) or gap.deliver:
            continue
        b = program.storages[gap.buffer]
        tier = placement.home[b.id] if choice == REFETCH else choice
        source = b.values[0] if choice == REFETCH else None
        out.append(_Fetch(("gap", gap.id), gap.value, source, gap.id, tier, gap.end, _moved_bytes(nodes[gap.value])))
    return out


def _mark(node: fx.Node, made_by: str, **facts) -> fx.Node:
    annotate(node, made_by=made_by, **facts)
    return node


class _Rewriter:
    """Builds the scheduled graph segment by segment (``build_schedule``)."""

    def __init__(self, captured: Captured, program: Program, segments: Segments, placement: Placement):
        self.captured, self.program, self.segments, self.placement = captured, program, segments, placement
        self.nodes = {n.name: n for n in captured.gm.graph.nodes}
        self.g = fx.Graph()
        self.env: dict[str, fx.Node] = {}
        self.tiers = _placeholder_tiers(program, placement, self.nodes)
        # never freed by the program: resident model tensors, and unused ones it never touched
        self.kept = {n for n, t in self.tiers.items() if t in (Tier.DEVICE, Tier.UNUSED)}
        self.issue_at: dict[int, list[_Fetch]] = {}
        self.wait_at: dict[int, list[_Fetch]] = {}
        for f in _fetches(program, placement, self.nodes):
            use_seg = segments.seg(f.target_step)
            issue_seg = use_seg - 1 if (f.key in placement.early and use_seg >= 1) else use_seg
            self.issue_at.setdefault(issue_seg, []).append(f)
            self.wait_at.setdefault(f.target_step, []).append(f)
        # offloaded (or dropped) gaps first, then recomputed ones, per step
        evicted = [gap for gap in placement.gaps if placement.gap_choice[gap.id] not in (KEEP, RECOMPUTE)]
        recomputed = [gap for gap in placement.gaps if placement.gap_choice[gap.id] == RECOMPUTE]
        self.evict_after: dict[int, list] = {}
        self.recompute_at: dict[int, list] = {}
        for gap in evicted + recomputed:
            self.evict_after.setdefault(gap.start, []).append(gap)
        for gap in recomputed:
            self.recompute_at.setdefault(gap.end, []).append(gap)
        # a moved root stays referenced to its storage's last event (it costs nothing while a
        # view of it holds the storage), so that each later gap can move it again
        held = {gap.value: program.storages[gap.buffer].last_step for gap in evicted + recomputed if gap.held}
        self.held_roots = set(held)
        self.last_use_at: dict[int, list[str]] = {}
        for v in program.values.values():
            last = max(v.last_use, held.get(v.name, v.last_use))
            if last < program.n_steps:
                self.last_use_at.setdefault(last, []).append(v.name)
        self.homes: dict[str, fx.Node] = {}      # placeholders: the source of every fetch of them
        self.pending: dict[tuple[str, int], fx.Node] = {}
        self.handles: dict[int, fx.Node] = {}
        self.delivered: dict[str, fx.Node] = {}  # gradients the step returns as their offloaded copy
        self.seg_end_free: list[str] = []

    def inputs(self) -> None:
        kinds = {p.name: p.kind for p in self.captured.placeholders}
        for n in self.captured.gm.graph.nodes:
            if n.op == "get_attr":
                self.env[n.name] = self.g.get_attr(n.target)
                self.env[n.name].meta.update(n.meta)
            elif n.op == "placeholder":
                new = self.g.placeholder(n.name)
                new.meta.update(n.meta)
                _mark(new, "capture", tier=self.tiers.get(n.name, Tier.DEVICE), kind=kinds.get(n.name, Kind.INPUT))
                self.env[n.name] = new
        self.homes = dict(self.env)

    def issue(self, j: int) -> None:
        for f in self.issue_at.get(j, []):
            src = self.homes[f.source] if f.source is not None else self.handles[f.gap]
            p = _mark(self.g.call_function(ops.prefetch, (src,)), PASS, tier=Tier(f.tier), nbytes=f.nbytes,
                      restores=f.value)
            p.meta["val"] = self.nodes[f.value].meta.get("val")
            self.pending[(f.value, f.target_step)] = p

    def await_fetches(self, step: int) -> None:
        for f in self.wait_at.get(step, []):
            w = self.g.call_function(ops.wait, (self.pending.pop((f.value, step)),))
            _mark(w, PASS, tier=Tier.DEVICE, nbytes=f.nbytes, restores=f.value)
            w.meta["val"] = self.nodes[f.value].meta.get("val")
            self.env[f.value] = w
            if f.gap is not None and f.gap in self.handles:
                _mark(self.g.call_function(ops.free, (self.handles.pop(f.gap),)), PASS)
            if f.gap is not None:
                self.rebuild(self.placement.gaps[f.gap])

    def again(self, name: str) -> str:
        """The name of a node re-making ``name``: "mm_3_again", or "mm_3_again_1" when the
        program itself has a node so named (a recomputed copy passes/remat.py made), which fx
        would otherwise rename when it comes."""
        out, k = f"{name}_again", 0
        while out in self.nodes:
            k += 1
            out = f"{name}_again_{k}"
        return out

    def rebuild(self, gap) -> None:
        """Re-make the views of a restored root that were live across its gap, by re-running
        the view ops that made them; intermediate views are dropped again at once."""
        for name in gap.rebuild:
            source = self.nodes[name]
            new = self.g.create_node("call_function", source.target,
                                     fx.node.map_arg(source.args, lambda a: self.env[a.name]),
                                     fx.node.map_arg(source.kwargs, lambda a: self.env[a.name]),
                                     name=self.again(name))
            new.meta.update(source.meta)
            self.env[name] = _mark(new, PASS, restores=name)
        self.free([v for v in gap.rebuild if v not in gap.aliases])

    def free(self, names) -> None:
        dead = [self.env.pop(v) for v in names if v in self.env and v not in self.kept]
        if dead:
            _mark(self.g.call_function(ops.free, tuple(dead)), PASS)

    def recompute(self, recipe) -> None:
        """Re-run the op that made a dropped value, reading its inputs where they are now. The
        nodes are named after what they rebuild ("mm_3_again"), never a fresh "getitem_N" that
        would take the name of a captured node later in the program."""
        source, env = self.nodes[recipe.op], self.env
        op = self.g.create_node("call_function", source.target, fx.node.map_arg(source.args, lambda a: env[a.name]),
                                fx.node.map_arg(source.kwargs, lambda a: env[a.name]), name=self.again(source.name))
        op.meta.update(source.meta)
        _mark(op, "recompute", restores=recipe.value)
        if recipe.index is None:
            env[recipe.value] = op
            return
        item = self.g.create_node("call_function", operator.getitem, (op, recipe.index), name=self.again(recipe.value))
        item.meta.update(self.nodes[recipe.value].meta)
        env[recipe.value] = _mark(item, "recompute", restores=recipe.value)
        _mark(self.g.call_function(ops.free, (op,)), "recompute")  # the op's other outputs

    def evict(self, gap) -> list[str]:
        """After the last use before ``gap``: offload the value (its device copy, and its live
        views, are freed at the segment end) or just drop them (a home copy exists, or the
        value will be recomputed). Returns what to free now."""
        choice = self.placement.gap_choice[gap.id]
        # a root held for the storage's other gaps goes too (a delivered gradient's, say)
        gone = [gap.value, *gap.aliases, *(v for v in self.program.storages[gap.buffer].values if v in self.held_roots)]
        if gap.persistent or choice == RECOMPUTE:
            return gone
        h = self.g.call_function(ops.offload, (self.env[gap.value], Tier(choice)))
        _mark(h, PASS, tier=Tier(choice), nbytes=_moved_bytes(self.nodes[gap.value]), saves=gap.value,
              delivers=gap.value if gap.deliver else None)
        self.handles[gap.id] = h
        if gap.deliver:
            self.delivered[gap.value] = h
        self.seg_end_free += gone
        return []

    def step(self, step: int) -> None:
        self.await_fetches(step)
        for gap in self.recompute_at.get(step, []):
            chain = recompute_chain(self.program, gap.value, gap.end)
            for value in chain.values:
                self.recompute(self.program.recipes[value])
            self.free(chain.values[:-1])  # the chain's intermediates: dead again at once
            self.rebuild(gap)
        n = self.nodes[self.program.steps[step]]
        new = self.g.node_copy(n, lambda a: self.env[a.name])
        annotate(new, made_by=info(n).made_by)  # the boundary keeps "partition"
        self.env[n.name] = new
        dying = list(self.last_use_at.get(step, []))
        dying += [v for gap in self.evict_after.get(step, []) for v in self.evict(gap)]
        self.free(dying)

    def build(self) -> fx.GraphModule:
        self.inputs()
        for j in range(self.segments.count):
            self.issue(j)
            if j == 0:
                self.free(self.last_use_at.get(START, []))  # unused inputs
            for step in self.segments.steps(j):
                self.step(step)
            self.free(self.seg_end_free)
            self.seg_end_free = []
        self.await_fetches(self.program.n_steps)
        out = self.captured.gm.graph.output_node()
        returned = {a.name for a in out.all_input_nodes}
        self.free(sorted(self.held_roots - returned))  # held for an output that is a view of them
        env, delivered = self.env, self.delivered
        self.g.output(fx.node.map_arg(out.args[0], lambda a: env[a.name] if a.name in env else delivered[a.name]))
        self.g.lint()
        return lazy_graph_module(self.captured.gm, self.g, class_name="ScheduledProgram")


def build_schedule(captured: Captured, program: Program, segments: Segments,
                   placement: Placement) -> fx.GraphModule:
    """The scheduled program of ``placement``: the captured compute in order, with the moves."""
    return _Rewriter(captured, program, segments, placement).build()
