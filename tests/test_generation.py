"""memsched.generate: greedy tokens equal transformers' generate, two plans per run, the KV
cache placed by the planner (off the device when the budget asks), the budget held."""
from __future__ import annotations

import logging
import re

import pytest
import torch

import memsched
from helpers import FIXED_CPU
from memsched.cli.render import generation_sections
from memsched.generation.kv_cache import LayerShapes
from zoo import build, quiet_transformers

NEW_TOKENS = 12


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=500, hidden_size=64, num_hidden_layers=3, ffn_dim=128, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2,
                    eos_token_id=2, dropout=0.0, attn_implementation="sdpa")
    return OPTForCausalLM(cfg)


def _neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64, rotary_pct=0.5,
                        attn_implementation="sdpa")
    return GPTNeoXForCausalLM(cfg)


def _decoder(name: str):
    torch.manual_seed(0)
    with quiet_transformers():
        if name in ("gpt2", "llama"):  # llama here is a GQA decoder: 4 heads, 2 kv heads
            model = build(name)[0]
        else:
            model = {"opt": _opt, "gpt_neox": _neox}[name]().eval()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (3, 10), generator=torch.Generator().manual_seed(1))
    return model, ids


def _reference(model, ids, mask=None, n=NEW_TOKENS, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask,
                              max_new_tokens=n, do_sample=False, **kw)


def _least_budget(model, **kw) -> int:
    """The least budget both of a generation's programs fit (the KV cache must leave the device)."""
    probe = memsched.Generator(model, "1GB", **kw)
    try:
        return max(p.min_budget_bytes for p in probe.plans)
    finally:
        probe.close()


def _kv_off_device(plan) -> int:
    tiers = plan.kind_tier_bytes("kv_cache")
    return tiers["host"] + tiers["disk"]


@pytest.mark.parametrize("name", ["gpt2", "llama", "opt", "gpt_neox"])
@pytest.mark.parametrize("budget", ["roomy", "min"])
def test_tokens_equal_transformers_generate(name, budget, tmp_path):
    model, ids = _decoder(name)
    ref = _reference(model, ids, eos_token_id=None, pad_token_id=0)
    B, P = ids.shape
    kw = dict(batch=B, prompt_len=P, max_len=P + NEW_TOKENS, sample_ids=ids, hardware=FIXED_CPU, device="cpu",
              offload_dir=tmp_path)
    if budget == "min":  # the least budget both programs fit: the KV cache must leave the device
        budget_bytes = _least_budget(model, **kw)
    else:
        budget_bytes = 10**9
    gen = memsched.Generator(model, budget_bytes, **kw)
    try:
        tokens, stats = gen(ids, NEW_TOKENS)
        assert torch.equal(tokens, ref)
        assert stats.plans == 2 and stats.new_tokens == NEW_TOKENS
        assert stats.peak_device_bytes <= budget_bytes
        prefill, decode = gen.plans
        assert sum(decode.kind_tier_bytes("kv_cache").values()) == stats.kv_cache_bytes
        assert re.fullmatch(rf"Generator\({type(model).__name__}, batch {B}, prompt {P}, max length {P + NEW_TOKENS}, "
                            r"budget .+, prefill micro-batch \d+, KV cache .+ in \d+ groups? of heads per layer\)",
                            repr(gen)), repr(gen)
        if budget == "min":
            assert _kv_off_device(decode) > 0, decode.kind_tier_bytes("kv_cache")
            assert stats.bytes_moved.get("disk_read", 0) > 0
        again, _ = gen(ids, NEW_TOKENS)  # a second run of the same generator starts from a clean cache
        assert torch.equal(again, ref)
    finally:
        gen.close()


@pytest.mark.parametrize("settings", [{}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}, {"top_k": 0}])
def test_sampled_tokens_equal_transformers_sampling_seeded_alike(settings, tmp_path):
    """do_sample=True draws as transformers' generate draws (its warpers, softmax, multinomial on
    the global RNG; the model's generation config where a setting is not given): seeded alike,
    the same tokens, with the KV cache off the device. Planning leaves the RNG as it found it."""
    model, ids = _decoder("llama")
    torch.manual_seed(123)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=True,
                             eos_token_id=None, pad_token_id=0, **settings)
    B, P = ids.shape
    budget = _least_budget(model, batch=B, prompt_len=P, max_len=P + NEW_TOKENS, sample_ids=ids,
                           hardware=FIXED_CPU, device="cpu", offload_dir=tmp_path)
    torch.manual_seed(123)
    tokens, stats = memsched.generate(model, ids, budget=budget, max_new_tokens=NEW_TOKENS, do_sample=True,
                                      eos_token_id=None, hardware=FIXED_CPU, device="cpu", offload_dir=tmp_path,
                                      return_stats=True, **settings)
    assert torch.equal(tokens, ref)
    assert not torch.equal(tokens, _reference(model, ids, eos_token_id=None, pad_token_id=0))  # not greedy
    assert stats.peak_device_bytes <= budget


def test_sampling_settings_are_checked_before_planning():
    model, ids = _decoder("gpt2")
    for bad in ({"do_sample": "yes"}, {"do_sample": True, "temperature": -1.0}, {"do_sample": True, "top_p": 2.0}):
        with pytest.raises(ValueError):
            memsched.generate(model, ids, budget="1GB", max_new_tokens=2, hardware=FIXED_CPU, device="cpu", **bad)


