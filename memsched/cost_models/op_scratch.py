"""Bytes an op holds inside itself on a CPU, beside its inputs and outputs: measured once.

Some ATen kernels allocate what no graph value shows. oneDNN's convolutions reorder their input
and output to blocked layouts (measured here as large as the larger of the two: a MobileNetV2
at memsched's minimum held 1.13x its budget, a RegNet 1.25x); the CPU attention kernel keeps
blocks of 256 queries by 512 keys per thread. For the ops of ``SCRATCH_OPS`` the scratch is
measured: the op runs once on zero tensors of the node's shapes, strides and dtypes under the
profiler's allocator events, and what it held at most beyond its outputs is kept per op key
and torch thread count. The plan holds that many bytes while the op runs (passes/analysis.py:
a storage of the op's step alone; the IR's memory walk and the verifier read
``info(n).scratch``). Other ops' scratch stays uncounted; a GPU's is not measured here.
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.fx as fx

from ..ir.op_keys import node_op_key
from ..ir.tensors import tensor_leaves

aten = torch.ops.aten

SCRATCH_OPS = frozenset({
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
    aten._convolution.default, aten.conv_transpose1d.default, aten.conv_transpose2d.input,
    aten.conv_transpose3d.input, aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
})

_ATTENTION = frozenset({aten.scaled_dot_product_attention.default,
                        aten._scaled_dot_product_flash_attention_for_cpu.default})
_MEASURED: dict[tuple, int] = {}   # (op key, torch threads) -> bytes


def op_scratch_bytes(node: fx.Node, device_type: str) -> int:
    """What ``node``'s op holds inside itself on ``device_type`` beyond its outputs (0 where
    not measured: another op, another device, arguments without traced values)."""
    if device_type != "cpu" or node.op != "call_function" or node.target not in SCRATCH_OPS:
        return 0
    key = node_op_key(node)
    if key is None:
        return 0
    key = (key, torch.get_num_threads())
    if key not in _MEASURED:
        _MEASURED[key] = _measure(node)
    return _MEASURED[key]


def _measure(node: fx.Node) -> int:
    def zeros(v):
        if not isinstance(v, torch.Tensor):
            return v
        return torch.empty_strided(v.shape, v.stride(), dtype=v.dtype).zero_()

    args, kwargs = fx.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
    args, kwargs = torch.utils._pytree.tree_map(zeros, (args, kwargs))
    with torch.no_grad():
        if node.target not in _ATTENTION:   # a first call: oneDNN's one-time allocations are not scratch
            node.target(*args, **kwargs)
        out, peak = allocator_peak(node.target, args, kwargs)
    made = sum(t.untyped_storage().nbytes() for t in tensor_leaves(out))
    return max(peak - made, 0)


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
