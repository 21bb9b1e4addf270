"""Fusion: the compute between scheduling points becomes regions compiled as one call each.

A region is a run of consecutive compute nodes of the scheduled program with no prefetch, wait,
offload or boundary among them (those stay visible: the runtime overlaps transfers with them).
Frees inside the run move after the region: a value made and dropped inside never exists
outside it, and one from outside is held until the region returns. The budget holds because a
region only grows while

    device bytes held before its first op  +  every storage its ops make
                                           +  what their lowerings hold besides  <=  budget

(``Region.nbytes`` is the sum of the last two: what the compiled call may allocate whatever it
fuses away -- every value of its ops, and the non-pointwise values of each op's decomposition,
``scratch_bytes``. A bound read from the ops, not a proof about Inductor: the runtime checks each
kernel's first CPU call against it with the allocator's own events). Ops left out: random ones (a compiled
kernel draws other numbers), in-place and mutating ones, convolutions (see ``_RELAID``), lowerings that
write buffers their ops do not show (``_BUFFERED_LOWERINGS``), ops adding at computed indices
(``_adds_through_indices``: Inductor's CPU code for them can store at wrong offsets), ops of
other namespaces and Python calls, and ops whose results are not tensors. A region needs two ops that compute (views and
getitems do not count); shorter runs stay as they are.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..cost_models.op_cost import op_compute_dtype, op_flops_bytes
from ..ir.effects import draws_nothing
from ..ir.graph_module import lazy_graph_module
from ..ir.listing import target_name
from ..ir.memory import DeviceMemory
from ..ir.meta import KEY as MEMSCHED_KEY
from ..ir.meta import annotate, info
from ..ir.ops import Op, free, op_of, region
from ..ir.regions import KEY, Region, output_node, region_of, structure_key
from ..ir.tensors import storages

MAX_REGION_OPS = 256   # a longer run is cut: compile time grows with a region's size
_NAMESPACES = ("aten", "prims")
# Convolutions stay library calls outside regions: a graph with one makes Inductor lay the
# whole region out channels-last on a CPU, copying weights, inputs and outputs in and out at
# every call (more bytes than the region's ops make, and time no fusion wins back)
_RELAID = frozenset({"convolution", "convolution_backward", "_convolution", "conv1d", "conv2d", "conv3d",
                     "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "mkldnn_convolution"})


# Ops Inductor lowers into loops of its own that write buffers its decomposition does not show:
# a bicubic upsample of a 4x4 grid wrote several output-sized buffers (YOLOS's position
# embeddings: a region allocated 10.9 KiB against the 4.8 KiB its ops make); and the upsamples'
# backwards, which it leaves to ATen with their gradient made contiguous first, and more (a
# bilinear one reading a channels-last slice: 48 KiB against 10 KiB, UperNet's training step)
_BUFFERED_LOWERINGS = frozenset({"upsample_bicubic2d", "upsample_bilinear2d_backward", "upsample_linear1d_backward",
                                 "upsample_bicubic2d_backward", "upsample_trilinear3d_backward"})
# Ops that add into their result at computed indices. Inductor's CPU code for them is wrong where
# it tiles the loop to read a transposed input: an index_put accumulating a permuted value wrote
# past its buffer (a Falcon training step: other gradients, then a corrupted heap). Eager's kernels
# run them; nothing is lost but a loop fused around them.
_ADDS_AT_INDICES = frozenset({"index_add", "scatter_add", "scatter_reduce", "index_reduce",
                              "embedding_dense_backward"})
_ACCUMULATING_PUTS = frozenset({"index_put", "_unsafe_index_put", "_index_put_impl"})


def _adds_through_indices(n: fx.Node) -> bool:
    name = n.target._opname
    if name in _ACCUMULATING_PUTS:
        accumulate = n.args[3] if len(n.args) > 3 else n.kwargs.get("accumulate", False)
        return bool(accumulate)
    return name in _ADDS_AT_INDICES


def fusible(n: fx.Node) -> bool:
    """A compute node a compiled region may run: a pure, deterministic ATen op on tensors."""
    if n.op != "call_function" or op_of(n) is not None:
        return False
    if n.target is operator.getitem:
        return isinstance(n.meta.get("val"), torch.Tensor)
    t = n.target
    if not isinstance(t, torch._ops.OpOverload) or t.namespace not in _NAMESPACES:
        return False
    if t._schema.is_mutable or (torch.Tag.nondeterministic_seeded in t.tags and not draws_nothing(n)):
        return False
    if t._opname in _RELAID or t._opname in _BUFFERED_LOWERINGS or _adds_through_indices(n):
        return False
    leaves = _flat(n.meta.get("val"))
    return bool(leaves) and all(isinstance(x, torch.Tensor) for x in leaves) and _laid_out_as_traced(n)


def pointwise(n: fx.Node) -> bool:
    """A fusible pointwise op (a cast on the same device included): inside a region its output
    is computed in the loop that reads it, never written to memory unless read outside."""
    if not fusible(n) or n.target is operator.getitem or not isinstance(n.meta.get("val"), torch.Tensor):
        return False
    if n.target is torch.ops.aten._to_copy.default:
        src = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
        return isinstance(src, torch.Tensor) and src.device == n.meta["val"].device
    return torch.Tag.pointwise in n.target.tags


def fused_op_time(n: fx.Node, hw) -> float:
    """A pointwise op's seconds inside a region: its arithmetic alone (its memory traffic is
    the region's, priced there); a view's: none. Other ops: None."""
    if fusible(n) and n.target is not operator.getitem and n.target.is_view:
        return 0.0
    return op_flops_bytes(n)[0] / hw.flops_for(op_compute_dtype(n)) if pointwise(n) else None


def _flat(val) -> list:
    return [y for x in val for y in _flat(x)] if isinstance(val, (list, tuple)) else [val]


_AUX: dict[tuple, int] = {}


def _fake_like(vals):
    """Arguments for tracing an op as on its own device, allocating nothing: FakeTensors of each
    tensor's device. Decompositions branch on the device (a group norm on a CPU computes each
    channel's scale and shift into buffers of their own), so a trace on meta tensors would count
    another lowering than Inductor's for the device."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()

    def fake(t):
        with mode:
            return torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=t.device)
    return _mapped(vals, fake, lambda d: d)


