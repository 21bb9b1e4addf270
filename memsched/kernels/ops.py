"""The kernels as operators of their own (``torch.ops.memsched.*``), for captured graphs.

A pattern found in the graph (frontend/kernel_patterns.py) becomes one node calling one of these
operators instead of the chain of ATen ops it replaces. As torch.library custom ops they have a
fake implementation (shapes for tracing and planning), a registered backward (so the joint
forward+backward trace shows one backward node per kernel, not the chain's decomposed
gradient) and a name a plan file can hold (``memsched::rms_norm``). Each call picks Triton or
the PyTorch fallback as the functions of this package do (``backend``).

- ``rms_norm(x, x_stats, weight, eps, cast) -> (y, rstd)``: ``y = weight * (x * rstd).to(cast)``
  with ``rstd = rsqrt(mean(x_stats**2, -1) + eps)``; x_stats is x again (the tensor the
  statistics read), a second input so that the backward returns x's gradient in the two parts
  the composite's autograd adds one after the other (bit for bit the same sums). x is float32,
  or 16-bit with x_stats the same tensor (the model's upcast, absorbed: the op upcasts and
  saves x at 16 bits; its gradient is then one part, summed in float32 and cast, as autograd
  does); cast None keeps float32, weight None for none. rstd
  ([..., 1], float32) is what the backward reads besides x and weight: the normalized values
  are not saved, they are rebuilt there.
- ``rope(x, cos, sin, transpose) -> y``: ``x * cos + rotate_half(x) * sin`` with cos/sin
  broadcast against x (the tables as transformers unsqueezes them); ``transpose`` applies the
  rotation's transpose, which is the backward. Gradients reach x only: the pattern is taken
  only where the tables need none.
"""
from __future__ import annotations

import torch

from ._select import triton_kernels, use_triton

_MAX_ROW = 65536  # the longest row a Triton norm program holds whole (_triton.MAX_ROW)
FALLBACK_BLOCK = 1 << 20   # elements of x a fallback norm works on at once (whole rows, one at least)


