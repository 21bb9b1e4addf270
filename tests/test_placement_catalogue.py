"""A catalogue of tiny placement problems with known optimal answers.

Each program is a small torch.nn module captured for real, cut into one segment per step, with
one millisecond per step and a hardware profile chosen so the answer can be worked out by
hand. Every case is solved by the greedy alone and by the MIP alone (no warm start), and the
hand-derived optimum is cross-checked by exhaustive search over the model's decisions.

  one_offload       a chain whose peak needs exactly one activation moved off the device:
                    the cheapest to move (the smaller) is the optimum
  recompute         a training step on slow links: re-running a cheap op beats moving its
                    output out and back
  weight_streams    a weight too large to stay resident next to a big activation: homed on
                    host (disk without a host tier) and fetched ahead of its use
  min_budget        the chain at exactly its minimum budget (both long gaps moved), and one
                    byte below it InfeasibleBudgetError naming that minimum
"""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import memsched
from memsched.errors import InfeasibleBudgetError
from memsched.frontend.capture import capture
from memsched.frontend.joint import capture_joint
from memsched.ir.kinds import fetch_links, offload_links
from memsched.passes.analysis import analyze
from memsched.passes.placement import (DISK, HOST, KEEP, RECOMPUTE, REFETCH, FetchKey, PlacementModel,
                                       problem_data, solve_greedy, solve_mip, solve_placement)
from memsched.passes.placement.greedy import tidy
from memsched.passes.placement.problem import EPS
from memsched.passes.segments import Segments

STEP_S = 1e-3
T4 = memsched.get_hardware("t4")                                   # a host tier: moves go to host
NO_HOST = T4.replace(device_type="cpu", host_bytes=0)              # no host tier: moves go to disk
SLOW = T4.replace(device_type="cpu", host_bytes=0, disk_read_bw=1e5, disk_write_bw=1e5)


# -- the modules --------------------------------------------------------------------------------
class Chain(nn.Module):
    """``a`` (4 KiB) and ``a2`` (2 KiB) are read at the start and at the end; a 4x wide middle
    (``cat``, ``mul_2``) is the peak, which either of them leaving would relieve."""

    def forward(self, x):
        a = x * 2
        a2 = x[:512] * 3
        b = a + 1
        c = torch.cat([b, b, b, b])
        d = c * 3
        e = d.sum()
        f = e + a
        return f * 2, a2 + 1


class Stream(nn.Module):
    """A 256 KiB weight read once at the start, a 64 KiB activation after it, a 16 KiB weight
    read at the end."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(256, 256, bias=False)
        self.l2 = nn.Linear(256, 16, bias=False)

    def forward(self, x):
        y = self.l1(torch.relu(x))
        big = y.repeat(64, 1)
        return self.l2(big.sum(0, keepdim=True))


class Diamond(nn.Module):
    """sin(a) and cos(a) of one product, both saved for the backward; a 4x wide forward tail
    is the peak. sin/cos re-run from ``a`` (kept for the backward anyway) in one step each."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        a = x * self.w
        big = (torch.sin(a) * torch.cos(a)).repeat(4)
        return big.sum()


CAPTURES = {
    "chain": lambda: capture(Chain(), (torch.randn(1024),), {}),
    "stream": lambda: capture(Stream(), (torch.randn(1, 256),), {}),
    "diamond": lambda: capture_joint(Diamond(), (torch.randn(1024),), {}),
}


class _Programs(dict):
    """Analysed programs by name, captured on first use."""

    def __missing__(self, name):
        torch.manual_seed(0)
        # analysed as for a GPU, where no op's own scratch is measured: the optima below count
        # the graph's values alone (on a CPU, repeat holds 64 bytes of its own)
        self[name] = analyze(CAPTURES[name](), device_type="cuda")
        return self[name]


@pytest.fixture(scope="module")
def programs():
    return _Programs()


# -- helpers --------------------------------------------------------------------------------------
def per_step(n: int) -> Segments:
    return Segments(tuple(range(n + 1)), np.r_[np.arange(n), n - 1])


def model_of(program, hw, budget) -> PlacementModel:
    n = program.n_steps
    return PlacementModel(program, per_step(n), np.full(n, STEP_S), hw, budget)


def solve(backend: str, m: PlacementModel):
    if backend == "greedy":
        return solve_greedy(m)
    placement = solve_mip(m, None, time.perf_counter() + 60)  # MIP only: no warm start
    assert placement is not None and placement.status == "optimal"
    return placement


