"""The Triton kernels and their launchers. Imported only when Triton runs (see ``_select``):
``triton.jit`` picks the compiler or the interpreter when this module is (re)loaded.

All arithmetic is in float32 whatever the storage dtype; rows are int64-indexed so offsets do
not overflow past 2**31 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRET = bool(triton.knobs.runtime.interpret)
MAX_BLOCK_V = 4096  # vocabulary columns a cross-entropy program holds at once
MAX_BLOCK_ELEMS = 4096  # elements (rows x columns) a row-block program holds at once
MAX_ROW = 65536  # longest row a norm program holds whole
# programs of a norm's backward, each summing dweight over its share of the rows: the partial
# sums are MAX_PARTIALS rows of float32 (1 MiB at 1024 columns), not one per row block
MAX_PARTIALS = 256


def _row_blocks(rows: int, cols: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, number of programs, num_warps) for row-block kernels."""
    block_n = triton.next_power_of_2(max(cols, 1))
    block_m = max(1, min(64, MAX_BLOCK_ELEMS // block_n))
    warps = 4 if block_m * block_n <= 2048 else 8 if block_m * block_n <= 8192 else 16
    return block_m, block_n, triton.cdiv(rows, block_m), warps


# ---------------------------------------------------------------- cross-entropy (one chunk)
@triton.jit
def _ce_fwd_kernel(logits, stride, target, loss, lse, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride
    m = float("-inf")
    s = 0.0
    for start in range(0, V, BLOCK_V):  # online logsumexp over vocabulary blocks
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    row_lse = m + tl.log(s)
    t = tl.load(target + row)
    valid = t != ignore_index
    x_t = tl.load(base + tl.where(valid, t, 0)).to(tl.float32)
    tl.store(loss + row, tl.where(valid, row_lse - x_t, 0.0))
    tl.store(lse + row, row_lse)


@triton.jit
def _ce_bwd_kernel(logits, stride, target, lse, scale, V, BLOCK_V: tl.constexpr):
    """d loss / d logits = (softmax - onehot(target)) * scale, written over the logits."""
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride
    t = tl.load(target + row)
    g = tl.load(scale + row)
    row_lse = tl.load(lse + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
        d = tl.exp(x - row_lse) - tl.where(cols == t, 1.0, 0.0)
        tl.store(base + cols, (d * g).to(logits.dtype.element_ty), mask=cols < V)


def ce_forward(logits: torch.Tensor, target: torch.Tensor, ignore_index: int):
    """Per-row loss and logsumexp (float32) of a [rows, V] chunk of logits."""
    rows, vocab = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(loss)
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    _ce_fwd_kernel[(rows,)](logits, logits.stride(0), target, loss, lse, vocab, ignore_index,
                            BLOCK_V=block)
    return loss, lse


def ce_backward_(logits: torch.Tensor, target: torch.Tensor, lse: torch.Tensor,
                 scale: torch.Tensor) -> torch.Tensor:
    """Overwrite ``logits`` with the loss gradient; ``scale`` is float32 per row (0: ignored)."""
    rows, vocab = logits.shape
    block = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    _ce_bwd_kernel[(rows,)](logits, logits.stride(0), target, lse, scale, vocab, BLOCK_V=block)
    return logits


# ---------------------------------------------------------------- RMSNorm / LayerNorm
@triton.jit
def _norm_fwd_kernel(x, w, b, y, mean, rstd, M, N, eps, IS_RMS: tl.constexpr,
                     HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows[:, None] * N + cols[None, :]
    xv = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
    if IS_RMS:
        xc = xv
    else:
        mu = tl.sum(xv, 1) / N
        xc = tl.where(mask, xv - mu[:, None], 0.0)
        tl.store(mean + rows, mu, mask=rows < M)
    r = tl.rsqrt(tl.sum(xc * xc, 1) / N + eps)
    tl.store(rstd + rows, r, mask=rows < M)
    out = xc * r[:, None] * tl.load(w + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        out += tl.load(b + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y + offs, out.to(y.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(dy, x, w, mean, rstd, dx, dx_stats, dw_part, db_part, M, N, BLOCKS, PROGRAMS,
                     IS_RMS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx for the row blocks pid, pid + PROGRAMS, ...; this program's partial sums of dw (and
    db) over its rows, so the partials take PROGRAMS rows whatever M. SPLIT (RMS only): dx in
    its two parts, through x_hat's numerator (dx) and through the statistics (dx_stats)."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    wv = tl.load(w + cols, mask=cols < N, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for blk in range(pid, BLOCKS, PROGRAMS):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & (cols < N)[None, :]
        offs = rows[:, None] * N + cols[None, :]
        xv = tl.load(x + offs, mask=mask, other=0.0).to(tl.float32)
        dyv = tl.load(dy + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rstd + rows, mask=rows < M, other=0.0)
        if IS_RMS:
            xhat = xv * r[:, None]
        else:
            mu = tl.load(mean + rows, mask=rows < M, other=0.0)
            xhat = tl.where(mask, (xv - mu[:, None]) * r[:, None], 0.0)
        g = dyv * wv[None, :]
        c2 = tl.sum(g * xhat, 1) / N
        if SPLIT:
            tl.store(dx + offs, (g * r[:, None]).to(dx.dtype.element_ty), mask=mask)
            tl.store(dx_stats + offs, (-(xhat * c2[:, None]) * r[:, None]).to(dx.dtype.element_ty), mask=mask)
        else:
            if IS_RMS:
                dxv = (g - xhat * c2[:, None]) * r[:, None]
            else:
                dxv = (g - (tl.sum(g, 1) / N)[:, None] - xhat * c2[:, None]) * r[:, None]
            tl.store(dx + offs, dxv.to(dx.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dyv * xhat, 0)
        if HAS_BIAS:
            db_acc += tl.sum(dyv, 0)
    tl.store(dw_part + pid * N + cols, dw_acc, mask=cols < N)
    if HAS_BIAS:
        tl.store(db_part + pid * N + cols, db_acc, mask=cols < N)


def norm_forward(x2d, weight, bias, eps: float, is_rms: bool, out_dtype: torch.dtype):
    """(y, mean or None, rstd) for a contiguous [M, N] input."""
    rows, cols = x2d.shape
    bm, bn, programs, warps = _row_blocks(rows, cols)
    y = torch.empty(rows, cols, dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    mean = None if is_rms else torch.empty_like(rstd)
    _norm_fwd_kernel[(programs,)](x2d, weight, bias if bias is not None else weight, y,
                                  mean if mean is not None else rstd, rstd, rows, cols, eps,
                                  IS_RMS=is_rms, HAS_BIAS=bias is not None,
                                  BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return y, mean, rstd


def norm_backward(dy2d, x2d, weight, mean, rstd, has_bias: bool, split: bool = False):
    """(dx, dw float32, db float32 or None) for contiguous [M, N] tensors; ``split`` (RMS):
    dx is the pair of its parts (through x_hat's numerator, through the statistics)."""
    rows, cols = x2d.shape
    bm, bn, blocks, warps = _row_blocks(rows, cols)
    programs = min(blocks, MAX_PARTIALS)
    dx = torch.empty_like(x2d)
    dx_stats = torch.empty_like(x2d) if split else None
    dw = torch.empty(programs, cols, dtype=torch.float32, device=x2d.device)
    db = torch.empty_like(dw) if has_bias else None
    _norm_bwd_kernel[(programs,)](dy2d, x2d, weight, mean if mean is not None else rstd, rstd,
                                  dx, dx_stats if split else dx, dw, db if db is not None else dw, rows, cols,
                                  blocks, programs, IS_RMS=mean is None, HAS_BIAS=has_bias, SPLIT=split,
                                  BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)
    return (dx, dx_stats) if split else dx, dw.sum(0), db.sum(0) if db is not None else None


# ---------------------------------------------------------------- rotary embedding
@triton.jit
def _rope_kernel(x, cos, sin, y, M, H, S, cos_sb, HALF, BACKWARD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows of x are (b, h, s); y = x*cos + rotate_half(x)*sin, or its transpose (BACKWARD)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < M)[:, None] & (cols < HALF)[None, :]
    xo = rows[:, None] * (2 * HALF) + cols[None, :]
    co = ((rows // (H * S)) * cos_sb + (rows % S) * (2 * HALF))[:, None] + cols[None, :]
    x1 = tl.load(x + xo, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + xo + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos + co, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos + co + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin + co, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin + co + HALF, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:  # rotate_half transposed: [g1, g2] -> [g2, -g1]
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:  # rotate_half: [x1, x2] -> [-x2, x1]
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(y + xo, y1.to(y.dtype.element_ty), mask=mask)
    tl.store(y + xo + HALF, y2.to(y.dtype.element_ty), mask=mask)


def rope(x4d, cos3d, sin3d, backward: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """x4d [B, H, S, D] contiguous; cos3d/sin3d [1 or B, S, D] contiguous."""
    b, h, s, d = x4d.shape
    rows = b * h * s
    bm, bh, programs, warps = _row_blocks(rows, d // 2)
    y = torch.empty(x4d.shape, dtype=out_dtype, device=x4d.device)
    cos_sb = 0 if cos3d.shape[0] == 1 else s * d
    _rope_kernel[(programs,)](x4d, cos3d, sin3d, y, rows, h, s, cos_sb, d // 2,
                              BACKWARD=backward, BLOCK_M=bm, BLOCK_H=bh, num_warps=warps)
    return y
