"""Recipes: how a dropped value can be recomputed, and which ops may be re-run at all.

An op may be re-run only if it is deterministic (no ``nondeterministic_seeded`` tag: dropout
masks are kept or moved, never drawn again), out of place, returns fresh storage, and reads
nothing written in place, so that re-running it later gives the same bits; and a value may be
rebuilt so only if nothing writes its storage in place after it is made (the op alone would
give it back without those writes)."""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ..ir.effects import written_args
from ..ir.kinds import PERSISTENT
from ..ir.meta import info
from ..ir.tensors import storage_nbytes


@dataclass(frozen=True)
class Recipe:
    """How to recompute a value: re-run ``op`` (then take item ``index`` of its tuple)."""

    value: str
    op: str                   # the node to re-run
    index: int | None         # getitem index when ``value`` is one output of a tuple op
    inputs: tuple[str, ...]   # values the op reads
    step: int                 # the op's step (its cost is that step's time)
    extra_bytes: int          # other outputs of a tuple op and the op's own scratch, held for a moment


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
        if any(b in written for b in val.storages):
            continue   # written in place after it was made (BEiT's index table): re-running its op skips the writes
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
        extra += info(op).scratch or 0   # held inside the op while it runs again (analysis)
        out[node.name] = Recipe(node.name, op.name, index, tuple(a.name for a in op.all_input_nodes),
                                values[op.name].step, extra)
    return out


@dataclass(frozen=True)
class Chain:
    """How a dropped value is rebuilt at a step: ``values`` re-made in order (the value itself
    last), reading ``reads`` -- values that must be on the device then."""

    values: tuple[str, ...]
    reads: tuple[str, ...]


MAX_CHAIN = 8  # ops re-run for one value at most


def recompute_chain(program, value: str, at: int) -> Chain | None:
    """The ops that rebuild ``value`` at step ``at``: its own, preceded by those of inputs that
    are dead by then (each deterministic, and its storage gone too: nothing else holds it), up
    to ``MAX_CHAIN`` ops; inputs alive at ``at`` and the model's tensors are read where they
    are. None when ``value`` cannot be rebuilt so."""
    order: list[str] = []
    reads: list[str] = []

    def visit(v: str, depth: int = 1) -> bool:
        recipe = program.recipes.get(v)
        # each value on the way down joins the chain: deeper than MAX_CHAIN is too long (and
        # would recurse as deep as a program's run of dead values)
        if recipe is None or len(order) >= MAX_CHAIN or depth > MAX_CHAIN:
            return False
        for name in recipe.inputs:
            if name in order or name in reads:
                continue
            val = program.values[name]
            gone = val.last_use < at and all(program.storages[b].last_step < at for b in val.storages)
            model_tensor = any(program.storages[b].kind in PERSISTENT for b in val.storages)
            if gone and not model_tensor:
                if not visit(name, depth + 1):
                    return False
            elif val.last_use < at and not model_tensor:
                return False  # dead, but its storage lives on through another value
            else:
                reads.append(name)
        order.append(v)
        return True

    return Chain(tuple(order), tuple(reads)) if visit(value) else None
