"""Every zoo model at 100%, 50%, 25% of its unconstrained peak and at its minimum budget:
outputs equal eager bit for bit, the measured device peak stays within the budget, the plan
passes the independent verifier, and weights stream from disk when they do not fit."""
from __future__ import annotations

import pytest
import torch

import memsched
from helpers import assert_outputs_equal, eager, unconstrained_plan
from zoo import ZOO, build

FRACTIONS = [1.0, 0.5, 0.25, "min"]


@pytest.fixture(scope="module")
def cases():
    cache = {}

    def get(name):
        if name not in cache:
            model, args, kwargs = build(name)
            ref = eager(model, args, kwargs)
            base = unconstrained_plan(model, args, kwargs)
            cache[name] = (model, args, kwargs, ref, base)
        return cache[name]

    return get


@pytest.mark.parametrize("fraction", FRACTIONS, ids=str)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_within_budget(cases, name, fraction):
    model, args, kwargs, ref, base = cases(name)
    peak = base.unconstrained.peak_device_bytes
    budget = base.min_budget_bytes if fraction == "min" else int(peak * fraction)
    if budget < base.min_budget_bytes:
        # below the minimum of the whole modules: it fits by running some on slices of their
        # input (passes/chunking.py), or it is refused before anything runs, with a minimum
        # the splits can only have lowered
        try:
            cm = memsched.compile(model, budget, device="cpu", example_inputs=args, example_kwargs=kwargs)
        except memsched.InfeasibleBudgetError as err:
            assert budget < err.min_budget_bytes <= base.min_budget_bytes
            return
        assert cm.plan.chunking and cm.plan.min_budget_bytes < base.min_budget_bytes
    else:
        cm = memsched.compile(model, budget, device="cpu")
    out = cm(*args, **kwargs)
    if cm.plan.chunking:
        # a convolution on a batch slice may pick another kernel blocking than on the whole
        # batch (oneDNN chooses by shape): the same sums in another order, close not equal
        torch.testing.assert_close(out, ref)
    else:
        assert_outputs_equal(out, ref)
    stats, plan = cm.stats, cm.plan
    assert stats.peak_device_bytes <= budget
    assert plan.verify() <= budget
    assert stats.peak_device_bytes == plan.peak_device_bytes  # measured equals predicted
    weight_bytes = sum(plan.tier_bytes().values())
    if budget < weight_bytes:
        assert plan.tier_bytes()["disk"] > 0 and stats.bytes_moved.get("disk_read", 0) > 0
    if fraction == 1.0:
        assert not stats.bytes_moved, "nothing should move when everything fits"
    # a second call reuses the plan and gives the same answer
    assert_outputs_equal(cm(*args, **kwargs), out)
    cm.close()


@pytest.mark.parametrize("name", ["gpt2", "vit"])
def test_host_tier_on_cpu(cases, name):
    """With a host tier in the profile, tensors go to host RAM before disk."""
    model, args, kwargs, ref, base = cases(name)
    hw = memsched.get_hardware(None, "cpu").replace(host_bytes=10**9)
    budget = int(base.unconstrained.peak_device_bytes * 0.4)
    cm = memsched.compile(model, budget, device="cpu", hardware=hw)
    assert_outputs_equal(cm(*args, **kwargs), ref)
    assert cm.plan.tier_bytes()["host"] > 0 and cm.plan.tier_bytes()["disk"] == 0
    assert cm.stats.bytes_moved.get("h2d", 0) > 0 and cm.stats.peak_device_bytes <= budget
    cm.close()


def test_minimum_budget_is_tight(cases):
    """One byte under the minimum is refused; the minimum itself runs."""
    model, args, kwargs, ref, base = cases("gpt2")
    with pytest.raises(memsched.InfeasibleBudgetError) as err:
        memsched.plan(model, args, budget=base.min_budget_bytes - 1, example_kwargs=kwargs)
    assert err.value.min_budget_bytes == base.min_budget_bytes
    assert "minimum" in str(err.value)


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "t5"])
def test_plan_on_meta_matches_real(name):
    """memsched.plan works on a model that was never allocated, and plans the same bytes."""
    from zoo import build_meta

    model, args, kwargs = build_meta(name)
    plan = memsched.plan(model, args, budget=10**13, example_kwargs=kwargs)
    real, rargs, rkwargs = build(name)
    real_plan = unconstrained_plan(real, rargs, rkwargs)
    assert plan.unconstrained.peak_device_bytes == real_plan.unconstrained.peak_device_bytes
