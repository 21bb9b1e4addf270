"""The memory floor and what binds the minimum budget.

The floor is computable (DESIGN.md, lesson 8): with every tensor free to leave the device
between uses and any value recomputable, the least device memory any plan needs is the working
set of the largest single op -- the storages it reads plus those it makes, plus what cannot
leave while it runs (what the caller holds, what is updated in place). Below it, only by
splitting that op. ``op_floor`` finds it; ``binding_point`` names where the planner's own
minimum binds (the step, its op, and the largest tensors held there), so an infeasible budget
or a summary can say what to change."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch.fx as fx

from ..ir.kinds import PERSISTENT, Kind
from ..ir.listing import target_name
from ..ir.units import format_bytes
from .analysis import START, Program


@dataclass(frozen=True)
class Binding:
    """A program point and what the device holds there."""

    bytes: int
    step: int
    op: str                                   # "mm_3 = aten.mm"
    tensors: tuple[tuple[str, str, int], ...]  # (value, kind, bytes), largest first

    def describe(self, top: int = 4) -> str:
        held = ", ".join(f"{v} ({k}, {format_bytes(nb)})" for v, k, nb in self.tensors[:top])
        return f"{format_bytes(self.bytes)} at step {self.step} ({self.op}); largest there: {held}"


def _op(nodes: dict, program: Program, step: int) -> str:
    n = nodes[program.steps[step]]
    return f"{n.name} = {target_name(n.target)}"


def _largest(program: Program, ids) -> tuple[tuple[str, str, int], ...]:
    ss = sorted({program.storages[i] for i in ids}, key=lambda b: -b.nbytes)
    return tuple((b.name, str(b.kind), b.nbytes) for b in ss)


def op_floor(program: Program, graph: fx.Graph, steps=None) -> Binding | None:
    """The largest working set of a single op: the storages it reads and the ones it makes,
    beside those no plan can take off the device there (model tensors updated in place, the
    caller's inputs while the program still reads them -- moving one frees nothing, the caller
    holds it -- and in a training step's backward the forward outputs the caller holds).
    ``steps``: only those (default: every step)."""
    nodes = {n.name: n for n in graph.nodes}
    best = None
    fixed = [b for b in program.storages if b.id in program.pinned]
    held = [b for b in program.storages if b.id in program.user_held]
    inputs = [b for b in program.storages if b.kind == Kind.INPUT]
    for step in range(program.n_steps) if steps is None else steps:
        name = program.steps[step]
        n = nodes[name]
        reads = [n.args[0]] if n.target is operator.getitem else n.all_input_nodes
        ids = {i for a in reads for i in program.values[a.name].storages}
        ids.update(program.values[name].storages)
        ids.update(b.id for b in fixed)
        ids.update(b.id for b in inputs if step <= b.last_step)
        if program.boundary is not None and step >= program.boundary:
            ids.update(b.id for b in held if b.def_step <= step <= b.last_step)
        nbytes = sum(program.storages[i].nbytes for i in ids)
        if best is None or nbytes > best[0]:
            best = (nbytes, step, ids)
    if best is None:
        return None
    return Binding(best[0], best[1], _op(nodes, program, best[1]), _largest(program, best[2]))


def binding_point(program: Program, graph: fx.Graph, segment_bytes: np.ndarray, bounds) -> Binding | None:
    """Where a per-segment minimum binds: the segment holding the most constant bytes, at the
    step inside it where the most storages are live, with the largest of them."""
    if not len(segment_bytes) or program.n_steps == 0:
        return None  # nothing runs: there is no step to name
    nodes = {n.name: n for n in graph.nodes}
    j = int(np.argmax(segment_bytes))
    lo, hi = bounds[j], max(bounds[j + 1] - 1, bounds[j])
    step = lo + int(np.argmax(program.live_bytes[lo:hi + 1])) if hi >= lo and len(program.live_bytes) else lo
    step = min(step, program.n_steps - 1)
    live = [b.id for b in program.storages if _live_at(b, step, lo, hi)]
    return Binding(int(np.ceil(segment_bytes[j])), step, _op(nodes, program, step), _largest(program, live))


def _live_at(b, step: int, lo: int, hi: int) -> bool:
    """Live at ``step``: an activation between its definition and last use, a model tensor
    read inside the segment [lo, hi]."""
    if b.kind in PERSISTENT:
        return any(lo <= e <= hi for e in b.events if e != START)
    return b.def_step <= step <= b.last_step
