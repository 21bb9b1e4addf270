"""Transfer engine: asynchronous copies between the device and the host/disk tiers.

One worker per link direction (h2d, d2h, disk_read, disk_write) so transfers in different
directions overlap each other and compute (lesson 4). Workers are threads; the copies they
run (``Tensor.copy_``, ``os.preadv``/``os.pwritev``) release the GIL. On CUDA the h2d and d2h
copies are issued on one stream per direction and ordered with events, never a global sync;
disk traffic goes disk -> pinned host buffer -> device (a two-stage pipe).
"""
from __future__ import annotations

import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field

import torch

from ..ir.kinds import LINKS
from ..ir.tensors import is_dense
from .stores import DiskCopy, DiskStore, HostCopy, HostPool, Layout

__all__ = ["DiskCopy", "HostCopy", "Pending", "Outgoing", "TransferEngine", "TransferStats"]


@dataclass
class Pending:
    """A fetch in flight: ``tensor`` becomes valid once ``done`` resolves."""

    tensor: torch.Tensor
    done: Future
    event: object = None             # CUDA event recorded after the copy, if any


@dataclass
class Outgoing:
    """An offload in flight; the device tensor must live until ``done`` resolves."""

    source: torch.Tensor
    done: Future
    handle: object = None


@dataclass
class TransferStats:
    bytes_moved: dict = field(default_factory=lambda: defaultdict(int))
    stall_s: float = 0.0
    # the offload file's reads and writes as the workers timed them: link -> [bytes, seconds]
    # (each link has one worker, the only writer of its entry)
    disk_timed: dict = field(default_factory=lambda: defaultdict(lambda: [0, 0.0]))


