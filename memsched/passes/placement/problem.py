"""The placement problem: its words (gaps, move choices, fetch keys), its answer (Placement)
and the coefficient form the greedy and the MIP both read (PlacementModel).

Decisions
  * each of the model's own tensors (weights, buffers, constants): resident on the device for
    the whole run, or homed on host RAM or disk and fetched before each use;
  * each idle gap of a storage spanning >= 2 segments: kept on the device, or (activations)
    offloaded to host or disk and fetched back, or (model tensors, read-only) dropped and
    fetched again from their home;
  * for every fetch, its lead: issued one segment early (overlapped, but holding the bytes a
    segment longer) or at the start of the segment that uses it (less memory, may stall);
  * (training) an activation's gap may instead be dropped and the value recomputed from its
    op's inputs where it is next read, if those inputs are on the device then (their own gaps
    kept, weights resident): the op's time is added to that segment's compute.
Constraints
  * device bytes <= budget in every segment, counting the exact step-level peak of storages
    busy inside the segment plus everything held across it (lesson 2);
  * host bytes <= the hardware's host capacity.
Objective
  * sum over segments of max(compute, load on each link direction) (lesson 3), plus a small
    price per transferred second so nothing moves without need.
The model is linear in #gaps x #segments, never steps x steps (lesson 1).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ...cost_models.hardware import Hardware
from ...ir.kinds import LINKS, PERSISTENT, Kind, Tier, Word, fetch_links, offload_links
from ..analysis import START, Program
from ..recipes import recompute_chain
from ..segments import Segments
from ..views import live_across, restores_of

EPS = 1e-3  # price of a transferred second relative to a second of step time


class Choice(Word):
    """What happens to a gap that is not offloaded to a tier (HOST / DISK are Tier members)."""

    KEEP = "keep"            # stays on the device
    REFETCH = "refetch"      # a model tensor: dropped, fetched again from its home
    RECOMPUTE = "recompute"  # an activation: dropped, its op re-run where it is next read


KEEP, REFETCH, RECOMPUTE = Choice.KEEP, Choice.REFETCH, Choice.RECOMPUTE
DEVICE, HOST, DISK = Tier.DEVICE, Tier.HOST, Tier.DISK


class FetchKey(NamedTuple):
    """One fetch: a model tensor's first ("init", storage id) or a gap's ("gap", gap id). A
    tuple underneath, so it equals the plain ("init", 3) that schedule.py spells."""

    kind: str
    item: int

    @classmethod
    def init(cls, storage: int) -> FetchKey:
        return cls("init", storage)

    @classmethod
    def gap(cls, gap: int) -> FetchKey:
        return cls("gap", gap)


class Fetch(NamedTuple):
    key: FetchKey
    storage: int
    tier: Tier | None   # None: from the model tensor's home
    seg: int            # the segment that uses it


@dataclass(frozen=True)
class Gap:
    """An idle stretch of one storage between two events that placement may fill with a move."""

    id: int
    buffer: int
    value: str          # the fx value that is moved and restored (the root: passes/views.py)
    start: int          # event step before the gap
    end: int            # event step after the gap
    persistent: bool    # a model tensor: dropping needs no write-back
    deliver: bool = False  # a gradient's last stretch: offloaded to its home, never fetched back
    rebuild: tuple[str, ...] = ()   # views of ``value`` re-made after it is restored
    aliases: tuple[str, ...] = ()   # the other values live across the gap (dropped with it)
    held: bool = False              # ``value`` is referenced to the storage's last event


@dataclass
class Placement:
    resident: frozenset[int]               # model tensors kept on the device for the whole run
    home: dict[int, str]                   # other used model tensors -> HOST or DISK
    gap_choice: dict[int, str]             # gap id -> KEEP / REFETCH / HOST / DISK / RECOMPUTE
    early: set                             # FetchKeys of fetches issued a segment ahead
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
    floor_bytes: int = 0        # the largest single op's working set: no plan needs less
    floor_at: str = ""          # that op, and the largest tensors it touches
    binds_at: str = ""          # where the minimum budget binds, and what is held there
    alternative: "Placement | None" = None  # the greedy plan the solver improved on, if any


class PlacementModel:
    """The placement problem in coefficient form, shared by the greedy and the MIP: the gaps,
    the options of each, per-segment constant bytes and compute, the objective of a concrete
    placement and the minimum budget."""

    def __init__(self, program: Program, segments: Segments, step_time: np.ndarray,
                 hw: Hardware, budget: int, min_evict_bytes: int = 1, fused_time: np.ndarray | None = None):
        self.p, self.s, self.hw, self.budget = program, segments, hw, budget
        self.K = segments.count
        self.dev = hw.device_type
        self.compute = np.array([float(step_time[segments.bounds[j]:segments.bounds[j + 1]].sum())
                                 for j in range(self.K)])
        self.pinned = program.pinned     # updated in place: resident, never moved
        self.persistent = [b.id for b in program.storages
                           if b.kind in PERSISTENT and len(b.events) > 1 and b.id not in self.pinned]
        self.first_seg = {b: segments.seg(next(e for e in program.storages[b].events if e != START))
                          for b in self.persistent}
        self.last_seg = {b: segments.seg(program.storages[b].last_step) for b in self.persistent}
        self.const = np.zeros(self.K, dtype=np.float64)
        self.gaps: list[Gap] = []
        self.gap_span: dict[int, tuple[int, int]] = {}   # gap -> (first, last) held segment if kept
        self._build(min_evict_bytes)
        self.const += program.workspace_bytes   # held throughout, beside every segment's tensors
        # recompute options: gap -> (seconds, transient bytes, gaps that must be kept, weights
        # that must be resident)
        self.recompute: dict[int, tuple[float, int, tuple[int, ...], tuple[int, ...]]] = {}
        self._recompute_options(step_time, fused_time)
        # per gap, precomputed for the greedy's many evaluations of a placement
        self.end_seg = [segments.seg(g.end) for g in self.gaps]
        self.tables = _Tables(self)

    def size(self, b: int) -> int:
        return self.p.storages[b].nbytes

    def min_budget(self) -> int:
        return int(np.ceil(self.const.max())) if self.K else 0

    def transfer_s(self, nbytes: int, links) -> float:
        return sum(nbytes / self.hw.bandwidth(link) for link in links)

    # -- model construction -------------------------------------------------------------
    def _build(self, min_evict_bytes: int) -> None:
        p, n = self.p, self.p.n_steps
        diff = np.zeros(n + 2, dtype=np.float64)
        for b in p.storages:
            if b.kind in PERSISTENT and len(b.events) == 1:
                continue  # never read: stays with the model, off the device
            events, deliver = self._events(b)
            seg_ids = self._held_in_segments(b, events, diff)
            if b.id in self.pinned:  # resident before its first and after its last segment too
                self.const[:seg_ids[0]] += b.nbytes
                self.const[seg_ids[-1] + 1:] += b.nbytes
            self._idle_gaps(b, events, min_evict_bytes)
            if deliver:
                self._delivery_gap(b, events)
        self._add_step_peaks(diff)

    def _events(self, b) -> tuple[list[int], bool]:
        """The steps where storage ``b`` must be on the device, and whether it is delivered off
        it at the step's end, a gradient or a host output (that end is then not one of them)."""
        n = self.p.n_steps
        # model tensors arrive by fetch (or stay resident); user inputs are there at step 0
        events = ([e for e in b.events if e != START] if b.kind in PERSISTENT
                  else sorted({max(e, 0) for e in b.events}))
        deliver = b.id in self.p.deliverable and len(events) > 1 and events[-1] == n
        if deliver:  # the step's end is not a read: the value may leave before it
            events = events[:-1]
        return events, deliver

    def _held_in_segments(self, b, events: list[int], diff: np.ndarray) -> list[int]:
        """Add ``b``'s bytes to the step profile ``diff`` inside the segments where it has
        events; return those segments."""
        s, n = self.s, self.p.n_steps
        persistent = b.kind in PERSISTENT
        by_seg: dict[int, list[int]] = {}
        for e in events:
            by_seg.setdefault(s.seg(e), []).append(e)
        seg_ids = sorted(by_seg)
        # inside a segment with events: held from its start (or definition) to its end (or
        # the last read, when nothing later needs it)
        for i, j in enumerate(seg_ids):
            lo = s.bounds[j] if (persistent or i > 0) else by_seg[j][0]
            # a model tensor is counted to the end of its last segment: resident ones stay
            # (a delivered gradient too: held to its segment's end, when its offload has left)
            later = i + 1 < len(seg_ids) or b.is_output or persistent
            # point n is the program end, where outputs are handed back
            seg_end = n if j == self.K - 1 else s.bounds[j + 1] - 1
            hi = seg_end if later else min(by_seg[j][-1], n)
            diff[lo] += b.nbytes
            diff[hi + 1] -= b.nbytes
        return seg_ids

    def _idle_gaps(self, b, events: list[int], min_evict_bytes: int) -> None:
        """A gap for every idle stretch of ``b`` over >= 2 segments that may move; the bytes of
        the others count as constant."""
        p, s = self.p, self.s
        persistent = b.kind in PERSISTENT
        spans = [(a, c) for a, c in zip(events, events[1:]) if s.seg(c) - s.seg(a) >= 2]
        if b.id in self.pinned or b.kind == Kind.INPUT or b.nbytes < min_evict_bytes:
            restores = [None] * len(spans)
        else:
            restores = restores_of(p, b, [live_across(p, b, a, c) for a, c in spans])
        for (a, c), r in zip(spans, restores):
            A, C = s.seg(a), s.seg(c)
            caller_holds = b.id in p.user_held and p.boundary is not None and a >= p.boundary
            if r is not None and not caller_holds:  # held by the caller: moving it frees nothing
                g = Gap(len(self.gaps), b.id, r.root, a, c, persistent, rebuild=r.rebuild, aliases=r.aliases,
                        held=r.held)
                self.gaps.append(g)
                self.gap_span[g.id] = (A + 1, C - 1)
            else:
                self.const[A + 1:C] += b.nbytes

    def _delivery_gap(self, b, events: list[int]) -> None:
        """A gradient's stretch from its last read to the step's end: offloaded for good or
        held."""
        s, n = self.s, self.p.n_steps
        if s.seg(events[-1]) >= self.K - 1:
            return
        g = Gap(len(self.gaps), b.id, self._single_value(b, events[-1], n) or "", events[-1], n,
                False, deliver=True)
        if g.value and self.p.values[g.value].single_tensor:
            self.gaps.append(g)
            self.gap_span[g.id] = (s.seg(events[-1]) + 1, self.K - 1)
        else:
            self.const[s.seg(events[-1]) + 1:] += b.nbytes

    def _add_step_peaks(self, diff: np.ndarray) -> None:
        """Each segment's constant part: the step-level peak of what is busy inside it."""
        s, n = self.s, self.p.n_steps
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

    def _recompute_options(self, step_time, fused_time=None) -> None:
        """A gap may be recomputed where it is next read when its chain (passes/recipes.py)
        reads only what is on the device then: activations whose gaps there are kept, and
        resident weights. Its price: the chain's op times, and its transients' bytes. With
        fusion (``fused_time``: per step, a pointwise op's arithmetic alone, NaN for others) a
        chain of pointwise ops runs inside the region of the op that reads it: its arithmetic,
        and the value written once."""
        p = self.p
        gaps_of: dict[int, list[Gap]] = {}
        for g in self.gaps:
            gaps_of.setdefault(g.buffer, []).append(g)
        for g in self.gaps:
            if g.persistent or g.deliver or g.value not in p.recipes:
                continue
            t = g.end
            chain = recompute_chain(p, g.value, t)
            if chain is None:
                continue
            keep, weights, ok = [], [], True
            for name in chain.reads:
                for b in p.values[name].storages:
                    buf = p.storages[b]
                    if buf.kind in PERSISTENT:
                        if name != buf.values[0]:
                            ok = False  # a view of a weight: a refetch restores the weight only
                        elif b not in self.pinned:
                            weights.append(b)
                    else:
                        keep += [h.id for h in gaps_of.get(b, ()) if h.start < t <= h.end]
            if not ok or g.id in keep:
                continue
            recipes = [p.recipes[v] for v in chain.values]
            secs = float(sum(step_time[r.step] for r in recipes))
            if fused_time is not None and not np.isnan([fused_time[r.step] for r in recipes]).any():
                secs = min(secs, float(sum(fused_time[r.step] for r in recipes))
                           + self.size(g.buffer) / self.hw.mem_bw)
            # the chain's other values live while it runs, beside the tuple outputs it drops
            transient = sum(r.extra_bytes for r in recipes) + sum(
                p.storages[b].nbytes for v in chain.values[:-1] for b in p.values[v].storages)
            self.recompute[g.id] = (secs, transient, tuple(sorted(set(keep))), tuple(sorted(set(weights))))

    # -- a concrete placement ---------------------------------------------------------------
    def fetches(self, resident, choice) -> list[Fetch]:
        """Every fetch a placement performs."""
        out = []
        for b in self.persistent:
            if b not in resident:
                out.append(Fetch(FetchKey.init(b), b, None, self.first_seg[b]))
        for g in self.gaps:
            c = choice[g.id]
            if c not in (KEEP, RECOMPUTE) and not g.deliver:
                out.append(Fetch(self.tables.gap_keys[g.id], g.buffer, None if c == REFETCH else c, self.end_seg[g.id]))
        return out

    def recompute_s(self, choice) -> np.ndarray:
        """Seconds of recomputation per segment."""
        out = np.zeros(self.K)
        for gid, (secs, _, _, _) in self.recompute.items():
            if choice[gid] == RECOMPUTE:
                out[self.s.seg(self.gaps[gid].end)] += secs
        return out

    def segment_bytes(self, resident, choice, early) -> np.ndarray:
        """Device bytes per segment: the constant part, resident model tensors outside their
        segments, kept gaps, fetches issued a segment early, recomputations' transients."""
        return self.bytes_of(*self.tables.masks(resident, choice, early))

    def bytes_of(self, res, early_init, keep, rc, early_gap) -> np.ndarray:
        """``segment_bytes`` of a placement given as masks (``_Tables.masks``): per model tensor
        resident / its first fetch early; per gap kept / recomputed / its fetch early."""
        t, width = self.tables, self.K + 1

        def add(at, nbytes):   # one cumulative pass: +nbytes from segment ``at`` on
            return np.bincount(at, weights=nbytes, minlength=width).astype(np.float64, copy=False)

        nb = t.p_nb[res]
        diff = -add(t.p_first[res], nb) + add(t.p_last[res] + 1, nb)
        diff[0] += nb.sum()
        # a first fetch issued early holds the bytes one segment more
        ahead = ~res & (t.p_first >= 1) & early_init
        diff += add(t.p_first[ahead] - 1, t.p_nb[ahead]) - add(t.p_first[ahead], t.p_nb[ahead])
        if len(self.gaps):
            diff += add(t.g_lo[keep], t.g_nb[keep]) - add(t.g_hi[keep] + 1, t.g_nb[keep])
            diff += add(t.g_end[rc], t.g_rc_bytes[rc]) - add(t.g_end[rc] + 1, t.g_rc_bytes[rc])
            lead = ~keep & ~rc & ~t.g_deliver & (t.g_end >= 1) & early_gap
            diff += add(t.g_end[lead] - 1, t.g_nb[lead]) - add(t.g_end[lead], t.g_nb[lead])
        return self.const + np.cumsum(diff[:self.K])

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
        seconds, moved = self.time_and_moves(resident, home, choice, early)
        return seconds + EPS * moved

    def time_and_moves(self, resident, home, choice, early) -> tuple[float, float]:
        """The step's seconds (per segment the slower of compute and each link, plus late
        fetches) and the seconds of transfer it issues."""
        loads, late = self.loads(resident, home, choice, early)
        compute = self.compute + self.recompute_s(choice)
        return float(np.maximum(compute, loads.max(axis=0)).sum() + late), float(loads.sum() + late)

    def placement(self, resident, home, choice, early, status: str, **kw) -> Placement:
        """The Placement of these decisions, with its segment bytes and objective."""
        return Placement(frozenset(resident) | self.pinned, dict(home), dict(choice), set(early), self.gaps,
                         self.min_budget(), self.segment_bytes(resident, choice, early), status, 0.0,
                         self.objective(resident, home, choice, early), **kw)


