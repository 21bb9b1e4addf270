"""Chunked ops: a module that maps every row of its input on its own (a token, a batch item)
can run on slices of that input and concatenate what it returns (mini-sequence training,
Liger-style). Its intermediates then exist one slice at a time, which lowers the working set
of the ops inside it -- the floor, when one of them binds it (an MLP's wide hidden layer).

Which modules qualify is read off the captured forward graph, not off class names: the nodes
torch.export tags with a module's path must read one activation (plus weights), return one
value, and every op on a value derived from that activation must keep its leading (row)
dimensions apart -- pointwise ops against weights, matmuls against weights, reductions, norms
and softmaxes over trailing dims, views that do not mix rows. Random ops (dropout) disqualify
a module: a split would draw its random numbers in another order.

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

from ..frontend.capture import Captured
from ..frontend.loss_head import find_loss_heads
from ..frontend.repeats import identical_modules
from ..ir.kinds import Kind

aten = torch.ops.aten

# ops that keep rows apart given where their arguments' rows are (see _rows_of)
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
_SAME_SHAPE = {aten._to_copy.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
               aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten.lift_fresh_copy.default}
_REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
               aten.var.correction, aten.std.correction, aten.logsumexp.default}
_SOFTMAX = {aten._softmax.default, aten._log_softmax.default, aten.softmax.int, aten.log_softmax.int}
_NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
          aten._fused_rms_norm.default}
_SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int}
_SLICES = {aten.slice.Tensor, aten.select.int, aten.narrow.default}


# Not a module: the LM head with its cross-entropy, found in the exported forward of a training
# step and run by the chunked kernel (frontend/loss_head.py) when a Chunking names it.
LOSS_HEAD = "<lm-head-loss>"


@dataclass(frozen=True)
class Chunking:
    """Run the module at ``path`` on ``chunks`` slices of its input along ``dim``."""

    path: str
    dim: int
    chunks: int

    def __str__(self) -> str:
        if self.path == LOSS_HEAD:
            return f"LM head + cross-entropy x{self.chunks} (rows)"
        return f"{self.path} x{self.chunks} (dim {self.dim})"


@dataclass(frozen=True)
class RowLocal:
    """A module found to keep its input's rows apart, with what splitting it can save."""

    path: str
    dims: tuple[int, ...]   # the input's sizes along its row dims (``dim_for`` picks one)
    inner_bytes: int        # the largest value it makes from the rows
    edge_bytes: int         # the larger of its input and output

    def dim_for(self, chunks: int) -> int:
        """The outermost row dim with at least ``chunks`` rows (its slices are contiguous in
        a contiguous input), else the longest."""
        return next((d for d, n in enumerate(self.dims) if n >= chunks),
                    max(range(len(self.dims)), key=lambda d: self.dims[d]))


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
    """How many leading dims of ``n``'s value are the module input's rows, or None when it
    does not depend on them; raises _NotLocal when the op mixes rows or draws random numbers."""
    t = n.target
    if t is aten.dropout.default and (n.args[1] == 0 or not n.args[2]):
        return rows.get(n.args[0])   # dropout with p = 0, or off: draws nothing
    if isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags:
        raise _NotLocal(f"{n.name} draws random numbers")
    if all(rows.get(a) is None for a in n.all_input_nodes):
        return None
    if not isinstance(t, torch._ops.OpOverload) and t is not operator.getitem:
        raise _NotLocal(f"{n.name}: {t}")
    first = n.args[0]
    p = rows.get(first) if isinstance(first, fx.Node) else None
    shape = _shape(n)
    if t is operator.getitem:
        return p
    if t is aten.addmm.default:   # bias + rows @ weight
        if rows.get(n.args[0]) is not None or rows.get(n.args[1]) != 1 or rows.get(n.args[2]) is not None:
            raise _NotLocal(f"{n.name} multiplies along rows or adds a row-carrying bias")
        return 1
    if p is None:
        raise _NotLocal(f"{n.name}: rows enter through a later argument")
    if any(rows.get(a) is not None for a in n.all_input_nodes[1:]) and t not in _VIEWS:
        # a second row-carrying input must line up exactly (a pointwise op of two activations)
        if torch.Tag.pointwise not in t.tags:
            raise _NotLocal(f"{n.name} combines two row-carrying values")
        for a in n.all_input_nodes:
            if rows.get(a) is not None and (rows[a] != p or _shape(a)[:p] != shape[:p]):
                raise _NotLocal(f"{n.name} combines rows of different layouts")
    ndim = len(_shape(first))
    if t in _VIEWS:
        total = math.prod(_shape(first)[:p])
        for q in range(len(shape) + 1):
            if math.prod(shape[:q]) == total and shape[q:] and math.prod(shape[q:]) == math.prod(_shape(first)[p:]):
                return q
        raise _NotLocal(f"{n.name} reshapes across rows")
    if t in (aten.mm.default, aten.linear.default):
        if (t is aten.mm.default and p != 1) or any(rows.get(a) is not None for a in n.all_input_nodes[1:]):
            raise _NotLocal(f"{n.name} multiplies along rows")
        return p
    if t in _REDUCTIONS or t in _SOFTMAX or t in _SLICES or t in _SPLITS:
        return _along_dims(n, p, ndim)
    if t in _NORMS:
        normalized = n.args[1]
        if len(normalized) > ndim - p:
            raise _NotLocal(f"{n.name} normalises over rows")
        return p
    if t in (aten.unsqueeze.default, aten.squeeze.dim):
        if _dims(n.args[1], ndim + (t is aten.unsqueeze.default))[0] < p:
            raise _NotLocal(f"{n.name} moves the row dims")
        return p
    if t in (aten.transpose.int, aten.permute.default):
        perm = list(range(ndim))
        if t is aten.transpose.int:
            a, b = _dims(n.args[1], ndim)[0], _dims(n.args[2], ndim)[0]
            perm[a], perm[b] = perm[b], perm[a]
        else:
            perm = _dims(n.args[1], ndim)
        if perm[:p] != list(range(p)):
            raise _NotLocal(f"{n.name} permutes the row dims")
        return p
    if torch.Tag.pointwise in t.tags or t in _SAME_SHAPE:
        for a in n.all_input_nodes:
            if rows.get(a) is None and (_shape(a) or ()) and len(_shape(a)) > len(shape) - p:
                raise _NotLocal(f"{n.name} broadcasts a value over the rows")
        if shape[:p] != _shape(first)[:p]:
            raise _NotLocal(f"{n.name} broadcasts the rows")
        return p
    raise _NotLocal(f"{n.name}: {t} is not known to keep rows apart")


