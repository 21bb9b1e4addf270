"""Property tests for training steps over random differentiable DAGs: at any budget (or the
advertised minimum when it is below), the plan verifies, measured peak <= budget, and the
outputs and every gradient equal eager's bit for bit; saved values are kept, fetched back or
recomputed before each backward use (the independent verifier checks every read).

The backward starts from a gradient per output laid out as that output and held by the caller
(``torch.autograd.backward(outputs, grads)``): what memsched's trace of the backward assumes
(README, "Training inside a budget"). A loss computed from non-scalar outputs can hand back
gradients in other layouts (a transposed output's gradient comes back row-major from a mean of
squares), and autograd then sums into them in place or not by who holds them: reductions of
such sums may round differently from eager's. The zoo's training tests cover the scalar loss."""
from __future__ import annotations

import copy
import warnings

import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

import memsched
from random_graphs import DagSpec, make_case, random_dags
from test_properties import SETTINGS, _hardware

dags = random_dags(bare_weight_outputs=False)
fractions = st.one_of(st.floats(min_value=0.05, max_value=1.1), st.floats(min_value=0.5, max_value=1.0))


def _output_grads(outputs) -> list:
    """A gradient per output that takes one, laid out as the output (seeded: eager and memsched get the same)."""
    g = torch.Generator().manual_seed(0)
    return [torch.empty_strided(o.shape, o.stride(), dtype=o.dtype).copy_(torch.randn(o.shape, generator=g))
            for o in outputs if o.requires_grad]


def _backward(outputs) -> None:
    torch.autograd.backward([o for o in outputs if o.requires_grad], _output_grads(outputs))


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


# an output that is a transposed view of a value the other output reads, and a bias added to a
# transposed input: the sums at that value take the layout of the gradient handed in
TRANSPOSED_OUTPUT = DagSpec(
    seed=64921, inputs=[(8, 96), (8, 96)], weights=[(96, 16), (16, 96), (8,), (8, 96), (96, 96)],
    ops=[("add", 1, 1), ("sub", 2, 0), ("matmul", 1, 0), ("matmul", 4, 1), ("rows", 4, 0, 8), ("wval", 1, True),
         ("t", 1), ("t", 7), ("bias", 8, 2), ("mm", 3, 10), ("wval", 1, True), ("matmul", 11, 3), ("mm", 10, 4),
         ("center", 13), ("matmul", 15, 4), ("matmul", 14, 1), ("t", 15)],
    outputs=[18, 16],
    shapes=[(8, 96), (8, 96), (8, 96), (8, 96), (8, 16), (8, 96), (8, 16), (96, 16), (96, 8), (16, 96), (96, 8),
            (8, 8), (96, 16), (8, 96), (96, 16), (8, 96), (8, 96), (96, 96), (96, 8)])


@settings(max_examples=25, **SETTINGS)
@given(case=dags, frac=fractions, host_bytes=st.sampled_from([0, 10**9, 32 << 10]))
@example(case=make_case(TRANSPOSED_OUTPUT), frac=0.99999, host_bytes=0)
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
        got, want = cm(*case.args), ref(*case.args)
        _backward(got)
        _backward(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)
        _grads_equal(ref, model)
        assert cm.plan.verify() <= budget
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()
