"""Per-layer recompute (passes/layer_recompute.py): a training step that saves each layer's
inputs only and rebuilds the rest of the layer in the backward. Forced here on the CPU (where
moves are cheap and the planner would not keep it), the step equals eager bit for bit and stays
within its budget; planned for an H200 (PCIe behind fast arithmetic), the planner keeps it
because it simulates faster; and it is never chosen when it is switched off."""
from __future__ import annotations

import copy

import pytest
import torch

import memsched
from helpers import assert_same_grads
from memsched.passes.layer_recompute import layer_of_weights
from train_zoo import build_train


def _note(plan) -> str:
    return next(r.note for r in plan.passes if r.name == "layers")


@pytest.mark.parametrize("name", ["gpt2_dropout", "llama", "bert_dropout"])
def test_a_forced_per_layer_recompute_equals_eager(name):
    """Dropout's outputs stay saved (a random op is never run again), so even with dropout on
    the step draws and computes what eager does."""
    model, args, kwargs, loss_fn = build_train(name)
    ref = copy.deepcopy(model)
    base = memsched.plan(model, args, budget=10**10, example_kwargs=kwargs, train=True)
    budget = max(base.min_budget_bytes, int(0.6 * base.peak_device_bytes))
    cm = memsched.compile(model, budget, train=True, device="cpu", recompute_layers=True)
    try:
        torch.manual_seed(0)
        loss = loss_fn(cm(*args, **kwargs))
        loss.backward()
        assert _note(cm.plan).startswith("per-layer recompute kept"), _note(cm.plan)
        assert any(n.name.endswith("_again") for n in cm.plan.graph.graph.nodes)
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()
    torch.manual_seed(0)
    want = loss_fn(ref(*args, **kwargs))
    want.backward()
    assert torch.equal(loss, want)
    assert_same_grads(ref, model)


def test_it_lowers_what_the_step_saves():
    """Unconstrained, the per-layer program saves fewer bytes for the backward than the plain
    one: the layers' values no longer live from the forward to the backward."""
    model, args, kwargs, _ = build_train("llama")
    saved = {}
    for mode in (False, True):
        p = memsched.plan(model, args, budget=10**10, example_kwargs=kwargs, train=True, recompute_layers=mode)
        saved[mode] = sum(a["bytes"] for a in p.saved_activations())
    assert saved[True] < saved[False] / 2, saved


@pytest.fixture(scope="module")
def gpt2_for_an_h200():
    with torch.device("meta"):
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=512, n_head=8, vocab_size=8192, n_positions=256,
                                           attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)).train()
    ids = torch.zeros(8, 256, dtype=torch.long)
    kw = {"input_ids": ids, "labels": ids}
    hw = memsched.get_hardware("h200")
    peak = memsched.plan(model, (), budget=10**12, example_kwargs=kw, train=True, hardware=hw)
    return model, kw, hw, peak


@pytest.mark.parametrize("fraction", [0.7, 0.5])
def test_planned_for_a_gpu_the_planner_keeps_it_when_it_simulates_faster(gpt2_for_an_h200, fraction):
    """GPT-2 for an H200 below its training peak: moving saved values over PCIe costs more
    than recomputing the layers, and the planner says so; switched off, the plain plan stays."""
    model, kw, hw, peak = gpt2_for_an_h200
    tensors = peak.peak_device_bytes - hw.workspace_bytes
    budget = max(peak.min_budget_bytes, hw.workspace_bytes + int(fraction * tensors))
    auto = memsched.plan(model, (), budget=budget, example_kwargs=kw, train=True, hardware=hw, time_limit_s=2.0)
    off = memsched.plan(model, (), budget=budget, example_kwargs=kw, train=True, hardware=hw, time_limit_s=2.0,
                        recompute_layers=False)
    assert _note(auto).startswith("per-layer recompute kept"), _note(auto)
    assert auto.predicted_time_s < off.predicted_time_s
    assert _note(off) == ""
    assert auto.peak_device_bytes <= budget


def test_its_minimum_is_not_above_its_own_peak(gpt2_for_an_h200):
    """A backward view of a recomputed value views the copy: the value the forward made is not
    counted alive into the backward (it was, and put this program's minimum above its own
    unconstrained peak, so it was never kept where it matters most)."""
    model, kw, hw, peak = gpt2_for_an_h200
    forced = memsched.plan(model, (), budget=10**12, example_kwargs=kw, train=True, hardware=hw,
                           recompute_layers=True)
    assert _note(forced).startswith("per-layer recompute kept"), _note(forced)
    assert forced.program.peak_bytes == forced.peak_device_bytes < peak.peak_device_bytes
    assert forced.min_budget_bytes <= forced.peak_device_bytes


def test_weights_are_mapped_to_their_layer_of_the_largest_stack():
    model, args, kwargs, _ = build_train("llama")
    from memsched.frontend.capture import Placeholder
    from memsched.ir.kinds import Kind

    names = [n for n, _ in model.named_parameters()]
    phs = [Placeholder(f"p{i}", Kind.WEIGHT, n) for i, n in enumerate(names)]
    layers = layer_of_weights(model, phs)
    assert layers and set(layers.values()) == set(range(model.config.num_hidden_layers))
    for ph in phs:
        assert (ph.name in layers) == (".layers." in ph.target)


class _DeepLayer(torch.nn.Module):
    """A layer whose backward reads every one of its ops' outputs, each made from the last."""

    def __init__(self, d: int, depth: int):
        super().__init__()
        self.proj, self.depth = torch.nn.Linear(d, d), depth

    def forward(self, x):
        x = self.proj(x)
        for _ in range(self.depth):
            x = torch.tanh(x)
        return x


class _Deep(torch.nn.Module):
    def __init__(self, d: int = 8, depth: int = 400):
        super().__init__()
        self.layers = torch.nn.ModuleList([_DeepLayer(d, depth) for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def test_a_layer_of_hundreds_of_ops_in_a_row_is_recomputed():
    """Rebuilding the last value of such a layer clones the whole chain before it (a CvT stage
    runs ~400 ops in a row): the clones are made without recursion (they hit Python's limit)."""
    torch.manual_seed(0)
    model, x = _Deep(), torch.randn(4, 8)
    ref = copy.deepcopy(model)
    cm = memsched.compile(model, "100MB", train=True, device="cpu", example_inputs=(x,), recompute_layers=True)
    try:
        loss = cm(x)
        loss.backward()
        assert _note(cm.plan).startswith("per-layer recompute kept"), _note(cm.plan)
        assert sum(n.name.endswith("_again") for n in cm.plan.graph.graph.nodes) >= 400
    finally:
        cm.close()
    want = ref(x)
    want.backward()
    assert torch.equal(loss, want)
    assert_same_grads(ref, model)
