"""Per-op cost estimates for ATen-level fx graphs (from ``torch.export``).

A roofline model: an op takes as long as the slower of its math and its
memory traffic, plus a fixed launch cost.  Shapes come from the FakeTensors
that export stores in ``node.meta["val"]``.  The aim is relative accuracy good
enough to decide what to overlap with which transfer, not a profiler.
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx

from ..ir.op_keys import node_op_key
from .hardware import LOCAL_CPU, Hardware
from .measures import measured_time

# Ops that only produce a new view of existing storage: no kernel, no traffic.
_VIEW_OPS = frozenset(
    """view _unsafe_view _reshape_alias view_as expand expand_as permute
    transpose t numpy_T unsqueeze squeeze slice select narrow alias as_strided
    split split_with_sizes unsafe_split unsafe_split_with_sizes chunk
    tensor_split unbind detach unflatten movedim lift_fresh""".split()
)
# Ops that return their input (or a view of it) when no work is needed and a
# copy otherwise: reshape of a non-contiguous tensor, .to() to a new dtype.
# Export's FakeTensors keep storage identity, so we can tell which happened;
# the value is the guess used when we cannot.
_MAYBE_VIEW_OPS = {
    "reshape": True, "flatten": True, "contiguous": False, "to": False, "type_as": False,
}
# dropout(input, p, train) returns its input in eval mode (or with p == 0);
# FakeTensor does not model that alias, so we read the arguments instead.
_DROPOUT_OPS = frozenset("dropout feature_dropout alpha_dropout feature_alpha_dropout".split())

_MATMUL_OPS = frozenset("mm bmm matmul linear addmm baddbmm addbmm addmv mv dot vdot einsum".split())
_MATMUL_B_FIRST = frozenset("addmm baddbmm addbmm addmv".split())  # args: (bias, a, b)
_SDPA_OPS = frozenset(
    """scaled_dot_product_attention _scaled_dot_product_flash_attention
    _scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention
    _scaled_dot_product_cudnn_attention _flash_attention_forward
    _efficient_attention_forward""".split()
)
# their backwards take (grad_out, query, key, value, ...)
# (memsched::scaled_dot_product_attention_backward, kernels/attention.py, runs its forward again: priced as one)
_SDPA_BACKWARD_OPS = frozenset(f"{name}_backward" for name in _SDPA_OPS)
_CONV_OPS = frozenset("convolution _convolution conv1d conv2d conv3d".split())
_CONV_T_OPS = frozenset("conv_transpose1d conv_transpose2d conv_transpose3d".split())
# Normalizations / softmax do several passes of arithmetic per element.
_MULTI_PASS_OPS = frozenset(
    """layer_norm native_layer_norm rms_norm _fused_rms_norm group_norm
    native_group_norm batch_norm native_batch_norm _native_batch_norm_legit
    _native_batch_norm_legit_no_training softmax _softmax log_softmax
    _log_softmax _safe_softmax""".split()
)
_MULTI_PASS_FLOPS_PER_ELEM = 5  # mean, var, normalize, scale, shift
# Ops whose every element takes a transcendental function or a row reduction (exp, erf, tanh;
# softmax, normalisations) and their backwards. A CPU runs them far below its memory bandwidth
# (GELU and LayerNorm stream about 3 GB/s on a core that copies at 25): where the profile
# measured it, they are priced at least at ``Hardware.special_elems_per_s``.
_SPECIAL_OPS = _MULTI_PASS_OPS | frozenset(
    """gelu gelu_backward tanh tanh_backward exp exp2 expm1 log log1p log2 erf erfc erfinv sigmoid
    sigmoid_backward silu silu_backward softplus softplus_backward mish mish_backward elu
    elu_backward sin cos native_layer_norm_backward native_group_norm_backward
    _softmax_backward_data _log_softmax_backward_data logsumexp""".split()
)


def _op_name(node: torch.fx.Node) -> str | None:
    """ATen op name without overload ("view" for aten.view.default)."""
    target = node.target
    if target is operator.getitem:
        return "getitem"
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", None) if packet is not None else getattr(target, "__name__", None)


def is_metadata_only(node: torch.fx.Node) -> bool:
    """True for views/aliases (and getitem): they allocate and compute nothing.

    Besides pure views this covers ops that *happen* to alias in this graph:
    a no-op ``.to()``/``.contiguous()``/``reshape``, and dropout in eval mode.
    """
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if getattr(node.target, "namespace", None) != "aten":
        return False
    name = _op_name(node)
    if name in _VIEW_OPS:
        return True
    if name in _DROPOUT_OPS:
        args = list(node.args) + [None] * 3
        p, train = node.kwargs.get("p", args[1]), node.kwargs.get("train", args[2])
        return train is False or p == 0
    if name in _MAYBE_VIEW_OPS:
        shared = _shares_storage(node)
        return _MAYBE_VIEW_OPS[name] if shared is None else shared
    return False


def _shares_storage(node: torch.fx.Node) -> bool | None:
    """Whether the output aliases the first argument's storage (None: unknown)."""
    out = node.meta.get("val")
    src = _arg_tensor(node.args[0]) if node.args else None
    if not isinstance(out, torch.Tensor) or src is None:
        return None
    try:
        return out.untyped_storage()._cdata == src.untyped_storage()._cdata
    except Exception:
        return None


