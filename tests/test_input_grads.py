"""Inputs that require grad: a module compiled inside a model that autograd trains around it
(an adapter before it, a head after) returns the gradient of its input, as eager does."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as T

import memsched
from memsched.frontend.joint import capture_joint
from memsched.frontend.repeats import capture_repeated
from test_real_memory import _allocator_peak
from test_repeats import _build, _canonical

VOCAB = 100


def _decoder(arch: str, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        config = T.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                               num_key_value_heads=2, intermediate_size=128)
        return T.LlamaForCausalLM(config).train()
    config = T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=64,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return T.GPT2LMHeadModel(config).train()


def _same_grads(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("fraction", [0.0, 0.3], ids=["minimum", "30%"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_an_adapter_before_a_compiled_decoder_gets_eagers_gradients(arch, fraction):
    """Features through an eager adapter into a compiled decoder's ``inputs_embeds``, two
    steps: loss, the decoder's gradients and the adapter's (through the decoder's input
    gradient) equal eager's bit for bit, and the allocator stays within the budget with the
    input's gradient inside it (before: refused, "inputs that require grad are not supported")."""
    decoder, adapter = _decoder(arch), torch.nn.Linear(16, 64)
    ref_decoder, ref_adapter = copy.deepcopy(decoder), copy.deepcopy(adapter)
    feats = torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    example = dict(inputs_embeds=adapter(feats), labels=labels)
    plan = memsched.plan(copy.deepcopy(decoder), (), "1GB", train=True, example_kwargs=example)
    budget = max(plan.min_budget_bytes, int(plan.peak_device_bytes * fraction))
    cm = memsched.compile(decoder, budget, device="cpu", train=True)
    for _ in range(2):
        got = cm(inputs_embeds=adapter(feats), labels=labels).loss
        want = ref_decoder(inputs_embeds=ref_adapter(feats), labels=labels).loss
        got.backward()
        want.backward()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        _same_grads(decoder, ref_decoder)
        _same_grads(adapter, ref_adapter)
    decoder.zero_grad(set_to_none=True)
    x = example["inputs_embeds"].detach().requires_grad_()
    peak = _allocator_peak(lambda: cm(inputs_embeds=x, labels=labels).loss.backward())
    held = sum(p.grad.untyped_storage().nbytes() for p in decoder.parameters() if p.grad is not None)
    assert x.grad is not None and peak - held <= budget, (peak, held, budget)
    assert cm.plans_made == 1
    cm.close()


def test_which_inputs_take_gradients_is_part_of_the_signature():
    """The same shapes with and without an input that requires grad are two plans; an input
    passed twice gets both gradients summed, a number passes through, and an input the loss
    reads through a zero gets zeros (as eager)."""
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)

        def forward(self, x, y, n: int, z):
            return (self.a(x) * y).sum() * n + z.sum() * 0

    torch.manual_seed(0)
    model = Mixed()
    ref = copy.deepcopy(model)
    cm = memsched.compile(model, "1MB", device="cpu", train=True)

    def run(module, same: bool):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3)).requires_grad_()
        y = x if same else torch.randn(4, 8, generator=torch.Generator().manual_seed(4)).requires_grad_()
        z = torch.randn(3).requires_grad_()
        module(x, y, 3, z).backward()
        return x.grad, y.grad, z.grad

    for same in (False, True):
        for g, w in zip(run(cm, same), run(ref, same)):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
    _same_grads(model, ref)
    assert cm.plans_made == 2
    cm(torch.randn(4, 8), torch.randn(4, 8), 3, torch.randn(3)).backward()   # none requires grad: a third
    assert cm.plans_made == 3
    cm.close()


def test_a_repeated_stack_returns_its_inputs_gradient():
    """A deep stack traced on five layers and the rest repeated (frontend/repeats.py) keeps the
    input's gradient among its outputs: the grown graph is the full trace (before: dropped)."""
    model, ids = _build("llama")
    x = torch.randn(ids.shape[0], ids.shape[1], 64, requires_grad=True)

    def trace(m):
        return capture_joint(m, (), {"inputs_embeds": x, "labels": ids})

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = trace(model)
        grown, how = capture_repeated(model, trace)
    assert how.startswith("5 of") and full.grad_inputs == grown.grad_inputs == [0]
    assert _canonical(grown) == _canonical(full)


def test_a_frozen_model_gives_its_inputs_gradient():
    """No parameter requires grad, the input does (a saliency map, an adversarial example): the
    step is the input's gradient alone, eager's; the parameters get none."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).requires_grad_(False)
    cm = memsched.compile(model, "1MB", device="cpu", train=True)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1)).requires_grad_()
    want = x.detach().clone().requires_grad_()
    cm(x).square().sum().backward()
    model(want).square().sum().backward()
    torch.testing.assert_close(x.grad, want.grad, rtol=0, atol=0)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="no parameter that requires grad and no input"):
        cm(x.detach())
    cm.close()
