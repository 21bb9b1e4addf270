"""Attention masks transformers skips in eager after reading their values, decided as eager does.

transformers' mask builders skip a mask with no padding (SDPA then runs causal, or unmasked)
after reading its values (``padding_mask.all()``). Traced, values cannot be read, so the mask
was kept: the program added a mask where eager added none, whose zeros (float32, under
autocast) promoted bfloat16 scores and ran softmax in float32, and whose presence sent SDPA
down another kernel (other last bits, and a (batch, 1, q, kv) tensor eager never makes).

Two kinds of masks are decided here, read off the graph being traced:

* made of ones alone: a model given no mask makes ``torch.ones`` itself (BERT's family,
  ConvBERT, BigBird, Perceiver), through casts and views; it holds ones whatever the call;
* one of the call's inputs (a tokenizer's ``attention_mask``), through the same kinds of ops:
  its values at capture decide, as eager's do, and the input is a *guard* of the program
  (``MaskReads.read``): a call whose mask differs in that respect needs another program
  (``all_ones``, part of the compiled module's key).
"""
from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

_ONES = {aten.ones.default, aten.ones_like.default, aten.new_ones.default}
_FULL = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2}  # op -> where its value is
# ops whose every element is one where their first argument's are (casts, views, copies, subsets)
_KEEP_ONES = {aten.to.device, aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
              aten.contiguous.default, aten.alias.default, aten.detach.default, aten.expand.default,
              aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.unsqueeze.default,
              aten.squeeze.dim, aten.slice.Tensor, aten.select.int, aten.index.Tensor,
              aten.lift_fresh_copy.default}


def _traced_node(t) -> fx.Node | None:
    from torch.fx.experimental import proxy_tensor

    mode = proxy_tensor.get_proxy_mode()
    if mode is None or not isinstance(t, torch.Tensor):
        return None
    slot = proxy_tensor.get_proxy_slot(t, mode.tracer, None)
    return getattr(getattr(slot, "proxy", None), "node", None)


def _source(t) -> tuple[fx.Node | None, bool]:
    """Where the traced ``t`` comes from through ops that keep ones: (that node, whether it is a
    factory of ones)."""
    node = _traced_node(t)
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in _ONES:
            return node, True
        if node.target in _FULL:
            at = _FULL[node.target]
            return node, len(node.args) > at and not isinstance(node.args[at], fx.Node) and node.args[at] == 1
        if node.target not in _KEEP_ONES or not node.args or not isinstance(node.args[0], fx.Node):
            return node, False
        node = node.args[0]
    return node, False


def made_of_ones(t) -> bool:
    """``t`` is a tensor of the trace in progress made of ones alone (nothing a call passes in)."""
    return _source(t)[1]


def all_ones(args: tuple, kwargs: dict, paths) -> tuple[bool, ...]:
    """For each input at ``paths`` (("arg", i) or ("kw", name)), whether every element is one
    (True), as a mask's skip reads it (one, not just nonzero: a cast on the way may truncate)."""
    out = []
    for kind, at in paths:
        t = args[at] if kind == "arg" else kwargs.get(at)
        out.append(isinstance(t, torch.Tensor) and t.device.type != "meta"
                   and bool(t.all() if t.dtype == torch.bool else (t == 1).all()))
    return tuple(out)


class MaskReads:
    """The skip decisions of one capture of ``model(*args, **kwargs)``: ``hook`` (a forward
    pre-hook on the model) learns which traced values are the call's inputs, ``checked`` wraps
    transformers' skip checks, and ``read`` collects the inputs whose values they read."""

    def __init__(self, args: tuple, kwargs: dict):
        self.args, self.kwargs = tuple(args), dict(kwargs or {})
        self.inputs: dict[fx.Node, tuple] = {}
        self.read: set[tuple] = set()

    def hook(self, module, args, kwargs):
        for path, t in [(("arg", i), a) for i, a in enumerate(args)] + [(("kw", k), v) for k, v in kwargs.items()]:
            node = _traced_node(t)
            if node is not None:
                self.inputs[node] = path

    def _holds_ones(self, t) -> bool:
        node, ones = _source(t)
        path = self.inputs.get(node)
        if ones or path is None:
            return ones
        self.read.add(path)
        from torch.utils._mode_utils import no_dispatch

        with no_dispatch():   # the call's own tensor, read outside the trace
            return all_ones(self.args, self.kwargs, [path])[0]

    def checked(self, check):
        """transformers' mask-skip ``check(padding_mask, ...)``, given None for a mask of ones."""
        def run(padding_mask, *args, **kwargs):
            return check(None if self._holds_ones(padding_mask) else padding_mask, *args, **kwargs)
        return run
