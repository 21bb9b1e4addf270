"""Recipes: how a dropped value can be recomputed, and which ops may be re-run at all.

An op may be re-run only if it is deterministic (no ``nondeterministic_seeded`` tag: dropout
masks are kept or moved, never drawn again), out of place, returns fresh storage, and reads
nothing written in place, so that re-running it later gives the same bits."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ..ir.effects import written_args
from ..ir.tensors import storage_nbytes


@dataclass(frozen=True)
class Recipe:
    """How to recompute a value: re-run ``op`` (then take item ``index`` of its tuple)."""

    value: str
    op: str                   # the node to re-run
    index: int | None         # getitem index when ``value`` is one output of a tuple op
    inputs: tuple[str, ...]   # values the op reads
    step: int                 # the op's step (its cost is that step's time)
    extra_bytes: int          # other outputs of a tuple op, held for a moment


def written_storages(graph: torch.fx.Graph, values: dict) -> set[int]:
    """Storages some op writes in place."""
    out: set[int] = set()
    for node in graph.nodes:
        if node.op == "call_function":
            for target in written_args(node):
                out.update(values[target.name]["storages"])
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
    return not any(b in written for a in node.all_input_nodes for b in values[a.name].storages)


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
