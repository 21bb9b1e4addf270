"""Device-tier accounting: the bytes of every storage the runtime holds on the device.

Measured, not predicted: each tensor a program step produces is registered by its real
storage (views share it), and released when the program drops its last reference. On CUDA
``torch.cuda.max_memory_allocated`` is reported beside it.
"""
from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from ..ir.tensors import allocated
from ..ir.units import format_bytes
from ..errors import BudgetExceededError


class RecyclePool:
    """Fetch buffers kept for the next fetch of the same size, as a caching allocator would:
    a CPU device otherwise pays fresh pages (faults, zeroing) for every fetch. Idle bytes here
    count against the budget beside the held ones, and are dropped first when room is needed."""

    def __init__(self):
        self._free: dict[int, list[torch.Tensor]] = {}
        self.idle = 0

    def take(self, layout) -> torch.Tensor | None:
        nbytes = layout.nbytes
        spare = self._free.get(nbytes)
        if not spare:
            return None
        storage = spare.pop()
        self.idle -= nbytes
        return torch.empty(0, dtype=layout.dtype, device=storage.device).set_(storage, 0, layout.size, layout.stride)

    def give(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()  # the bytes, kept without a tensor over them
        self._free.setdefault(storage.nbytes(), []).append(storage)
        self.idle += storage.nbytes()

    def trim(self, max_idle: int) -> None:
        for size in sorted(self._free, reverse=True):
            while self.idle > max_idle and self._free[size]:
                self._free[size].pop()
                self.idle -= size


class DeviceAccountant:
    """``block`` and ``workspace``: count as the device's allocator does (``Hardware``'s
    ``alloc_block_bytes`` and ``workspace_bytes`` on CUDA): each storage in whole blocks, and
    the library workspace held from the start."""

    def __init__(self, budget: int, pool: RecyclePool | None = None, reserve: int = 0, *,
                 block: int = 1, workspace: int = 0):
        self.budget, self.block = budget, block
        # idle pooled bytes stay within budget - reserve - held: a new allocation (at most
        # ``reserve`` bytes, made before it is tracked) then never takes real memory past the budget
        self.pool_cap = max(budget - reserve, 0)
        # storage address -> [nbytes, references, weak reference to the storage (its identity)]
        self._held: dict[int, list] = {}
        self.current = self.peak = workspace
        self.pool = pool
        self.recycle: dict[int, torch.Tensor] = {}  # fetch buffers to pool on their last release

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st.data_ptr()
        entry = self._held.get(key)
        if entry is not None and entry[2].expired():
            # the storage held at this address died without a release and the allocator gave
            # the address to a new one (CUDA does at once): the old bytes are gone, these are new
            del self._held[key]
            self.current -= entry[0]
            entry = None
        if entry is None:
            nbytes = allocated(st.nbytes(), self.block)
            if nbytes == 0:
                return
            self._held[key] = [nbytes, 1, StorageWeakRef(st)]
            self.current += nbytes
            if self.pool is not None and self.current + self.pool.idle > self.pool_cap:
                self.pool.trim(max(self.pool_cap - self.current, 0))
            self._check_peak()
        else:
            entry[1] += 1

    def _check_peak(self) -> None:
        if self.current > self.peak:
            self.peak = self.current
            if self.peak > self.budget:
                raise BudgetExceededError(
                    f"device bytes {format_bytes(self.peak)} passed the budget "
                    f"{format_bytes(self.budget)}: the plan under-counted; please report this"
                )

    def hold(self, nbytes: int) -> None:
        """Count ``nbytes`` not seen as tensors (a fused region's buffers while it runs);
        a negative count gives them back."""
        self.current += nbytes
        self._check_peak()

    def release(self, t: torch.Tensor) -> None:
        key = t.untyped_storage().data_ptr()
        entry = self._held.get(key)
        if entry is None:  # empty storages are never held
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]
            self.current -= entry[0]
            buf = self.recycle.pop(key, None) if self.recycle else None
            if buf is not None and self.current + self.pool.idle + entry[0] <= self.pool_cap:
                self.pool.give(buf)