def _meta_like(v):
    """Arguments for tracing an op on meta tensors: nothing is allocated, even by an op that
    makes a tensor on a device its arguments name (``full(..., device=cpu)``)."""
    return _mapped(v, lambda t: torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device="meta"),
                   lambda d: torch.device("meta"))


def _mapped(v, tensor, device):
    """``v`` with each tensor and device in it (through dicts, lists and tuples) mapped."""
    if isinstance(v, torch.Tensor):
        return tensor(v)
    if isinstance(v, torch.device):
        return device(v)
    if isinstance(v, dict):
        return {k: _mapped(x, tensor, device) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_mapped(x, tensor, device) for x in v)
    return v


def _sig(v):
    if isinstance(v, torch.Tensor):
        return ("T", tuple(v.shape), tuple(v.stride()), v.dtype, v.device.type)
    if isinstance(v, (list, tuple)):
        return tuple(_sig(x) for x in v)
    return repr(v)


def _laid_out_as_traced(n: fx.Node) -> bool:
    """Whether the op decomposed as Inductor decomposes it lays its outputs out as the plan
    traced them (eager's layout). Where it does not, the region would compute another layout
    than planned, and what follows could not view it or would copy it: a ``cat`` onto an empty
    cache is contiguous in eager and a clone of its other input, in that input's layout, once
    decomposed (GPT-Neo). Such an op stays out of regions. Strides of size-1 dimensions are
    ignored (they address nothing); an op that does not trace is taken as matching."""
    return _traced(n)[1]


def _same_layout(a, b) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return True
    return tuple(a.shape) == tuple(b.shape) and all(
        x == y for x, y, size in zip(a.stride(), b.stride(), b.shape) if size > 1)