def _int(x) -> int:
    """A concrete int for a maybe-symbolic size, without adding guards."""
    if isinstance(x, int):
        return x
    try:  # imported lazily: symbolic_shapes is slow to import
        from torch.fx.experimental.symbolic_shapes import optimization_hint

        return int(optimization_hint(x, fallback=1))
    except Exception:
        pass
    try:
        return int(x)
    except Exception:
        return 1


def _numel(t: torch.Tensor) -> int:
    return math.prod(_int(s) for s in t.shape)


def _nbytes(t: torch.Tensor) -> int:
    return _numel(t) * t.element_size()


def _tensors(val) -> list[torch.Tensor]:
    """Tensors in a meta["val"] (a tensor, nested list/tuple of them, or None)."""
    if isinstance(val, torch.Tensor):
        return [val]
    if isinstance(val, (list, tuple)):
        return [t for v in val for t in _tensors(v)]
    return []


def _arg_tensor(arg) -> torch.Tensor | None:
    if isinstance(arg, torch.fx.Node):
        val = arg.meta.get("val")
        if isinstance(val, torch.Tensor):
            return val
    return None


def _input_tensors(node: torch.fx.Node) -> list[torch.Tensor]:
    """Tensors read by ``node``, including those inside list args (cat, stack)."""
    out: list[torch.Tensor] = []
    seen: set[torch.fx.Node] = set()

    def visit(a):
        if isinstance(a, torch.fx.Node):
            if a not in seen:
                seen.add(a)
                out.extend(_tensors(a.meta.get("val")))
        elif isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)

    visit(node.args)
    visit(node.kwargs)
    return out


def _matmul_flops(name: str, node: torch.fx.Node, out: torch.Tensor) -> float:
    """2*M*N*K, i.e. 2 * numel(out) * K, K being the first operand's last dim.

    That identity holds for mm/bmm/linear (weight [out, in]) and broadcasting
    matmul alike, including 1-D operands (mv, dot).  The bias add of
    addmm/linear is ignored, as is conventional.
    """
    if name == "einsum":
        gemm = _einsum_gemm(node)
        return 2.0 * _numel(out) * gemm[3] if gemm else float(_numel(out))
    a = _arg_tensor(node.args[1] if name in _MATMUL_B_FIRST else node.args[0])
    if a is None or a.dim() == 0:
        return float(_numel(out))
    return 2.0 * _numel(out) * _int(a.shape[-1])


def _einsum_gemm(node: torch.fx.Node) -> tuple[int, int, int, int] | None:
    """(batch entries, rows, cols, contracted size) of a two-operand einsum as the batched matrix
    product it is: letters in both operands and the output are the batch, those of one operand
    and the output its rows (the first) or columns (the second), those missing from the output
    are contracted. None for other equations (ellipses, one or three operands)."""
    eq, ops = (node.args + (None, None))[:2]
    if not isinstance(eq, str) or "->" not in eq or "." in eq or not isinstance(ops, (list, tuple)) or len(ops) != 2:
        return None
    ins, out = eq.replace(" ", "").split("->")
    names = ins.split(",")
    tensors = [_arg_tensor(a) for a in ops]
    if len(names) != 2 or any(t is None or t.dim() != len(n) for t, n in zip(tensors, names)):
        return None
    size = {c: _int(d) for t, n in zip(tensors, names) for c, d in zip(n, t.shape)}
    a, b = set(names[0]), set(names[1])

    def prod(letters) -> int:
        return math.prod(size[c] for c in letters)

    return (prod(c for c in out if c in a and c in b), prod(c for c in out if c in a and c not in b),
            prod(c for c in out if c in b and c not in a), prod(c for c in size if c not in out))


