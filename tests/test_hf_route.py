"""memsched.route_generate: Hugging Face's ``model.generate(...)`` call, unchanged, running
memsched's decoding loop inside a budget; the same tokens as transformers' own generate, its
arguments merged as transformers merges them, anything else refused before planning."""
from __future__ import annotations

import pytest
import torch

import memsched
from helpers import FIXED_CPU
from zoo import quiet_transformers


@pytest.fixture(scope="module")
def decoder():
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                           pad_token_id=0, max_position_embeddings=64)
    with quiet_transformers():
        model = T.LlamaForCausalLM(config).eval()
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    return model, ids


def _least_budget(model, ids, new: int) -> int:
    """The least budget both programs fit: the KV cache leaves the device."""
    probe = memsched.Generator(model, 10**9, batch=ids.shape[0], prompt_len=ids.shape[1],
                               max_len=ids.shape[1] + new, sample_ids=ids, device="cpu", hardware=FIXED_CPU)
    try:
        return max(p.min_budget_bytes for p in probe.plans)
    finally:
        probe.close()


def test_generate_calls_give_transformers_tokens_and_reuse_their_plans(decoder, tmp_path):
    import transformers as T

    model, ids = decoder
    mask = torch.ones_like(ids)
    mask[0, :3] = 0   # left padding
    calls = {   # how a user calls generate, and what transformers' own generate returns for it
        "greedy": dict(max_new_tokens=6),
        "mask": dict(max_new_tokens=6, attention_mask=mask),
        "max_length": dict(max_length=14),
        "default length": dict(),
        "config": dict(generation_config=T.GenerationConfig(max_new_tokens=5, eos_token_id=2, pad_token_id=0)),
    }
    want = {k: model.generate(ids, **kw) for k, kw in calls.items()}
    budget = _least_budget(model, ids, 20)
    with memsched.route_generate(model, budget, device="cpu", hardware=FIXED_CPU, offload_dir=tmp_path) as routed:
        assert model.generate is routed
        for name, kw in calls.items():
            torch.testing.assert_close(model.generate(ids, **kw), want[name], rtol=0, atol=0, msg=name)
            assert routed.last_stats.peak_device_bytes <= budget
        assert len(routed._generators) == routed.max_shapes   # the last shapes' generators, not every one
        model.generate(input_ids=ids, max_new_tokens=4)
        planned = routed._generators[(tuple(ids.shape), 4)]
        model.generate(input_ids=ids, max_new_tokens=4)   # the same shape: planned already
        assert routed._generators[(tuple(ids.shape), 4)] is planned
    assert "generate" not in vars(model)   # the model's own generate is back
    torch.testing.assert_close(model.generate(ids, max_new_tokens=6), want["greedy"], rtol=0, atol=0)


def test_sampling_draws_as_transformers_does_seeded_alike(decoder):
    model, ids = decoder
    torch.manual_seed(5)
    want = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=10, temperature=0.7)
    with memsched.route_generate(model, "1GB", device="cpu", hardware=FIXED_CPU):
        torch.manual_seed(5)
        got = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=10, temperature=0.7)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize("kwargs", [
    dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2), dict(bad_words_ids=[[7], [9, 10]]),
    dict(min_new_tokens=4, eos_token_id=5), dict(forced_eos_token_id=2), dict(suppress_tokens=[3, 4]),
    dict(sequence_bias={(5,): 3.0}), dict(exponential_decay_length_penalty=(2, 1.5), eos_token_id=5),
], ids=lambda kw: ",".join(kw))
def test_logits_processors_of_the_config_choose_as_transformers_does(decoder, kwargs, block):
    """Fields transformers turns into logits processors (penalties, bans, minimum lengths,
    forced and suppressed tokens) are applied by its own processor list, block by block where
    a processor holds a value per row (the repetition penalty skips each row's left padding)."""
    model, ids = decoder
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=8, **kwargs)
    budget = _least_budget(model, ids, 8)
    with memsched.route_generate(model, budget, device="cpu", hardware=FIXED_CPU, block_size=block) as routed:
        got = model.generate(ids, attention_mask=mask, max_new_tokens=8, **kwargs)
        assert routed.last_stats.peak_device_bytes <= budget
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_sampling_through_logits_processors_draws_as_transformers_does(decoder):
    """min-p and a repetition penalty under sampling, with transformers' default top-k of 50
    the config leaves unset: seeded alike, the same tokens."""
    model, ids = decoder
    for kwargs in (dict(min_p=0.05), dict(repetition_penalty=1.5, typical_p=0.9)):
        torch.manual_seed(5)
        want = model.generate(ids, max_new_tokens=6, do_sample=True, **kwargs)
        with memsched.route_generate(model, "1GB", device="cpu", hardware=FIXED_CPU):
            torch.manual_seed(5)
            got = model.generate(ids, max_new_tokens=6, do_sample=True, **kwargs)
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=str(kwargs))


@pytest.mark.parametrize("kwargs, names", [
    (dict(num_beams=2), "num_beams"),
    (dict(guidance_scale=1.5), "guidance_scale"),
    (dict(return_dict_in_generate=True, output_scores=True), "output_scores, return_dict_in_generate"),
    (dict(streamer=object()), "streamer"),
    (dict(logits_processor=[object()]), "logits_processor"),
])
def test_what_would_change_the_tokens_is_refused_before_planning(decoder, kwargs, names):
    model, ids = decoder
    with memsched.route_generate(model, "1GB", device="cpu", hardware=FIXED_CPU) as routed:
        with pytest.raises(NotImplementedError, match=f"does not support {names}"):
            model.generate(ids, max_new_tokens=3, **kwargs)
        assert not routed._generators


def test_routing_twice_or_a_prompt_leaving_no_room_is_refused(decoder):
    model, ids = decoder
    with memsched.route_generate(model, "1GB", device="cpu", hardware=FIXED_CPU):
        with pytest.raises(ValueError, match="already replaced"):
            memsched.route_generate(model, "1GB")
        with pytest.raises(ValueError, match="leaves no new token"):
            model.generate(ids, max_length=5)
        with pytest.raises(ValueError, match="beyond the 64"):
            model.generate(ids, max_new_tokens=60)


def test_a_text_generation_pipeline_runs_through_the_route(decoder):
    """transformers' pipeline calls model.generate with its own arguments: the same texts."""
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    model, _ = decoder
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(96)]   # made here: no hub
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                          eos_token="</s>", unk_token="<unk>")
    with quiet_transformers():
        pipe = T.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    prompts = ["w1 w2 w3 w4", "w5 w6"]
    want = pipe(prompts, max_new_tokens=5, do_sample=False)
    with memsched.route_generate(model, "1GB", device="cpu", hardware=FIXED_CPU) as routed:
        assert pipe(prompts, max_new_tokens=5, do_sample=False) == want
        assert routed._generators   # (it ran memsched's loop, not the model's own)
