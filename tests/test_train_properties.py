"""Property tests for training steps over random differentiable DAGs: at any budget (or the
advertised minimum when it is below), the plan verifies, measured peak <= budget, and the
loss and every gradient equal eager's bit for bit; saved values are kept, fetched back or
recomputed before each backward use (the independent verifier checks every read)."""
from __future__ import annotations

import copy
import warnings

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import memsched
from random_graphs import random_dags
from test_properties import SETTINGS, _hardware

dags = random_dags(bare_weight_outputs=False)
fractions = st.one_of(st.floats(min_value=0.05, max_value=1.1), st.floats(min_value=0.5, max_value=1.0))


def _loss(outputs):
    return sum((o.float() * (i + 1)).square().mean() for i, o in enumerate(outputs) if o.requires_grad)


def _differentiable(model, args) -> bool:
    out = model(*args)
    return any(o.requires_grad for o in out)


def _grads_equal(ref, model):
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        if p.grad is None:
            assert q.grad is None or not q.grad.any(), f"{name}: gradient where eager has none"
            continue
        assert q.grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{name}: {m}")


@settings(max_examples=25, **SETTINGS)
@given(case=dags, frac=fractions, host_bytes=st.sampled_from([0, 10**9, 32 << 10]))
def test_random_training_step(case, frac, host_bytes):
    model = case.model
    model.requires_grad_(True)
    assume(_differentiable(model, case.args))
    hw = _hardware(host_bytes)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p0 = memsched.plan(model, case.args, budget=10**12, hardware=hw, train=True)
        budget = max(int(frac * p0.program.peak_bytes), p0.min_budget_bytes)
        cm = memsched.compile(model, budget, train=True, device="cpu", hardware=hw, time_limit_s=1.0)
    try:
        loss = _loss(cm(*case.args))
        loss.backward()
        want = _loss(ref(*case.args))
        want.backward()
        torch.testing.assert_close(loss, want, rtol=0, atol=0, equal_nan=True)
        _grads_equal(ref, model)
        assert cm.plan.verify() <= budget
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()
