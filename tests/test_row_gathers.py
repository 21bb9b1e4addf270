"""Embedding lookups of an inference program are done before it runs, on the table where it
lives (frontend/row_gathers.py): only the rows reach the device, never the table."""
from __future__ import annotations

import copy

import pytest
import torch

import memsched
from helpers import FIXED_CPU
from zoo import build, quiet_transformers

VOCAB, HIDDEN = 4000, 64


def _untied():
    """A GPT-NeoX whose input embedding (1 MiB) is its own tensor, apart from the LM head."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False,
                        attn_implementation="sdpa")
    torch.manual_seed(0)
    with quiet_transformers():
        model = GPTNeoXForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, ids


TABLE_BYTES = VOCAB * HIDDEN * 4


def _least(model, ids) -> int:
    return memsched.plan(copy.deepcopy(model), (ids,), "1GB", hardware=FIXED_CPU).min_budget_bytes


def test_only_the_rows_reach_the_device(tmp_path):
    model, ids = _untied()
    budget = _least(model, ids)
    cm = memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU, offload_dir=tmp_path)
    try:
        with torch.no_grad():
            assert torch.equal(cm(ids).logits, model(ids).logits)
            listing = str(cm.plan)
            assert "# p_gpt_neox_embed_in_weight: unused" in listing
            assert "(rows of gpt_neox.embed_in.weight, looked up before the program runs)" in listing
            assert "aten.embedding(" not in listing
            assert cm.stats.peak_device_bytes <= budget
            # the table never moves: a call moves less than it (it moved the table at every call)
            assert 0 < sum(cm.stats.bytes_moved.values()) < TABLE_BYTES
            model.gpt_neox.embed_in.weight.data.mul_(2)   # the lookup reads the model's tensor as it is now
            assert torch.equal(cm(ids).logits, model(ids).logits)
    finally:
        cm.close()


def test_a_saved_plan_gathers_as_it_was_planned(tmp_path):
    model, ids = _untied()
    plan = memsched.plan(copy.deepcopy(model), (ids,), _least(model, ids), hardware=FIXED_CPU)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = memsched.Plan.load(path)
    assert "(rows of gpt_neox.embed_in.weight, looked up before the program runs)" in str(loaded)
    assert loaded.verify() <= plan.budget_bytes
    cm = memsched.compile(model, plan=path, device="cpu", offload_dir=tmp_path)
    try:
        with torch.no_grad():
            assert torch.equal(cm(ids).logits, model(ids).logits)
    finally:
        cm.close()


def test_rows_are_read_from_the_checkpoint_alone(tmp_path):
    from accelerate import init_empty_weights
    from safetensors.torch import save_file

    model, ids = _untied()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    with init_empty_weights(), quiet_transformers():
        meta = type(model)(model.config).eval()
    cm = memsched.compile(meta, _least(model, ids), device="cpu", hardware=FIXED_CPU, offload_dir=tmp_path,
                          weights=tmp_path / "model.safetensors")
    try:
        with torch.no_grad():
            assert torch.equal(cm(ids).logits, model(ids).logits)
            bad = ids.clone()
            bad[1, 3] = VOCAB   # past the table: the error eager raises
            with pytest.raises(IndexError, match="index out of range"):
                cm(bad)
    finally:
        cm.close()


def test_a_table_tied_to_the_lm_head_is_still_fetched_for_it(tmp_path):
    model, args, kwargs = build("gpt2")
    budget = memsched.plan(copy.deepcopy(model), args, "1GB", example_kwargs=kwargs,
                           hardware=FIXED_CPU).min_budget_bytes
    cm = memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU, offload_dir=tmp_path)
    try:
        with torch.no_grad():
            got, want = cm(*args, **kwargs), model(*args, **kwargs)
        assert torch.equal(got.logits, want.logits)
        listing = str(cm.plan)
        assert "rows_embedding" in listing and "# p_transformer_wte_weight: unused" not in listing
    finally:
        cm.close()


def test_a_training_step_keeps_the_lookup(tmp_path):
    """Its backward reads the lookup's indices in the graph: nothing is hoisted."""
    model, ids = _untied()
    model.train()
    ref = copy.deepcopy(model)
    cm = memsched.compile(model, "1GB", device="cpu", hardware=FIXED_CPU, offload_dir=tmp_path, train=True)
    try:
        cm(ids, labels=ids).loss.backward()
        ref(ids, labels=ids).loss.backward()
        assert "rows_" not in str(cm.plan)
        for a, b in zip(model.parameters(), ref.parameters()):
            assert torch.equal(a.grad, b.grad)
    finally:
        cm.close()


class _IdsMadeInside(torch.nn.Module):
    """A second table looked up by ids the forward makes itself when none are given (RoCBert's
    shape ids are zeros then)."""

    def __init__(self):
        super().__init__()
        self.word, self.shape = torch.nn.Embedding(100, 32), torch.nn.Embedding(5000, 32)
        self.out = torch.nn.Linear(32, 8)

    def forward(self, ids):
        shape_ids = torch.zeros(ids.shape, dtype=torch.long, device=ids.device)
        return self.out(self.word(ids) + self.shape(shape_ids))


def test_a_lookup_by_ids_made_from_constants_is_done_before_the_program(tmp_path):
    torch.manual_seed(0)
    model = _IdsMadeInside().eval()
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(2))
    least = _least(model, ids)
    assert least < model.shape.weight.numel() * 4 // 4   # the 640 KB table is not on the device
    cm = memsched.compile(model, least, device="cpu", hardware=FIXED_CPU, offload_dir=tmp_path)
    try:
        with torch.no_grad():
            assert torch.equal(cm(ids), model(ids))
        assert "(rows of shape.weight, looked up before the program runs)" in str(cm.plan)
        assert cm.stats.peak_device_bytes <= least
    finally:
        cm.close()
