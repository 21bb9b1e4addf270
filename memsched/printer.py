"""The scheduled program as readable Python: one line per node, commented with tier, dtype,
shape and bytes; inserted nodes say which pass made them."""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .budget import format_bytes
from .runtime import ops

_DTYPE = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
          torch.int64: "i64", torch.int32: "i32", torch.bool: "b8", torch.uint8: "u8", torch.int8: "i8"}


def describe(val) -> str:
    if isinstance(val, torch.Tensor):
        shape = ",".join(str(s) for s in val.shape)
        return f"{_DTYPE.get(val.dtype, str(val.dtype).replace('torch.', ''))}[{shape}]"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(describe(v) for v in val) + ")"
    return type(val).__name__ if val is not None else "None"


def _nbytes(val) -> int:
    return sum(t.numel() * t.element_size() for t in pytree.tree_leaves(val) if isinstance(t, torch.Tensor))


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, torch.dtype):
        return str(a)
    if isinstance(a, torch.device):
        return f"device({str(a)!r})"
    return repr(a)


def _target(t) -> str:
    if hasattr(t, "_schema") and hasattr(t, "_overloadpacket"):
        name = str(t._overloadpacket).replace("aten::", "aten.")
        return name if t._overloadname == "default" else f"{name}.{t._overloadname}"
    return getattr(t, "__name__", str(t))


def listing(gm: fx.GraphModule, header: list[str] | None = None) -> str:
    lines = [f"# {h}" for h in (header or [])]
    params = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lines.append("def program(")
    for i in range(0, len(params), 4):  # wrapped: real models have hundreds of weights
        lines.append("        " + ", ".join(n.name for n in params[i:i + 4]) + ",")
    lines.append("):")
    for n in params:
        tier = n.meta.get("memsched.tier", "device")
        lines.append(f"    # {n.name}: {tier} {describe(n.meta.get('val'))} {format_bytes(_nbytes(n.meta.get('val')))}")
    for n in gm.graph.nodes:
        if n.op == "call_function":
            args = [_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()]
            made_by = n.meta.get("memsched.pass", "capture")
            if n.target is ops.free:
                lines.append(f"    free({', '.join(args)})  # [{made_by}]")
                continue
            if n.target in ops.INSERTED_OPS:
                tier = n.meta.get("memsched.tier", "")
                what = n.meta.get("memsched.restores") or n.meta.get("memsched.saves") or ""
                nb = format_bytes(n.meta.get("memsched.nbytes", 0))
                if n.target is ops.prefetch:
                    note = f"{tier} -> device {what} {nb}"
                elif n.target is ops.offload:
                    note = f"device -> {tier} {what} {nb}"
                    if n.meta.get("memsched.delivers"):
                        note += " (delivered: the step returns this copy)"
                elif n.target is ops.boundary:
                    note = "forward ends: outputs handed to autograd, their gradients come back"
                else:
                    note = f"{what} ready on device"
                lines.append(f"    {n.name} = {_target(n.target)}({', '.join(args)})  # [{made_by}] {note}")
                continue
            val = n.meta.get("val")
            tag = f"[{made_by}] " if made_by not in ("capture", "partition") else ""
            again = f" (again: {n.meta['memsched.restores']})" if n.meta.get("memsched.restores") else ""
            lines.append(f"    {n.name} = {_target(n.target)}({', '.join(args)})  # {tag}{describe(val)} "
                         f"{format_bytes(_nbytes(val))}{again}")
        elif n.op == "get_attr":
            lines.append(f"    {n.name} = self.{n.target}  # subgraph")
        elif n.op == "output":
            lines.append(f"    return {_arg(n.args[0])}")
    return "\n".join(lines)
