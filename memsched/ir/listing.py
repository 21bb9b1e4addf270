"""The scheduled program as readable Python: one line per node, commented with tier, dtype,
shape and bytes; inserted nodes say which pass made them.

``format_arg`` and ``target_name`` are the one renderer of calls: the listing and the
runtime's generated source (``runtime/codegen.py``) both write arguments through it."""
from __future__ import annotations

from typing import Callable

import torch
import torch.fx as fx

from .meta import info, tier_of
from .ops import Op, op_of, register
from .regions import region_of
from .tensors import value_nbytes
from .units import format_bytes

_DTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
          torch.int64: "i64", torch.int32: "i32", torch.bool: "b8", torch.uint8: "u8", torch.int8: "i8"}


def describe(val) -> str:
    if isinstance(val, torch.Tensor):
        shape = ",".join(str(s) for s in val.shape)
        return f"{_DTYPE.get(val.dtype, str(val.dtype).replace('torch.', ''))}[{shape}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(describe(v) for v in val) + ")"
    return type(val).__name__ if val is not None else "None"


def _readable_constant(a) -> str:
    if isinstance(a, torch.dtype):
        return str(a)
    if isinstance(a, torch.device):
        return f"device({str(a)!r})"
    return repr(a)


def format_arg(a, node: Callable[[fx.Node], str] = lambda n: n.name,
               constant: Callable[[object], str] = _readable_constant) -> str:
    """An argument as Python source: nodes named by ``node``, nested lists/tuples/dicts
    spelled out, other constants by ``constant``."""
    if isinstance(a, fx.Node):
        return node(a)
    if isinstance(a, (list, tuple)):
        inner = ", ".join(format_arg(x, node, constant) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k!r}: {format_arg(v, node, constant)}" for k, v in a.items()) + "}"
    return constant(a)


def format_args(n: fx.Node, node: Callable[[fx.Node], str] = lambda n: n.name,
                constant: Callable[[object], str] = _readable_constant) -> str:
    return ", ".join([format_arg(a, node, constant) for a in n.args]
                     + [f"{k}={format_arg(v, node, constant)}" for k, v in n.kwargs.items()])


def target_name(t) -> str:
    """"aten.mm", "aten.add.Tensor", "prefetch", "getitem"."""
    if hasattr(t, "_schema") and hasattr(t, "_overloadpacket"):
        name = str(t._overloadpacket).replace("aten::", "aten.")
        return name if t._overloadname == "default" else f"{name}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def op_label(node: fx.Node) -> str:
    """The op a node runs: "prefetch", "aten.mm", or the fx op of a non-call."""
    return target_name(node.target) if node.op == "call_function" else node.op


# -- one line per inserted op ------------------------------------------------------------------
def _moved(n):
    rec = info(n)
    return rec.restores or rec.saves or "", format_bytes(rec.nbytes or 0)


def _prefetch_note(n):
    what, nb = _moved(n)
    return f"{info(n).tier} -> device {what} {nb}"


def _offload_note(n):
    what, nb = _moved(n)
    note = f"device -> {info(n).tier} {what} {nb}"
    return note + (" (delivered: the step returns this copy)" if info(n).delivers else "")


def _region_note(n, shown: int = 6):
    reg = region_of(n)
    names = [op.removeprefix("aten.") for op in reg.ops]
    more = " …" if len(names) > shown else ""
    return f"{len(names)} ops: {', '.join(names[:shown])}{more} ({format_bytes(reg.nbytes)} inside)"


_NOTES = register("printer", {
    Op.PREFETCH: _prefetch_note,
    Op.WAIT: lambda n: f"{_moved(n)[0]} ready on device",
    Op.OFFLOAD: _offload_note,
    Op.FREE: None,  # printed bare: free(a, b)  # [pass]
    Op.BOUNDARY: lambda n: "forward ends: outputs handed to autograd, their gradients come back",
    Op.REGION: _region_note,
})


def _line(n: fx.Node) -> str:
    args = format_args(n)
    made_by = info(n).made_by
    op = op_of(n)
    if op is Op.FREE:
        return f"    free({args})  # [{made_by}]"
    if op is not None:
        return f"    {n.name} = {target_name(n.target)}({args})  # [{made_by}] {_NOTES[op](n)}"
    val = n.meta.get("val")
    tag = f"[{made_by}] " if made_by not in ("capture", "partition") else ""
    again = f" (again: {info(n).restores})" if info(n).restores else ""
    return (f"    {n.name} = {target_name(n.target)}({args})  # {tag}{describe(val)} "
            f"{format_bytes(value_nbytes(val))}{again}")


def listing(gm: fx.GraphModule, header: list[str] | None = None) -> str:
    lines = [f"# {h}" for h in (header or [])]
    params = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lines.append("def program(")
    for i in range(0, len(params), 4):  # wrapped: real models have hundreds of weights
        lines.append("        " + ", ".join(n.name for n in params[i:i + 4]) + ",")
    lines.append("):")
    for n in params:
        val = n.meta.get("val")
        table = info(n).gathered_from
        note = f" (rows of {table}, looked up before the program runs)" if table else ""
        lines.append(f"    # {n.name}: {tier_of(n)} {describe(val)} {format_bytes(value_nbytes(val))}{note}")
    for n in gm.graph.nodes:
        if n.op == "call_function":
            lines.append(_line(n))
        elif n.op == "get_attr":
            lines.append(f"    {n.name} = self.{n.target}  # subgraph")
        elif n.op == "output":
            lines.append(f"    return {format_arg(n.args[0])}")
    return "\n".join(lines)