def scratch_bytes(n: fx.Node) -> int:
    """Bytes an op's lowering may hold besides its outputs: the values of its decomposition (the
    table Inductor lowers with) that are neither pointwise, nor views, nor its outputs -- the
    mean and rstd of a layer norm, the product inside an addmm -- and, for a kernel Inductor
    leaves to ATen, the tensors it reads again (``_fallback_reads``). Pointwise intermediates
    fuse into one loop and are not counted, unless read by a library call or through
    ``as_strided``. Traced once per op and argument layout on FakeTensors of the op's device
    (decompositions branch on it); an op that does not trace is given its outputs' bytes again."""
    return _traced(n)[0] if _decomposes(n) else 0


def _decomposes(n: fx.Node) -> bool:
    """An op Inductor lowers through a decomposition of its own (not a getitem, view or loop)."""
    return n.target is not operator.getitem and not n.target.is_view and torch.Tag.pointwise not in n.target.tags


def _traced(n: fx.Node) -> tuple[int, bool, bool]:
    """(scratch bytes, laid out as traced, calls an ATen kernel) of an op, traced once per op
    and argument layout."""
    vals = fx.map_arg((n.args, n.kwargs), lambda x: x.meta.get("val"))
    key = (n.target, _sig(vals), torch.get_num_threads())   # (a half-precision gemm's scratch is per thread)
    if key not in _AUX:
        scratch, layout_ok, calls_aten = _trace_decomposed(n, vals)
        scratch += _fallback_reads(n, vals) + _half_gemm_scratch(n, vals) + _relaid_cat(n, vals)
        scratch += _gemm_operand_copies(n, vals) + (_expanded_reads(vals) if calls_aten else 0)
        _AUX[key] = (scratch, layout_ok, calls_aten)
    return _AUX[key]


_GEMMS = frozenset({"mm", "addmm", "bmm", "baddbmm", "linear", "matmul", "addbmm"})


_GEMM_THREAD_CAP = 256 * 1024   # a thread's blocks: at most ~200 KiB measured, up to 2048 x 2048 x 256
_GEMM_CALL = 16 * 1024          # what a call holds besides (a 7x100 by 100x33 product: 18 KiB on one thread)


def _half_gemm_scratch(n: fx.Node, vals) -> int:
    """A matrix product of 16-bit floats on a CPU converts its operands to float32 and
    accumulates in float32 inside the library call (oneDNN), in blocks held per thread: a
    2x300 by 300x64 bf16 product held 42 KiB on one thread, 85 KiB on two, 169 KiB on four.
    Counted: operands and outputs again at 4 bytes an element, as much again per torch thread
    (capped at a thread's blocks), and a call's own. Planned with this process's thread count:
    a kernel run on more threads than it was planned for may allocate past its region's bytes,
    which the runtime reports at its first call."""
    if n.target._opname not in _GEMMS:
        return 0
    args, kwargs = vals
    read = [t for t in _flat(args) + _flat(list(kwargs.values())) if isinstance(t, torch.Tensor)]
    if not any(t.dtype in (torch.bfloat16, torch.float16) and t.device.type == "cpu" for t in read):
        return 0
    outs = [t for t in _flat(n.meta.get("val")) if isinstance(t, torch.Tensor)]
    widened = sum(4 * t.numel() for t in read + outs)
    return widened + torch.get_num_threads() * min(widened, _GEMM_THREAD_CAP) + _GEMM_CALL


def _expanded_reads(vals) -> int:
    """An op decomposed into a kernel Inductor leaves to ATen gets its expanded operands (a
    stride 0 where the size is above 1) as dense copies: a multi-query attention's one key and
    value head expanded over the query heads (RecurrentGemma: 6 KiB past its region). Counted:
    each such operand's dense bytes."""
    args, kwargs = vals
    return sum(t.numel() * t.element_size() for t in _flat(args) + _flat(list(kwargs.values()))
               if isinstance(t, torch.Tensor) and any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)))


