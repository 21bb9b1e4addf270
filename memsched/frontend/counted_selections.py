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

from ..kernels import counted  # noqa: F401  (registers torch.ops.memsched.nonzero_counted)
from .input_values import InputValues, ReadingMode, ValueGuard

_COUNTED = torch.ops.memsched.nonzero_counted.default


def kept_guards(graph: fx.Graph, guards: dict[int, ValueGuard]) -> tuple[ValueGuard, ...]:
    """The guards ``graph`` still depends on (once dead code is gone): every value's but the
    counts of selections it no longer makes."""
    counted = {n.args[2] for n in graph.nodes if n.op == "call_function" and n.target is _COUNTED}
    return tuple(g for number, g in sorted(guards.items()) if g.reads != "count" or number in counted)


class CountedSelections(ReadingMode):
    """The mode that traces selections as the module docstring says, reading counts through
    ``values``."""

    def __init__(self, values: InputValues):
        super().__init__(values)
        self.handlers.update({torch.Tensor.__getitem__: self._indexed, torch.masked_select: self._masked_select,
                              torch.Tensor.masked_select: self._masked_select, torch.where: self._where})
        for f in (torch.nonzero, torch.Tensor.nonzero, torch.argwhere, torch.Tensor.argwhere):
            self.handlers[f] = self._nonzero

    def _indexed(self, func, args, kwargs):
        """``x[mask]``, the mask among other indices or not, as torch reads a mask: its positions."""
        if len(args) != 2 or kwargs:
            return None
        items = args[1] if isinstance(args[1], tuple) else (args[1],)
        index, counted = [], False
        for item in items:
            if isinstance(item, torch.Tensor) and item.dtype == torch.bool and item.dim() > 0:
                at = self._positions(item)
                if at is None:
                    return None
                index.extend(at.unbind(1))
                counted = True
            else:
                index.append(item)
        return func(args[0], tuple(index)) if counted else None

    def _masked_select(self, func, args, kwargs):
        if len(args) != 2 or kwargs or not all(isinstance(a, torch.Tensor) for a in args) \
                or args[1].dtype != torch.bool:
            return None
        shape = torch.broadcast_shapes(args[0].shape, args[1].shape)
        at = self._positions(args[1].expand(shape))
        return None if at is None else args[0].expand(shape)[tuple(at.unbind(1))]

    def _nonzero(self, func, args, kwargs):
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0 or set(kwargs) - {"as_tuple"}:
            return None
        at = self._positions(args[0])
        return None if at is None else tuple(at.unbind(1)) if kwargs.get("as_tuple") else at

    def _where(self, func, args, kwargs):
        """``torch.where(mask)`` alone: ``mask.nonzero(as_tuple=True)``."""
        return self._nonzero(func, args, {"as_tuple": True}) if len(args) == 1 and not kwargs else None

    def _positions(self, mask: torch.Tensor):
        """``mask.nonzero()`` at the count the call's inputs give it, or None where they do not
        decide the mask alone."""
        read = self.values.count(mask)
        return None if read is None else _COUNTED(mask, read[1], read[0])
