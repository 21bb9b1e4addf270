"""What memsched knows about a node, kept in ``node.meta`` as one frozen dataclass.

Every pass reads and writes these facts through ``info(node)`` and ``annotate(node, ...)``
only, never through string keys. Saved plans store each fact under ``"memsched.<name>"``
(``made_by`` as ``"memsched.pass"``, ``storages`` as ``"memsched.buffers"``: the names of
format version 1), see ``to_saved`` / ``from_saved``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.fx as fx

from .kinds import Kind, Tier

KEY = "memsched"


@dataclass(frozen=True)
class NodeInfo:
    made_by: str = "capture"          # the pass that made the node
    kind: Kind | None = None          # what the value holds (placeholders, gradients, tangents)
    tier: Tier | None = None          # placeholders: the home tier; moves: the tier moved to/from
    nbytes: int | None = None         # bytes a prefetch/offload copies
    restores: str | None = None       # prefetch/wait/recompute: the captured value it brings back
    saves: str | None = None          # offload: the captured value it copies out
    delivers: str | None = None       # offload of a gradient the step returns as this copy
    grad_of: str | None = None        # a gradient: the state key of its parameter
    gathered_from: str | None = None  # an input: the table (state key) whose rows it holds, looked up
                                      # before the program runs (frontend/row_gathers.py)
    step: int | None = None           # analysis: the node's step in the captured program
    storages: tuple[int, ...] | None = None  # analysis: ids of the storages its tensors use
    scratch: int | None = None        # analysis: bytes its op holds inside itself while it runs (CPU, measured)


_EMPTY = NodeInfo()
_FIELDS = {f.name for f in dataclasses.fields(NodeInfo)}
_SAVED_NAME = {"made_by": "pass", "storages": "buffers"}
_FIELD_OF_SAVED = {v: k for k, v in _SAVED_NAME.items()}


def info(node: fx.Node) -> NodeInfo:
    return node.meta.get(KEY, _EMPTY)


def annotate(node: fx.Node, **facts) -> NodeInfo:
    """Set some facts of a node (the others are kept); returns the new record. Made without
    ``dataclasses.replace`` (its checks cost more than the copy: passes annotate every node of
    programs of tens of thousands)."""
    if not facts.keys() <= _FIELDS:
        raise TypeError(f"unknown node fact(s) {sorted(facts.keys() - _FIELDS)}")
    new = object.__new__(NodeInfo)
    new.__dict__.update(info(node).__dict__)
    new.__dict__.update(facts)
    node.meta[KEY] = new
    return new


def tier_of(node: fx.Node) -> Tier:
    """Where a value lives when the program starts: a placeholder's home, else the device."""
    return info(node).tier or Tier.DEVICE


def to_saved(rec: NodeInfo) -> dict:
    """The facts that differ from the defaults, keyed as saved plans name them."""
    out = {}
    for f in dataclasses.fields(NodeInfo):
        value = getattr(rec, f.name)
        if f.name == "made_by" or value is not None:
            key = _SAVED_NAME.get(f.name, f.name)
            out[f"{KEY}.{key}"] = list(value) if isinstance(value, tuple) else (
                str(value) if isinstance(value, (Kind, Tier)) else value)
    return out


def from_saved(meta: dict) -> NodeInfo:
    """Inverse of ``to_saved``; ValueError names a key or value it does not know."""
    facts = {}
    for key, value in meta.items():
        name = key.removeprefix(f"{KEY}.")
        name = _FIELD_OF_SAVED.get(name, name)
        if not key.startswith(f"{KEY}.") or name not in _FIELDS:
            raise ValueError(f"unknown node fact {key!r}")
        facts[name] = value
    try:
        if facts.get("kind") is not None:
            facts["kind"] = Kind(facts["kind"])
        if facts.get("tier") is not None:
            facts["tier"] = Tier(facts["tier"])
    except ValueError as e:
        raise ValueError(f"node fact: {e}") from None
    if facts.get("storages") is not None:
        facts["storages"] = tuple(facts["storages"])
    return NodeInfo(**facts)
