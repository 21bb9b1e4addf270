"""Attention masks transformers skips in eager after reading their values, decided as eager does.

transformers' mask builders skip a mask with no padding (SDPA then runs causal, or unmasked)
after reading its values (``padding_mask.all()``). Traced, values cannot be read, so the mask
was kept: the program added a mask where eager added none, whose zeros (float32, under
autocast) promoted bfloat16 scores and ran softmax in float32, and whose presence sent SDPA
down another kernel (other last bits, and a (batch, 1, q, kv) tensor eager never makes).

Two kinds of masks are decided here, read off the graph being traced:

* made of ones alone: a model given no mask makes ``torch.ones`` itself (BERT's family,
  ConvBERT, BigBird, Perceiver), through casts and views; it holds ones whatever the call;
* made from the call's inputs alone (a tokenizer's ``attention_mask``, through any
  deterministic ops): its values at capture decide, as eager's do, and whether it holds ones
  is a guard of the program (input_values.py, a "ones" read): a call whose mask differs in
  that respect gets another program, as another shape would.
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


class MaskReads:
    """The skip decisions of one capture: ``checked`` wraps transformers' skip checks, answering
    for a mask made of ones alone, and for one the call's inputs make by reading its values
    through ``values`` (input_values.InputValues, which keeps the guard the program is keyed
    by), or keeping the mask without it (None: no model call is traced)."""

    def __init__(self, values=None):
        self.values = values

    def _holds_ones(self, t) -> bool:
        if made_of_ones(t):
            return True
        return bool(self.values is not None and isinstance(t, torch.Tensor) and self.values.ones(t))

    def checked(self, check):
        """transformers' mask-skip ``check(padding_mask, ...)``, given None for a mask of ones."""
        def run(padding_mask, *args, **kwargs):
            return check(None if self._holds_ones(padding_mask) else padding_mask, *args, **kwargs)
        return run