def storage(program, name):
    return next(s for s in program.storages if s.name == name)


def moved(m, placement) -> dict[str, str]:
    """value -> choice of every gap not kept."""
    return {g.value: placement.gap_choice[g.id] for g in m.gaps if placement.gap_choice[g.id] != KEEP}


def transfer_s(hw, nbytes, links) -> float:
    return sum(nbytes / hw.bandwidth(link) for link in links)


def check(m, placement, optimum, backend):
    assert placement.segment_bytes.max() <= m.budget
    assert np.array_equal(placement.segment_bytes,
                          m.segment_bytes(placement.resident - m.pinned, placement.gap_choice, placement.early))
    if backend == "mip":
        assert math.isclose(placement.objective, optimum, rel_tol=1e-9), (placement.objective, optimum)
    else:
        assert placement.objective >= optimum * (1 - 1e-12)


def exhaustive_optimum(m: PlacementModel) -> float:
    """The least objective over every placement of ``m`` that fits, by enumeration: residency
    and home per model tensor, a choice per gap (with the MIP's side conditions), a lead per
    fetch."""
    tiers = [HOST, DISK] if m.hw.host_bytes > 0 else [DISK]
    best = math.inf
    for homes in itertools.product(*[[None] + tiers for _ in m.persistent]):
        resident = {b for b, t in zip(m.persistent, homes) if t is None}
        home = {b: t for b, t in zip(m.persistent, homes) if t is not None}
        options = [([KEEP] if g.buffer in resident else [KEEP, REFETCH]) if g.persistent
                   else [KEEP, *tiers] + ([RECOMPUTE] if g.id in m.recompute else []) for g in m.gaps]
        for picks in itertools.product(*options):
            choice = {g.id: c for g, c in zip(m.gaps, picks)}
            if any(c == RECOMPUTE and not (all(choice[h] == KEEP for h in m.recompute[gid][2])
                                           and all(w in resident for w in m.recompute[gid][3]))
                   for gid, c in choice.items()):
                continue
            host = (sum(m.size(b) for b, t in home.items() if t == HOST)
                    + sum(m.size(g.buffer) for g in m.gaps if choice[g.id] == HOST))
            if m.hw.host_bytes > 0 and host > m.hw.host_bytes:
                continue
            keys = [f.key for f in m.fetches(resident, choice) if f.seg >= 1]
            for leads in itertools.product([False, True], repeat=len(keys)):
                early = {k for k, on in zip(keys, leads) if on}
                if m.segment_bytes(resident, choice, early).max() <= m.budget:
                    best = min(best, m.objective(resident, home, choice, early))
    return best


# -- the catalogue: (program, hardware, budget, optimum, decisions check) -------------------------
def one_offload(programs, hw):
    """Budget one byte below the peak: one of the two long-lived activations leaves; moving the
    smaller (a2 = ``mul_1``, 2 KiB) is optimal: its offload and early fetch hide under compute."""
    p = programs["chain"]
    tier = HOST if hw.host_bytes else DISK
    nb = storage(p, "mul_1").nbytes
    optimum = p.n_steps * STEP_S + EPS * transfer_s(hw, nb, offload_links(tier, hw.device_type)
                                                    + fetch_links(tier, hw.device_type))

    def decisions(m, pl, backend):
        out = moved(m, pl)
        assert len(out) == 1 and set(out.values()) == {tier}, out  # exactly one gap moved off
        if backend == "mip":
            (gap,) = [g for g in m.gaps if pl.gap_choice[g.id] != KEEP]
            assert gap.value == "mul_1" and FetchKey.gap(gap.id) in pl.early

    return p, hw, p.peak_bytes - 1, optimum, decisions


