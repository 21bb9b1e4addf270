"""Execution: run a scheduled program (lowered by ``codegen.py``) with the model's tensors in
their planned tiers.

The generated function calls this runtime for the inserted ops: ``prefetch``/``wait``/
``offload``/``free``. Every tensor a step produces is registered with the device accountant,
so the peak the runtime reports is measured, not predicted.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..cost_models.hardware import available_ram_bytes
from ..cost_models.measures import record_rate
from ..errors import ModelTensorsChanged
from ..frontend.autocast import no_autocast
from ..frontend.capture import Captured
from ..frontend.row_gathers import gather_rows
from ..ir.effects import written_args, written_root
from ..ir.kinds import PERSISTENT, Kind, Tier
from ..ir.meta import tier_of
from ..ir.ops import Op, op_of
from ..ir.tensors import tensor_leaves
from ..ir.units import format_bytes
from . import calibration  # noqa: F401  (registers the runtime's own costs with the local profile)
from .accounting import DeviceAccountant, RecyclePool
from .allocator_limit import AllocatorLimit
from .codegen import generate_source, room_needed
from .op_timing import TIMED_CALLS, OpTimer
from .stores import DiskCopy, DiskIntegrityError, Home, HostCopy, Layout, Stores, fingerprint, fingerprints
from .transfer import Outgoing, TransferEngine


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
        # the allocator's figure counts every tensor the process holds on the device, not only memsched's
        allocator = ("" if self.cuda_max_memory_allocated is None
                     else f" (allocator's peak {format_bytes(self.cuda_max_memory_allocated)}, the whole process)")
        return (f"peak device {format_bytes(self.peak_device_bytes)}{allocator} · moved {moved} · "
                f"stalled {self.stall_s * 1e3:.1f} ms · wall {self.wall_s * 1e3:.1f} ms")


@dataclass(eq=False)
class _ModelSlot:
    """A model tensor the program reads, as memsched last saw it in the model."""

    index: int                         # its placeholder's position
    name: str                          # its state key (looked up in the model at every call)
    tier: str
    ref: torch.Tensor                  # the model's tensor object (a Parameter, a buffer)
    ptr: int
    version: int
    shape: tuple
    stride: tuple
    dtype: torch.dtype
    device: torch.device
    home: Home | None = None           # its copy in the host or disk tier (shared, see Stores)
    copy: torch.Tensor | None = None   # its private device copy
    digest: int | None = None          # the device copy's fingerprint of the model bytes
    checkpointed: bool = False         # on meta in the model: its values come from the checkpoint
    parked: bool = False               # its device copy dropped while another program runs
    kind: str = "weight"               # what it holds (weights may be kept quantised on disk)

    def see(self, t: torch.Tensor) -> None:
        self.ref, self.ptr, self.version = t, t.data_ptr(), version_of(t)
        self.shape, self.stride, self.dtype, self.device = tuple(t.shape), tuple(t.stride()), t.dtype, t.device


def version_of(t: torch.Tensor) -> int | None:
    """t's version counter; None for an inference tensor (a model built under
    ``torch.inference_mode()``), which keeps none: its bytes' checksum tells a change instead."""
    return None if t.is_inference() else t._version


