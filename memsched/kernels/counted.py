"""A mask's nonzero positions as an operator whose output size is a number it is given.

``x[mask]``, ``masked_select`` and ``nonzero`` are sized by the mask's count, which torch's
tracer cannot know. Where the call's inputs alone decide the mask, capture reads its count off
them and names that count to this operator (frontend/counted_selections.py); the program is then
a program for inputs giving that count, keyed by it, as a shape keys one. ``guard`` numbers the
capture's count guards, so capture can tell which selections the traced program still makes.
A mask holding another count is refused here, before the positions are used: the key should have
sent such a call to another program.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("memsched::nonzero_counted", mutates_args=())
def nonzero_counted(mask: torch.Tensor, count: int, guard: int) -> torch.Tensor:
    """``mask.nonzero()`` (``[count, mask.dim()]``, row-major order) of a mask holding ``count``
    nonzero elements."""
    held = int(torch.count_nonzero(mask))
    if held != count:
        raise RuntimeError(f"memsched: a mask this program selects by holds {held} set elements where the "
                           f"program was captured for {count} (count guard {guard})")
    return torch.nonzero_static(mask, size=count)


@nonzero_counted.register_fake
def _(mask, count, guard):
    return mask.new_empty((count, mask.dim()), dtype=torch.long)
