"""Rotary position embedding, the LLaMA/NeoX ``rotate_half`` convention (transformers'
``apply_rotary_pos_emb``): ``q * cos + rotate_half(q) * sin`` and the same for k, where
``rotate_half([x1, x2]) = [-x2, x1]`` splits the last dimension in halves.

Triton: one program per block of (batch, head, position) rows; backward applies the transpose
of the rotation, ``dx = g * cos + rotate_half^T(g * sin)``. Gradients flow to q and k only:
when cos or sin require grad, the PyTorch fallback runs so autograd reaches them.
"""
from __future__ import annotations

import torch

from ._select import triton_kernels, use_triton
from .ops import rope_composite


def rotary_embedding_torch(q, k, cos, sin, unsqueeze_dim: int = 1):
    """The composite, as transformers writes it (the graph op's fallback, ops.py)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return rope_composite(q, cos, sin, False), rope_composite(k, cos, sin, False)


def _as_bhsd(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    return (x if unsqueeze_dim == 1 else x.transpose(1, 2)).contiguous()


def _tables_fit(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, unsqueeze_dim: int) -> bool:
    """The layouts the kernel takes: q, k 4-D; cos, sin [1 or B, S, D] (else: the fallback)."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or unsqueeze_dim not in (1, 2):
        return False
    seq = 3 - unsqueeze_dim  # S is dim 2 of [B, H, S, D], dim 1 of [B, S, H, D]
    return (cos.shape[0] in (1, q.shape[0]) and cos.shape[1:] == (q.shape[seq], q.shape[3])
            and q.shape[0] == k.shape[0] and q.shape[seq] == k.shape[seq] and q.shape[3] % 2 == 0)


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        cos3, sin3 = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos3, sin3)
        ctx.unsqueeze_dim = unsqueeze_dim
        return tuple(_apply(x, cos3, sin3, unsqueeze_dim, False) for x in (q, k))

    @staticmethod
    def backward(ctx, dq, dk):
        cos3, sin3 = ctx.saved_tensors
        grads = [None if g is None else _apply(g, cos3, sin3, ctx.unsqueeze_dim, True)
                 for g in (dq, dk)]
        return grads[0], grads[1], None, None, None


def _apply(x, cos3, sin3, unsqueeze_dim, backward: bool) -> torch.Tensor:
    out_dtype = torch.promote_types(x.dtype, cos3.dtype)
    y = triton_kernels().rope(_as_bhsd(x, unsqueeze_dim), cos3, sin3, backward, out_dtype)
    return y if unsqueeze_dim == 1 else y.transpose(1, 2)


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     unsqueeze_dim: int = 1, *, impl: str | None = None):
    """(q_embed, k_embed) as transformers' ``apply_rotary_pos_emb(q, k, cos, sin)``.

    q [B, Hq, S, D], k [B, Hk, S, D] (or [B, S, H, D] with unsqueeze_dim=2); cos, sin [B, S, D]
    or [1, S, D]. Other layouts, and cos/sin requiring grad, run the PyTorch composite.
    ``impl`` forces "torch" or "triton"; None picks by ``memsched.kernels.backend``.
    """
    grad_tables = cos.requires_grad or sin.requires_grad
    fits = _tables_fit(q, k, cos, unsqueeze_dim) and sin.shape == cos.shape
    if grad_tables or not use_triton(impl, q, k, cos, sin) or not fits:
        return rotary_embedding_torch(q, k, cos, sin, unsqueeze_dim)
    return _Rotary.apply(q, k, cos, sin, unsqueeze_dim)
