"""Placement: where every buffer lives between its uses, chosen by one MIP (OR-Tools).

Decisions
  * each of the model's own tensors (weights, buffers, constants): resident on the device for
    the whole run, or homed on host RAM or disk and fetched before each use;
  * each idle gap of a buffer spanning >= 2 segments: kept on the device, or (activations)
    offloaded to host or disk and fetched back, or (model tensors, read-only) dropped and
    fetched again from their home;
  * for every fetch, its lead: issued one segment early (overlapped, but holding the bytes a
    segment longer) or at the start of the segment that uses it (less memory, may stall);
  * (training) an activation's gap may instead be dropped and the value recomputed from its
    op's inputs where it is next read, if those inputs are on the device then (their own gaps
    kept, weights resident): the op's time is added to that segment's compute.
Constraints
  * device bytes <= budget in every segment, counting the exact step-level peak of buffers
    busy inside the segment plus everything held across it (lesson 2);
  * host bytes <= the hardware's host capacity.
Objective
  * sum over segments of max(compute, load on each link direction) (lesson 3), plus a small
    price per transferred second so nothing moves without need.
The model is linear in #gaps x #segments, never steps x steps (lesson 1); a greedy solution
is always computed first, warm-starts the solver and is the answer if the solver finds none.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..compiler.capture import INPUT, PERSISTENT
from ..cost_models.hardware import LINKS, Hardware
from ..cost_models.links import DISK, HOST, fetch_links, offload_links
from ..errors import InfeasibleBudgetError
from .analysis import START, Program
from .segments import Segments

DEVICE = "device"
KEEP, REFETCH, RECOMPUTE = "keep", "refetch", "recompute"
_EPS = 1e-3          # price of a transferred second relative to a second of step time
_US = 1e6           # the MIP counts time in microseconds, so integral solvers lose nothing
_LATE_PENALTY = 4.0  # greedy: a late (unoverlapped) fetch costs about this many transfer times


@dataclass(frozen=True)
class Gap:
    """An idle stretch of one buffer between two events that placement may fill with a move."""

    id: int
    buffer: int
    value: str          # the one fx value alive across the gap; it is what gets restored
    start: int          # event step before the gap
    end: int            # event step after the gap
    persistent: bool    # a model tensor: dropping needs no write-back
    deliver: bool = False  # a gradient's last stretch: offloaded to its home, never fetched back


@dataclass
class Placement:
    resident: frozenset[int]               # model tensors kept on the device for the whole run
    home: dict[int, str]                   # other used model tensors -> HOST or DISK
    gap_choice: dict[int, str]             # gap id -> KEEP / REFETCH / HOST / DISK / RECOMPUTE
    early: set                             # fetches issued a segment ahead: ("init", b) / ("gap", g)
    gaps: list[Gap]
    min_budget_bytes: int
    segment_bytes: np.ndarray              # planned device bytes per segment
    status: str                            # solver status, or "greedy"
    solve_s: float
    objective: float
    mip_gap: float | None = None
    n_variables: int = 0
    n_constraints: int = 0
    notes: list[str] = field(default_factory=list)
    alternative: "Placement | None" = None  # the greedy plan the solver improved on, if any


class PlacementModel:
    """The placement problem in coefficient form, shared by the greedy and the MIP."""

    def __init__(self, program: Program, segments: Segments, step_time: np.ndarray,
                 hw: Hardware, budget: int, min_evict_bytes: int = 1):
        self.p, self.s, self.hw, self.budget = program, segments, hw, budget
        self.K = segments.count
        self.dev = hw.device_type
        self.compute = np.array([float(step_time[segments.bounds[j]:segments.bounds[j + 1]].sum())
                                 for j in range(self.K)])
        self.pinned = program.pinned     # updated in place: resident, never moved
        self.persistent = [b.id for b in program.buffers
                           if b.kind in PERSISTENT and len(b.events) > 1 and b.id not in self.pinned]
        self.first_seg = {b: segments.seg(next(e for e in program.buffers[b].events if e != START))
                          for b in self.persistent}
        self.last_seg = {b: segments.seg(program.buffers[b].last_step) for b in self.persistent}
        self.const = np.zeros(self.K, dtype=np.float64)
        self.gaps: list[Gap] = []
        self.gap_span: dict[int, tuple[int, int]] = {}   # gap -> (first, last) held segment if kept
        self._build(min_evict_bytes)
        # recompute options: gap -> (seconds, transient bytes, gaps that must be kept, weights
        # that must be resident)
        self.recompute: dict[int, tuple[float, int, tuple[int, ...], tuple[int, ...]]] = {}
        self._recompute_options(step_time)

    def _recompute_options(self, step_time) -> None:
        p = self.p
        gaps_of: dict[int, list[Gap]] = {}
        for g in self.gaps:
            gaps_of.setdefault(g.buffer, []).append(g)
        for g in self.gaps:
            recipe = p.recipes.get(g.value)
            if g.persistent or g.deliver or recipe is None:
                continue
            t, keep, weights, ok = g.end, [], [], True
            for name in recipe.inputs:
                val = p.values[name]
                for b in val.buffers:
                    buf = p.buffers[b]
                    if buf.kind in PERSISTENT:
                        if name != buf.values[0]:
                            ok = False  # a view of a weight: a refetch restores the weight only
                        elif b not in self.pinned:
                            weights.append(b)
                    elif val.last_use < t:
                        ok = False  # dead by then: recomputing would need it kept longer
                    else:
                        keep += [h.id for h in gaps_of.get(b, ()) if h.start < t <= h.end]
            if ok and g.id not in keep:
                self.recompute[g.id] = (float(step_time[recipe.step]), recipe.extra_bytes,
                                        tuple(sorted(set(keep))), tuple(sorted(set(weights))))

    def size(self, b: int) -> int:
        return self.p.buffers[b].nbytes

    # -- model construction -------------------------------------------------------------
    def _build(self, min_evict_bytes: int) -> None:
        p, s, n = self.p, self.s, self.p.n_steps
        diff = np.zeros(n + 2, dtype=np.float64)
        for b in p.buffers:
            if b.kind in PERSISTENT and len(b.events) == 1:
                continue  # never read: stays with the model, off the device
            persistent = b.kind in PERSISTENT
            # model tensors arrive by fetch (or stay resident); user inputs are there at step 0
            events = ([e for e in b.events if e != START] if persistent
                      else sorted({max(e, 0) for e in b.events}))
            deliver = b.id in p.grads and len(events) > 1 and events[-1] == n
            if deliver:  # the step's end is not a read: the gradient may leave before it
                events = events[:-1]
            by_seg: dict[int, list[int]] = {}
            for e in events:
                by_seg.setdefault(s.seg(e), []).append(e)
            seg_ids = sorted(by_seg)
            # inside a segment with events: held from its start (or definition) to its end (or
            # the last read, when nothing later needs it)
            for i, j in enumerate(seg_ids):
                lo = s.bounds[j] if (persistent or i > 0) else by_seg[j][0]
                # a model tensor is counted to the end of its last segment: resident ones stay
                later = i + 1 < len(seg_ids) or b.is_output or persistent  # (a delivered
                # gradient too: held to its segment's end, when its offload has left)
                # point n is the program end, where outputs are handed back
                seg_end = n if j == self.K - 1 else s.bounds[j + 1] - 1
                hi = seg_end if later else min(by_seg[j][-1], n)
                diff[lo] += b.nbytes
                diff[hi + 1] -= b.nbytes
            if b.id in self.pinned:  # resident before its first and after its last segment too
                self.const[:seg_ids[0]] += b.nbytes
                self.const[seg_ids[-1] + 1:] += b.nbytes
            for a, c in zip(events, events[1:]):
                A, C = s.seg(a), s.seg(c)
                if C - A < 2:
                    continue
                if b.id in self.pinned or (b.id in p.user_held and p.boundary is not None and a >= p.boundary):
                    self.const[A + 1:C] += b.nbytes  # the caller holds it: moving it frees nothing
                    continue
                value = self._single_value(b, a, c)
                if persistent and value != b.values[0]:
                    value = None  # a refetch restores the model tensor itself, not a view of it
                if value is not None and b.nbytes >= min_evict_bytes and b.kind != INPUT:
                    g = Gap(len(self.gaps), b.id, value, a, c, persistent)
                    self.gaps.append(g)
                    self.gap_span[g.id] = (A + 1, C - 1)
                else:
                    self.const[A + 1:C] += b.nbytes
            if deliver and s.seg(events[-1]) < self.K - 1:
                g = Gap(len(self.gaps), b.id, self._single_value(b, events[-1], n) or "", events[-1], n,
                        False, deliver=True)
                if g.value and self.p.values[g.value].single_tensor:
                    self.gaps.append(g)
                    self.gap_span[g.id] = (s.seg(events[-1]) + 1, self.K - 1)
                else:
                    self.const[s.seg(events[-1]) + 1:] += b.nbytes
        prof = np.cumsum(diff[:n + 1])
        for j in range(self.K):
            lo = s.bounds[j]
            hi = n + 1 if j == self.K - 1 else s.bounds[j + 1]
            if hi > lo:
                self.const[j] += prof[lo:hi].max()

    def _single_value(self, b, a: int, c: int) -> str | None:
        vals = self.p.values
        live = [v for v in b.values if vals[v].step <= a and vals[v].last_use >= c]
        if len(live) == 1 and vals[live[0]].single_tensor:
            return live[0]
        return None

    # -- a concrete placement ---------------------------------------------------------------
    def fetches(self, resident, choice):
        """(key, buffer, tier-or-None, use segment) of every fetch a placement performs."""
        out = []
        for b in self.persistent:
            if b not in resident:
                out.append((("init", b), b, None, self.first_seg[b]))
        for g in self.gaps:
            c = choice[g.id]
            if c not in (KEEP, RECOMPUTE) and not g.deliver:
                out.append((("gap", g.id), g.buffer, None if c == REFETCH else c, self.s.seg(g.end)))
        return out

    def recompute_s(self, choice) -> np.ndarray:
        """Seconds of recomputation per segment."""
        out = np.zeros(self.K)
        for gid, (secs, _, _, _) in self.recompute.items():
            if choice[gid] == RECOMPUTE:
                out[self.s.seg(self.gaps[gid].end)] += secs
        return out

    def segment_bytes(self, resident, choice, early) -> np.ndarray:
        mem = self.const.copy()
        for b in resident:
            mem[0:self.first_seg[b]] += self.size(b)
            mem[self.last_seg[b] + 1:] += self.size(b)
        for g in self.gaps:
            lo, hi = self.gap_span[g.id]
            if choice[g.id] == KEEP:
                mem[lo:hi + 1] += self.size(g.buffer)
        for key, b, _, c in self.fetches(resident, choice):
            if key in early and c >= 1:
                mem[c - 1] += self.size(b)
        for gid, (_, extra, _, _) in self.recompute.items():
            if choice[gid] == RECOMPUTE:
                mem[self.s.seg(self.gaps[gid].end)] += extra
        return mem

    def loads(self, resident, home, choice, early) -> tuple[np.ndarray, float]:
        """Seconds of transfer per (link, segment) that overlap compute, and the seconds of late
        fetches (issued in the segment that uses them), which compute waits for."""
        loads = np.zeros((len(LINKS), self.K))
        li = {name: i for i, name in enumerate(LINKS)}
        late = 0.0
        for key, b, tier, c in self.fetches(resident, choice):
            tier = tier or home[b]
            if key in early and c >= 1:
                for link in fetch_links(tier, self.dev):
                    loads[li[link], c - 1] += self.size(b) / self.hw.bandwidth(link)
            else:
                late += self.transfer_s(self.size(b), fetch_links(tier, self.dev))
        for g in self.gaps:
            c = choice[g.id]
            if c in (HOST, DISK):
                for link in offload_links(c, self.dev):
                    loads[li[link], self.s.seg(g.start)] += self.size(g.buffer) / self.hw.bandwidth(link)
        return loads, late

    def objective(self, resident, home, choice, early) -> float:
        loads, late = self.loads(resident, home, choice, early)
        compute = self.compute + self.recompute_s(choice)
        return float(np.maximum(compute, loads.max(axis=0)).sum() + late + _EPS * (loads.sum() + late))

    def min_budget(self) -> int:
        return int(np.ceil(self.const.max())) if self.K else 0

    def transfer_s(self, nbytes: int, links) -> float:
        return sum(nbytes / self.hw.bandwidth(link) for link in links)


def solve_placement(program: Program, segments: Segments, step_time: np.ndarray, hw: Hardware,
                    budget: int, *, time_limit_s: float = 10.0, use_solver: bool = True) -> Placement:
    """Choose residency, homes, gap moves and leads; InfeasibleBudgetError before anything runs."""
    t0 = time.perf_counter()
    m = PlacementModel(program, segments, step_time, hw, budget)
    # the segment model is conservative; with nothing moved the exact peak is the analysis's
    min_budget = min(m.min_budget(), program.peak_bytes)
    if budget < min_budget:
        raise InfeasibleBudgetError(budget, min_budget)
    if budget >= program.peak_bytes:
        placement = _placement(m, set(m.persistent), {}, {g.id: KEEP for g in m.gaps}, set(), "fits")
        placement.min_budget_bytes = min_budget
        placement.solve_s = time.perf_counter() - t0
        return placement
    placement = _greedy(m)
    if use_solver and (m.persistent or m.gaps):
        solved = _solve_mip(m, placement, t0 + time_limit_s)
        if solved is not None:
            solved.alternative = placement  # the simulator arbitrates (compiler/pipeline.py)
            placement = solved
        else:
            placement.notes.append("the solver found nothing better in time; greedy plan kept")
    for candidate in (placement, placement.alternative):
        if candidate is not None:
            _prefer_host(m, candidate)
    placement.min_budget_bytes = min_budget
    placement.solve_s = time.perf_counter() - t0
    return placement


def _prefer_host(m: PlacementModel, p: Placement) -> None:
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


def _placement(m, resident, home, choice, early, status, **kw) -> Placement:
    return Placement(frozenset(resident) | m.pinned, dict(home), dict(choice), set(early), m.gaps, m.min_budget(),
                     m.segment_bytes(resident, choice, early), status, 0.0,
                     m.objective(resident, home, choice, early), **kw)


def _greedy(m: PlacementModel) -> Placement:
    """Start with everything on the device; take the move with the best relief per second of
    transfer until every segment fits. Moves only lower memory, so this ends feasible whenever
    the budget is at least the all-moved minimum."""
    host_left = m.hw.host_bytes
    resident = set(m.persistent)
    home: dict[int, str] = {}
    choice = {g.id: KEEP for g in m.gaps}
    early: set = set()
    gaps_of: dict[int, list[int]] = {}
    for g in m.gaps:
        gaps_of.setdefault(g.buffer, []).append(g.id)
    locked_gaps: set[int] = set()      # read by a recomputation: must stay kept
    locked_weights: set[int] = set()   # read by a recomputation: must stay resident
    allow_recompute = True
    mem = m.segment_bytes(resident, choice, early)
    while mem.max() > m.budget:
        over = (mem > m.budget).astype(np.float64)
        best, best_score = None, 0.0

        def consider(move, relief_early, relief_window, secs):
            """Score a move fetched early (window kept) and late (window freed, may stall)."""
            nonlocal best, best_score
            for late, relief, cost in ((False, relief_early, secs),
                                       (True, relief_early + relief_window, _LATE_PENALTY * secs)):
                if relief > 0 and relief / (cost + 1e-12) > best_score:
                    best, best_score = move + (late,), relief / (cost + 1e-12)

        for b in resident - locked_weights:
            c0, nb = m.first_seg[b], m.size(b)
            tier = HOST if host_left >= nb else DISK
            window = over[c0 - 1] * nb if c0 >= 1 else 0.0
            # dropping residency also unlocks evicting its gaps: count them as relief to come
            unlocks = sum(over[m.gap_span[g][0]:m.gap_span[g][1] + 1].sum() for g in gaps_of.get(b, ()))
            consider(("res", b, tier),
                     (over[:max(c0 - 1, 0)].sum() + over[m.last_seg[b] + 1:].sum() + unlocks) * nb,
                     window, m.transfer_s(nb, fetch_links(tier, m.dev)))
        for g in m.gaps:
            if choice[g.id] != KEEP or (g.persistent and g.buffer in resident) or g.id in locked_gaps:
                continue
            lo, hi = m.gap_span[g.id]
            nb = m.size(g.buffer)
            option = m.recompute.get(g.id) if allow_recompute else None
            if option is not None and all(choice[h] == KEEP for h in option[2]) \
                    and all(w in resident for w in option[3]):
                # no lead: the whole window is freed, for the op's time
                relief = over[lo:hi + 1].sum() * nb - over[m.s.seg(g.end)] * option[1]
                if relief > 0 and relief / (option[0] + 1e-12) > best_score:
                    best, best_score = ("rc", g, None, True), relief / (option[0] + 1e-12)
            if g.persistent:
                tier = home[g.buffer]
                secs = m.transfer_s(nb, fetch_links(tier, m.dev))
            elif g.deliver:  # offloaded for good: the whole window frees, no fetch to lead
                tier = HOST if host_left >= nb else DISK
                consider(("gap", g, tier), over[lo:hi + 1].sum() * nb, 0.0,
                         m.transfer_s(nb, offload_links(tier, m.dev)))
                continue
            else:
                tier = HOST if host_left >= nb else DISK
                secs = m.transfer_s(nb, fetch_links(tier, m.dev)) + m.transfer_s(nb, offload_links(tier, m.dev))
            consider(("gap", g, tier), over[lo:hi].sum() * nb, over[hi] * nb, secs)
        for key, b, tier, c in m.fetches(resident, choice):
            if key in early and c >= 1 and over[c - 1]:
                tier = tier or home[b]
                consider(("late", key, None), 0.0, m.size(b), m.transfer_s(m.size(b), fetch_links(tier, m.dev)))
        if best is None and allow_recompute and RECOMPUTE in choice.values():
            # recomputations keep their inputs on the device; near the minimum budget those
            # inputs must move too: give them up and go on with moves only
            for gid, c in choice.items():
                if c == RECOMPUTE:
                    choice[gid] = KEEP
            locked_gaps.clear()
            locked_weights.clear()
            allow_recompute = False
            mem = m.segment_bytes(resident, choice, early)
            continue
        if best is None:  # cannot happen when budget >= min_budget; guard against model bugs
            raise InfeasibleBudgetError(m.budget, int(mem.max()), "greedy placement found no move")
        kind, item, tier, late = best
        if kind == "res":
            resident.discard(item)
            home[item] = tier
            if not late:
                early.add(("init", item))
            if tier == HOST:
                host_left -= m.size(item)
        elif kind == "rc":
            choice[item.id] = RECOMPUTE
            locked_gaps.update(m.recompute[item.id][2])
            locked_weights.update(m.recompute[item.id][3])
        elif kind == "gap":
            choice[item.id] = REFETCH if item.persistent else tier
            if not late:
                early.add(("gap", item.id))
            if tier == HOST and not item.persistent:
                host_left -= m.size(item.buffer)
        else:
            early.discard(item)
        mem = m.segment_bytes(resident, choice, early)
    _undo_needless_moves(m, resident, home, choice, early)
    result = _placement(m, resident, home, choice, early, "greedy")
    assert result.segment_bytes.max() <= m.budget, "greedy placement over budget"
    return result


def _undo_needless_moves(m: PlacementModel, resident, home, choice, early) -> None:
    """Greedy evictions made early can become needless once later ones freed more room: take
    back every move that still fits, costliest transfer first (late fetches, then evictions)."""
    def fits():
        return m.segment_bytes(resident, choice, early).max() <= m.budget

    fetches = m.fetches(resident, choice)
    for key, b, tier, c in sorted(fetches, key=lambda f: -m.size(f[1])):
        if key not in early and c >= 1:
            early.add(key)
            if not fits():
                early.discard(key)
    for g in sorted((g for g in m.gaps if choice[g.id] != KEEP), key=lambda g: -m.size(g.buffer)):
        before, was_early = choice[g.id], ("gap", g.id) in early
        choice[g.id] = KEEP
        early.discard(("gap", g.id))
        if not fits():
            choice[g.id] = before
            if was_early:
                early.add(("gap", g.id))
    host_used = sum(m.size(b) for b, t in home.items() if t == HOST)
    for b in sorted((b for b in m.persistent if b not in resident), key=lambda b: -m.size(b)):
        if any(choice[g.id] != KEEP for g in m.gaps if g.buffer == b):
            continue
        tier = home.pop(b)
        resident.add(b)
        was_early = ("init", b) in early
        early.discard(("init", b))
        if not fits():
            resident.discard(b)
            home[b] = tier
            if was_early:
                early.add(("init", b))
        elif tier == HOST:
            host_used -= m.size(b)


def _solve_mip(m: PlacementModel, warm: Placement, deadline: float) -> Placement | None:
    """Solve the MIP until ``deadline`` (a perf_counter time) at the latest; None if no better
    plan than ``warm`` was found."""
    from ortools.linear_solver import pywraplp

    solver = pywraplp.Solver.CreateSolver("SCIP") or pywraplp.Solver.CreateSolver("CBC")
    if solver is None:
        return None
    inf = solver.infinity()
    has_host = m.hw.host_bytes > 0
    Sum = solver.Sum
    mem = [[] for _ in range(m.K)]
    loads = {(link, j): [] for link in LINKS for j in range(m.K)}
    li_bw = {link: m.hw.bandwidth(link) for link in LINKS}

    def load(amount, tier, j, nbytes, offload=False):
        for link in (offload_links if offload else fetch_links)(tier, m.dev):
            loads[(link, j)].append(nbytes / li_bw[link] * _US * amount)

    late_terms = []

    def stall(amount, tier, nbytes):
        """A late fetch: compute waits for all of it (a conservative price)."""
        late_terms.append(m.transfer_s(nbytes, fetch_links(tier, m.dev)) * _US * amount)

    def fetch_split(key, tiers: dict, c: int, nbytes: float, lead_cap):
        """A fetch into segment c; ``tiers``: tier -> amount fetched from it. Adds the lead."""
        if c == 0:
            for tier, amount in tiers.items():
                stall(amount, tier, nbytes)
            return None
        lead = solver.NumVar(0, 1, f"lead{key}")
        solver.Add(lead <= lead_cap)
        parts = []
        for tier, amount in tiers.items():
            part = solver.NumVar(0, 1, f"lead{key}{tier}")
            lead_parts[(key, tier)] = part
            solver.Add(part <= amount)
            parts.append(part)
            load(part, tier, c - 1, nbytes)
            stall(amount - part, tier, nbytes)
        solver.Add(Sum(parts) == lead)
        mem[c - 1].append((nbytes, lead))
        return lead

    r, d, y, oh, od, leads, lead_parts, fetched = {}, {}, {}, {}, {}, {}, {}, {}
    rc, rc_deps, rc_time = {}, [], [[] for _ in range(m.K)]
    host_terms = []
    for b in m.persistent:
        nb = float(m.size(b))
        r[b] = solver.BoolVar(f"r{b}")
        if has_host:
            d[b] = solver.BoolVar(f"d{b}")
            solver.Add(r[b] + d[b] <= 1)
            tiers = {DISK: d[b], HOST: 1 - r[b] - d[b]}
            host_terms.append(nb * (1 - r[b] - d[b]))
        else:
            tiers = {DISK: 1 - r[b]}
        c0 = m.first_seg[b]
        for j in list(range(0, c0)) + list(range(m.last_seg[b] + 1, m.K)):
            mem[j].append((nb, r[b]))
        # segment c0-1 holds it if resident or fetched early; lead <= 1 - r keeps them exclusive
        leads[("init", b)] = fetch_split(("i", b), tiers, c0, nb, 1 - r[b])
    for g in m.gaps:
        nb = float(m.size(g.buffer))
        y[g.id] = solver.BoolVar(f"y{g.id}")
        lo, hi = m.gap_span[g.id]
        for j in range(lo, hi + 1):
            mem[j].append((nb, y[g.id]))
        c = m.s.seg(g.end)
        if g.persistent:
            b = g.buffer
            solver.Add(y[g.id] >= r[b])
            fd = solver.NumVar(0, 1, f"fd{g.id}")
            solver.Add(fd >= (1 - y[g.id]) + (d[b] if has_host else 1 - r[b]) - 1)
            tiers = {DISK: fd}
            fetched[(g.id, DISK)] = fd
            if has_host:
                fh = solver.NumVar(0, 1, f"fh{g.id}")
                solver.Add(fh >= (1 - y[g.id]) - d[b])
                tiers[HOST] = fh
                fetched[(g.id, HOST)] = fh
            cap = 1 - y[g.id]
        else:
            od[g.id] = solver.BoolVar(f"od{g.id}")
            tiers = {DISK: od[g.id]}
            load(od[g.id], DISK, m.s.seg(g.start), nb, offload=True)
            if has_host:
                oh[g.id] = solver.BoolVar(f"oh{g.id}")
                tiers[HOST] = oh[g.id]
                load(oh[g.id], HOST, m.s.seg(g.start), nb, offload=True)
                host_terms.append(nb * oh[g.id])
            choices = [y[g.id]] + list(tiers.values())
            if g.id in m.recompute:
                secs, extra, keep, weights = m.recompute[g.id]
                rc[g.id] = solver.BoolVar(f"rc{g.id}")
                choices.append(rc[g.id])
                rc_time[m.s.seg(g.end)].append(secs * _US * rc[g.id])
                if extra:
                    mem[m.s.seg(g.end)].append((float(extra), rc[g.id]))
                rc_deps += [(g.id, "gap", h) for h in keep] + [(g.id, "weight", w) for w in weights]
            solver.Add(Sum(choices) == 1)
            cap = 1 - y[g.id]
        if g.deliver:
            continue  # never fetched back: no lead
        # the last held segment (c-1) is covered by y; an early fetch holds it too
        lead = fetch_split(("g", g.id), tiers, c, nb, cap)
        leads[("gap", g.id)] = lead
    for gid, kind, dep in rc_deps:  # a recomputation reads its inputs on the device
        solver.Add(rc[gid] <= (y[dep] if kind == "gap" else r[dep]))
    for j in range(m.K):
        if mem[j]:
            solver.Add(Sum([coef * v for coef, v in mem[j]]) <= m.budget - m.const[j])
    if has_host and host_terms:
        solver.Add(Sum(host_terms) <= float(m.hw.host_bytes))
    tau = [solver.NumVar(float(m.compute[j]) * _US, inf, f"tau{j}") for j in range(m.K)]
    for j in range(m.K):
        if rc_time[j]:
            solver.Add(tau[j] >= float(m.compute[j]) * _US + Sum(rc_time[j]))
    moved = []
    for (link, j), terms in loads.items():
        if terms:
            expr = Sum(terms)
            solver.Add(tau[j] >= expr)
            moved.append(expr)
    late = Sum(late_terms) if late_terms else 0
    solver.Minimize(Sum(tau) + (1 + _EPS) * late + (_EPS * Sum(moved) if moved else 0))

    hint_vars, hint_vals = [], []
    for b in m.persistent:
        hint_vars.append(r[b]); hint_vals.append(float(b in warm.resident))
        if has_host:
            hint_vars.append(d[b]); hint_vals.append(float(warm.home.get(b) == DISK))
    for g in m.gaps:
        c = warm.gap_choice[g.id]
        hint_vars.append(y[g.id]); hint_vals.append(float(c == KEEP))
        if g.id in rc:
            hint_vars.append(rc[g.id]); hint_vals.append(float(c == RECOMPUTE))
        if not g.persistent:
            hint_vars.append(od[g.id]); hint_vals.append(float(c == DISK))
            if has_host:
                hint_vars.append(oh[g.id]); hint_vals.append(float(c == HOST))
    # a complete hint (continuous parts and step times too), so the solver starts from it
    def tier_of(b, g=None):
        if g is not None and not g.persistent:
            return warm.gap_choice[g.id]
        return warm.home.get(b)

    for key, lead in leads.items():
        if lead is None:
            continue
        on = float(key in warm.early)
        hint_vars.append(lead); hint_vals.append(on)
        g = m.gaps[key[1]] if key[0] == "gap" else None
        b = g.buffer if g is not None else key[1]
        short = ("g", key[1]) if g is not None else ("i", key[1])
        for tier in (DISK, HOST):
            if (short, tier) in lead_parts:
                hint_vars.append(lead_parts[(short, tier)]); hint_vals.append(on * float(tier_of(b, g) == tier))
    for (gid, tier), var in fetched.items():
        g = m.gaps[gid]
        moved_out = warm.gap_choice[gid] != KEEP
        hint_vars.append(var); hint_vals.append(float(moved_out and warm.home.get(g.buffer) == tier))
    warm_loads = m.loads(warm.resident, warm.home, warm.gap_choice, warm.early)[0].max(axis=0)
    warm_compute = m.compute + m.recompute_s(warm.gap_choice)
    for j in range(m.K):
        hint_vars.append(tau[j]); hint_vals.append(float(max(warm_compute[j], warm_loads[j])) * _US)
    solver.SetHint(hint_vars, hint_vals)
    solver.SetTimeLimit(int(max(deadline - time.perf_counter(), 0.1) * 1000))
    status = solver.Solve()
    names = {pywraplp.Solver.OPTIMAL: "optimal", pywraplp.Solver.FEASIBLE: "feasible"}
    if status not in names:
        return None
    resident = {b for b in m.persistent if r[b].solution_value() > 0.5}
    home = {b: (DISK if not has_host or d[b].solution_value() > 0.5 else HOST)
            for b in m.persistent if b not in resident}
    choice = {}
    for g in m.gaps:
        if y[g.id].solution_value() > 0.5:
            choice[g.id] = KEEP
        elif g.id in rc and rc[g.id].solution_value() > 0.5:
            choice[g.id] = RECOMPUTE
        elif g.persistent:
            choice[g.id] = REFETCH
        else:
            choice[g.id] = HOST if (has_host and oh[g.id].solution_value() > 0.5) else DISK
    # a fractional lead (the LP may split a fetch) is rounded down: later, never over budget
    early = {key for key, v in leads.items() if v is not None and v.solution_value() > 1 - 1e-6}
    early = {k for k in early if (k[0] == "init" and k[1] not in resident)
             or (k[0] == "gap" and choice[k[1]] != KEEP)}
    result = _placement(m, resident, home, choice, early, names[status],
                        n_variables=solver.NumVariables(), n_constraints=solver.NumConstraints())
    if result.segment_bytes.max() > m.budget:
        return None  # numerical slack in the solver: never hand out a plan over budget
    if result.objective > warm.objective + 1e-12:
        return None  # a time-limited incumbent worse than the warm start: keep the greedy plan
    try:
        bound = solver.Objective().BestBound()
        value = solver.Objective().Value()
        result.mip_gap = abs(value - bound) / max(abs(value), 1e-12)
    except Exception:  # some backends do not expose a bound
        pass
    return result
