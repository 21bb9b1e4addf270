"""The ops passes insert into a scheduled program, and the registry of their handlers.

Each op is an fx call target (so a scheduled program prints as Python naming it) and a member
of ``Op``. Consumers of programs -- the printer, the verifier, the simulator, the serializer
and the executor -- each give every op a meaning in one table registered here with
``register``; ``missing_handlers`` lists the ops a consumer does not handle, and a test fails
on any. Adding an op is: a member here, then one entry in each consumer's table.
"""
from __future__ import annotations

from enum import Enum
from typing import Mapping

import torch.fx as fx


class Op(Enum):
    PREFETCH = "prefetch"   # prefetch(src) -> pending: copy a host/disk tensor into a fresh device buffer
    WAIT = "wait"           # wait(pending) -> tensor: the fetched tensor, once it landed
    OFFLOAD = "offload"     # offload(x, tier) -> handle: copy device tensor x to "host" or "disk"
    FREE = "free"           # free(*xs): drop device references (after offloads read them) or handles
    # boundary(*outputs) -> tangents: a training step's forward ends here; the program hands the
    # forward outputs to autograd and resumes with their gradients (the backward)
    BOUNDARY = "boundary"
    # region(*inputs) -> outputs: compute ops fused into one compiled call (passes/fusion.py);
    # what it runs is node.meta["region"] (ir/regions.py), its outputs are read by getitem
    REGION = "region"


def _target(op: Op):
    def target(*args, **kwargs):
        raise RuntimeError(f"memsched.{op.value} only runs inside a scheduled program")

    target.__name__ = target.__qualname__ = op.value
    target.__module__ = __name__
    return target


TARGETS: dict[Op, object] = {op: _target(op) for op in Op}
prefetch, wait, offload, free, boundary, region = (TARGETS[op] for op in Op)
_OP_OF_TARGET = {id(t): op for op, t in TARGETS.items()}


def op_of(node: fx.Node) -> Op | None:
    """The inserted op a node calls, or None for compute, placeholders and the output."""
    if node.op != "call_function":
        return None
    op = _OP_OF_TARGET.get(id(node.target))
    return op if op is not None and TARGETS[op] is node.target else None


def is_inserted(node: fx.Node) -> bool:
    return op_of(node) is not None


def is_compute(node: fx.Node) -> bool:
    """A call of a captured (ATen or Python) function, not an op memsched inserted."""
    return node.op == "call_function" and op_of(node) is None


# consumer name -> its table {Op: handler}
CONSUMERS: dict[str, Mapping[Op, object]] = {}


def register(consumer: str, table: Mapping[Op, object]) -> Mapping[Op, object]:
    """Record the table through which ``consumer`` handles the inserted ops; returns it."""
    CONSUMERS[consumer] = table
    return table


def missing_handlers() -> dict[str, list[Op]]:
    """Per registered consumer, the ops its table lacks (empty when every op is handled)."""
    return {name: [op for op in Op if op not in table] for name, table in CONSUMERS.items()
            if any(op not in table for op in Op)}
