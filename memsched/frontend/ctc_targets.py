"""A model's CTC loss, traced with every size known before the model runs.

``F.ctc_loss`` lowers to ATen's ``_ctc_loss``, which torch's tracer refuses: it is tagged as
sized by data (its forward variables are as long as the longest target). Every CTC head in
transformers also hands it targets made by ``labels.masked_select(mask)``, one row whose length is
the mask's count, with ``target_lengths = mask.sum(-1)``. While a model is traced, a
``ctc_loss`` call is answered with ``torch.ops.memsched.ctc_loss`` (kernels/ctc.py) on targets
padded to one row per sample, whose sizes the inputs' shapes give:

- targets already ``[batch, S]``: taken as they are;
- targets made by ``labels.masked_select(mask)`` (``labels`` and ``mask`` ``[batch, S]``) with
  ``target_lengths`` made by ``mask.sum(-1)`` of that same mask: each row's kept labels moved to
  its front in order (a stable sort on the mask), the rest set to the blank. Row ``i`` then
  starts with the labels the one-row form gave sample ``i``, which is all the kernel reads, so
  the loss and its gradient are eager's bit for bit;
- one row of targets with ``target_lengths`` given as Python ints: cut at the lengths' offsets.

Any other call (one row of targets from elsewhere with lengths as tensors) is left to torch,
which refuses it by name. The reduction and ``zero_infinity`` are applied as ATen's
``ctc_loss`` applies them.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..kernels import ctc  # noqa: F401  (registers torch.ops.memsched.ctc_loss)
from .masked_losses import same_view

_SELECTS = {torch.masked_select, torch.Tensor.masked_select}
_SUMS = {torch.sum, torch.Tensor.sum}
_CTC = {F.ctc_loss, torch.ctc_loss}
_CASTS = {torch.Tensor.to, torch.Tensor.long, torch.Tensor.int, torch.Tensor.type}
_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}   # torch.ctc_loss's enum (torch.nn._reduction)


def static_ctc_loss() -> TorchFunctionMode:
    """The mode that traces ``ctc_loss`` calls as the module docstring says (entered on the
    thread that traces: torch function modes are per thread)."""
    return _StaticCTC()


class _StaticCTC(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.selected = {}   # id(result) -> (result, labels, mask): masked_select's rows
        self.counted = {}    # id(result) -> (result, mask): mask.sum(-1)
        self.cast = {}       # id(result) -> (result, mask): the mask as integers

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _CTC:
            loss = self._ctc(func, *args, **kwargs)
            if loss is not None:
                return loss
        out = func(*args, **kwargs)
        if func in _SELECTS and len(args) == 2 and not kwargs:
            self.selected[id(out)] = (out, args[0], args[1])
        elif func in _SUMS and _sums_last_dim(args, kwargs):
            self.counted[id(out)] = (out, self._as_mask(args[0]))
        elif func in _CASTS and _integer(out) and isinstance(args[0], torch.Tensor):
            self._follow_cast(args[0], out)
        return out

    def _as_mask(self, counted: torch.Tensor) -> torch.Tensor:
        entry = self.cast.get(id(counted))
        return entry[1] if entry is not None and entry[0] is counted else counted

    def _follow_cast(self, source: torch.Tensor, out: torch.Tensor) -> None:
        """``mask.long()`` counts as the mask, ``mask.sum(-1).int()`` as the count."""
        if source.dtype == torch.bool and source.dim() == 2:
            self.cast[id(out)] = (out, source)
        elif id(source) in self.counted and self.counted[id(source)][0] is source:
            self.counted[id(out)] = (out, self.counted[id(source)][1])

    def _ctc(self, func, log_probs, targets, input_lengths, target_lengths, blank=0, reduction="mean",
             zero_infinity=False):
        if func is torch.ctc_loss:
            reduction = _REDUCTIONS.get(reduction, reduction)
        if not isinstance(log_probs, torch.Tensor) or log_probs.dim() != 3 or reduction not in ("none", "mean", "sum") \
                or isinstance(input_lengths, torch.Tensor) != isinstance(target_lengths, torch.Tensor):
            return None   # torch's own error for lengths of two kinds
        padded = self._padded(targets, target_lengths, blank)
        if padded is None:
            return None
        device = log_probs.device
        input_lengths = torch.as_tensor(input_lengths, dtype=torch.long, device=device)
        target_lengths = torch.as_tensor(target_lengths, dtype=torch.long, device=device)
        nll, _ = torch.ops.memsched.ctc_loss(log_probs, padded, input_lengths, target_lengths, blank,
                                             bool(zero_infinity))
        if zero_infinity:
            nll = torch.where(nll == float("inf"), torch.zeros((), dtype=nll.dtype, device=device), nll)
        if reduction == "mean":
            return (nll / target_lengths.clamp_min(1)).mean()
        return nll.sum() if reduction == "sum" else nll

    def _padded(self, targets, target_lengths, blank: int):
        if not isinstance(targets, torch.Tensor):
            return None
        if targets.dim() == 2:
            return targets
        if targets.dim() != 1:
            return None
        if isinstance(target_lengths, (list, tuple)) and all(isinstance(n, int) for n in target_lengths):
            return _cut(targets, list(target_lengths), blank)
        selected = self.selected.get(id(targets))
        counted = self.counted.get(id(target_lengths))
        if selected is None or counted is None or selected[0] is not targets or counted[0] is not target_lengths:
            return None
        _, labels, mask = selected
        if not same_view(counted[1], mask) or not isinstance(labels, torch.Tensor) or labels.dim() != 2 \
                or tuple(mask.shape) != tuple(labels.shape) or mask.dtype != torch.bool:
            return None
        order = torch.argsort((~mask).to(torch.uint8), dim=-1, stable=True)   # kept first, in order
        kept = torch.gather(mask, -1, order)
        return torch.where(kept, torch.gather(labels, -1, order), torch.full((), blank, dtype=labels.dtype,
                                                                             device=labels.device))


def _integer(value) -> bool:
    return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and not value.dtype.is_complex \
        and value.dtype != torch.bool


def _sums_last_dim(args, kwargs) -> bool:
    """``mask.sum(-1)`` (or ``dim=1``) of a [batch, S] tensor (the mask, or it as integers), no
    other argument."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 2 or args[0].is_floating_point():
        return False
    dims = list(args[1:]) + [v for k, v in kwargs.items() if k == "dim"]
    if len(dims) != 1 or len(args) + len(kwargs) != 2:
        return False
    dim = dims[0][0] if isinstance(dims[0], (list, tuple)) and len(dims[0]) == 1 else dims[0]
    return dim in (-1, 1)


def _cut(targets: torch.Tensor, lengths: list[int], blank: int) -> torch.Tensor | None:
    """One row of concatenated targets, ``lengths`` long each, as rows padded with the blank."""
    if any(n < 0 for n in lengths) or sum(lengths) > targets.shape[0]:
        return None
    width = max(lengths, default=0)
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    last = targets.shape[0] - 1
    index = [[min(s + min(j, max(n - 1, 0)), last) for j in range(width)] for s, n in zip(starts, lengths)]
    keep = [[j < n for j in range(width)] for n in lengths]
    device = targets.device
    rows = targets[torch.tensor(index, dtype=torch.long, device=device)] if sum(lengths) else \
        torch.full((len(lengths), width), blank, dtype=targets.dtype, device=device)
    return torch.where(torch.tensor(keep, device=device), rows,
                       torch.full((), blank, dtype=targets.dtype, device=device))