def _done_future(value=None) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class TransferEngine:
    """The copies of one executor. It keeps a ledger of the host buffers and disk regions its
    current step took and still holds (``buffers``, ``regions``) and of the copies still in
    flight, so a step that is interrupted or abandoned gives every one of them back
    (``drain`` then ``release_step``)."""

    def __init__(self, device: torch.device, disk: DiskStore | None, host: HostPool):
        self.device = device
        self.cuda = device.type == "cuda"
        self.disk, self.host = disk, host
        self.workers = {link: ThreadPoolExecutor(1, thread_name_prefix=f"memsched-{link}") for link in LINKS}
        self.stats = TransferStats()
        self.regions: set = set()                  # disk regions of the current step
        self.buffers: dict = {}                    # host buffers of the current step
        self._inflight: set[Future] = set()
        self._inflight_lock = threading.Lock()
        if self.cuda:
            self.streams = {"h2d": torch.cuda.Stream(device), "d2h": torch.cuda.Stream(device)}

    def _submit(self, link: str, fn, *args) -> Future:
        f = self.workers[link].submit(fn, *args)
        with self._inflight_lock:
            self._inflight.add(f)
        f.add_done_callback(self._forget)
        return f

    def _forget(self, f: Future) -> None:
        with self._inflight_lock:
            self._inflight.discard(f)

    # -- device <- host/disk -------------------------------------------------------------
    def fetch(self, src, out: torch.Tensor | None = None) -> Pending:
        """Start a fetch of ``src`` into ``out`` (a fresh device tensor when None)."""
        layout = src.layout
        out = layout.empty(self.device) if out is None else out
        nbytes = layout.nbytes
        if isinstance(src, HostCopy):
            self.stats.bytes_moved["h2d"] += nbytes
            if self.cuda:
                pending = self._cuda_h2d(src.tensor, out, src.ready)
                src.read_by = pending.event  # its buffer is not rewritten before this copy ran
                return pending
            return Pending(out, self._submit("h2d", self._copy, out, src.tensor, src.ready))
        self.stats.bytes_moved["disk_read"] += getattr(src, "stored_nbytes", nbytes)  # a quantised weight: fewer
        if not self.cuda:
            return Pending(out, self._submit("disk_read", self._read, src, out))
        self.stats.bytes_moved["h2d"] += nbytes
        return self._cuda_staged_h2d(src, out)

    def wait(self, pending: Pending) -> torch.Tensor:
        if not pending.done.done():
            t0 = time.perf_counter()
            pending.done.result()
            self.stats.stall_s += time.perf_counter() - t0
        else:
            pending.done.result()  # re-raise a failed copy
        if pending.event is not None:
            torch.cuda.current_stream(self.device).wait_event(pending.event)
        return pending.tensor

    # -- device -> host/disk -------------------------------------------------------------
    def offload(self, x: torch.Tensor, tier: str) -> Outgoing:
        layout = Layout.of(x)
        if tier == "host":
            self.stats.bytes_moved["d2h"] += layout.nbytes
            dst = self.host.take(layout, owner=self.buffers)
            if self.cuda:
                done = self._cuda_d2h(x, dst)
            else:
                done = self._submit("d2h", self._copy, dst, x, None)
            return Outgoing(x, done, HostCopy(dst, layout, done))
        region = self.disk.allocate(layout.nbytes, owner=self.regions)
        handle = DiskCopy(region, layout)
        self.stats.bytes_moved["disk_write"] += layout.nbytes
        if self.cuda:
            self.stats.bytes_moved["d2h"] += layout.nbytes
            staging = self.host.take(layout, owner=self.buffers)
            copied = self._cuda_d2h(x, staging)
            handle.ready = self._submit("disk_write", self._write_after, copied, staging, region)
            # the device copy may go once it is in the staging buffer, as the simulator frees
            # it: the write to disk reads the staging buffer, not the device
            return Outgoing(x, copied, handle)
        handle.ready = self._submit("disk_write", self._write_after, None, x, region)
        return Outgoing(x, handle.ready, handle)

    def finish(self, out: Outgoing) -> None:
        """Block until an offload has read its source, so the device copy may be freed."""
        if not out.done.done():
            t0 = time.perf_counter()
            out.done.result()
            self.stats.stall_s += time.perf_counter() - t0
        else:
            out.done.result()

    def release(self, handle) -> None:
        """The host/disk copy of an activation is no longer needed. A copy still being filled
        is waited for first, so that its buffer or region is never reused under it."""
        if handle.ready is not None and not handle.ready.done():
            _settled(handle.ready)
        if isinstance(handle, HostCopy) and handle.pooled:
            self.host.give_back(handle.tensor, read_by=handle.read_by)
        elif isinstance(handle, DiskCopy) and handle.owned:
            self.disk.release(handle.region)

    def materialize(self, handle) -> torch.Tensor:
        """A host tensor the caller owns with the contents of an offloaded value (a gradient
        delivered to its parameter's home)."""
        try:
            if handle.ready is not None:
                handle.ready.result()
            if isinstance(handle, HostCopy):
                if handle.pooled:
                    self.host.disown(handle.tensor)  # taken from the pool, never given back: the caller's now
                return handle.tensor
            out = handle.layout.empty(torch.device("cpu"))
            self.disk.read_into(handle.region, out)
            self.release(handle)
            return out
        except BaseException:
            self.release(handle)
            raise

    def materialize_all(self, items: list) -> list:
        """``items`` with each host or disk copy among them (a delivered gradient or output)
        made a host tensor the caller owns; a copy listed twice becomes one tensor. A failure
        gives back the copies not yet made tensors."""
        made: dict[int, torch.Tensor] = {}
        try:
            for h in items:
                if isinstance(h, (HostCopy, DiskCopy)) and id(h) not in made:
                    made[id(h)] = h   # materialize gives the copy back itself if it fails
                    made[id(h)] = self.materialize(h)
        finally:
            for h in {id(h): h for h in items if isinstance(h, (HostCopy, DiskCopy)) and id(h) not in made}.values():
                self.release(h)
        return [made.get(id(h), h) if isinstance(h, (HostCopy, DiskCopy)) else h for h in items]

    # -- the ledger of a step ------------------------------------------------------------
    def drain(self) -> None:
        """Wait until no copy of this engine is in flight (their errors are not raised here)."""
        while True:
            with self._inflight_lock:
                pending = list(self._inflight)
            if not pending:
                break
            for f in pending:
                _settled(f)
            with self._inflight_lock:
                self._inflight.difference_update(pending)
        if self.cuda:
            for stream in self.streams.values():
                stream.synchronize()

    def release_step(self, keep=()) -> None:
        """Give back every buffer and region the step still holds except those of the handles
        in ``keep`` (outputs handed to the caller). Call after ``drain``."""
        kept_regions = {id(h.region) for h in keep if isinstance(h, DiskCopy)}
        kept_buffers = {h.tensor.untyped_storage().data_ptr() for h in keep if isinstance(h, HostCopy)}
        for region in list(self.regions):
            if id(region) not in kept_regions:
                self.disk.release(region)
        for key, raw in list(self.buffers.items()):
            if key not in kept_buffers:
                self.host.give_back(raw)

    def close(self) -> None:
        for w in self.workers.values():
            w.shutdown(wait=True)
        self.drain()
        self.release_step()

    # -- workers -------------------------------------------------------------------------
    @staticmethod
    def _copy(dst: torch.Tensor, src: torch.Tensor, ready: Future | None) -> None:
        if ready is not None:
            ready.result()
        dst.copy_(src)

    def _read(self, src: DiskCopy, out: torch.Tensor) -> None:
        if src.ready is not None:
            src.ready.result()  # the write of this copy must land before we read it
        if isinstance(src, DiskCopy):
            t0 = time.perf_counter()
            self.disk.read_into(src.region, out)
            self._timed("disk_read", src.region.nbytes, time.perf_counter() - t0)
        else:  # a tensor read from its place in a checkpoint (runtime.checkpoint.FileCopy)
            src.read_into(out)

    def _write_after(self, copied: Future | None, x: torch.Tensor, region) -> None:
        try:
            if copied is not None:
                copied.result()
            src = x if is_dense(x) else x.contiguous()
            t0 = time.perf_counter()
            self.disk.write(region, src)
            self._timed("disk_write", region.nbytes, time.perf_counter() - t0)
        finally:
            if copied is not None:
                self.host.give_back(x)

    def _timed(self, link: str, nbytes: int, seconds: float) -> None:
        entry = self.stats.disk_timed[link]
        entry[0] += nbytes
        entry[1] += seconds

    # -- CUDA streams ----------------------------------------------------------------------
    def _cuda_h2d(self, host: torch.Tensor, out: torch.Tensor, ready: Future | None) -> Pending:
        """Copy on the h2d stream once ``ready`` resolved (at once when it has)."""
        main = torch.cuda.current_stream(self.device)
        event = torch.cuda.Event(blocking=True)   # synchronised from CPU threads: sleep, never spin
        if ready is None or ready.done():
            if ready is not None:
                ready.result()
            self._issue_h2d(host, out, main, event)
            return Pending(out, _done_future(), event)

        def issue():
            ready.result()
            self._issue_h2d(host, out, main, event)
        return Pending(out, self._submit("h2d", issue), event)

    def _cuda_staged_h2d(self, src, out: torch.Tensor) -> Pending:
        """Disk -> pinned staging buffer -> device, both on the disk-read worker, so host
        fetches never queue behind disk reads. ``done`` resolves once the copy is issued: the
        caller's stream waits on its event, its CPU thread does not wait for the copy. The
        staging buffer returns to the pool with that event: its next taker waits on it."""
        main = torch.cuda.current_stream(self.device)
        event = torch.cuda.Event(blocking=True)
        staging = self.host.take(src.layout, owner=self.buffers)

        def read_then_issue():
            try:
                self._read(src, staging)
                self._issue_h2d(staging, out, main, event)
            except BaseException:
                self.host.give_back(staging)
                raise
            self.host.give_back(staging, read_by=event)
        return Pending(out, self._submit("disk_read", read_then_issue), event)

    def _issue_h2d(self, host: torch.Tensor, out: torch.Tensor, main, event) -> None:
        # the device as a context: issued on the caller's thread, it must not change the
        # caller's current device
        stream = self.streams["h2d"]
        with torch.cuda.device(self.device):
            stream.wait_stream(main)   # ``out`` was allocated on the caller's stream
            with torch.cuda.stream(stream):
                out.copy_(host, non_blocking=True)
                event.record(stream)
            # freed on the caller's stream before it waited (an abandoned step), ``out`` is not
            # reused while this copy may still write it
            out.record_stream(stream)

    def _cuda_d2h(self, x: torch.Tensor, dst: torch.Tensor) -> Future:
        stream = self.streams["d2h"]
        main = torch.cuda.current_stream(self.device)
        event = torch.cuda.Event(blocking=True)   # synchronised by a worker: sleep, never spin
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            dst.copy_(x, non_blocking=True)
            event.record(stream)
        x.record_stream(stream)
        return self._submit("d2h", event.synchronize)


def _settled(f: Future) -> None:
    """Wait for f, whatever its outcome (its error is not raised here)."""
    futures_wait([f])
