"""A fused region: compute ops of a scheduled program run as one compiled call.

The fusion pass (passes/fusion.py) cuts the compute between scheduling points into regions;
each region node (``Op.REGION``) keeps its ops here, in ``node.meta["region"]``, as a small fx
graph whose placeholders are the region node's arguments and whose output tuple the getitem
nodes after it read. ``nbytes`` bounds the device bytes the region's call allocates while it
runs (every storage its ops make, outputs included, plus what their lowerings hold besides:
passes/fusion.py ``scratch_bytes``): the planner, the simulator's memory walk,
the verifier and the runtime's accountant all hold ``nbytes`` for the call. The runtime
compiles the graph (runtime/regions.py); nothing here runs it.
"""
from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx


KEY = "region"


@dataclass(frozen=True, eq=False)
class Region:
    graph: fx.GraphModule        # placeholders in0.. (the region node's args), ops op0.., a tuple output
    ops: tuple[str, ...]         # the ATen ops fused, in order
    nbytes: int                  # device bytes the call may allocate: its ops' storages and scratch
    key: str                     # the region's structure: equal keys compile to the same kernel
    names: tuple[str, ...] = ()  # the names its ops had in the program (to unfuse it), in order

    @property
    def n_outputs(self) -> int:
        return len(output_node(self.graph).args[0])


def region_of(node: fx.Node) -> Region | None:
    return node.meta.get(KEY)


def reads_region(node: fx.Node) -> bool:
    """A getitem of a region's outputs (its value is made, and its time spent, by the region)."""
    return (node.op == "call_function" and node.target is operator.getitem and bool(node.args)
            and isinstance(node.args[0], fx.Node) and region_of(node.args[0]) is not None)


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def _signature(val) -> str:
    if isinstance(val, torch.Tensor):
        return f"{val.dtype}{tuple(val.shape)}{tuple(val.stride())}{val.device.type}"
    return type(val).__name__


def structure_key(gm: fx.GraphModule) -> str:
    """The graph's code (canonical names, constants written out) and its inputs' shapes,
    strides and dtypes: two regions with the same key compute the same function."""
    inputs = [_signature(n.meta.get("val")) for n in gm.graph.nodes if n.op == "placeholder"]
    text = gm.code + "\n" + "\n".join(inputs)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
