"""The greedy placement: start with everything on the device and take the move with the best
relief per second of transfer until every segment fits. Moves only lower memory, so this ends
feasible whenever the budget is at least the all-moved minimum. It warm-starts the MIP and is
the answer when the solver finds nothing better."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ...errors import InfeasibleBudgetError
from ...ir.kinds import fetch_links, offload_links
from .problem import DISK, HOST, KEEP, RECOMPUTE, REFETCH, FetchKey, Placement, PlacementModel

_LATE_PENALTY = 4.0  # a late (unoverlapped) fetch costs about this many transfer times


class Move(NamedTuple):
    kind: str        # "res" (drop residency), "rc" (recompute), "gap" (evict), "late" (lead)
    item: object     # storage id, Gap, or FetchKey
    tier: object     # where it goes (None: no tier involved)
    late: bool       # its fetch is issued in the segment that uses it


@dataclass
class _State:
    """The greedy's decisions so far."""

    resident: set
    home: dict
    choice: dict
    early: set
    host_left: int
    locked_gaps: set = field(default_factory=set)      # read by a recomputation: must stay kept
    locked_weights: set = field(default_factory=set)   # read by a recomputation: must stay resident
    allow_recompute: bool = True

    def segment_bytes(self, m: PlacementModel) -> np.ndarray:
        return m.segment_bytes(self.resident, self.choice, self.early)


class _Best:
    """The best-scoring move offered so far (the first of equal scores wins)."""

    def __init__(self):
        self.move, self.score = None, 0.0

    def offer(self, move: Move, relief: float, cost: float) -> None:
        if relief > 0 and relief / (cost + 1e-12) > self.score:
            self.move, self.score = move, relief / (cost + 1e-12)

    def consider(self, kind, item, tier, relief_early, relief_window, secs) -> None:
        """Score a move fetched early (window kept) and late (window freed, may stall)."""
        self.offer(Move(kind, item, tier, False), relief_early, secs)
        self.offer(Move(kind, item, tier, True), relief_early + relief_window, _LATE_PENALTY * secs)


def solve_greedy(m: PlacementModel) -> Placement:
    """The greedy placement of ``m`` (status "greedy"); InfeasibleBudgetError if no move is
    left while a segment is still over budget."""
    st = _State(set(m.persistent), {}, {g.id: KEEP for g in m.gaps}, set(), m.hw.host_bytes)
    gaps_of: dict[int, list[int]] = {}
    for g in m.gaps:
        gaps_of.setdefault(g.buffer, []).append(g.id)
    table = _GapTable(m)
    mem = st.segment_bytes(m)
    while mem.max() > m.budget:
        over = (mem > m.budget).astype(np.float64)
        best = _Best()
        _residency_moves(m, st, over, gaps_of, best)
        _gap_moves(m, st, over, best, table)
        _lead_moves(m, st, over, best)
        if best.move is None and st.allow_recompute and RECOMPUTE in st.choice.values():
            _give_up_recomputes(st)
            mem = st.segment_bytes(m)
            continue
        if best.move is None:  # cannot happen when budget >= min_budget; guard against model bugs
            raise InfeasibleBudgetError(m.budget, int(mem.max()), "greedy placement found no move")
        _apply(m, st, best.move)
        mem = st.segment_bytes(m)
    _undo_needless_moves(m, st.resident, st.home, st.choice, st.early)
    result = m.placement(st.resident, st.home, st.choice, st.early, "greedy")
    assert result.segment_bytes.max() <= m.budget, "greedy placement over budget"
    return result


