"""Group-wise quantisation for the disk tier (FlexGen's compressed weights and KV cache).

A weight (or a KV cache) homed on disk may be kept there as 8-bit or 4-bit integers with one float32 scale
per group of ``GROUP`` consecutive values (symmetric: scale = max |x| / qmax), and widened back
to its own dtype when it is fetched. Disk traffic falls 4x (int8) or 8x (int4) against fp32,
at the price of rounding every weight to one of 255 (or 15) levels of its group: outputs are
no longer bit-exact, which is why it is off unless asked for (``compress_weights=``,
``compress_kv_cache=``).
"""
from __future__ import annotations

import torch

from ..ir.tensors import is_dense

GROUP = 64
QMAX = {8: 127, 4: 7}
MIN_NUMEL = 4096  # smaller weights (biases, norms) stay exact: they are a sliver of the bytes


def eligible(t: torch.Tensor) -> bool:
    """Floating-point weights large enough to matter, in whole groups."""
    return t.is_floating_point() and t.numel() >= MIN_NUMEL and t.numel() % GROUP == 0


def stored_nbytes(numel: int, bits: int) -> int:
    """Bytes the integers of ``numel`` values take (scales apart)."""
    return numel if bits == 8 else numel // 2


def quantize(t: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integers as uint8 bytes, per-group float32 scales) of t's values in row-major order."""
    x = t.detach().reshape(-1, GROUP).float()
    scale = x.abs().amax(dim=1, keepdim=True) / QMAX[bits]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale).clamp_(-QMAX[bits], QMAX[bits]).to(torch.int8)
    if bits == 8:
        return q.view(torch.uint8).reshape(-1), scale.reshape(-1)
    nibbles = (q + 8).to(torch.uint8).reshape(-1, 2)  # 1..15, two per byte
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).contiguous(), scale.reshape(-1)


CHUNK = 64 * GROUP * 16   # values widened at a time where the destination cannot take them in place


def dequantize_into(q: torch.Tensor, scale: torch.Tensor, bits: int, out: torch.Tensor) -> None:
    """Write the values ``quantize`` encoded into ``out`` (its own dtype and shape). No temporary
    grows with the tensor (on a CPU device a fetch's temporaries are memory the budget does not
    see): a contiguous float32 ``out`` is widened and scaled in place, any other in chunks."""
    scale = scale.to(out.device)
    if out.dtype == torch.float32 and out.is_contiguous():
        # the integers go into out and are scaled there (small integers and their products are
        # exact in float32: the same values as the chunked path)
        flat = out.view(-1)
        if bits == 8:
            flat.copy_(q.view(torch.int8))
        else:   # low nibble, high nibble, a chunk of bytes at a time (their nibbles are temporaries)
            pairs = flat.view(-1, 2)
            for start in range(0, q.numel(), CHUNK):
                part = q[start:start + CHUNK]
                pairs[start:start + CHUNK, 0].copy_(part & 0xF)
                pairs[start:start + CHUNK, 1].copy_(part >> 4)
            flat.sub_(8)
        flat.view(-1, GROUP).mul_(scale.view(-1, 1))
        return
    # other dtypes and layouts, a chunk at a time: the values come in row-major order, each put
    # where out's strides place it (out must be dense: its memory exactly its values)
    if not is_dense(out):
        raise ValueError(f"dequantize_into needs a destination whose memory holds exactly its values, got "
                         f"sizes {tuple(out.shape)} strides {tuple(out.stride())}")
    memory = out.as_strided((out.numel(),), (1,), out.storage_offset())
    per_byte = 1 if bits == 8 else 2
    for start in range(0, out.numel(), CHUNK):   # (start and CHUNK are whole groups)
        n = min(CHUNK, out.numel() - start)
        part = torch.empty(n, dtype=torch.float32, device=out.device)
        dequantize_into(q[start // per_byte:(start + n) // per_byte], scale[start // GROUP:(start + n) // GROUP],
                        bits, part)
        if out.is_contiguous():
            memory[start:start + n].copy_(part)
        else:
            memory.index_copy_(0, _offsets(out, start, n), part.to(out.dtype))


def _offsets(t: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Where t's values ``start`` to ``start + n`` (row-major order) lie in its memory."""
    index, offset = torch.arange(start, start + n, device=t.device), 0
    for size, stride in zip(reversed(t.shape), reversed(t.stride())):
        offset = offset + (index % size) * stride
        index = index // size
    return offset


def slices_align(t: torch.Tensor, dim: int) -> bool:
    """Whether each slice of t along ``dim`` is made of whole groups (the values after ``dim``
    come in multiples of ``GROUP``): a KV cache's new slots can then be quantised alone."""
    inner = 1
    for n in t.shape[dim + 1:]:
        inner *= n
    return t.is_contiguous() and inner % GROUP == 0


def quantize_slices(t: torch.Tensor, bits: int, dim: int, index: torch.Tensor):
    """The integers and scales of t's slices ``index`` along ``dim`` (``slices_align`` holds),
    shaped as those slices of the integer bytes and of the scales of all of t: (*t.shape[:dim],
    len(index), bytes per slice) and (*t.shape[:dim], len(index), groups per slice)."""
    part = t.index_select(dim, index)
    q, scale = quantize(part, bits)
    lead = (*t.shape[:dim], index.numel())
    return q.reshape(*lead, -1), scale.reshape(*lead, -1)
