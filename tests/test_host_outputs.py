"""compile(..., host_outputs=True): an inference program's outputs are the caller's on the
host, so each may leave the device as soon as it is made. Outputs that together exceed the
budget then fit: every layer's hidden states of an encoder, a long prompt's KV cache entries."""
from __future__ import annotations

import copy

import pytest
import torch

import memsched
from helpers import FIXED_CPU
from memsched.errors import InfeasibleBudgetError
from zoo import quiet_transformers


def _encoder():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=6, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    with quiet_transformers():
        model = BertModel(cfg).eval()
    ids = torch.randint(0, 200, (4, 96), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "output_hidden_states": True}


def _minimum(model, kwargs, **options) -> int:
    return memsched.plan(copy.deepcopy(model), (), "1GB", example_kwargs=kwargs, hardware=FIXED_CPU,
                         **options).min_budget_bytes


def test_hidden_states_of_every_layer_leave_the_device_as_they_are_made(tmp_path):
    model, kwargs = _encoder()
    held, delivered = _minimum(model, kwargs), _minimum(model, kwargs, host_outputs=True)
    # seven hidden states of 96 KiB each are held to the end without the option
    assert delivered < held - 4 * 96 * 64 * 4
    budget = (held + delivered) // 2
    with pytest.raises(InfeasibleBudgetError):
        memsched.compile(copy.deepcopy(model), budget, device="cpu", hardware=FIXED_CPU,
                         example_kwargs=kwargs)
    cm = memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU, offload_dir=tmp_path,
                          host_outputs=True)
    try:
        with torch.no_grad():
            got, want = cm(**kwargs), model(**kwargs)
            again = cm(**kwargs)   # the copies the first call handed back are the caller's for good
        assert len(got.hidden_states) == 7
        for a, b, c in zip(got.hidden_states, want.hidden_states, again.hidden_states):
            assert a.device.type == "cpu" and torch.equal(a, b) and torch.equal(c, b)
        assert torch.equal(got.last_hidden_state, want.last_hidden_state)
        assert cm.stats.peak_device_bytes <= budget
        listing = str(cm.plan)
        assert "(delivered: the step returns this copy)" in listing
        assert cm.plan.verify() <= budget
    finally:
        cm.close()


def test_a_budget_that_holds_every_output_moves_none():
    """The outputs leave the device only when the budget needs it: at the unconstrained peak
    the plan is the one without the option."""
    model, kwargs = _encoder()
    plain = memsched.plan(copy.deepcopy(model), (), "1GB", example_kwargs=kwargs, hardware=FIXED_CPU)
    hosted = memsched.plan(copy.deepcopy(model), (), "1GB", example_kwargs=kwargs, hardware=FIXED_CPU,
                           host_outputs=True)
    assert hosted.peak_device_bytes == plain.peak_device_bytes
    assert "delivered" not in str(hosted)


def test_a_training_step_keeps_its_outputs_on_the_device(tmp_path):
    """A training step's outputs feed its backward: the option leaves them where they are."""
    model, kwargs = _encoder()
    model.train()
    kwargs = dict(kwargs, output_hidden_states=False)
    ref = copy.deepcopy(model)
    cm = memsched.compile(model, "1GB", device="cpu", hardware=FIXED_CPU, offload_dir=tmp_path, train=True,
                          host_outputs=True)
    try:
        torch.manual_seed(3)
        got = cm(**kwargs).last_hidden_state
        torch.manual_seed(3)
        want = ref(**kwargs).last_hidden_state
        assert torch.equal(got, want)
        got.sum().backward()
        want.sum().backward()
        for a, b in zip(model.parameters(), ref.parameters()):   # (the pooler's are None in both)
            assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)
    finally:
        cm.close()
