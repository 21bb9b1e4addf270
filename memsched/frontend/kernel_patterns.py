"""RMSNorm and rotary-embedding chains found in the exported forward and replaced by one call to
memsched's kernel op each (kernels/ops.py), so Triton runs each as one kernel and a training
step saves what the kernel's backward reads, not every value of the chain.

The patterns are read off torch.export's graph (``kernels.PATTERNS``), never off class names:

- RMSNorm: ``pow(xf, 2) -> mean(-1, keepdim) -> add(eps) -> rsqrt -> mul(xf, _)``, then
  optionally a cast and a multiplication by a weight of the row's size, with xf float32; a
  16-bit x's upcast to xf read by the chain alone moves into the op (which then saves x at 16
  bits for the backward, not xf at 32). LLaMA's, Qwen's, Mistral's norms, their per-head
  q/k norms, and Gemma's ``x_hat * (1 + weight)`` (its weight is then the sum node) match.
- rotary embedding: ``mul(x, cos) + mul(cat([-x[..., D/2:], x[..., :D/2]], -1), sin)`` (the
  ``rotate_half`` convention), per tensor, x the whole last dim or a slice of it (partial
  rotary), read by the chain alone. The tables must not depend on a parameter: the op gives
  them no gradient.

Every value inside a chain must have no reader outside it (trace-time asserts aside), so the
replaced values were never visible to anything else. What the op computes is the chain's own
arithmetic op for op on the PyTorch fallback (the same values); Triton's kernels reorder the
sums (kernels/__init__.py gives their tolerances).
"""
from __future__ import annotations

import operator
from collections import Counter
from numbers import Number

import torch
import torch.fx as fx

from ..ir.effects import is_impure
from ..kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.memsched.*)
from .node_reads import ASSERTS, readers_of, tensor_val

aten = torch.ops.aten


def _sole_reader(n: fx.Node, target=None) -> fx.Node | None:
    readers = readers_of(n)
    if len(readers) != 1 or (target is not None and readers[0].target is not target):
        return None
    return readers[0]


def _other(binary: fx.Node, operand: fx.Node):
    """The other operand of a two-operand op reading ``operand`` (None when it reads it twice,
    or takes more arguments: an add's alpha)."""
    if len(binary.args) != 2 or binary.kwargs:
        return None
    a, b = binary.args
    if a is operand and b is not operand:
        return b
    if b is operand and a is not operand:
        return a
    return None


def _cast_to(n: fx.Node) -> torch.dtype | None:
    """The dtype a pure dtype cast converts to (no device, layout or memory format change)."""
    if n.target is aten.to.dtype and len(n.args) >= 2 and isinstance(n.args[1], torch.dtype):
        return n.args[1] if not any(n.args[2:]) and not n.kwargs.get("copy") else None
    if n.target is aten._to_copy.default and set(n.kwargs) == {"dtype"}:
        return n.kwargs["dtype"]
    return None


def _rms_chain(pow_node: fx.Node):
    """(x, x_stats, weight, eps, cast, last node) of the RMSNorm starting at ``pow_node``, or
    None. x_stats is what the statistics read: x, or x cast to float32 (T5 normalizes the
    uncast x by the statistics of the cast one)."""
    xf, exponent = (pow_node.args + (None,))[:2]
    x = tensor_val(xf)
    if exponent != 2 or x is None or x.dtype != torch.float32 or x.dim() == 0:
        return None
    mean = _sole_reader(pow_node, aten.mean.dim)
    if mean is None or len(mean.args) != 3 or mean.kwargs or mean.args[2] is not True \
            or list(mean.args[1]) not in ([-1], [x.dim() - 1]):
        return None
    add = _sole_reader(mean, aten.add.Tensor)
    eps = _other(add, mean) if add is not None else None
    if not isinstance(eps, Number) or isinstance(eps, bool):
        return None
    rsqrt = _sole_reader(add, aten.rsqrt.default)
    norm = _sole_reader(rsqrt, aten.mul.Tensor) if rsqrt is not None else None
    source = _other(norm, rsqrt) if norm is not None else None
    if source is not xf and not (isinstance(xf, fx.Node) and xf.op == "call_function"
                                 and _cast_to(xf) is not None and xf.args[0] is source):
        return None
    if tensor_val(norm) is None or tensor_val(norm).dtype != torch.float32 or tensor_val(norm).shape != x.shape:
        return None
    last, cast, weight = norm, None, None
    nxt = _sole_reader(last)
    if nxt is not None and nxt.op == "call_function" and _cast_to(nxt) is not None:
        last, cast, nxt = nxt, _cast_to(nxt), _sole_reader(nxt)
    if nxt is not None and nxt.target is aten.mul.Tensor:
        w = _other(nxt, last)
        if tensor_val(w) is not None and tuple(tensor_val(w).shape) == (x.shape[-1],) \
                and tensor_val(nxt) is not None and tensor_val(nxt).shape == x.shape:
            last, weight = nxt, w
    if source is xf and _absorbable_upcast(xf, {pow_node, norm}):
        source = xf = xf.args[0]   # the op upcasts, and saves x at its own width for the backward
    return source, xf, weight, float(eps), cast, last


def _absorbable_upcast(xf: fx.Node, chain: set) -> bool:
    """xf is a 16-bit x cast to float32 that only the chain reads."""
    if not (isinstance(xf, fx.Node) and xf.op == "call_function" and _cast_to(xf) == torch.float32):
        return False
    x = tensor_val(xf.args[0]) if xf.args else None
    return x is not None and x.dtype in (torch.bfloat16, torch.float16) and set(readers_of(xf)) == chain


