"""The compiled module stands in for the model where code rebinds the name, as with
torch.compile: ``model = memsched.compile(model, ...)`` then ``model.parameters()`` for an
optimizer, ``model.config``, ``model.train()`` / ``model.eval()`` (which return the compiled
module, not the model) and ``model.forward`` runs the compiled module, while ``generate``,
which would run the model eagerly outside the budget, is refused naming what runs it inside."""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import transformers as T

import memsched
from helpers import FIXED_CPU

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    return T.LlamaForCausalLM(cfg).train()


def _compile(model, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU, **kw)


def test_a_rebound_model_trains_and_evaluates_as_eager():
    model = _llama()
    ref = copy.deepcopy(model)
    budget = memsched.plan(copy.deepcopy(model), (), budget=10**9, example_kwargs={"input_ids": IDS, "labels": IDS},
                           train=True, hardware=FIXED_CPU).min_budget_bytes
    model = _compile(model, budget, train=True)
    try:
        assert isinstance(model, memsched.CompiledModule)
        assert model.config.hidden_size == 64 and set(model.state_dict()) == set(ref.state_dict())
        opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, ref))
        model = model.train()
        assert isinstance(model, memsched.CompiledModule) and model.training
        for _ in range(2):
            for m, o in ((model, opt), (ref, ref_opt)):
                o.zero_grad()
                m(input_ids=IDS, labels=IDS).loss.backward()
                o.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q)
        model = model.eval()
        ref.eval()
        assert isinstance(model, memsched.CompiledModule) and not model.training
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS).logits, ref(input_ids=IDS).logits)
            plans = model.plans_made
            assert torch.equal(model.forward(input_ids=IDS).logits, ref(input_ids=IDS).logits)
            assert model.plans_made == plans   # the compiled program ran, not the model
        assert inspect.signature(model.forward) == inspect.signature(ref.forward)
        assert model.stats.peak_device_bytes <= budget
    finally:
        model.close()


def test_generate_which_would_run_the_model_eagerly_is_refused():
    cm = _compile(_llama().eval(), "1MB")
    try:
        with pytest.raises(AttributeError, match="eagerly, outside the budget: memsched.generate"):
            cm.generate
        with pytest.raises(AttributeError, match="no attribute 'not_there'"):
            cm.not_there
    finally:
        cm.close()
