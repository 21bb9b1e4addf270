"""CUDA runtime: streams per direction, pinned host pool, disk through pinned staging.
Skipped where there is no GPU (CI never has one)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import memsched
from helpers import forbid_solver, unconstrained_plan
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
    budget = base.min_budget_bytes if fraction == "min" else _fraction_of_peak(base, fraction, hw)
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
    forbid_solver(monkeypatch)
    cm = memsched.compile(model, plan=tmp_path / "plan.json", device="cuda", offload_dir=tmp_path)
    out = cm(*args, **kwargs)
    torch.testing.assert_close(out.logits, ref.logits)
    assert cm.stats.peak_device_bytes <= plan.budget_bytes
    assert cm.stats.bytes_moved.get("h2d", 0) > 0
    cm.close()


# -- the checks a first GPU session runs (benchmarks/gpu_check.sh) --------------------------------
LAG_CYCLES = 20_000_000   # torch.cuda._sleep: tens of ms of GPU spin queued ahead of each call


def _fraction_of_peak(plan, fraction, hw) -> int:
    """A fraction of what the model's own tensors need at the unconstrained peak, plus cuBLAS's
    workspace (held throughout: on the zoo's small models it is most of the peak), and never
    below the minimum."""
    tensors = plan.unconstrained.peak_device_bytes - hw.workspace_bytes
    return max(plan.min_budget_bytes, hw.workspace_bytes + int(fraction * tensors))


def _cuda_hw(host_bytes: int):
    return memsched.get_hardware(None, "cuda").replace(host_bytes=host_bytes)


def _mixed_gpt2(tmp_path):
    """GPT-2 at its minimum with a host tier a third the weights' size: weights and activations
    split between host and disk, so fetches take both paths (pinned pool and disk staging)."""
    model, args, kwargs = build("gpt2")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    hw = _cuda_hw(weights // 3)
    base = unconstrained_plan(model, args, kwargs, hardware=hw)
    cm = memsched.compile(model, base.min_budget_bytes, device="cuda", hardware=hw, offload_dir=tmp_path)
    return cm, args, kwargs


def test_cuda_mixed_plan_with_the_gpu_lagging_is_bit_exact(tmp_path):
    cm, args, kwargs = _mixed_gpt2(tmp_path)
    try:
        first = cm(*args, **kwargs).logits.clone()
        moved = cm.stats.bytes_moved
        assert moved.get("disk_read", 0) > 0 and moved.get("h2d", 0) > moved["disk_read"], moved
        for i in range(20):
            torch.cuda._sleep(LAG_CYCLES)   # the CPU runs ahead: reuse of buffers must wait on events
            out = cm(*args, **kwargs).logits
            assert torch.equal(out, first), f"call {i + 2} differs"
    finally:
        cm.close()


SANITIZED = """
import sys, torch, pathlib, tempfile
sys.path[:0] = ["tests"]
from test_cuda import _mixed_gpt2, LAG_CYCLES
cm, args, kwargs = _mixed_gpt2(pathlib.Path(tempfile.mkdtemp()))
for _ in range(3):
    torch.cuda._sleep(LAG_CYCLES)
    cm(*args, **kwargs)
torch.cuda.synchronize()
cm.close()
print("sanitized run done")
"""


def test_cuda_sanitizer_finds_no_race():
    """The same mixed plan under PyTorch's CUDA sanitizer (CSAN): it raises on an access that is
    not ordered with a write on another stream."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TORCH_CUDA_SANITIZER="1")
    run = subprocess.run([sys.executable, "-c", SANITIZED], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "sanitized run done" in run.stdout, run.stderr[-4000:]
    assert "data race" not in run.stderr, run.stderr[-4000:]


# The plan counts cuBLAS's workspace (made at the first matmul, kept) and the caching allocator's
# 512-byte blocks (tests/test_allocator_counting.py); what it does not plan is op-internal scratch
# (a reduction's or attention's temporaries made and freed inside one kernel call): the slack the
# allocator's peak is allowed over the budget, to be narrowed with the numbers a GPU gives
OP_SCRATCH_SLACK = 4 << 20


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_cuda_allocator_peak_after_warm_up_is_within_the_budget(name, tmp_path):
    model, args, kwargs = build(name)
    hw = _cuda_hw(1 << 30)
    base = unconstrained_plan(model, args, kwargs, hardware=hw)
    budget = _fraction_of_peak(base, 0.5, hw)
    # hard_limit: the allocator itself refuses past the budget (+ segment margin): no false trip
    cm = memsched.compile(model, budget, device="cuda", hardware=hw, offload_dir=tmp_path, hard_limit=True)
    try:
        cm(*args, **kwargs)   # warm-up: cuBLAS workspace, resident weights, pinned buffers
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated()   # resident weights + the workspace (+ anything else)
        planned_held = cm.plan.tier_bytes()["device"] + hw.workspace_bytes
        torch.cuda.reset_peak_memory_stats()
        out = cm(*args, **kwargs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - (held - planned_held)   # bytes not memsched's out
        del out
        assert held >= planned_held, (held, planned_held)   # the workspace was measured, not guessed low
        assert cm.stats.cuda_max_memory_allocated is not None
        assert cm.stats.peak_device_bytes <= budget
        assert peak <= budget + OP_SCRATCH_SLACK, (peak, budget, cm.stats.peak_device_bytes)
    finally:
        cm.close()


def test_cuda_repeated_calls_hold_steady_pinned_and_reserved_bytes(tmp_path):
    cm, args, kwargs = _mixed_gpt2(tmp_path)
    try:
        seen = []
        for _ in range(5):
            cm(*args, **kwargs)
            torch.cuda.synchronize()
            pool = cm._stores.host
            seen.append((pool.bytes_in_use + pool.idle_bytes, torch.cuda.memory_reserved()))
        assert len(set(seen[1:])) == 1, seen   # after the first call, nothing grows
    finally:
        cm.close()


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "gpt2_dropout", "llama", "bert_dropout"])
@pytest.mark.parametrize("fraction", [0.5, "min"])
def test_cuda_training_step_matches_eager(name, fraction, tmp_path):
    """Saved activations offloaded (non-dense views among them: attention's transposes) and
    fetched back on the streams; loss and gradients against eager on the GPU, from the same seed
    (dropout draws the same numbers: the step is traced with CUDA's native_dropout; eager attends
    with the math backend where attention has dropout, as a step planned on a CPU for a GPU does,
    and with its default choice elsewhere, the kernel such a step runs: kernels/attention.py)."""
    import copy

    from train_zoo import build_train

    model, args, kwargs, loss_fn = build_train(name)
    ref = copy.deepcopy(model).cuda()
    on = lambda x: x.cuda() if isinstance(x, torch.Tensor) else x  # noqa: E731
    torch.manual_seed(0)
    # as memsched's step attends: the math path where attention has dropout, else eager's own choice
    with sdpa_kernel([SDPBackend.MATH]) if "dropout" in name else contextlib.nullcontext():
        want = loss_fn(ref(*map(on, args), **{k: on(v) for k, v in kwargs.items()}))
        want.backward()
    hw = _cuda_hw(1 << 30)
    base = memsched.plan(model, args, budget=10**13, example_kwargs=kwargs, train=True, hardware=hw)
    budget = base.min_budget_bytes if fraction == "min" else _fraction_of_peak(base, fraction, hw)
    cm = memsched.compile(model, budget, train=True, device="cuda", hardware=hw, offload_dir=tmp_path)
    try:
        torch.manual_seed(0)
        loss = loss_fn(cm(*args, **kwargs))
        loss.backward()
        torch.testing.assert_close(loss.detach().cpu(), want.detach().cpu(), rtol=1e-4, atol=1e-5)
        for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(q.grad.cpu(), p.grad.cpu(), rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()


def test_cuda_forwards_without_a_backward_with_the_gpu_lagging(tmp_path):
    """Two training forwards whose backward never runs (each abandoned by the next call), the GPU
    lagging behind the CPU; then a full step still equals eager."""
    import copy

    from train_zoo import build_train

    model, args, kwargs, loss_fn = build_train("llama")
    ref = copy.deepcopy(model)
    want = loss_fn(ref(*args, **kwargs))
    want.backward()
    hw = _cuda_hw(1 << 30)
    base = memsched.plan(model, args, budget=10**13, example_kwargs=kwargs, train=True, hardware=hw)
    cm = memsched.compile(model, base.min_budget_bytes, train=True, device="cuda", hardware=hw, offload_dir=tmp_path)
    try:
        loss_fn(cm(*args, **kwargs)).backward()
        torch.cuda.synchronize()
        pool = cm._stores.host
        held = pool.bytes_in_use   # the weights' host homes are pooled buffers, in use throughout
        model.zero_grad(set_to_none=True)
        for _ in range(2):
            torch.cuda._sleep(LAG_CYCLES)
            loss_fn(cm(*args, **kwargs))
        torch.cuda._sleep(LAG_CYCLES)
        loss = loss_fn(cm(*args, **kwargs))
        loss.backward()
        torch.testing.assert_close(loss.detach().cpu(), want.detach(), rtol=1e-4, atol=1e-5)
        for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"{n}: {m}")
        torch.cuda.synchronize()
        assert pool.bytes_in_use == held, "pinned buffers of the abandoned steps were not given back"
    finally:
        cm.close()


def test_cuda_weight_copies_overlap_compute(tmp_path):
    """Streaming weights from host: host->device copies run on their own stream while kernels
    run on the compute stream (profiler timeline), and the CPU blocks on few syncs per call."""
    from memsched.runtime.overlap import overlap_report

    model, args, kwargs = build("gpt2")
    hw = _cuda_hw(1 << 30)
    base = unconstrained_plan(model, args, kwargs, hardware=hw)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cm = memsched.compile(model, max(base.min_budget_bytes, weights // 4), device="cuda", hardware=hw,
                          offload_dir=tmp_path)
    try:
        cm(*args, **kwargs)
        report = overlap_report(lambda: cm(*args, **kwargs))
        assert report["h2d_ms"] > 0 and report["overlapped"] > 0, report
    finally:
        cm.close()


def test_cuda_runs_memscheds_triton_kernels_for_norms_and_rotary(tmp_path, monkeypatch):
    """kernels="auto" on CUDA: the LLaMA's RMSNorm and rotary chains run as memsched's Triton
    kernels (launches counted), outputs within float32 reordering of eager's."""
    pytest.importorskip("triton")
    from memsched.frontend.kernel_patterns import kernel_counts
    from memsched.kernels import _select

    kernels = _select.triton_kernels()
    launches = {"norm_forward": 0, "rope": 0}
    for name in launches:
        def counted(*args, _f=getattr(kernels, name), _n=name, **kw):
            launches[_n] += 1
            return _f(*args, **kw)
        monkeypatch.setattr(kernels, name, counted)
    model, args, kwargs = build("llama")
    with torch.no_grad():
        ref = model.cuda()(*[a.cuda() for a in args], **{k: v.cuda() for k, v in kwargs.items()})
    model.cpu()
    cm = memsched.compile(model, "4GB", device="cuda", offload_dir=tmp_path)
    try:
        assert "rms_norm" in kernel_counts(cm.plan.graph) and "rope" in kernel_counts(cm.plan.graph)
        out = cm(*args, **kwargs)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
        assert launches["norm_forward"] > 0 and launches["rope"] > 0, launches
    finally:
        cm.close()


def test_cuda_sampled_generation_at_its_least_budget_stays_within_it(tmp_path):
    """Tokens are chosen on the host: at the least budget, with top-p sampling (whose warpers
    make several logits-sized temporaries) and the prompt in micro-batches, the allocator's peak
    over a whole generation stays within the budget."""
    from memsched.generation.sampling import sampling

    model = build("llama")[0]
    ids = torch.randint(3, model.config.vocab_size, (8, 12), generator=torch.Generator().manual_seed(3))
    kw = dict(batch=8, prompt_len=12, max_len=24, sample_ids=ids, device="cuda", hardware=_cuda_hw(1 << 30),
              offload_dir=tmp_path, prefill_batch=4)
    probe = memsched.Generator(model, "1GB", **kw)
    budget = max(p.min_budget_bytes for p in probe.plans)
    probe.close()
    torch.cuda.synchronize()
    others = torch.cuda.memory_allocated()   # not this generation's (earlier tests' leftovers)
    gen = memsched.Generator(model, budget, **kw)
    try:
        chosen = sampling(model, True, temperature=0.8, top_k=0, top_p=0.9)
        gen(ids, 12, sampling=chosen)   # warm-up: workspace, pinned buffers
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        tokens, stats = gen(ids, 12, sampling=chosen)
        torch.cuda.synchronize()
        assert tokens.device.type == "cpu" and tokens.shape == (8, 24)
        assert stats.peak_device_bytes <= budget
        assert torch.cuda.max_memory_allocated() - others <= budget + OP_SCRATCH_SLACK
    finally:
        gen.close()
