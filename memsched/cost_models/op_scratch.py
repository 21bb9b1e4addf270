"""Bytes an op holds inside itself on a CPU, beside its inputs and outputs: measured once.

Many ATen kernels allocate what no graph value shows. oneDNN's convolutions reorder their input
and output to blocked layouts (a MobileNetV2 at memsched's minimum held 1.13x its budget, a
RegNet 1.25x), and their backward more (a CLIP's patch embedding: 1.7 MB beside 0.2 MB of
gradients, a training step 1.45x its budget); the CPU attention kernel keeps blocks of 256
queries by 512 keys per thread; a bfloat16 matmul packs its operands; an embedding's backward
sorts its indices beside a weight-sized buffer; ``_safe_softmax`` and the norms' backwards keep
temporaries; a dropout kept in a graph whole (a model in train mode called under no_grad) fills a
float buffer as large as its input before its mask. So every ATen op that is not a view,
pointwise (unless its tensors' dtypes differ) or mutating is measured:
it runs once on zero tensors of the node's shapes, strides and dtypes under the profiler's
allocator events, and what it held at most beyond its outputs is kept per op key and torch
thread count. The plan holds that many bytes while the op runs (passes/analysis.py: a storage
of the op's step alone; the IR's memory walk and the verifier read ``info(n).scratch``).
Pointwise ops of one dtype write their outputs only (the few bytes of a wrapped scalar are not
counted).
Random ops run with the CPU generator's state saved and put back, so the model's own draws are
the ones eager makes (an op handed a generator of its own is not run: it would advance it). An
op that fails on zeros (an assertion) counts none, with a warning naming it. A GPU's scratch is
not measured here.

The same run shows the storages the kernel gives its outputs. Some are larger than the op's
meta function traces (an embedding bag's ``offset2bag`` has one element more, left by a resize
down): ``hold_kernel_storages`` grows the traced storage to the kernel's, so the plan, the
verifier and the runtime's accountant all count the bytes the op really leaves behind.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings

import torch
import torch.fx as fx

from ..frontend.autocast import no_autocast
from ..ir.op_keys import node_op_key
from ..ir.tensors import tensor_leaves

aten = torch.ops.aten

_ATTENTION = frozenset({aten.scaled_dot_product_attention.default,
                        aten._scaled_dot_product_flash_attention_for_cpu.default})
_MEASURED: dict[tuple, tuple[int, tuple[int, ...] | None]] = {}
# (op key, torch threads) -> (scratch bytes, the kernel's storage bytes per output tensor)


def measured(node: fx.Node) -> bool:
    """Whether ``node``'s scratch is measured: an ATen op that computes (not a view, not
    pointwise), writes none of its inputs and is handed no generator of its own."""
    t = node.target
    return (node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t.namespace == "aten"
            and not t.is_view and (torch.Tag.pointwise not in t.tags or _mixed_dtypes(node))
            and not t._schema.is_mutable
            and not any(isinstance(a, torch.Generator) for a in (*node.args, *node.kwargs.values())))


def _mixed_dtypes(node: fx.Node) -> bool:
    """Tensors of more than one dtype: a CPU pointwise kernel first converts the others to the
    result's dtype, each in a buffer of its own (a bfloat16 times a float32 tensor: the bfloat16
    one as float32, beside the output; autocast's programs have many)."""
    return len({v.dtype for a in node.all_input_nodes for v in tensor_leaves(a.meta.get("val"))}) > 1


def op_scratch_bytes(node: fx.Node, device_type: str) -> int:
    """What ``node``'s op holds inside itself on ``device_type`` beyond its outputs (0 where
    not measured: another op, another device, arguments without traced values)."""
    return _measured(node, device_type)[0] + _recomputed_attention(node)


def _recomputed_attention(node: fx.Node) -> int:
    """memsched's attention backward (kernels/attention.py) runs the forward again, on any
    device: it holds that output and each row's float32 log-sum-exp while it runs."""
    if node.op != "call_function" or str(node.target) != "memsched.scaled_dot_product_attention_backward.default":
        return 0
    query, value = (a.meta.get("val") if isinstance(a, fx.Node) else None for a in (node.args[1], node.args[3]))
    if not isinstance(query, torch.Tensor) or not isinstance(value, torch.Tensor):
        return 0
    rows = query.numel() // max(query.shape[-1], 1)
    return rows * value.shape[-1] * query.element_size() + rows * 4


