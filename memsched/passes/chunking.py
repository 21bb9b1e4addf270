"""Chunked ops: a module that maps every row of its input on its own (a token, a batch item)
can run on slices of that input and concatenate what it returns (mini-sequence training,
Liger-style). Its intermediates then exist one slice at a time, which lowers the working set
of the ops inside it -- the floor, when one of them binds it (an MLP's wide hidden layer).

Which modules qualify is read off the captured forward graph, not off class names: the nodes
torch.export tags with a module's path must read one activation (plus weights), return one
value, and every op on a value derived from that activation must keep some of its leading
(row) dimensions apart -- pointwise ops against weights, matmuls against weights, reductions,
norms and softmaxes over trailing dims, views that do not mix rows (one that merges the batch
with dims after it -- an image's attention windows -- leaves each row a block of the merged dim,
and a value without rows may vary along it if it repeats within every block: a window mask
expanded over the images). An op that mixes some row
dims narrows the module's rows to the dims before them (a convolution keeps the batch,
attention batch and heads); one that mixes them all disqualifies it. The model itself (ROOT)
is a candidate too: split, it runs on micro-batches. Random ops (dropout) disqualify a module:
a split would draw its random numbers in another order.

The split changes no maths; outputs equal eager up to floating-point summation order (a weight
gradient sums the slices' partial products). The pipeline applies it only when a budget is
below the minimum without it, and picks the slice count (see ``pipeline.chunk_pass``)."""
from __future__ import annotations

import contextlib
import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import UnsupportedModelError
from ..frontend.capture import Captured
from ..frontend.loss_head import find_loss_heads
from ..frontend.repeats import identical_modules
from ..ir.kinds import Kind
from ..kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.memsched.*)

aten = torch.ops.aten

# ops that keep rows apart given where their arguments' rows are (see _rows_of)
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.flatten.using_ints,
          aten.unflatten.int}
_SAME_SHAPE = {aten._to_copy.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
               aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten.lift_fresh_copy.default}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
               aten.var.correction, aten.std.correction, aten.logsumexp.default, aten.cumsum.default,
               aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim}
_ORDER_FIRST = {aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim}   # (input, ord, dim, ...)
_SOFTMAX = {aten._softmax.default, aten._log_softmax.default, aten.softmax.int, aten.log_softmax.int}
_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
          aten._fused_rms_norm.default}
_KERNEL_RMS_NORM, _KERNEL_ROPE = torch.ops.memsched.rms_norm.default, torch.ops.memsched.rope.default
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
_SLICES = {aten.slice.Tensor, aten.select.int, aten.narrow.default}
# (input, p, train): with p = 0 or train off they draw nothing
_DROPOUTS = {aten.dropout.default, aten.dropout_.default, aten.feature_dropout.default,
             aten.feature_dropout_.default, aten.alpha_dropout.default}
_CONVOLUTIONS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.convolution.default,
                 aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input}
# ops that keep only the batch (dim 0) apart: convolutions mix channels and space, group
# norms a group's channels
_BATCH_ONLY = _CONVOLUTIONS | {aten.group_norm.default, aten.native_group_norm.default}
# ops that keep batch and channels (dims 0, 1) apart and mix the spatial dims after them
_SPATIAL = {aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default,
            aten.max_pool2d_with_indices.default, aten.avg_pool1d.default, aten.avg_pool2d.default,
            aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
            aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool2d.default, aten.adaptive_max_pool2d.default,
            aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec}
# batch norm with running statistics: per channel, so the batch stays apart (with batch
# statistics -- training -- it mixes the batch and is not read here)
_EVAL_BATCH_NORM = {aten._native_batch_norm_legit_no_training.default}
_PADS = {aten.pad.default, aten.constant_pad_nd.default}
# attention and batched matmuls keep their operands' leading (batch, head) dims apart
_ATTENTION = {aten.scaled_dot_product_attention.default}
_BATCHED_MATMULS = {aten.bmm.default}
_BATCH_NORMS = {aten.batch_norm.default, aten.native_batch_norm.default}   # training flag: 6th argument


# Not a module: the LM head with its cross-entropy, found in the exported forward of a training
# step and run by the chunked kernel (frontend/loss_head.py) when a Chunking names it.
LOSS_HEAD = "<lm-head-loss>"
# The model itself: split, it runs on slices of its one input (micro-batches, for a model whose
# every op keeps the batch apart: a CNN in eval mode, an encoder without a padding mask).
ROOT = ""


