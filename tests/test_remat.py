"""Rematerialization under fusion (memsched/passes/remat.py): a fused training step recomputes in
the backward the pointwise values that are cheaper to recompute than to save."""
from __future__ import annotations

import copy
import os
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from helpers import FIXED_CPU  # noqa: E402
from random_graphs import random_dags  # noqa: E402

import memsched  # noqa: E402
from memsched.frontend.joint import capture_joint  # noqa: E402
from memsched.ir.kinds import PERSISTENT  # noqa: E402
from memsched.ir.meta import info  # noqa: E402
from memsched.ir.ops import Op, op_of  # noqa: E402
from memsched.ir.tensors import storages  # noqa: E402
from memsched.passes.remat import rematerialize  # noqa: E402
from memsched.verify import verify_schedule  # noqa: E402

TOL = dict(rtol=1e-4, atol=1e-5)   # fusion reorders float sums (tests/test_fusion.py)


class TanhGeluMLP(torch.nn.Module):
    """GPT-2's MLP: autograd saves the input, tanh, 0.5*x, 1+tanh and the output of its GELU."""

    def __init__(self, d=32):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.up(x)
        g = 0.5 * h * (1.0 + torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0))))
        return x + self.down(g)


def _model(n=2, d=32):
    torch.manual_seed(0)
    return torch.nn.Sequential(*[TanhGeluMLP(d) for _ in range(n)]).train()


def _saved(gm) -> set[str]:
    """Forward values the backward reads."""
    nodes = list(gm.graph.nodes)
    cut = next(i for i, n in enumerate(nodes) if op_of(n) is Op.BOUNDARY)
    forward = set(nodes[:cut])
    return {x.name for n in nodes[cut + 1:] for x in n.all_input_nodes if x in forward and x.op != "placeholder"}


def _weights(captured) -> set[str]:
    return {p.name for p in captured.placeholders if p.kind in PERSISTENT}


def _saved_storages(gm) -> set:
    """Storages of the forward values the backward reads (a view of a saved one adds none)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    return {k for name in _saved(gm) for k, _ in storages(by_name[name].meta.get("val"))}


def _plan(model, args, budget=10**9, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.plan(model, args, budget=budget, hardware=FIXED_CPU, train=True, **kw)


def test_gelu_intermediates_are_recomputed_not_saved():
    """The tanh, 0.5*x and 1+tanh of each GELU are rebuilt in the backward from its input, which
    is saved anyway; the output (read by the down projection's weight gradient, a library op)
    stays saved. Nothing new is saved, and every clone runs after the boundary."""
    model, x = _model(), torch.randn(4, 16, 32)
    captured = capture_joint(model, (x,), {})
    before = _saved(captured.gm)
    gm, done = rematerialize(captured.gm, FIXED_CPU, _weights(captured))
    after = _saved(gm)
    assert after < before and _saved(captured.gm) == before   # a new program; the capture's is as it was
    assert len(done.values) == 6 and done.nbytes == 6 * 4 * 16 * 128 * 4
    assert len(before - after) == len(done.values)   # tanh is saved through a detach of it
    nodes = list(gm.graph.nodes)
    cut = next(i for i, n in enumerate(nodes) if op_of(n) is Op.BOUNDARY)
    clones = [i for i, n in enumerate(nodes) if info(n).made_by == "remat"]
    assert len(clones) == done.ops and min(clones) > cut
    assert all(n.name.endswith("_again") or "_again_" in n.name for n in nodes if info(n).made_by == "remat")


def test_fused_step_saves_less_and_matches_eager():
    """Planned with fuse=True the step's unconstrained peak is lower than without, and loss and
    gradients equal eager's within the fusion tolerances."""
    model, x = _model(), torch.randn(4, 16, 32)
    plain, fused = _plan(model, (x,)), _plan(model, (x,), fuse=True)
    assert "recomputed in the backward" in dict((r.name, r.note) for r in fused.passes)["remat"]
    assert fused.unconstrained.peak_device_bytes < plain.unconstrained.peak_device_bytes
    assert dict((r.name, r.note) for r in plain.passes)["remat"] == "off"
    ref = copy.deepcopy(model)
    want = ref(x).square().mean()
    want.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, 10**9, device="cpu", hardware=FIXED_CPU, train=True, fuse=True)
    got = cm(x).square().mean()
    got.backward()
    torch.testing.assert_close(got.detach(), want.detach(), **TOL)
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **TOL, msg=lambda m: f"{name}: {m}")
    after = next(h for h in cm.plan.history if h.name == "remat")
    assert any(info(n).made_by == "remat" for n in after.graph.graph.nodes)
    cm.close()


