"""The placement MIP (OR-Tools pywraplp, SCIP; CBC if SCIP is missing).

Variables, per model tensor b: r[b] resident, d[b] homed on disk (else host, when the hardware
has a host tier); per gap g: y[g] kept, od[g]/oh[g] offloaded to disk/host (activations),
rc[g] recomputed, fd[g]/fh[g] refetched from disk/host (model tensors); per fetch a lead in
[0, 1] split over the tiers it may come from; per segment tau[j] >= compute and >= the load of
every link direction. Time is counted in microseconds, so integral solvers lose nothing.
``problem_data`` dumps the exact formulation for inspection.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from ...ir.kinds import LINKS, fetch_links, offload_links
from .greedy import tidy
from .ties import Ties
from .problem import DISK, EPS, HOST, KEEP, RECOMPUTE, REFETCH, FetchKey, Gap, Placement, PlacementModel

_US = 1e6  # the MIP counts time in microseconds
# From this many variables, the search stops at a time-optimal plan instead of going on to
# settle the transfer tie-break (seconds on a 7B model, for a millionth of the step time)
LARGE = 2000
# ... and stops once its plan is proven within this share of the optimum: past it, the search
# spends seconds for less than the error of the time model itself (a 7B training step: the
# plan found at 2.8 s, then 5 s more to close a 0.35% gap, measured)
LARGE_GAP = 5e-3
# Below this many variables the search runs to a 1e-7 gap, which settles the tie-break on bytes
# moved (an 8-layer MLP's training step, 255-297 variables: optimal in 0.5 s). From it, proving
# the last fraction of a percent takes the whole time limit for nothing the time model can tell
# apart (a 4-layer LLaMA training step, 1034 variables: 0.34% from its bound at 1.8 s, 0.13%
# after the 10 s limit), so those stop within LARGE_GAP too, and the moves their plan does not
# need are taken back afterwards (greedy.tidy)
SETTLE = 300
# From this many variables, layers made from one traced layer are decided once (ties.py): the
# untied search does not finish in the time limit and stops at worse plans (a 7B training
# step, 9455 variables: 13% slower predicted step after 10 s than the tied one after 3 s);
# below it, each layer keeps its own choices (a 7B inference, 2411 variables, solves untied
# in under 2 s, 2% faster than tied: host RAM holds some layers' weights, not all)
TIE_FROM = 6000


@dataclass
class Formulation:
    """The solver with the placement MIP built in it, and its variables by role."""

    m: PlacementModel
    solver: object
    has_host: bool
    r: dict = field(default_factory=dict)           # storage -> resident
    d: dict = field(default_factory=dict)           # storage -> homed on disk
    y: dict = field(default_factory=dict)           # gap -> kept
    od: dict = field(default_factory=dict)          # gap -> offloaded to disk
    oh: dict = field(default_factory=dict)          # gap -> offloaded to host
    rc: dict = field(default_factory=dict)          # gap -> recomputed
    fetched: dict = field(default_factory=dict)     # (gap, tier) -> model tensor refetched from tier
    leads: dict = field(default_factory=dict)       # FetchKey -> lead (None: into segment 0)
    lead_parts: dict = field(default_factory=dict)  # (FetchKey, tier) -> lead of the part from tier
    tau: list = field(default_factory=list)         # segment -> its time
    # terms collected while the variables are made, turned into constraints afterwards
    mem: list = field(default_factory=list)         # segment -> [(bytes, variable)]
    loads: dict = field(default_factory=dict)       # (link, segment) -> [microseconds]
    late_terms: list = field(default_factory=list)  # microseconds compute waits for
    rc_time: list = field(default_factory=list)     # segment -> [recompute microseconds]
    rc_deps: list = field(default_factory=list)     # (gap, "gap" / "weight", what it reads)
    host_terms: list = field(default_factory=list)  # bytes on the host
    tied: int = 0                                   # decisions made as another layer's (ties.py)


def formulate(m: PlacementModel, ties: Ties | None = None) -> Formulation | None:
    """The MIP of ``m`` in a fresh solver; None if no MIP solver is available. ``ties``
    (placement/ties.py) are added when the problem has at least ``TIE_FROM`` variables."""
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("SCIP") or pywraplp.Solver.CreateSolver("CBC")
    if solver is None:
        return None
    f = Formulation(m, solver, m.hw.host_bytes > 0)
    f.mem = [[] for _ in range(m.K)]
    f.loads = {(link, j): [] for link in LINKS for j in range(m.K)}
    f.rc_time = [[] for _ in range(m.K)]
    for b in m.persistent:
        _residency_variables(f, b)
    for g in m.gaps:
        _gap_variables(f, g)
    _budget_constraints(f)
    _objective(f)
    if ties and solver.NumVariables() >= TIE_FROM:
        _tie(f, ties)
        f.tied = ties.tied
    return f


def _tie(f: Formulation, ties: Ties) -> None:
    """Every member of a group decides as its first: equal variables, role by role."""
    def same(vars_of: dict, a, b):
        x, y = vars_of.get(a), vars_of.get(b)
        if x is not None and y is not None:
            f.solver.Add(x == y)

    for group in ties.storages:
        for b in group[1:]:
            for vars_of in (f.r, f.d):
                same(vars_of, group[0], b)
            _tie_lead(f, FetchKey.init(group[0]), FetchKey.init(b))
    for group in ties.gaps:
        for g in group[1:]:
            for vars_of in (f.y, f.od, f.oh, f.rc):
                same(vars_of, group[0], g)
            for tier in (DISK, HOST):
                same(f.fetched, (group[0], tier), (g, tier))
            _tie_lead(f, FetchKey.gap(group[0]), FetchKey.gap(g))


def _tie_lead(f: Formulation, a: FetchKey, b: FetchKey) -> None:
    x, y = f.leads.get(a), f.leads.get(b)
    if x is None or y is None:
        return
    f.solver.Add(x == y)
    for tier in (DISK, HOST):
        if (a, tier) in f.lead_parts and (b, tier) in f.lead_parts:
            f.solver.Add(f.lead_parts[(a, tier)] == f.lead_parts[(b, tier)])


# -- variables ------------------------------------------------------------------------------
def _load(f: Formulation, amount, tier, j: int, nbytes: float, offload: bool = False) -> None:
    for link in (offload_links if offload else fetch_links)(tier, f.m.dev):
        f.loads[(link, j)].append(nbytes / f.m.hw.bandwidth(link) * _US * amount)


def _stall(f: Formulation, amount, tier, nbytes: float) -> None:
    """A late fetch: compute waits for all of it (a conservative price)."""
    f.late_terms.append(f.m.transfer_s(nbytes, fetch_links(tier, f.m.dev)) * _US * amount)


def _fetch_split(f: Formulation, key: FetchKey, tiers: dict, c: int, nbytes: float, lead_cap) -> None:
    """A fetch into segment c; ``tiers``: tier -> amount fetched from it. Adds its lead: the
    part issued in segment c-1 loads that segment's links and holds the bytes there."""
    solver = f.solver
    if c == 0:
        for tier, amount in tiers.items():
            _stall(f, amount, tier, nbytes)
        f.leads[key] = None
        return
    name = f"lead_{key.kind}{key.item}"
    # binary: a fetch is issued early or not (a fractional lead would price a fetch as hidden
    # that the decoded plan issues late, and stalls on)
    lead = solver.BoolVar(name)
    solver.Add(lead <= lead_cap)
    parts = []
    for tier, amount in tiers.items():
        part = solver.NumVar(0, 1, f"{name}_{tier}")
        f.lead_parts[(key, tier)] = part
        solver.Add(part <= amount)
        parts.append(part)
        _load(f, part, tier, c - 1, nbytes)
        _stall(f, amount - part, tier, nbytes)
    solver.Add(solver.Sum(parts) == lead)
    f.mem[c - 1].append((nbytes, lead))
    f.leads[key] = lead