@dataclass(frozen=True)
class Chunking:
    """Run the module at ``path`` on ``chunks`` slices of its input along ``dim``."""

    path: str
    dim: int
    chunks: int

    def __str__(self) -> str:
        if self.path == LOSS_HEAD:
            return f"LM head + cross-entropy x{self.chunks} (rows)"
        if self.path == ROOT:
            return f"the whole model x{self.chunks} (dim {self.dim})"
        return f"{self.path} x{self.chunks} (dim {self.dim})"


@dataclass(frozen=True)
class RowLocal:
    """A module found to keep its input's rows apart, with what splitting it can save."""

    path: str
    dims: tuple[int, ...]   # the input's sizes along its row dims (``dim_for`` picks one)
    inner_bytes: int        # the largest value it makes from the rows
    edge_bytes: int         # the larger of its input and its outputs

    def dim_for(self, chunks: int, start: int = 0) -> int:
        """The outermost row dim from ``start`` with at least ``chunks`` rows (its slices are
        contiguous in a contiguous input), else the longest."""
        dims = range(start, len(self.dims))
        return next((d for d in dims if self.dims[d] >= chunks), max(dims, key=lambda d: self.dims[d]))


def _nbytes(n) -> int:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def _shape(n: fx.Node) -> tuple[int, ...] | None:
    v = n.meta.get("val")
    return tuple(int(x) for x in v.shape) if isinstance(v, torch.Tensor) else None


def _dims(dim, ndim: int) -> list[int]:
    ds = dim if isinstance(dim, (list, tuple)) else [dim]
    return [d % ndim for d in ds] if ndim else []


class _NotLocal(Exception):
    pass


def _rows_of(n: fx.Node, rows: dict[fx.Node, int]) -> int | None:
    """How many leading dims of ``n``'s value keep the module input's rows apart (each index
    along them depends on the same index of the input only), or None when it does not depend
    on the input. An op that mixes some of its argument's row dims keeps fewer (a convolution
    keeps the batch only); _NotLocal when it keeps none or draws random numbers."""
    q = _rows_unchecked(n, rows)
    if q is not None and q < 1:
        raise _NotLocal(f"{n.name} mixes every row dim")
    return q


def _rows_unchecked(n: fx.Node, rows: dict[fx.Node, int]) -> int | None:
    t = n.target
    if t in _DROPOUTS and (n.args[1] == 0 or not n.args[2]):
        return rows.get(n.args[0])   # dropout with p = 0, or off: draws nothing
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags and t not in _ATTENTION:
        raise _NotLocal(f"{n.name} draws random numbers")   # (attention: when its dropout is on)
    if all(rows.get(a) is None for a in n.all_input_nodes):
        return None
    if not isinstance(t, torch._ops.OpOverload) and t is not operator.getitem:
        raise _NotLocal(f"{n.name}: {t}")
    if t is operator.getitem:
        return rows.get(n.args[0])
    if t._schema.is_mutable and rows.get(n.args[0]) is None:   # later reads of it would miss the rows
        raise _NotLocal(f"{n.name} writes rows into a value without them")
    if torch.Tag.pointwise in t.tags or t in _SAME_SHAPE:
        return _lined_up(n, rows, _shape(n), set())
    if t is aten.cat.default:
        return _lined_up(n, rows, _shape(n), {_dims(n.args[1] if len(n.args) > 1 else 0, len(_shape(n)))[0]})
    if t in _ATTENTION or t in _BATCHED_MATMULS or (t is aten.matmul.default and rows.get(n.args[1]) is not None):
        return _attention_rows(n, rows)
    if t is aten.addmm.default:   # bias + rows @ weight
        if rows.get(n.args[0]) is not None or not rows.get(n.args[1]) or rows.get(n.args[2]) is not None:
            raise _NotLocal(f"{n.name} multiplies along rows or adds a row-carrying bias")
        return 1
    if t is _KERNEL_ROPE:   # mixes the halves of the last dim only, like a cat along it
        return _lined_up(n, rows, _shape(n), {len(_shape(n)) - 1})
    p = rows.get(n.args[0])
    if t is aten.expand_as.default:   # the second argument gives a shape only
        if p is not None and (_shape(n)[:p] != _shape(n.args[0])[:p] or len(_shape(n)) != len(_shape(n.args[0]))):
            raise _NotLocal(f"{n.name} repeats the rows")
        return p
    if p is None or any(rows.get(a) is not None for a in n.all_input_nodes[1:]):
        raise _NotLocal(f"{n.name}: rows enter through another argument than the first")
    return _one_input_rows(n, p, len(_shape(n.args[0])))


