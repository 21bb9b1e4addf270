"""Device-tier accounting: the bytes of every storage the runtime holds on the device.

Measured, not predicted: each tensor a program step produces is registered by its real
storage (views share it), and released when the program drops its last reference. On CUDA
``torch.cuda.max_memory_allocated`` is reported beside it.
"""
from __future__ import annotations

import torch

from ..budget import format_bytes
from ..errors import BudgetExceededError


class DeviceAccountant:
    def __init__(self, budget: int):
        self.budget = budget
        self._held: dict[int, list[int]] = {}  # storage address -> [nbytes, references]
        self.current = 0
        self.peak = 0

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        entry = self._held.get(key)
        if entry is None:
            nbytes = st.nbytes()
            if nbytes == 0:
                return
            self._held[key] = [nbytes, 1]
            self.current += nbytes
            if self.current > self.peak:
                self.peak = self.current
                if self.peak > self.budget:
                    raise BudgetExceededError(
                        f"device bytes {format_bytes(self.peak)} passed the budget "
                        f"{format_bytes(self.budget)}: the plan under-counted; please report this"
                    )
        else:
            entry[1] += 1

    def release(self, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        entry = self._held.get(key)
        if entry is None:  # empty storages are never held
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]
            self.current -= entry[0]
