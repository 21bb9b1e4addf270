"""Execution: run a scheduled program (lowered by ``codegen.py``) with the model's tensors in
their planned tiers.

The generated function calls this runtime for the inserted ops: ``prefetch``/``wait``/
``offload``/``free``. Every tensor a step produces is registered with the device accountant,
so the peak the runtime reports is measured, not predicted.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..frontend.capture import Captured
from ..ir.effects import written_args
from ..ir.kinds import PERSISTENT, Kind, Tier
from ..ir.meta import tier_of
from ..ir.ops import Op, op_of
from ..ir.tensors import tensor_leaves
from ..ir.units import format_bytes
from .accounting import DeviceAccountant, RecyclePool
from .codegen import allocates, generate_source
from .stores import DiskStore, HostPool, Layout, make_offload_dir
from .transfer import DiskCopy, HostCopy, Outgoing, TransferEngine


@dataclass
class RunStats:
    """What one call measured."""

    peak_device_bytes: int = 0
    bytes_moved: dict = field(default_factory=dict)   # link -> bytes
    stall_s: float = 0.0                              # time the program waited on transfers
    wall_s: float = 0.0
    cuda_max_memory_allocated: int | None = None      # on CUDA, the allocator's own peak

    def __str__(self) -> str:
        moved = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(self.bytes_moved.items()) if v) or "nothing"
        return (f"peak device {format_bytes(self.peak_device_bytes)} · moved {moved} · "
                f"stalled {self.stall_s * 1e3:.1f} ms · wall {self.wall_s * 1e3:.1f} ms")


class Executor:
    """Runs one scheduled program with the model's tensors in their planned tiers."""

    def __init__(self, gm: fx.GraphModule, captured: Captured, model: torch.nn.Module,
                 device: torch.device, budget: int, offload_dir=None):
        self.gm, self.captured, self.device, self.budget = gm, captured, device, budget
        self.cuda = device.type == "cuda"
        # on CUDA the caching allocator already reuses fetch buffers; on a CPU device we do. Idle
        # recycled buffers leave room for any op's outputs: small ones by a standing reserve,
        # large ones (over an eighth of the budget) by a trim right before the op runs
        self._pool = RecyclePool() if not self.cuda else None
        big = max(budget // 8, 1)
        self._reserve = max([s for s in map(allocates, gm.graph.nodes) if s <= big], default=0)
        src, glb = generate_source(gm, device, room_for=big if self._pool is not None else None)
        self.source = src
        code = compile(src, "<memsched scheduled program>", "exec")
        exec(code, glb)
        self._program = glb["program"]
        tiers = {n.name: tier_of(n) for n in gm.graph.nodes if n.op == "placeholder"}
        self.host = HostPool(pinned=self.cuda)
        needs_disk = any(t == Tier.DISK for t in tiers.values()) or any(
            op_of(n) is Op.OFFLOAD and n.args[1] == Tier.DISK for n in gm.graph.nodes)
        self.disk = DiskStore(make_offload_dir(offload_dir)) if needs_disk else None
        self.engine = TransferEngine(device, self.disk, self.host)
        self._finalizer = weakref.finalize(self, _close, self.engine, self.disk)
        self._copies: list[tuple[int, torch.Tensor, int]] = []  # (slot, model tensor, its version)
        self._written = _written_placeholders(gm)
        self._step = None
        self._slots = self._place_model_tensors(model, tiers)
        self._outgoing: dict[int, Outgoing] = {}
        self.last_stats = RunStats()

    def _place_model_tensors(self, model, tiers) -> list:
        state = dict(model.named_parameters(remove_duplicate=False))
        state.update(dict(model.named_buffers(remove_duplicate=False)))
        state.update(self.captured.constants)
        slots = []
        for ph in self.captured.placeholders:
            if ph.kind not in PERSISTENT:
                slots.append(None)
                continue
            t = state[ph.target].detach()
            if t.device.type == "meta":
                raise ValueError(f"{ph.target} is on the meta device: compile needs real weights "
                                 "(memsched.plan plans meta models without them)")
            slot = self._slot_for(t, tiers[ph.name])
            if slot is not None and (slot.tensor if isinstance(slot, HostCopy) else slot) is not t:
                self._copies.append((len(slots), t, t._version))  # a copy: renewed when t changes
            slots.append(slot)
        return slots

    def _slot_for(self, t: torch.Tensor, tier: str):
        """The model tensor as the program reads it: itself, or a copy in its home tier."""
        if tier == Tier.UNUSED:
            return None
        if tier == Tier.DEVICE:
            return t if t.device == self.device else t.to(self.device)
        if tier == Tier.HOST:
            if self.cuda:
                host = self.host.take(Layout.of(t))
                host.copy_(t)
                return HostCopy(host, Layout.of(t))
            # on a CPU device the model's own tensor is the host copy; read-only
            return HostCopy(t if t.is_contiguous() else t.contiguous(), Layout.of(t), pooled=False)
        src = _disk_source(t)
        offset = self.disk.allocate(Layout.of(src).nbytes)
        self.disk.write(offset, src)
        return DiskCopy(offset, Layout.of(src), owned=False)

    def _refresh(self) -> None:
        """Copies of model tensors the user changed since (an optimizer step) are renewed."""
        for k, (i, t, version) in enumerate(self._copies):
            if t._version == version:
                continue
            old = self._slots[i]
            if isinstance(old, torch.Tensor):
                old.copy_(t)
            elif isinstance(old, HostCopy):
                old.tensor.copy_(t)
            else:
                self.disk.write(old.offset, _disk_source(t))
            self._copies[k] = (i, t, t._version)

    # -- the runtime interface the generated program calls --------------------------------
    def prefetch(self, src):
        if self._pool is None:
            pending = self.engine.fetch(src)
            self.acct.track(pending.tensor)
            return pending
        buf = self._pool.take(src.layout)
        if buf is None:  # a fresh buffer: make room for it among the idle ones first
            self._pool.trim(max(self.acct.pool_cap - self.acct.current - src.layout.nbytes, 0))
        pending = self.engine.fetch(src, buf)
        self.acct.track(pending.tensor)
        self.acct.recycle[pending.tensor.untyped_storage().data_ptr()] = pending.tensor
        return pending

    def make_room(self, nbytes: int) -> None:
        """Before an op allocating ``nbytes``: idle recycled buffers shrink so that held + idle +
        the new outputs stay within the budget."""
        if self._pool.idle:
            self._pool.trim(max(self.budget - self.acct.current - nbytes, 0))

    def wait(self, pending):
        return self.engine.wait(pending)

    def offload(self, x, tier):
        out = self.engine.offload(x, tier)
        self._outgoing[id(x)] = out
        return out.handle

    def track(self, value):
        if isinstance(value, torch.Tensor):
            self.acct.track(value)
        elif isinstance(value, (list, tuple)):
            for leaf in tensor_leaves(value):
                self.acct.track(leaf)

    def free(self, *values):
        for v in values:
            if isinstance(v, (HostCopy, DiskCopy)):
                self.engine.release(v)
                continue
            out = self._outgoing.pop(id(v), None)
            if out is not None:
                self.engine.finish(out)
            for leaf in (v,) if isinstance(v, torch.Tensor) else tensor_leaves(v):
                self.acct.release(leaf)

    # -- a call ---------------------------------------------------------------------------
    def _begin(self, flat_inputs: list) -> list:
        self._refresh()
        self.acct = DeviceAccountant(self.budget, self._pool, self._reserve)
        self.engine.stats.bytes_moved.clear()
        self.engine.stats.stall_s = 0.0
        values, user = [], iter(flat_inputs)
        for ph, slot in zip(self.captured.placeholders, self._slots):
            if ph.kind == Kind.INPUT:
                x = next(user)
                if isinstance(x, torch.Tensor):
                    if x.device != self.device:
                        self.engine.stats.bytes_moved["h2d"] += x.numel() * x.element_size()
                        x = x.to(self.device)
                    self.acct.track(x)
                values.append(x)
            else:
                if isinstance(slot, torch.Tensor):
                    self.acct.track(slot)
                values.append(slot)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        return values

    def run(self, flat_inputs: list) -> list:
        values = self._begin(flat_inputs)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self._program(self, values, self.acct.track, self.acct.release)
        self._end(time.perf_counter() - t0)
        return list(out)

    # -- a training step: the program is a generator paused at the boundary ---------------
    def start(self, flat_inputs: list) -> list:
        """Run the forward; returns the forward outputs. ``resume`` runs the backward."""
        values = self._begin(flat_inputs)
        t0 = time.perf_counter()
        self._step = self._program(self, values, self.acct.track, self.acct.release)
        with torch.no_grad():
            outputs = next(self._step)
        self._write_back()
        self._forward_s = time.perf_counter() - t0
        return list(outputs)

    def resume(self, tangents: list) -> list:
        """Run the backward with the gradients of the forward outputs; returns all outputs."""
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError("memsched: backward of a training step whose saved state was released "
                               "(another forward ran before it); memsched runs one step at a time")
        t0 = time.perf_counter()
        with torch.no_grad():
            try:
                step.send(tuple(tangents))
            except StopIteration as stop:
                out = stop.value
            else:
                raise RuntimeError("the scheduled program has more than one boundary")
        self._end(self._forward_s + time.perf_counter() - t0)
        return list(out)

    def abandon(self) -> None:
        """Drop a started step's saved state (its backward will not run)."""
        if self._step is not None:
            self._step.close()
            self._step = None
            self._outgoing.clear()

    def _write_back(self) -> None:
        """Model buffers the forward updated in place (batch-norm statistics) are copied back
        when the program worked on a device copy of them."""
        for k, (i, t, _) in enumerate(self._copies):
            slot = self._slots[i]
            if self.captured.placeholders[i].name in self._written and isinstance(slot, torch.Tensor):
                t.copy_(slot)
                self._copies[k] = (i, t, t._version)

    def _end(self, wall: float) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._outgoing.clear()
        self.last_stats = RunStats(
            peak_device_bytes=self.acct.peak,
            bytes_moved={k: v for k, v in self.engine.stats.bytes_moved.items() if v},
            stall_s=self.engine.stats.stall_s,
            wall_s=wall,
            cuda_max_memory_allocated=torch.cuda.max_memory_allocated(self.device) if self.cuda else None,
        )

    def close(self) -> None:
        self._finalizer()


def _disk_source(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor whose bytes are the layout the disk store writes."""
    src = t.cpu()
    return src if Layout.of(src).stride == tuple(src.stride()) else src.contiguous()


def _written_placeholders(gm: fx.GraphModule) -> set[str]:
    return {a.name for n in gm.graph.nodes for a in written_args(n) if a.op == "placeholder"}


def _close(engine: TransferEngine, disk: DiskStore | None) -> None:
    engine.close()
    if disk is not None:
        disk.close()
