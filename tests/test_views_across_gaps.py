"""A storage held by several live values (a weight and its transpose, a fused projection and
the heads split from it) moves as one tensor, its root; the other values are rebuilt as views
of it when it is back. Before, such a storage stayed on the device from the forward to the
backward, so a training step's minimum held every weight and most saved activations."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import memsched
from memsched.ir import ops
from memsched.ir.meta import info
from memsched.passes.placement import KEEP
from memsched.ir.kinds import Kind
from memsched.passes.analysis import Program, Storage, Value
from memsched.passes.views import Restore, live_across, restores_of
from helpers import FIXED_CPU, assert_step_matches_eager
from train_zoo import build_train


def _plan(model, args, kwargs, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.plan(model, args, budget=budget, example_kwargs=kwargs, train=True, hardware=FIXED_CPU, **kw)


def _minimum(name):
    model, args, kwargs, loss_fn = build_train(name)
    lo = _plan(model, args, kwargs, 10**13).min_budget_bytes
    return model, args, kwargs, loss_fn, _plan(model, args, kwargs, lo)


def _moved_with_views(plan):
    pl = plan.placement
    return [g for g in pl.gaps if g.rebuild and pl.gap_choice[g.id] != KEEP]


def test_a_gap_moves_its_root_and_rebuilds_the_live_views():
    model, args, kwargs, _, plan = _minimum("gpt2_dropout")
    program, pl = plan.program, plan.placement
    moved = _moved_with_views(plan)
    # weights read through their transposes, and activations split into heads, both move
    assert any(g.persistent for g in moved) and any(not g.persistent for g in moved)
    for g in pl.gaps:
        b = program.storages[g.buffer]
        if g.deliver:
            continue
        live = live_across(program, b, g.start, g.end)
        assert set(live) == set(g.aliases) | ({g.value} & set(live))
        assert set(g.aliases) <= set(g.rebuild)
        if g.persistent:
            assert g.value == b.values[0]  # a refetch restores the model tensor itself
        for v in g.rebuild:  # each rebuilt value is a view of the root, made by one view op
            x = v
            while x != g.value:
                x = program.view_of[x]
    # in the scheduled program, each rebuilt view is re-made from the restored root
    again = [n for n in plan.graph.graph.nodes if n.op == "call_function" and info(n).restores is not None
             and not ops.is_inserted(n)]
    rebuilt = [n for n in again if info(n).made_by == "placement"]
    assert rebuilt and all(info(n).restores in program.view_of and "_again" in n.name for n in rebuilt)


def _program(values, view_of, kind=Kind.ACTIVATION):
    """A program of one storage whose values are ``values`` (name -> (step, last use, single
    tensor, fills)), ``view_of`` saying which value each is a view of."""
    vals = {n: Value(n, st, lu, (0,), single, fills) for n, (st, lu, single, fills) in values.items()}
    b = Storage(0, next(iter(values)), 1024, kind, False, (0, 10), tuple(values))
    return Program(("op",), (b,), vals, np.zeros(1), view_of=view_of), b


def test_a_storage_moves_through_one_root_with_its_views_rebuilt():
    """Two heads split from a projection, live across two gaps: both gaps move the projection
    (the root, held) and re-make the heads on it; intermediate views are rebuilt too."""
    p, b = _program({"qkv": (0, 1, True, True), "split": (1, 1, False, False), "q": (2, 9, True, False),
                     "k": (3, 9, True, False)}, {"split": "qkv", "q": "split", "k": "split"})
    first, second = restores_of(p, b, [["q", "k"], ["k"]])
    assert first == Restore("qkv", ("split", "q", "k"), ("q", "k"), held=True)
    assert second == Restore("qkv", ("split", "k"), ("k",), held=True)
    # a weight read through its transpose: refetched itself, the transpose re-made
    p, w = _program({"w": (-1, 3, True, True), "t": (0, 9, True, True)}, {"t": "w"}, kind=Kind.WEIGHT)
    assert restores_of(p, w, [["t"]]) == [Restore("w", ("t",), ("t",), held=True)]


def test_without_a_common_root_single_values_move_as_they_are():
    """``y`` is no view of ``x`` (an op that only happens to share the storage is not in
    ``view_of``): the gap where ``x`` alone is live moves it unheld; the one where both are
    live stays on the device (None). A weight's transpose with no path to the weight stays."""
    p, b = _program({"x": (0, 9, True, True), "y": (1, 9, True, False)}, {})
    assert restores_of(p, b, [["x"], ["x", "y"]]) == [Restore("x", (), ()), None]
    p, w = _program({"w": (-1, 0, True, True), "t": (0, 9, True, True)}, {}, kind=Kind.WEIGHT)
    assert restores_of(p, w, [["t"]]) == [None]


