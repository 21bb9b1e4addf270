"""Traced metadata that matches eager on a CPU device.

Capture runs the model on FakeTensors, whose sizes and strides come from meta kernels and
Python reimplementations. Where those differ from what the CPU kernels give (PyTorch 2.13),
the plan would count other bytes than the run holds, or hand an op a layout it did not trace:

* ``view``/``_unsafe_view`` rebuild the stride of a size-1 dimension differently from
  eager's ``computeStride`` (pytorch/pytorch#124181);
* an elementwise op given a Python number (``x / 8``, ``x + 1``) leaves the number out of
  the meta TensorIterator, so a channels-last-looking input takes its channels-last fast
  path, while on a CPU the number is a 0-dim operand and the output keeps the input's strides;
* ``mkldnn_rnn_layer`` (``nn.LSTM`` on a CPU) traces an empty workspace, while in a training
  forward (grad mode on, ``train=True``) the kernel returns one its backward reads;
* batch norm (forward, every variant, and backward) and the backward of layer and RMS norm
  are traced by Python decompositions whose result keeps a permuted argument's strides, while
  the CPU kernel returns a tensor contiguous in the input's suggested memory format (or plain
  contiguous): a ``BatchNorm1d`` over a transposed sequence (PatchTST) traced as ``view`` a
  result the run makes non-viewable, so the step failed at that view;
* layer and group norm of a reduced-precision input with float32 weights (autocast on a CPU)
  trace their mean and rstd in the input's dtype, while the CPU kernel keeps them in float32;
* ops traced by a Python decomposition whose arguments all have the result's shape (softplus',
  hardswish's, logit's backward) return a contiguous result, while the CPU kernel lays it out
  as its arguments are (a gradient arriving transposed).

The stride of a size-1 dimension never moves an element, but it decides
``suggest_memory_format``: a ``group_norm`` decomposed while tracing a training step skipped
the ``contiguous()`` eager makes, and the real tensor then failed ``native_group_norm``'s
layout check (and a layout-dependent kernel would not give eager's bits). Inside
``eager_meta()`` all six give what eager gives. For the first three only strides of size-1
dimensions are ever changed, so a traced value still addresses the same elements; a
normalisation's result is a fresh tensor, traced in the layout the kernel was seen to make (a
probe of the op on a few real elements laid out as the call's, once per layout). Anything
this does not recognise is traced as PyTorch traces it.
"""
from __future__ import annotations

import contextlib
import functools
from numbers import Number

import torch
import torch.utils._pytree as pytree

RNN_LAYER = torch.ops.aten.mkldnn_rnn_layer.default
_PROBE = ((1, 2, 2, 2), (2, 1, 4, 2))  # a layout whose fast path and general path differ
_wraps_numbers: dict = {}               # (op, where its numbers are) -> does a CPU run wrap them
_workspaces: dict = {}                  # mkldnn_rnn_layer arguments -> (workspace elements, dtype)
_UNANNOTATED_VIEWS = {torch.ops.aten._unsafe_view.default}  # no alias annotation, yet a view
# no alias annotation and traced as fresh tensors, yet views of their input when run (a GRU
# cell's gates): traced again as the view op they run as
_UNSAFE_SPLITS = {torch.ops.aten.unsafe_split.Tensor: torch.ops.aten.split.Tensor,
                  torch.ops.aten.unsafe_chunk.default: torch.ops.aten.chunk.default,
                  torch.ops.aten.unsafe_split_with_sizes.default: torch.ops.aten.split_with_sizes.default}