def _one_input_rows(n: fx.Node, p: int, ndim: int) -> int:
    """An op whose first argument alone carries rows (the others: weights, constants)."""
    t = n.target
    if t in _VIEWS:
        return _view_rows(n, p)
    if t in (aten.mm.default, aten.linear.default, aten.matmul.default):   # contracts the last dim
        if t is aten.matmul.default and len(_shape(n.args[1])) > 2:
            raise _NotLocal(f"{n.name} multiplies by a batch of matrices without rows")
        return min(p, ndim - 1)
    if t in _REDUCTIONS or t in _SOFTMAX or t in _SLICES or t in _SPLITS:
        return _along_dims(n, p, ndim)
    if t in _NORMS:
        return min(p, ndim - len(n.args[1]))
    if t is _KERNEL_RMS_NORM:   # over the last dim
        return min(p, ndim - 1)
    if t in _PADS:   # pads the trailing dims, the last first
        padded = [ndim - 1 - i // 2 for i, w in enumerate(n.args[1]) if w]
        return min(p, *padded) if padded else p
    if t in _BATCH_ONLY or t in _EVAL_BATCH_NORM or (t in _BATCH_NORMS and not n.args[5]):
        if t in _CONVOLUTIONS and ndim != len(_shape(n.args[1])):
            raise _NotLocal(f"{n.name} convolves an input without a batch dim")
        return min(p, 1)
    if t in _SPATIAL:
        return min(p, ndim - _spatial_dims(t))
    if t is aten.roll.default:   # a cyclic shift along its dims (no dims: of the flattened value)
        return min(p, *_dims(n.args[2], ndim)) if len(n.args) > 2 and n.args[2] else 0
    if t in (aten.unsqueeze.default, aten.squeeze.dim):
        return min(p, _dims(n.args[1], ndim + (t is aten.unsqueeze.default))[0])
    if t in (aten.expand.default, aten.repeat.default):   # new leading dims shift the rows
        grown = len(n.args[1]) - ndim
        before = _shape(n.args[0])
        if grown or any(_shape(n)[d] != before[d] for d in range(p)):
            raise _NotLocal(f"{n.name} repeats the rows")
        return p
    if t in (aten.transpose.int, aten.permute.default):
        perm = list(range(ndim))
        if t is aten.transpose.int:
            a, b = _dims(n.args[1], ndim)[0], _dims(n.args[2], ndim)[0]
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm = _dims(n.args[1], ndim)
        return max(i for i in range(p + 1) if perm[:i] == list(range(i)))   # the dims left in place
    raise _NotLocal(f"{n.name}: {t} is not known to keep rows apart")


def _lined_up(n: fx.Node, rows: dict, shape: tuple, along: set[int]) -> int:
    """A pointwise op, or a concatenation along dims ``along``: the row dims every row-carrying
    input keeps, on the output's sizes, that the other inputs read alike for every row
    (``_broadcast_rows``) and that are not concatenated along."""
    ins = [a for a in _tensor_args(n)]
    p = min(rows[a] for a in ins if rows.get(a) is not None)
    p = min(p, *along) if along else p
    for a in ins:
        if rows.get(a) is None:
            p = min(p, _broadcast_rows(shape, a, p, _input_rows(rows)))
        elif _shape(a)[:p] != shape[:p]:
            raise _NotLocal(f"{n.name} combines rows of different layouts")
    return p


def _tensor_args(n: fx.Node) -> list[fx.Node]:
    """The tensor arguments of ``n``, those in a list argument (``cat``) or passed by name too."""
    out = []
    for a in (*n.args, *n.kwargs.values()):
        for x in a if isinstance(a, (list, tuple)) else [a]:
            if isinstance(x, fx.Node) and isinstance(x.meta.get("val"), torch.Tensor):
                out.append(x)
    return out


def _attention_rows(n: fx.Node, rows: dict) -> int:
    """Attention or a batched matmul: the leading (batch, head) dims its operands share are
    kept, the last two mixed. Operands without rows must read alike for every row; attention
    dropout draws random numbers."""
    t, out = n.target, _shape(n)
    if t in _ATTENTION and (n.args[4] if len(n.args) > 4 else n.kwargs.get("dropout_p", 0.0)):
        raise _NotLocal(f"{n.name} draws random numbers (attention dropout)")
    p = len(out) - 2
    for a in _tensor_args(n):
        if rows.get(a) is None:
            p = min(p, _broadcast_rows(out, a, p, _input_rows(rows)))
        else:   # the leading dims it keeps on the output's sizes (grouped-query heads differ)
            kept = min(p, rows[a])
            p = next((d for d in range(kept) if len(_shape(a)) != len(out) or _shape(a)[d] != out[d]), kept)
    return p


def _input_rows(rows: dict) -> int:
    """The module input's size along its first row dim (``row_local`` enters the input first)."""
    return _shape(next(iter(rows)))[0]


def _broadcast_rows(out: tuple, other: fx.Node, p: int, input_rows: int) -> int:
    """The leading row dims of a result that a value without rows, broadcast against it, reads
    alike for every row: those it spans with size 1 or stride 0 (an ``expand``). Along dim 0,
    where each input row owns a block of ``out[0] / input_rows`` entries (windows of an image
    merged into the batch), a value that repeats within every block reads alike too."""
    val = other.meta.get("val")
    shape, stride = tuple(val.shape), tuple(val.stride())
    offset = len(out) - len(shape)
    for d in range(max(offset, 0), p):
        if shape[d - offset] != 1 and stride[d - offset] != 0:
            block, rest = divmod(out[0], input_rows)
            if d == 0 and offset == 0 and not rest and block % _period(other) == 0:
                continue
            return d
    return p


def _period(n: fx.Node, depth: int = 0) -> int:
    """After how many entries a value without rows repeats along its dim 0: 1 when it reads
    alike along it (size 1, stride 0); P x K where a dim of period P was merged with K entries
    after it (a per-window mask ``expand``ed over the batch, then flattened into it); else its
    size. Walks back through views and elementwise ops only."""
    val = n.meta.get("val")
    size = int(val.shape[0]) if isinstance(val, torch.Tensor) and val.dim() else 1
    if size == 1 or val.stride()[0] == 0:
        return 1
    t = n.target
    if depth > 32 or not isinstance(t, torch._ops.OpOverload):
        return size
    if t in _VIEWS:
        before = _shape(n.args[0])
        j = next((j for j in range(1, len(before) + 1) if math.prod(before[:j]) == size), None)
        return size if j is None else min(size, _period(n.args[0], depth + 1) * math.prod(before[1:j]))
    if t is aten.unsqueeze.default and _dims(n.args[1], val.dim())[0] > 0:
        return _period(n.args[0], depth + 1)
    if torch.Tag.pointwise in t.tags or t in _SAME_SHAPE or t is aten.clone.default:
        period = 1
        for a in _tensor_args(n):
            s = _shape(a)
            if len(s) == val.dim() and s[0] != 1:   # spans dim 0 (fewer dims or size 1 broadcast)
                period = math.lcm(period, _period(a, depth + 1))
        return min(period, size)
    return size


def _view_rows(n: fx.Node, p: int) -> int:
    """A reshape keeps the rows when it leaves their sizes as leading dims (merged or split),
    else the leading row dims it leaves as they were."""
    before, shape = _shape(n.args[0]), _shape(n)
    total, rest = math.prod(before[:p]), math.prod(before[p:])
    for q in range(len(shape) + 1):
        if math.prod(shape[:q]) == total and shape[q:] and math.prod(shape[q:]) == rest:
            return q
    kept = max(q for q in range(p + 1) if shape[:q] == before[:q] and math.prod(shape[q:]) == math.prod(before[q:]))
    if kept == 0 and p and any(math.prod(before[:j]) == shape[0] for j in range(2, len(before) + 1)):
        return 1   # dim 0 merged with dims after it (an image's windows): each row owns a block
    return kept


def _spatial_dims(t) -> int:
    """How many trailing dims a pooling or resizing op mixes (from its name: ``..2d``)."""
    return int(next(c for c in reversed(t.name().split("::")[-1].split(".")[0]) if c.isdigit()))


def _along_dims(n: fx.Node, p: int, ndim: int) -> int:
    """A reduction, scan, softmax, slice or split keeps the row dims before the first it works along."""
    t = n.target
    # where the op's dim argument sits: second for reductions, softmaxes and slices (slice,
    # select, narrow, unbind), third for splits (after the sizes) and norms (after the order)
    at = 2 if (t in _SPLITS and t is not aten.unbind.int) or t in _ORDER_FIRST else 1
    dim = n.args[at] if len(n.args) > at else n.kwargs.get("dim", None if t in _REDUCTIONS else 0)
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        raise _NotLocal(f"{n.name} reduces over every dim")
    return min(p, *_dims(dim, ndim))


def _module_groups(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module path -> the compute nodes torch.export traced inside it, in program order (the
    model itself, ROOT, holds them all)."""
    groups: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        groups.setdefault(ROOT, []).append(n)
        for path, _cls in (n.meta.get("nn_module_stack") or {}).values():
            if path:
                groups.setdefault(path, []).append(n)
    return groups


def row_local(path: str, nodes: list[fx.Node], state: set[str]) -> RowLocal | None:
    """The module's split facts, or None when it does not keep its input's rows apart
    (``state``: the names of the graph inputs that are weights, buffers or constants)."""
    inside = set(nodes)
    inputs = {a for n in nodes for a in n.all_input_nodes if a not in inside and a.name not in state}
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(inputs) != 1 or not outputs:
        return None
    (x,) = inputs
    lead_shape = _shape(x)
    if not lead_shape or len(lead_shape) < 2:
        return None
    rows: dict[fx.Node, int | None] = {x: len(lead_shape) - 1}
    for a in {a for n in nodes for a in n.all_input_nodes if a not in inside and a is not x}:
        rows[a] = None
    try:
        for n in nodes:
            rows[n] = _rows_of(n, rows)
    except (_NotLocal, IndexError, KeyError, TypeError, ValueError):  # an op called in a form not read here: not split
        return None
    # the row dims every value inside keeps (an op that mixes some narrows what follows it);
    # every value it returns must carry them (a model's last hidden state and pooled output)
    p = min(q for q in rows.values() if q is not None)
    if any(rows[y] is None or (_shape(y) or ())[:p] != lead_shape[:p] for y in outputs):
        return None
    inner = max((_nbytes(n) for n in nodes if rows[n] is not None), default=0)
    return RowLocal(path, lead_shape[:p], inner, max(_nbytes(x), sum(_nbytes(y) for y in outputs)))


def forward_graph(captured: Captured) -> tuple[fx.GraphModule, set[str]]:
    """The exported forward a capture came from (a training step keeps it beside its joint
    graph) and the names of its weight, buffer and constant inputs."""
    fwd = getattr(captured, "forward", None)
    if fwd is not None:
        return fwd
    return captured.gm, {p.name for p in captured.placeholders if p.kind in (Kind.WEIGHT, Kind.BUFFER, Kind.CONSTANT)}


def loss_heads(captured: Captured) -> list[RowLocal]:
    """A training step's LM heads with their cross-entropy, whose logits feed nothing else, as
    one row-local unit (LOSS_HEAD): their logits are the value a split never makes whole."""
    if getattr(captured, "forward", None) is None:   # an inference capture: the graph is the plan
        return []
    heads = find_loss_heads(captured.forward[0])
    if not heads:
        return []
    return [RowLocal(LOSS_HEAD, (min(h.rows for h in heads),), max(h.logits_bytes for h in heads),
                     max(h.hidden_bytes for h in heads))]


def loss_chunks(plan: list[Chunking]) -> int:
    """The slices the plan runs its LM head + cross-entropy on (0: whole)."""
    return next((c.chunks for c in plan if c.path == LOSS_HEAD), 0)


def splittable_modules(model: torch.nn.Module, captured: Captured) -> list[RowLocal]:
    """Row-local modules of the forward graph whose inside is larger than their edges (only
    those gain from a split), outermost first, extended to the modules identical to them (a
    layer stack captured by repeats carries module paths for the traced layers only); then the
    LM head with its loss, in a training step (``loss_heads``)."""
    gm, state = forward_graph(captured)
    candidates = [r for path, nodes in _module_groups(gm).items()
                  if (r := row_local(path, nodes, state)) is not None and r.inner_bytes > r.edge_bytes]
    found: list[RowLocal] = []
    for r in candidates:
        if any(r.path.startswith(f.path + ".") for f in found):
            continue
        if found and found[0].path == ROOT and len(r.dims) <= len(found[0].dims):
            continue   # no row dim past the model's own split: splitting the model does it
        if r.path != ROOT and any(c.path.startswith(r.path + ".") and len(c.dims) > len(r.dims) for c in candidates):
            continue   # a part of it keeps more row dims apart (an MLP in a block): it splits finer
        found.append(r)
    paths = {r.path for r in found}
    extra = []
    for name, m in model.named_modules():
        if name in paths or any(name.startswith(p + ".") for p in paths if p != ROOT):
            continue
        twin = next((r for r in found if r.path != ROOT and identical_modules(model.get_submodule(r.path), m)), None)
        if twin is not None:
            extra.append(RowLocal(name, twin.dims, twin.inner_bytes, twin.edge_bytes))
    return sorted(found + extra, key=lambda r: r.path) + loss_heads(captured)


def steps_outside(program, gm: fx.GraphModule, found: list[RowLocal]) -> list[int]:
    """The steps of an inference program whose op torch.export traced outside every module in
    ``found``: a split leaves their working sets as they are. Ops without a module path (a
    layer grown by repeats may lack one) are not counted as outside."""
    paths = {r.path for r in found}
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for step, name in enumerate(program.steps):
        stack = nodes[name].meta.get("nn_module_stack")
        if stack and not any(p in paths for p, _ in stack.values()):
            out.append(step)
    return out


def chunkings(found: list[RowLocal], chunks: int) -> list[Chunking]:
    """Each module split in ``chunks`` slices (fewer where it has fewer rows). Inside a split
    model, a module splits along the row dims past the model's own (the model's slices have
    fewer of the rows before them)."""
    out = []
    root = next((r for r in found if r.path == ROOT), None)
    for r in found:
        inside_root = root is not None and r.path not in (ROOT, LOSS_HEAD) and len(r.dims) > len(root.dims)
        d = r.dim_for(chunks, len(root.dims) if inside_root else 0)
        if r.dims[d] > 1:
            out.append(Chunking(r.path, d, min(chunks, r.dims[d])))
    return out


def _split_call(inner, dim: int, chunks: int):
    def forward(*args, **kwargs):
        # the one tensor with rows to split; the others (position ids, rotary tables) must be
        # the same for every row (one row along ``dim``, broadcast) and go whole to each slice
        tensors = [(k, a) for k, a in [*enumerate(args), *kwargs.items()] if isinstance(a, torch.Tensor)]
        rows = [k for k, a in tensors if a.dim() > dim and a.shape[dim] > 1]
        if len(rows) != 1:
            # two inputs with rows (a mask per row): not the call the capture saw; or one row
            # left (a slice of a split model): run it whole
            return inner(*args, **kwargs)
        (i,) = rows
        whole = args[i] if isinstance(i, int) else kwargs[i]
        pieces = []
        # each slice made contiguous (a no-op for slices of the outermost dim): modules view
        # their input flat, as the whole input would allow
        for piece in whole.tensor_split(min(chunks, whole.shape[dim]), dim):
            if isinstance(i, int):
                pieces.append(inner(*args[:i], piece.contiguous(), *args[i + 1:], **kwargs))
            else:
                pieces.append(inner(*args, **{**kwargs, i: piece.contiguous()}))
        return _joined(pieces, dim)
    return forward


def _joined(pieces: list, dim: int):
    """The slices' results as one: each tensor made per slice concatenated along ``dim``, in the
    structure the module returns (a model's output object, say); what is not a tensor, or is
    the same tensor for every slice (a weight returned as it is), is the first slice's."""
    flat = [pytree.tree_flatten(p) for p in pieces]
    spec = flat[0][1]
    if any(s != spec for _, s in flat):
        raise UnsupportedModelError("a split module returned differently shaped results for its slices")
    leaves = [torch.cat(list(ts), dim) if isinstance(ts[0], torch.Tensor) and any(t is not ts[0] for t in ts)
              else ts[0] for ts in zip(*(leaves for leaves, _ in flat))]
    return pytree.tree_unflatten(leaves, spec)


@contextlib.contextmanager
def chunked(model: torch.nn.Module, plan: list[Chunking]):
    """The model with those modules split, for as long as the block runs; the model is given
    back as it was (its forwards restored) even when the block raises."""
    patched = []
    try:
        for c in plan:
            if c.path == LOSS_HEAD:   # not a module: the capture rewrites it (loss_chunks)
                continue
            m = model.get_submodule(c.path)
            patched.append((m, vars(m).get("forward")))
            m.forward = _split_call(m.forward, c.dim, c.chunks)
        yield
    finally:
        for m, before in reversed(patched):
            if before is None:
                del m.forward
            else:
                m.forward = before
