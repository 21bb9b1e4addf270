"""What an ATen op does besides computing its outputs: the graph values it writes in place,
and whether dead-code elimination must keep it."""
from __future__ import annotations

import operator

import torch
import torch.fx

# Ops that update running statistics (args 3 and 4) in training mode without saying so in
# their schema (``batch_norm`` as torch.export leaves it in an inference capture of a model in
# training mode)
_HIDDEN_WRITERS = {
    torch.ops.aten.batch_norm.default,
    torch.ops.aten.native_batch_norm.default,
    torch.ops.aten.cudnn_batch_norm.default,
    torch.ops.aten.miopen_batch_norm.default,
}


def written_args(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The graph values an op writes in place."""
    if node.op != "call_function":
        return []
    if node.target in _HIDDEN_WRITERS:
        training = node.args[5] if len(node.args) > 5 else node.kwargs.get("training", False)
        return [a for a in node.args[3:5] if isinstance(a, torch.fx.Node)] if training else []
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.fx.Node):
            out.append(value)
    return out


def written_root(value: torch.fx.Node) -> torch.fx.Node:
    """The value a view (or a chain of views) of it was taken from: where a write lands."""
    while value.op == "call_function" and value.args and isinstance(value.args[0], torch.fx.Node):
        schema = getattr(value.target, "_schema", None)
        if schema is None or not schema.returns or schema.returns[0].alias_info is None:
            break
        value = value.args[0]
    return value


def is_impure(node: torch.fx.Node) -> bool:
    """What dead-code elimination keeps besides what is read: writes in place, and random ops
    that draw even when nothing reads what they make (a dropout on a branch the model computes
    and drops: eager draws its numbers, so every later draw depends on it being there)."""
    if node.op in ("placeholder", "output"):
        return True
    if node.op == "call_function" and node.target is not operator.getitem:
        schema = getattr(node.target, "_schema", None)
        if schema is not None and any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments):
            return True
        if isinstance(node.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in node.target.tags:
            return not draws_nothing(node)
    return False


def draws_nothing(n: torch.fx.Node) -> bool:
    """A random op called so that it draws nothing: attention or dropout with p = 0, dropout
    outside training."""
    schema = n.target._schema
    names = [a.name for a in schema.arguments]
    given = dict(zip(names, n.args)) | dict(n.kwargs)
    for arg in schema.arguments:
        if arg.name not in given and arg.default_value is not None:
            given[arg.name] = arg.default_value
    if "dropout_p" in names:
        return given.get("dropout_p") == 0
    if names[:1] == ["input"] and "p" in names:   # dropout, native_dropout
        return given.get("p") == 0 or given.get("train") is False
    return False
