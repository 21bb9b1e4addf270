"""Sparse tensors refused by name, before anything is planned.

The planner counts a tensor's bytes from its shape and strides and the runtime moves its one
storage; a sparse tensor (COO, CSR, ...) has neither: its values and indices are storages of
their own, sized by how many elements are set. So a sparse input, weight or buffer, an op that
makes one (``to_sparse``), and a sparse gradient (``nn.Embedding(..., sparse=True)`` in a
training step) are refused here, naming the tensor, where the capture would fail deep inside
with "Cannot access storage of SparseTensorImpl".
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..ir.tensors import tensor_leaves


def reject_sparse(graph: torch.fx.Graph, model: torch.nn.Module, names: dict[str, str], backward: bool = False) -> None:
    """Raise UnsupportedModelError at the first value of ``graph`` that is not a dense tensor.
    ``names``: placeholder name -> what it is to the user ("input 'adj'", "buffer 'adj'");
    ``backward``: the graph is a training step whose forward was checked already, so a sparse
    value there is a gradient."""
    for n in graph.nodes:
        layouts = {t.layout for t in tensor_leaves(n.meta.get("val")) if t.layout != torch.strided}
        if not layouts:
            continue
        layout = str(sorted(layouts, key=str)[0])
        model_name = type(model).__name__
        if n.op == "placeholder":
            what = names.get(n.name, f"input {n.name!r}")
            raise UnsupportedModelError(
                f"{model_name} reads {what}, a sparse tensor ({layout}): memsched plans and moves dense "
                f"tensors only. Pass it dense (.to_dense()), or run the sparse part outside the compiled module")
        if backward:
            sparse = [name for name, m in model.named_modules() if getattr(m, "sparse", False) is True]
            which = f" ({', '.join(repr(x) for x in sparse[:3])})" if sparse else ""
            raise UnsupportedModelError(
                f"{model_name}'s training step makes a sparse gradient ({layout}, with {n.target}): an "
                f"embedding built with sparse=True{which}? memsched plans and moves dense tensors only: "
                "build it with sparse=False (its gradient is then a dense tensor the size of its weight)")
        raise UnsupportedModelError(
            f"{model_name} makes a sparse tensor ({layout}) with {n.target}{_module(n)}: memsched plans and "
            "moves dense tensors only. Keep the values dense, or run the sparse part outside the compiled module")


def _module(n: torch.fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), None) if stack else None
    name = path[0] if isinstance(path, tuple) and path else None
    return f" in module {name!r}" if name else ""
