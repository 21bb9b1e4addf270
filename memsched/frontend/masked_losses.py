"""A loss over the elements a boolean mask picks, traced on the whole tensors.

``F.cross_entropy(logits[mask], labels[mask])`` (a token tagger's loss over real tokens, a masked
language model's over the masked positions, a masked MSE over the patches a mask hid) hands the
loss tensors as long as the mask's count: a size made from data, which memsched cannot plan. Yet
such a loss is, element for element, the loss of the whole tensors restricted to the mask. While
a model is traced, a loss from torch.nn.functional whose input and target were both picked by the
same mask (``x[mask]``, the mask over ``x``'s leading dimensions) is answered with that loss on the
whole tensors with ``reduction="none"``, zero where the mask is false, summed, and for
``reduction="mean"`` divided by what eager divides by: the picked samples that count
(cross-entropy: those whose label is not ``ignore_index``, or their class weights' sum) or the
picked elements. What the mask leaves out is replaced before the loss (a label out of range,
a NaN target, never read). Each element's loss is eager's; the sum adds the same values in
another order, and the mean's scale reaches each gradient at another step of the backward, so
the loss and the gradients may differ from eager's in their last bits.

The selection may be made by ``x[mask]``, ``x[torch.where(mask)]`` or ``x.masked_select(mask)``
(a mask of ``x``'s shape), and cast (``.float()``), put through pointwise ops
(``torch.sigmoid(x[mask])``, ``x[mask] - y[mask]``, ``** 0.5``) or reduced along its rows
(``.mean(-1, keepdim=True)``, ``.var(-1)``) before the loss; ``x[mask].sum()`` and ``.mean()`` are
taken the same way. The two selections' masks may be one tensor, two views of it, or made alike twice
(``labels != -100`` written at each selection: the same comparison of the same, unwritten tensors).
Taken: cross-entropy and NLL (class indices, optional class weights, or class probabilities;
no label smoothing) and the elementwise losses (MSE, L1, smooth L1, Huber, binary cross-entropy
with or without logits, no per-element weight). With ``reduction="none"`` the losses are a
selection again (of the whole tensors' losses), which a weighting and a sum or mean may follow.
Anything else is left to torch, and capture names the selection.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.overrides import TorchFunctionMode

_CLASS_LOSSES = {F.cross_entropy, F.nll_loss}
_ELEMENT_LOSSES = {F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
                   F.binary_cross_entropy_with_logits}
_LOSSES = _CLASS_LOSSES | _ELEMENT_LOSSES
_SIGNATURES = {f: inspect.signature(f) for f in _LOSSES}
_SELECTIONS = {torch.Tensor.__getitem__, torch.masked_select, torch.Tensor.masked_select}
_REDUCTIONS = {torch.sum, torch.Tensor.sum, torch.mean, torch.Tensor.mean}
_DIVISIONS = {torch.Tensor.__truediv__, torch.Tensor.div, torch.div}
_POWERS = {torch.Tensor.__pow__, torch.Tensor.pow, torch.pow}
# pointwise ops finite, with a finite derivative, at 0 (where a selection's whole is zeroed)
_AT_ONE = {torch.log, torch.sqrt, torch.rsqrt, torch.reciprocal, torch.Tensor.log, torch.Tensor.sqrt,
           torch.Tensor.rsqrt, torch.Tensor.reciprocal}
_POINTWISE = _DIVISIONS | _POWERS | _AT_ONE | {
    torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__mul__,
    torch.Tensor.__rmul__, torch.Tensor.__neg__, torch.Tensor.__abs__, torch.add, torch.sub, torch.mul, torch.neg,
    torch.abs, torch.square, torch.sigmoid, torch.tanh, torch.exp, torch.clamp, torch.relu, torch.Tensor.add,
    torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.neg, torch.Tensor.abs, torch.Tensor.square,
    torch.Tensor.sigmoid, torch.Tensor.tanh, torch.Tensor.exp, torch.Tensor.clamp, torch.Tensor.clamp_min,
    torch.Tensor.clamp_max, torch.Tensor.relu, F.relu, F.gelu, F.silu, F.softplus, F.logsigmoid, F.leaky_relu,
    F.elu, F.sigmoid, F.tanh}
# ops that make the same boolean mask again from the same inputs (comparisons, logic, views)
_MASK_MAKERS = {
    torch.Tensor.__eq__, torch.Tensor.__ne__, torch.Tensor.__lt__, torch.Tensor.__le__, torch.Tensor.__gt__,
    torch.Tensor.__ge__, torch.Tensor.__and__, torch.Tensor.__or__, torch.Tensor.__xor__, torch.Tensor.__invert__,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_and, torch.logical_or,
    torch.logical_not, torch.isnan, torch.isfinite, torch.Tensor.eq, torch.Tensor.ne, torch.Tensor.lt,
    torch.Tensor.le, torch.Tensor.gt, torch.Tensor.ge, torch.Tensor.logical_and, torch.Tensor.logical_or,
    torch.Tensor.logical_not, torch.Tensor.isnan, torch.Tensor.isfinite, torch.Tensor.bool, torch.Tensor.view,
    torch.Tensor.reshape, torch.Tensor.flatten}
_ROW_REDUCTIONS = {torch.Tensor.mean, torch.Tensor.sum, torch.Tensor.var, torch.Tensor.std, torch.Tensor.amax,
                   torch.Tensor.amin, torch.mean, torch.sum, torch.var, torch.std, torch.amax, torch.amin}
_CASTS = {torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.long,
          torch.Tensor.int, torch.Tensor.to, torch.Tensor.type}


def whole_tensor_masked_losses() -> TorchFunctionMode:
    """The mode that traces losses over masked selections as the module docstring says (entered
    on the thread that traces: torch function modes are per thread)."""
    return _MaskedLosses()


class _MaskedLosses(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.picked = {}   # id(x[mask]) -> (x[mask], x, mask)
        self.positions = {}   # id(mask.nonzero(as_tuple=True)) -> (those indices, mask)
        self.made = {}     # (op, its arguments, tensors by first equal) -> (the first result, arguments)
        self.first = {}    # id(a mask made again) -> (it, the first one made so)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOSSES:
            loss = self._loss(func, args, kwargs)
            if loss is not None:
                return loss
        if func in _REDUCTIONS and len(args) == 1 and not kwargs:
            x, mask = self._whole(args[0])
            if mask is not None and x.is_floating_point():
                return _reduced(func, x, mask)
        out = func(*args, **kwargs)
        if func in _ROW_REDUCTIONS and args and isinstance(out, torch.Tensor):
            whole = self._along_rows(func, args, kwargs)
            if whole is not None:
                self.picked[id(out)] = (out, *whole)
                return out
        if func in _SELECTIONS and len(args) == 2 and not kwargs:
            mask = self._as_mask(args[1])
            if _picks(func, args[0], mask):
                self.picked[id(out)] = (out, args[0], mask)
        elif _mask_positions(func, args, kwargs):
            self.positions[id(out)] = (out, args[0])
        elif func in _CASTS and args and isinstance(out, torch.Tensor):
            x, mask = self._whole(args[0])
            if mask is not None and out.shape == args[0].shape:   # the cast of the selection: a selection of the cast
                self.picked[id(out)] = (out, func(x, *args[1:], **kwargs), mask)
        elif func in _POINTWISE and isinstance(out, torch.Tensor):
            whole = self._pointwise(func, args, kwargs, out)
            if whole is not None:
                self.picked[id(out)] = (out, *whole)
        if func in _MASK_MAKERS and isinstance(out, torch.Tensor) and out.dtype == torch.bool:
            self._remember(func, args, kwargs, out)
        return out

    def _remember(self, func, args, kwargs, out) -> None:
        """``labels != -100`` written twice (once per selection) makes one mask twice: the same op
        on the same tensors (or on masks made so) and values gives the same elements."""
        if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return
        try:
            key = (func, tuple(("t", id(self._first(a)), a._version) if isinstance(a, torch.Tensor) else ("v", a)
                               for a in args),   # (a version: not the same values once written in place)
                   tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:   # an argument of no value to compare (a list)
            return
        if key in self.made:
            self.first[id(out)] = (out, self.made[key][0])
        else:
            self.made[key] = (out, args)   # (the arguments held: their ids stay theirs)

    def _first(self, t):
        entry = self.first.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else t

    def _same_mask(self, a, b) -> bool:
        return same_view(self._first(a), self._first(b))

    def _pointwise(self, func, args, kwargs, out):
        """A pointwise op of selections by one mask (and numbers, or tensors broadcast over the
        dimensions past the mask) is the selection of that op on the wholes, each set where the
        mask is false first (``torch.where``, whose backward passes nothing there: what the mask
        leaves out, a NaN target, reaches no gradient) to a value where the op is finite
        (``_fill``: no inf or NaN is made outside the mask either)."""
        wholes = [self._whole(a) for a in args]
        masks = [m for _, m in wholes if m is not None]
        if not masks or any(not self._same_mask(m, masks[0]) for m in masks) \
                or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return None
        mask, new = masks[0], []
        for i, (a, (x, m)) in enumerate(zip(args, wholes)):
            if m is not None:
                fill = _fill(func, i)
                if fill is None or a.dim() != out.dim() or not statically_known_true(a.shape[0] == out.shape[0]):
                    return None   # (its rows are the selection's; past them it may broadcast)
                new.append(_outside(mask.reshape(*mask.shape, *(1,) * (x.dim() - mask.dim())), x, fill))
            elif isinstance(a, torch.Tensor) and a.dim() > out.dim() - 1:
                return None   # it would broadcast against the selection's rows
            elif not isinstance(a, (torch.Tensor, int, float, bool)):
                return None
            else:
                new.append(a)
        return func(*new, **kwargs), mask

    def _along_rows(self, func, args, kwargs):
        """A reduction of a selection over its dimensions past the rows (``label.mean(-1,
        keepdim=True)``, a per-row variance) is the selection of that reduction of the whole."""
        x, mask = self._whole(args[0])
        if mask is None:
            return None
        dims = args[1] if len(args) > 1 else kwargs.get("dim")
        picked = args[0]
        dims = (dims,) if isinstance(dims, int) else dims
        if not isinstance(dims, (tuple, list)) or not dims or any(not isinstance(d, int) for d in dims) \
                or any(d % picked.dim() == 0 for d in dims) or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return None
        rows = mask.dim() - 1   # the whole's dims before the selection's second
        whole_dims = tuple(d % picked.dim() + rows for d in dims)
        zeroed = _outside(mask.reshape(*mask.shape, *(1,) * (x.dim() - mask.dim())), x, 0)
        rest = {k: v for k, v in kwargs.items() if k != "dim"}
        return func(zeroed, whole_dims, *args[2:], **rest), mask

    def _as_mask(self, index):
        """A boolean mask, or the positions ``torch.where(mask)`` gave (which pick as it does)."""
        entry = self.positions.get(id(index)) if isinstance(index, tuple) else None
        return entry[1] if entry is not None and entry[0] is index else index

    def _whole(self, value):
        entry = self.picked.get(id(value)) if isinstance(value, torch.Tensor) else None
        return entry[1:] if entry is not None and entry[0] is value else (None, None)

    def _loss(self, func, args, kwargs):
        try:
            bound = _SIGNATURES[func].bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        p = dict(bound.arguments)
        (x, mask), (t, target_mask) = self._whole(p["input"]), self._whole(p["target"])
        if mask is None or not self._same_mask(target_mask, mask) or p.get("size_average") is not None \
                or p.get("reduce") is not None or p["reduction"] not in ("mean", "sum", "none"):
            return None
        loss = (_class_loss if func in _CLASS_LOSSES else _element_loss)(func, p, x, t, mask)
        if loss is None or p["reduction"] != "none":
            return loss
        # the selection's own losses, for the model to hold (dead once a sum or mean of them is
        # taken on the whole): a selection of ``loss``, finite outside the mask
        out = func(*args, **kwargs)
        self.picked[id(out)] = (out, loss, mask)
        return out


def same_view(a, b) -> bool:
    """``a`` and ``b`` are one tensor's elements, seen alike: the same object, or views of one
    storage with one layout (``mask.view(-1)`` written twice)."""
    if a is b:
        return True
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
        and a.shape == b.shape and a.stride() == b.stride() and a.storage_offset() == b.storage_offset() \
        and torch._C._is_alias_of(a, b)


def _mask_positions(func, args, kwargs) -> bool:
    """``torch.where(mask)`` or ``mask.nonzero(as_tuple=True)``: one index tensor per dimension."""
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dtype != torch.bool:
        return False
    if func is torch.where:
        return len(args) == 1 and not kwargs
    return func in (torch.nonzero, torch.Tensor.nonzero) and len(args) == 1 and kwargs == {"as_tuple": True}


def _fill(func, position: int):
    """What a selection's whole holds outside the mask as argument ``position`` of ``func``: a
    value where the op and its derivative are finite (1 for a power's base, a divisor, a log's
    or root's argument; 0 elsewhere); None where none is taken (a selection as an exponent)."""
    if func in _POWERS:
        return 1 if position == 0 else None
    if func in _DIVISIONS:
        return 1 if position == 1 else 0
    return 1 if func in _AT_ONE else 0


def _picks(func, x, index) -> bool:
    """``x[index]`` picks by a boolean mask over ``x``'s leading dimensions (``masked_select``:
    over all of them, the same flat order)."""
    return isinstance(x, torch.Tensor) and isinstance(index, torch.Tensor) and index.dtype == torch.bool \
        and 1 <= index.dim() <= x.dim() and tuple(index.shape) == tuple(x.shape[:index.dim()]) \
        and (func is torch.Tensor.__getitem__ or index.dim() == x.dim())


def _reduced(func, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x[mask].sum()`` / ``.mean()`` on the whole tensor."""
    trailing = x.shape[mask.dim():]
    total = _outside(mask.reshape(*mask.shape, *(1,) * len(trailing)), x, 0).sum()
    if func in (torch.sum, torch.Tensor.sum):
        return total
    return total / (mask.sum() * math.prod(trailing))


def _class_loss(func, p: dict, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor):
    """Samples are the mask's positions; the classes x's one dimension after them."""
    lead = mask.dim()
    if x.dim() != lead + 1 or p.get("label_smoothing", 0.0) != 0.0:
        return None
    rows, picked = x.reshape(-1, x.shape[-1]), mask.reshape(-1)
    probabilities = t.is_floating_point()
    if probabilities and (tuple(t.shape) != tuple(x.shape) or func is not F.cross_entropy):
        return None
    if not probabilities and tuple(t.shape) != tuple(mask.shape):
        return None
    rows = _outside(picked[:, None], rows, 0)
    targets = _outside(picked[:, None], t.reshape(-1, t.shape[-1]), 0) if probabilities else \
        t.reshape(-1).masked_fill(~picked, p["ignore_index"])
    each = func(rows, targets, **_rest(p), reduction="none")
    if p["reduction"] == "none":
        return each.reshape(mask.shape)
    total = _outside(picked, each, 0).sum()
    if p["reduction"] == "sum":
        return total
    if probabilities:
        return total / picked.sum()
    counted = targets != p["ignore_index"]
    weight = p.get("weight")
    if weight is None:
        return total / counted.sum()
    return total / _outside(counted, weight[targets.masked_fill(~counted, 0)], 0).sum()


def _outside(mask: torch.Tensor, x: torch.Tensor, value) -> torch.Tensor:
    """``x`` where ``mask`` is, ``value`` elsewhere: what the mask leaves out (padding, missing
    labels as NaN, ids out of range) never reaches the loss, nor a gradient from it."""
    return torch.where(mask, x, torch.full((), value, dtype=x.dtype, device=x.device))


def _rest(p: dict) -> dict:
    return {k: v for k, v in p.items() if k not in ("input", "target", "size_average", "reduce", "reduction")}


def _element_loss(func, p: dict, x: torch.Tensor, t: torch.Tensor, mask: torch.Tensor):
    """Each element's loss, picked where the mask (broadcast over x's trailing dimensions) is."""
    if tuple(x.shape) != tuple(t.shape) or p.get("weight") is not None:
        return None
    trailing = x.shape[mask.dim():]
    pos_weight = p.get("pos_weight")
    if pos_weight is not None and pos_weight.dim() > len(trailing):   # it broadcasts against picked rows
        return None
    where = mask.reshape(*mask.shape, *(1,) * len(trailing))
    safe = 0.5 if func is F.binary_cross_entropy else 0   # a probability inside (0, 1)
    each = func(_outside(where, x, safe), _outside(where, t, safe), **_rest(p), reduction="none")
    if p["reduction"] == "none":
        return each
    total = _outside(where, each, 0).sum()
    if p["reduction"] == "sum":
        return total
    return total / (mask.sum() * math.prod(trailing))
