"""The greedy placement: start with everything on the device and take the move with the best
relief per second of transfer until every segment fits. Moves only lower memory, so this ends
feasible whenever the budget is at least the all-moved minimum. It warm-starts the MIP and is
the answer when the solver finds nothing better."""
from __future__ import annotations

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


class _State:
    """The greedy's decisions so far, as the placement's sets and dicts and, kept in step with
    them, as arrays over the model tensors and gaps (the greedy scores all of them at every
    move: thousands of moves on a 7B training step)."""

    def __init__(self, m: PlacementModel):
        t, P, n = m.tables, len(m.persistent), len(m.gaps)
        self.m = m
        self.resident, self.home, self.early = set(m.persistent), {}, set()
        self.choice = {g.id: KEEP for g in m.gaps}
        self.host_left = m.hw.host_bytes
        self.res, self.home_host, self.early_init = np.ones(P, bool), np.zeros(P, bool), np.zeros(P, bool)
        self.keep, self.rc, self.early_gap = np.ones(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        self.gap_host = np.zeros(n, bool)                  # offloaded to host (an activation)
        self.locked_gaps = np.zeros(n, bool)               # read by a recomputation: must stay kept
        self.locked_weights = np.zeros(P, bool)            # read by a recomputation: must stay resident
        self.allow_recompute = True
        self.t = t

    @classmethod
    def of(cls, m: PlacementModel, p: Placement) -> "_State":
        """The state holding ``p``'s decisions (its move bookkeeping left as a fresh state's)."""
        st = cls(m)
        for b in m.persistent:
            if b not in p.resident:
                st.set_resident(b, p.home[b])
        for g in m.gaps:
            st.set_gap(g, p.gap_choice[g.id])
        for key in p.early:
            st.set_early(key, True)
        return st

    def segment_bytes(self) -> np.ndarray:
        return self.m.bytes_of(self.res, self.early_init, self.keep, self.rc, self.early_gap)

    def fits(self) -> bool:
        return self.segment_bytes().max() <= self.m.budget

    def set_early(self, key: FetchKey, on: bool) -> None:
        (self.early.add if on else self.early.discard)(key)
        if key.kind == "init":
            self.early_init[self.t.p_index[key.item]] = on
        else:
            self.early_gap[key.item] = on

    def set_gap(self, g, choice) -> None:
        self.choice[g.id] = choice
        self.keep[g.id], self.rc[g.id] = choice == KEEP, choice == RECOMPUTE
        self.gap_host[g.id] = choice == HOST

    def set_resident(self, b: int, home) -> None:
        """``home`` None: resident again; else homed on that tier."""
        i = self.t.p_index[b]
        if home is None:
            self.resident.add(b)
            self.home.pop(b, None)
        else:
            self.resident.discard(b)
            self.home[b] = home
        self.res[i], self.home_host[i] = home is None, home == HOST


class _Best:
    """The best-scoring move offered so far (the first of equal scores wins)."""

    def __init__(self):
        self.move, self.score = None, 0.0


def solve_greedy(m: PlacementModel) -> Placement:
    """The greedy placement of ``m`` (status "greedy"); InfeasibleBudgetError if no move is
    left while a segment is still over budget."""
    st = _State(m)
    table = _GapTable(m)
    mem = st.segment_bytes()
    while mem.max() > m.budget:
        over = (mem > m.budget).astype(np.float64)
        cs = np.concatenate(([0.0], np.cumsum(over)))
        best = _Best()
        _residency_moves(m, st, over, cs, best, table)
        _gap_moves(m, st, over, cs, best, table)
        _lead_moves(m, st, over, best, table)
        if best.move is None and st.allow_recompute and st.rc.any():
            _give_up_recomputes(st)
            mem = st.segment_bytes()
            continue
        if best.move is None:  # cannot happen when budget >= min_budget; guard against model bugs
            raise InfeasibleBudgetError(m.budget, int(mem.max()), "greedy placement found no move")
        _apply(m, st, best.move)
        mem = st.segment_bytes()
    _undo_needless_moves(m, st)
    result = m.placement(st.resident, st.home, st.choice, st.early, "greedy")
    assert result.segment_bytes.max() <= m.budget, "greedy placement over budget"
    return result


def tidy(m: PlacementModel, p: Placement) -> Placement:
    """``p`` with the moves its budget does not need taken back (a MIP stopped within a gap of
    its optimum can leave some: transfers the tie-break on bytes moved would have saved). Taking
    a move back removes transfer or recompute time, so the objective can only fall; ``p``
    itself is returned when nothing was taken back."""
    st = _State.of(m, p)
    _undo_needless_moves(m, st)
    if st.choice == p.gap_choice and st.early == p.early and st.home == p.home:
        return p
    tidied = m.placement(st.resident, st.home, st.choice, st.early, p.status, mip_gap=p.mip_gap,
                         n_variables=p.n_variables, n_constraints=p.n_constraints)
    if tidied.objective > p.objective:   # never: guards the claim above
        return p
    tidied.notes = [*p.notes, "moves the budget did not need taken back after the solver"]
    return tidied


def _take(best: _Best, scores: np.ndarray, move_of) -> None:
    """The first highest of ``scores`` (moves in offer order) if it beats ``best``."""
    if scores.size == 0:
        return
    flat = int(np.argmax(scores))
    if scores.flat[flat] > best.score:
        best.move, best.score = move_of(flat), float(scores.flat[flat])


def _residency_moves(m: PlacementModel, st: _State, over, cs, best: _Best, t: "_GapTable") -> None:
    """Homing a resident model tensor on host (while it has room) or disk. Per tensor (in
    ``m.persistent`` order) the offers are: fetched early, fetched late."""
    P = len(m.persistent)
    offered = st.res & ~st.locked_weights
    if not offered.any():
        return
    pt = m.tables
    nb, c0 = pt.p_nb, pt.p_first
    to_host = st.host_left >= nb
    window = np.where(c0 >= 1, over[np.maximum(c0 - 1, 0)] * nb, 0.0)
    # dropping residency also unlocks evicting its gaps: count them as relief to come
    own = pt.g_pidx >= 0
    unlocks = np.bincount(pt.g_pidx[own], weights=(cs[pt.g_hi + 1] - cs[pt.g_lo])[own], minlength=P)
    outside = cs[np.maximum(c0 - 1, 0)] + (cs[-1] - cs[pt.p_last + 1])
    early = (outside + unlocks) * nb
    secs = np.where(to_host, t.p_fetch[HOST], t.p_fetch[DISK])
    scores = np.stack([_scores(early, secs, offered), _scores(early + window, _LATE_PENALTY * secs, offered)], 1)

    def move(flat):
        i, late = divmod(flat, 2)
        return Move("res", m.persistent[i], HOST if to_host[i] else DISK, bool(late))

    _take(best, scores, move)


class _GapTable:
    """Per-gap and per-model-tensor constants of ``m`` as arrays: the greedy scores every
    candidate at every move, so it scores them together (the same numbers, in the same order,
    as one by one)."""

    def __init__(self, m: PlacementModel):
        g, t = m.gaps, m.tables
        self.lo, self.hi, self.nb, self.deliver = t.g_lo, t.g_hi, t.g_nb, t.g_deliver
        self.persistent = np.array([x.persistent for x in g], dtype=bool)
        secs = lambda links_of, tier, sizes: np.array([m.transfer_s(nb, links_of(tier, m.dev))  # noqa: E731
                                                       for nb in sizes], dtype=np.float64)
        gap_sizes = [m.size(x.buffer) for x in g]
        self.fetch = {t: secs(fetch_links, t, gap_sizes) for t in (HOST, DISK)}
        self.offload = {t: secs(offload_links, t, gap_sizes) for t in (HOST, DISK)}
        self.p_fetch = {t: secs(fetch_links, t, [m.size(b) for b in m.persistent]) for t in (HOST, DISK)}
        # recompute options: gap, seconds, transient bytes; what each needs kept / resident
        rc = [x.id for x in g if x.id in m.recompute]
        self.rc_gap = np.array(rc, dtype=np.int64)
        self.rc_secs = np.array([m.recompute[i][0] for i in rc], dtype=np.float64)
        self.rc_transient = np.array([m.recompute[i][1] for i in rc], dtype=np.float64)
        self.rc_needs_gap = _flat([m.recompute[i][2] for i in rc])
        # a weight that is not a placement model tensor (pinned) is never in the greedy's resident set
        self.rc_needs_weight = _flat([[t.p_index.get(w, -1) for w in m.recompute[i][3]] for i in rc])


def _flat(lists) -> tuple[np.ndarray, np.ndarray]:
    """(owner, item) arrays of a list of lists."""
    owner = np.array([i for i, xs in enumerate(lists) for _ in xs], dtype=np.int64)
    items = np.array([x for xs in lists for x in xs], dtype=np.int64)
    return owner, items


def _none_missing(needs: tuple[np.ndarray, np.ndarray], have: np.ndarray, count: int) -> np.ndarray:
    """Per owner: every item it needs is in ``have`` (an item -1 never is)."""
    owner, items = needs
    missing = (items < 0) | ~have[np.maximum(items, 0)] if have.size else np.ones(len(items), dtype=bool)
    return np.bincount(owner, weights=missing, minlength=count) == 0


def _gap_moves(m: PlacementModel, st: _State, over, cs, best: _Best, t: _GapTable) -> None:
    """Recomputing, offloading (activations) or refetching (model tensors) a kept gap. Per gap
    the offers are, in order: recompute, move fetched early, move fetched late."""
    n = len(m.gaps)
    if n == 0:
        return
    pidx = m.tables.g_pidx
    resident = _of_storage(st.res, pidx)
    movable = st.keep & ~(t.persistent & resident) & ~st.locked_gaps
    whole = (cs[t.hi + 1] - cs[t.lo]) * t.nb     # the window, the fetch's segment included
    before = (cs[t.hi] - cs[t.lo]) * t.nb        # the window without it (an early fetch holds it)
    at_fetch = over[t.hi] * t.nb
    to_host = st.host_left >= t.nb
    home_host = _of_storage(st.home_host, pidx)
    fetch = np.where(t.persistent, np.where(home_host, t.fetch[HOST], t.fetch[DISK]),
                     np.where(to_host, t.fetch[HOST], t.fetch[DISK]))
    offload = np.where(to_host, t.offload[HOST], t.offload[DISK])
    secs = np.where(t.persistent, fetch, np.where(t.deliver, offload, fetch + offload))
    early_relief = np.where(t.deliver & ~t.persistent, whole, before)
    late_relief = np.where(t.deliver & ~t.persistent, whole, before + at_fetch)
    scores = np.zeros((n, 3))
    scores[:, 1] = _scores(early_relief, secs, movable)
    scores[:, 2] = _scores(late_relief, _LATE_PENALTY * secs, movable)
    if st.allow_recompute and len(t.rc_gap):
        R = len(t.rc_gap)
        ok = movable[t.rc_gap] & _none_missing(t.rc_needs_gap, st.keep, R) \
            & _none_missing(t.rc_needs_weight, st.res, R)
        # no lead: the whole window is freed, for the op's time
        relief = whole[t.rc_gap] - over[m.tables.g_end[t.rc_gap]] * t.rc_transient
        scores[t.rc_gap, 0] = _scores(relief, t.rc_secs, ok)

    def move(flat):
        gid, which = divmod(flat, 3)
        g = m.gaps[gid]
        if which == 0:
            return Move("rc", g, None, True)
        tier = st.home[g.buffer] if g.persistent else (HOST if to_host[gid] else DISK)
        return Move("gap", g, tier, which == 2)

    _take(best, scores, move)


def _of_storage(mask: np.ndarray, pidx: np.ndarray) -> np.ndarray:
    """Per gap, ``mask`` of its model tensor (False for an activation's gap)."""
    if mask.size == 0:
        return np.zeros(len(pidx), dtype=bool)
    return (pidx >= 0) & mask[np.maximum(pidx, 0)]


def _scores(relief: np.ndarray, cost: np.ndarray, offered: np.ndarray) -> np.ndarray:
    """``_Best.offer``'s score where a move is offered with positive relief, else 0."""
    ok = offered & (relief > 0)
    return np.where(ok, relief / (cost + 1e-12), 0.0)


def _lead_moves(m: PlacementModel, st: _State, over, best: _Best, t: _GapTable) -> None:
    """Issuing an early fetch late, in the segment that uses it: first fetches of model tensors
    (``m.persistent`` order), then gaps' fetches (gap order), as ``m.fetches`` lists them."""
    pt = m.tables
    ahead = np.concatenate(([0.0], over))    # over[c - 1], 0 for segment 0
    p_on = ~st.res & st.early_init & (ahead[pt.p_first] > 0)
    p_secs = np.where(st.home_host, t.p_fetch[HOST], t.p_fetch[DISK])
    pidx = pt.g_pidx
    g_on = ~st.keep & ~st.rc & ~pt.g_deliver & st.early_gap & (ahead[pt.g_end] > 0)
    from_host = np.where(t.persistent, _of_storage(st.home_host, pidx), st.gap_host)
    g_secs = np.where(from_host, t.fetch[HOST], t.fetch[DISK])
    scores = np.concatenate([_scores(pt.p_nb, _LATE_PENALTY * p_secs, p_on),
                             _scores(pt.g_nb, _LATE_PENALTY * g_secs, g_on)])
    P = len(m.persistent)
    _take(best, scores, lambda i: Move("late", FetchKey.init(m.persistent[i]) if i < P else pt.gap_keys[i - P],
                                       None, True))


def _give_up_recomputes(st: _State) -> None:
    """Recomputations keep their inputs on the device; near the minimum budget those inputs
    must move too: give them up and go on with moves only."""
    for gid in np.flatnonzero(st.rc).tolist():
        st.set_gap(st.m.gaps[gid], KEEP)
    st.locked_gaps[:] = False
    st.locked_weights[:] = False
    st.allow_recompute = False


def _apply(m: PlacementModel, st: _State, move: Move) -> None:
    kind, item, tier, late = move
    if kind == "res":
        st.set_resident(item, tier)
        if not late:
            st.set_early(FetchKey.init(item), True)
        if tier == HOST:
            st.host_left -= m.size(item)
    elif kind == "rc":
        st.set_gap(item, RECOMPUTE)
        _, _, gaps, weights = m.recompute[item.id]
        st.locked_gaps[list(gaps)] = True
        st.locked_weights[[m.tables.p_index[w] for w in weights if w in m.tables.p_index]] = True
    elif kind == "gap":
        st.set_gap(item, REFETCH if item.persistent else tier)
        if not late:
            st.set_early(FetchKey.gap(item.id), True)
        if tier == HOST and not item.persistent:
            st.host_left -= m.size(item.buffer)
    else:
        st.set_early(item, False)


def _undo_needless_moves(m: PlacementModel, st: _State) -> None:
    """Greedy evictions made early can become needless once later ones freed more room: take
    back every move that still fits, costliest transfer first (late fetches, then evictions,
    then homes)."""
    for key, b, tier, c in sorted(m.fetches(st.resident, st.choice), key=lambda f: -m.size(f.storage)):
        if key not in st.early and c >= 1:
            st.set_early(key, True)
            if not st.fits():
                st.set_early(key, False)
    gaps_of: dict[int, list] = {}
    for g in m.gaps:
        gaps_of.setdefault(g.buffer, []).append(g)
    for g in sorted((g for g in m.gaps if st.choice[g.id] != KEEP), key=lambda g: -m.size(g.buffer)):
        key = FetchKey.gap(g.id)
        before, was_early = st.choice[g.id], key in st.early
        st.set_gap(g, KEEP)
        st.set_early(key, False)
        if not st.fits():
            st.set_gap(g, before)
            st.set_early(key, was_early)
    for b in sorted((b for b in m.persistent if b not in st.resident), key=lambda b: -m.size(b)):
        if any(st.choice[g.id] != KEEP for g in gaps_of.get(b, ())):
            continue
        key = FetchKey.init(b)
        tier, was_early = st.home[b], key in st.early
        st.set_resident(b, None)
        st.set_early(key, False)
        if not st.fits():
            st.set_resident(b, tier)
            st.set_early(key, was_early)