@contextlib.contextmanager
def eager_meta():
    """Within the block, FakeTensors get eager's CPU strides for views and for elementwise ops
    with number operands, and RNN layers their workspace (see the module docstring)."""
    try:
        from torch._subclasses import fake_impls
        from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
        table, checks = fake_impls.op_implementations_dict, fake_impls.op_implementations_checks
        compute_stride = fake_impls._compute_stride
        from torch._decomp import decomposition_table as decompositions
    except (ImportError, AttributeError):  # another torch: trace as it does
        yield
        return
    views = {op: table[op] for op in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)
             if op in table}

    def view(fake_mode, func, a, *shape, **kwargs):
        out = views[func](fake_mode, func, a, *shape, **kwargs)
        return _restride_view(out, a, compute_stride)

    def fix(fake_mode, func, *args, **kwargs):
        if func is RNN_LAYER:
            return _rnn_layer(fake_mode, args, kwargs, FakeTensor)
        if func in _MIXED_NORMS:
            return _mixed_norm(fake_mode, func, args, kwargs, FakeTensor)
        return _pointwise(fake_mode, func, args, kwargs, FakeTensor)

    entry = (_handled, fix)
    norms = _norm_decompositions()
    elementwise = _elementwise_decompositions(norms)
    FakeTensorMode.cache_clear()  # results traced before are cached with PyTorch's strides
    table.update(dict.fromkeys(views, view))
    checks.insert(0, entry)
    decompositions.update({op: _laid_out_as_run(op, d, FakeTensor) for op, d in norms.items()})
    decompositions.update({op: _laid_out_as_kernel(op, d, FakeTensor) for op, d in elementwise.items()})
    try:
        yield
    finally:
        table.update(views)
        decompositions.update(norms)
        decompositions.update(elementwise)
        if entry in checks:
            checks.remove(entry)
        FakeTensorMode.cache_clear()


def _ints(*seqs) -> bool:
    return all(type(d) is int for s in seqs for d in s)


def size1_only(new, old, shape) -> bool:
    """``new`` differs from ``old`` only in strides of size-1 dimensions."""
    return all(s == t or n == 1 for s, t, n in zip(new, old, shape))


def _restride_view(out, a, compute_stride):
    if not isinstance(out, torch.Tensor) or not _ints(a.shape, a.stride(), out.shape, out.stride()):
        return out  # symbolic sizes: as traced
    try:
        stride = compute_stride(list(a.shape), list(a.stride()), list(out.shape))
    except Exception:  # noqa: BLE001  (a private helper of torch: any failure keeps the traced view)
        return out
    if stride is None or tuple(stride) == tuple(out.stride()) or not size1_only(stride, out.stride(), out.shape):
        return out
    return out.as_strided(out.shape, stride, out.storage_offset())


def _handled(func) -> bool:
    return func is RNN_LAYER or func in _MIXED_NORMS or (
        isinstance(func, torch._ops.OpOverload) and torch.Tag.pointwise in func.tags)


@functools.cache
def _one_fresh_tensor(func) -> bool:
    """An op returning one new tensor (no view, no write, no random draw, no list of ints such as
    sizes or dimensions among its arguments): one ``_elementwise_layout`` may probe."""
    if not isinstance(func, torch._ops.OpOverload) or torch.Tag.nondeterministic_seeded in func.tags:
        return False
    schema = func._schema
    returns = [str(r.type) for r in schema.returns]
    return (returns == ["Tensor"] and schema.returns[0].alias_info is None and not schema.is_mutable
            and not any("int[]" in str(a.type) or "SymInt[]" in str(a.type) for a in schema.arguments))


_elementwise_orders: dict = {}  # (op, its probe's arguments) -> the CPU kernel's result's dimension order


def _elementwise_decompositions(norms: dict) -> dict:
    """The decompositions FakeTensors may trace an op returning one fresh tensor by (norms
    apart), each with its result laid out as the CPU kernel lays it out (``_laid_out_as_kernel``)."""
    from torch._decomp import decomposition_table

    return {op: d for op, d in decomposition_table.items() if op not in norms and _one_fresh_tensor(op)}


