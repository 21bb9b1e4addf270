"""The LM head with its cross-entropy, found in the exported forward and replaced by memsched's
chunked kernel (kernels/cross_entropy.py), so a training step never holds the full logits.

The pattern (``kernels.PATTERNS["fused_linear_cross_entropy"]``), read off torch.export's
graph, not off class names: ``linear(hidden, weight[, bias])``, then casts to float32, aliases,
views and slices of rows (the shift of ``logits[..., :-1, :]``, applied to ``hidden`` instead),
then ``cross_entropy_loss(logits [N, V], target [N])`` with no class weights and no
label smoothing, each value in the chain read by the next op (trace-time asserts aside).
When the logits are read elsewhere too (a Hugging Face model returns them beside the loss) the
linear stays for those readers and the loss is replaced by the kernel reading those logits in
blocks of rows (``shared``): the cross-entropy's own [N, V] values (its float copy, log-softmax,
their gradients) never exist whole, and no matmul is added. A training step differentiates the
loss alone (frontend/joint.py), so the kept linear has no backward: the kernel's gives the hidden
state, weight and bias theirs. Summed in slices, loss and gradients differ from eager's in the
last bits, so this is done only where such differences are accepted anyway (``shared=True``:
a fused plan whose whole program does not fit the budget, pipeline's ``loss_head_pass``; the
slices' smaller matmuls cost time); otherwise it is the planner's choice below the minimum
(passes/chunking.py), as is the split of a forward that returns the loss alone, which saves
the logits too for one more LM-head matmul per slice.

The replacement calls ``fused_linear_cross_entropy(..., impl="torch")``: the joint trace
(frontend/joint.py) runs its chunk loop and its autograd backward on FakeTensors, so the plan
holds ordinary ATen ops over [N / chunks, V] slices of the logits, which the planner places,
offloads and recomputes like any other value. The maths is the same up to summation order.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..ir.effects import is_impure
from ..kernels import fused_linear_cross_entropy
from .node_reads import arg_of, readers_of, tensor_val

aten = torch.ops.aten

_PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.alias.default, aten.view.default,
                 aten.reshape.default, aten._unsafe_view.default, aten.contiguous.default}
_REDUCTION = {0: "none", 1: "mean", 2: "sum"}


@dataclass(frozen=True)
class LossHead:
    """One LM head + cross-entropy in the exported forward."""

    linear: str         # the linear node's name
    loss: str           # the cross_entropy_loss node's name
    rows: int           # N: the rows of the logits
    logits_bytes: int   # the full logits the chunked kernel never makes
    hidden_bytes: int   # the linear's input
    slices: tuple = ()  # (dim, start, end, step) of the rows the loss reads, applied to the input
    shared: bool = False  # the logits are read elsewhere too: the loss reads them, its own values never exist whole


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


_CHAIN = _PASS_THROUGH | {aten.slice.Tensor, aten.cross_entropy_loss.default}


def _loss_after(linear: fx.Node) -> tuple[fx.Node | None, list[tuple], bool]:
    """The cross_entropy_loss the linear's output flows into, through casts, views and slices
    of rows (a shift: ``logits[..., :-1, :]``), those slices as (dim, start, end, step) --
    rows picked before the head are the same rows picked after it -- and whether a value on
    the way is read elsewhere too."""
    if tensor_val(linear) is None:
        return None, [], False
    node, slices, reshaped, rank, shared = linear, [], False, tensor_val(linear).dim(), False
    while True:
        readers = readers_of(node)
        chain = [u for u in readers if u.target in _CHAIN and u.args[0] is node]
        if len(chain) != 1:
            return None, [], False
        (nxt,) = chain
        shared = shared or len(readers) > 1
        if nxt.target is aten.cross_entropy_loss.default:
            return nxt, slices, shared
        if tensor_val(nxt) is None or tensor_val(nxt).device != tensor_val(node).device:
            return None, [], False   # (a copy to another device is not a cast: the head stays whole)
        if nxt.target is aten.slice.Tensor:
            dim = arg_of(nxt, 1, "dim", 0) % rank
            if reshaped or dim == rank - 1:   # rows no longer lined up, or a slice of the vocabulary
                return None, [], False
            slices.append((dim, arg_of(nxt, 2, "start", None), arg_of(nxt, 3, "end", None), arg_of(nxt, 4, "step", 1)))
        else:
            reshaped = reshaped or nxt.target in _VIEWS
        node = nxt


def _plain(loss: fx.Node) -> bool:
    """No class weights, no label smoothing, a known reduction, [N, V] logits and [N] targets."""
    logits, target = tensor_val(loss.args[0]), tensor_val(loss.args[1])
    return (arg_of(loss, 2, "weight", None) is None and float(arg_of(loss, 5, "label_smoothing", 0.0)) == 0.0
            and arg_of(loss, 3, "reduction", 1) in _REDUCTION and logits is not None and target is not None
            and logits.dim() == 2 and target.dim() == 1 and not target.is_floating_point()
            and logits.is_floating_point())


def find_loss_heads(gm: fx.GraphModule) -> list[LossHead]:
    """Each LM head whose logits feed a cross-entropy (``shared`` when they feed more)."""
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not aten.linear.default:
            continue
        loss, slices, shared = _loss_after(node)
        hidden, logits = tensor_val(node.args[0]), tensor_val(loss.args[0]) if loss is not None else None
        if loss is None or hidden is None or not _plain(loss):
            continue
        logits_bytes = logits.numel() * logits.element_size()
        out.append(LossHead(node.name, loss.name, int(logits.shape[0]), logits_bytes,
                            hidden.numel() * hidden.element_size(), tuple(slices), shared))
    return out


# A shared head's loss reads the kept logits in this many blocks of rows at least: each block's
# float copy and gradient are an eighth of the logits, and more blocks add no arithmetic.
SHARED_BLOCKS = 8


def chunk_loss_heads(gm: fx.GraphModule, chunks: int, shared: bool = False) -> fx.GraphModule:
    """A copy of ``gm`` with its loss heads computed in slices of rows when ``chunks`` > 1: a
    shared head (its logits read elsewhere too) reading those logits in max(``chunks``,
    SHARED_BLOCKS) blocks, the others recomputing their logits in ``chunks`` slices.
    ``shared=True``: shared heads are rewritten whatever ``chunks``. ``gm`` itself when no head
    is rewritten."""
    heads = [h for h in find_loss_heads(gm) if chunks > 1 or (shared and h.shared)]
    if not heads:
        return gm
    gm = copy.deepcopy(gm)
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    for head in heads:
        linear, loss = nodes[head.linear], nodes[head.loss]
        hidden, weight = linear.args[0], linear.args[1]
        bias = arg_of(linear, 2, "bias", None)
        slices = max(chunks, SHARED_BLOCKS) if head.shared else chunks
        # the loss keeps the dtype it had (float32 where the logits were upcast before it)
        kwargs = {"chunk_size": math.ceil(head.rows / slices), "reduction": _REDUCTION[arg_of(loss, 3, "reduction", 1)],
                  "ignore_index": int(arg_of(loss, 4, "ignore_index", -100)), "impl": "torch",
                  "dtype": tensor_val(loss).dtype}
        with graph.inserting_before(loss):
            logits = linear if head.shared else None
            for dim, start, end, step in head.slices:
                hidden = graph.call_function(aten.slice.Tensor, (hidden, dim, start, end, step))
                if logits is not None:
                    logits = graph.call_function(aten.slice.Tensor, (logits, dim, start, end, step))
            if logits is not None:
                kwargs["logits"] = logits
            fused = graph.call_function(fused_linear_cross_entropy, (hidden, weight, loss.args[1], bias), kwargs)
        fused.meta.update(loss.meta)
        loss.replace_all_uses_with(fused)
    graph.eliminate_dead_code(is_impure_node=is_impure)
    graph.lint()
    gm.recompile()
    return gm