def _residency_moves(m: PlacementModel, st: _State, over: np.ndarray, gaps_of, best: _Best) -> None:
    """Homing a resident model tensor on host (while it has room) or disk."""
    cs = np.concatenate(([0.0], np.cumsum(over)))
    for b in st.resident - st.locked_weights:
        c0, nb = m.first_seg[b], m.size(b)
        tier = HOST if st.host_left >= nb else DISK
        window = over[c0 - 1] * nb if c0 >= 1 else 0.0
        # dropping residency also unlocks evicting its gaps: count them as relief to come
        unlocks = sum(cs[m.gap_span[g][1] + 1] - cs[m.gap_span[g][0]] for g in gaps_of.get(b, ()))
        outside = cs[max(c0 - 1, 0)] + (cs[-1] - cs[m.last_seg[b] + 1])
        best.consider("res", b, tier, (outside + unlocks) * nb, window,
                      m.transfer_s(nb, fetch_links(tier, m.dev)))


class _GapTable:
    """Per-gap constants of ``m`` as arrays: the greedy scores every kept gap at every move, so
    it scores them together (the same numbers, in the same order, as one by one)."""

    def __init__(self, m: PlacementModel):
        g, t = m.gaps, m.tables
        self.lo, self.hi, self.nb, self.deliver = t.g_lo, t.g_hi, t.g_nb, t.g_deliver
        self.buffer = np.array([x.buffer for x in g], dtype=np.int64)
        self.persistent = np.array([x.persistent for x in g], dtype=bool)
        secs = lambda links_of, tier: np.array([m.transfer_s(m.size(x.buffer), links_of(tier, m.dev))  # noqa: E731
                                                for x in g], dtype=np.float64)
        self.fetch = {t: secs(fetch_links, t) for t in (HOST, DISK)}
        self.offload = {t: secs(offload_links, t) for t in (HOST, DISK)}
        self.with_recompute = [x.id for x in g if x.id in m.recompute]


def _gap_moves(m: PlacementModel, st: _State, over: np.ndarray, best: _Best, t: _GapTable) -> None:
    """Recomputing, offloading (activations) or refetching (model tensors) a kept gap. Per gap
    the offers are, in order: recompute, move fetched early, move fetched late."""
    n = len(m.gaps)
    if n == 0:
        return
    kept = np.fromiter((st.choice[i] == KEEP for i in range(n)), dtype=bool, count=n)
    resident = np.fromiter((b in st.resident for b in t.buffer.tolist()), dtype=bool, count=n)
    movable = kept & ~(t.persistent & resident)
    if st.locked_gaps:
        movable[list(st.locked_gaps)] = False
    cs = np.concatenate(([0.0], np.cumsum(over)))
    whole = (cs[t.hi + 1] - cs[t.lo]) * t.nb     # the window, the fetch's segment included
    before = (cs[t.hi] - cs[t.lo]) * t.nb        # the window without it (an early fetch holds it)
    at_fetch = over[t.hi] * t.nb
    to_host = st.host_left >= t.nb
    home_host = np.fromiter((st.home.get(b) == HOST for b in t.buffer.tolist()), dtype=bool, count=n)
    fetch = np.where(t.persistent, np.where(home_host, t.fetch[HOST], t.fetch[DISK]),
                     np.where(to_host, t.fetch[HOST], t.fetch[DISK]))
    offload = np.where(to_host, t.offload[HOST], t.offload[DISK])
    secs = np.where(t.persistent, fetch, np.where(t.deliver, offload, fetch + offload))
    early_relief = np.where(t.deliver & ~t.persistent, whole, before)
    late_relief = np.where(t.deliver & ~t.persistent, whole, before + at_fetch)
    scores = np.zeros((n, 3))
    scores[:, 1] = _scores(early_relief, secs, movable)
    scores[:, 2] = _scores(late_relief, _LATE_PENALTY * secs, movable)
    if st.allow_recompute:
        for gid in t.with_recompute:
            secs_rc, transient, gaps, weights = m.recompute[gid]
            if movable[gid] and all(st.choice[h] == KEEP for h in gaps) and all(w in st.resident for w in weights):
                # no lead: the whole window is freed, for the op's time
                relief = whole[gid] - over[m.s.seg(m.gaps[gid].end)] * transient
                scores[gid, 0] = relief / (secs_rc + 1e-12) if relief > 0 else 0.0
    flat = int(np.argmax(scores))
    gid, which = divmod(flat, 3)
    if scores[gid, which] <= best.score:
        return
    g = m.gaps[gid]
    if which == 0:
        move = Move("rc", g, None, True)
    else:
        tier = st.home[g.buffer] if g.persistent else (HOST if to_host[gid] else DISK)
        move = Move("gap", g, tier, which == 2)
    best.move, best.score = move, float(scores[gid, which])