def _laid_out_as_kernel(func, decomposition, fake_cls):
    """``decomposition`` whose result, when every tensor argument has its shape and one of them
    is laid out otherwise than contiguously, takes the layout the CPU kernel gives it (a probe of
    a few elements in the arguments' layouts, once per layout). PyTorch traces some backward ops
    (softplus', hardswish's, logit's) by decompositions returning a contiguous result, while the
    CPU kernel follows the incoming gradient's layout: a ``view`` traced after it failed when
    run (Doge's gates: softplus of a transposed projection)."""
    @functools.wraps(decomposition)
    def run(*args, **kwargs):
        out = decomposition(*args, **kwargs)
        if not isinstance(out, fake_cls) or out.device.type != "cpu" or out.dim() < 2:
            return out
        tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        # (sizes are compared only once all are numbers: a symbolic one would be guarded on)
        if not _ints(out.shape, out.stride()) or not all(
                isinstance(t, fake_cls) and _ints(t.shape, t.stride()) for t in tensors):
            return out
        shape = tuple(out.shape)
        full = [t for t in tensors if t.dim() > 0]
        if (not full or any(tuple(t.shape) != shape for t in full) or all(t.is_contiguous() for t in full)
                or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None):
            return out  # broadcasting, nothing transposed, or traced into a graph: as PyTorch traces it
        from torch.utils._mode_utils import no_dispatch

        with no_dispatch():
            return _relaid(out, shape, _probe_order(func, args, kwargs, shape), fake_cls)
    return run


