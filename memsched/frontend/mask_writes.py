"""Writes through a boolean mask, ``x[mask] = v``, written with ops whose backward has static sizes.

PyTorch runs such a write as ``index_put(x, [mask], v)``, whose backward gathers ``v``'s
gradient with ``grad[mask]``: a ``nonzero``, a size made from data, which a traced training step
cannot hold (Kosmos-2 scattering its image features into the text embeddings; Wav2Vec2-style
pretraining writing its learned mask embedding where ``mask_time_indices`` says). The count of
written rows is known whenever ``v`` names one row per masked position, and the same write
is then ``masked_scatter(x, mask, v)``: the same elements land in the same places, and its
backward (``masked_scatter_backward``) returns a gradient of ``v``'s own size. A ``v`` broadcast
over the masked positions (one row, a scalar) is scattered from as many copies of it as there
are positions, of which the first ``count`` are read. (Rows beyond the mask's count, which
eager refuses, are left unread.) The forward copies values, so it is the
write bit for bit; a broadcast row's gradient sums its masked positions' gradients with zeros
after them, which PyTorch's CPU sum adds in eager's order for up to a few thousand rows
(measured: exact at 43 to 3612 rows of 32 to 128 values; 1e-6 off at 3558 rows of 8).

Only a mask indexing the leading dimensions (``x[mask]``, not ``x[:, mask]``) without
accumulation is rewritten; other writes are left as traced.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

aten = torch.ops.aten

_PUTS = {aten.index_put.default: False, aten.index_put_.default: True}   # op -> writes in place


def static_mask_writes(gm: fx.GraphModule) -> int:
    """Rewrite ``gm``'s boolean-mask writes in place; returns how many were rewritten."""
    count = 0
    for node in list(gm.graph.nodes):
        if _mask_write(node):
            _rewrite(gm.graph, node)
            count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _mask_write(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _PUTS or len(node.args) < 3:
        return False
    accumulate = node.args[3] if len(node.args) > 3 else node.kwargs.get("accumulate", False)
    x, indices, values = node.args[:3]
    if accumulate or not isinstance(indices, (list, tuple)) or len(indices) != 1:
        return False
    xv, mv, vv = _val(x), _val(indices[0]), _val(values)
    if not all(isinstance(t, torch.Tensor) for t in (xv, mv, vv)) or mv.dtype != torch.bool:
        return False
    k = mv.dim()
    return 0 < k <= xv.dim() and tuple(mv.shape) == tuple(xv.shape[:k]) and vv.dtype == xv.dtype \
        and vv.dim() <= xv.dim() - k + 1


def _add(graph: fx.Graph, target, args, like: fx.Node) -> fx.Node:
    """A node computing ``target(*args)``, its value made on the FakeTensors of ``args``."""
    node = graph.call_function(target, tuple(args))
    vals = [_val(a) if isinstance(a, fx.Node) else a for a in args]
    node.meta = {k: v for k, v in like.meta.items() if k != "val"}
    # (an in-place op's value is its first argument's; the FakeTensors are not written to)
    node.meta["val"] = vals[0] if target._schema.is_mutable else target(*vals)
    return node


def _rewrite(graph: fx.Graph, node: fx.Node) -> None:
    x, (mask,), values = node.args[:3]
    xv, mv, vv = _val(x), _val(mask), _val(values)
    rest = list(xv.shape[mv.dim():])
    with graph.inserting_before(node):
        spread = _add(graph, aten.view.default, [mask, list(mv.shape) + [1] * len(rest)], node)
        spread = _add(graph, aten.expand.default, [spread, list(xv.shape)], node)
        one_each = vv.dim() == len(rest) + 1 and vv.shape[0] != 1   # one row per masked position
        # else one row (or less) broadcast: as many rows as there are positions, of which
        # masked_scatter reads the first `count`
        n = vv.shape[0] if one_each else math.prod(mv.shape)
        rows = _add(graph, aten.expand.default, [values, [n] + rest], node)
        op = aten.masked_scatter_.default if _PUTS[node.target] else aten.masked_scatter.default
        new = _add(graph, op, [x, spread, rows], node)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
