"""The placement model's per-segment device bytes, as the greedy evaluates them thousands of
times (one cumulative pass), equal the direct sum over what each decision holds where."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest

from memsched import pipeline as P
from memsched.passes.placement.problem import DISK, HOST, KEEP, RECOMPUTE, REFETCH
from helpers import FIXED_CPU
from train_zoo import build_train


def _direct(m, resident, choice, early) -> np.ndarray:
    mem = m.const.copy()
    for b in resident:
        mem[0:m.first_seg[b]] += m.size(b)
        mem[m.last_seg[b] + 1:] += m.size(b)
    for g in m.gaps:
        lo, hi = m.gap_span[g.id]
        if choice[g.id] == KEEP:
            mem[lo:hi + 1] += m.size(g.buffer)
        elif choice[g.id] == RECOMPUTE:
            mem[m.s.seg(g.end)] += m.recompute[g.id][1]
    for key, b, _, c in m.fetches(resident, choice):
        if key in early and c >= 1:
            mem[c - 1] += m.size(b)
    return mem


@pytest.mark.parametrize("name", ["gpt2_dropout", "cnn_bn"])
def test_segment_bytes_equal_the_direct_sum(name):
    model, args, kwargs, _ = build_train(name)
    s = P.PlanningState(10**13, FIXED_CPU, 48, model=model, args=args, kwargs=kwargs, train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P.capture_pass(s)
    P.analysis_pass(s)
    P.segments_pass(s)
    m = s.placement_model
    rng = random.Random(0)
    for _ in range(25):
        resident = {b for b in m.persistent if rng.random() < 0.5}
        choice = {g.id: rng.choice([KEEP, REFETCH] if g.persistent else
                                   [KEEP, HOST, DISK] + ([RECOMPUTE] if g.id in m.recompute else []))
                  for g in m.gaps}
        early = {key for key, *_ in m.fetches(resident, choice) if rng.random() < 0.5}
        np.testing.assert_allclose(m.segment_bytes(resident, choice, early), _direct(m, resident, choice, early))
