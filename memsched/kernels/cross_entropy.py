"""The LM head and its cross-entropy in chunks of rows: the [N, vocab] logits never exist.

Forward: per chunk of ``chunk_size`` rows, logits = hidden @ weight.T (+ bias) with
torch.matmul, then per row the logsumexp (online, over vocabulary blocks in Triton) and the
loss. Only the per-row loss and logsumexp (float32, [N]) are kept. Backward recomputes each
chunk's logits, turns them in place into d loss / d logits = (softmax - onehot) * scale, and
multiplies back: grad_hidden[chunk] = dlogits @ weight, grad_weight += dlogits.T @ hidden[chunk].
Recomputing (one more matmul per chunk) rather than computing gradients in the forward keeps
the forward free of a [vocab, hidden] gradient buffer, which matters under a memory budget.
grad_weight and grad_bias accumulate in float32 across chunks, then take the weight's dtype.
Peak extra memory: a few [chunk_size, vocab] tensors (the chunk's logits and, in the fallback,
their float32 copy), plus the float32 [vocab, hidden] accumulator in backward.

Where the caller holds the full logits anyway (a model returning them beside its loss), they
can be passed as ``logits=``: forward and backward then read them in blocks of rows instead of
recomputing them, so no matmul is added, and the loss's own [N, vocab] values (its log-softmax,
their gradients) still never exist whole.
"""
from __future__ import annotations

import math

import torch

from ._select import triton_kernels, use_triton

REDUCTIONS = ("mean", "sum", "none")


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.matmul(h, weight.t()) if bias is None else torch.addmm(bias, h, weight.t())