def recompute(programs, drop):
    """Slow disk (100 kB/s: a 4 KiB move takes 41 ms each way) and a budget ``drop`` bytes
    below the peak: re-running sin or cos (1 ms each) wins; nothing is offloaded."""
    p = programs["diamond"]
    n_rc = -(-drop // storage(p, "sin").nbytes)  # 4 KiB freed per recomputed value
    optimum = (p.n_steps + n_rc) * STEP_S

    def decisions(m, pl, backend):
        out = moved(m, pl)
        assert set(out.values()) == {RECOMPUTE} and len(out) == n_rc, out
        assert set(out) <= {"sin", "cos"}
        assert set(m.persistent) <= pl.resident  # the weight stays: nothing streams
        # the recomputed value moved to disk instead (early or late fetch) costs more
        gid = next(g.id for g in m.gaps if pl.gap_choice[g.id] == RECOMPUTE)
        choice = {**pl.gap_choice, gid: DISK}
        res = set(pl.resident) - m.pinned
        alternatives = [m.objective(res, pl.home, choice, early) for early in (set(), {FetchKey.gap(gid)})
                        if m.segment_bytes(res, choice, early).max() <= m.budget]
        assert alternatives and min(alternatives) > optimum + 0.03

    return p, SLOW, p.peak_bytes - drop, optimum, decisions


def weight_streams(programs, hw, slack):
    """Budget ``slack`` below the peak, the 16 KiB weight's size or more: keeping the 256 KiB
    weight resident next to the 64 KiB activation cannot fit, so it is homed off the device and
    fetched a step ahead of its use (hidden under compute); the small weight stays resident."""
    p = programs["stream"]
    tier = HOST if hw.host_bytes else DISK
    w1, w2 = storage(p, "p_l1_weight"), storage(p, "p_l2_weight")
    optimum = p.n_steps * STEP_S + EPS * transfer_s(hw, w1.nbytes, fetch_links(tier, hw.device_type))

    def decisions(m, pl, backend):
        assert w1.id not in pl.resident and pl.home == {w1.id: tier}
        assert w2.id in pl.resident
        assert FetchKey.init(w1.id) in pl.early
        assert not moved(m, pl)

    return p, hw, p.peak_bytes - slack, optimum, decisions


def min_budget(programs):
    """The chain's minimum budget is its widest step: ``mul_2 = cat * 3`` holds 2 x 16 KiB.
    At exactly that budget both gaps spanning that step (``mul`` 4 KiB, ``mul_1`` 2 KiB) move to
    host, fetched early."""
    p = programs["chain"]
    minimum = storage(p, "cat").nbytes + storage(p, "mul_2").nbytes
    nb = storage(p, "mul").nbytes + storage(p, "mul_1").nbytes
    optimum = p.n_steps * STEP_S + EPS * transfer_s(T4, nb, offload_links(HOST, "cuda") + fetch_links(HOST, "cuda"))

    def decisions(m, pl, backend):
        assert m.min_budget() == minimum == m.budget
        assert moved(m, pl) == {"mul": HOST, "mul_1": HOST}
        assert all(FetchKey.gap(g.id) in pl.early for g in m.gaps if pl.gap_choice[g.id] != KEEP)

    return p, T4, minimum, optimum, decisions


W2_BYTES = 16384
CASES = {
    "one_offload-host": lambda ps: one_offload(ps, T4),
    "one_offload-disk": lambda ps: one_offload(ps, NO_HOST),
    "recompute-one": lambda ps: recompute(ps, 4096),
    "recompute-two": lambda ps: recompute(ps, 8192),
    "weight_streams-host": lambda ps: weight_streams(ps, T4, W2_BYTES + 1),
    "weight_streams-disk": lambda ps: weight_streams(ps, NO_HOST, W2_BYTES + 1),
    "weight_streams-1B-below-peak": lambda ps: weight_streams(ps, T4, 1),
    "min_budget": min_budget,
}
# Known gap of the MIP: lead variables are continuous and a fractional lead is rounded down
# (late) when decoding. One byte below the peak the MIP keeps the big weight resident and
# fetches the small one 16383/16384 early, which its formulation prices as hidden but which
# decodes to a late, stalling fetch (objective +1.3 us). solve_placement is protected: the
# greedy warm start is kept when the solver's plan is worse (test_solve_placement below).
FRACTIONAL_LEAD: set = set()  # (case, backend) known to miss the optimum: none since leads are binary


@pytest.fixture(params=["greedy", "mip"])
def backend(request):
    return request.param


@pytest.mark.parametrize("case", list(CASES))
def test_catalogue(programs, case, backend, request):
    if (case, backend) in FRACTIONAL_LEAD:
        request.applymarker(pytest.mark.xfail(strict=True, reason="MIP rounds a fractional lead down"))
    program, hw, budget, optimum, decisions = CASES[case](programs)
    m = model_of(program, hw, budget)
    placement = solve(backend, m)
    check(m, placement, optimum, backend)
    decisions(m, placement, backend)


@pytest.mark.parametrize("case", list(CASES))
def test_known_optimum_is_exhaustive_optimum(programs, case):
    """The hand-derived optima are the true optima of the placement model."""
    program, hw, budget, optimum, _ = CASES[case](programs)
    assert math.isclose(exhaustive_optimum(model_of(program, hw, budget)), optimum, rel_tol=1e-9)


@pytest.mark.parametrize("case", list(CASES))
def test_solve_placement(programs, case):
    """The whole path (greedy, MIP warm-started from it, host preferred) reaches the optimum
    and keeps the greedy plan as the alternative the caller simulates."""
    program, hw, budget, optimum, decisions = CASES[case](programs)
    n = program.n_steps
    placement = solve_placement(program, per_step(n), np.full(n, STEP_S), hw, budget, time_limit_s=60)
    m = model_of(program, hw, budget)
    check(m, placement, optimum, "mip")
    decisions(m, placement, "mip")
    if placement.alternative is not None:
        assert placement.objective <= placement.alternative.objective + 1e-12


@pytest.mark.parametrize("hw", [T4, NO_HOST], ids=["host", "disk"])
def test_tidy_takes_back_the_moves_the_budget_does_not_need(programs, hw):
    """A MIP stopped within a gap of its optimum (large problems) can hand back moves nothing
    needs; ``tidy`` takes them back. One byte below the chain's peak, the optimum plus a needless
    offload of ``mul`` (fetched late, too) tidies back to the optimum, and an optimal plan is
    returned as it is."""
    program, _, budget, optimum, decisions = one_offload(programs, hw)
    m = model_of(program, hw, budget)
    best = solve("mip", m)
    tier = HOST if hw.host_bytes else DISK
    extra = next(g for g in m.gaps if g.value == "mul" and best.gap_choice[g.id] == KEEP)
    choice = {**best.gap_choice, extra.id: tier}
    res = set(best.resident) - m.pinned
    padded = m.placement(res, best.home, choice, set(best.early), "feasible")
    assert padded.segment_bytes.max() <= budget and padded.objective > optimum
    tidied = tidy(m, padded)
    check(m, tidied, optimum, "mip")
    decisions(m, tidied, "mip")
    assert tidied.notes and tidy(m, best) is best


def test_min_budget_boundary(programs):
    """Exactly the minimum is feasible; one byte below raises before anything is solved,
    naming the minimum."""
    program, hw, minimum, _, _ = min_budget(programs)
    n = program.n_steps
    args = (program, per_step(n), np.full(n, STEP_S), hw)
    placement = solve_placement(*args, minimum)
    assert placement.min_budget_bytes == minimum
    assert placement.segment_bytes.max() <= minimum
    with pytest.raises(InfeasibleBudgetError) as err:
        solve_placement(*args, minimum - 1)
    assert err.value.min_budget_bytes == minimum and err.value.budget_bytes == minimum - 1


def test_problem_data(programs):
    """problem_data dumps the MIP that solve_mip solves: same sizes, binaries for the
    decisions and the leads (a fetch is early or not), continuous segment times, every segment
    time in the objective."""
    program, hw, budget, _, _ = one_offload(programs, T4)
    m = model_of(program, hw, budget)
    data = problem_data(m)
    placement = solve_mip(m, None, time.perf_counter() + 60)
    assert len(data["variables"]) == placement.n_variables
    assert len(data["constraints"]) == placement.n_constraints
    kinds = {v["name"]: v["integer"] for v in data["variables"]}
    assert all(kinds[f"y{g.id}"] and kinds[f"oh{g.id}"] and kinds[f"od{g.id}"] for g in m.gaps)
    assert all(kinds[name] for name in kinds if name.startswith("lead_") and "_" not in name[5:])
    assert not any(kinds[name] for name in kinds if name.startswith("tau"))
    assert data["objective"]["sense"] == "minimize"
    assert all(data["objective"]["coefficients"][f"tau{j}"] == 1.0 for j in range(m.K))
    budget_rows = [c for c in data["constraints"] if c["ub"] == budget - m.const[5]]
    assert budget_rows  # the peak segment's row: kept gaps' bytes <= budget - constant bytes


def test_model_words():
    """Choice words equal the strings plans and listings use; fetch keys equal plain tuples."""
    assert (KEEP, REFETCH, RECOMPUTE, HOST, DISK) == ("keep", "refetch", "recompute", "host", "disk")
    assert FetchKey.init(3) == ("init", 3) and hash(FetchKey.gap(2)) == hash(("gap", 2))
