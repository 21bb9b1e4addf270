"""Composite ops that hold a full-size temporary inside them, rewritten into the ops they run,
so that the temporary is a value of the program: counted, placed and freed by the planner like
any other, instead of allocated behind its back.

``cross_entropy_loss`` (an inference forward given labels: Hugging Face's models compute their
loss then) runs ``log_softmax`` over the whole logits before ``nll_loss``: a second copy of the
logits, as large as the model's largest value, that the program did not hold. Class-index
targets without label smoothing are rewritten as PyTorch's own implementation runs them
(``nll_loss_nd(log_softmax(logits, class_dim), ...)``; for [N, C] logits the
``nll_loss_forward`` it reaches, whose total weight is then a value too), the same ops on the
same values, so
the loss is bit for bit eager's. Probabilities as targets and label smoothing keep the op
(their extra temporaries stay uncounted: said here, not hidden).

``scaled_dot_product_attention`` given a boolean mask converts it first to a float mask of the
query's dtype, ``where(mask, 0, -inf)``, as large as the mask in 4 or 2 bytes an element: for
a padded batch that is [batch, 1, query, key], 8 MB at 1024 tokens and 134 MB at 4096, made in
every layer behind the program's back (a LLaMA at memsched's minimum budget, 2 x 1024 tokens:
the allocator held 1.56x the budget). The conversion becomes a node before the call, which is
handed the float mask: the values PyTorch converts to, so the outputs are bit for bit eager's.
(What the attention kernel holds besides, a CPU's per-thread blocks, is measured and held
while it runs: cost_models/op_scratch.py.)

Where a CPU attention cannot run its fused kernel -- keys and values with fewer heads than the
queries, broadcast (multi-query models: Falcon, GPT-BigCode), or dropout -- PyTorch runs its
math path: the scores, the masked scores and their softmax, each [batch, heads, query, key],
all inside the op (a Falcon at memsched's minimum, 2 x 1024 tokens: the allocator held 8.1x
the budget). Asked which kernel it would pick (``torch._fused_sdp_choice``, on small tensors of
the same heads, dtypes and layouts), such an attention is replaced by the ops of its math path
as ``make_fx`` records them (``_safe_softmax`` through its decomposition), out of place: the
same arithmetic in the same order, so bit for bit eager's, and every temporary a value the
planner counts and may slice. Only for a CPU device: a GPU picks its kernel otherwise.

A training step never meets these: its joint trace records the ops the composite runs.
"""
from __future__ import annotations

import contextlib
import math
import operator

import torch
import torch.fx as fx
from torch.nn.attention import SDPBackend

from .node_reads import arg_of, tensor_val

aten = torch.ops.aten


def expand_cross_entropy(gm: fx.GraphModule) -> int:
    """Rewrite, in place, each plain ``cross_entropy_loss`` of ``gm`` into its ``log_softmax``
    and ``nll_loss_nd``; returns how many."""
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.cross_entropy_loss.default:
            continue
        logits, target = tensor_val(node.args[0]), tensor_val(node.args[1])
        if logits is None or target is None or target.is_floating_point() \
                or float(arg_of(node, 5, "label_smoothing", 0.0)) != 0.0:
            continue
        class_dim = 1 if logits.dim() > 1 else 0
        args = (node.args[1], arg_of(node, 2, "weight", None), arg_of(node, 3, "reduction", 1),
                arg_of(node, 4, "ignore_index", -100))
        logp_val = aten._log_softmax.default(logits, class_dim, False)
        with graph.inserting_before(node):
            logp = graph.call_function(aten._log_softmax.default, (node.args[0], class_dim, False))
            if logits.dim() == 2 and target.dim() == 1:   # nll_loss_nd's own path: its total weight shown too
                pair = graph.call_function(aten.nll_loss_forward.default, (logp,) + args)
                pair.meta["val"] = aten.nll_loss_forward.default(logp_val, target, *[tensor_val(a) if isinstance(a, fx.Node)
                                                                                    else a for a in args[1:]])
                loss = graph.call_function(operator.getitem, (pair, 0))
            else:
                loss = graph.call_function(aten.nll_loss_nd.default, (logp,) + args)
        logp.meta["val"] = logp_val
        loss.meta.update(node.meta)
        _replace(node, loss)
        done += 1
    return _recompiled(gm, done)


def _replace(node: fx.Node, by: fx.Node) -> None:
    node.replace_all_uses_with(by)
    node.graph.erase_node(node)


def _recompiled(gm: fx.GraphModule, rewrites: int) -> int:
    if rewrites:
        gm.graph.lint()
        gm.recompile()
    return rewrites


