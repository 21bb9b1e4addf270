"""Embedding lookups done before the program runs, on the table where it lives.

An inference program's ``aten.embedding(table, index)`` reads a few rows of a table that can be
a model's largest tensor (a 128k-token vocabulary is 1 GiB in bfloat16), yet run as an op of
the program it needs the whole table on the device at its step: held there, or fetched at
every call (a decode step would move the whole table to read one row per sequence). When the
table is a weight and the index is a user input (through views) or made from constants alone,
the lookup is hoisted out:
the executor gathers the rows from the table where it lives (the model's own tensor, or the
rows read from a checkpoint's file) before the program starts, and they enter the program as
an input, ``rows_<node>``, which the planner places like any input. Only the rows reach the
device. A table the program also reads elsewhere (an LM head tied to the embedding) is still
fetched there. Training steps keep the op: its backward needs the lookup in the graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir.kinds import Kind
from ..ir.meta import annotate
from .capture import Placeholder

aten = torch.ops.aten

# ops an index may pass through between the user's input and the lookup: they reshape it or
# take a part of it (a micro-batch's rows), by constants only
_INDEX_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.unsqueeze.default,
                aten.squeeze.dim, aten.squeeze.dims, aten.flatten.using_ints, aten.alias.default,
                aten.detach.default, aten.contiguous.default, aten.clone.default, aten.slice.Tensor,
                aten.select.int, aten.narrow.default}


# ops that make an index from constants alone (RoCBert's shape ids when none are given are
# zeros): the same index at every call
_FACTORIES = {aten.zeros.default, aten.ones.default, aten.full.default, aten.arange.default, aten.arange.start,
              aten.arange.start_step}


@dataclass(frozen=True)
class RowGather:
    """How the executor makes the input that stands for one hoisted lookup."""

    table: str          # the state-dict key of the table
    index_input: int | None   # which of the call's flat inputs holds the index (None: ``made``)
    views: tuple = ()   # (op, args after the index, kwargs): replayed on that input, in order
    made: tuple | None = None   # (factory op, args, kwargs) making the index from constants

    def index(self, flat_inputs: list) -> torch.Tensor:
        if self.made is not None:
            op, args, kwargs = self.made
            idx = op(*args, **kwargs)
        else:
            idx = flat_inputs[self.index_input]
        for op, args, kwargs in self.views:
            idx = op(idx, *args, **kwargs)
        return idx


def _index_source(node: fx.Node, inputs: dict[str, int]):
    """(flat input position, views from it to ``node``, None) when ``node`` is a user input
    seen through reshaping ops only; (None, views, factory) when it is made from constants
    alone; else None."""
    views = []
    while node.op != "placeholder":
        if node.op == "call_function" and node.target in _FACTORIES and not _reads_node((node.args, node.kwargs)):
            return None, tuple(reversed(views)), (node.target, tuple(node.args), dict(node.kwargs))
        if node.op != "call_function" or node.target not in _INDEX_VIEWS:
            return None
        rest = node.args[1:]
        if _reads_node((rest, node.kwargs)):   # a shape made from another value
            return None
        views.append((node.target, tuple(rest), dict(node.kwargs)))
        node = node.args[0]
    if node.name not in inputs:
        return None
    return inputs[node.name], tuple(reversed(views)), None


def _reads_node(args) -> bool:
    found = []
    fx.node.map_arg(args, lambda a: found.append(a))
    return bool(found)


def hoist_row_gathers(gm: fx.GraphModule, placeholders: list) -> dict[str, RowGather]:
    """Replace, in place, each embedding lookup of a weight by a user input (or by ids made
    from constants) with a new input placeholder (appended to ``placeholders``, a list of frontend.capture.Placeholder); returns
    placeholder name -> how to make it."""
    graph = gm.graph
    by_name = {p.name: p for p in placeholders}
    inputs = {p.name: i for i, p in enumerate(p for p in placeholders if p.kind == Kind.INPUT)}
    gathers: dict[str, RowGather] = {}
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not aten.embedding.default:
            continue
        table, index = n.args[0], n.args[1]
        ph = by_name.get(getattr(table, "name", None))
        if ph is None or ph.kind != Kind.WEIGHT or not isinstance(n.meta.get("val"), torch.Tensor):
            continue
        source = _index_source(index, inputs)
        if source is None:
            continue
        last = [p for p in graph.nodes if p.op == "placeholder"][-1]
        with graph.inserting_after(last):
            rows = graph.placeholder(f"rows_{n.name}")
        rows.meta["val"] = n.meta["val"]
        annotate(rows, gathered_from=ph.target)
        if "tensor_meta" in n.meta:
            rows.meta["tensor_meta"] = n.meta["tensor_meta"]
        n.replace_all_uses_with(rows)
        graph.erase_node(n)
        _erase_unused(index)
        placeholders.append(Placeholder(rows.name, Kind.INPUT, None))
        gathers[rows.name] = RowGather(ph.target, *source)
    if gathers:
        gm.recompile()
    return gathers


def _erase_unused(node: fx.Node) -> None:
    """The index's views (and the op that made it), from the lookup back, while nothing else
    reads them."""
    while node.op == "call_function" and not node.users:
        before = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        node.graph.erase_node(node)
        if before is None:
            return
        node = before


def gather_rows(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``aten.embedding(table, index)`` on the table's own device."""
    return aten.embedding.default(table, index.to(table.device))