def _gemm_operand_copies(n: fx.Node, vals) -> int:
    """A matrix product's operand the library call cannot read in place: Inductor copies it to a
    buffer of its own first (Jamba's linear of a transposed sequence: 6 KiB past its region).
    A matrix (the last two dimensions of a batch) is read in place when one of its dimensions
    has stride 1; a batch folded into rows (``linear``, ``matmul`` of more than two dimensions)
    needs its input contiguous. Counted: each such operand's bytes again."""
    name = n.target._opname
    if name not in _GEMMS:
        return 0
    args, kwargs = vals
    folds = name in ("linear", "matmul")
    copies = 0
    for t in _flat(args) + _flat(list(kwargs.values())):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            continue
        if (folds and t.dim() > 2 and not t.is_contiguous()) or 1 not in (t.stride(-1), t.stride(-2)):
            copies += t.numel() * t.element_size()
    return copies


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _relaid_cat(n: fx.Node, vals) -> int:
    """A ``cat`` reading a channels-last tensor where eager's result is not channels-last:
    Inductor's concatenation lays its result out channels-last when one input is, and copies it
    to the layout the program has where it is returned or viewed (LeViT's attention concatenated
    a permuted key with its value: 7.5 KiB twice in a training step's region). Counted: its
    output again."""
    if n.target is not torch.ops.aten.cat.default:
        return 0
    val = n.meta.get("val")
    fmt = _CHANNELS_LAST.get(val.dim()) if isinstance(val, torch.Tensor) else None
    if fmt is None or val.is_contiguous(memory_format=fmt):
        return 0
    parts = _flat(vals[0][0]) if vals[0] else []
    relaid = any(isinstance(t, torch.Tensor) and t.dim() == val.dim() and t.is_contiguous(memory_format=fmt)
                 for t in parts)
    return val.numel() * val.element_size() if relaid else 0


def _held_inside(n: fx.Node) -> int:
    """What an op may hold inside a region besides its outputs: its lowering's scratch and, for a
    kernel Inductor leaves to ATen, what that kernel was measured to hold when the program was
    analysed (``info(n).scratch``, CPU): the same ATen kernel runs inside the region (a MoE
    router's ``histc`` made its bin edges beside its histogram: 4 B past a region's bytes). So
    does an op whose decomposition calls one: an attention's CPU flash kernel holds its blocks
    (RecurrentGemma's local attention: 4.3 KiB past its region)."""
    from torch._inductor.lowering import fallbacks

    held = scratch_bytes(n)
    if MEMSCHED_KEY in n.meta and (n.target in fallbacks or (_decomposes(n) and _traced(n)[2])):
        held += info(n).scratch or 0
    return held


def _fallback_reads(n: fx.Node, vals) -> int:
    """A kernel Inductor leaves to ATen (its lowering's ``fallbacks``) may copy what it reads
    inside the call -- a cumsum of int32 widens its input to int64 first -- so each tensor it
    reads counts again, at its outputs' widest element size if that is wider."""
    from torch._inductor.lowering import fallbacks

    if n.target not in fallbacks:
        return 0
    args, kwargs = vals
    widest = max((t.element_size() for t in _flat(n.meta.get("val")) if isinstance(t, torch.Tensor)), default=1)
    read = {k: max(b, t.numel() * widest) for t in _flat(args) + _flat(list(kwargs.values()))
            if isinstance(t, torch.Tensor) for k, b in storages(t)}
    return sum(read.values())


def _trace_decomposed(n: fx.Node, vals) -> tuple[int, bool, bool]:
    """(bytes of its decomposition's values that are not fused away, laid out as traced, calls a
    kernel Inductor leaves to ATen)."""
    from torch._inductor.decomposition import select_decomp_table
    from torch._inductor.lowering import fallbacks
    from torch.fx.experimental.proxy_tensor import make_fx

    def trace(args, kwargs):
        return make_fx(lambda a, k: n.target(*a, **k), decomposition_table=select_decomp_table())(args, kwargs)

    try:
        gm = trace(*_fake_like(vals))
    except Exception:  # noqa: BLE001 - traced on meta tensors instead, as it is on devices fakes cannot take
        try:
            gm = trace(*_meta_like(vals))
        except Exception:  # noqa: BLE001 - an op the meta tracer cannot run: count its outputs again
            return sum(b for _, b in storages(n.meta.get("val"))), True, False
    out_node = next(x for x in reversed(gm.graph.nodes) if x.op == "output")
    made = [x.meta.get("val") if isinstance(x, fx.Node) else x for x in _flat(out_node.args[0])]
    layout_ok = all(_same_layout(a, b) for a, b in zip(made, _flat(n.meta.get("val"))))
    returned = set(out_node.all_input_nodes)
    total = 0
    for x in gm.graph.nodes:
        if x.op != "call_function" or x in returned or x.target is operator.getitem:
            continue
        t = x.target
        if isinstance(t, torch._ops.OpOverload) and t.is_view:
            continue
        if isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags and not _feeds_a_library_call(x):
            continue
        total += sum(b for _, b in storages(x.meta.get("val")))
    return total, layout_ok, any(x.op == "call_function" and x.target in fallbacks for x in gm.graph.nodes)