def hold_kernel_storages(node: fx.Node, device_type: str) -> None:
    """Grow each traced output storage of ``node`` that the kernel makes larger to the
    kernel's size (the traced values are fake: only their byte counts change)."""
    real = _measured(node, device_type)[1]
    traced = tensor_leaves(node.meta.get("val"))
    if real is None or len(real) != len(traced):   # None where a tensor was traced (no workspace)
        return
    for t, nbytes in zip(traced, real):
        storage = t.untyped_storage()
        if nbytes > storage.nbytes():
            storage.resize_(nbytes)


def _measured(node: fx.Node, device_type: str) -> tuple[int, tuple[int, ...] | None]:
    if device_type != "cpu" or not measured(node):
        return 0, None
    key = node_op_key(node)
    if key is None:
        return 0, None
    key = (key, torch.get_num_threads())
    if key not in _MEASURED:
        _MEASURED[key] = _measure(node)
    return _MEASURED[key]


def _zeros(v):
    if not isinstance(v, torch.Tensor):
        return v
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).zero_()


def _measure(node: fx.Node) -> tuple[int, tuple[int, ...] | None]:
    args, kwargs = fx.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    by_rows = _by_rows(node.target, args, kwargs)
    if by_rows is not None:
        return by_rows, None
    fake = args, kwargs
    args, kwargs = torch.utils._pytree.tree_map(_zeros, fake)
    if node.target in _SCATTERS:
        args = _scatter_mask_full(list(args))
    try:
        return _measure_call(node.target, args, kwargs)
    except _RefusedZeros:
        pass
    # an op that checks its data refuses zeros (linalg_lu_solve's pivots must be 1 or more, a
    # Cholesky a positive definite matrix): measured again on ones, then on identities
    for fill in (_ones, _identities):
        args, kwargs = torch.utils._pytree.tree_map(fill, fake)
        try:
            return _measure_call(node.target, args, kwargs)
        except _RefusedZeros as e:
            refused = e
    warnings.warn(f"memsched: could not measure what {node.target} holds inside itself on zeros, ones or "
                  f"identities of its shapes ({refused}); the plan counts none", RuntimeWarning, stacklevel=2)
    return 0, None


class _RefusedZeros(Exception):
    """The op raised on the values it was measured on (an assertion on its data)."""


def _ones(v):
    return v if not isinstance(v, torch.Tensor) else torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).fill_(1)


def _identities(v):
    """Identity matrices in the last two dims (ones elsewhere): square blocks are invertible."""
    if not isinstance(v, torch.Tensor) or v.dim() < 2 or not v.is_floating_point():
        return _ones(v)
    eye = torch.eye(v.shape[-2], v.shape[-1], dtype=v.dtype).expand(v.shape)
    return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).copy_(eye)


# What these hold grows with the positions their mask picks (the backward selects them into a
# buffer of its own); a mask of zeros picks none (measured so, a fused region holding the
# backward allocated 13.5 KiB against the 6.1 KiB counted: BLIP-2's training step), so they are
# measured picking as many as the source holds. Both take (self, mask, source or its sizes).
_SCATTERS = frozenset({aten.masked_scatter.default, aten.masked_scatter_backward.default})


