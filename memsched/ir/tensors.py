"""Tensor helpers every layer shares: the leaves of a value, its storages and their bytes.

A storage is identified by ``StorageWeakRef`` (views share their base's), so device memory
is counted per storage, never per view."""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import FakeTensor
from torch.multiprocessing.reductions import StorageWeakRef


def tensor_leaves(val) -> list[torch.Tensor]:
    """The tensors in a value (a tensor, or a tuple/list/dict of them; None leaves skipped)."""
    if isinstance(val, torch.Tensor):
        return [val]
    return [x for x in pytree.tree_leaves(val) if isinstance(x, torch.Tensor)]


def on_storage(t: torch.Tensor, storage: torch.UntypedStorage) -> torch.Tensor:
    """A traced tensor with ``t``'s layout on ``storage``, made without dispatching an op (tens
    of thousands are made for a 7B model's repeated layers)."""
    meta = torch.empty(0, dtype=t.dtype, device="meta").set_(storage, t.storage_offset(), t.shape, t.stride())
    mode = getattr(t, "fake_mode", None)
    return FakeTensor(mode, meta, t.device) if mode is not None else meta


def storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (NotImplementedError, RuntimeError):  # sparse / opaque tensors: count the view
        return t.numel() * t.element_size()


def allocated(nbytes: int, block: int) -> int:
    """The bytes an allocator handing out whole blocks of ``block`` bytes takes for ``nbytes``."""
    return -(-nbytes // block) * block


def storage_key(t: torch.Tensor) -> StorageWeakRef:
    return StorageWeakRef(t.untyped_storage())


def storages(val) -> list[tuple[StorageWeakRef, int]]:
    """(storage identity, bytes) of every tensor leaf; views share their base's identity."""
    return [(storage_key(t), storage_nbytes(t)) for t in tensor_leaves(val)]


def distinct_storage_bytes(val) -> int:
    """Bytes of the distinct storages a value's tensors use."""
    return sum(dict(storages(val)).values())


def value_nbytes(val) -> int:
    """Bytes of a value's elements (a view counts what it shows, not its base)."""
    return sum(t.numel() * t.element_size() for t in tensor_leaves(val))


def is_dense(t: torch.Tensor) -> bool:
    """True when t covers exactly numel consecutive elements (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.size()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True
