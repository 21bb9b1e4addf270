"""Gradient sums in place: ``add(a, b)`` where ``a`` dies at the add becomes ``a.add_(b)``.

Autograd sums the gradients a value receives from its several users with out-of-place adds:
the residual stream's gradient at every block, and a tied weight's gradient (the LM head's
plus the embedding's, two [vocab, hidden] matrices). Out of place, such an add holds both
inputs and its output at once; in place, two. At a tight budget that is the op that binds the
minimum (the tied gradient of a GPT-2 or BERT whose LM head runs in slices). Eager PyTorch
frees ``a`` right after the add; writing the sum into ``a`` computes the same bits
(floating-point addition is commutative) without the third buffer.

Only in the backward, and only where it is safe: ``a`` is made by an op of the step (never a model tensor or an input),
fills its storage alone (no view or other value shares it), has the output's shape, dtype and
strides, and is read by this add only. The planner sees the write (ir/effects.written_args):
nothing that read ``a``'s storage is recomputed after it.
"""
from __future__ import annotations

import collections

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..ir.tensors import on_storage, storage_key, storage_nbytes, tensor_leaves

aten = torch.ops.aten


def _tensor(n) -> torch.Tensor | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _sharers(graph: fx.Graph) -> collections.Counter:
    """Storage -> how many graph values (tuple outputs included) lie in it."""
    return collections.Counter(storage_key(t) for node in graph.nodes for t in tensor_leaves(node.meta.get("val")))


def _move_views(add: fx.Node, old, storage: torch.UntypedStorage) -> None:
    """The values viewing the out-of-place sum's storage (its views, their views), traced on it,
    moved onto ``storage`` with the same layouts: in place, they view the storage that takes the
    sum (else the planner counts a storage no op makes, and a value a view reads is apart from
    its base)."""
    todo, seen = list(add.users), set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        val = n.meta.get("val")
        leaves, spec = pytree.tree_flatten(val)
        if not any(isinstance(t, torch.Tensor) and storage_key(t) == old for t in leaves):
            continue
        n.meta["val"] = pytree.tree_unflatten(
            [on_storage(t, storage) if isinstance(t, torch.Tensor) and storage_key(t) == old else t for t in leaves], spec)
        todo.extend(n.users)


def _takes_sum(a, add: fx.Node, out: torch.Tensor, sharers) -> bool:
    t = _tensor(a)
    return (t is not None and a.op == "call_function" and a.target is not torch.ops.higher_order.wrap_with_set_grad_enabled
            and set(a.users) == {add} and t.shape == out.shape and t.dtype == out.dtype and t.stride() == out.stride()
            and t.storage_offset() == 0 and t.numel() * t.element_size() == storage_nbytes(t)
            and sharers[storage_key(t)] == 1)


def accumulate_in_place(gm: fx.GraphModule, after: fx.Node) -> int:
    """Rewrite the adds after ``after`` (the backward, past the boundary) whose first (or, with
    alpha 1, second) input can take the sum; returns how many were rewritten. The forward is
    left as it is: a value written in place is never recomputed, and recomputing forward
    values (a residual stream) is what lets a plan drop them."""
    graph, sharers, done = gm.graph, _sharers(gm.graph), 0
    nodes = list(graph.nodes)
    for add in nodes[nodes.index(after) + 1:]:
        if add.op != "call_function" or add.target is not aten.add.Tensor or len(add.args) != 2:
            continue
        out, (x, y) = _tensor(add), add.args
        if out is None or _tensor(x) is None or _tensor(y) is None or x is y:
            continue
        alpha = add.kwargs.get("alpha", 1)
        if _takes_sum(x, add, out, sharers):
            into, other = x, y
        elif alpha == 1 and _tensor(y).dtype == _tensor(x).dtype and _takes_sum(y, add, out, sharers):
            into, other = y, x
        else:
            continue
        with graph.inserting_before(add):
            new = graph.call_function(aten.add_.Tensor, (into, other), dict(add.kwargs))
        new.meta.update(add.meta)
        new.meta["val"] = into.meta["val"]   # the sum lives in ``into``'s storage
        _move_views(add, storage_key(out), _tensor(into).untyped_storage())   # and so do its views
        add.replace_all_uses_with(new)
        graph.erase_node(add)
        new._rename(add.name)
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done