def _residency_variables(f: Formulation, b: int) -> None:
    """Resident, or homed on disk / host and fetched before the first use."""
    m, solver = f.m, f.solver
    nb = float(m.size(b))
    r = f.r[b] = solver.BoolVar(f"r{b}")
    if f.has_host:
        d = f.d[b] = solver.BoolVar(f"d{b}")
        solver.Add(r + d <= 1)
        tiers = {DISK: d, HOST: 1 - r - d}
        f.host_terms.append(nb * (1 - r - d))
    else:
        tiers = {DISK: 1 - r}
    c0 = m.first_seg[b]
    for j in list(range(0, c0)) + list(range(m.last_seg[b] + 1, m.K)):
        f.mem[j].append((nb, r))
    # segment c0-1 holds it if resident or fetched early; lead <= 1 - r keeps them exclusive
    _fetch_split(f, FetchKey.init(b), tiers, c0, nb, 1 - r)


def _gap_variables(f: Formulation, g: Gap) -> None:
    """Kept, or moved (and its fetch back with its lead)."""
    m = f.m
    nb = float(m.size(g.buffer))
    y = f.y[g.id] = f.solver.BoolVar(f"y{g.id}")
    lo, hi = m.gap_span[g.id]
    for j in range(lo, hi + 1):
        f.mem[j].append((nb, y))
    tiers = _refetch_variables(f, g) if g.persistent else _offload_variables(f, g, nb)
    if g.deliver:
        return  # never fetched back: no lead
    # the last held segment (c-1) is covered by y; an early fetch holds it too
    _fetch_split(f, FetchKey.gap(g.id), tiers, m.s.seg(g.end), nb, 1 - y)


