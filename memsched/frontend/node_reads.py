"""Reading an exported graph's nodes, shared by the rewrites that match patterns in it
(loss_head.py, kernel_patterns.py, composites.py)."""
from __future__ import annotations

import torch
import torch.fx as fx

# trace-time checks export leaves on values: they read a value without being one of its uses
ASSERTS = {torch.ops.aten._assert_tensor_metadata.default}


def tensor_val(n) -> torch.Tensor | None:
    """The FakeTensor a node computes (None for a non-node or a non-tensor value)."""
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def readers_of(n: fx.Node) -> list[fx.Node]:
    """The nodes using ``n``'s value, trace-time asserts left out."""
    return [u for u in n.users if u.target not in ASSERTS]


def arg_of(node: fx.Node, i: int, name: str, default):
    """Argument ``i`` of a call, passed by position or by ``name``."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)