def _loop_op(x: fx.Node) -> bool:
    t = x.target
    return x.op == "call_function" and (t is operator.getitem or (isinstance(t, torch._ops.OpOverload)
                                                                  and (t.is_view or torch.Tag.pointwise in t.tags)))


def _feeds_a_library_call(x: fx.Node) -> bool:
    """A pointwise value that an op outside the loop reads (directly or through views) is written
    to memory for it: an einsum's operands made contiguous (``clone``) for its ``bmm``. So is one
    read through ``as_strided``, whose lowering realizes its input: a CPU group norm's per-channel
    scale and shift (a PoolFormer region allocated 2.5 KiB against 2 KiB counted)."""
    stack = list(x.users)
    while stack:
        u = stack.pop()
        if u.op == "call_function" and u.target is torch.ops.aten.as_strided.default:
            return True
        if u.op == "call_function" and isinstance(u.target, torch._ops.OpOverload) and u.target.is_view:
            stack.extend(u.users)
        elif u.op == "call_function" and not _loop_op(u):
            return True
    return False


def _computes(n: fx.Node) -> bool:
    return n.target is not operator.getitem and not n.target.is_view


@dataclass
class _Run:
    held_before: int                                   # device bytes held before its first op
    members: list = field(default_factory=list)
    frees: list = field(default_factory=list)          # (free node, members before it)
    made: dict = field(default_factory=dict)           # storage key -> bytes its ops make
    scratch: int = 0                                   # bytes its ops' lowerings may hold besides
    outside: set = field(default_factory=set)          # storage keys of the values it reads

    def _outside_keys(self, n: fx.Node) -> set:
        inside = set(self.members)
        return {k for x in n.all_input_nodes if x not in inside for k, _ in storages(x.meta.get("val"))}

    def cost_with(self, n: fx.Node) -> int:
        """Bytes made if ``n`` joins."""
        outside = self.outside | self._outside_keys(n)
        extra = {k: b for k, b in storages(n.meta.get("val")) if k not in outside and k not in self.made}
        return sum(self.made.values()) + sum(extra.values()) + self.scratch + _held_inside(n)

    def add(self, n: fx.Node) -> None:
        self.outside |= self._outside_keys(n)
        for k, b in storages(n.meta.get("val")):
            if k not in self.outside:
                self.made[k] = b
        self.scratch += _held_inside(n)
        self.members.append(n)

    def outputs(self) -> list:
        """The members read after the run (frees aside): what its region returns."""
        inside = set(self.members)
        return [m for m in self.members if any(u not in inside and op_of(u) is not Op.FREE for u in m.users)]

    def nbytes(self) -> int:
        """What the region may allocate: every storage its ops make, their lowerings' scratch,
        a buffer the size of the viewed value for each output viewing part of a value made inside
        (Inductor returned a slice of a product in a fresh buffer beside the product) or viewing a value
        another output returns (a softmax returned with its ``detach``: two buffers), one for
        each output reshaping a value not laid out contiguously (``_reshapes_a_strided_value``),
        and one for each output of an op that may or may not copy (``_may_copy``)."""
        again, returned, inside = 0, set(), set(self.members)
        for o in self.outputs():
            val = o.meta.get("val")
            if o.target is operator.getitem or not isinstance(val, torch.Tensor):
                continue
            keys = {k for k, _ in storages(val) if k in self.made}
            # a view of part of a value made here (a whole one is returned as that buffer,
            # unless another output already is); or an op that may return its input as it is
            # (``to`` a dtype it has, ``reshape``), which Inductor's decomposition may make a copy
            if keys and _is_view(o) and (not _whole(val) or keys & returned):
                # a buffer as large as the viewed value's: Inductor keeps the view's strides
                # (a decode step's attention returned the first 16 of 17 columns in 544 B)
                again += val.untyped_storage().nbytes()
            elif keys and _reshapes_a_strided_value(o, inside):
                again += val.numel() * val.element_size()
            elif _may_copy(o):
                again += val.numel() * val.element_size()
            returned |= keys
        return sum(self.made.values()) + self.scratch + again

    def _cut(self, end: int) -> "_Run":
        run = _Run(self.held_before)
        for x in self.members[:end]:
            run.add(x)
        run.frees = [(f, k) for f, k in self.frees if k <= end]
        return run

    def trimmed(self) -> "_Run | None":
        """The run cut before its first multi-output op whose getitems it does not all hold
        (a region returns tensors, not tuples); None when too little is left to fuse."""
        inside = set(self.members)
        for i, m in enumerate(self.members):
            if not isinstance(m.meta.get("val"), torch.Tensor) and any(
                    u not in inside and op_of(u) is not Op.FREE for u in m.users):
                return self._cut(i).trimmed()
        return self if sum(_computes(m) for m in self.members) >= 2 else None

    def fitted(self, budget: int) -> "_Run | None":
        """The run trimmed, then cut shorter while what it may allocate (``nbytes``, which
        counts the outputs only known at its end) does not fit beside what is held before it."""
        run = self.trimmed()
        while run is not None and run.held_before + run.nbytes() > budget:
            run = run._cut(len(run.members) - 1).trimmed()
        return run