def _refetch_variables(f: Formulation, g: Gap) -> dict:
    """A model tensor's gap not kept is fetched again from its home: fd/fh >= dropped and homed
    there. Returns tier -> amount fetched from it."""
    solver, b, y = f.solver, g.buffer, f.y[g.id]
    solver.Add(y >= f.r[b])
    fd = solver.NumVar(0, 1, f"fd{g.id}")
    solver.Add(fd >= (1 - y) + (f.d[b] if f.has_host else 1 - f.r[b]) - 1)
    tiers = {DISK: fd}
    f.fetched[(g.id, DISK)] = fd
    if f.has_host:
        fh = solver.NumVar(0, 1, f"fh{g.id}")
        solver.Add(fh >= (1 - y) - f.d[b])
        tiers[HOST] = fh
        f.fetched[(g.id, HOST)] = fh
    return tiers


def _offload_variables(f: Formulation, g: Gap, nb: float) -> dict:
    """An activation's gap: exactly one of kept, offloaded to disk / host, recomputed.
    Returns tier -> amount fetched back from it."""
    m, solver = f.m, f.solver
    od = f.od[g.id] = solver.BoolVar(f"od{g.id}")
    tiers = {DISK: od}
    _load(f, od, DISK, m.s.seg(g.start), nb, offload=True)
    if f.has_host:
        oh = f.oh[g.id] = solver.BoolVar(f"oh{g.id}")
        tiers[HOST] = oh
        _load(f, oh, HOST, m.s.seg(g.start), nb, offload=True)
        f.host_terms.append(nb * oh)
    choices = [f.y[g.id]] + list(tiers.values())
    if g.id in m.recompute:
        secs, extra, keep, weights = m.recompute[g.id]
        rc = f.rc[g.id] = solver.BoolVar(f"rc{g.id}")
        choices.append(rc)
        f.rc_time[m.s.seg(g.end)].append(secs * _US * rc)
        if extra:
            f.mem[m.s.seg(g.end)].append((float(extra), rc))
        f.rc_deps += [(g.id, "gap", h) for h in keep] + [(g.id, "weight", w) for w in weights]
    solver.Add(solver.Sum(choices) == 1)
    return tiers


# -- constraints and objective --------------------------------------------------------------
def _budget_constraints(f: Formulation) -> None:
    """Recomputations read their inputs on the device; device bytes <= budget per segment;
    host bytes <= host capacity."""
    m, solver = f.m, f.solver
    for gid, kind, dep in f.rc_deps:
        solver.Add(f.rc[gid] <= (f.y[dep] if kind == "gap" else f.r[dep]))
    for j in range(m.K):
        if f.mem[j]:
            # every term is a variable times bytes: set the row's coefficients directly (an
            # expression of thousands of terms per segment is slow to build and flatten)
            coefs: dict[int, list] = {}   # variable index -> [variable, bytes]
            for coef, v in f.mem[j]:
                coefs.setdefault(v.index(), [v, 0.0])[1] += coef
            row = solver.Constraint(-solver.infinity(), float(m.budget - m.const[j]))
            for v, coef in coefs.values():
                row.SetCoefficient(v, coef)
    if f.has_host and f.host_terms:
        solver.Add(solver.Sum(f.host_terms) <= float(m.hw.host_bytes))


def _objective(f: Formulation) -> None:
    """Minimise sum_j tau_j + late fetches, plus EPS per transferred microsecond; tau_j is at
    least the segment's compute (with recomputations) and every link's load."""
    m, solver = f.m, f.solver
    f.tau = [solver.NumVar(float(m.compute[j]) * _US, solver.infinity(), f"tau{j}") for j in range(m.K)]
    for j in range(m.K):
        if f.rc_time[j]:
            solver.Add(f.tau[j] >= float(m.compute[j]) * _US + solver.Sum(f.rc_time[j]))
    moved = []
    for (link, j), terms in f.loads.items():
        if terms:
            expr = solver.Sum(terms)
            solver.Add(f.tau[j] >= expr)
            moved.append(expr)
    late = solver.Sum(f.late_terms) if f.late_terms else 0
    solver.Minimize(solver.Sum(f.tau) + (1 + EPS) * late + (EPS * solver.Sum(moved) if moved else 0))


