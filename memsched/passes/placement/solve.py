"""solve_placement: the greedy first (it warm-starts the MIP and is the answer when the solver
finds nothing better), then the MIP under a time limit; the caller arbitrates between the two
by simulation (pipeline.py)."""
from __future__ import annotations

import time

import numpy as np

from ...cost_models.hardware import Hardware
from ...errors import InfeasibleBudgetError
from ...ir.units import format_bytes
from ..analysis import Program
from ..floor import binding_point, op_floor
from ..segments import Segments
from .greedy import solve_greedy
from .mip import solve_mip
from .problem import DISK, HOST, KEEP, REFETCH, Placement, PlacementModel
from .ties import tie_groups

__all__ = ["solve_placement", "solve_greedy", "solve_mip"]


def solve_placement(program: Program, segments: Segments, step_time: np.ndarray, hw: Hardware,
                    budget: int, *, time_limit_s: float = 10.0, use_solver: bool = True,
                    graph=None, model: PlacementModel | None = None, min_budget: int | None = None,
                    roles: dict | None = None) -> Placement:
    """Choose residency, homes, gap moves and leads; InfeasibleBudgetError before anything runs
    (naming where the minimum binds and the floor when ``graph``, the captured graph, is given).
    ``model``: the problem already built on ``segments``; ``min_budget``: the least minimum of
    the segmentations tried (pipeline.py), when lower than this one's."""
    t0 = time.perf_counter()
    m = model if model is not None else PlacementModel(program, segments, step_time, hw, budget)
    # the segment model is conservative; with nothing moved the exact peak is the analysis's
    min_budget = min(m.min_budget() if min_budget is None else min_budget, program.peak_bytes)
    bind, floor = _limits(m, program, graph)
    if budget < min_budget:
        raise InfeasibleBudgetError(budget, min_budget, _why(bind, floor, program.workspace_bytes))
    if budget >= program.peak_bytes:
        placement = m.placement(set(m.persistent), {}, {g.id: KEEP for g in m.gaps}, set(), "fits")
        placement.min_budget_bytes = min_budget
        placement.solve_s = time.perf_counter() - t0
        _record_limits(placement, bind, floor)
        return placement
    placement = solve_greedy(m)
    if use_solver and (m.persistent or m.gaps):
        solved = solve_mip(m, placement, t0 + time_limit_s, tie_groups(m, roles or {}))
        if solved is not None:
            solved.alternative = placement  # the simulator arbitrates (pipeline.py)
            placement = solved
        else:
            placement.notes.append("the solver found nothing better in time; greedy plan kept")
    for candidate in (placement, placement.alternative):
        if candidate is not None:
            prefer_host(m, candidate)
    placement.min_budget_bytes = min_budget
    placement.solve_s = time.perf_counter() - t0
    for candidate in (placement, placement.alternative):
        if candidate is not None:
            _record_limits(candidate, bind, floor)
    return placement


def prefer_host(m: PlacementModel, p: Placement) -> None:
    """Disk homes and disk offloads move to host RAM while it has room: the same device bytes,
    and a host fetch is never slower than one from disk. (The MIP is indifferent when the
    transfer hides under compute; this settles it.) Most bytes moved first."""
    room = m.hw.host_bytes - sum(m.size(b) for b, t in p.home.items() if t == HOST)
    room -= sum(m.size(g.buffer) for g in m.gaps if p.gap_choice[g.id] == HOST)
    if room <= 0:
        return
    fetches_of: dict[int, int] = {}
    for g in m.gaps:
        if p.gap_choice[g.id] == REFETCH:
            fetches_of[g.buffer] = fetches_of.get(g.buffer, 0) + 1
    candidates = [(m.size(b) * (1 + fetches_of.get(b, 0)), "home", b) for b, t in p.home.items() if t == DISK]
    candidates += [(2 * m.size(g.buffer), "gap", g.id) for g in m.gaps if p.gap_choice[g.id] == DISK]
    for _, kind, item in sorted(candidates, key=lambda c: -c[0]):
        size = m.size(item) if kind == "home" else m.size(m.gaps[item].buffer)
        if size <= room:
            room -= size
            if kind == "home":
                p.home[item] = HOST
            else:
                p.gap_choice[item] = HOST
    p.objective = m.objective(p.resident, p.home, p.gap_choice, p.early)


def _limits(m: PlacementModel, program: Program, graph):
    """Where the minimum binds, and the floor (None, None without the captured graph)."""
    if graph is None:
        return None, None
    return binding_point(program, graph, m.const, m.s.bounds), op_floor(program, graph)


def _record_limits(p: Placement, bind, floor) -> None:
    if floor is not None:
        p.floor_bytes, p.floor_at = floor.bytes, floor.describe(2)
    if bind is not None:
        p.binds_at = bind.describe(3)


def _why(bind, floor, workspace: int = 0) -> str:
    """Where the minimum binds, the floor below which no plan exists without splitting ops, and
    the library workspace the device holds beside the tensors (counted in the minimum)."""
    parts = [f"{format_bytes(workspace)} of it is the device's library workspace (cuBLAS), held throughout"
             ] if workspace else []
    if bind is not None:
        parts.append(f"the minimum binds at {bind.describe()}")
    if floor is not None:
        parts.append(f"the floor (the largest single op's working set) is {floor.describe(2)}")
    return "; ".join(parts)
