"""Rewriting: turn a placement into a scheduled fx graph with prefetch/wait/offload/free nodes.

The scheduled graph keeps the captured compute nodes in order and inserts, per segment:
prefetches for the next segment's fetches at its start, a wait right before the first use of
each fetched value, an offload right after the last use before an evicted gap, and frees
right after last uses (for offloaded values at the segment end, once the copy has left).
Every inserted node records the pass that made it in ``meta["memsched.pass"]``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch.fx as fx

from ..compiler.capture import PERSISTENT, Captured
from ..runtime import ops
from .analysis import START, Program
from .placement import DEVICE, KEEP, RECOMPUTE, REFETCH, Placement
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
    val = node.meta["val"]
    return val.numel() * val.element_size()


def build_schedule(captured: Captured, program: Program, segments: Segments,
                   placement: Placement) -> fx.GraphModule:
    src_graph = captured.gm.graph
    nodes = {n.name: n for n in src_graph.nodes}
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    buffers = program.buffers
    placeholder_tier: dict[str, str] = {}
    for b in buffers:
        if b.kind in PERSISTENT:
            if len(b.events) == 1:
                tier = "unused"
            else:
                tier = DEVICE if b.id in placement.resident else placement.home[b.id]
            placeholder_tier[b.values[0]] = tier
            for alias in b.values[1:]:  # a tied duplicate: merged at capture, never read
                if nodes[alias].op == "placeholder":
                    placeholder_tier[alias] = "unused"

    # fetches: first fetch of every non-resident model tensor, and every evicted gap
    fetches: list[_Fetch] = []
    for b in buffers:
        if b.kind in PERSISTENT and len(b.events) > 1 and b.id not in placement.resident:
            first = next(e for e in b.events if e != START)
            fetches.append(_Fetch(("init", b.id), b.values[0], b.values[0], None, placement.home[b.id],
                                  first, _moved_bytes(nodes[b.values[0]])))
    evicted = [gap for gap in placement.gaps if placement.gap_choice[gap.id] not in (KEEP, RECOMPUTE)]
    recomputed = [gap for gap in placement.gaps if placement.gap_choice[gap.id] == RECOMPUTE]
    recompute_at: dict[int, list] = {}
    for gap in recomputed:
        recompute_at.setdefault(gap.end, []).append(gap)
    for gap in evicted:
        if gap.deliver:
            continue  # a gradient offloaded to its home stays there: the step returns the copy
        choice = placement.gap_choice[gap.id]
        b = buffers[gap.buffer]
        tier = placement.home[b.id] if choice == REFETCH else choice
        source = b.values[0] if choice == REFETCH else None
        fetches.append(_Fetch(("gap", gap.id), gap.value, source, gap.id, tier, gap.end,
                              _moved_bytes(nodes[gap.value])))
    issue_at: dict[int, list[_Fetch]] = {}
    wait_at: dict[int, list[_Fetch]] = {}
    for f in fetches:
        use_seg = segments.seg(f.target_step)
        issue_seg = use_seg - 1 if (f.key in placement.early and use_seg >= 1) else use_seg
        issue_at.setdefault(issue_seg, []).append(f)
        wait_at.setdefault(f.target_step, []).append(f)
    evict_after = {gap.start: [] for gap in evicted + recomputed}
    for gap in evicted + recomputed:
        evict_after[gap.start].append(gap)

    def mark(node, pass_name, **meta):
        node.meta["memsched.pass"] = pass_name
        node.meta.update({f"memsched.{k}": v for k, v in meta.items()})
        return node

    kinds = {p.name: p.kind for p in captured.placeholders}
    for n in src_graph.nodes:
        if n.op == "get_attr":
            env[n.name] = g.get_attr(n.target)
            env[n.name].meta.update(n.meta)
        if n.op == "placeholder":
            new = g.placeholder(n.name)
            new.meta.update(n.meta)
            new.meta["memsched.tier"] = placeholder_tier.get(n.name, DEVICE)
            mark(new, "capture", tier=new.meta["memsched.tier"], kind=kinds.get(n.name, "input"))
            env[n.name] = new
    homes = dict(env)  # placeholders of home-tier tensors: the source of every fetch of them
    delivered: dict[str, fx.Node] = {}  # gradients the step returns as their offloaded copy
    pending: dict[tuple[str, int], fx.Node] = {}
    handles: dict[int, fx.Node] = {}
    # never freed by the program: resident model tensors, and unused ones it never touched
    resident_placeholders = {n for n, t in placeholder_tier.items() if t in (DEVICE, "unused")}
    end = program.n_steps

    def issue(j):
        for f in issue_at.get(j, []):
            src = homes[f.source] if f.source is not None else handles[f.gap]
            p = g.call_function(ops.prefetch, (src,))
            mark(p, PASS, tier=f.tier, nbytes=f.nbytes, restores=f.value)
            p.meta["val"] = nodes[f.value].meta.get("val")
            pending[(f.value, f.target_step)] = p

    def await_fetches(step):
        for f in wait_at.get(step, []):
            w = g.call_function(ops.wait, (pending.pop((f.value, step)),))
            mark(w, PASS, tier="device", nbytes=f.nbytes, restores=f.value)
            w.meta["val"] = nodes[f.value].meta.get("val")
            env[f.value] = w
            if f.gap is not None and f.gap in handles:
                mark(g.call_function(ops.free, (handles.pop(f.gap),)), PASS)

    def free(names):
        dead = [env.pop(v) for v in names if v in env and v not in resident_placeholders]
        if dead:
            mark(g.call_function(ops.free, tuple(dead)), PASS)

    def recompute(recipe):
        """Re-run the op that made a dropped value, reading its inputs where they are now."""
        op = g.node_copy(nodes[recipe.op], lambda a: env[a.name])
        mark(op, "recompute", restores=recipe.value)
        if recipe.index is None:
            env[recipe.value] = op
            return
        item = g.call_function(operator.getitem, (op, recipe.index))
        item.meta.update(nodes[recipe.value].meta)
        mark(item, "recompute", restores=recipe.value)
        env[recipe.value] = item
        mark(g.call_function(ops.free, (op,)), "recompute")  # the op's other outputs

    last_use_at: dict[int, list[str]] = {}
    for v in program.values.values():
        if v.last_use < end:
            last_use_at.setdefault(v.last_use, []).append(v.name)
    seg_end_free: list[str] = []
    for j in range(segments.count):
        issue(j)
        if j == 0:
            free([v for v in last_use_at.get(START, [])])  # unused inputs
        for step in segments.steps(j):
            await_fetches(step)
            for gap in recompute_at.get(step, []):
                recompute(program.recipes[gap.value])
            n = nodes[program.steps[step]]
            new = g.node_copy(n, lambda a: env[a.name])
            new.meta["memsched.pass"] = n.meta.get("memsched.pass", "capture")  # boundary: "partition"
            env[n.name] = new
            dying = list(last_use_at.get(step, []))
            for gap in evict_after.get(step, []):
                if gap.persistent or placement.gap_choice[gap.id] == RECOMPUTE:
                    dying.append(gap.value)  # the home copy stays; just drop the device one
                else:
                    h = g.call_function(ops.offload, (env[gap.value], placement.gap_choice[gap.id]))
                    mark(h, PASS, tier=placement.gap_choice[gap.id],
                         nbytes=_moved_bytes(nodes[gap.value]), saves=gap.value)
                    handles[gap.id] = h
                    if gap.deliver:
                        h.meta["memsched.delivers"] = gap.value
                        delivered[gap.value] = h
                    seg_end_free.append(gap.value)
            free(dying)
        free(seg_end_free)
        seg_end_free = []
    await_fetches(end)
    out = src_graph.output_node()
    g.output(fx.node.map_arg(out.args[0], lambda a: env[a.name] if a.name in env else delivered[a.name]))
    g.lint()
    return fx.GraphModule(captured.gm, g, class_name="ScheduledProgram")