def test_fused_generation_at_the_minimum_budget(tmp_path):
    """``fuse=True`` runs both programs' compute as Inductor regions, the decode attention's
    merged softmax included: at the least budget both programs fit, every region's first call
    stays within its bytes (the runtime stops it otherwise), the peak within the budget, and the
    tokens are transformers' (fused sums differ in the last bits; no argmax here is that close)."""
    model, ids = _decoder("llama")
    ref = _reference(model, ids, eos_token_id=None, pad_token_id=0)
    B, P = ids.shape
    kw = dict(batch=B, prompt_len=P, max_len=P + NEW_TOKENS, sample_ids=ids, hardware=FIXED_CPU, device="cpu",
              offload_dir=tmp_path)
    budget = _least_budget(model, **kw)
    gen = memsched.Generator(model, budget, fuse=True, **kw)
    try:
        assert all(p.steps() and any(s.get("op") == "region" for s in p.steps()) for p in gen.plans)
        tokens, stats = gen(ids, NEW_TOKENS)
        assert torch.equal(tokens, ref)
        assert stats.peak_device_bytes <= budget
        assert _kv_off_device(gen.plans[1]) > 0
    finally:
        gen.close()


def test_left_padding_and_end_of_sequence(tmp_path):
    """A left-padded batch, and sequences that end: after its end-of-sequence token a sequence
    gets the pad token, as transformers pads it."""
    model, ids = _decoder("llama")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :1] = 0
    ids = ids.masked_fill(mask == 0, 0)
    free = _reference(model, ids, mask, eos_token_id=None, pad_token_id=0)
    eos = int(free[2, ids.shape[1] + 3])  # a token sequence 2 makes: it ends there
    ref = _reference(model, ids, mask, eos_token_id=eos, pad_token_id=0)
    out, stats = memsched.generate(model, ids, attention_mask=mask, budget="1GB", max_new_tokens=NEW_TOKENS,
                                   eos_token_id=eos, pad_token_id=0, hardware=FIXED_CPU, device="cpu",
                                   offload_dir=tmp_path, return_stats=True)
    assert torch.equal(out, ref)
    assert stats.plans == 2


