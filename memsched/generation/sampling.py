"""How the next token is chosen from a step's logits: greedy (the argmax), or sampled as
transformers' ``generate(do_sample=True)`` samples, with transformers' own logits warpers
(temperature, then top-k, then top-p, each where it changes anything), a softmax in float32 and
one ``torch.multinomial`` draw per row on the global RNG. A run seeded as transformers' run is
therefore drawn from the same numbers: on the same logits, the same tokens. With logits
processors (a repetition penalty, banned words, a minimum length, ...: ``Processed``), the list
transformers' own generate builds for the same generation config scores each step first.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

CONFIG = "config"   # a setting taken from the model's generation config, as transformers takes it


@dataclass(frozen=True)
class Sampling:
    """The sampling settings of a run; ``warpers`` is transformers' LogitsProcessorList of them."""

    temperature: float
    top_k: int | None
    top_p: float | None
    warpers: object = field(repr=False, compare=False, default=None)

    def choose(self, logits: torch.Tensor, so_far: list[torch.Tensor]) -> torch.Tensor:
        """One token per row of ``logits`` (batch, vocab); ``so_far``: the ids until now, as
        (batch, n) pieces (the warpers are handed them joined, as transformers hands them)."""
        scores = self.warpers(torch.cat(so_far, dim=1), logits.to(dtype=torch.float32, copy=True))
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def greedy(logits: torch.Tensor, so_far: list[torch.Tensor]) -> torch.Tensor:
    return logits.argmax(-1)


# generation-config fields transformers' generate turns into logits processors reading the ids so far
PROCESSED_FIELDS = {"repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                    "begin_suppress_tokens", "min_length", "min_new_tokens", "forced_bos_token_id",
                    "forced_eos_token_id", "sequence_bias", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_p",
                    "exponential_decay_length_penalty", "renormalize_logits", "remove_invalid_values"}


def processed_fields(config) -> list[str]:
    """The fields of ``config`` (a GenerationConfig) set to make logits processors."""
    return [k for k, v in config.to_diff_dict().items() if k in PROCESSED_FIELDS and v is not None]


# transformers' documented defaults, for a generation config that leaves a setting unset
_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def _setting(value, config, name: str):
    """``value``, or where it is ``"config"`` what transformers' generate would use: the model's
    generation config, else transformers' global default (version 5 keeps those apart)."""
    if not (isinstance(value, str) and value == CONFIG):
        return value
    own = getattr(config, name, None)
    if own is not None:
        return own
    defaults = getattr(config, "_get_default_generation_params", None)
    return (defaults() if callable(defaults) else {}).get(name, _DEFAULTS[name])


def sampling(model, do_sample: bool, temperature=CONFIG, top_k=CONFIG, top_p=CONFIG) -> Sampling | None:
    """The run's Sampling, or None for greedy decoding. Settings left at ``"config"`` come from
    the model's generation config; transformers' warpers check the values (ValueError)."""
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if not do_sample:
        return None
    from transformers.generation.logits_process import (
        LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    config = getattr(model, "generation_config", None)
    t, k, p = (_setting(temperature, config, "temperature"), _setting(top_k, config, "top_k"),
               _setting(top_p, config, "top_p"))
    if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0):
        raise ValueError(f"temperature must be a number above 0, got {t!r}")
    if k is not None and not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0: no top-k), got {k!r}")
    if p is not None and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 < p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
    warpers = LogitsProcessorList()
    if t is not None and t != 1.0:
        warpers.append(TemperatureLogitsWarper(t))
    if k is not None and k != 0:
        warpers.append(TopKLogitsWarper(top_k=k))
    if p is not None and p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=p))
    return Sampling(1.0 if t is None else t, k, p, warpers)


@dataclass(frozen=True)
class Processed:
    """Tokens chosen as transformers' decoding loop chooses them under logits processors: the
    ``LogitsProcessorList`` its generate builds from the same generation config (penalties,
    banned words and n-grams, minimum lengths, forced tokens, suppressed tokens and, when
    sampling, the warpers, in its order) scores a float32 copy of each step's logits given the
    ids so far; then the argmax, or one multinomial draw per row. Some processors hold a value
    per row (the repetition penalty, each row's left padding): ``rows`` makes the list for a
    block of rows."""

    model: object = field(repr=False)
    config: object = field(repr=False)
    input_ids: torch.Tensor = field(repr=False)
    attention_mask: torch.Tensor | None = field(repr=False)
    new_tokens: int = 0
    processors: object = field(repr=False, default=None)

    def rows(self, rows: slice) -> "Processed":
        ids = self.input_ids[rows]
        mask = None if self.attention_mask is None else self.attention_mask[rows]
        # the config as transformers' generate completes it: its global defaults where unset
        # (sampling's top_k of 50), the length the run ends at, the special tokens as tensors
        config = copy.deepcopy(self.config)
        defaults = getattr(config, "_get_default_generation_params", None)
        if callable(defaults):
            config.update(**defaults(), defaults_only=True)
        config.max_length = ids.shape[-1] + self.new_tokens
        self.model._prepare_special_tokens(config, mask is not None, device=ids.device)
        processors = self.model._get_logits_processor(
            generation_config=config, input_ids_seq_length=ids.shape[-1], encoder_input_ids=ids, device=ids.device,
            model_kwargs={} if mask is None else {"attention_mask": mask})
        return Processed(self.model, self.config, ids, mask, self.new_tokens, processors)

    def choose(self, logits: torch.Tensor, so_far: list[torch.Tensor]) -> torch.Tensor:
        if self.processors is None:   # (made once per block, never per step)
            raise RuntimeError("Processed.choose needs the processors of its rows: call .rows(rows) first")
        scores = self.processors(torch.cat(so_far, dim=1), logits.to(dtype=torch.float32, copy=True))
        if self.config.do_sample:
            return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        return scores.argmax(-1)


def from_model_config(model, input_ids: torch.Tensor, attention_mask, new_tokens: int, do_sample: bool,
                      eos_token_id, pad_token_id, processors: dict | None = None,
                      **settings) -> "Processed | None":
    """``Processed`` for a run of ``memsched.generate`` on a model whose own generation config
    sets logits processors (BartForCausalLM's ``forced_eos_token_id``, a checkpoint's
    ``repetition_penalty``), as transformers' generate applies them unasked, or given them in
    ``processors`` (fields of ``PROCESSED_FIELDS`` over the config's, as transformers merges a
    generate call's keyword arguments); None where neither sets any. ``settings`` (temperature,
    top_k, top_p) left at ``"config"`` keep the config's."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    config = copy.deepcopy(own) if own is not None else GenerationConfig()
    if processors:
        config.update(**processors)
    if not processed_fields(config):
        return None
    config.do_sample = do_sample
    for name, value in settings.items():
        if not (isinstance(value, str) and value == CONFIG):
            setattr(config, name, value)
    config.eos_token_id, config.pad_token_id = eos_token_id, pad_token_id
    chosen = Processed(model, config, input_ids, attention_mask, new_tokens)
    chosen.rows(slice(None))   # transformers' processors check their values (a negative penalty) before any plan
    return chosen
