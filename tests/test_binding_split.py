"""The planner splits the segments where the minimum binds into single steps
(pipeline._split_where_binding), so the fixed bytes there are counted per op: the minimum falls
below the uniform cut's to within a few percent of the floor on these models, and a training
step at that minimum runs as eager, within it."""
from __future__ import annotations

import warnings

import pytest

import memsched
from memsched.passes.segments import make_segments, split_binding
from helpers import FIXED_CPU, assert_step_matches_eager
from train_zoo import build_train

import numpy as np


def _plans(name):
    model, args, kwargs, loss_fn = build_train(name)
    # whole ops only (no module or loss runs on slices): the segments' refinement is what is tested
    kw = dict(example_kwargs=kwargs, train=True, hardware=FIXED_CPU, chunk_ops=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p0 = memsched.plan(model, args, budget=10**13, **kw)
        with pytest.raises(memsched.InfeasibleBudgetError) as err:
            memsched.plan(model, args, budget=p0.placement.floor_bytes - 1, **kw)
        refined = err.value.min_budget_bytes
        plan = memsched.plan(model, args, budget=refined, **kw)
    return model, args, kwargs, loss_fn, p0, plan


def _uniform_minimum(plan) -> int:
    """The minimum on the default uniform cut alone (no split where it binds)."""
    from memsched.cost_models.op_cost import estimate_op_time
    from memsched.passes.placement.problem import PlacementModel
    from memsched.pipeline import DEFAULT_MAX_SEGMENTS, cut_segments

    program = plan.program
    nodes = {n.name: n for n in plan.history[0].graph.graph.nodes}
    step_time = np.array([estimate_op_time(nodes[name], FIXED_CPU) for name in program.steps])
    segments = cut_segments(program, step_time, DEFAULT_MAX_SEGMENTS)
    return PlacementModel(program, segments, step_time, FIXED_CPU, plan.budget_bytes).min_budget()


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_the_minimum_below_the_uniform_cuts_trains_as_eager(name):
    model, args, kwargs, loss_fn, p0, plan = _plans(name)
    floor = p0.placement.floor_bytes
    assert plan.budget_bytes == p0.min_budget_bytes       # the minimum a plan reports
    assert plan.budget_bytes < _uniform_minimum(p0)       # lower than the uniform cut reaches
    assert plan.budget_bytes <= 1.02 * floor                # at the floor, give or take 2%
    assert plan.peak_device_bytes <= plan.budget_bytes
    assert "refined" in next(r.note for r in plan.passes if r.name == "segments")
    assert_step_matches_eager(model, args, kwargs, loss_fn, plan)


def test_split_binding_cuts_only_the_binding_segments():
    segments = make_segments(np.ones(12), np.zeros(12), 3)          # steps 0-3, 4-7, 8-11
    finer = split_binding(segments, np.array([5.0, 9.0, 9.0]), limit=100)
    assert finer.bounds == (0, 4, 5, 6, 7, 8, 9, 10, 11, 12)
    assert finer.seg(6) == 3 and finer.seg(2) == 0 and finer.seg(12) == finer.count - 1
    assert split_binding(finer, np.array([1.0] + [9.0] * 8), limit=100) is None   # single steps already
    assert split_binding(segments, np.array([5.0, 9.0, 9.0]), limit=5) is None     # past the limit