def test_new_cache_slots_are_patched_not_rewritten(tmp_path):
    """Between decode steps only the new slots of a disk-homed KV cache are written."""
    model, ids = _decoder("gpt2")
    B, P = ids.shape
    kw = dict(batch=B, prompt_len=P, max_len=P + NEW_TOKENS, sample_ids=ids, hardware=FIXED_CPU, device="cpu",
              offload_dir=tmp_path)
    budget = _least_budget(model, **kw)
    gen = memsched.Generator(model, budget, **kw)
    writes = []
    disk = gen.compiled._stores.disk
    real = disk.write_slices

    def spy(region, shape, dtype, dim, index, new):
        writes.append(new.numel() * new.element_size())
        return real(region, shape, dtype, dim, index, new)

    disk.write_slices = spy
    try:
        tokens, stats = gen(ids, NEW_TOKENS)
    finally:
        gen.close()
    assert torch.equal(tokens, _reference(model, ids, eos_token_id=None, pad_token_id=0))
    one_slot = B * model.config.n_embd * 4  # a layer's keys (or values) for one token, all rows
    decode_writes = writes[-(len(writes) // NEW_TOKENS):]
    assert writes and max(decode_writes) == one_slot, (one_slot, sorted(set(writes)))


def test_refusals():
    model, ids = _decoder("gpt2")
    with pytest.raises(ValueError, match="max_new_tokens"):
        memsched.generate(model, ids, budget="1GB", max_new_tokens=0)
    with pytest.raises(ValueError, match="input_ids"):
        memsched.generate(model, ids[0], budget="1GB", max_new_tokens=2)
    model.train()
    with pytest.raises(ValueError, match="eval"):
        memsched.generate(model, ids, budget="1GB", max_new_tokens=2, device="cpu", hardware=FIXED_CPU)
    with pytest.raises(TypeError, match="causal language model"):
        memsched.generate(torch.nn.Linear(4, 4), ids, budget="1GB", max_new_tokens=2)
    with pytest.raises(memsched.InfeasibleBudgetError):
        memsched.generate(model.eval(), ids, budget=1000, max_new_tokens=2, device="cpu", hardware=FIXED_CPU)


@pytest.mark.parametrize("case, match", [
    ("float_ids", "int64 or int32"), ("empty", "at least one token"), ("out_of_vocab", "vocabulary"),
    ("mask_shape", "same shape"), ("too_long", "beyond the 64"),
])
def test_prompts_the_model_cannot_take_fail_before_anything_runs(case, match):
    model, ids = _decoder("gpt2")
    kw = dict(budget="1GB", max_new_tokens=2, hardware=FIXED_CPU, device="cpu")
    if case == "float_ids":
        ids = ids.float()
    elif case == "empty":
        ids = ids[:, :0]
    elif case == "out_of_vocab":
        ids = ids + 5000
    elif case == "mask_shape":
        kw["attention_mask"] = torch.ones(ids.shape[0], 3)
    elif case == "too_long":
        kw["max_new_tokens"] = 100
    with pytest.raises(ValueError, match=match):
        memsched.generate(model, ids, **kw)


def _sliding(name: str):
    import transformers as T

    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                  num_key_value_heads=2, sliding_window=5, pad_token_id=0)
    mixed = ["sliding_attention", "full_attention", "sliding_attention"]
    config, cls = {
        # every layer slides, one 4-D mask (Mistral builds it with its sliding-window builder)
        "mistral": (T.MistralConfig(**common), T.MistralForCausalLM),
        # sliding and full layers, a mask per layer type (a dict); memsched's decode attention
        "gemma3": (T.Gemma3TextConfig(**common, head_dim=16, layer_types=mixed), T.Gemma3ForCausalLM),
        # the same, attention computed by the model itself (soft-capped scores)
        "gemma2": (T.Gemma2Config(**common, head_dim=16, layer_types=mixed), T.Gemma2ForCausalLM),
    }[name]
    with quiet_transformers():
        torch.manual_seed(0)
        return cls(config).eval()


@pytest.mark.parametrize("name", ["mistral", "gemma3", "gemma2"])
def test_sliding_windows_shorter_than_the_generation(name, tmp_path, monkeypatch):
    """A sliding window shorter than the generation (and than the prompt): its layers keep a ring
    of window slots, masked by the slot each place holds, so the tokens are transformers', left
    padding included, with the KV cache off the device, and the cache takes the window's bytes
    in sliding layers; masked as full attention the tokens differ (the window matters here)."""
    from memsched.generation import decoding

    model = _sliding(name)
    ids = torch.randint(3, 300, (3, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    n = 10
    ref = _reference(model, ids, mask, n=n, eos_token_id=None, pad_token_id=0)
    kw = dict(batch=3, prompt_len=8, max_len=8 + n, sample_ids=ids, hardware=FIXED_CPU, device="cpu",
              offload_dir=tmp_path)
    budget = _least_budget(model, **kw)
    tokens, stats = memsched.generate(model, ids, attention_mask=mask, budget=budget, max_new_tokens=n,
                                      eos_token_id=None, pad_token_id=0, return_stats=True, **{
                                          k: v for k, v in kw.items() if k in ("hardware", "device", "offload_dir")})
    assert torch.equal(tokens, ref)
    assert stats.peak_device_bytes <= budget and stats.plans == 2
    slides = [t == "sliding_attention" for t in getattr(model.config, "layer_types", None) or ["sliding_attention"] * 3]
    assert stats.kv_cache_bytes == sum(2 * 3 * 2 * (5 if s else 8 + n) * 16 * 4 for s in slides)
    monkeypatch.setattr(decoding, "_check_decoder", lambda model, max_len: None)   # every layer full
    full = memsched.generate(model, ids, attention_mask=mask, budget="1GB", max_new_tokens=n, eos_token_id=None,
                             pad_token_id=0, hardware=FIXED_CPU, device="cpu", offload_dir=tmp_path)
    assert not torch.equal(full, ref)


def test_a_window_no_layer_uses_masks_nothing():
    """Qwen2 with a sliding window but ``max_window_layers`` covering every layer: its layer
    types say none slides, so no layer is masked as sliding."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from memsched.generation.decoding import _check_decoder

    with quiet_transformers():
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                                             sliding_window=4, max_window_layers=2)).eval()
    assert model.config.layer_types == ["full_attention"] * 2
    assert _check_decoder(model, 16) is None


def test_a_window_covering_the_generation_masks_nothing():
    """A sliding window at least as long as the generation adds no mask: the same program as a
    full-attention decoder's, and transformers' tokens."""
    from memsched.generation.decoding import _check_decoder

    model = _sliding("mistral")
    assert _check_decoder(model, 5) is None and _check_decoder(model, 6).size == 5
    ids = torch.randint(3, 300, (2, 2))
    tokens = memsched.generate(model, ids, budget="1GB", max_new_tokens=3, device="cpu",  # 5 tokens
                               eos_token_id=None, pad_token_id=0)
    assert torch.equal(tokens, _reference(model, ids, eos_token_id=None, pad_token_id=0, n=3))


def test_a_mixture_of_experts_decoder_generates_as_transformers_does(tmp_path):
    """Mixtral: its experts run by grouped matmuls in eager (transformers' default), which torch's
    fake kernels refuse in float32; memsched reads the cache's shapes through the batched-matmul
    experts instead, and generates the same tokens within half the weights' bytes."""
    from zoo import tiny_mixtral

    model = tiny_mixtral(layers=2)
    ids = torch.randint(3, 100, (2, 5), generator=torch.Generator().manual_seed(3))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tokens = memsched.generate(model, ids, budget=weights // 2, max_new_tokens=4, device="cpu", hardware=FIXED_CPU,
                               offload_dir=tmp_path, eos_token_id=None, pad_token_id=0)
    assert torch.equal(tokens, _reference(model, ids, eos_token_id=None, pad_token_id=0, n=4))
    assert model.config._experts_implementation == "grouped_mm"   # the user's model as it was


def test_prompt_runs_in_micro_batches_when_the_whole_batch_does_not_fit(tmp_path):
    """A prompt's program for every row at once needs more than the decode program: below that,
    the prompt runs a micro-batch of rows at a time (planned once), tokens unchanged."""
    model, _ = _decoder("gpt2")
    ids = torch.randint(3, 1000, (4, 24), generator=torch.Generator().manual_seed(2))
    ref = _reference(model, ids, eos_token_id=None, pad_token_id=0)
    kw = dict(batch=4, prompt_len=24, max_len=24 + NEW_TOKENS, sample_ids=ids, hardware=FIXED_CPU, device="cpu",
              offload_dir=tmp_path)
    probe = memsched.Generator(model, "1GB", **kw)
    whole, decode = (p.min_budget_bytes for p in probe.plans)
    probe.close()
    assert whole > decode
    budget = (whole + decode) // 2
    gen = memsched.Generator(model, budget, **kw)
    try:
        assert gen.prefill_batch < 4
        tokens, stats = gen(ids, NEW_TOKENS)
        assert torch.equal(tokens, ref)
        assert stats.plans == 2 and stats.peak_device_bytes <= budget
    finally:
        gen.close()
    with pytest.raises(ValueError, match="prefill_batch"):
        memsched.Generator(model, "1GB", prefill_batch=3, **kw)


@pytest.mark.parametrize("block_size", [2, "auto"])
def test_blocks_of_sequences_decode_in_turn(block_size, tmp_path):
    """The batch decodes a block at a time through one pair of plans; "auto" prices candidate
    blocks with their plans and keeps the best for the goal; tokens unchanged (an early stop in
    one block is padded like transformers pads it)."""
    model, _ = _decoder("llama")
    ids = torch.randint(3, 1000, (4, 10), generator=torch.Generator().manual_seed(3))
    free = _reference(model, ids, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, ids.shape[1] + 2])  # the first block's first sequence stops early
    ref = _reference(model, ids, eos_token_id=eos, pad_token_id=0)
    tokens, stats = memsched.generate(model, ids, budget="1GB", max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                                      pad_token_id=0, block_size=block_size, hardware=FIXED_CPU, device="cpu",
                                      offload_dir=tmp_path, return_stats=True)
    assert torch.equal(tokens, ref)
    if block_size == "auto":
        assert stats.blocks and all("block" in b for b in stats.blocks)
        assert stats.block_size in (4, 2, 1)
        assert stats.plans == 2 * sum("does not fit" not in b for b in stats.blocks)
    else:
        assert stats.block_size == 2 and stats.plans == 2


def test_the_throughput_goal_takes_a_larger_block_than_the_latency_goal(tmp_path):
    model, ids = _decoder("gpt2")
    ids = torch.randint(3, 1000, (4, 10), generator=torch.Generator().manual_seed(4))
    chosen = {}
    for goal in ("throughput", "latency"):
        _, stats = memsched.generate(model, ids, budget="1GB", max_new_tokens=4, eos_token_id=None, block_size="auto",
                                     goal=goal, hardware=FIXED_CPU, device="cpu", offload_dir=tmp_path,
                                     return_stats=True)
        chosen[goal] = stats.block_size
    assert chosen["throughput"] > chosen["latency"], chosen
    with pytest.raises(ValueError, match="block_size"):
        memsched.generate(model, ids, budget="1GB", max_new_tokens=2, block_size=3)
    with pytest.raises(ValueError, match="goal"):
        memsched.generate(model, ids, budget="1GB", max_new_tokens=2, block_size="auto", goal="speed",
                          hardware=FIXED_CPU, device="cpu")


def test_the_cache_is_placed_per_group_of_heads(tmp_path, monkeypatch):
    """Each layer's cache as one tensor per group of kv heads: tokens unchanged, and with the
    cache larger than the rest of a step, the decode program's minimum budget falls (part of a
    layer's cache can leave the device without the rest). Where the rule's grouping leaves the
    decode step over the budget, the next finer one is planned."""
    model, _ = _decoder("gpt2")
    ids = torch.randint(3, 1000, (32, 16), generator=torch.Generator().manual_seed(5))
    ref = _reference(model, ids, eos_token_id=None, pad_token_id=0, n=16)
    kw = dict(batch=32, prompt_len=16, max_len=56, sample_ids=ids, hardware=FIXED_CPU, device="cpu",
              offload_dir=tmp_path)
    minimum = {}
    for chunks in (1, 4):
        gen = memsched.Generator(model, "1GB", kv_head_chunks=chunks, **kw)
        minimum[chunks] = gen.plans[1].min_budget_bytes
        assert len(gen.decoder.names()) == 2 * 4 * chunks
        gen.close()
    assert minimum[4] < minimum[1], minimum
    monkeypatch.setattr(memsched.generation.decoding, "head_chunk_choices", lambda *a: [1, 4])
    gen = memsched.Generator(model, minimum[4], **kw)  # one group is over this budget: four are planned
    try:
        assert gen.decoder.head_chunks == 4
        tokens, stats = gen(ids, 16)
        assert torch.equal(tokens, ref)
        assert stats.peak_device_bytes <= minimum[4]
        assert _kv_off_device(gen.plans[1]) > 0
    finally:
        gen.close()
    monkeypatch.undo()
    shapes = [LayerShapes((torch.Size((1, 8, 64, 16)),) * 2)]  # 32 KiB per tensor
    assert memsched.generation.decoding.head_chunk_choices(shapes, torch.float32, 4 * 16384) == [2, 4, 8]
    assert memsched.generation.decoding.head_chunk_choices(shapes, torch.float32, 1 << 30) == [1, 2, 4, 8]


def test_a_model_attending_outside_the_attention_interface_gets_the_written_cache(monkeypatch, tmp_path):
    """A decode step must see its own new keys: a model whose attention bypasses transformers'
    attention interface (so never meets memsched's decode attention) is found by a fake decode
    step and handed each layer's cache with the step's entries written in; tokens unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.models.llama import modeling_llama

    model, ids = _decoder("llama")
    ref = _reference(model, ids, n=4)
    monkeypatch.setattr(modeling_llama.ALL_ATTENTION_FUNCTIONS, "get_interface",
                        lambda name, default: sdpa_attention_forward)
    gen = memsched.Generator(model, "1GB", batch=ids.shape[0], prompt_len=ids.shape[1], max_len=ids.shape[1] + 4,
                             sample_ids=ids, hardware=FIXED_CPU, device="cpu", offload_dir=tmp_path)
    assert gen.decoder.attends_by_itself
    tokens, _ = gen(ids, 4, eos_token_id=model.generation_config.eos_token_id,
                    pad_token_id=model.generation_config.pad_token_id)
    gen.close()
    assert torch.equal(tokens, ref)


def test_a_bfloat16_decoder_generates_transformers_tokens(tmp_path):
    """memsched's decode attention runs in float32 and hands its output back in the model's
    dtype: a bf16 GQA decoder generates transformers' greedy tokens."""
    model, ids = _decoder("llama")
    model = model.to(torch.bfloat16)
    ref = _reference(model, ids, n=6)
    out = memsched.generate(model, ids, budget="1GB", max_new_tokens=6, hardware=FIXED_CPU, device="cpu",
                            offload_dir=tmp_path)
    assert torch.equal(out[0] if isinstance(out, tuple) else out, ref)


def test_gpt_neo_local_layers_are_sliding_windows():
    """GPT-Neo names its sliding-window layers "local" and the window ``window_size``, and masks
    them by a bias of its own sized for its own cache, not through transformers' masks: a window
    shorter than the generation is refused before anything runs."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    with quiet_transformers():
        model = GPTNeoForCausalLM(GPTNeoConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2,
                                               attention_types=[[["global", "local"], 1]], window_size=4)).eval()
    with pytest.raises(NotImplementedError, match="sliding-window"):
        memsched.generate(model, torch.ones(1, 3, dtype=torch.long), budget="1GB", max_new_tokens=2)


def test_layers_the_cache_does_not_cover_are_named():
    """Llama 4's chunked attention is no layer memsched's cache serves: refused before anything
    runs, naming the type (the message said "non-attention" for it once)."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    with quiet_transformers():
        model = Llama4ForCausalLM(Llama4TextConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_chunk_size=4,
            num_local_experts=2)).eval()
    with pytest.raises(NotImplementedError, match=r"Llama4ForCausalLM has chunked_attention layers \(layer types"):
        memsched.generate(model, torch.ones(1, 3, dtype=torch.long), budget="1GB", max_new_tokens=2)


def test_layers_sharing_another_layers_cache_are_refused():
    """Gemma 3n's last layers read the keys and values of earlier ones and keep no cache: refused
    by name before anything runs (memsched's cache gives each layer its own)."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    with quiet_transformers():
        model = Gemma3nForCausalLM(Gemma3nTextConfig(
            vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, hidden_size_per_layer_input=8,
            intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_kv_shared_layers=2, sliding_window=8, laurel_rank=8, altup_num_inputs=2,
            activation_sparsity_pattern=[0.0] * 4, max_position_embeddings=64,
            layer_types=["sliding_attention", "full_attention"] * 2)).eval()
    with pytest.raises(memsched.UnsupportedModelError, match="layer 2 keeps no cache of its own"):
        memsched.generate(model, torch.ones(1, 3, dtype=torch.long), budget="1GB", max_new_tokens=2)


def _recurrent_decoders():
    import transformers as T

    # weights drawn wider than the default, so that the tokens change from step to step (a wrong
    # state shows), and no end-of-sequence token, so that every row runs every step
    tokens = dict(vocab_size=128, pad_token_id=0, eos_token_id=None, initializer_range=0.2)
    common = dict(tokens, hidden_size=64, intermediate_size=128, max_position_embeddings=64,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    return {
        # Mamba: the 2-D mask multiplies each mixer's input, whatever its length (its head untied
        # from the embeddings: tied, each token repeats the last)
        "mamba": (T.MambaConfig, T.MambaForCausalLM, dict(tokens, hidden_size=64, num_hidden_layers=2,
                                                          state_size=8, expand=2, tie_word_embeddings=False)),
        # Mamba-2 with attention layers between (Bamba), chunked scan, state and conv updated in place
        "bamba": (T.BambaConfig, T.BambaForCausalLM,
                  dict(common, num_hidden_layers=2, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32,
                       mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=8)),
        # gated delta rule (linear attention) beside grouped-query attention and experts
        "qwen3_next": (T.Qwen3NextConfig, T.Qwen3NextForCausalLM,
                       dict(common, num_hidden_layers=2, layer_types=["linear_attention", "full_attention"],
                            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                            linear_value_head_dim=16)),
        # attention and a state-space mixer in the same layer
        "falcon_h1": (T.FalconH1Config, T.FalconH1ForCausalLM,
                      dict(common, num_hidden_layers=2, mamba_n_heads=4, mamba_d_head=32, mamba_d_state=8,
                           mamba_n_groups=1, mamba_chunk_size=8, mamba_d_ssm=128)),
        # short convolutions only (a conv state, no recurrent one) beside attention
        "lfm2": (T.Lfm2Config, T.Lfm2ForCausalLM,
                 dict(common, num_hidden_layers=2, layer_types=["conv", "full_attention"], full_attn_idxs=[1])),
    }


@pytest.mark.parametrize("name", ["mamba", "bamba", "qwen3_next", "falcon_h1", "lfm2"])
def test_recurrent_decoders_generate_as_transformers_does(name, tmp_path):
    """Decoders whose layers keep a recurrent state (state-space models, linear attention, short
    convolutions, alone or beside attention): each state is a cache tensor the decode step reads
    and replaces whole. Left-padded prompts run in micro-batches at the least budget both
    programs fit: tokens equal transformers' greedy generate, the budget holds."""
    config_cls, model_cls, kw = _recurrent_decoders()[name]
    with quiet_transformers():
        torch.manual_seed(0)
        model = model_cls(config_cls(**kw)).eval()
    ids = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :6] = 0
    ids = ids.masked_fill(mask == 0, 0)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    kw = dict(batch=4, prompt_len=10, max_len=18, sample_ids=ids, hardware=FIXED_CPU, device="cpu")
    probe = memsched.Generator(model, "1GB", **kw)
    budget = max(p.min_budget_bytes for p in probe.plans)
    states = probe.decoder.state_names()
    probe.close()
    assert states and all(re.fullmatch(r"kv_cache\.(conv|state)\d+_\d+", n) for n in states)
    gen = memsched.Generator(model, budget, prefill_batch=2, offload_dir=tmp_path, **kw)
    try:
        tokens, stats = gen(ids, 8, attention_mask=mask, pad_token_id=0)
        shown = {row.label: row.cells[0] for section in generation_sections(gen, name) for row in section.rows}
    finally:
        gen.close()
    assert torch.equal(tokens, ref)
    assert stats.peak_device_bytes <= budget
    assert re.search(r"\d of 2 layers keep recurrent states", shown["KV cache"])


def test_a_recurrent_state_is_replaced_whole_by_each_step():
    """What a step writes: the slots of the keys and values along their length, every row of a
    recurrent state (memsched's host and disk copies take those, not a rewrite)."""
    config_cls, model_cls, kw = _recurrent_decoders()["bamba"]
    with quiet_transformers():
        model = model_cls(config_cls(**kw)).eval()
    ids = torch.ones(3, 4, dtype=torch.long)
    shapes, dtype = memsched.generation.kv_cache.cache_shapes(model, 3, 12, ids)
    assert shapes[0].kv is None and shapes[0].conv and shapes[0].recurrent
    assert shapes[1].kv is not None and not shapes[1].conv
    decoder = memsched.generation.kv_cache.CachedDecoder(model, shapes, dtype)
    groups = decoder.slot_groups(torch.tensor([5]))
    assert [(names, dim, index.tolist()) for names, dim, index in groups] == [
        (["kv_cache.k1", "kv_cache.v1"], 2, [5]), (["kv_cache.conv0_0", "kv_cache.state0_0"], 0, [0, 1, 2])]


def test_a_model_refusing_both_masks_before_its_layers_is_refused_clearly():
    """A decoder that builds its attention inputs from a 2-D mask as long as its input (no room
    for a cache) fails before its first layer with memsched's 4-D mask and with the 2-D mask over
    the cache's slots (BLOOM takes the latter): said as the model not going through
    transformers' attention interface, with the model's own error, before anything runs."""
    from transformers import LlamaForCausalLM

    class OwnMask(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
                raise ValueError(f"this model builds its own mask from a {list(input_ids.shape)} one")
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model, ids = _decoder("llama")
    with quiet_transformers():
        torch.manual_seed(0)
        own = OwnMask(model.config).eval()
    with pytest.raises(memsched.CaptureError, match="failed before its first attention layer.*ValueError"):
        memsched.generate(own, ids, budget="1GB", max_new_tokens=2, hardware=FIXED_CPU, device="cpu")


def test_a_layer_failing_after_it_wrote_the_cache_is_refused_clearly():
    """A layer whose MLP fails after its attention wrote memsched's cache (as a layer adding a
    bias it sized for transformers' own cache would; MPT did, until the ints it reads off its
    inputs were read as numbers): the refusal says how far the model got, with the model's own
    error."""
    model, ids = _decoder("llama")
    attention = model.model.layers[0].self_attn
    own = attention.forward

    def sized_for_another_cache(*args, **kwargs):
        out = own(*args, **kwargs)
        if type(kwargs.get("cache")).__module__.startswith("memsched"):
            raise RuntimeError("this layer's bias is sized for transformers' own cache")
        return out

    attention.forward = sized_for_another_cache
    with pytest.raises(memsched.CaptureError, match="failed after 1 of its 4 layers wrote .*RuntimeError"):
        memsched.generate(model, ids, budget="1GB", max_new_tokens=2, hardware=FIXED_CPU, device="cpu")


def _more_decoders():
    import transformers as T

    common = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=64)
    return {
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(common, num_key_value_heads=2, use_sliding_window=False)),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(common, num_key_value_heads=2, pad_token_id=0,
                                                        sliding_window=None)),
        "gpt_bigcode": (T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM,
                        dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, n_positions=64, multi_query=True)),
        "codegen": (T.CodeGenConfig, T.CodeGenForCausalLM,
                    dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64, n_ctx=64)),
        # GPT-Neo and Falcon compute attention themselves, over the cache the layer is handed
        "gpt_neo": (T.GPTNeoConfig, T.GPTNeoForCausalLM,
                    dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=64,
                         attention_types=[[["global", "local"], 1]], window_size=16)),
        "falcon": (T.FalconConfig, T.FalconForCausalLM, dict(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                                                             num_attention_heads=4)),
        # XGLM: sinusoidal positions checked against their table by a data-dependent comparison
        # (skipped when traced), and attention computed by the layer itself
        "xglm": (T.XGLMConfig, T.XGLMForCausalLM, dict(vocab_size=300, d_model=64, num_layers=2, attention_heads=4,
                                                       ffn_dim=128, max_position_embeddings=64)),
        "gptj": (T.GPTJConfig, T.GPTJForCausalLM,
                 dict(vocab_size=300, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=64)),
        # ALiBi biases built from the 2-D mask, attention computed by the layer itself
        "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(vocab_size=300, hidden_size=64, n_layer=2, n_head=4)),
        # attention beyond memsched's decode attention, so computed by the model over the cache
        # with the step's entries written in: soft-capped scores, sinks, and (DeepSeek's latent
        # attention) values padded to the keys' width after the cache update
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(common, num_key_value_heads=2, head_dim=16,
                                                             sliding_window=64)),
        "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM,
                    dict(common, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                         layer_types=["full_attention", "full_attention"])),
        "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM,
                        dict(common, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                             qk_nope_head_dim=8, v_head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1)),
        # differential attention: two attentions over halves of the values the cache hands back
        "diffllama": (T.DiffLlamaConfig, T.DiffLlamaForCausalLM, dict(common, num_key_value_heads=2, head_dim=16)),
        # ALiBi biases each layer sizes by the cache's length, read as a number (integer_reads.py)
        "mpt": (T.MptConfig, T.MptForCausalLM, dict(vocab_size=300, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)),
        # a per-head mask computed from the values the cache hands back: its fake decode step
        # fails inside memsched's decode attention, which decides the path and is no error
        "doge": (T.DogeConfig, T.DogeForCausalLM, dict(common, num_key_value_heads=2, head_dim=16)),
    }


