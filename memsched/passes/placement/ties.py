"""Layers made from one traced layer (frontend/repeats.py) are decided once: the model tensors
and gaps that play the same role in each of them form a group, and the MIP ties every member's
decisions to the first's (the same residency, home, keep / offload / recompute choice and
lead). The solver's presolve folds the tied variables, so it searches one layer's choices
instead of thirty; every segment's budget constraint stays, so the plan is still checked on the
whole program."""
from __future__ import annotations

from dataclasses import dataclass

from .problem import PlacementModel


@dataclass(frozen=True)
class Ties:
    storages: list[list[int]]   # groups of model tensors (storage ids), first = the one kept free
    gaps: list[list[int]]       # groups of gap ids

    def __bool__(self) -> bool:
        return bool(self.storages or self.gaps)

    @property
    def tied(self) -> int:
        """Decisions made by another's: members beyond each group's first."""
        return sum(len(g) - 1 for g in self.storages + self.gaps)


def tie_groups(m: PlacementModel, roles: dict) -> Ties:
    """The groups of ``m``'s model tensors and gaps with the same role (block, position, and
    the events around a gap, relative to its own layer) in different layers of ``roles``
    (``Captured.layer_roles``); groups of one are left out."""
    if not roles:
        return Ties([], [])
    steps = m.p.steps

    def at(step: int):
        return roles.get(steps[step]) if 0 <= step < len(steps) else None

    by_param: dict = {}
    for b in m.persistent:
        r = roles.get(m.p.storages[b].name)
        if r is not None and r[0] == "P":
            by_param.setdefault((r[2], m.size(b)), []).append(b)
    by_gap: dict = {}
    for g in m.gaps:
        r, a, c = roles.get(g.value), at(g.start), at(g.end)
        if r is None or a is None or c is None:
            continue
        layer = r[1]
        key = (g.persistent, g.deliver, m.size(g.buffer), r[0], r[2],
               a[0], a[1] - layer, a[2], c[0], c[1] - layer, c[2], g.id in m.recompute)
        by_gap.setdefault(key, []).append(g.id)
    return Ties([v for v in by_param.values() if len(v) > 1], [v for v in by_gap.values() if len(v) > 1])