def _like(result: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """``result`` in ``layout``'s strides (what the op's fake implementation says it returns)."""
    if result.stride() == layout.stride():
        return result
    out = torch.empty_strided(layout.shape, layout.stride(), dtype=result.dtype, device=result.device)
    return out.copy_(result)


# ---------------------------------------------------------------- RMSNorm
def _norm_dtype(weight: torch.Tensor | None, cast: torch.dtype | None) -> torch.dtype:
    base = cast if cast is not None else torch.float32
    return base if weight is None else torch.promote_types(base, weight.dtype)


def _row_blocks(rows: int, n: int) -> list[tuple[int, int]]:
    """[a, b) ranges of rows, FALLBACK_BLOCK elements or fewer each (one row at least)."""
    step = max(1, FALLBACK_BLOCK // max(n, 1))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _blocked(*tensors: torch.Tensor) -> bool:
    """Large enough for the fallback to work on blocks of rows, and laid out for it."""
    x = tensors[0]
    return x.numel() > FALLBACK_BLOCK and all(t.is_contiguous() for t in tensors)


def _norm_on_triton(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    return 0 < x.numel() and x.shape[-1] <= _MAX_ROW and use_triton(None, x, weight)


def rms_composite(x, x_stats, weight, eps, cast):
    """The chain as models write it, op for op: its values and its layouts (x_stats narrower
    than float32: the model's upcast of x, absorbed, comes first)."""
    if x_stats.dtype != torch.float32:
        x = x_stats = x.to(torch.float32)
    rstd = torch.rsqrt(x_stats.pow(2).mean(-1, keepdim=True) + eps)
    y = x * rstd
    y = y.to(cast) if cast is not None else y
    return (weight * y if weight is not None else y), rstd


def _rms_rows(x, weight, eps, cast):
    """The composite on blocks of whole rows of a contiguous x: the same values, temporaries of
    a block's size."""
    n = x.shape[-1]
    x2 = x.view(-1, n)
    out = torch.empty(x2.shape, dtype=_norm_dtype(weight, cast), device=x.device)
    rstd = torch.empty(x2.shape[0], 1, dtype=torch.float32, device=x.device)
    for a, b in _row_blocks(*x2.shape):
        y, rstd[a:b] = rms_composite(x2[a:b], x2[a:b], None, eps, cast)
        if weight is not None:
            torch.mul(weight, y, out=out[a:b])
        else:
            out[a:b] = y
    return out.view(x.shape), rstd.view(*x.shape[:-1], 1)


@torch.library.custom_op("memsched::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, x_stats: torch.Tensor, weight: torch.Tensor | None, eps: float,
             cast: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    if _norm_on_triton(x, weight):
        n = x.shape[-1]
        w = weight if weight is not None else torch.ones(n, dtype=torch.float32, device=x.device)
        y, _, rstd = triton_kernels().norm_forward(x.reshape(-1, n).contiguous(), w, None, eps, True,
                                                   _norm_dtype(weight, cast))
        return _like(y.view(x.shape), x), rstd.view(*x.shape[:-1], 1)
    if x_stats is x and _blocked(x):
        return _rms_rows(x, weight, eps, cast)
    return rms_composite(x, x_stats, weight, eps, cast)


@rms_norm.register_fake
def _(x, x_stats, weight, eps, cast):
    return rms_composite(x, x_stats, weight, eps, cast)


def _rms_grad_composite(dy, x, weight, rstd, cast, split=True):
    """Autograd's steps for the composite, in its order: (dx through x_hat's numerator, dx
    through the statistics, dweight or None); not ``split`` (an upcast absorbed): (their sum
    cast to x's dtype, None, dweight), as autograd sums them in float32 before the cast's
    gradient."""
    narrow, x = x.dtype, x.to(torch.float32)
    dw = None
    if weight is not None:
        n = x * rstd
        n = n.to(cast) if cast is not None else n
        dw = (dy * n).sum_to_size(weight.shape).to(weight.dtype)
        dy = dy * weight
    if cast is not None:   # autograd hands the cast's input a gradient of the cast's dtype
        dy = dy.to(cast)
    dn = dy.to(torch.float32)
    dvar = (dn * x).sum(-1, keepdim=True) * -0.5 * rstd.pow(3)
    parts = dn * rstd, (dvar.expand_as(x) / x.shape[-1]) * (2.0 * x)
    return (parts[0], parts[1], dw) if split else ((parts[0] + parts[1]).to(narrow), None, dw)


def _rms_grad_rows(dy, x, weight, rstd, cast, split=True):
    """The same on blocks of whole rows of contiguous tensors; dweight is summed per block,
    then over blocks (eager's sum reassociated)."""
    n = x.shape[-1]
    x2, dy2, r2 = x.view(-1, n), dy.view(-1, n), rstd.view(-1, 1)
    dx = torch.empty_like(x2, dtype=torch.float32 if split else x.dtype)
    dx_stats = torch.empty_like(dx) if split else None
    dw = None
    for a, b in _row_blocks(*x2.shape):
        dx[a:b], stats_part, part = _rms_grad_composite(dy2[a:b], x2[a:b], weight, r2[a:b], cast, split)
        if split:
            dx_stats[a:b] = stats_part
        dw = part if dw is None else dw + part
    return dx.view(x.shape), None if dx_stats is None else dx_stats.view(x.shape), dw


@torch.library.custom_op("memsched::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
                      cast: torch.dtype | None, split: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx through x_hat's numerator, dx through the statistics, dweight); dweight is empty
    when there is no weight. ``split``: the parts stay apart so autograd adds them to x's other
    gradients in the order it adds the composite's; else (an upcast absorbed) dx is their sum in
    x's dtype and the second is empty."""
    if _norm_on_triton(x, weight):
        n = x.shape[-1]
        w = weight if weight is not None else torch.ones(n, dtype=torch.float32, device=x.device)
        dx, dw, _ = triton_kernels().norm_backward(
            dy.reshape(-1, n).contiguous(), x.reshape(-1, n).contiguous(), w, None,
            rstd.reshape(-1).contiguous(), False, split=split)
        dx, dx_stats = dx if split else (dx, None)
        layout = torch.empty_like(dy, dtype=x.dtype, device="meta")   # autograd's dx follows dy
        dw = dw.to(weight.dtype) if weight is not None else x.new_empty(0)
        return (_like(dx.view(x.shape), layout),
                x.new_empty(0) if dx_stats is None else _like(dx_stats.view(x.shape), layout), dw)
    grads = (_rms_grad_rows if _blocked(dy, x) else _rms_grad_composite)(dy, x, weight, rstd, cast, split)
    return tuple(x.new_empty(0) if g is None else g for g in grads)   # (an empty each: returns never alias)


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, cast, split):
    return tuple(x.new_empty(0) if g is None else g for g in _rms_grad_composite(dy, x, weight, rstd, cast, split))


def _rms_norm_setup(ctx, inputs, output):
    x, x_stats, weight, _eps, cast = inputs
    ctx.save_for_backward(x, weight, output[1])   # x at its own width: an absorbed upcast is redone
    ctx.cast, ctx.split = cast, x_stats.dtype == torch.float32
    ctx.mark_non_differentiable(output[1])


def _rms_norm_grad(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dx_stats, dw = torch.ops.memsched.rms_norm_backward(dy, x, weight, rstd, ctx.cast, ctx.split)
    dw = dw if weight is not None and ctx.needs_input_grad[2] else None
    return dx, (dx_stats if ctx.split else None), dw, None, None


rms_norm.register_autograd(_rms_norm_grad, setup_context=_rms_norm_setup)


# ---------------------------------------------------------------- rotary embedding
def _rope_layout(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> int | None:
    """The dim transformers unsqueezed the [B or 1, S, D] tables at (1: x is [B, H, S, D]; 2: x
    is [B, S, H, D]) when the tables broadcast that way; None for layouts the kernel lacks."""
    if x.dim() != 4 or cos.dim() != 4 or cos.shape != sin.shape or x.shape[-1] % 2:
        return None
    for dim in (1, 2):
        seq = 3 - dim
        if (cos.shape[dim] == 1 and cos.shape[seq] == x.shape[seq] and cos.shape[3] == x.shape[3]
                and cos.shape[0] in (1, x.shape[0])):
            return dim
    return None


def _rotate_half(x: torch.Tensor, transpose: bool) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1]; its transpose [x1, x2] -> [x2, -x1]."""
    half = x.shape[-1] // 2
    if transpose:
        return torch.cat((x[..., half:], -x[..., :half]), dim=-1)
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_composite(x, cos, sin, transpose):
    """The composite and autograd's gradient of it, in their order: their values and layouts."""
    if transpose:
        return _rotate_half(x * sin, True) + x * cos
    return x * cos + _rotate_half(x, False) * sin


@torch.library.custom_op("memsched::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    dim = _rope_layout(x, cos, sin)
    if dim is not None and x.numel() and use_triton(None, x, cos, sin):
        out_dtype = torch.promote_types(x.dtype, cos.dtype)
        cos3, sin3 = cos.squeeze(dim).contiguous(), sin.squeeze(dim).contiguous()
        x4 = (x if dim == 1 else x.transpose(1, 2)).contiguous()
        y = triton_kernels().rope(x4, cos3, sin3, transpose, out_dtype)
        y = y if dim == 1 else y.transpose(1, 2)
        # the composite's layout: x's going forward, contiguous (a cat's) going back
        return _like(y, torch.empty_like(x, dtype=out_dtype, device="meta")) if not transpose else y.contiguous()
    return rope_composite(x, cos, sin, transpose)


@rope.register_fake
def _(x, cos, sin, transpose):
    return rope_composite(x, cos, sin, transpose)


def _rope_setup(ctx, inputs, output):
    x, cos, sin, transpose = inputs
    if cos.requires_grad or sin.requires_grad:
        raise RuntimeError("memsched::rope gives no gradient to its cos/sin tables: the pattern "
                           "must not be taken where they require grad")
    ctx.save_for_backward(cos, sin)
    ctx.transpose = transpose


def _rope_grad(ctx, dy):
    cos, sin = ctx.saved_tensors
    return torch.ops.memsched.rope(dy, cos, sin, not ctx.transpose), None, None, None


rope.register_autograd(_rope_grad, setup_context=_rope_setup)
