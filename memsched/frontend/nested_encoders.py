"""``nn.TransformerEncoder``'s padded positions as eager returns them.

In eval mode with no gradient needed and a ``src_key_padding_mask`` whose real tokens come
first in every row, eager ``nn.TransformerEncoder`` packs its input into a nested tensor
without the padding, runs its layers on that, and unpacks it with zeros where the padding was
(then its final norm, if any, runs over those zeros too). A trace cannot take that path (its
tensors have torch functions, and ``torch.compiler.is_compiling()`` skips the mask's check), so
the program took the standard one, which computes values at padded positions: a mean over the
sequence of the compiled module's output differed from eager's entirely.

While a model is traced, each such encoder runs the standard path with its norm held back,
then sets its padded positions to 0 where eager would have packed (the left-alignment test, a
branch on the mask's values in eager, is a tensor here: no guard, no program per mask), then
runs its norm. The real positions are the standard path's values, equal to the nested path's
up to the fused kernels' last bits (``FastPathWarning`` says so). The test of the rest of
eager's conditions is the one ``TransformerEncoder.forward`` makes, on the traced call: its
training flag, the mask and input given, autocast, and whether a gradient is needed (the
call's grad mode, which is part of such a model's signature: ``packs_padding``).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

_DEVICES = ("cpu", "cuda", "xpu")


def packs_padding(modules) -> bool:
    """Whether any of ``modules`` is an ``nn.TransformerEncoder`` that may pack its padding in
    eager (then an inference call's grad mode is part of its signature: eager packs only when no
    gradient is needed)."""
    return any(isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) for m in modules)


@contextlib.contextmanager
def padded_positions_as_eager(model: nn.Module):
    """While a model is traced, its ``nn.TransformerEncoder``\\ s return 0 at padded positions
    where eager's nested-tensor path does (see the module's docstring)."""
    encoders = [m for m in model.modules() if packs_padding([m])]
    if not encoders or not torch.backends.mha.get_fastpath_enabled():
        yield
        return
    saved = [(m, m.__dict__.get("forward")) for m in encoders]
    for m in encoders:
        m.forward = _padded_as_eager(m, m.forward)
    try:
        yield
    finally:
        for m, own in saved:
            if own is None:
                del m.__dict__["forward"]
            else:
                m.forward = own


def _padded_as_eager(encoder: nn.TransformerEncoder, forward):
    def run(src, mask=None, src_key_padding_mask=None, is_causal=None):
        if not _packs(encoder, src, mask, src_key_padding_mask):
            return forward(src, mask, src_key_padding_mask, is_causal)
        norm = encoder.norm
        encoder.norm = None   # eager runs it after the zeros are in
        try:
            out = forward(src, mask, src_key_padding_mask, is_causal)
        finally:
            encoder.norm = norm
        real = F._canonical_mask(mask=src_key_padding_mask, mask_name="src_key_padding_mask", other_type=None,
                                 other_name="", target_type=src.dtype).logical_not()
        padded = ~real
        if getattr(encoder, "mask_check", True):   # eager packs only when real tokens come first
            padded = padded & (real[:, 1:] <= real[:, :-1]).all()
        if not encoder.layers[0].self_attn.batch_first:
            padded = padded.transpose(0, 1)
        out = out.masked_fill(padded[..., None], 0.0)
        return norm(out) if norm is not None else out
    return run


def _packs(encoder: nn.TransformerEncoder, src, mask, src_key_padding_mask) -> bool:
    """Whether eager ``TransformerEncoder.forward`` would pack this call's input (its tests
    that do not read the mask's values)."""
    first = encoder.layers[0]
    if first.training or src_key_padding_mask is None or mask is not None or src.dim() != 3 \
            or torch.is_autocast_enabled():
        return False
    if src.device.type not in _DEVICES + (torch.utils.backend_registration._privateuse1_backend_name,):
        return False
    weights = [first.self_attn.in_proj_weight, first.self_attn.in_proj_bias, first.self_attn.out_proj.weight,
               first.self_attn.out_proj.bias, first.norm1.weight, first.norm1.bias, first.norm2.weight,
               first.norm2.bias, first.linear1.weight, first.linear1.bias, first.linear2.weight, first.linear2.bias]
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in [src, *weights]))
