"""Shared test helpers: compare outputs exactly, and compile-run-check a model at a budget."""
from __future__ import annotations

import torch
import torch.utils._pytree as pytree

import memsched
from memsched.cost_models.hardware import Hardware

# A 2-core CPU as memsched.local_hardware measured one (rounded). Tests that assert what a plan
# does (offload to disk rather than recompute, say) use it rather than this machine's calibrated
# profile: plans are priced from the profile, so a busier or faster machine would plan otherwise.
FIXED_CPU = Hardware(name="fixed:cpu", device_type="cpu", device_bytes=24 << 30, host_bytes=0,
                     peak_flops=3.3e11, peak_flops_fp32=1.5e11, mem_bw=1.0e10, h2d_bw=5.0e9,
                     d2h_bw=5.0e9, disk_read_bw=1.1e9, disk_write_bw=8.9e8, op_overhead_s=6e-6,
                     source="fixed test profile (a measured 2-core CPU, rounded)")


def assert_outputs_equal(actual, expected) -> None:
    """Every tensor leaf bit-for-bit equal (plans here only move tensors, never recompute)."""
    a_leaves, a_spec = pytree.tree_flatten(actual)
    e_leaves, e_spec = pytree.tree_flatten(expected)
    assert a_spec == e_spec, f"output structure differs: {a_spec} vs {e_spec}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"leaf {i}: expected a tensor"
            assert a.shape == e.shape and a.dtype == e.dtype, f"leaf {i}: {a.shape}/{a.dtype} vs {e.shape}/{e.dtype}"
            assert torch.equal(a, e), f"leaf {i}: values differ (max {float((a.float() - e.float()).abs().max())})"
        else:
            assert a == e, f"leaf {i}: {a!r} != {e!r}"


def eager(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


def unconstrained_plan(model, args, kwargs, **kw):
    return memsched.plan(model, args, budget=10**13, example_kwargs=kwargs, **kw)


def assert_same_grads(ref, model) -> None:
    """Every parameter's .grad bit-for-bit equal to the reference model's (None where it is None)."""
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        if p.grad is None:
            assert q.grad is None, f"{name}: memsched produced a gradient eager did not"
            continue
        assert q.grad is not None, f"{name}: no gradient"
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


def assert_step_matches_eager(model, args, kwargs, loss_fn, plan, **options) -> list[str]:
    """One training step of ``model`` compiled at ``plan``'s budget (the fixed profile) equals
    eager bit for bit (loss and grads), verified and within the budget as run. Returns the
    node names of the schedule it ran."""
    import copy
    import warnings

    ref = copy.deepcopy(model)
    torch.manual_seed(0)
    want = loss_fn(ref(*args, **kwargs))
    want.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, plan.budget_bytes, train=True, device="cpu", hardware=FIXED_CPU, **options)
    try:
        torch.manual_seed(0)
        loss = loss_fn(cm(*args, **kwargs))
        loss.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=0, atol=0)
        assert_same_grads(ref, model)
        assert cm.plan.verify() <= plan.budget_bytes
        assert cm.stats.peak_device_bytes <= plan.budget_bytes
        return [n.name for n in cm.plan.graph.graph.nodes]
    finally:
        cm.close()


class LossOnly(torch.nn.Module):
    """A causal LM whose training forward returns the loss alone (what lets the logits go)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels):
        return self.lm(input_ids=input_ids, labels=labels).loss


def assert_step_close_to_eager(model, args, budget):
    """One training step of ``model(*args)`` (a scalar loss) compiled at ``budget`` on the fixed
    profile: loss and gradients close to eager (summation order may differ: a split sums its
    slices), the measured and verified peaks within the budget. Returns the plan it ran."""
    import copy
    import warnings

    ref = copy.deepcopy(model)
    want = ref(*args)
    want.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, budget, train=True, device="cpu", hardware=FIXED_CPU)
    try:
        loss = cm(*args)
        loss.backward()
        assert cm.stats.peak_device_bytes <= budget and cm.plan.verify() <= budget
        torch.testing.assert_close(loss, want)
        for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
        return cm.plan
    finally:
        cm.close()


def forbid_solver(monkeypatch) -> None:
    """From here on, a call of the placement solver fails the test (plan first, then re-apply)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the solver was called for a saved plan")

    import memsched.passes.placement as placement
    import memsched.pipeline as pipeline

    monkeypatch.setattr(placement, "solve_placement", refuse)
    monkeypatch.setattr(pipeline, "solve_placement", refuse)


class WritesWhereAny(torch.nn.Module):
    """``if mask.any(): x[mask] = v``, as Wav2Vec2's pretraining masks negatives equal to the
    positive: the write the branch skips would write nothing."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, mask):
        y = self.lin(x)
        if mask.any():
            y[mask] = float("-inf")
        return y.softmax(-1)


class ScalesWhereAny(WritesWhereAny):
    """The way in also scales x: the branch changes the result, and stays refused (the mask is
    made from an activation: one made from the inputs alone decides the branch, a guard)."""

    def forward(self, x, mask):
        y = self.lin(x)
        mask = mask & (y > 0)
        if mask.any():
            y = y * 2
            y[mask] = 0.0
        return y


class ChecksItsValues(torch.nn.Module):
    """Branches on data whose one way only raises: taken as asserts. (Written here, not in a test
    module: pytest rewrites a test module's ``assert`` into branches of its own.)"""

    def forward(self, x, labels):
        if labels is not None and labels.max() >= 3:   # as every CTC head checks its labels
            raise ValueError(f"label out of range: {labels.max()}")
        if not (x > -100).all():
            raise ValueError("x too small")
        assert x.abs().sum(), "all zeros"
        n = (x > 0).nonzero().size(0)
        if n > x.numel():   # a size made from data, a symbolic bool
            raise RuntimeError("impossible")
        return x * 2 + labels.sum()