def test_the_zoo_s_gaps_restore_exactly_their_live_values():
    model, args, kwargs, _, plan = _minimum("mlp")
    program = plan.program
    seen = {"held": 0, "single": 0}
    for b in program.storages:
        spans = [(a, c) for a, c in zip(b.events, b.events[1:]) if c - a > 1 and a >= 0]
        lives = [live_across(program, b, a, c) for a, c in spans]
        for live, r in zip(lives, restores_of(program, b, lives)):
            assert r is not None
            if r.held:
                seen["held"] += 1
                assert program.values[r.root].fills and set(r.aliases) == set(live) - {r.root}
            else:
                seen["single"] += 1
                assert [r.root] == live and program.values[r.root].single_tensor
    assert seen["held"] and seen["single"]


@pytest.mark.parametrize("name", ["gpt2_dropout", "llama"])
def test_training_at_the_minimum_with_moved_views_matches_eager(name):
    model, args, kwargs, loss_fn, plan = _minimum(name)
    assert _moved_with_views(plan)
    assert_step_matches_eager(model, args, kwargs, loss_fn, plan)


def _inference_with_moved_views():
    """T5 (inference) given an attention mask, at 25% of its peak: a position bias and masks
    are moved with their views (a permute, an expand) and rebuilt."""
    from zoo import build

    model, args, kwargs = build("t5")
    # a mask given is traced, so its expanded views exist (with none, none is built)
    kwargs = dict(kwargs, attention_mask=torch.ones_like(kwargs["input_ids"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peak = memsched.plan(model, args, budget=10**12, example_kwargs=kwargs, hardware=FIXED_CPU).program.peak_bytes
        plan = memsched.plan(model, args, budget=int(0.25 * peak), example_kwargs=kwargs, hardware=FIXED_CPU)
    assert _moved_with_views(plan)
    return model, args, kwargs, plan


def test_a_saved_plan_with_rebuilt_views_reapplies(tmp_path):
    from helpers import assert_outputs_equal, eager

    model, args, kwargs, plan = _inference_with_moved_views()
    plan.save(tmp_path / "plan.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, plan=tmp_path / "plan.json", device="cpu")
    try:
        assert_outputs_equal(cm(*args, **kwargs), eager(model, args, kwargs))
        assert [p.name for p in cm.plan.passes][-1] == "apply"
        assert str(cm.plan).splitlines()[2:] == str(plan).splitlines()[2:]
        assert cm.stats.peak_device_bytes <= plan.budget_bytes
    finally:
        cm.close()


def test_a_rebuilt_view_that_reads_something_else_is_refused(tmp_path):
    """An added compute node must re-run the captured node it is named after, on the same
    (restored) arguments: a file that points one elsewhere is refused before anything runs."""
    import json

    from memsched.io.reapply import PlanMismatchError
    from memsched.io.serialize import dumps

    model, args, kwargs, plan = _inference_with_moved_views()
    doc = json.loads(dumps(plan))
    nodes = doc["program"]["nodes"]
    i = next(i for i, n in enumerate(nodes) if "_again" in n["name"] and n.get("args"))
    earlier = next(n["name"] for n in reversed(nodes[:i]) if n["op"] == "call_function"
                   and n["target"].startswith("aten") and n["name"] != nodes[i]["args"][0].get("node"))
    nodes[i]["args"][0] = {"node": earlier}
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((PlanMismatchError, ValueError)) as err:
            memsched.compile(model, plan=tmp_path / "bad.json", device="cpu")(*args, **kwargs)
    assert "_again" in str(err.value) or "reads" in str(err.value)


def test_finer_segments_are_used_when_the_budget_asks_for_them():
    """Below the minimum of the default cut, the planner cuts finer (up to 4x as many segments)
    rather than refusing; the minimum it reports is the lowest of the cuts."""
    import re

    from memsched import pipeline as P
    from memsched.passes.placement.problem import PlacementModel

    torch.manual_seed(0)
    layers = []
    for _ in range(40):
        layers += [torch.nn.Linear(64, 64), torch.nn.Tanh()]
    model = torch.nn.Sequential(*layers).train()
    args = (torch.randn(16, 64),)
    s = P.PlanningState(10**13, FIXED_CPU, 32, model=model, args=args, train=True)
    P.capture_pass(s)
    P.analysis_pass(s)
    only_32 = PlacementModel(s.program, P.cut_segments(s.program, s.step_time, 32), s.step_time, FIXED_CPU, 0)
    lo = _plan(model, args, {}, 10**13, max_segments=32).min_budget_bytes
    assert lo < only_32.min_budget()
    plan = _plan(model, args, {}, lo, max_segments=32)
    note = next(p.note for p in plan.passes if p.name == "segments")
    assert re.fullmatch(r"\d+ \(refined from 32\)", note), note
    assert plan.verify() <= lo and plan.peak_device_bytes <= lo
    with pytest.raises(memsched.InfeasibleBudgetError) as err:
        _plan(model, args, {}, lo - 1, max_segments=32)
    assert err.value.min_budget_bytes == lo