ATTENDS_BY_ITSELF = {"gpt_neo", "falcon", "xglm", "gemma2", "gpt_oss", "deepseek_v3", "bloom", "diffllama", "mpt",
                     "doge"}
READS_THE_2D_MASK = {"bloom"}


@pytest.mark.parametrize("name", ["qwen2", "phi3", "gpt_bigcode", "codegen", "gpt_neo", "falcon", "xglm", "gptj",
                                  "gemma2", "gpt_oss", "deepseek_v3", "bloom", "diffllama", "mpt", "doge"])
def test_more_architectures_at_their_minimum_budget(name, tmp_path, caplog):
    """Other decoders (GQA, multi-query, partial rotary, and layers that compute attention
    themselves: handed each layer's cache with the step's entries written in) at the least
    budget both programs fit: tokens equal transformers' greedy generate. Finding how a model
    attends logs no error."""
    config_cls, model_cls, kw = _more_decoders()[name]
    with quiet_transformers():
        config = config_cls(**kw)
        config._attn_implementation = "sdpa" if model_cls._supports_sdpa else "eager"
        torch.manual_seed(0)
        model = model_cls(config).eval()
    ids = torch.randint(3, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    ref = _reference(model, ids, eos_token_id=None, pad_token_id=0, n=8)
    probe = memsched.Generator(model, "1GB", batch=2, prompt_len=8, max_len=16, sample_ids=ids, hardware=FIXED_CPU,
                               device="cpu")
    budget = max(p.min_budget_bytes for p in probe.plans)
    assert probe.decoder.attends_by_itself == (name in ATTENDS_BY_ITSELF)
    assert probe.decoder.mask_2d == (name in READS_THE_2D_MASK)
    probe.close()
    tokens, stats = memsched.generate(model, ids, budget=budget, max_new_tokens=8, eos_token_id=None, hardware=FIXED_CPU,
                                      device="cpu", offload_dir=tmp_path, return_stats=True)
    assert torch.equal(tokens, ref)
    assert stats.peak_device_bytes <= budget
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_an_alibi_decoder_generates_left_padded_prompts_as_transformers_does(tmp_path):
    """BLOOM builds its ALiBi biases from the 2-D mask (positions count real tokens only): it is
    handed that mask, and memsched's 4-D mask where it asks transformers for a causal one."""
    config_cls, model_cls, kw = _more_decoders()["bloom"]
    with quiet_transformers():
        torch.manual_seed(0)
        model = model_cls(config_cls(**kw)).eval()
    ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = mask[2, :1] = 0
    ids[mask == 0] = 0
    ref = _reference(model, ids, mask, eos_token_id=None, pad_token_id=0, n=10)
    probe = memsched.Generator(model, "1GB", batch=3, prompt_len=9, max_len=19, sample_ids=ids, hardware=FIXED_CPU,
                               device="cpu")
    budget = max(p.min_budget_bytes for p in probe.plans)
    probe.close()
    tokens, stats = memsched.generate(model, ids, attention_mask=mask, budget=budget, max_new_tokens=10,
                                      eos_token_id=None, pad_token_id=0, hardware=FIXED_CPU, device="cpu",
                                      offload_dir=tmp_path, return_stats=True)
    assert torch.equal(tokens, ref)
    assert stats.peak_device_bytes <= budget


def test_a_generation_is_planned_without_weights():
    """Both programs of a generation planned for a model on meta (nothing allocated, nothing
    run) on a GPU profile, as for a model larger than this machine; the decode plan is the one
    a Generator would run (same placement of the KV cache)."""
    model, ids = _decoder("llama")
    with quiet_transformers(), torch.device("meta"):
        meta = type(model)(model.config).eval()
    t4 = memsched.get_hardware("t4")
    budget = 700_000 + t4.workspace_bytes   # 700 KB for the tensors, beside cuBLAS's workspace
    prefill, decode = memsched.generation.plan_generation(meta, budget, batch=16, prompt_len=16, new_tokens=24,
                                                          hardware=t4)
    assert decode.peak_device_bytes <= budget and prefill.peak_device_bytes <= budget
    assert sum(decode.kind_tier_bytes("kv_cache").values()) == 4 * 2 * 16 * 2 * 40 * 32 * 4  # layers, k+v, b, h, len, d, fp32
    assert decode.kind_tier_bytes("kv_cache")["device"] < sum(decode.kind_tier_bytes("kv_cache").values())
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_transformers_4_is_refused_before_anything_runs(monkeypatch):
    from memsched.errors import UnsupportedModelError
    from memsched.generation import decoding

    model, ids = _decoder("gpt2")
    monkeypatch.setattr(decoding, "transformers_version", lambda: "4.57.3")
    with pytest.raises(UnsupportedModelError, match=r"transformers 5\.0 or newer.*4\.57\.3"):
        memsched.generate(model, ids, budget="1GB", max_new_tokens=2)


def test_a_budget_error_names_what_the_whole_generation_needs(tmp_path):
    """Below every minimum, the prompt's program fails first (one row at a time at the least),
    while the decode step (every row at once) can need more: the error names the larger
    minimum, so a retry at it plans both programs and generates transformers' tokens."""
    from memsched.errors import InfeasibleBudgetError
    from memsched.generation import plan_generation

    model, _ = _decoder("gpt2")
    ids = torch.randint(3, 1000, (6, 8), generator=torch.Generator().manual_seed(3))
    run = dict(max_new_tokens=4, eos_token_id=None, hardware=FIXED_CPU, device="cpu", offload_dir=tmp_path)
    with pytest.raises(InfeasibleBudgetError, match="the decode program") as info:
        memsched.generate(model, ids, budget=1000, **run)
    least = info.value.min_budget_bytes
    with pytest.raises(InfeasibleBudgetError, match="the decode program") as planned:
        plan_generation(model, 1000, batch=6, prompt_len=8, new_tokens=4, hardware=FIXED_CPU)
    assert planned.value.min_budget_bytes == least
    tokens, stats = memsched.generate(model, ids, budget=least, return_stats=True, **run)
    assert torch.equal(tokens, _reference(model, ids, eos_token_id=None, pad_token_id=0, n=4))
    assert stats.peak_device_bytes <= least


def test_a_decoder_reading_its_inputs_values_is_refused_by_name():
    """XLM as a decoder asserts ``lengths.max().item() <= slen``: the fake step that reads the
    cache's shapes cannot read that number, and says so instead of FakeTensor's internal error."""
    import transformers as T

    from memsched.errors import UnsupportedModelError
    with quiet_transformers():
        model = T.XLMWithLMHeadModel(T.XLMConfig(vocab_size=100, emb_dim=32, n_layers=1, n_heads=4,
                                                 max_position_embeddings=32, is_decoder=True)).eval()
    ids = torch.randint(3, 100, (1, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UnsupportedModelError, match=r"XLMWithLMHeadModel reads a tensor's value .*_local_scalar_dense"):
        memsched.generate(model, ids, budget="1GB", max_new_tokens=2, hardware=FIXED_CPU, device="cpu")


def test_a_prompt_whose_cache_entries_exceed_the_budget_generates(tmp_path):
    """The prompt's program returns every layer's new keys and values; they go to the cache on
    the host as they are made (host_outputs), so a prompt whose entries alone are more than the
    budget still runs, one sequence of it, with transformers' tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=16,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    with quiet_transformers():
        model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 100, (1, 128), generator=torch.Generator().manual_seed(4))
    entries = 128 * cfg.num_hidden_layers * 2 * cfg.hidden_size * 4   # the prompt's keys and values
    run = dict(max_new_tokens=4, eos_token_id=None, hardware=FIXED_CPU, device="cpu", offload_dir=tmp_path)
    least = _least_budget(model, batch=1, prompt_len=128, max_len=132, sample_ids=ids, hardware=FIXED_CPU,
                          device="cpu", offload_dir=tmp_path)
    assert least < entries // 2
    tokens, stats = memsched.generate(model, ids, budget=least, return_stats=True, **run)
    assert torch.equal(tokens, _reference(model, ids, eos_token_id=None, pad_token_id=0, n=4))
    assert stats.peak_device_bytes <= least
    assert stats.bytes_moved.get("disk_write", 0) >= entries // 2


def test_the_models_own_logits_processors_are_applied_as_transformers_applies_them(tmp_path):
    """transformers' generate applies the processors the model's generation config sets without
    being asked (a checkpoint's repetition penalty, a banned n-gram size): memsched.generate does
    too, so its tokens are the ones ``model.generate()`` gives, at a budget the cache leaves."""
    model, ids = _decoder("llama")
    model.generation_config.repetition_penalty = 1.5
    model.generation_config.no_repeat_ngram_size = 2
    ref = _reference(model, ids, eos_token_id=None, pad_token_id=0)
    budget = _least_budget(model, batch=3, prompt_len=10, max_len=10 + NEW_TOKENS, sample_ids=ids,
                           hardware=FIXED_CPU, device="cpu")
    tokens = memsched.generate(model, ids, budget=budget, max_new_tokens=NEW_TOKENS, eos_token_id=None,
                               pad_token_id=0, hardware=FIXED_CPU, device="cpu", offload_dir=tmp_path)
    assert torch.equal(tokens, ref)
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = None, None
    assert not torch.equal(memsched.generate(model, ids, budget="1GB", max_new_tokens=NEW_TOKENS, eos_token_id=None,
                                             pad_token_id=0, hardware=FIXED_CPU, device="cpu"), ref)


def test_logits_processors_passed_to_generate_apply_and_other_generate_arguments_are_refused():
    """Processor fields passed to memsched.generate (as to transformers' generate) apply over the
    model's config: a minimum length that holds back the end token greedy decoding picks first,
    a repetition penalty. Beam search, several sequences per prompt, max_length and streamers are
    refused by name before anything is planned, not taken for planning options."""
    model, ids = _decoder("llama")
    with torch.no_grad():
        eos = int(model(ids).logits[0, -1].argmax())   # row 0's first greedy token
    kw = dict(min_new_tokens=3, repetition_penalty=1.5, eos_token_id=eos, pad_token_id=0)
    ref = _reference(model, ids, **kw)
    assert not torch.equal(ref, _reference(model, ids, eos_token_id=eos, pad_token_id=0))
    tokens = memsched.generate(model, ids, budget="1GB", max_new_tokens=NEW_TOKENS, hardware=FIXED_CPU, device="cpu", **kw)
    assert torch.equal(tokens, ref)
    with pytest.raises(ValueError, match="strictly positive"):   # transformers' own check, before a plan
        memsched.generate(model, ids, budget="1GB", max_new_tokens=2, repetition_penalty=-1.0, hardware=FIXED_CPU)
    for extra, match in [({"num_beams": 2}, "num_beams"), ({"num_return_sequences": 2}, "num_return_sequences"),
                         ({"streamer": object()}, "streamer"), ({"max_length": 12}, "max_length counts the prompt")]:
        with pytest.raises(NotImplementedError, match=f"does not take transformers' .*{match}"):
            memsched.generate(model, ids, budget="1GB", **{"max_new_tokens": 2, **extra})


def test_a_decoder_whose_cache_has_more_layers_than_it_writes_generates():
    """BartForCausalLM (the decoder of an encoder-decoder family, run alone) makes its cache with
    one layer per *encoder* layer of its config (12) and writes two; its config forces the end
    token at the last step. Tokens equal transformers' generate, the empty layers planned for nothing."""
    import transformers as T

    with quiet_transformers():
        torch.manual_seed(0)
        model = T.BartForCausalLM(T.BartConfig(vocab_size=300, d_model=64, decoder_layers=2, decoder_attention_heads=4,
                                               decoder_ffn_dim=128, max_position_embeddings=64)).eval()
    assert model.generation_config.forced_eos_token_id == 2
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(2))
    ref = _reference(model, ids, eos_token_id=None, pad_token_id=0, n=8)
    assert (ref[:, -1] == 2).all()
    tokens, stats = memsched.generate(model, ids, budget="1GB", max_new_tokens=8, eos_token_id=None, pad_token_id=0,
                                      hardware=FIXED_CPU, device="cpu", return_stats=True)
    assert torch.equal(tokens, ref)
    gen = memsched.Generator(model, "1GB", batch=2, prompt_len=9, max_len=17, sample_ids=ids, hardware=FIXED_CPU,
                             device="cpu")
    try:
        assert gen.decoder.n_layers == 2
    finally:
        gen.close()