def _scores(relief: np.ndarray, cost: np.ndarray, offered: np.ndarray) -> np.ndarray:
    """``_Best.offer``'s score where a move is offered with positive relief, else 0."""
    ok = offered & (relief > 0)
    return np.where(ok, relief / (cost + 1e-12), 0.0)


def _lead_moves(m: PlacementModel, st: _State, over: np.ndarray, best: _Best) -> None:
    """Issuing an early fetch late, in the segment that uses it."""
    for key, b, tier, c in m.fetches(st.resident, st.choice):
        if key in st.early and c >= 1 and over[c - 1]:
            tier = tier or st.home[b]
            best.consider("late", key, None, 0.0, m.size(b), m.transfer_s(m.size(b), fetch_links(tier, m.dev)))


def _give_up_recomputes(st: _State) -> None:
    """Recomputations keep their inputs on the device; near the minimum budget those inputs
    must move too: give them up and go on with moves only."""
    for gid, c in st.choice.items():
        if c == RECOMPUTE:
            st.choice[gid] = KEEP
    st.locked_gaps.clear()
    st.locked_weights.clear()
    st.allow_recompute = False


def _apply(m: PlacementModel, st: _State, move: Move) -> None:
    kind, item, tier, late = move
    if kind == "res":
        st.resident.discard(item)
        st.home[item] = tier
        if not late:
            st.early.add(FetchKey.init(item))
        if tier == HOST:
            st.host_left -= m.size(item)
    elif kind == "rc":
        st.choice[item.id] = RECOMPUTE
        st.locked_gaps.update(m.recompute[item.id][2])
        st.locked_weights.update(m.recompute[item.id][3])
    elif kind == "gap":
        st.choice[item.id] = REFETCH if item.persistent else tier
        if not late:
            st.early.add(FetchKey.gap(item.id))
        if tier == HOST and not item.persistent:
            st.host_left -= m.size(item.buffer)
    else:
        st.early.discard(item)


def _undo_needless_moves(m: PlacementModel, resident, home, choice, early) -> None:
    """Greedy evictions made early can become needless once later ones freed more room: take
    back every move that still fits, costliest transfer first (late fetches, then evictions,
    then homes)."""
    def fits():
        return m.segment_bytes(resident, choice, early).max() <= m.budget

    for key, b, tier, c in sorted(m.fetches(resident, choice), key=lambda f: -m.size(f.storage)):
        if key not in early and c >= 1:
            early.add(key)
            if not fits():
                early.discard(key)
    for g in sorted((g for g in m.gaps if choice[g.id] != KEEP), key=lambda g: -m.size(g.buffer)):
        key = FetchKey.gap(g.id)
        before, was_early = choice[g.id], key in early
        choice[g.id] = KEEP
        early.discard(key)
        if not fits():
            choice[g.id] = before
            if was_early:
                early.add(key)
    for b in sorted((b for b in m.persistent if b not in resident), key=lambda b: -m.size(b)):
        if any(choice[g.id] != KEEP for g in m.gaps if g.buffer == b):
            continue
        key = FetchKey.init(b)
        tier = home.pop(b)
        resident.add(b)
        was_early = key in early
        early.discard(key)
        if not fits():
            resident.discard(b)
            home[b] = tier
            if was_early:
                early.add(key)