# -- warm start -----------------------------------------------------------------------------
def _set_hints(f: Formulation, warm: Placement) -> None:
    """A complete hint (continuous parts and segment times too), so the solver starts from
    ``warm``."""
    hints = _decision_hints(f, warm) + _lead_hints(f, warm) + _time_hints(f, warm)
    f.solver.SetHint([v for v, _ in hints], [x for _, x in hints])


def _decision_hints(f: Formulation, warm: Placement) -> list:
    out = []
    for b in f.m.persistent:
        out.append((f.r[b], float(b in warm.resident)))
        if f.has_host:
            out.append((f.d[b], float(warm.home.get(b) == DISK)))
    for g in f.m.gaps:
        c = warm.gap_choice[g.id]
        out.append((f.y[g.id], float(c == KEEP)))
        if g.id in f.rc:
            out.append((f.rc[g.id], float(c == RECOMPUTE)))
        if not g.persistent:
            out.append((f.od[g.id], float(c == DISK)))
            if f.has_host:
                out.append((f.oh[g.id], float(c == HOST)))
    return out


def _lead_hints(f: Formulation, warm: Placement) -> list:
    out = []
    for key, lead in f.leads.items():
        if lead is None:
            continue
        on = float(key in warm.early)
        out.append((lead, on))
        if key.kind == "gap":
            g = f.m.gaps[key.item]
            tier = warm.gap_choice[g.id] if not g.persistent else warm.home.get(g.buffer)
        else:
            tier = warm.home.get(key.item)
        for t in (DISK, HOST):
            if (key, t) in f.lead_parts:
                out.append((f.lead_parts[(key, t)], on * float(tier == t)))
    for (gid, tier), var in f.fetched.items():
        moved_out = warm.gap_choice[gid] != KEEP
        out.append((var, float(moved_out and warm.home.get(f.m.gaps[gid].buffer) == tier)))
    return out


def _time_hints(f: Formulation, warm: Placement) -> list:
    m = f.m
    warm_loads = m.loads(warm.resident, warm.home, warm.gap_choice, warm.early)[0].max(axis=0)
    warm_compute = m.compute + m.recompute_s(warm.gap_choice)
    return [(f.tau[j], float(max(warm_compute[j], warm_loads[j])) * _US) for j in range(m.K)]


# -- solving and decoding -------------------------------------------------------------------
def _decode(f: Formulation) -> tuple[set, dict, dict, set]:
    """resident, home, gap choice and early fetches of the solver's solution."""
    m = f.m
    resident = {b for b in m.persistent if f.r[b].solution_value() > 0.5}
    home = {b: (DISK if not f.has_host or f.d[b].solution_value() > 0.5 else HOST)
            for b in m.persistent if b not in resident}
    choice = {}
    for g in m.gaps:
        if f.y[g.id].solution_value() > 0.5:
            choice[g.id] = KEEP
        elif g.id in f.rc and f.rc[g.id].solution_value() > 0.5:
            choice[g.id] = RECOMPUTE
        elif g.persistent:
            choice[g.id] = REFETCH
        else:
            choice[g.id] = HOST if (f.has_host and f.oh[g.id].solution_value() > 0.5) else DISK
    early = {key for key, v in f.leads.items() if v is not None and v.solution_value() > 0.5}
    early = {k for k in early if (k.kind == "init" and k.item not in resident)
             or (k.kind == "gap" and choice[k.item] != KEEP)}
    return resident, home, choice, early


def _most_moved(m: PlacementModel) -> float:
    """Seconds of transfer no placement exceeds: every model tensor fetched from disk at its
    first use and at every gap, every activation gap written to disk and read back."""
    from_disk = fetch_links(DISK, m.dev)
    total = sum(m.transfer_s(m.size(b), from_disk) for b in m.persistent)
    for g in m.gaps:
        total += m.transfer_s(m.size(g.buffer), from_disk)
        if not g.persistent:
            total += m.transfer_s(m.size(g.buffer), offload_links(DISK, m.dev))
    return total