def _sdpa_flops(node: torch.fx.Node, backward: bool = False) -> float:
    """Forward: QK^T plus PV, 2*Lq*Lk*(D + Dv) per (batch, head). Backward: the scores again,
    dV = P^T dO, dP = dO V^T, dQ = dS K and dK = dS^T Q: 2*Lq*Lk*(3D + 2Dv)."""
    first = 1 if backward else 0   # a backward's first argument is the output's gradient
    q, k, v = (_arg_tensor(a) for a in node.args[first:first + 3])
    if q is None or k is None or v is None:
        return 0.0
    batch = math.prod(_int(s) for s in q.shape[:-2])
    lq, d = _int(q.shape[-2]), _int(q.shape[-1])
    lk, dv = _int(k.shape[-2]), _int(v.shape[-1])
    return 2.0 * batch * lq * lk * ((3 * d + 2 * dv) if backward else (d + dv))


def _conv_flops(name: str, node: torch.fx.Node, out: torch.Tensor) -> float:
    """2 * out_numel * (C_in/groups) * prod(kernel) for forward convolutions.

    Weight is [C_out, C_in/groups, *k]; transposed convs store
    [C_in, C_out/groups, *k] and each *input* element touches
    C_out/groups * prod(k) weights, so they scale with the input instead.
    """
    x, w = _arg_tensor(node.args[0]), _arg_tensor(node.args[1])
    if w is None or x is None:
        return float(_numel(out))
    per = _int(w.shape[1]) * math.prod(_int(s) for s in w.shape[2:])
    transposed = name in _CONV_T_OPS or (
        name in ("convolution", "_convolution") and len(node.args) > 6 and bool(node.args[6])
    )
    return 2.0 * (_numel(x) if transposed else _numel(out)) * per


def op_flops_bytes(node: torch.fx.Node) -> tuple[float, float]:
    """(FLOPs, bytes of memory traffic) of one fx node.

    Bytes are the sum of tensor inputs and outputs: each is assumed to be read
    or written once.  Views, placeholders and ops without tensor outputs cost
    nothing.  Unknown ops never raise: they are costed as elementwise.
    """
    if node.op != "call_function" or is_metadata_only(node):
        return 0.0, 0.0
    outs = _tensors(node.meta.get("val"))
    if not outs:
        return 0.0, 0.0  # e.g. _assert_tensor_metadata, sym_size
    ins = _input_tensors(node)
    out = outs[0]
    name = _op_name(node) or ""
    nbytes = float(sum(_nbytes(t) for t in ins) + sum(_nbytes(t) for t in outs))
    try:
        if name in _MATMUL_OPS:
            flops = _matmul_flops(name, node, out)
        elif name in _SDPA_OPS:
            flops = _sdpa_flops(node)
        elif name in _SDPA_BACKWARD_OPS:
            flops = _sdpa_flops(node, backward=True)
        elif name in _CONV_OPS or name in _CONV_T_OPS:
            flops = _conv_flops(name, node, out)
        elif name in ("embedding", "embedding_dense_backward"):
            # A gather: reads only the selected rows, not the whole table.
            idx = _arg_tensor(node.args[1])
            flops = 0.0
            nbytes = float(2 * _nbytes(out) + (_nbytes(idx) if idx is not None else 0))
        else:
            # Elementwise and reductions: one op per element of the larger side.
            flops = float(max([_numel(t) for t in outs + ins]))
            if name in _MULTI_PASS_OPS:
                flops *= _MULTI_PASS_FLOPS_PER_ELEM
    except Exception:  # odd arg layouts of rarely seen overloads
        flops = float(max([_numel(t) for t in outs + ins]))
    return flops, nbytes