def _whole(t: torch.Tensor) -> bool:
    """A view addressing every byte of its storage from its start (a transpose, a reshape)."""
    return t.storage_offset() == 0 and t.numel() * t.element_size() == t.untyped_storage().nbytes()


_RESHAPES = frozenset({"view", "_unsafe_view", "reshape"})


def _reshapes_a_strided_value(o: fx.Node, inside: set) -> bool:
    """Whether a returned view reshapes, somewhere along its views inside the region, a value
    not laid out contiguously: eager views it where the strides allow, Inductor reshapes only a
    contiguous buffer in place and otherwise reindexes it in a loop, which a returned value
    makes a buffer of its own (Mamba2 split the heads of a product of permuted operands: 3 KiB
    more than its values)."""
    x = o
    while x in inside and _is_view(x) and isinstance(x.args[0], fx.Node):
        src = x.args[0].meta.get("val")
        if x.target._opname in _RESHAPES and isinstance(src, torch.Tensor) and not src.is_contiguous():
            return True
        x = x.args[0]
    return False


def _is_view(n: fx.Node) -> bool:
    return n.target is not operator.getitem and n.target.is_view


def _may_copy(n: fx.Node) -> bool:
    """An op that may alias its input (a view by its schema) and is decomposed, not a view
    kernel of its own: ``to``, ``reshape``, ``contiguous``."""
    t = n.target
    return t.is_view and torch._C._dispatch_has_kernel_for_dispatch_key(t.name(), "CompositeImplicitAutograd")


def find_regions(gm: fx.GraphModule, budget: int, hardware=None) -> list[_Run]:
    """The runs of the program that become regions, in program order."""
    memory = DeviceMemory(getattr(hardware, "alloc_block_bytes", 1), getattr(hardware, "workspace_bytes", 0))
    runs, run = [], None

    def close():
        kept = run.fitted(budget) if run is not None else None
        if kept is not None:
            runs.append(kept)

    for n in gm.graph.nodes:
        if run is not None and op_of(n) is Op.FREE:
            run.frees.append((n, len(run.members)))
        elif fusible(n) and (n.target is not operator.getitem or (run is not None and n.args[0] in run.members)):
            if run is not None and (len(run.members) >= MAX_REGION_OPS
                                    or run.held_before + run.cost_with(n) > budget):
                close()
                run = None
            if run is None:
                run = _Run(memory.current)
            run.add(n)
        else:
            close()
            run = None
        memory.visit(n)
    close()
    return runs


