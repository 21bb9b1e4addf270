"""Integers a model reads off tensors in Python, where the call's inputs alone make them.

``n = int(mask.sum(-1).max()); x[:, :n]``, ``x.split(lengths.tolist())`` (Qwen2-VL's vision
attention, one image at a time), ``torch.repeat_interleave(sizes, counts)``, ``rows.unique()``
(its places and counts too), a tensor handed to an op as a size (ViLT's
``interpolate(size=(h, w))`` of per-image patch counts, ``torch.multinomial(weights, n)``):
eager reads the values, a trace cannot, and
torch.export leaves a size made from them symbolic or refuses the model. Where the tensor is made
from the call's inputs alone, its value is read off the call's own tensors (input_values.py):
the program is traced with that number, and the compiled module keys its programs by it, a
program per value as per shape. (Only integers and booleans: a program per value of a float
would be planned again at nearly every call.) ``torch.tensor`` of zero-dim tensors, which eager
also reads value by value (Qwen2-VL's rope deltas), is their stack, traced, whatever made them.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .input_values import InputValues, ReadingMode

# ops taking sizes, where a zero-dim integer tensor gives its value (torch reads it inside)
_SIZED = (F.interpolate, F.pad, torch._C._nn.pad, torch.Tensor.view, torch.Tensor.reshape, torch.reshape,
          torch.Tensor.expand, torch.Tensor.repeat, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
          torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_empty, torch.Tensor.new_full,
          torch.narrow, torch.Tensor.narrow, torch.multinomial, torch.Tensor.multinomial)


class IntegerReads(ReadingMode):
    """The mode that traces integer reads as the module docstring says, reading values through
    ``values``."""

    def __init__(self, values: InputValues):
        super().__init__(values)
        self.handlers.update({torch.Tensor.tolist: self._tolist, torch.unique: self._unique,
                              torch.Tensor.unique: self._unique, torch.repeat_interleave: self._repeated,
                              torch.Tensor.repeat_interleave: self._repeated, torch.tensor: self._tensor_of_scalars})
        for f in (torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__index__):
            self.handlers[f] = self._integer
        for f in _SIZED:
            self.handlers[f] = self._sized

    def _integer(self, func, args, kwargs):
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            return None
        value = self.values.integer(args[0])
        return value if value is None or func is torch.Tensor.item else int(value)

    def _tolist(self, func, args, kwargs):
        if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
            return None
        return self.values.integers(args[0])

    def _unique(self, func, args, kwargs):
        """``t.unique()`` of a flattened tensor: its values, a constant of the program; where asked,
        each element's place among them (``return_inverse``) and how often each comes
        (``return_counts``), traced from that constant, so they hold eager's values too."""
        bound = dict(zip(("input", "sorted", "return_inverse", "return_counts", "dim"), args), **kwargs)
        t = bound.get("input")
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex \
                or bound.get("dim") is not None:
            return None
        values = self.values.integers(torch.unique(t, sorted=bound.get("sorted", True)).flatten())
        if values is None:
            return None
        unique = torch.tensor(values, dtype=t.dtype, device=t.device)
        out = [unique]
        if bound.get("return_inverse") or bound.get("return_counts"):
            if values == sorted(values) and t.dtype != torch.bool:
                inverse = torch.searchsorted(unique, t.contiguous())
            else:   # (eager's order, where it leaves them unsorted)
                inverse = (t.unsqueeze(-1) == unique).to(torch.int8).argmax(-1)
            if bound.get("return_inverse"):
                out.append(inverse)
            if bound.get("return_counts"):
                flat = inverse.flatten()
                out.append(torch.zeros(len(values), dtype=torch.long, device=t.device).index_add_(
                    0, flat, torch.ones_like(flat)))
        return out[0] if len(out) == 1 else tuple(out)

    def _repeated(self, func, args, kwargs):
        """``repeat_interleave`` by a tensor of repeats: its length, their sum, read off them."""
        if "output_size" in kwargs:
            return None
        bound = dict(zip(("input", "repeats", "dim"), args), **kwargs)
        repeats = bound.get("repeats", bound["input"] if len(bound) == 1 else None)
        if not isinstance(repeats, torch.Tensor) or repeats.dtype.is_floating_point:
            return None
        total = self.values.integer(repeats.sum())
        return None if total is None else func(*args, **kwargs, output_size=total)

    def _sized(self, func, args, kwargs):
        """The op with each zero-dim integer tensor given as a size (an argument past the tensor
        it acts on, or inside a tuple or list) read as its number, where the inputs make it."""
        changed = False

        def number(v):
            nonlocal changed
            if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.dtype.is_floating_point and v.dtype != torch.bool:
                value = self.values.integer(v)
                if value is not None:
                    changed = True
                    return int(value)
            return v

        def sizes(v):
            return type(v)(number(e) for e in v) if isinstance(v, (tuple, list)) else number(v)

        acted_on = 1 if args and isinstance(args[0], torch.Tensor) else 0
        new_args = args[:acted_on] + tuple(sizes(a) for a in args[acted_on:])
        new_kwargs = {k: sizes(v) for k, v in kwargs.items()}
        return func(*new_args, **new_kwargs) if changed else None

    def _tensor_of_scalars(self, func, args, kwargs):
        return _stacked(args[0], **kwargs) if args and _all_scalar_tensors(args[0]) else None


def _all_scalar_tensors(data) -> bool:
    """``data`` is a zero-dim tensor, or a (nested) list or tuple of them, one at least."""
    if isinstance(data, torch.Tensor):
        return data.dim() == 0
    return isinstance(data, (list, tuple)) and len(data) > 0 and all(_all_scalar_tensors(d) for d in data)


def _stacked(data, dtype=None, device=None, requires_grad=False, pin_memory=False):
    """``torch.tensor(data)`` of zero-dim tensors: the same values stacked, cut off from autograd
    as a new tensor is, in the dtype torch.tensor infers (the elements' promoted type)."""
    leaves = [data] if isinstance(data, torch.Tensor) else []
    stack = [] if leaves else [data]
    while stack:
        for d in stack.pop():
            (leaves if isinstance(d, torch.Tensor) else stack).append(d)
    if dtype is None:
        dtype = functools.reduce(torch.promote_types, [t.dtype for t in leaves])

    def build(d):
        return d.to(dtype) if isinstance(d, torch.Tensor) else torch.stack([build(e) for e in d])

    out = build(data).detach()
    out = out.to(device) if device is not None else out
    return out.requires_grad_() if requires_grad else out