def expand_bool_attention_masks(gm: fx.GraphModule) -> int:
    """Hand each ``scaled_dot_product_attention`` of ``gm`` given a boolean mask the float mask
    it would convert it to, made by nodes before it; returns how many."""
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
            continue
        mask_arg = arg_of(node, 3, "attn_mask", None)
        mask, query = tensor_val(mask_arg), tensor_val(node.args[0])
        if mask is None or query is None or mask.dtype != torch.bool:
            continue
        spec = {"dtype": query.dtype, "device": query.device}
        with graph.inserting_before(node):
            zero = graph.call_function(aten.scalar_tensor.default, (0.0,), dict(spec))
            masked = graph.call_function(aten.scalar_tensor.default, (-math.inf,), dict(spec))
            additive = graph.call_function(aten.where.self, (mask_arg, zero, masked))
        with getattr(query, "fake_mode", None) or contextlib.nullcontext():   # traced values, like the rest
            zero.meta["val"] = aten.scalar_tensor.default(0.0, **spec)
            masked.meta["val"] = aten.scalar_tensor.default(-math.inf, **spec)
            additive.meta["val"] = aten.where.self(mask, zero.meta["val"], masked.meta["val"])
        if len(node.args) > 3:
            node.args = node.args[:3] + (additive,) + node.args[4:]
        else:
            node.kwargs = {**node.kwargs, "attn_mask": additive}
        done += 1
    return _recompiled(gm, done)


_SDPA = aten.scaled_dot_product_attention.default


def expand_math_attention(gm: fx.GraphModule) -> int:
    """Replace each ``scaled_dot_product_attention`` of ``gm`` that a CPU runs on its math path
    by the ops of that path; returns how many."""
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA or _cpu_attention_kernel(node) != _MATH:
            continue
        inputs = list(node.all_input_nodes)
        traced = _math_path(node, inputs)
        if traced is None:
            continue
        env = dict(zip([n for n in traced.graph.nodes if n.op == "placeholder"], inputs))
        with graph.inserting_before(node):
            for n in traced.graph.nodes:
                if n.op == "call_function":
                    env[n] = graph.node_copy(n, env.__getitem__)
                    env[n].meta.update({k: v for k, v in node.meta.items() if k != "val"})
                    env[n].meta["val"] = n.meta["val"]
                elif n.op == "output":
                    result = env[n.args[0][0] if isinstance(n.args[0], (tuple, list)) else n.args[0]]
        _replace(node, result)
        done += 1
    return _recompiled(gm, done)


_MATH = int(SDPBackend.MATH.value)


def _cpu_attention_kernel(node: fx.Node) -> int | None:
    """The kernel a CPU picks for this attention (``torch._fused_sdp_choice``), asked with small
    real tensors of the same batch and heads, head sizes, dtypes and last-dim layouts, their
    sequences one long (the choice reads those, not the lengths); None if it cannot be asked."""
    vals = fx.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    args, kwargs = vals
    if any(isinstance(v, torch.Tensor) and (v.dim() != 4 or v.is_sparse) for v in args[:4]):
        return None
    small = [_stand_in(v, keep_last=i < 3) if isinstance(v, torch.Tensor) else v for i, v in enumerate(args)]
    try:
        return int(torch._fused_sdp_choice(*small, **kwargs))
    except Exception:   # noqa: BLE001 - an attention the choice cannot read stays as it is
        return None


def _stand_in(t: torch.Tensor, keep_last: bool) -> torch.Tensor:
    """``t``'s stand-in: the query's, key's or value's head size kept (``keep_last``), every
    sequence (a mask's two last dims) one long."""
    shape = [*t.shape[:-2], min(t.shape[-2], 1), t.shape[-1] if keep_last else min(t.shape[-1], 1)]
    if keep_last and t.shape[-1] > 1 and t.stride(-1) != 1:   # the layout checks read that stride
        return torch.zeros(*shape, 2, dtype=t.dtype)[..., 0]
    return torch.zeros(shape, dtype=t.dtype)


def _math_path(node: fx.Node, inputs: list[fx.Node]) -> fx.GraphModule | None:
    """The ops an attention runs on its math path, out of place, traced on the node's values."""
    from torch._decomp import decomposition_table
    from torch.fx.experimental.proxy_tensor import make_fx

    def attention(*tensors):
        by_node = dict(zip(inputs, tensors))
        args, kwargs = fx.map_arg((node.args, node.kwargs), by_node.__getitem__)
        return _SDPA(*args, **kwargs)

    softmax = aten._safe_softmax.default
    table = {softmax: decomposition_table[softmax]} if softmax in decomposition_table else {}
    traced = make_fx(torch.func.functionalize(attention, remove="mutations_and_views"),
                     decomposition_table=table)(*[a.meta["val"] for a in inputs])
    if any(n.op == "get_attr" for n in traced.graph.nodes):   # a tensor made inside: not a program value
        return None
    return traced