class _Tables:
    """A placement model's per-tensor and per-gap constants as arrays, for ``segment_bytes``
    (the greedy evaluates thousands of placements of a 7B training step)."""

    def __init__(self, m: PlacementModel):
        ints = lambda xs: np.array(list(xs), dtype=np.int64)  # noqa: E731
        self.p_nb = np.array([m.size(b) for b in m.persistent], dtype=np.float64)
        self.p_first = ints(m.first_seg[b] for b in m.persistent)
        self.p_last = ints(m.last_seg[b] for b in m.persistent)
        self.init_keys = [FetchKey.init(b) for b in m.persistent]
        self.g_lo = ints(m.gap_span[g.id][0] for g in m.gaps)
        self.g_hi = ints(m.gap_span[g.id][1] for g in m.gaps)
        self.g_nb = np.array([m.size(g.buffer) for g in m.gaps], dtype=np.float64)
        self.g_end = ints(m.end_seg)
        self.g_rc_bytes = np.array([m.recompute[g.id][1] if g.id in m.recompute else 0 for g in m.gaps],
                                   dtype=np.float64)
        self.g_deliver = np.array([g.deliver for g in m.gaps], dtype=bool)
        self.p_index = {b: i for i, b in enumerate(m.persistent)}
        # per gap: its storage's index among the model tensors (-1: an activation's)
        self.g_pidx = ints(self.p_index.get(g.buffer, -1) for g in m.gaps)
        self.gap_keys = [FetchKey.gap(g.id) for g in m.gaps]

    def masks(self, resident, choice, early) -> tuple[np.ndarray, ...]:
        """A placement's decisions as ``PlacementModel.bytes_of`` reads them."""
        n, P = len(self.g_nb), len(self.p_nb)
        res = np.zeros(P, dtype=bool)
        res[[self.p_index[b] for b in resident if b in self.p_index]] = True
        early_init = np.fromiter((k in early for k in self.init_keys), dtype=bool, count=P)
        chosen = [choice[i] for i in range(n)]
        keep = np.fromiter((c == KEEP for c in chosen), dtype=bool, count=n)
        rc = np.fromiter((c == RECOMPUTE for c in chosen), dtype=bool, count=n)
        early_gap = np.fromiter((k in early for k in self.gap_keys), dtype=bool, count=n)
        return res, early_init, keep, rc, early_gap
