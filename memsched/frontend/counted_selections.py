"""Selections by a mask that the call's inputs alone decide, traced at the count they give.

``hidden[~bool_masked_pos].reshape(batch, -1, dim)`` (VideoMAE's and Hiera's encoders keep the
visible patches so), ``x[mask]``, ``masked_select`` and ``nonzero`` make a tensor as long as the
mask's count: a size made from data, which torch's tracer leaves symbolic and memsched cannot
plan. Yet where the mask is made from the call's inputs alone (an input, or ops on inputs and
constants: no parameter, no activation, no random draw), its count is known before the model
runs, as a shape is. While a model is traced, such a selection reads its mask's count off the
call's own tensors (input_values.py) and picks through ``memsched::nonzero_counted`` at that count
(static sizes from there on); the compiled module keys its programs by the counts, so a call
whose mask holds another count gets another program, as another shape would.

A selection whose mask depends on anything else (routing by an activation, a mask drawn inside
the model) is left to torch, and capture refuses its size by name. A selection a later rewrite
replaced (a loss over it, masked_losses.py; CTC's targets, ctc_targets.py) leaves the traced
program with the rest of its dead code, and its guard with it: such a program runs for any count.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode

from ..kernels import counted  # noqa: F401  (registers torch.ops.memsched.nonzero_counted)
from .input_values import InputValues, ValueGuard

_COUNTED = torch.ops.memsched.nonzero_counted.default
_NONZERO = {torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere}
_MASKED_SELECT = {torch.masked_select, torch.Tensor.masked_select}


def kept_guards(graph: fx.Graph, guards: dict[int, ValueGuard]) -> tuple[ValueGuard, ...]:
    """The guards ``graph`` still depends on (once dead code is gone): every branch's, and the
    counts of the selections it still makes."""
    counted = {n.args[2] for n in graph.nodes if n.op == "call_function" and n.target is _COUNTED}
    return tuple(g for number, g in sorted(guards.items()) if g.reads != "count" or number in counted)


class CountedSelections(TorchFunctionMode):
    """The mode that traces selections as the module docstring says (entered on the thread
    that traces: torch function modes are per thread), reading counts through ``values``."""

    def __init__(self, values: InputValues):
        super().__init__()
        self.values = values

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__ and len(args) == 2 and not kwargs:
            index = self._counted_index(args[1])
            if index is not None:
                return func(args[0], index)
        elif func in _MASKED_SELECT and len(args) == 2 and not kwargs:
            x, mask = args
            if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and isinstance(x, torch.Tensor):
                shape = torch.broadcast_shapes(x.shape, mask.shape)
                at = self._positions(mask.expand(shape))
                if at is not None:
                    return x.expand(shape)[tuple(at.unbind(1))]
        elif func in _NONZERO and len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].dim() > 0 \
                and set(kwargs) <= {"as_tuple"}:
            at = self._positions(args[0])
            if at is not None:
                return tuple(at.unbind(1)) if kwargs.get("as_tuple") else at
        elif func is torch.where and len(args) == 1 and not kwargs and args[0].dim() > 0:
            at = self._positions(args[0])
            if at is not None:
                return tuple(at.unbind(1))
        return func(*args, **kwargs)

    def _counted_index(self, index):
        """``index`` with each boolean mask of more than zero dims replaced by its positions (as
        torch reads a mask among indices), or None where no mask is counted so."""
        items = index if isinstance(index, tuple) else (index,)
        out, counted = [], False
        for item in items:
            if isinstance(item, torch.Tensor) and item.dtype == torch.bool and item.dim() > 0:
                at = self._positions(item)
                if at is None:
                    return None
                out.extend(at.unbind(1))
                counted = True
            else:
                out.append(item)
        return tuple(out) if counted else None

    def _positions(self, mask: torch.Tensor):
        """``mask.nonzero()`` at the count the call's inputs give it, or None where they do not
        decide the mask alone."""
        read = self.values.count(mask)
        return None if read is None else _COUNTED(mask, read[1], read[0])
