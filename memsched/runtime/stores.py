"""Tier stores: where bytes live off the device.

* ``DiskStore``: one real file per compiled module in the offload directory, carved into
  4 KiB-aligned regions (large aligned reads; no file per tensor). The file has no name: it
  is opened with ``O_TMPFILE`` (or unlinked right after it is opened) and its private
  directory is removed at once, so the kernel reclaims it on any exit, a SIGKILL included.
  Freed regions are merged with their free neighbours and reused; a free tail is cut off the
  file. Every region carries a checksum (xxh3-64) of the bytes written to it, checked on every read
  (lesson 10: what is read back is checked): a mismatch raises ``DiskIntegrityError`` naming
  the tensor (or the region's offset and size). OS errors (ENOSPC, EIO) and reads or writes
  that make no progress raise errors naming the offload directory; they never loop.
* ``HostPool``: host buffers for the host tier; pinned and reused by size when the device is
  CUDA (pin once, never per transfer), plain tensors on a CPU device.
* ``Stores``: the pool, the file and the homes of the model's tensors (their copies in the
  host and disk tiers) of one compiled module, shared by the executors of all its input
  signatures, so that each weight is written once, not once per signature. Each home keeps
  a fingerprint (the same checksum) of the model bytes it holds, re-checked on every call: weights changed
  in place through ``.data`` (which does not bump the version counter) are never served stale.
"""
from __future__ import annotations

import bisect
import contextlib
import errno
import mmap
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import xxhash

from ..cost_models.hardware import cpu_cores
from ..ir.kinds import OFF_DEVICE, Kind
from ..ir.tensors import is_dense
from . import quantize

ALIGN = 4096


class DiskIntegrityError(IOError):
    """Bytes read back from the offload file are not the bytes memsched wrote there."""


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a dense CPU tensor's span, in memory order."""
    flat = t.detach().as_strided((t.numel(),), (1,), t.storage_offset())
    return flat.view(torch.uint8)


def _buffer(t: torch.Tensor) -> memoryview:
    return memoryview(byte_view(t).numpy())


_ONE_SHOT = 64 << 10


def checksum(data: memoryview) -> int:
    """xxh3-64 of ``data``: a generation step checksums every KV-cache copy it patches and every
    region it reads, so speed matters (xxh3 runs about 4x faster than zlib's CRC-32 here). Large
    buffers go through ``update``, which releases the GIL in every xxhash from 3.0 (its one-shot
    functions held it before 4.x), so other threads run meanwhile. (cost_models/hardware._cached_bw
    times this hash to price reading the offload file back.)"""
    if len(data) <= _ONE_SHOT:
        return xxhash.xxh3_64_intdigest(data)
    h = xxhash.xxh3_64()
    h.update(data)
    return h.intdigest()


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
        return numel * self.dtype.itemsize

    def empty(self, device, pin_memory: bool = False) -> torch.Tensor:
        return torch.empty_strided(self.size, self.stride, dtype=self.dtype, device=device,
                                   pin_memory=pin_memory)


def in_layout(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A CPU tensor with t's values whose memory holds them in ``layout`` (t itself when it
    already does): the bytes a disk or host copy in that layout holds."""
    src = t.detach()
    if src.device.type != "cpu":
        src = src.cpu()
    if tuple(src.stride()) == layout.stride or src.numel() <= 1:
        return src
    out = layout.empty("cpu")
    out.copy_(src)
    return out


def write_fully(fd: int, data: memoryview, offset: int) -> None:
    """pwritev until every byte of ``data`` is at ``offset`` (a short write continues; a write
    that makes no progress is an EIO, never a loop)."""
    done = 0
    while done < len(data):
        n = os.pwritev(fd, [data[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"the write returned {n} after {done} of {len(data)} bytes")
        done += n


def read_fully(fd: int, data: memoryview, offset: int) -> int:
    """preadv until ``data`` is full or a read returns nothing; the bytes read."""
    done = 0
    while done < len(data):
        n = os.preadv(fd, [data[done:]], offset + done)
        if n <= 0:
            break
        done += n
    return done


def fingerprint(t: torch.Tensor, layout: Layout | None = None) -> int:
    """The checksum of t's bytes in ``layout`` (its own dense layout by default)."""
    return checksum(_buffer(in_layout(t, layout or Layout.of(t))))