def test_inference_and_unfused_steps_are_left_alone():
    model, x = _model(), torch.randn(4, 16, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inference = memsched.plan(model.eval(), (x,), budget=10**9, hardware=FIXED_CPU, fuse=True)
    notes = dict((r.name, r.note) for r in inference.passes)
    assert notes["remat"] == ""
    assert not any(info(n).made_by == "remat" for n in inference.graph.graph.nodes)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=random_dags(bare_weight_outputs=False), frac=st.floats(0.0, 1.2))
def test_random_training_steps_rematerialize_within_budget(case, frac):
    """Any training step, any budget from its minimum up: after rematerialization the saved set
    only shrinks, and the fused plan passes the independent verifier within the budget."""
    case.model.requires_grad_(True)
    if not any(o.requires_grad for o in case.model(*case.args)):
        return
    captured = capture_joint(case.model, case.args, {}, grad_outputs="all")
    before = _saved_storages(captured.gm)
    gm, _ = rematerialize(captured.gm, FIXED_CPU, _weights(captured))
    assert _saved_storages(gm) <= before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        free = memsched.plan(case.model, case.args, budget=10**12, hardware=FIXED_CPU, time_limit_s=1.0,
                             train=True, grad_outputs="all", fuse=True)
        low, high = free.min_budget_bytes, free.unconstrained.peak_device_bytes
        budget = int(low + frac * max(high - low, 0))
        plan = memsched.plan(case.model, case.args, budget=budget, hardware=FIXED_CPU, time_limit_s=1.0,
                             train=True, grad_outputs="all", fuse=True)
    assert verify_schedule(plan.graph, budget) <= budget


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_transformers_training_steps_with_remat(name):
    """Real architectures: the fused step's unconstrained peak is no higher than the plain one's,
    and the plan at 70% of it verifies within its budget."""
    pytest.importorskip("transformers")
    from train_zoo import build_train

    model, args, kwargs, _ = build_train("llama" if name == "llama" else "gpt2_dropout")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = memsched.plan(model, args, budget=10**12, example_kwargs=kwargs, hardware=FIXED_CPU, train=True)
        fused = memsched.plan(model, args, budget=10**12, example_kwargs=kwargs, hardware=FIXED_CPU, train=True,
                              fuse=True)
        assert fused.program.peak_bytes <= plain.program.peak_bytes
        budget = max(int(0.7 * fused.program.peak_bytes), fused.min_budget_bytes)
        tight = memsched.plan(model, args, budget=budget, example_kwargs=kwargs, hardware=FIXED_CPU, train=True,
                              fuse=True)
    assert tight.verify() <= budget


def _problem(model, args, fuse):
    from memsched.pipeline import PlanningState, analysis_pass, capture_pass, remat_pass, segments_pass

    s = PlanningState(budget=10**9, hw=FIXED_CPU, model=model, args=args, train=True, fuse=fuse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in (capture_pass, remat_pass, analysis_pass, segments_pass):
            run(s)
    m = s.placement_model
    return {m.gaps[g].value: secs for g, (secs, *_rest) in m.recompute.items()}


def test_pointwise_recomputation_is_priced_as_fused():
    """With fusion, recomputing a value through pointwise ops costs their arithmetic and one
    write (the ops join the region that reads it), never more than the ops run one by one."""
    model, x = _model(), torch.randn(4, 16, 32)
    plain, fused = _problem(model, (x,), False), _problem(model, (x,), True)
    both = plain.keys() & fused.keys()
    assert both
    assert all(fused[v] <= plain[v] for v in both)
    assert any(fused[v] < 0.5 * plain[v] for v in both)


@pytest.mark.parametrize("name", ["mlp_stack", "gpt2_dropout"])
def test_recomputation_never_raises_the_minimum(name):
    """Below the rematerialized program's minimum the plain one is cut too and the lower minimum
    kept: fuse=True never needs more memory than fuse=False."""
    if name == "mlp_stack":
        model, args, kwargs = _model(), (torch.randn(4, 16, 32),), {}
    else:
        pytest.importorskip("transformers")
        from train_zoo import build_train

        model, args, kwargs, _ = build_train(name)
    minima = {}
    for fuse in (False, True):
        with warnings.catch_warnings(), pytest.raises(memsched.InfeasibleBudgetError) as err:
            warnings.simplefilter("ignore")
            memsched.plan(model, args, budget=1, example_kwargs=kwargs, hardware=FIXED_CPU, train=True, fuse=fuse)
        minima[fuse] = err.value.min_budget_bytes
    assert minima[True] <= minima[False]
