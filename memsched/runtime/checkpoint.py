"""Weights straight from a safetensors checkpoint: a model built on the meta device runs with
its tensors read from the checkpoint's own files.

A weight the plan homes on disk is read from its place in the checkpoint at every fetch
(``os.preadv`` into the fetch buffer: no copy of the model in RAM, no rewrite into an offload
file); one homed on the host or kept on the device is read once into memory of its own. The
headers are read and validated by the safetensors library before anything else is read
(JSON, dtypes, shapes, offsets that tile the file), the byte offsets the streamed reads need
follow from them, and the tensors are checked against the model's: a hostile file fails with
a clear error, never a wild read.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .stores import DiskIntegrityError, Layout, read_fully

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_PICKLED = (".bin", ".pt", ".pth", ".ckpt")
# unpickling runs code the file names: a checkpoint from elsewhere is only ever read as safetensors
_ONLY_SAFETENSORS = ("memsched reads only safetensors (unpickling a file can run code it names); convert a "
                     "file you trust with safetensors.torch.save_file(torch.load(path), 'model.safetensors')")


class CheckpointError(ValueError):
    """A checkpoint that cannot serve the model: unreadable, malformed, or not matching it."""


@dataclass(frozen=True)
class Entry:
    path: str
    offset: int          # absolute byte offset of the tensor's data in its file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def checkpoint_files(source) -> list[Path]:
    """The safetensors files of ``source``: a file, a directory of shards, or an index json."""
    path = Path(source)
    if path.is_dir():
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            return checkpoint_files(index[0])
        files = sorted(path.glob("*.safetensors"))
        if not files:
            others = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLED)
            raise CheckpointError(f"no *.safetensors file in {path}"
                                  + (f" (it holds {', '.join(others[:3])}: {_ONLY_SAFETENSORS})" if others else ""))
        return files
    if path.name.endswith(".json"):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
            names = sorted(set(weight_map.values()), key=str)
        except RecursionError:
            raise CheckpointError(f"{path} is not a safetensors index: its JSON nests too deep") from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{path} is not a safetensors index (a json with a weight_map): {exc}") from exc
        if not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"{path}: the weight_map's values must be the names of shard files, found "
                                  f"{next(n for n in names if not isinstance(n, str))!r}")
        if not all("/" not in n and n not in ("", ".", "..") for n in names):
            raise CheckpointError(f"{path}: the weight_map names files outside its directory")
        return [_regular(path.parent / n) for n in names]
    return [_regular(path)]


def _regular(path: Path) -> Path:
    """``path`` when it is a regular file (or a link to one, as in Hugging Face's cache): a pipe
    or a device would block a read or never end."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    return path


def _read_header(path: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file and where their bytes lie. The header is read and
    validated by the safetensors library (JSON, known dtypes, shapes matching byte counts, data
    offsets that tile the data section exactly to the end of the file); the absolute offsets the
    streamed reads need follow from its tensors in offset order. Nothing but the header is read."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            if head.startswith((b"PK\x03\x04", b"\x80")):   # torch.save's zip, or a bare pickle
                raise CheckpointError(f"{path} is a PyTorch pickle, not a safetensors file: {_ONLY_SAFETENSORS}")
            raise CheckpointError(f"{path}: header of {n} bytes does not fit the file ({size} bytes)")
        with safe_open(str(path), framework="pt") as f:
            layout = [(name, f.get_slice(name)) for name in f.offset_keys()]
            tensors = [(name, sl.get_dtype(), tuple(sl.get_shape())) for name, sl in layout]
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from exc
    except SafetensorError as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from exc
    entries, at = {}, 8 + n
    for name, dtype, shape in tensors:
        if dtype not in _DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has a dtype memsched does not read ({dtype}; "
                                  f"it reads {', '.join(_DTYPES)})")
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        entries[name] = Entry(str(path), at, nbytes, _DTYPES[dtype], shape)
        at += nbytes
    if at != size:   # the library's own check, made again where the offsets are ours to compute
        raise CheckpointError(f"{path}: its tensors take {at - 8 - n} bytes, the file holds {size - 8 - n} after "
                              f"the header")
    return entries


class FileCopy:
    """A model tensor in the checkpoint file, read into a buffer at every fetch (the disk tier).
    The file's identity (inode, size, modification time) is recorded at its first read and
    checked at every later one, so a checkpoint replaced or rewritten while in use fails loudly
    rather than feeding other weights. (A checksum of every read would cost a third of a
    streaming decode step; the checkpoint is the user's file, not memsched's offload file.)"""

    ready = None  # a transfer handle that never waits for a write

    def __init__(self, checkpoint: "Checkpoint", name: str, entry: Entry):
        self.checkpoint, self.name, self.entry = checkpoint, name, entry
        self.layout = Layout(entry.shape, _contiguous_strides(entry.shape), entry.dtype)

    def read_into(self, out: torch.Tensor) -> None:
        data = memoryview(out.detach().view(torch.uint8).reshape(-1).numpy()) if out.numel() else memoryview(b"")
        fd = self.checkpoint.fd(self.entry.path)
        self.checkpoint.check_unchanged(self.entry.path, fd, self.name)
        done = read_fully(fd, data, self.entry.offset)
        if done < len(data):
            raise DiskIntegrityError(f"memsched: reading {self.name!r} from checkpoint {self.entry.path} got "
                                     f"{done} of {len(data)} bytes: the file was truncated")


    def read_rows(self, index: torch.Tensor) -> torch.Tensor:
        """``aten.embedding`` of this tensor by ``index``: only the rows it names are read
        (once each), not the table."""
        e = self.entry
        count = e.shape[0] if e.shape else 0
        row = e.nbytes // count if count else 0
        flat = index.reshape(-1).cpu()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= count):
            raise IndexError("index out of range in self")
        rows, inverse = torch.unique(flat, return_inverse=True)
        out = torch.empty((len(rows), *e.shape[1:]), dtype=e.dtype)
        data = memoryview(out.view(torch.uint8).reshape(-1).numpy()) if out.numel() else memoryview(b"")
        fd = self.checkpoint.fd(e.path)
        self.checkpoint.check_unchanged(e.path, fd, self.name)
        ids, k = rows.tolist(), 0
        while k < len(ids):   # a run of consecutive rows (positions 0..n) is one read
            end = k + 1
            while end < len(ids) and ids[end] == ids[end - 1] + 1:
                end += 1
            if read_fully(fd, data[k * row:end * row], e.offset + ids[k] * row) < (end - k) * row:
                raise DiskIntegrityError(f"memsched: reading rows {ids[k]}..{ids[end - 1]} of {self.name!r} from "
                                         f"checkpoint {e.path} came short: the file was truncated")
            k = end
        return out[inverse].reshape(*index.shape, *e.shape[1:])


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


class Checkpoint:
    """The tensors of a safetensors checkpoint by name. ``prefix`` is what the model being run
    puts before the checkpoint's names (a wrapper's attribute path, e.g. ``"model."``)."""

    def __init__(self, source, prefix: str = ""):
        self.source, self.prefix = str(source), prefix
        self.entries: dict[str, Entry] = {}
        for path in checkpoint_files(source):
            for name, entry in _read_header(path).items():
                self.entries.setdefault(name, entry)
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._alias: dict[str, str] = {}  # a model name -> the checkpoint name of the same tensor
        self._identity: dict[str, tuple] = {}  # path -> (inode, size, mtime) when first opened

    def bind(self, named_tensors) -> int:
        """Check, before anything runs, that every meta tensor of the model (``(name, tensor)``
        pairs, tied ones under each of their names) has a matching tensor in the checkpoint
        under one of its names; returns the bytes the checkpoint will serve."""
        names: dict[int, list[str]] = {}
        objs: dict[int, torch.Tensor] = {}
        for name, t in named_tensors:
            if t.device.type == "meta":
                names.setdefault(id(t), []).append(name)
                objs[id(t)] = t
        missing, total = [], 0
        for key, group in names.items():
            found = next((n for n in group if self._lookup(n) is not None), None)
            if found is None:
                missing.append(group[0])
                continue
            for n in group:
                self._alias[n] = found
            total += self.check(group[0], objs[key]).nbytes
        if missing:
            shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
            raise CheckpointError(
                f"{shown} {'is' if len(missing) == 1 else 'are'} on the meta device and not in checkpoint "
                f"{self.source}: memsched cannot give {'it' if len(missing) == 1 else 'them'} values. "
                + (self._one_shard() or self._per_expert(missing)
                   or "Build the model with accelerate.init_empty_weights() (buffers a model computes, such as "
                   "rotary frequencies, stay real) and call model.tie_weights() so a tied output layer shares its "
                   "checkpoint tensor with the embedding"))
        return total

    def _one_shard(self) -> str:
        """The way out when ``source`` is one shard of a sharded checkpoint (its directory holds
        an index, or it is named as transformers names shards: model-00001-of-00004); else ''."""
        path = Path(self.source)
        if path.is_dir() or path.name.endswith(".json"):
            return ""
        index = sorted(path.parent.glob("*.safetensors.index.json"))
        of = re.search(r"-\d+-of-(\d+)\.safetensors$", path.name)
        if not index and not of:
            return ""
        return (f"{path.name} is one shard of a checkpoint{f' of {int(of.group(1))} files' if of else ''}: pass "
                f"its directory ({path.parent}){f' or its index ({index[0].name})' if index else ''} as weights=")

    def _per_expert(self, missing: list[str]) -> str:
        """Why a mixture-of-experts layer's stacked expert weights are missing, when the checkpoint
        holds them one expert at a time (transformers stacks them as it loads); else ''."""
        for name in missing:
            stack = name.rpartition(".")[0]   # ...mlp.experts
            if stack.endswith("experts") and any(self._lookup(f"{stack}.0.{w}.weight") is not None
                                                 for w in ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")):
                return (f"The checkpoint holds {stack} one expert at a time ({stack}.0.*), which transformers "
                        "stacks into the model's tensors as it loads; memsched reads tensors by the model's own "
                        "names and does not stack them yet: load this model's weights in RAM, or save them in the "
                        "model's own layout (torch's state_dict through safetensors.torch.save_file)")
        return ""

    def _lookup(self, name: str) -> Entry | None:
        if name in self.entries:
            return self.entries[name]
        if self.prefix and name.startswith(self.prefix):
            return self.entries.get(name[len(self.prefix):])
        return None

    def key(self, name: str) -> str:
        """The checkpoint's name for model tensor ``name``."""
        name = self._alias.get(name, name)
        if name in self.entries or not (self.prefix and name.startswith(self.prefix)):
            return name
        return name[len(self.prefix):]

    def entry(self, name: str) -> Entry | None:
        name = self._alias.get(name, name)
        if name in self.entries:
            return self.entries[name]
        if self.prefix and name.startswith(self.prefix):
            return self.entries.get(name[len(self.prefix):])
        return None

    def check(self, name: str, like: torch.Tensor) -> Entry:
        """The entry for model tensor ``name``, which must match ``like``'s shape and dtype."""
        e = self.entry(name)
        if e is None:
            raise CheckpointError(f"{name} is on the meta device and checkpoint {self.source} has no tensor "
                                  "of that name: memsched cannot give it values")
        if e.shape != tuple(like.shape) or e.dtype != like.dtype:
            raise CheckpointError(f"{name}: the checkpoint holds {list(e.shape)} {e.dtype}, the model "
                                  f"{list(like.shape)} {like.dtype}")
        return e

    def file_copy(self, name: str) -> FileCopy:
        return FileCopy(self, name, self.entry(name))

    def fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
                st = os.fstat(self._fds[path])
                self._identity.setdefault(path, (st.st_ino, st.st_size, st.st_mtime_ns))
            return self._fds[path]

    def check_unchanged(self, path: str, fd: int, name: str) -> None:
        st = os.fstat(fd)
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self._identity[path]:
            raise DiskIntegrityError(f"memsched: checkpoint {path} changed while the compiled module was reading "
                                     f"{name!r} from it (its size or modification time differ): compile again")

    def load(self, name: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The tensor's values in memory the caller owns (read, not memory-mapped: a mapped
        tensor's pages would be the page cache's to evict and re-read)."""
        copy = self.file_copy(name)
        t = copy.layout.empty("cpu")
        copy.read_into(t)
        return t.to(device)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
