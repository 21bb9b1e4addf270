"""What a move across an idle gap restores when several values alias the storage.

A storage idle between two events may be held by several live values: a weight and its
transpose, a fused projection and the heads split from it, an op's tuple output and the item
taken from it. Placement moves the storage as one tensor, the *root* -- a value spanning the
whole storage -- and after the root is back the other live values are views of it, rebuilt by
re-running the view ops that made them (``Program.view_of``): metadata only, no compute, no
bytes. The storage's bytes are what the move frees and what it costs, whatever its views."""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.kinds import PERSISTENT
from .analysis import Program, Storage


@dataclass(frozen=True)
class Restore:
    root: str                   # the value moved (or recomputed, or refetched from its home)
    rebuild: tuple[str, ...]    # view values re-made from the root after it is back, in order
    aliases: tuple[str, ...]    # the live values besides the root (each is in ``rebuild``)
    held: bool = False          # the root stays referenced from its definition to the
                                # storage's last event (free while a view holds the storage)


def live_across(program: Program, b: Storage, a: int, c: int) -> list[str]:
    """The values of storage ``b`` defined by step ``a`` and read at ``c`` or later."""
    vals = program.values
    return [v for v in b.values if vals[v].step <= a and vals[v].last_use >= c]


def _path(program: Program, value: str, root: str) -> list[str] | None:
    """The view values from ``root`` (excluded) down to ``value``; None if it is not a view of it."""
    path = []
    while value != root:
        path.append(value)
        value = program.view_of.get(value)
        if value is None:
            return None
    return path


def _through(program: Program, root: str, live: list[str]) -> Restore | None:
    paths = [_path(program, v, root) for v in live]
    if not live or any(p is None for p in paths):
        return None
    rebuild = sorted({v for p in paths for v in p}, key=lambda v: (program.values[v].step, v))
    return Restore(root, tuple(rebuild), tuple(v for v in live if v != root), held=True)


def restores_of(program: Program, b: Storage, lives: list[list[str]]) -> list[Restore | None]:
    """How each idle gap of storage ``b`` (given by the values live across it) is restored;
    None for a gap that must stay on the device.

    All of a storage's gaps go through one root -- a value spanning the storage, held from
    its definition on, so every gap can move it -- with the other live values rebuilt as its
    views. Without such a root, a gap whose one live value is movable moves it as it is (a
    refetch restores the model tensor itself, never a view of it)."""
    vals = program.values
    persistent = b.kind in PERSISTENT
    if any(len(live) > 1 or (live and live[0] != b.values[0]) for live in lives):
        for root in ([b.values[0]] if persistent else b.values):
            if vals[root].fills:
                out = [_through(program, root, live) for live in lives]
                if all(r is not None for r in out):
                    return out
    return [Restore(live[0], (), ()) if len(live) == 1 and vals[live[0]].single_tensor
            and (not persistent or live[0] == b.values[0]) else None for live in lives]