def op_compute_dtype(node: torch.fx.Node) -> torch.dtype:
    """The dtype math runs in: the output's, else the first tensor input's."""
    for t in _tensors(node.meta.get("val")) + _input_tensors(node):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def estimate_op_time(node: torch.fx.Node, hw: Hardware) -> float:
    """Roofline time in seconds: max(compute, memory) + launch overhead."""
    if node.op != "call_function":
        return 0.0
    if is_metadata_only(node):
        return 0.1 * hw.op_overhead_s  # Python/dispatch cost only
    flops, nbytes = op_flops_bytes(node)
    if flops == 0 and nbytes == 0:
        return 0.0  # no tensor output: asserts, symbolic size queries
    dtype = op_compute_dtype(node)
    name = _op_name(node) or ""
    rate = hw.matmul_flops(_output_rows(node, name), dtype) if name in _MATMUL_OPS else hw.flops_for(dtype)
    compute = flops / rate
    memory = nbytes / hw.mem_bw
    if hw.special_elems_per_s and name in _SPECIAL_OPS:
        compute = max(compute, max((_numel(t) for t in _tensors(node.meta.get("val"))), default=0)
                      / hw.special_elems_per_s)
    return max(compute, memory) + hw.op_overhead_s


def op_time(node: torch.fx.Node, hw: Hardware) -> float:
    """What ``node`` takes: on this machine's own CPU profile, the time its op took here when
    the runtime timed a call with the same structure (runtime/op_timing.py), else the roofline."""
    if hw.name == LOCAL_CPU and node.op == "call_function":
        key = node_op_key(node)
        measured = measured_time(key) if key is not None else None
        if measured is not None:
            return measured
    return estimate_op_time(node, hw)


def _output_rows(node: torch.fx.Node, name: str) -> int:
    """How skinny a matmul's GEMMs are: the smaller of their output's rows and columns. A linear
    (a 2-D weight) runs one GEMM over every leading dim (a decode step's (32, 1, N) output has 32
    rows); a batched matmul runs one per batch entry."""
    outs = _tensors(node.meta.get("val"))
    if not outs or outs[0].dim() < 2:
        return 1
    if name == "einsum":
        gemm = _einsum_gemm(node)
        return min(gemm[1], gemm[2]) if gemm else 1
    out = outs[0]
    cols = _int(out.shape[-1])
    second = _arg_tensor(node.args[2] if name in _MATMUL_B_FIRST else node.args[1]) if len(node.args) > 1 else None
    batched = name in ("bmm", "baddbmm") or (name == "matmul" and second is not None and second.dim() > 2)
    rows = _int(out.shape[-2]) if batched else _numel(out) // max(cols, 1)
    return min(rows, cols)


def transfer_time(nbytes: int, link: str, hw: Hardware) -> float:
    """Seconds to move ``nbytes`` over ``link`` (one of ``LINKS``)."""
    return nbytes / hw.bandwidth(link)


def region_time(gm: torch.fx.Graph | torch.fx.GraphModule, hw: Hardware) -> float:
    """Roofline time of a fused region (ir/regions.py): matmuls, convolutions and attention
    stay library calls and cost what they cost alone; the other ops run fused, so their memory
    traffic is the region's inputs and outputs read and written once, and one launch overhead."""
    graph = gm.graph if isinstance(gm, torch.fx.GraphModule) else gm
    library = fused_flops = 0.0
    dtype = torch.float32
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        name = _op_name(n) or ""
        if name in _MATMUL_OPS or name in _SDPA_OPS or name in _SDPA_BACKWARD_OPS or name in _CONV_OPS \
                or name in _CONV_T_OPS:
            library += estimate_op_time(n, hw)
        else:
            fused_flops += op_flops_bytes(n)[0]
            dtype = op_compute_dtype(n)
    io = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
    io += list(next(n for n in reversed(graph.nodes) if n.op == "output").args[0])
    io_bytes = sum(_nbytes(t) for v in io for t in _tensors(v.meta.get("val") if isinstance(v, torch.fx.Node) else v))
    return library + max(fused_flops / hw.flops_for(dtype), io_bytes / hw.mem_bw) + hw.op_overhead_s