def _chunk_loss_torch(logits, target, ignore_index):
    """PyTorch fallback of the per-chunk kernel: (loss, lse), float32 per row."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=1)
    valid = target != ignore_index
    x_t = x.gather(1, torch.where(valid, target, 0)[:, None])[:, 0]
    return torch.where(valid, lse - x_t, 0.0), lse


def _chunk_grad_torch(logits, target, lse, scale):
    """PyTorch fallback: (softmax - onehot(target)) * scale, in the logits' dtype. Ignored rows
    have scale 0, so their (clamped) onehot does not matter. Out of place: traced into a plan."""
    p = torch.exp(logits.float() - lse[:, None])
    p = p.scatter_add(1, target.clamp(min=0)[:, None], -(target >= 0).to(p.dtype)[:, None])
    return p.mul(scale[:, None]).to(logits.dtype)


def _row_views(logits: torch.Tensor, chunk: int, first: int = 0) -> list[tuple[int, torch.Tensor]]:
    """(first row, [rows, V] view) blocks of ``logits`` [..., V] in row order, at most ``chunk``
    rows each, none of them a copy: shifted logits (``logits[:, :-1]``) are no single [N, V]
    view, so those are cut along their leading dims first. (Decided from the strides, not by
    trying the view: a traced view that fails leaves its node in the graph.)"""
    if not _rows_merge(logits):
        per = math.prod(logits.shape[1:-1])
        return [b for i in range(logits.shape[0]) for b in _row_views(logits[i], chunk, first + i * per)]
    flat = logits.view(-1, logits.shape[-1])
    return [(first + s, flat[s:s + chunk]) for s in range(0, flat.shape[0], chunk)]


def _rows_merge(x: torch.Tensor) -> bool:
    """Can ``x`` [..., V] be viewed as [N, V]: do its leading dims (of more than one element)
    each step over the next one whole?"""
    dims = [(n, step) for n, step in zip(x.shape[:-1], x.stride()[:-1]) if n != 1]
    return all(outer == n * step for (_, outer), (n, step) in zip(dims, dims[1:]))


def _blocks(hidden, weight, bias, chunk, logits):
    """(rows, logits of those rows): read from the caller's ``logits`` when given, else
    computed one chunk at a time (each dropped before the next is made)."""
    if logits is not None:
        for start, block in _row_views(logits, chunk):
            yield slice(start, start + block.shape[0]), block
        return
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        yield rows, _logits(hidden[rows], weight, bias)


def _forward(hidden, weight, bias, target, chunk, ignore_index, triton, given=None):
    """Per-row loss and logsumexp, float32 [N], one chunk of logits at a time. Each chunk's
    rows are new tensors, concatenated at the end (no writes into slices of a buffer, so the
    loop traces into a graph a planner can schedule: passes/chunking.py)."""
    kernels = triton_kernels() if triton else None
    losses, lses = [], []
    for rows, logits in _blocks(hidden, weight, bias, chunk, given):
        run = kernels.ce_forward if triton else _chunk_loss_torch
        loss, lse = run(logits, target[rows], ignore_index)
        del logits
        losses.append(loss)
        lses.append(lse)
    return torch.cat(losses), torch.cat(lses)


def _backward(hidden, weight, bias, target, lse, scale, chunk, triton, needs, given=None):
    """(grad_hidden, grad_weight, grad_bias), recomputing each chunk's logits (or reading the
    ``given`` ones). The weight and bias gradients accumulate in place in one float32 buffer
    made by the first chunk."""
    want_h, want_w, want_b = needs
    grad_h, grad_w, grad_b = [], None, None
    kernels = triton_kernels() if triton else None
    for rows, logits in _blocks(hidden, weight, bias, chunk, given):
        h = hidden[rows]
        if triton and given is not None:
            logits = logits.clone()   # the Triton kernel turns its logits into gradients in place
        if triton:
            d = kernels.ce_backward_(logits, target[rows], lse[rows], scale[rows])
        else:
            d = _chunk_grad_torch(logits, target[rows], lse[rows], scale[rows])
        del logits
        if want_h:
            grad_h.append(torch.matmul(d, weight))
        if want_w:
            grad_w = _accumulate_weight_grad(grad_w, d, h)
        if want_b:
            part = d.sum(0, dtype=torch.float32)
            grad_b = part if grad_b is None else grad_b.add_(part)
    cast = lambda g, like: g.to(like.dtype) if g is not None else None  # noqa: E731
    return (torch.cat(grad_h) if want_h else None), cast(grad_w, weight), cast(grad_b, bias)


def _accumulate_weight_grad(acc: torch.Tensor | None, d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """acc + d.T @ h in float32; the first chunk makes the buffer, later ones add into it."""
    if acc is None:
        return torch.matmul(d.t(), h).float()
    if d.dtype == acc.dtype:
        return acc.addmm_(d.t(), h)
    return acc.add_(torch.matmul(d.t(), h).float())  # low precision: one product per chunk


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, chunk, ignore_index, reduction, triton, dtype, logits):
        loss, lse = _forward(hidden, weight, bias, target, chunk, ignore_index, triton, logits)
        valid = target != ignore_index
        ctx.save_for_backward(hidden, weight, bias, target, lse, valid, logits)
        ctx.options = (chunk, reduction, triton)
        if reduction == "none":
            return loss.to(dtype)
        total = loss.sum()
        return (total / valid.sum() if reduction == "mean" else total).to(dtype)

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, target, lse, valid, logits = ctx.saved_tensors
        chunk, reduction, triton = ctx.options
        scale = grad_out.float().expand(hidden.shape[0])
        if reduction == "mean":
            scale = scale / valid.sum()
        scale = torch.where(valid, scale, 0.0).contiguous()
        grads = _backward(hidden, weight, bias, target, lse, scale, chunk, triton,
                          ctx.needs_input_grad[:3], logits)
        return (*grads, None, None, None, None, None, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                               bias: torch.Tensor | None = None, *, chunk_size: int = 1024,
                               ignore_index: int = -100, reduction: str = "mean",
                               impl: str | None = None, dtype: torch.dtype | None = None,
                               logits: torch.Tensor | None = None) -> torch.Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, -2), target.flatten(), ...)``
    without the full logits: ``chunk_size`` rows of logits at a time, forward and backward.

    hidden [..., H], weight [V, H], bias [V] or None, target [...] (class indices). The loss
    has ``dtype`` (default: hidden's; it is computed in float32 either way); with
    reduction="none" target's shape. ``impl`` forces "torch" or
    "triton"; None picks by ``memsched.kernels.backend``. ``logits``: that linear's output
    [..., V] (rows as hidden's), when the caller holds it anyway; it is read, not recomputed,
    and gets no gradient (hidden, weight and bias get theirs).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    shape = target.shape
    h2d = hidden.reshape(-1, hidden.shape[-1])
    t1d = target.reshape(-1).contiguous()
    if h2d.shape[0] != t1d.shape[0]:
        raise ValueError(f"hidden has {h2d.shape[0]} rows but target {t1d.shape[0]} entries")
    if logits is not None:
        if logits.shape[-1] != weight.shape[0] or math.prod(logits.shape[:-1]) != h2d.shape[0]:
            raise ValueError(f"logits {tuple(logits.shape)} are not hidden {tuple(hidden.shape)} "
                             f"times weight {tuple(weight.shape)}.T")
        logits = logits.detach()
    triton = use_triton(impl, hidden, weight, target, bias)
    loss = _FusedLinearCrossEntropy.apply(h2d, weight, bias, t1d, chunk_size, ignore_index,
                                          reduction, triton, dtype or hidden.dtype, logits)
    return loss.reshape(shape) if reduction == "none" else loss