def _half_slice(n, x: fx.Node, start: int, end_at_least: int, rank: int) -> bool:
    if not isinstance(n, fx.Node) or n.target is not aten.slice.Tensor or n.args[0] is not x:
        return False
    dim, lo, hi, step = tuple(n.args[1:]) + (0, None, None, 1)[len(n.args) - 1:]
    return dim in (-1, rank - 1) and (lo or 0) == start and (hi is None or hi >= end_at_least) and step == 1


def _rope_chain(cat: fx.Node, depends_on_params: set[fx.Node]):
    """(x, cos, sin, last node) of the rotary embedding whose ``rotate_half`` is ``cat``, or None."""
    if len(cat.args) != 2 or cat.kwargs or not isinstance(cat.args[0], (list, tuple)) or len(cat.args[0]) != 2:
        return None
    neg, low = cat.args[0]
    if not isinstance(neg, fx.Node) or neg.target is not aten.neg.default or _sole_reader(neg) is not cat:
        return None
    high = neg.args[0]
    x = high.args[0] if isinstance(high, fx.Node) and high.args else None
    xv = tensor_val(x)
    if xv is None or xv.dim() == 0 or xv.shape[-1] % 2 or cat.args[1] not in (-1, xv.dim() - 1):
        return None
    half, rank = xv.shape[-1] // 2, xv.dim()
    if not (_half_slice(high, x, half, xv.shape[-1], rank) and _half_slice(low, x, 0, half, rank)
            and readers_of(high) == [neg] and readers_of(low) == [cat]):
        return None
    rotated = _sole_reader(cat, aten.mul.Tensor)
    sin = _other(rotated, cat) if rotated is not None else None
    add = _sole_reader(rotated, aten.add.Tensor) if sin is not None else None
    straight = _other(add, rotated) if add is not None else None
    if not isinstance(straight, fx.Node) or straight.target is not aten.mul.Tensor \
            or readers_of(straight) != [add]:
        return None
    if set(readers_of(x)) != {straight, high, low}:
        # x's gradient is then the chain's alone, and summing the op's two parts at once adds
        # what autograd adds one after the other in the same roundings
        return None
    cos = _other(straight, x)
    tables = (tensor_val(cos), tensor_val(sin))
    if any(t is None or t.dim() != rank for t in tables) or tables[0].shape != tables[1].shape \
            or tensor_val(add) is None or tensor_val(add).shape != xv.shape:
        return None
    if cos in depends_on_params or sin in depends_on_params:
        return None
    return x, cos, sin, add


def _reached_from(graph: fx.Graph, roots: set[str]) -> set[fx.Node]:
    """The nodes whose values depend on the placeholders named ``roots``."""
    reached: set[fx.Node] = set()
    for n in graph.nodes:
        if (n.op == "placeholder" and n.name in roots) or any(a in reached for a in n.all_input_nodes):
            reached.add(n)
    return reached


def _replace(graph: fx.Graph, last: fx.Node, target, args: tuple, index: int | None) -> None:
    with graph.inserting_before(last):
        call = graph.call_function(target, args)
        out = graph.call_function(operator.getitem, (call, index)) if index is not None else call
    out.meta.update(last.meta)
    if index is not None:
        call.meta["val"] = target(*[tensor_val(a) if isinstance(a, fx.Node) else a for a in args])
    last.replace_all_uses_with(out)


def select_kernels(gm: fx.GraphModule, parameters: set[str] = frozenset()) -> Counter:
    """Replace, in place, each RMSNorm and rotary-embedding chain of ``gm`` by memsched's op;
    ``parameters``: the placeholders whose values may require grad (rotary tables depending on
    one are left as they are). Returns how many of each were replaced."""
    graph = gm.graph
    found: Counter = Counter()
    depends = _reached_from(graph, set(parameters))
    for node in list(graph.nodes):
        if node.op != "call_function" or not node.users:
            continue
        if node.target is aten.pow.Tensor_Scalar:
            chain = _rms_chain(node)
            if chain is not None:
                x, x_stats, weight, eps, cast, last = chain
                _replace(graph, last, torch.ops.memsched.rms_norm.default, (x, x_stats, weight, eps, cast), 0)
                found["rms_norm"] += 1
        elif node.target is aten.cat.default:
            chain = _rope_chain(node, depends)
            if chain is not None:
                x, cos, sin, last = chain
                _replace(graph, last, torch.ops.memsched.rope.default, (x, cos, sin, False), None)
                found["rope"] += 1
    if found:
        _drop_dead(graph)
        gm.recompile()
    return found


KERNEL_OPS = {"rms_norm": torch.ops.memsched.rms_norm.default, "rope": torch.ops.memsched.rope.default}


def kernel_counts(gm: fx.GraphModule) -> str:
    """"5 rms_norm, 4 rope": the kernel ops a captured forward calls ("" for none)."""
    counts = Counter(name for n in gm.graph.nodes for name, op in KERNEL_OPS.items() if n.target is op)
    return ", ".join(f"{k} {name}" for name, k in sorted(counts.items()))


def _drop_dead(graph: fx.Graph) -> None:
    """Remove the replaced chains, and the trace-time asserts that read their values."""
    for node in reversed(list(graph.nodes)):
        if node.target in ASSERTS and all(not readers_of(a) for a in node.all_input_nodes):
            graph.erase_node(node)
    graph.eliminate_dead_code(is_impure_node=is_impure)
    graph.lint()