def _named_runs(gm: fx.GraphModule, groups: list[tuple[str, ...]], hardware=None) -> list[_Run]:
    """The runs a saved plan fused, found by their ops' names; ValueError where a group is not a
    run of fusible ops in program order (frees between them aside) that a region can return."""
    memory = DeviceMemory(getattr(hardware, "alloc_block_bytes", 1), getattr(hardware, "workspace_bytes", 0))
    starts = {g[0]: tuple(g) for g in groups if g}
    if len(starts) != len(groups) or any(len(g) > MAX_REGION_OPS for g in groups):
        raise ValueError(f"each region holds 1 to {MAX_REGION_OPS} ops and starts at an op of its own")
    runs, run, want = [], None, ()
    for n in gm.graph.nodes:
        if run is not None and op_of(n) is Op.FREE:
            run.frees.append((n, len(run.members)))
        elif run is not None:
            expected = want[len(run.members)]
            if n.name != expected or not fusible(n) or (n.target is operator.getitem and n.args[0] not in run.members):
                raise ValueError(f"the region from {want[0]} runs {expected} next, the program has {n.name} there"
                                 if n.name != expected else f"{n.name} cannot run inside a region")
            run.add(n)
        elif n.name in starts:
            want = starts.pop(n.name)
            if not fusible(n) or n.target is operator.getitem:
                raise ValueError(f"{n.name} cannot run inside a region")
            run = _Run(memory.current)
            run.add(n)
        if run is not None and len(run.members) == len(want):
            if run.trimmed() is not run:
                raise ValueError(f"the region from {want[0]} returns a tuple or fuses fewer than two ops")
            runs.append(run)
            run = None
        memory.visit(n)
    if run is not None or starts:
        missing = want[len(run.members)] if run is not None else next(iter(starts))
        raise ValueError(f"the program has no {missing} where a region runs it")
    return runs


def _subgraph(members: list, inputs: list, outputs: list) -> fx.GraphModule:
    """The members as a graph of their own, named canonically (in0.., op0..) so that the same
    ops on the same shapes print, hash and compile the same."""
    sub, env = fx.Graph(), {}
    for i, x in enumerate(inputs):
        env[x] = p = sub.placeholder(f"in{i}")
        p.meta["val"] = x.meta.get("val")
    for j, m in enumerate(members):
        args = fx.map_arg(m.args, env.__getitem__)
        kwargs = fx.map_arg(m.kwargs, env.__getitem__)
        env[m] = c = sub.create_node("call_function", m.target, args, kwargs, name=f"op{j}")
        c.meta["val"] = m.meta.get("val")
        if MEMSCHED_KEY in m.meta:   # what the planner knows of it (a recomputation says what it restores)
            c.meta[MEMSCHED_KEY] = m.meta[MEMSCHED_KEY]
    sub.output(tuple(env[o] for o in outputs))
    return fx.GraphModule(torch.nn.Module(), sub, class_name="Region")


def _rewrite(graph: fx.Graph, run: _Run, index: int) -> None:
    """Replace the run's members by one region node and a getitem per value read after it;
    its frees follow, without the values that never leave the region."""
    members, inside = run.members, set(run.members)
    # a value only frees read after the region is dead when it returns: it stays inside
    outputs = [m for m in members if any(u not in inside and op_of(u) is not Op.FREE for u in m.users)]
    inputs = list(dict.fromkeys(x for m in members for x in m.all_input_nodes if x not in inside))
    sub = _subgraph(members, inputs, outputs)
    reg = Region(sub, tuple(target_name(m.target) for m in members if m.target is not operator.getitem),
                 run.nbytes(), structure_key(sub),
                 tuple(m.name for m in members))
    with graph.inserting_before(members[0]):
        node = graph.create_node("call_function", region, tuple(inputs), name=f"fused_{index}")
    annotate(node, made_by="fuse")
    node.meta[KEY] = reg
    last, getters = node, []
    for i, o in enumerate(outputs):
        with graph.inserting_after(last):
            last = g = graph.call_function(operator.getitem, (node, i))
        g.meta = dict(o.meta)
        if MEMSCHED_KEY in g.meta:   # the op runs inside the region, whose bytes count what it holds
            annotate(g, scratch=None)
        o.replace_all_uses_with(g, delete_user_cb=lambda u: u not in inside)
        getters.append((g, o.name))
    moved = {f for f, _ in run.frees}
    for f in dict.fromkeys(u for m in members for u in m.users if op_of(u) is Op.FREE and u not in moved):
        _drop_args(graph, f, inside)      # a later free of a value that stayed inside
    for f, _ in run.frees:
        if _drop_args(graph, f, inside):
            last.append(f)
            last = f
    for m in reversed(members):
        graph.erase_node(m)
    for g, name in getters:
        _rename(g, name)