def _as_trained(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_(True)


class Executor:
    """Runs one scheduled program with the model's tensors in their planned tiers.

    ``stores``: the host pool, offload file and model-tensor homes shared by every executor of
    one compiled module (a private set when None). Every call looks the model's tensors up again
    by name: a tensor replaced (``p.data = ...``, ``load_state_dict(assign=True)``), changed in
    place (an optimizer step) or changed through ``.data`` (no version bump; caught by a checksum
    of its bytes) has its copies renewed before the program runs; one whose shape or dtype
    changed is an error asking to compile again. A call interrupted at any point (an exception,
    KeyboardInterrupt) or a training forward abandoned gives back every host buffer and disk
    region it took."""

    def __init__(self, gm: fx.GraphModule, captured: Captured, model: torch.nn.Module,
                 device: torch.device, budget: int, offload_dir=None, stores: Stores | None = None,
                 hardware=None, hard_limit: bool = False):
        self.gm, self.captured, self.device, self.budget = gm, captured, device, budget
        self.model = model
        self.cuda = device.type == "cuda"
        # on CUDA, bytes are counted as its caching allocator counts them (the plan's hardware:
        # whole blocks, cuBLAS's workspace held throughout); elsewhere, exactly
        rules = hardware if self.cuda and hardware is not None else None
        self._counting = {"block": getattr(rules, "alloc_block_bytes", 1),
                          "workspace": getattr(rules, "workspace_bytes", 0)}
        self.hard_limit = bool(hard_limit) and self.cuda   # allocator_limit.py
        # on CUDA the caching allocator already reuses fetch buffers; on a CPU device we do. Idle
        # recycled buffers leave room for any op's outputs and scratch: small ones by a standing
        # reserve, large ones (over an eighth of the budget) by a trim right before the op runs
        self._pool = RecyclePool() if not self.cuda else None
        big = max(budget // 8, 1)
        self._reserve = max([s for s in map(room_needed, gm.graph.nodes) if s <= big], default=0)
        src, glb = generate_source(gm, device, room_for=big if self._pool is not None else None)
        self.source = src
        code = compile(src, "<memsched scheduled program>", "exec")
        exec(code, glb)
        self._program = glb["program"]
        tiers = {n.name: tier_of(n) for n in gm.graph.nodes if n.op == "placeholder"}
        own = stores is None
        self.stores = Stores(device, offload_dir) if own else stores
        self.host = self.stores.host
        needs_disk = any(t == Tier.DISK for t in tiers.values()) or any(
            op_of(n) is Op.OFFLOAD and n.args[1] == Tier.DISK for n in gm.graph.nodes)
        self._token = object()  # this executor, as the users of shared homes know it
        self.engine = TransferEngine(device, None, self.host)
        self._finalizer = weakref.finalize(self, _close, self.engine, self.stores, self._token, own)
        self._written = _written_placeholders(gm)
        self._step = None
        self._outgoing: dict[int, Outgoing] = {}
        self._grad_homes: set[int] = set()    # ids of home copies of parameters needing grad
        self._grad_fetches: set[int] = set()  # ids of fetches of those, until waited on
        self._model_slots: list[_ModelSlot] = []
        self._slots_named: dict[str, list[_ModelSlot]] | None = None  # by name, made at the first patch
        # True while the caller vouches that the model's tensors are neither replaced nor changed
        # behind PyTorch's version counter (a generation loop): each call then skips looking
        # them up and fingerprinting the unchanged ones
        self.trusted = False
        self.last_stats = RunStats()
        self._runs = 0   # calls ended (the first one grows the offload file: its rates are not kept)
        self._timer: OpTimer | None = None   # this call's op timer, on the calls timed
        try:
            self.disk = self.stores.disk if needs_disk else None
            self.engine.disk = self.disk
            self._slots = self._place_model_tensors(tiers)
        except BaseException:
            self._finalizer()
            raise

    def _state(self) -> dict:
        state = dict(self.model.named_parameters(remove_duplicate=False))
        state.update(dict(self.model.named_buffers(remove_duplicate=False)))
        state.update(self.captured.constants)
        return state

    def _place_model_tensors(self, tiers) -> list:
        state = self._state()
        slots = []
        for i, ph in enumerate(self.captured.placeholders):
            if ph.kind not in PERSISTENT or tiers[ph.name] == Tier.UNUSED:
                slots.append(None)
                continue
            ref = state[ph.target]
            if ref.device.type == "meta" and self.stores.checkpoint is None:
                raise ValueError(f"{ph.target} is on the meta device: compile needs real weights, or a "
                                 "checkpoint to read them from (weights=...); memsched.plan plans meta "
                                 "models without them")
            rec = _ModelSlot(i, ph.target, tiers[ph.name], ref, 0, 0, (), (), ref.dtype, ref.device, kind=ph.kind)
            rec.checkpointed = ref.device.type == "meta"
            rec.see(ref)
            slots.append(self._slot_for(rec, ref.detach()))
            self._model_slots.append(rec)
        return slots

    def _slot_for(self, rec: _ModelSlot, t: torch.Tensor):
        """The model tensor as the program reads it: itself, or a copy in its home tier."""
        rec.home = rec.copy = rec.digest = None
        if rec.checkpointed:  # read from the checkpoint's files, or loaded from them once
            return self.stores.from_checkpoint(rec.name, rec.tier, t)
        if rec.tier == Tier.DEVICE:
            if t.device == self.device:
                return t
            rec.copy = t.to(self.device)
            rec.digest = fingerprint(t)
            return rec.copy
        if rec.tier == Tier.HOST and not self.cuda and t.device == self.device and t.is_contiguous():
            # on a CPU device the model's own tensor is the host copy; read-only
            return HostCopy(t, Layout.of(t), pooled=False)
        rec.home = self.stores.home(rec.name, t, rec.tier, self._token, kind=rec.kind)
        return rec.home.handle

    def _lookup(self, name: str):
        """The model's tensor called ``name`` now (a parameter, buffer or constant), looked up by
        its path, so a replaced submodule or Parameter is seen; None when it is gone."""
        if name in self.captured.constants:
            return self.captured.constants[name]
        path, _, leaf = name.rpartition(".")
        try:
            mod = self.model.get_submodule(path) if path else self.model
        except AttributeError:
            return None
        t = mod._parameters.get(leaf) if leaf in mod._parameters else mod._buffers.get(leaf)
        return t if t is not None else getattr(mod, leaf, None)

    def _refresh(self) -> None:
        """The model's tensors as they are now: copies of those the user replaced or changed
        (an optimizer step, ``p.data = ...``, ``p.data.mul_(...)``) are renewed."""
        todo = []
        for rec in self._model_slots:
            # trusted (a generation loop that owns the model between its calls): the tensor
            # objects stay; only a version bump on one of them is looked for
            cur = rec.ref if self.trusted else self._lookup(rec.name)
            if not isinstance(cur, torch.Tensor):
                cur = None
            if cur is None:
                raise ModelTensorsChanged(f"the model has no tensor {rec.name!r} any more")
            if rec.checkpointed:
                if cur is not rec.ref:
                    raise RuntimeError(f"memsched: model tensor {rec.name!r} was replaced since this module "
                                       "was compiled to read it from its checkpoint: compile again")
                continue
            same = (cur is rec.ref and cur.data_ptr() == rec.ptr and tuple(cur.shape) == rec.shape
                    and tuple(cur.stride()) == rec.stride and cur.dtype == rec.dtype and cur.device == rec.device)
            if not same and (tuple(cur.shape) != rec.shape or cur.dtype != rec.dtype or cur.device.type == "meta"):
                raise ModelTensorsChanged(
                    f"model tensor {rec.name!r} changed from {list(rec.shape)} {rec.dtype} on {rec.device} "
                    f"to {list(cur.shape)} {cur.dtype} on {cur.device}")
            changed = not same or version_of(cur) != rec.version
            if not (self.trusted and not changed):
                todo.append((rec, cur, same, changed))
        # a write through ``.data`` bumps no version: the bytes of every copied tensor whose
        # version stayed are checksummed against its copy's, all of them at once on a few threads
        hashed = [(rec, cur.detach()) for rec, cur, _, changed in todo
                  if not changed and (rec.home is not None or rec.copy is not None)]
        digests = dict(zip((id(rec) for rec, _ in hashed), fingerprints(
            [(t, rec.home.handle.layout if rec.home is not None else None) for rec, t in hashed])))
        for rec, cur, same, changed in todo:
            t = cur.detach()
            if rec.home is not None:
                self.stores.check(rec.home, t, changed, digests.get(id(rec)))
            elif rec.copy is not None:
                digest = digests[id(rec)] if id(rec) in digests else fingerprint(t)
                if changed or digest != rec.digest:
                    rec.copy.copy_(t)
                    rec.digest = digest
            elif not same:  # the program reads the model's tensor itself: read the new one
                self._slots[rec.index] = self._slot_for(rec, t)
            rec.see(cur)

    def patched(self, name: str, dim: int, index: torch.Tensor) -> None:
        """Model tensor ``name`` had its slices ``index`` along ``dim`` written in place (its
        homes are patched by ``Stores.patch``): the private device copy takes those slices
        only, and the write is not mistaken for a change that needs a full renewal."""
        if self._slots_named is None:
            self._slots_named = {}
            for rec in self._model_slots:
                self._slots_named.setdefault(rec.name, []).append(rec)
        for rec in self._slots_named.get(name, ()):
            cur = self._lookup(name)
            if cur is not rec.ref:
                continue  # replaced: the next call renews it in full
            t = cur.detach()
            if rec.copy is not None:
                i = index.to(t.device)
                rec.copy.index_copy_(dim, i.to(rec.copy.device), t.index_select(dim, i).to(rec.copy.device))
                rec.digest = fingerprint(t)
            rec.see(cur)

    # -- the runtime interface the generated program calls --------------------------------
    def prefetch(self, src):
        pending = self._prefetch(src)
        if id(src) in self._grad_homes:
            self._grad_fetches.add(id(pending))
        return pending

    def _prefetch(self, src):
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
        t = self.engine.wait(pending)
        if id(pending) in self._grad_fetches:
            self._grad_fetches.discard(id(pending))
            return _as_trained(t)
        return t

    def held_inside(self, nbytes: int) -> None:
        """An op measured to hold ``nbytes`` inside itself (``info(n).scratch``) has run: the
        accountant counts them at its peak, beside the op's outputs, as the plan does."""
        self.acct.hold(nbytes)
        self.acct.hold(-nbytes)

    def region(self, kernel, nbytes: int, args: tuple) -> tuple:
        """Run a fused region; while it runs, the device holds the bytes it declares (every
        storage its ops make: its own buffers are not seen one by one)."""
        self.acct.hold(nbytes)
        try:
            with self._timer.paused() if self._timer is not None else contextlib.nullcontext():
                return kernel(*args)
        finally:
            self.acct.hold(-nbytes)

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
    def park(self) -> None:
        """Another signature's program runs next: drop the device copies this one keeps of
        the model's tensors (private copies, tensors loaded from a checkpoint), so the device
        holds one program's resident weights at a time; the next run of this one makes them
        again. (A model tensor the program reads in place costs nothing and stays.)"""
        for rec in self._model_slots:
            if rec.tier == Tier.DEVICE and (rec.copy is not None or rec.checkpointed) and not rec.parked:
                self._slots[rec.index] = rec.copy = rec.digest = None
                rec.parked = True

    def _unpark(self) -> None:
        for rec in self._model_slots:
            if rec.parked:
                self._slots[rec.index] = self._slot_for(rec, rec.ref.detach())
                rec.parked = False

    def _mark_trained(self, values: list) -> None:
        """An inference program reads the model's parameters that require grad as tensors that
        require grad too (detached leaves, under no_grad: no graph is built), fetched copies
        included: some kernels choose their path by it, e.g. ``linear`` of a transposed 3-D
        input folds it into one matrix product only when the weight needs no gradient, which
        rounds otherwise than eager's batched product."""
        for rec in self._model_slots:
            v = values[rec.index]
            if not rec.ref.requires_grad or (isinstance(v, torch.Tensor) and v.is_inference()):
                continue   # (an inference tensor takes requires_grad in inference mode only)
            if isinstance(v, torch.Tensor):
                values[rec.index] = _as_trained(v)
            elif v is not None:
                self._grad_homes.add(id(v))

    def _begin(self, flat_inputs: list) -> list:
        self._settle()  # whatever an earlier step left (its outputs never collected) goes back
        self._grad_homes, self._grad_fetches = set(), set()
        self.host.new_call()
        self._unpark()
        self._refresh()
        self.acct = DeviceAccountant(self.budget, self._pool, self._reserve, **self._counting)
        self.engine.stats.bytes_moved.clear()
        self.engine.stats.disk_timed.clear()
        self.engine.stats.stall_s = 0.0
        values, user = [], iter(flat_inputs)
        for ph, slot in zip(self.captured.placeholders, self._slots):
            if ph.kind == Kind.INPUT:
                gather = self.captured.gathers.get(ph.name)
                x = self._gathered(gather, flat_inputs) if gather is not None else next(user)
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
        self._timer = OpTimer() if not self.cuda and self._runs in TIMED_CALLS else None
        return values

    def _gathered(self, gather, flat_inputs: list) -> torch.Tensor:
        """The rows of an embedding lookup hoisted out of the program (frontend/row_gathers.py),
        gathered from the table where it lives now: the model's tensor, or its checkpoint file."""
        index = gather.index(flat_inputs)
        table = self._lookup(gather.table)
        if table is None:
            raise RuntimeError(f"memsched: the model no longer has {gather.table!r}, which the program looks up")
        if table.device.type == "meta":   # (its shape and dtype the checkpoint's, as a fetch checks)
            self.stores.checkpoint.check(gather.table, table)
            return self.stores.checkpoint.file_copy(gather.table).read_rows(index)
        return gather_rows(table.detach(), index)

    def _timing(self):
        """This call's op timer (runtime/op_timing.py) on the calls timed, else nothing."""
        return self._timer if self._timer is not None else contextlib.nullcontext()

    def _bounded(self):
        """Autocast off (a program captured under it carries its casts as ops: frontend/autocast.py)
        and the allocator's hard limit for one call (``hard_limit=True`` on CUDA)."""
        stack = contextlib.ExitStack()
        stack.enter_context(no_autocast())
        if self.hard_limit:
            stack.enter_context(AllocatorLimit(self.device, self.budget, self.acct.current - self._counting["workspace"]))
        return stack

    def run(self, flat_inputs: list) -> list:
        try:
            values = self._begin(flat_inputs)
            self._mark_trained(values)
            t0 = time.perf_counter()
            with torch.no_grad(), self._bounded(), self._timing():
                out = list(self._program(self, values, self.acct.track, self.acct.release))
            del values
            self._write_back()
            self._end(time.perf_counter() - t0, out)
            # outputs the plan delivered to host or disk (host_outputs) arrive as those copies
            return self.engine.materialize_all(out)
        except BaseException as exc:
            self._unwind(exc)
            raise

    # -- a training step: the program is a generator paused at the boundary ---------------
    def start(self, flat_inputs: list) -> list:
        """Run the forward; returns the forward outputs. ``resume`` runs the backward."""
        self.abandon()
        try:
            values = self._begin(flat_inputs)
            t0 = time.perf_counter()
            self._step = self._program(self, values, self.acct.track, self.acct.release)
            del values
            with torch.no_grad(), self._bounded(), self._timing():
                outputs = next(self._step)
            self._write_back()
            self._forward_s = time.perf_counter() - t0
            return list(outputs)
        except BaseException as exc:
            self._unwind(exc)
            raise

    def resume(self, tangents: list) -> list:
        """Run the backward with the gradients of the forward outputs; returns all outputs."""
        step, self._step = self._step, None
        if step is None:
            raise RuntimeError("memsched: backward of a training step whose saved state was released "
                               "(another forward of this signature ran before it, or its plan was closed "
                               "or evicted by max_plans); memsched runs one step at a time")
        try:
            t0 = time.perf_counter()
            with torch.no_grad(), self._bounded(), self._timing():
                try:
                    step.send(tuple(tangents))
                except StopIteration as stop:
                    out = list(stop.value)
                else:
                    raise RuntimeError("the scheduled program has more than one boundary")
            self._end(self._forward_s + time.perf_counter() - t0, out)
            return out
        except BaseException as exc:
            self._step = step
            self._unwind(exc)
            raise

    def abandon(self) -> None:
        """Drop a started step's saved state (its backward will not run): its host buffers and
        disk regions go back."""
        if self._step is not None:
            self._unwind()

    def _unwind(self, exc: BaseException | None = None) -> None:
        """After an interrupted call: stop the program, let the copies in flight land, and give
        back everything the step took. After a failed integrity check the disk homes are
        rewritten from the model at the next call."""
        if isinstance(exc, DiskIntegrityError):
            self.stores.distrust_disk()
        step, self._step = self._step, None
        try:
            if step is not None:
                step.close()
        finally:
            self._settle()

    def _settle(self, keep=()) -> None:
        self.engine.drain()
        self.engine.release_step(keep)
        self._outgoing.clear()

    def _write_back(self) -> None:
        """Model buffers the forward updated in place (batch-norm statistics) are copied back
        when the program worked on a device copy of them."""
        if not self._written:   # (most programs: nothing to look at, every call)
            return
        for rec in self._model_slots:
            if rec.copy is not None and self.captured.placeholders[rec.index].name in self._written:
                t = rec.ref.detach()
                t.copy_(rec.copy)
                rec.digest = fingerprint(t)
                rec.see(rec.ref)

    def _end(self, wall: float, out: list) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        # handles among the outputs (gradients delivered to host or disk) are the caller's
        self._settle(keep=[o for o in out if isinstance(o, (HostCopy, DiskCopy))])
        self._record_disk_rates()
        if self._timer is not None:
            self._timer.record()
            self._timer = None
        self.last_stats = RunStats(
            peak_device_bytes=self.acct.peak,
            bytes_moved={k: v for k, v in self.engine.stats.bytes_moved.items() if v},
            stall_s=self.engine.stats.stall_s,
            wall_s=wall,
            cuda_max_memory_allocated=torch.cuda.max_memory_allocated(self.device) if self.cuda else None,
        )

    def _record_disk_rates(self) -> None:
        """The offload file's rates in this step price later plans' disk moves on the page-cache
        path: kept only where the step moved less than half the RAM available (it stayed cached),
        and not for the first call (it grows the file, its pages faulted in at 0.2-0.3 GB/s) nor
        the calls whose ops are timed (the workers wait on the calling thread's Python for the
        GIL between reads)."""
        self._runs += 1
        timed = list(self.engine.stats.disk_timed.items())
        if self._runs < 2 or self._timer is not None or not timed:
            return
        if sum(b for _, (b, _) in timed) <= available_ram_bytes() // 2:
            for link, (nbytes, seconds) in timed:
                record_rate(self.device.type, link, nbytes, seconds)

    def close(self) -> None:
        """Drop any started step, stop the transfer threads and give back every buffer, region
        and home this executor held (the shared stores stay with their compiled module)."""
        self._step = None
        self._finalizer()


def _written_placeholders(gm: fx.GraphModule) -> set[str]:
    """Placeholders an op writes in place, directly or through a view of them."""
    return {written_root(a).name for n in gm.graph.nodes for a in written_args(n)
            if written_root(a).op == "placeholder"}


def _close(engine: TransferEngine, stores: Stores, token, own: bool) -> None:
    engine.close()
    stores.leave(token)
    stores.host.trim(0)  # idle host buffers sized for this plan go too
    if own:
        stores.close()
