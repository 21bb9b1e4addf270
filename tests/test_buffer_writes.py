"""A forward that writes into the model's own buffers runs as eager runs it: a static KV cache
filled slot by slot (gpt-fast's, Meta's reference LLaMA's), a call counter updated with ``+=``,
and batch norm in a model left in training mode and called under ``no_grad`` (statistics
recalibration, SWA's ``update_bn``). A written buffer is pinned on the device by the planner
and copied back to the model after a call that wrote a copy of it; the outputs and the buffers
equal eager's call after call. Writes into the inputs or the weights are still refused."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import memsched
from helpers import FIXED_CPU


class CachedAttention(nn.Module):
    def __init__(self, d=64, heads=4, max_len=32, batch=2):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.register_buffer("k_cache", torch.zeros(batch, heads, max_len, d // heads))
        self.register_buffer("v_cache", torch.zeros(batch, heads, max_len, d // heads))

    def forward(self, x, pos, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        self.k_cache[:, :, pos] = k              # index_put_ into the buffer
        self.v_cache.index_copy_(2, pos, v)      # an in-place op on it
        y = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class StaticCacheLM(nn.Module):
    """A decoder with its KV cache in buffers and a call counter scaling its logits."""

    def __init__(self, layers=3, max_len=32):
        super().__init__()
        self.max_len = max_len
        self.emb, self.head = nn.Embedding(100, 64), nn.Linear(64, 100)
        self.layers = nn.ModuleList(CachedAttention(max_len=max_len) for _ in range(layers))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, ids, pos):
        self.calls += 1
        mask = torch.arange(self.max_len)[None, :] <= pos[:, None]
        h = self.emb(ids)
        for layer in self.layers:
            h = h + layer(h, pos, mask)
        return self.head(h) * self.calls


def _compile(model, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU, **kw)


def _budget(model, args, frac):
    p = memsched.plan(copy.deepcopy(model), args, budget=10**9, hardware=FIXED_CPU)
    return p.min_budget_bytes if frac == "min" else max(p.min_budget_bytes, int(p.peak_device_bytes * frac))


def _decode(module, prompt):
    """A prompt of 8 tokens, then 6 tokens one at a time: (the outputs of every call)."""
    outs = [module(prompt, torch.arange(8))]
    for t in range(8, 14):
        token = torch.randint(0, 100, (2, 1), generator=torch.Generator().manual_seed(t))
        outs.append(module(token, torch.tensor([t])))
    return outs


@pytest.mark.parametrize("frac", (1.0, 0.5, "min"), ids=str)
def test_a_static_kv_cache_in_buffers_decodes_as_eager(frac):
    torch.manual_seed(0)
    model = StaticCacheLM().eval()
    ref = copy.deepcopy(model)
    prompt = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    budget = _budget(model, (prompt, torch.arange(8)), frac)
    cm = _compile(model, budget)
    try:
        with torch.no_grad():
            got, want = _decode(cm, prompt), _decode(ref, prompt)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        for (name, a), b in zip(model.named_buffers(), ref.buffers()):
            assert torch.equal(a, b), name
        assert int(model.calls) == 7 and cm.plans_made == 2
        assert cm.plan.verify() <= budget and cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()


def test_a_saved_plan_of_a_buffer_writing_model_runs_as_eager(tmp_path):
    torch.manual_seed(0)
    model = StaticCacheLM().eval()
    ref = copy.deepcopy(model)
    prompt = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    args = (prompt, torch.arange(8))
    plan = memsched.plan(copy.deepcopy(model), args, budget=_budget(model, args, "min"), hardware=FIXED_CPU)
    plan.save(tmp_path / "plan.json")
    cm = _compile(model, None, plan=tmp_path / "plan.json")
    try:
        with torch.no_grad():
            assert torch.equal(cm(*args), ref(*args))
        assert all(torch.equal(a, b) for a, b in zip(model.buffers(), ref.buffers()))
    finally:
        cm.close()


@pytest.mark.parametrize("frac", (1.0, "min"), ids=str)
def test_batch_norm_in_training_mode_under_no_grad_updates_its_statistics(frac):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 36, 8), nn.BatchNorm1d(8)).train()
    ref = copy.deepcopy(model)
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    budget = _budget(model, (x,), frac)
    cm = _compile(model, budget)
    try:
        with torch.no_grad():
            for i in range(1, 4):
                assert torch.equal(cm(x * i), ref(x * i))
        for (name, a), b in zip(model.named_buffers(), ref.buffers()):
            assert torch.equal(a, b), name
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()


class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        x[:, 0] = 0
        return self.lin(x)


class WritesItsWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        self.lin.weight.mul_(1.0)
        return self.lin(x)


@pytest.mark.parametrize("module, target", [(WritesItsInput, "input 'x'"),
                                            (WritesItsWeight, "parameter 'lin.weight'")])
def test_writes_into_inputs_or_weights_are_refused(module, target):
    """Refused naming the tensor as the user knows it (not the graph's placeholder p_lin_weight)."""
    with torch.no_grad(), pytest.raises(memsched.UnsupportedModelError, match=f"writes in place into {target}"):
        memsched.plan(module(), (torch.randn(2, 4),), budget="1MB", hardware=FIXED_CPU)
