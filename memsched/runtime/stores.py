"""Tier stores: where bytes live off the device.

* ``DiskStore``: one real file per compiled program in the offload directory, carved into
  4 KiB-aligned regions (large aligned reads; no file per tensor). Freed regions are reused by
  size. The directory is removed when the store closes.
* ``HostPool``: host buffers for the host tier; pinned and reused by size when the device is
  CUDA (pin once, never per transfer), plain tensors on a CPU device.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from dataclasses import dataclass

import torch

ALIGN = 4096


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


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a dense CPU tensor's span, in memory order."""
    flat = t.detach().as_strided((t.numel(),), (1,), t.storage_offset())
    return flat.view(torch.uint8)


@dataclass
class Layout:
    """What is needed to rebuild a tensor exactly: sizes, strides, dtype."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, t: torch.Tensor) -> "Layout":
        if is_dense(t):
            return cls(tuple(t.size()), tuple(t.stride()), t.dtype)
        stride, acc = [], 1
        for size in reversed(t.size()):
            stride.append(acc)
            acc *= max(size, 1)
        return cls(tuple(t.size()), tuple(reversed(stride)), t.dtype)

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.size:
            numel *= s
        return numel * torch.empty((), dtype=self.dtype).element_size()

    def empty(self, device, pin_memory: bool = False) -> torch.Tensor:
        return torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=device,
                                   pin_memory=pin_memory)


def make_offload_dir(base: str | os.PathLike | None) -> str:
    """A fresh private directory under ``base`` (a temp dir by default); clear error if unwritable."""
    if base is not None:
        base = os.fspath(base)
        try:
            os.makedirs(base, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"offload_dir {base!r} cannot be created: {exc.strerror}") from exc
        if not os.path.isdir(base):
            raise ValueError(f"offload_dir {base!r} is not a directory")
        if not os.access(base, os.W_OK | os.X_OK):
            raise ValueError(f"offload_dir {base!r} is not writable")
    try:
        return tempfile.mkdtemp(prefix="memsched-", dir=base)
    except OSError as exc:
        raise ValueError(f"offload_dir {base!r} is not writable: {exc.strerror}") from exc


class DiskStore:
    """Regions of one file; reads and writes release the GIL (os.preadv / os.pwritev)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, "tensors.bin")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._end = 0
        self._free: dict[int, list[int]] = {}
        self._lock = threading.Lock()
        self.bytes_in_use = 0

    def allocate(self, nbytes: int) -> int:
        size = -(-max(nbytes, 1) // ALIGN) * ALIGN
        with self._lock:
            self.bytes_in_use += size
            spare = self._free.get(size)
            if spare:
                return spare.pop()
            offset, self._end = self._end, self._end + size
            return offset

    def release(self, offset: int, nbytes: int) -> None:
        size = -(-max(nbytes, 1) // ALIGN) * ALIGN
        with self._lock:
            self.bytes_in_use -= size
            self._free.setdefault(size, []).append(offset)

    def write(self, offset: int, t: torch.Tensor) -> None:
        data = byte_view(t).numpy()
        done = 0
        while done < len(data):
            done += os.pwritev(self.fd, [memoryview(data[done:])], offset + done)

    def read_into(self, offset: int, t: torch.Tensor) -> None:
        data = byte_view(t).numpy()
        done = 0
        while done < len(data):
            n = os.preadv(self.fd, [memoryview(data[done:])], offset + done)
            if n == 0:
                raise IOError(f"short read from {self.path} at offset {offset + done}")
            done += n

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        shutil.rmtree(self.directory, ignore_errors=True)


class HostPool:
    """Host-tier buffers, reused by (nbytes): pinned once on CUDA, plain memory on CPU."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.bytes_in_use = 0

    def take(self, layout: Layout) -> torch.Tensor:
        nbytes = layout.nbytes
        with self._lock:
            self.bytes_in_use += nbytes
            spare = self._free.get(nbytes)
            raw = spare.pop() if spare else None
        if raw is None:
            raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        n_el = max(nbytes // max(torch.empty((), dtype=layout.dtype).element_size(), 1), 0)
        return raw.view(layout.dtype)[:n_el].as_strided(layout.size, layout.stride)

    def give_back(self, t: torch.Tensor) -> None:
        raw = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
        with self._lock:
            self.bytes_in_use -= raw.numel()
            self._free.setdefault(raw.numel(), []).append(raw)
