"""Device bytes after every node of a scheduled program, split by what the bytes hold.

The split comes from the IR's one memory walk (``ir/memory.py``), the same walk the simulator
counts its timeline with, so the stack always tops out at the simulator's number."""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..ir.memory import CATEGORIES, DeviceMemory, category  # noqa: F401  (re-exported)
from ..ir.ops import op_of


def inserted_op(node: fx.Node) -> str | None:
    """"prefetch", "wait", "offload", "free" or "boundary" for an inserted node, else None."""
    op = op_of(node)
    return op.value if op is not None else None


@dataclass
class MemoryRow:
    index: int
    name: str
    kind: str | None           # kind of data the node produces, restores or saves (None: free, output)
    total: int                 # device bytes after the node, as the simulator predicts
    by_category: dict          # category -> bytes; sums to ``total``


def memory_by_kind(plan) -> list[MemoryRow]:
    """One row per node of ``plan.graph``: predicted device bytes after it, per category."""
    if [name for name, _ in plan.sim.timeline] != [n.name for n in plan.graph.graph.nodes]:
        raise ValueError("plan.sim.timeline does not follow plan.graph node for node: "
                         "was the graph changed after it was simulated?")
    walk, rows = DeviceMemory(plan.hardware.alloc_block_bytes, plan.hardware.workspace_bytes), []
    for i, n in enumerate(plan.graph.graph.nodes):
        kind = walk.visit(n)
        rows.append(MemoryRow(i, n.name, None if kind is None else str(kind), walk.current,
                              dict(walk.by_category)))
    return rows