_HASHERS: dict[int, ThreadPoolExecutor] = {}   # per process: a forked child has none of its threads
_HASHERS_LOCK = threading.Lock()
_PARALLEL_BYTES = 16 << 20   # below this, threads cost more than they save


def fingerprints(items: list[tuple[torch.Tensor, Layout | None]]) -> list[int]:
    """``fingerprint`` of each (tensor, layout), on up to 8 threads when there are many bytes:
    xxh3's ``update`` releases the GIL, and a model's weights checked at every call are
    hundreds of MB (one thread hashed GPT-2's 473 MB in 66 ms on an H200's host)."""
    threads = min(8, cpu_cores())
    if threads < 2 or len(items) < 2 or sum(t.numel() * t.element_size() for t, _ in items) < _PARALLEL_BYTES:
        return [fingerprint(t, layout) for t, layout in items]
    with _HASHERS_LOCK:
        pool = _HASHERS.get(os.getpid())
        if pool is None:
            _HASHERS.clear()
            pool = _HASHERS[os.getpid()] = ThreadPoolExecutor(threads, thread_name_prefix="memsched-hash")
    return list(pool.map(lambda item: fingerprint(*item), items))


# -- handles: where a value's copy lives off the device ----------------------------------------
@dataclass(eq=False)
class HostCopy:
    tensor: torch.Tensor
    layout: Layout
    ready: Future | None = None      # set while an offload is still filling it
    pooled: bool = True              # False for the model's own tensors (never returned)
    read_by: object = None           # the CUDA event of the latest device copy out of it


@dataclass(eq=False)
class DiskCopy:
    region: "Region"
    layout: Layout
    ready: Future | None = None
    owned: bool = True               # activation regions are released after use

    @property
    def offset(self) -> int:
        return self.region.offset


@dataclass(eq=False)
class QuantizedCopy:
    """A weight kept on disk as group-wise integers (runtime/quantize.py) and widened to its
    own dtype as it is read; its scales stay in host memory."""

    region: "Region"
    layout: Layout                   # the weight's own layout, what a fetch delivers
    bits: int
    store: "DiskStore"
    scale: torch.Tensor | None = None
    ready: Future | None = None

    @property
    def stored_nbytes(self) -> int:
        return self.region.nbytes

    def read_into(self, out: torch.Tensor) -> None:
        # widened from the file's pages (checksummed first): a temporary copy of the integers
        # would be memory the budget does not see on a CPU device
        with self.store.verified_bytes(self.region) as q:
            quantize.dequantize_into(q, self.scale, self.bits, out)


def make_offload_dir(base: str | os.PathLike | None) -> str:
    """A fresh private directory under ``base`` (a temp dir by default); clear error if unwritable."""
    if base is not None:
        base = os.fspath(base)
        if os.path.exists(base) and not os.path.isdir(base):   # (makedirs would say "File exists")
            raise ValueError(f"offload_dir {base!r} is a file, not a directory")
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


def _open_anonymous(directory: str) -> int:
    """A read-write file in ``directory`` that has no name: O_TMPFILE where the filesystem has
    it, else a file unlinked right after it is opened."""
    if hasattr(os, "O_TMPFILE"):
        try:
            return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
    path = os.path.join(directory, "tensors.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(path)
    return fd


class _Mapping:
    """A region's bytes through a shared memory map of the file: kept while the region lives,
    so the pages a patch touches fault in once, not at every patch."""

    def __init__(self, fd: int, offset: int, nbytes: int):
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        self.map = mmap.mmap(fd, offset + nbytes - start, offset=start)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8, count=nbytes, offset=offset - start)

    def close(self) -> None:
        self.bytes = None   # the map closes only once nothing views it
        try:
            self.map.close()
        except BufferError:
            pass   # a view still held elsewhere: the map goes with it (never written again)


@dataclass(eq=False)
class Region:
    """A 4 KiB-aligned extent of the offload file."""

    offset: int
    size: int                        # aligned extent
    nbytes: int                      # bytes a tensor there takes
    name: str | None = None          # the tensor it holds, for error messages
    digest: int | None = None        # checksum of the bytes written; None: never fully written
    owner: set | None = None         # the ledger of the call that allocated it, if any
    mapped: "_Mapping | None" = None  # its pages mapped, once slices were written (a KV cache's)

    def unmap(self) -> None:
        if self.mapped is not None:
            self.mapped.close()
            self.mapped = None

    def describe(self) -> str:
        what = f"tensor {self.name!r}" if self.name else "an activation"
        return f"{what} (region at offset {self.offset}, {self.nbytes} bytes)"


