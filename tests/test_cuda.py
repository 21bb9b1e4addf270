"""CUDA runtime: streams per direction, pinned host pool, disk through pinned staging.
Skipped where there is no GPU (CI never has one)."""
from __future__ import annotations

import pytest
import torch

import memsched
from helpers import unconstrained_plan
from zoo import build

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit"])
@pytest.mark.parametrize("fraction, host", [(1.0, False), (0.5, True), (0.5, False), ("min", False)])
def test_cuda_within_budget(name, fraction, host, tmp_path):
    model, args, kwargs = build(name)
    with torch.no_grad():
        ref = model.cuda()(*[a.cuda() for a in args], **{k: v.cuda() for k, v in kwargs.items()})
    model.cpu()
    hw = memsched.get_hardware(None, "cuda")
    hw = hw.replace(host_bytes=10**9 if host else 0)
    base = unconstrained_plan(model, args, kwargs, hardware=hw)
    budget = base.min_budget_bytes if fraction == "min" else int(base.unconstrained.peak_device_bytes * fraction)
    cm = memsched.compile(model, budget, device="cuda", hardware=hw, offload_dir=tmp_path)
    out = cm(*args, **kwargs)
    leaf = lambda o: o.logits if hasattr(o, "logits") else o.last_hidden_state  # noqa: E731
    torch.testing.assert_close(leaf(out), leaf(ref))
    assert cm.stats.peak_device_bytes <= budget
    if fraction != 1.0:
        moved = cm.stats.bytes_moved
        assert moved.get("h2d", 0) > 0
        if not host:
            assert moved.get("disk_read", 0) > 0
    cm.close()


def test_cuda_runs_a_saved_plan_without_solving(tmp_path, monkeypatch):
    """A plan made without a GPU (memsched.plan on the T4 preset), saved, then run on CUDA."""
    model, args, kwargs = build("gpt2")
    with torch.no_grad():
        ref = model.cuda()(*[a.cuda() for a in args], **{k: v.cuda() for k, v in kwargs.items()})
    model.cpu()
    base = unconstrained_plan(model, args, kwargs, hardware="t4")
    plan = memsched.plan(model, args, budget=base.min_budget_bytes, example_kwargs=kwargs, hardware="t4")
    plan.save(tmp_path / "plan.json")

    def refuse(*a, **k):
        raise AssertionError("the solver was called for a saved plan")

    from memsched import pipeline
    from memsched.passes import placement

    monkeypatch.setattr(placement, "solve_placement", refuse)
    monkeypatch.setattr(pipeline, "solve_placement", refuse)
    cm = memsched.compile(model, plan=tmp_path / "plan.json", device="cuda", offload_dir=tmp_path)
    out = cm(*args, **kwargs)
    torch.testing.assert_close(out.logits, ref.logits)
    assert cm.stats.peak_device_bytes <= plan.budget_bytes
    assert cm.stats.bytes_moved.get("h2d", 0) > 0
    cm.close()
