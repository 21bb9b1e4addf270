"""Calls under ``torch.inference_mode()``, as inference code and pipelines make them: tensors
made in that mode (captured constants, recycled buffers, the KV cache) keep no version counter
and refuse in-place writes outside it, while memsched keeps them across calls. Planning and
running leave the mode (running as under ``no_grad``); outputs equal eager's either way, and a
model built in inference mode (its parameters inference tensors) is captured in that mode and
its in-place changes are seen by their bytes."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as T

import memsched
from helpers import FIXED_CPU

CFG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)
IDS = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _llama(train=False):
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(**CFG)).train(train)


def _budget(model, frac, train=False, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = memsched.plan(copy.deepcopy(model), (), budget=10**9, example_kwargs=kw, train=train, hardware=FIXED_CPU)
    return max(p.min_budget_bytes, int(p.unconstrained.peak_device_bytes * frac))


def _compile(model, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU, **kw)


@pytest.mark.parametrize("frac", (1.0, 0.4), ids=str)
def test_calls_in_inference_mode_equal_eager(frac):
    model = _llama().eval()
    with torch.no_grad():
        want = copy.deepcopy(model)(input_ids=IDS).logits
    budget = _budget(model, frac, input_ids=IDS)
    cm = _compile(model, budget)
    try:
        with torch.inference_mode():
            first, second = cm(input_ids=IDS).logits, cm(input_ids=IDS).logits
            ids = IDS.clone()   # an inference tensor as input
        with torch.no_grad():
            third = cm(input_ids=ids).logits
        for got in (first, second, third):
            assert torch.equal(got, want) and not got.requires_grad
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()


def test_plan_in_inference_mode():
    model = _llama().eval()
    with torch.inference_mode():
        p = memsched.plan(model, (), budget="1MB", example_kwargs={"input_ids": IDS}, hardware=FIXED_CPU)
    assert p.verify() <= 1_000_000


def test_generation_in_inference_mode_equals_transformers():
    model = _llama().eval()
    with torch.no_grad():
        want = model.generate(IDS[:, :8], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    kw = dict(eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        got = memsched.generate(model, IDS[:, :8], budget="300KB", max_new_tokens=6, hardware=FIXED_CPU,
                                device="cpu", **kw)
        gen = memsched.Generator(model, "300KB", batch=2, prompt_len=8, max_len=14, sample_ids=IDS[:, :8],
                                 hardware=FIXED_CPU, device="cpu")
        try:   # a generator called again: its KV cache, made in inference mode, is written again
            again = [gen(IDS[:, :8], max_new_tokens=6, **kw)[0] for _ in range(2)]
        finally:
            gen.close()
    for tokens in (got, *again):
        assert torch.equal(tokens, want)


def test_a_model_built_in_inference_mode():
    with torch.inference_mode():
        model = _llama().eval()
        want = model(input_ids=IDS).logits
    assert next(model.parameters()).is_inference()
    budget = _budget(model, 0.4, input_ids=IDS)
    cm = _compile(model, budget)
    try:
        with torch.inference_mode():
            assert torch.equal(cm(input_ids=IDS).logits, want)
            model.lm_head.weight.mul_(2)    # bumps no version counter: seen by its bytes
            changed = model(input_ids=IDS).logits
            assert torch.equal(cm(input_ids=IDS).logits, changed)
        with torch.no_grad():
            assert torch.equal(cm(input_ids=IDS).logits, changed)
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()


def test_a_training_module_called_in_inference_mode_then_trained():
    model = _llama(train=True)
    ref = copy.deepcopy(model)
    cm = _compile(model, _budget(model, 0.5, train=True, input_ids=IDS, labels=IDS), train=True)
    try:
        with torch.inference_mode():
            loss = cm(input_ids=IDS, labels=IDS).loss
        with torch.no_grad():
            assert torch.equal(loss, ref(input_ids=IDS, labels=IDS).loss)
        got, want = cm(input_ids=IDS, labels=IDS).loss, ref(input_ids=IDS, labels=IDS).loss
        got.backward()
        want.backward()
        assert torch.equal(got, want)
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)
    finally:
        cm.close()