class DiskStore:
    """Regions of one unnamed file; reads and writes release the GIL (os.preadv / os.pwritev)."""

    def __init__(self, directory: str):
        self.directory = directory
        try:
            self.fd = _open_anonymous(directory)
        except OSError as exc:
            raise OSError(exc.errno, f"memsched cannot create its offload file in {directory}: "
                                     f"{exc.strerror}") from exc
        try:  # nothing is left behind in the offload directory, whatever way the process ends
            os.rmdir(directory)
        except OSError:
            pass  # removed at close
        self.path = f"{directory}/<unlinked offload file>"
        self._end = 0                                   # high-water mark of allocated extents
        self._free: list[tuple[int, int]] = []          # (offset, size), sorted by offset
        self._regions: dict[int, Region] = {}           # offset -> live region
        self._lock = threading.Lock()
        self._file_end = 0                              # bytes the file may hold
        self.bytes_in_use = 0

    @property
    def proc_path(self) -> str:
        """A path that opens the unnamed file while this process holds it (Linux)."""
        return f"/proc/self/fd/{self.fd}"

    @property
    def file_bytes(self) -> int:
        """The file's current size on disk (its apparent size)."""
        return os.fstat(self.fd).st_size if self.fd is not None else 0

    # -- allocation --------------------------------------------------------------------------
    def allocate(self, nbytes: int, name: str | None = None, owner: set | None = None) -> Region:
        size = -(-max(nbytes, 1) // ALIGN) * ALIGN
        with self._lock:
            offset = self._take(size)
            region = Region(offset, size, nbytes, name, None, owner)
            self._regions[offset] = region
            self.bytes_in_use += size
            if owner is not None:
                owner.add(region)
            return region

    def _take(self, size: int) -> int:
        best = None
        for i, (off, sz) in enumerate(self._free):
            if sz >= size and (best is None or sz < self._free[best][1]):
                best = i
                if sz == size:
                    break
        if best is not None:
            off, sz = self._free[best]
            if sz == size:
                del self._free[best]
            else:
                self._free[best] = (off + size, sz - size)
            return off
        if self._free and sum(self._free[-1]) == self._end:  # grow the free tail
            off, _ = self._free.pop()
        else:
            off = self._end
        self._end = off + size
        return off

    def release(self, region: Region) -> None:
        """Return a region (a no-op for one already released)."""
        with self._lock:
            if self._regions.get(region.offset) is not region:
                return
            del self._regions[region.offset]
            region.unmap()   # before the file is cut: a map past its end faults
            self.bytes_in_use -= region.size
            if region.owner is not None:
                region.owner.discard(region)
                region.owner = None
            region.digest = None
            off, size = region.offset, region.size
            i = bisect.bisect_left(self._free, (off, 0))
            if i < len(self._free) and self._free[i][0] == off + size:   # merge the next one
                size += self._free.pop(i)[1]
            if i > 0 and sum(self._free[i - 1]) == off:                  # merge the previous one
                off, prev = self._free.pop(i - 1)
                size += prev
                i -= 1
            if off + size == self._end:  # a free tail: cut it off the file
                self._end = off
                if self._file_end > off and self.fd is not None:
                    try:
                        os.ftruncate(self.fd, off)
                        self._file_end = off
                    except OSError:
                        pass
            else:
                self._free.insert(i, (off, size))

    # -- I/O ---------------------------------------------------------------------------------
    def _os_error(self, exc: OSError, doing: str, region: Region) -> OSError:
        hint = " (the disk is full: free space or choose another offload_dir)" if exc.errno == errno.ENOSPC else ""
        return OSError(exc.errno, f"memsched: {doing} {region.describe()} in the offload directory "
                                  f"{self.directory} failed: {exc.strerror}{hint}")

    def write(self, region: Region, t: torch.Tensor) -> None:
        data = _buffer(t)
        if len(data) != region.nbytes:
            raise ValueError(f"{len(data)} bytes do not fit {region.describe()}")
        region.digest = None  # until every byte landed: a failed write leaves it unreadable
        digest = checksum(data)
        try:
            write_fully(self.fd, data, region.offset)
        except OSError as exc:
            raise self._os_error(exc, "writing", region) from exc
        with self._lock:
            self._file_end = max(self._file_end, region.offset + len(data))
        region.digest = digest

    def write_slices(self, region: Region, shape, dtype: torch.dtype, dim: int, index: torch.Tensor,
                     new: torch.Tensor) -> None:
        """Overwrite the slices ``index`` along ``dim`` of a written region that holds a
        contiguous tensor of ``shape`` and ``dtype``, with ``new`` (a KV cache's new slots, or
        their integers when it is kept quantised): one strided copy
        through a shared memory map of the region, where a write call per byte span would take
        thousands (a slot of every batch row and head). The region stays unreadable until the
        caller sets its new checksum."""
        region.digest = None
        if region.nbytes == 0 or index.numel() == 0:
            return   # nothing to write (and an empty map cannot be made)
        self._mapped(region).view(dtype).view(shape).index_copy_(dim, index, new)

    def region_checksum(self, region: Region) -> int:
        """The checksum of a region's bytes as they are in the file (after ``write_slices``)."""
        return checksum(_buffer(self._mapped(region))) if region.nbytes else checksum(b"")

    def _mapped(self, region: Region) -> torch.Tensor:
        """The region's bytes through its memory map (made at first use)."""
        if os.fstat(self.fd).st_size < region.offset + region.nbytes:   # the map would fault (SIGBUS)
            region.unmap()
            raise DiskIntegrityError(f"memsched: the offload file in {self.directory} ends before "
                                     f"{region.describe()}: it was truncated by another process")
        try:
            if region.mapped is None:
                region.mapped = _Mapping(self.fd, region.offset, region.nbytes)
        except OSError as exc:
            raise self._os_error(exc, "mapping", region) from exc
        return region.mapped.bytes

    def _never_written(self, region: Region) -> DiskIntegrityError:
        return DiskIntegrityError(f"memsched: {region.describe()} in the offload directory {self.directory} was "
                                  "never completely written (or was released)")

    def _mismatch(self, region: Region) -> DiskIntegrityError:
        return DiskIntegrityError(
            f"memsched: checksum mismatch reading {region.describe()} from the offload file in "
            f"{self.directory}: the bytes on disk are not the ones written (file corrupted or "
            "changed by another process)")

    def read_into(self, region: Region, t: torch.Tensor) -> None:
        if region.digest is None:
            raise self._never_written(region)
        data = _buffer(t)
        try:
            done = read_fully(self.fd, data, region.offset)
        except OSError as exc:
            raise self._os_error(exc, "reading", region) from exc
        if done < len(data):
            raise DiskIntegrityError(
                f"memsched: reading {region.describe()} from the offload file in {self.directory} got "
                f"{done} of {len(data)} bytes: the file was truncated or the read made no progress")
        if checksum(data) != region.digest:
            raise self._mismatch(region)

    @contextlib.contextmanager
    def verified_bytes(self, region: Region):
        """The region's bytes where they are, through its memory map, checked as ``read_into``
        checks a read: no copy in memory (a compressed home is widened straight from them).
        A map made for this is closed after, so the pages leave the process again."""
        if region.digest is None:
            raise self._never_written(region)
        made = region.mapped is None
        try:
            data = self._mapped(region)
            if checksum(_buffer(data)) != region.digest:
                raise self._mismatch(region)
            yield data
        finally:
            data = None
            if made:
                region.unmap()

    def close(self) -> None:
        with self._lock:
            for region in self._regions.values():
                region.unmap()
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            self._regions.clear()
            self._free.clear()
            self._end = self._file_end = self.bytes_in_use = 0
        shutil.rmtree(self.directory, ignore_errors=True)


class HostPool:
    """Host-tier buffers, reused by (nbytes): pinned once on CUDA, plain memory on CPU.

    A buffer may come back while a device copy still reads it (the copy is ordered on the GPU,
    not on the CPU): it comes back with that copy's event, and whoever takes it next waits on
    the event before writing into it (a disk read into a staging buffer, an offload)."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self._free: dict[int, list[tuple[torch.Tensor, object]]] = {}  # size -> [(raw, read by)]
        self._out: dict[int, tuple[torch.Tensor, dict | None]] = {}  # address -> (raw, owner)
        self._lock = threading.Lock()
        self.bytes_in_use = 0
        self.idle_bytes = 0
        self.peak_in_use = 0  # the most bytes out at once since the last ``new_call``

    def take(self, layout: Layout, owner: dict | None = None) -> torch.Tensor:
        nbytes = layout.nbytes
        cap = max(nbytes, 16)  # every buffer has its own address, empty ones too
        with self._lock:
            spare = self._free.get(cap)
            raw, reader = spare.pop() if spare else (None, None)
            if raw is not None:
                self.idle_bytes -= cap
        if reader is not None:
            reader.synchronize()  # the last device copy out of it has finished reading
        if raw is None:
            raw = torch.empty(cap, dtype=torch.uint8, pin_memory=self.pinned)
        key = raw.data_ptr()
        with self._lock:
            self._out[key] = (raw, owner)
            self.bytes_in_use += raw.numel()
            self.peak_in_use = max(self.peak_in_use, self.bytes_in_use)
            if owner is not None:
                owner[key] = raw
        n_el = max(nbytes // max(layout.dtype.itemsize, 1), 0)
        return raw.view(layout.dtype)[:n_el].as_strided(layout.size, layout.stride)

    def _untrack(self, t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        with self._lock:
            entry = self._out.pop(key, None)
            if entry is None:
                return None
            raw, owner = entry
            self.bytes_in_use -= raw.numel()
            if owner is not None:
                owner.pop(key, None)
            return raw

    def give_back(self, t: torch.Tensor, read_by=None) -> None:
        """Return a buffer to the pool (a no-op for one already returned); ``read_by``: the
        event of a device copy that may still be reading it."""
        raw = self._untrack(t)
        if raw is not None:
            with self._lock:
                self._free.setdefault(raw.numel(), []).append((raw, read_by))
                self.idle_bytes += raw.numel()

    def disown(self, t: torch.Tensor) -> None:
        """The buffer is the caller's now: it leaves the pool's accounting for good."""
        self._untrack(t)

    def new_call(self) -> None:
        """A call starts: idle buffers beyond what the last call had out at once are dropped, so
        a module called with changing shapes does not keep (or pin) every size it ever used,
        while a call like the last one reuses its buffers without pinning anew."""
        with self._lock:
            keep, self.peak_in_use = self.peak_in_use, self.bytes_in_use
        self.trim(max(keep - self.bytes_in_use, 0))

    def trim(self, max_idle: int = 0) -> None:
        """Drop idle buffers until at most ``max_idle`` bytes stay pooled."""
        with self._lock:
            for size in sorted(self._free, reverse=True):
                while self.idle_bytes > max_idle and self._free[size]:
                    self._free[size].pop()
                    self.idle_bytes -= size


# -- the homes of the model's tensors, shared by every signature of one compiled module ---------
@dataclass(eq=False)
class Home:
    """A model tensor's copy in the host or disk tier."""

    name: str
    tier: str
    handle: HostCopy | DiskCopy
    digest: int | None = None        # fingerprint of the model bytes the copy holds
    users: set = field(default_factory=set)   # ids of executors reading it
    pending: Future | None = None    # a patch's checksum still being computed

    def settle(self) -> None:
        """Wait for a patch's checksum (its errors are the patch's, raised here)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()


class Stores:
    """The host pool, the offload file and the model tensors' homes of one compiled module."""

    def __init__(self, device: torch.device, offload_dir=None, checkpoint=None, compress: int | None = None,
                 compress_kv: int | None = None):
        for what, bits in (("compress_weights", compress), ("compress_kv_cache", compress_kv)):
            if bits not in (None, 8, 4):
                raise ValueError(f"{what} must be None, 'int8' or 'int4', got {bits!r}")
        # bits of the disk tier's quantised weights and KV cache, None: exact copies
        self.compress = {Kind.WEIGHT: compress, Kind.KV_CACHE: compress_kv}
        self.cuda = device.type == "cuda"
        self.device = device
        self.offload_dir = offload_dir
        self.checkpoint = checkpoint  # a runtime.checkpoint.Checkpoint for a model on meta
        self._loaded: dict[tuple[str, str], object] = {}  # checkpoint tensors loaded once, per tier
        self._checksums = None  # the worker computing patched homes' checksums (made at first use)
        self.host = HostPool(pinned=self.cuda)
        self._disk: DiskStore | None = None
        self._homes: dict[tuple[str, str], Home] = {}
        self._lock = threading.RLock()
        self.closed = False

    @property
    def disk(self) -> DiskStore:
        """The offload file, created at its first use."""
        with self._lock:
            if self.closed:
                raise RuntimeError("memsched: the compiled module was closed")
            if self._disk is None:
                self._disk = DiskStore(make_offload_dir(self.offload_dir))
            return self._disk

    @property
    def has_disk(self) -> bool:
        return self._disk is not None

    def home(self, name: str, t: torch.Tensor, tier: str, user, kind: Kind | None = None) -> Home:
        """The home of model tensor ``name`` in ``tier`` holding t's bytes (made at first use);
        on disk, a weight or KV cache (``kind``) is kept quantised when the stores compress it."""
        layout = Layout.of(t)
        with self._lock:
            key = (name, tier)
            home = self._homes.get(key)
            if home is not None and (home.handle.layout.size, home.handle.layout.dtype) != (layout.size, layout.dtype):
                self._drop(key)  # the tensor changed shape: a new plan made a new home
                home = None
            if home is None:
                bits = self.compress.get(kind)
                if tier == "disk" and bits and quantize.eligible(t):
                    region = self.disk.allocate(quantize.stored_nbytes(t.numel(), bits), name=name)
                    handle = QuantizedCopy(region, layout, bits, self.disk)
                elif tier == "disk":
                    region = self.disk.allocate(layout.nbytes, name=name)
                    handle = DiskCopy(region, layout, owned=False)
                else:
                    handle = HostCopy(self.host.take(layout), layout)
                home = Home(name, tier, handle)
                try:
                    self.renew(home, t)
                except BaseException:
                    self._release(home)
                    raise
                self._homes[key] = home
            home.users.add(id(user))
            return home

    def from_checkpoint(self, name: str, tier: str, like: torch.Tensor):
        """Model tensor ``name`` (on meta in the model) as the program reads it, from the
        checkpoint: a FileCopy read at each fetch (disk) or a host copy loaded once, shared by
        every signature's executor; or (device) a device tensor for the calling executor."""
        self.checkpoint.check(name, like)
        if tier == "device":  # the executor's own, dropped when it is parked (see Executor.park)
            return self.checkpoint.load(name, self.device)
        with self._lock:
            key = (name, tier)
            if key not in self._loaded:
                if tier == "disk":
                    self._loaded[key] = self.checkpoint.file_copy(name)
                elif tier == "host":
                    t = self.checkpoint.load(name)
                    self._loaded[key] = HostCopy(t.pin_memory() if self.cuda else t, Layout.of(t), pooled=False)
            return self._loaded[key]

    def renew(self, home: Home, t: torch.Tensor) -> None:
        """Write t's current bytes into the home."""
        home.settle()
        h = home.handle
        home.digest = None
        if isinstance(h, QuantizedCopy):
            q, h.scale = quantize.quantize(t, h.bits)
            self.disk.write(h.region, q)
            home.digest = fingerprint(t, h.layout)  # of the model's bytes, which the check compares
        elif isinstance(h, DiskCopy):
            self.disk.write(h.region, in_layout(t, h.layout))
            home.digest = h.region.digest
        else:
            src = in_layout(t, h.layout)
            h.tensor.copy_(src)
            home.digest = checksum(_buffer(src))

    def patch(self, name: str, t: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        """The caller wrote ``t``'s slices ``index`` along ``dim`` in place (a KV cache's new
        slots): every home of ``name`` gets those bytes only, not a rewrite of the whole tensor.
        A disk home's write and its new checksum (a pass over all of t) run on a worker thread
        while the caller goes on; a read of the home waits for them (the region's ``ready``), and
        so does the next patch, check or renewal of it. The caller must not write t again before
        that: ``settle`` waits for every pending patch."""
        with self._lock:
            homes = [h for h in (self._homes.get((name, tier)) for tier in OFF_DEVICE) if h is not None]
        for home in homes:
            home.settle()
            h = home.handle
            quantised = isinstance(h, QuantizedCopy)
            if (home.digest is None and not isinstance(h, HostCopy)) or not t.is_contiguous() \
                    or Layout.of(t) != h.layout or (quantised and not quantize.slices_align(t, dim)):
                self.renew(home, t)  # (a quantised copy whose groups span slots is requantised whole)
                continue
            index = index.to(t.device)
            if quantised:  # only the slots' integers and scales are made and written
                h.region.digest = None
                home.digest = None
                home.pending = h.ready = self._checksummer().submit(self._write_quantised, home, t, dim, index)
                continue
            home.digest = None
            if isinstance(h, HostCopy):
                # its checksum is made from its own bytes when a check first needs it (a
                # generation loop never checks: a pass over the whole cache per step saved)
                h.tensor.index_copy_(dim, index.to(h.tensor.device), t.index_select(dim, index))
                continue
            h.region.digest = None   # unreadable until the worker has written and hashed it
            home.pending = h.ready = self._checksummer().submit(self._write_and_checksum, home, t, dim, index)

    def _write_and_checksum(self, home: Home, t: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        # (never self.disk: close holds the lock waiting for us)
        self._disk.write_slices(home.handle.region, t.shape, t.dtype, dim, index, t.index_select(dim, index))
        home.handle.region.digest = home.digest = checksum(_buffer(t))

    def _write_quantised(self, home: Home, t: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        h = home.handle
        q, scale = quantize.quantize_slices(t, h.bits, dim, index)
        lead = q.shape[:dim]
        self._disk.write_slices(h.region, (*lead, t.shape[dim], q.shape[-1]), torch.uint8, dim, index, q)
        h.scale.view(*lead, t.shape[dim], scale.shape[-1]).index_copy_(dim, index, scale)
        h.region.digest = self._disk.region_checksum(h.region)
        home.digest = fingerprint(t, h.layout)

    def _checksummer(self):
        with self._lock:
            if self._checksums is None:
                from concurrent.futures import ThreadPoolExecutor

                self._checksums = ThreadPoolExecutor(1, thread_name_prefix="memsched-checksum")
            return self._checksums

    def settle(self) -> None:
        """Wait for every patch's checksum still being computed."""
        with self._lock:
            homes = list(self._homes.values())
        for home in homes:
            home.settle()

    def check(self, home: Home, t: torch.Tensor, changed: bool, digest: int | None = None) -> bool:
        """Renew the home when t is another tensor (``changed``) or its bytes differ from the
        ones the home holds (``digest``: t's fingerprint in the home's layout, when the caller
        has it); True when it was renewed."""
        home.settle()
        h = home.handle
        if home.digest is None and isinstance(h, HostCopy):   # patched since its last checksum
            home.digest = checksum(_buffer(h.tensor))
        intact = home.digest is not None and not (isinstance(h, (DiskCopy, QuantizedCopy)) and h.region.digest is None)
        if not changed and intact and (fingerprint(t, h.layout) if digest is None else digest) == home.digest:
            return False
        self.renew(home, t)
        return True

    def distrust_disk(self) -> None:
        """The offload file failed a check: every disk home is rewritten from the model at its
        next use."""
        with self._lock:
            for home in self._homes.values():
                if isinstance(home.handle, (DiskCopy, QuantizedCopy)):
                    home.digest = None

    def leave(self, user) -> None:
        """An executor stopped reading its homes; homes nobody reads are released."""
        with self._lock:
            for key, home in list(self._homes.items()):
                home.users.discard(id(user))
                if not home.users:
                    self._drop(key)

    def _drop(self, key) -> None:
        self._release(self._homes.pop(key))

    def _release(self, home: Home) -> None:
        h = home.handle
        if home.pending is not None:  # a patch still writing the region: let it finish first
            home.pending.exception()
            home.pending = None
        if isinstance(h, (DiskCopy, QuantizedCopy)):
            if self._disk is not None:
                self._disk.release(h.region)
        else:
            self.host.give_back(h.tensor)

    def close(self) -> None:
        with self._lock:
            self.closed = True
            if self._checksums is not None:
                self._checksums.shutdown(wait=True)
                self._checksums = None
            self._homes.clear()
            self._loaded.clear()
            if self.checkpoint is not None:
                self.checkpoint.close()  # its files reopen if a later call reads them
            if self._disk is not None:
                self._disk.close()
            self.host.trim(0)