def _rename(node: fx.Node, name: str) -> None:
    """Give ``node`` the name of an erased node: values keep their names, by which moves name
    them (saves=/restores=) and the listing shows them; fx's own _rename would pick a fresh
    one, the name being still reserved."""
    node.name = name
    node.graph._graph_namespace._rename_object(node, name)


def _drop_args(graph: fx.Graph, f: fx.Node, inside: set) -> bool:
    """Take the region's inner values out of free ``f``; erase it when nothing is left."""
    kept = tuple(a for a in f.args if a not in inside)
    if not kept:
        graph.erase_node(f)
        return False
    f.args = kept
    return True


def fuse(gm: fx.GraphModule, budget: int, hardware=None) -> tuple[fx.GraphModule, list[Region]]:
    """A copy of the scheduled program ``gm`` with its compute fused into regions, each within
    ``budget`` beside what is held before it (counted as ``hardware``'s allocator counts)."""
    return _fused(gm, lambda copy: find_regions(copy, budget, hardware))


def fuse_as(gm: fx.GraphModule, groups: list[tuple[str, ...]], hardware=None) -> tuple[fx.GraphModule, list[Region]]:
    """A copy of the scheduled program ``gm`` with the ops named in each group fused into one
    region, as a saved plan fused them (regions re-made, never chosen again: the plan runs as
    it was saved and inspected). ValueError names the first group the program cannot fuse so.
    What each region may allocate is counted again here; the verifier checks the budget."""
    return _fused(gm, lambda copy: _named_runs(copy, groups, hardware))


def _fused(gm: fx.GraphModule, runs_of) -> tuple[fx.GraphModule, list[Region]]:
    """A copy of ``gm`` with the runs ``runs_of(copy)`` finds rewritten into regions."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    fused = lazy_graph_module(gm, graph, class_name="Fused")
    for i, run in enumerate(runs_of(fused)):
        _rewrite(graph, run, i)
    graph.lint()
    return fused, [n.meta[KEY] for n in graph.nodes if op_of(n) is Op.REGION]


def unfuse(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with each region replaced by its ops under their former names, and one
    free after them of the values that never left it (so that a saved fused plan can be paired
    with a fresh capture, then fused again). It holds no more than the fused program: the
    region's declared bytes cover every value it makes held to its end."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    for node in [n for n in graph.nodes if op_of(n) is Op.REGION]:
        reg = region_of(node)
        sub_nodes = list(reg.graph.graph.nodes)
        env = dict(zip([x for x in sub_nodes if x.op == "placeholder"], node.args))
        made = []
        with graph.inserting_before(node):
            for j, x in enumerate(x for x in sub_nodes if x.op == "call_function"):
                args, kwargs = fx.map_arg((x.args, x.kwargs), env.__getitem__)
                # a passing name: the final ones are still taken by the getitems
                env[x] = new = graph.create_node("call_function", x.target, args, kwargs,
                                                 name=f"unfused_{node.name}_{j}")
                new.meta = dict(x.meta)
                made.append(new)
        outputs = [env[x] for x in output_node(reg.graph).args[0]]
        for g in list(node.users):
            g.replace_all_uses_with(outputs[g.args[1]])
            graph.erase_node(g)
        inner = [m for m in made if m not in outputs]
        if inner:
            with graph.inserting_after(made[-1]):
                annotate(graph.call_function(free, tuple(inner)), made_by="fuse")
        graph.erase_node(node)
        for new, name in zip(made, reg.names):
            _rename(new, name)
    graph.lint()
    return lazy_graph_module(gm, graph, class_name="Unfused")
