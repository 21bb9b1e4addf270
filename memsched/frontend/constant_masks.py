"""Masks a model makes of ones, read off the graph being traced.

Given no attention mask, many transformers models make one themselves (``torch.ones`` of the
input's shape: BERT's family, ConvBERT, BigBird, Perceiver) and hand it to transformers' mask
builders, which in eager skip a mask with no padding after reading its values
(``padding_mask.all()``). Traced, the values cannot be read, so the mask was kept: the program
added zeros where eager added nothing (under autocast, float32 zeros that promote bfloat16
scores, so softmax ran in float32 where eager's ran in bfloat16). A mask the trace made from
factories of ones alone, through ops that keep every element one, holds ones whatever the
call: its skip is decided as eager decides it, as if no mask had been given.
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


def made_of_ones(t) -> bool:
    """``t`` is a tensor of the trace in progress made of ones alone (nothing a call passes in)."""
    from torch.fx.experimental import proxy_tensor

    mode = proxy_tensor.get_proxy_mode()
    if mode is None or not isinstance(t, torch.Tensor):
        return False
    slot = proxy_tensor.get_proxy_slot(t, mode.tracer, None)
    node = getattr(getattr(slot, "proxy", None), "node", None)
    while isinstance(node, fx.Node) and node.op == "call_function":
        if node.target in _ONES:
            return True
        if node.target in _FULL:
            at = _FULL[node.target]
            return len(node.args) > at and not isinstance(node.args[at], fx.Node) and node.args[at] == 1
        if node.target not in _KEEP_ONES or not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return False


def ones_as_none(check):
    """transformers' mask-skip ``check(padding_mask, ...)``, given None for a mask made of ones."""
    def checked(padding_mask, *args, **kwargs):
        return check(None if made_of_ones(padding_mask) else padding_mask, *args, **kwargs)
    return checked