def solve_mip(m: PlacementModel, warm: Placement | None, deadline: float, ties: Ties | None = None) -> Placement | None:
    """Solve the MIP until ``deadline`` (a perf_counter time) at the latest, warm-started from
    ``warm`` if given; None if no solution was found, or none better than ``warm``."""
    from ortools.linear_solver import pywraplp

    f = formulate(m, ties)
    if f is None:
        return None
    if warm is not None:
        _set_hints(f, warm)
    f.solver.SetTimeLimit(int(max(deadline - time.perf_counter(), 0.1) * 1000))
    if f.solver.NumVariables() >= LARGE:
        # stop at a plan that takes the compute time alone, give or take the tie-break: the
        # search would only trade transfer crumbs (SCIP's limits/primal). Within EPS times the
        # most any plan can move of the compute bound: 0.1% of a 7B step streaming its weights.
        stop = (float(m.compute.sum()) + EPS * _most_moved(m)) * _US
        # no cutting rounds at the root: on these problems SCIP's root cuts take seconds and
        # the search finds better plans without them (7B inference: a time-optimal plan in
        # 1.7 s instead of 3.7 s; a 7B training step: 13% faster in the 10 s, measured)
        f.solver.SetSolverSpecificParametersAsString(f"limits/primal = {stop!r}\nseparating/maxroundsroot = 0")
    params = pywraplp.MPSolverParameters()
    # SCIP's default relative gap (1e-4) stops at plans a transfer-price tie-break away from
    # the optimum on small problems; the time limit bounds the search either way
    relaxed = f.solver.NumVariables() >= SETTLE
    params.SetDoubleParam(pywraplp.MPSolverParameters.RELATIVE_MIP_GAP, LARGE_GAP if relaxed else 1e-7)
    status = f.solver.Solve(params)
    names = {pywraplp.Solver.OPTIMAL: "optimal", pywraplp.Solver.FEASIBLE: "feasible"}
    if status not in names:
        return None
    result = m.placement(*_decode(f), names[status],
                         n_variables=f.solver.NumVariables(), n_constraints=f.solver.NumConstraints())
    if f.tied:
        result.notes.append(f"repeated layers decided once: {f.tied} decisions tied to their first layer's")
    if result.segment_bytes.max() > m.budget:
        return None  # numerical slack in the solver: never hand out a plan over budget
    if relaxed and not f.tied:   # (tied layers keep deciding alike)
        result = tidy(m, result)
    if warm is not None and result.objective > warm.objective + 1e-12:
        return None  # a time-limited incumbent worse than the warm start: keep the greedy plan
    try:
        bound = f.solver.Objective().BestBound()
        value = f.solver.Objective().Value()
        # stopped before the relaxation gave a usable bound (infinite, or on the wrong side of
        # the incumbent): the gap is unknown, not astronomically large
        if math.isfinite(bound) and 0 <= bound <= value * (1 + 1e-9) + 1e-9:
            result.mip_gap = (value - min(bound, value)) / max(abs(value), 1e-12)
    except Exception:  # some backends do not expose a bound
        pass
    return result


# -- inspection -----------------------------------------------------------------------------
def problem_data(m: PlacementModel) -> dict:
    """The exact MIP of ``m`` as data: ``variables`` (name, lb, ub, integer), ``constraints``
    (name, lb, ub, coefficients {variable name: coefficient}), ``objective`` (sense, offset,
    coefficients) and the ``backend``. Time is in microseconds, bytes as bytes."""
    from ortools.linear_solver import linear_solver_pb2

    f = formulate(m)
    if f is None:
        raise RuntimeError("no MIP solver (SCIP or CBC) in this OR-Tools build")
    proto = linear_solver_pb2.MPModelProto()
    f.solver.ExportModelToProto(proto)
    names = [v.name for v in proto.variable]
    variables = [dict(name=v.name, lb=v.lower_bound, ub=v.upper_bound, integer=v.is_integer)
                 for v in proto.variable]
    constraints = [dict(name=c.name, lb=c.lower_bound, ub=c.upper_bound,
                        coefficients={names[i]: x for i, x in zip(c.var_index, c.coefficient)})
                   for c in proto.constraint]
    objective = dict(sense="maximize" if proto.maximize else "minimize", offset=proto.objective_offset,
                     coefficients={v.name: v.objective_coefficient for v in proto.variable
                                   if v.objective_coefficient})
    return dict(backend=f.solver.SolverVersion(), variables=variables, constraints=constraints,
                objective=objective)
