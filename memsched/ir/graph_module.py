"""Graph modules whose Python code is generated when first needed.

``fx.GraphModule`` generates and compiles its ``forward`` source on construction and on every
``recompile()``: about half a second for a 7B training step's 20 000 nodes. Planning makes
several (each candidate schedule, each ``plan.history`` snapshot) and runs or prints few of
them, so memsched builds them lazily: the code is made on the first call, ``.code`` or print.
"""
from __future__ import annotations

import torch
from torch.fx._lazy_graph_module import _LazyGraphModule


def lazy_graph_module(root: torch.nn.Module | dict, graph: torch.fx.Graph,
                      class_name: str = "GraphModule") -> torch.fx.GraphModule:
    """``fx.GraphModule(root, graph, class_name)`` with its code made on first use."""
    return _LazyGraphModule(root, graph, class_name=class_name)


def make_lazy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``gm`` as a lazy graph module (the same graph; ``recompile()`` then costs nothing)."""
    return _LazyGraphModule.from_graphmodule(gm)