def _probe_order(func, args, kwargs, shape):
    """The dimension order of the CPU kernel's result for tensors of ``shape`` laid out as the
    arguments are (each size above 1 made 2, 3, ...: a few elements); None where the probe
    cannot run or its result is not dense."""
    from torch._prims_common import is_non_overlapping_and_dense_or_false as dense

    small = tuple(2 + i if d > 1 else d for i, d in enumerate(shape))
    probe = lambda v: _ones_laid_out_as(v, small if v.dim() else ()) if isinstance(v, torch.Tensor) else v  # noqa: E731
    pa, pk = pytree.tree_map(probe, (tuple(args), dict(kwargs)))
    key = (func, str(pytree.tree_map(lambda a: (a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a, (pa, pk))))
    if key not in _elementwise_orders:
        try:
            out = func(*pa, **pk)
            _elementwise_orders[key] = _order(out.stride()) if isinstance(out, torch.Tensor) and dense(out) \
                and tuple(out.shape) == small else None
        except Exception:  # noqa: BLE001  (an op that cannot run on the probe is traced as PyTorch traces it)
            _elementwise_orders[key] = None
    return _elementwise_orders[key]


def _general_strides(shape, stride) -> tuple:
    """The strides the CPU TensorIterator gives an elementwise op of one tensor and a 0-dim
    operand (no fast path): the meta kernel with a 0-dim meta tensor computes them."""
    x = torch.empty_strided(shape, stride, device="meta")
    return tuple(torch.ops.aten.add.Tensor(x, torch.empty((), device="meta")).stride())


def _on(device, args, kwargs, layout=None):
    """args/kwargs with every tensor made on ``device`` (real ones filled with ones), in its own
    layout or, for tensors with dimensions, in ``layout``."""
    def make(a):
        if not isinstance(a, torch.Tensor):
            return a
        shape, stride = (a.shape, a.stride()) if layout is None or a.dim() == 0 else layout
        t = torch.empty_strided(shape, stride, dtype=a.dtype, device=device)
        return t.fill_(1) if device == "cpu" else t
    return pytree.tree_map(make, (args, kwargs))


def _wraps(func, args, kwargs, key) -> bool:
    """Does this op on a CPU make its numbers 0-dim operands? Asked once per op, of a 16-byte
    probe: its real strides against the fast path's and the general path's."""
    if key not in _wraps_numbers:
        try:
            pa, pk = _on("cpu", args, kwargs, _PROBE)
            real = func(*pa, **pk)
            ma, mk = _on("meta", args, kwargs, _PROBE)
            fast = func(*ma, **mk)
            _wraps_numbers[key] = (tuple(real.stride()) == _general_strides(*_PROBE) != tuple(fast.stride()))
        except Exception:  # noqa: BLE001  (any op that cannot run on the probe is left as traced)
            _wraps_numbers[key] = False
    return _wraps_numbers[key]


def _pointwise(mode, func, args, kwargs, fake_cls):
    """An elementwise op with number operands on CPU FakeTensors: the strides a CPU run gives,
    when they differ from the meta kernel's in size-1 dimensions only; else NotImplemented
    (PyTorch's own fake kernel runs)."""
    from torch.utils._mode_utils import no_dispatch

    flat = pytree.tree_leaves((args, kwargs))
    numbers = tuple(i for i, a in enumerate(flat) if isinstance(a, Number) and not isinstance(a, bool))
    tensors = [a for a in flat if isinstance(a, torch.Tensor)]
    full = [t for t in tensors if t.dim() > 0]
    if not numbers or not full or not all(isinstance(t, fake_cls) and t.device.type == "cpu" for t in tensors):
        return NotImplemented
    shape, stride = tuple(full[0].shape), tuple(full[0].stride())
    if len(shape) < 2 or 1 not in shape or not _ints(shape, stride) or any(
            tuple(t.shape) != shape or tuple(t.stride()) != stride for t in full):
        return NotImplemented
    with no_dispatch():
        if not _wraps(func, args, kwargs, (func, numbers)):
            return NotImplemented
        ma, mk = _on("meta", args, kwargs)
        out = func(*ma, **mk)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
            return NotImplemented
        want = _general_strides(shape, stride)
        if want == tuple(out.stride()) or not size1_only(want, out.stride(), shape):
            return NotImplemented
        meta = torch.empty_strided(shape, want, dtype=out.dtype, device="meta")
    return fake_cls(mode, meta, device=full[0].device)


def _rnn_layer(mode, args, kwargs, fake_cls):
    """``mkldnn_rnn_layer`` in a training forward: its outputs as the meta kernel says, with the
    workspace the CPU kernel makes. Its size is oneDNN's: asked once per shape, of a run on
    zeros (host memory for one layer's inputs and outputs, for a moment). In inference, or off
    a CPU, NotImplemented (PyTorch's own fake kernel runs)."""
    from torch.utils._mode_utils import no_dispatch

    values = dict(zip([a.name for a in RNN_LAYER._schema.arguments], args), **kwargs)
    tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    if not (values.get("train") and torch.is_grad_enabled() and tensors
            and all(isinstance(t, fake_cls) and t.device.type == "cpu" for t in tensors)):
        return NotImplemented
    key = str(pytree.tree_map(lambda a: (tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a,
                              (tuple(args), sorted(kwargs.items()))))
    with no_dispatch():
        if key not in _workspaces:
            try:
                ra, rk = pytree.tree_map(lambda a: torch.zeros(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor)
                                         else a, (args, kwargs))
                with torch.enable_grad():
                    ws = RNN_LAYER(*ra, **rk)[3]
                _workspaces[key] = None if ws is None else (ws.numel(), ws.dtype)
            except Exception:  # noqa: BLE001  (no oneDNN here: traced as PyTorch traces it)
                _workspaces[key] = None
        if _workspaces[key] is None:
            return NotImplemented
        ma, mk = _on("meta", args, kwargs)
        outs = RNN_LAYER(*ma, **mk)
        numel, dtype = _workspaces[key]
        outs = (*outs[:3], torch.empty(numel, dtype=dtype, device="meta"))
    return tuple(fake_cls(mode, o, device=tensors[0].device) for o in outs)


# a norm's one-row probe, from its arguments (input, ...): a reduced-precision input with float32
# weights (autocast leaves norms to run so on a CPU) gets float32 statistics from the CPU kernel,
# the input's dtype from the fake one
_MIXED_NORMS = {
    torch.ops.aten.native_layer_norm.default:
        lambda x, shape, w, b, eps: (_row(x, (1, *shape)), shape, w, b, eps),
    torch.ops.aten.native_group_norm.default:
        lambda x, w, b, n, c, hw, groups, eps: (_row(x, (1, c, 1)), w, b, 1, c, 1, groups, eps),
}
_norm_dtypes: dict = {}  # (norm op, its arguments' dtypes) -> the CPU kernel's results' dtypes


def _row(x, shape) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _mixed_norm(mode, func, args, kwargs, fake_cls):
    """A norm of a reduced-precision input with weights of another dtype on CPU FakeTensors:
    its results as the meta kernel shapes them, in the dtypes a CPU run of one row gives (its
    statistics are the backward's operands: traced in the input's dtype, the backward's scratch
    could not be measured and the plan counted them at half their bytes). Else NotImplemented."""
    from torch.utils._mode_utils import no_dispatch

    tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    x = args[0] if args else None
    if (kwargs or not isinstance(x, fake_cls) or x.device.type != "cpu" or len({t.dtype for t in tensors}) < 2
            or not all(isinstance(t, fake_cls) and t.device.type == "cpu" for t in tensors)):
        return NotImplemented
    key = (func, tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in args))
    with no_dispatch():
        if key not in _norm_dtypes:
            try:
                probe = pytree.tree_map(lambda a: torch.zeros(a.shape, dtype=a.dtype) if isinstance(a, torch.Tensor)
                                        else a, _MIXED_NORMS[func](*args))
                _norm_dtypes[key] = tuple(o.dtype for o in func(*probe))
            except Exception:  # noqa: BLE001  (the kernel refuses these dtypes: as PyTorch traces it)
                _norm_dtypes[key] = None
        if _norm_dtypes[key] is None:
            return NotImplemented
        ma, mk = _on("meta", args, kwargs)
        outs = func(*ma, **mk)
        outs = tuple(o if o.dtype == d else torch.empty_strided(o.shape, o.stride(), dtype=d, device="meta")
                     for o, d in zip(outs, _norm_dtypes[key]))
    return tuple(fake_cls(mode, o, device=x.device) for o in outs)


_NORMS = (("native_batch_norm", "default"), ("_native_batch_norm_legit", "default"),
          ("_native_batch_norm_legit", "no_stats"), ("_native_batch_norm_legit_functional", "default"),
          ("_native_batch_norm_legit_no_training", "default"), ("_batch_norm_with_update", "default"),
          ("_batch_norm_with_update_functional", "default"), ("_batch_norm_no_update", "default"),
          ("native_batch_norm_backward", "default"), ("batch_norm_backward", "default"),
          ("native_layer_norm_backward", "default"), ("_fused_rms_norm_backward", "default"))
_run_orders: dict = {}   # (norm op, its probe's arguments) -> the CPU kernel's result's dimension order


def _norm_decompositions() -> dict:
    """The normalisation ops FakeTensors trace through a decomposition, with that decomposition."""
    from torch._decomp import decomposition_table

    ops = (getattr(getattr(torch.ops.aten, name, None), overload, None) for name, overload in _NORMS)
    return {op: decomposition_table[op] for op in ops if op is not None and op in decomposition_table}


def _laid_out_as_run(func, decomposition, fake_cls):
    """``decomposition`` whose first result, on CPU FakeTensors, takes the layout the CPU
    kernel gives it, as a probe of the op on a few elements laid out as this call's arguments
    shows (``_run_order``). Wrapped so PyTorch still takes it for one of its own decompositions
    (it runs those under FakeTensors, and others not at all)."""
    @functools.wraps(decomposition)
    def run(*args, **kwargs):
        out = decomposition(*args, **kwargs)
        values = dict(zip([a.name for a in func._schema.arguments], args), **kwargs)
        x = values.get("input")
        tensors = [v for v in pytree.tree_leaves(values) if isinstance(v, torch.Tensor)]
        if (not isinstance(out, (tuple, list)) or not out or not isinstance(out[0], fake_cls)
                or not isinstance(x, fake_cls) or x.device.type != "cpu" or out[0].shape != x.shape
                or not all(_ints(t.shape, t.stride()) for t in tensors + [out[0]])
                or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None):
            return out  # symbolic sizes, another device, or traced into a graph: as PyTorch traces it
        from torch.utils._mode_utils import no_dispatch

        with no_dispatch():
            first = _relaid(out[0], tuple(x.shape), _run_order(func, values), fake_cls)
        return out if first is out[0] else (first, *out[1:])
    return run


def _order(stride) -> tuple:
    """Dimensions from outermost to innermost (ties: the later dimension inner, as contiguous)."""
    return tuple(sorted(range(len(stride)), key=lambda i: (-stride[i], i)))


def _ones_laid_out_as(v: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A real tensor of ones of ``shape`` with its dimensions in ``v``'s order in memory."""
    order = _order(v.stride())
    return torch.ones([shape[i] for i in order], dtype=v.dtype).permute(sorted(range(len(order)), key=order.__getitem__))


def _relaid(out, shape: tuple, order, fake_cls):
    """``out`` (a CPU FakeTensor of ``shape``) laid out dense in dimension ``order``; ``out``
    itself when that is no change, or only in strides of size-1 dimensions, or order is None."""
    if order is None:
        return out
    want = _strides_in_order(shape, order)
    if size1_only(want, out.stride(), shape):
        return out
    meta = torch.empty_strided(shape, want, dtype=out.dtype, device="meta")
    return fake_cls(out.fake_mode, meta, device=out.device)


def _strides_in_order(shape: tuple, order: tuple) -> tuple:
    """Dense strides of ``shape`` laid out with its dimensions in ``order``, outermost first."""
    stride, step = [0] * len(shape), 1
    for i in reversed(order):
        stride[i], step = step, step * max(shape[i], 1)
    return tuple(stride)


def _run_order(func, values: dict):
    """The dimension order of the CPU kernel's first result, given arguments laid out as
    ``values``: asked once of a probe of a few elements (every size above 1 mapped to a small
    one, the same size to the same one, lists of ints with them; every tensor in its argument's
    dimension order). None where the probe cannot run or its result is not dense."""
    from torch._prims_common import is_non_overlapping_and_dense_or_false as dense

    sizes = {d for v in pytree.tree_leaves(values) if isinstance(v, torch.Tensor) for d in v.shape if d > 1}
    small = {d: 2 + i for i, d in enumerate(sorted(sizes))}

    def probe(v):
        if isinstance(v, torch.Tensor):
            return _ones_laid_out_as(v, tuple(small.get(d, d) for d in v.shape))
        if isinstance(v, (list, tuple)) and v and all(type(d) is int for d in v):
            return type(v)(small.get(d, d) for d in v)
        return v
    args = {k: probe(v) for k, v in values.items()}
    key = (func, str(pytree.tree_map(lambda a: (tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor)
                                     else a, sorted(args.items()))))
    if key not in _run_orders:
        try:
            out = func(**args)[0]
            _run_orders[key] = _order(out.stride()) if dense(out) and out.shape == args["input"].shape else None
        except Exception:  # noqa: BLE001  (an op that cannot run on the probe is traced as PyTorch traces it)
            _run_orders[key] = None
    return _run_orders[key]


def share_storages_as_eager(graph: torch.fx.Graph) -> None:
    """Which outputs own fresh storage and which share an input's, as the real kernels do: the
    plan counts bytes per storage, so a traced value must share storage exactly when the run's
    does. A view op whose traced output has a storage of its own (``select`` of the hidden
    state in a traced ``nn.LSTM``) is traced again on its input; outputs the schema says are
    fresh, whose meta kernel returns one tensor twice or an input
    (``mkldnn_rnn_layer_backward``'s two bias gradients), get a fresh tensor each."""
    from torch.multiprocessing.reductions import StorageWeakRef

    def key(t):
        return StorageWeakRef(t.untyped_storage())

    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        val = node.meta.get("val")
        leaves = list(val) if isinstance(val, (tuple, list)) else [val]
        inputs = {key(t) for a in node.all_input_nodes
                  for t in pytree.tree_leaves(a.meta.get("val")) if isinstance(t, torch.Tensor)}
        returns = node.target._schema.returns
        if node.target in _UNSAFE_SPLITS:
            _set_val(node, _retrace(node, _UNSAFE_SPLITS[node.target]), leaves)
        elif all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
            if any(isinstance(t, torch.Tensor) and key(t) not in inputs for t in leaves):
                _set_val(node, _retrace(node), leaves)
        elif not any(r.alias_info is not None for r in returns) and node.target not in _UNANNOTATED_VIEWS:
            seen, fresh = set(inputs), list(leaves)
            for i, t in enumerate(leaves):
                if isinstance(t, torch.Tensor):
                    if key(t) in seen:
                        fresh[i] = _fresh_like(t)
                    seen.add(key(t))
            _set_val(node, fresh, leaves)


def _retrace(node: torch.fx.Node, op=None) -> list | None:
    """The node's op (or ``op`` in its place) run again on its inputs' traced values (None if
    that fails)."""
    vals = [a.meta.get("val") for a in node.all_input_nodes]
    mode = next((t.fake_mode for t in pytree.tree_leaves(vals) if hasattr(t, "fake_mode")), None)
    if mode is None:
        return None
    try:
        with mode:
            out = (op or node.target)(*torch.fx.map_arg(node.args, lambda a: a.meta["val"]),
                              **torch.fx.map_arg(node.kwargs, lambda a: a.meta["val"]))
    except Exception:  # noqa: BLE001  (left as traced)
        return None
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _set_val(node: torch.fx.Node, new: list | None, old: list) -> None:
    """Replace the node's traced value (leaf by leaf) and its getitems' values."""
    import operator

    if new is None or len(new) != len(old) or all(a is b for a, b in zip(new, old)):
        return
    val = node.meta["val"]
    node.meta["val"] = type(val)(new) if isinstance(val, (tuple, list)) else new[0]
    for user in node.users:
        if user.target is operator.getitem and isinstance(user.args[1], int) and new[user.args[1]] is not old[user.args[1]]:
            user.meta["val"] = new[user.args[1]]


def _fresh_like(t: torch.Tensor) -> torch.Tensor:
    mode = getattr(t, "fake_mode", None)
    with mode if mode is not None else contextlib.nullcontext():
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                   device=t.device if mode is not None else "meta")


def _untouched(t: torch.Tensor, device: str, name: str) -> torch.Tensor:
    """An uninitialised tensor like ``t`` on ``device``; a size the machine will not even
    reserve (its pages are never touched, but the allocation must succeed) is named."""
    try:
        return torch.empty(t.shape, dtype=t.dtype, device=device)
    except RuntimeError as e:
        if "allocate" not in str(e):
            raise
        nbytes = t.numel() * t.element_size()
        raise ValueError(
            f"{name} ({list(t.shape)}, {t.dtype}: {nbytes:,} bytes) is too large for this machine to reserve at "
            f"once: memsched traces a model on the meta device as one with uninitialised {device} tensors, "
            "never touched, but each must still be allocated. Check the sizes the model was built with") from None


@contextlib.contextmanager
def meta_as_empty(model: torch.nn.Module, device: str = "cpu"):
    """Inside this block the model's meta parameters and buffers are uninitialised tensors on
    ``device`` (tied ones stay tied), so it captures exactly as a model with real weights
    would: capture reads shapes, never values, and untouched CPU pages take no memory. The
    model's own meta tensors are put back on exit."""
    swapped, memo = [], {}
    try:
        for path, mod in model.named_modules():
            for table in (mod._parameters, mod._buffers):
                for name, t in list(table.items()):
                    if t is None or t.device.type != "meta":
                        continue
                    if id(t) not in memo:
                        empty = _untouched(t, device, f"{path}.{name}" if path else name)
                        memo[id(t)] = (torch.nn.Parameter(empty, requires_grad=t.requires_grad)
                                       if isinstance(t, torch.nn.Parameter) else empty)
                    swapped.append((table, name, t))
                    table[name] = memo[id(t)]
        yield model
    finally:
        for table, name, t in reversed(swapped):
            table[name] = t