def _scatter_mask_full(args: list) -> list:
    """``args`` with the mask (args[1]) true at its first positions, as many as the source
    (``args[2]``: a tensor, or the backward's sizes) fills where the mask broadcasts (an
    expanded mask is made true in what it expands, and expanded again)."""
    target_like, mask, source = args[0], args[1], args[2]
    n = source.numel() if isinstance(source, torch.Tensor) else math.prod(source)
    base_shape = [1 if stride == 0 else size for size, stride in zip(mask.shape, mask.stride())]
    count = math.prod(base_shape)
    spread = max(1, target_like.numel() // max(count, 1))   # elements each mask entry picks
    picked = torch.zeros(count, dtype=torch.bool)
    picked[:min(count, n // spread)] = True
    if base_shape != list(mask.shape):
        args[1] = picked.view(base_shape).expand(mask.shape)
    else:
        args[1] = torch.empty_strided(mask.shape, mask.stride(), dtype=torch.bool).copy_(picked.view(mask.shape))
    return args


def _measure_call(target, args, kwargs, warm: bool = True) -> tuple[int, tuple[int, ...] | None]:
    try:
        # a random op draws from a copy of the CPU generator's state: the model's draws stay eager's
        with torch.no_grad(), torch.random.fork_rng(devices=[]), no_autocast():   # the op as the program runs it
            if warm and target not in _ATTENTION:   # a first call: oneDNN's one-time allocations are not scratch
                target(*args, **kwargs)
            out, peak = allocator_peak(target, args, kwargs)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:   # an assertion on its data: zeros are not the model's
        raise _RefusedZeros(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}") from None
    made = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensor_leaves(out)}
    return max(peak - sum(made.values()), 0), tuple(t.untyped_storage().nbytes() for t in tensor_leaves(out))


# A matrix product's output rows are independent, so what its kernel holds beside them is a
# part that does not grow with the rows (packed weights, per-thread blocks) and a part that
# does (a bfloat16 GEMM accumulates its output in float32 beside it: 4 bytes an element).
# Run at full size, the largest products of a big model's config (an lm_head of 128256 x 8192
# over 512 tokens) took 36 s of a 4-layer plan on two cores, for planning alone. Above
# MAX_MEASURED_FLOPS such a product is measured at three small row counts instead: the first two
# give the line, the third must lie on it, and the line's value at the full rows, plus the
# distance the check allows (alignment: a few hundred bytes at some row counts), is the
# measure. Off the line (a kernel whose path turns on the row count) it is measured in full.
# Row counts are kept above one: a single row takes the matrix-vector path, which holds nothing.
MAX_MEASURED_FLOPS = 2e9
ROWS_MEASURED = (16, 32, 48)
_ROWS_OPERAND = {aten.linear.default: 0, aten.mm.default: 0, aten.addmm.default: 1, aten.matmul.default: 0}


def _by_rows(target, args: tuple, kwargs: dict) -> int | None:
    """The scratch of a large matrix product, measured at a few row counts and extended to its
    own along their line; None where it is not such a product or the line does not hold."""
    at = _ROWS_OPERAND.get(target)
    if at is None or kwargs or len(args) <= at + 1:
        return None
    x, w = args[at], args[at + 1]
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or x.dim() < 2 or w.dim() != 2:
        return None
    rows = x.numel() // x.shape[-1]
    if rows <= 2 * ROWS_MEASURED[-1] or 2 * rows * w.numel() <= MAX_MEASURED_FLOPS or not _rows_layout(x):
        return None
    held = []
    for i, r in enumerate(ROWS_MEASURED):   # one first call, at the fewest rows
        small = list(args)
        small[at] = _with_rows(x, r)
        try:
            held.append(_measure_call(target, tuple(_zeros(a) for a in small), {}, warm=i == 0)[0])
        except _RefusedZeros:
            return None   # measured in full, where a refusal is said
    (r0, r1, r2), (s0, s1, s2) = ROWS_MEASURED, held
    per_row = (s1 - s0) / (r1 - r0)
    if not any(held):
        return 0   # nothing at any row count: fp32 and fp16 products on this CPU
    line = s2 + per_row * (rows - r2)
    if per_row < 0 or abs(s1 + per_row * (r2 - r1) - s2) > _off_line(s2):
        return None
    return int(line + _off_line(line))


def _off_line(nbytes: float) -> float:
    return max(0.01 * nbytes, 4096)


def _rows_layout(x: torch.Tensor) -> bool:
    """Whether ``x``'s layout survives its leading sizes folded into rows: row-major, or a
    matrix stored by columns (a transposed operand); other layouts are measured whole (a
    permuted input is copied first, a cost that would not show at the small row counts)."""
    return x.is_contiguous() or (x.dim() == 2 and x.t().is_contiguous())


def _with_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """A traced stand-in for ``x`` with ``rows`` rows, in the same layout."""
    shape = (1,) * (x.dim() - 2) + (rows, x.shape[-1])
    if x.is_contiguous():
        return torch.empty(shape, dtype=x.dtype, device="meta")
    return torch.empty(shape[::-1], dtype=x.dtype, device="meta").t()


def allocator_peak(fn, args, kwargs=None) -> tuple[object, int]:
    """``fn(*args, **kwargs)`` and the most bytes the CPU allocator held at once during it
    beyond what was held before (torch.profiler's allocation events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args, **(kwargs or {}))
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and str(node.extra_fields.device) == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
    sizes, cur, peak = {}, 0, 0
    for _, size, ptr in sorted(events, key=lambda e: e[0]):
        if size > 0:
            sizes[ptr] = size
            cur += size
            peak = max(peak, cur)
        elif ptr in sizes:   # a free of a block allocated inside the call
            cur -= sizes.pop(ptr)
    return out, peak


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side prints its start and stop to file descriptor 2: hidden."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