def _along_dims(n: fx.Node, p: int, ndim: int) -> int:
    """A reduction, softmax, slice or split keeps the rows apart when its dims are all past them."""
    t = n.target
    # where the op's dim argument sits: second for reductions, softmaxes and slices (slice,
    # select, narrow, unbind), third for splits (after the sizes)
    at = 2 if t in _SPLITS and t is not aten.unbind.int else 1
    dim = n.args[at] if len(n.args) > at else n.kwargs.get("dim", None if t in _REDUCTIONS else 0)
    if dim is None or (isinstance(dim, (list, tuple)) and not dim):
        raise _NotLocal(f"{n.name} reduces over every dim")
    if any(d < p for d in _dims(dim, ndim)):
        raise _NotLocal(f"{n.name} reduces or slices over rows")
    return p   # the dims left of the reduced ones are the rows, with or without keepdim


def _module_groups(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module path -> the compute nodes torch.export traced inside it, in program order."""
    groups: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
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
    if len(inputs) != 1 or len(outputs) != 1:
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
    (y,) = outputs
    p = rows[x]
    if rows[y] != p or _shape(y)[:p] != lead_shape[:p]:
        return None
    inner = max((_nbytes(n) for n in nodes if rows[n] is not None), default=0)
    return RowLocal(path, lead_shape[:p], inner, max(_nbytes(x), _nbytes(y)))


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
    found: list[RowLocal] = []
    for path, nodes in _module_groups(gm).items():
        if any(path.startswith(f.path + ".") for f in found):
            continue
        r = row_local(path, nodes, state)
        if r is not None and r.inner_bytes > r.edge_bytes:
            found.append(r)
    paths = {r.path for r in found}
    extra = []
    for name, m in model.named_modules():
        if name in paths or any(name.startswith(p + ".") for p in paths):
            continue
        twin = next((r for r in found if identical_modules(model.get_submodule(r.path), m)), None)
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
    """Each module split in ``chunks`` slices (fewer where it has fewer rows)."""
    out = []
    for r in found:
        d = r.dim_for(chunks)
        if r.dims[d] > 1:
            out.append(Chunking(r.path, d, min(chunks, r.dims[d])))
    return out


def _split_call(inner, dim: int, chunks: int):
    def forward(*args, **kwargs):
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if len(tensors) != 1 or any(isinstance(v, torch.Tensor) for v in kwargs.values()):
            return inner(*args, **kwargs)   # not the call the capture saw: run it whole
        i = tensors[0]
        # each slice made contiguous (a no-op for slices of the outermost dim): modules view
        # their input flat, as the whole input would allow
        pieces = [inner(*args[:i], piece.contiguous(), *args[i + 1:], **kwargs)
                  for piece in args[i].tensor_split(chunks, dim)]
        return torch.cat(pieces, dim)
    return forward


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
