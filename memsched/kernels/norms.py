"""RMSNorm and LayerNorm over the last dimension, forward and backward fused.

Triton: one program per block of rows holding whole rows; statistics (mean, 1/std) in float32
are saved for backward; dweight/dbias are summed per block by the kernel, then over blocks.
Fallback: the PyTorch composite (RMSNorm as LLaMA writes it, LayerNorm as F.layer_norm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._select import triton_kernels, use_triton
from .ops import rms_composite


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """The composite (transformers' LlamaRMSNorm): float32 statistics, weight * x_hat, as the
    graph op's fallback runs it (ops.py)."""
    return rms_composite(x, x, weight, eps, x.dtype)[0]


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, is_rms):
        n = x.shape[-1]
        x2d = x.reshape(-1, n).contiguous()
        w = weight if weight is not None else torch.ones(n, dtype=x.dtype, device=x.device)
        out_dtype = torch.promote_types(x.dtype, w.dtype)
        y, mean, rstd = triton_kernels().norm_forward(x2d, w, bias, eps, is_rms, out_dtype)
        ctx.save_for_backward(x2d, w, mean, rstd)
        ctx.has_bias = bias is not None
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, w, mean, rstd = ctx.saved_tensors
        dy2d = dy.reshape(x2d.shape).contiguous()
        dx, dw, db = triton_kernels().norm_backward(dy2d, x2d, w, mean, rstd, ctx.has_bias)
        want_w, want_b = ctx.needs_input_grad[1:3]
        dw = dw.to(w.dtype) if want_w else None
        db = db.to(w.dtype) if want_b else None
        return dx.reshape(dy.shape), dw, db, None, None


def _triton_fits(impl, x, *params) -> bool:
    fits = x.shape[-1] <= 65536 and x.numel() > 0
    return use_triton(impl, x, *params) and fits


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *,
             impl: str | None = None) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x**2, -1) + eps))`` with float32 statistics (LLaMA's RMSNorm).
    ``impl`` forces "torch" or "triton"; None picks by ``memsched.kernels.backend``."""
    if not _triton_fits(impl, x, weight):
        return rms_norm_torch(x, weight, eps)
    return _Norm.apply(x, weight, None, eps, True)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5, *, impl: str | None = None) -> torch.Tensor:
    """``F.layer_norm(x, x.shape[-1:], weight, bias, eps)`` with float32 statistics.
    ``impl`` forces "torch" or "triton"; None picks by ``memsched.kernels.backend``."""
    if not _triton_fits(impl, x, weight, bias):
        return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return _Norm.apply(x, weight, bias, eps, False)
