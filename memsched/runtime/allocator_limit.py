"""A hard stop on CUDA: the caching allocator refuses to reserve what a call may not take.

memsched counts its own tensors (accounting.py) and plans cuBLAS's workspace and the
allocator's 512-byte blocks, but an op's internal scratch is invisible to both. With
``hard_limit=True`` each call (a training step's forward and backward each) runs with the
caching allocator's per-process fraction lowered to the bytes others held when it began plus
the budget and a margin for the allocator's segments, and the fraction it had restored after:
an allocation past that fails at once, raised as BudgetExceededError, instead of taking memory
past the budget unseen. The limit is on reserved memory (whole segments), hence the margin.
"""
from __future__ import annotations

import torch

from ..errors import BudgetExceededError
from ..ir.units import format_bytes

# reserved memory comes in segments (2 MiB for small blocks, 20 MiB or the request rounded to
# 2 MiB for large ones): room for a few partly used ones beside the budget
SEGMENT_MARGIN = 64 << 20


class AllocatorLimit:
    """``with AllocatorLimit(device, budget, held):`` where ``held`` is what memsched counts
    of the bytes allocated on ``device`` when the call begins (the rest is someone else's)."""

    def __init__(self, device: torch.device, budget: int, held: int):
        self.device, self.budget = device, budget
        props = torch.cuda.get_device_properties(device)
        self.total = int(props.total_memory)
        others = max(int(torch.cuda.memory_allocated(device)) - held, 0)
        self.limit = min(others + budget + SEGMENT_MARGIN, self.total)
        self._before: float | None = None

    def __enter__(self) -> AllocatorLimit:
        self._before = torch.cuda.get_per_process_memory_fraction(self.device)
        torch.cuda.set_per_process_memory_fraction(min(self.limit / self.total, self._before), self.device)
        return self

    def __exit__(self, kind, exc, tb) -> None:
        torch.cuda.set_per_process_memory_fraction(self._before, self.device)
        if isinstance(exc, torch.OutOfMemoryError):
            raise BudgetExceededError(
                f"the CUDA caching allocator refused an allocation past memsched's hard limit of "
                f"{format_bytes(self.limit)} (the budget {format_bytes(self.budget)}, what others held when "
                f"the call began, and {format_bytes(SEGMENT_MARGIN)} for its segments): an op needed memory "
                f"the plan does not count ({str(exc).splitlines()[0][:200]})") from exc
