"""An ATen op call's structure key: the op and what its arguments are (each tensor's dtype,
shape, strides and device type; every other argument written out). The runtime times op calls
under it and the cost model prices a node of a plan by the times recorded under the same key
(cost_models/measures.py), so the key is made alike from a planned node's traced values and
from a running call's tensors."""
from __future__ import annotations

import torch
import torch.fx as fx


def _part(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{x.dtype}{tuple(x.shape)}{tuple(x.stride())}{x.device.type}"
    if isinstance(x, (list, tuple)):   # fx holds lists as immutable_list: written alike
        return "[" + ",".join(map(_part, x)) + "]"
    if isinstance(x, torch.device):
        return x.type
    if isinstance(x, _WRITTEN):
        return repr(x)
    if isinstance(x, (torch.UntypedStorage, torch.TypedStorage)):   # repr reads every element
        return f"storage({x.nbytes()})"
    return type(x).__name__


_WRITTEN = (int, float, bool, complex, str, type(None), torch.dtype, torch.memory_format, torch.layout)


def op_key(target, args: tuple, kwargs: dict) -> str:
    """The key of a call of ``target`` with these arguments (tensors real or traced)."""
    named = ",".join(f"{k}={_part(v)}" for k, v in sorted(kwargs.items()))
    return f"op:{target}({_part(args)};{named})"


_CACHED = "memsched_op_key"   # node.meta: (the input values it was made from, the key)


def node_op_key(node: fx.Node) -> str | None:
    """The key of a planned call_function node, from its inputs' traced values; None when an
    input has none. Kept in the node's meta while those values stay the same objects (the
    simulator asks for every node's key at every run)."""
    inputs = tuple(id(a.meta.get("val")) for a in node.all_input_nodes)
    cached = node.meta.get(_CACHED)
    if cached is not None and cached[0] == inputs:
        return cached[1]
    missing = []

    def val(a: fx.Node):
        v = a.meta.get("val")
        if v is None:
            missing.append(a)
        return v
    args, kwargs = fx.map_arg((node.args, node.kwargs), val)
    key = None if missing else op_key(node.target, args, kwargs)
    node.meta[_CACHED] = (inputs, key)
    return key
