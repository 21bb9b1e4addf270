"""Hugging Face's ``model.generate(...)`` routed to memsched: ``memsched.route_generate(model,
budget)`` puts a ``generate`` on the model instance that reads transformers' arguments
(``generation_config`` and its keyword overrides, as transformers merges them) and runs
memsched's decoding loop (decoding.py) on planned programs, so code and tools that call
``model.generate`` run inside the budget unchanged.

Why not transformers' own loop: it calls the model's forward with a cache object that grows
by a token every step, which memsched would have to plan once per length; memsched's loop
runs two programs (prompt, one token) over a cache placed for the whole generation.

What it takes: greedy decoding and sampling (``do_sample``, ``temperature``, ``top_k``,
``top_p``), ``max_new_tokens`` or ``max_length``, ``eos_token_id`` / ``pad_token_id``, an
``attention_mask``, and the generation-config fields transformers turns into logits processors
that read only the ids so far (``sampling.PROCESSED_FIELDS``: a repetition penalty, banned
words and n-grams, minimum lengths, forced and suppressed tokens, typical / min-p / epsilon /
eta sampling, sequence biases), applied by transformers' own processor list (sampling.Processed). Anything
else that would change the tokens (beam search, classifier-free guidance, processors passed
as objects, stopping criteria, streamers, returning scores or dicts) is refused with an error
naming it, before anything is planned: never a silent approximation. Generators are kept per
(batch, prompt length, new tokens), the last ``max_shapes`` of them.
"""
from __future__ import annotations

import copy
from collections import OrderedDict

import torch

from .decoding import _special_tokens, check_prompt, plan_generator, run_blocks
from .sampling import PROCESSED_FIELDS, Processed, processed_fields, sampling

# generation-config fields that do not change which tokens come out, or that the loop reads
_READ = {"max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
         "pad_token_id", "bos_token_id", "use_cache", "transformers_version", "_from_model_config",
         "return_legacy_cache", "cache_implementation"}
_MODEL_KWARGS = {"attention_mask"}
DEFAULT_NEW_TOKENS = 20   # transformers' when neither max_new_tokens nor max_length is set


class RoutedGenerate:
    """``model.generate`` running memsched's decoding loop inside ``budget`` (see the module)."""

    def __init__(self, model: torch.nn.Module, budget, *, max_shapes: int = 2, **options):
        if "generate" in vars(model):
            raise ValueError("model.generate is already replaced on this instance (routed already?)")
        self.model, self.budget, self.options, self.max_shapes = model, budget, options, max_shapes
        self._generators: OrderedDict = OrderedDict()
        model.generate = self

    def __call__(self, inputs: torch.Tensor | None = None, generation_config=None, **kwargs) -> torch.Tensor:
        config, model_kwargs = self._config(generation_config, kwargs)
        ids = model_kwargs.pop("input_ids", inputs)
        if not isinstance(ids, torch.Tensor):
            raise ValueError("memsched's generate takes the prompt as a (batch, length) tensor of token ids")
        mask = model_kwargs.get("attention_mask")
        new = _new_tokens(self.model, config, ids.shape[-1])
        if new < 1:
            raise ValueError(f"max_length {config.max_length} leaves no new token after a prompt of {ids.shape[-1]}: "
                             "pass max_new_tokens")
        check_prompt(self.model, ids, mask, new)
        eos, pad = _special_tokens(self.model, config.eos_token_id, config.pad_token_id)
        chosen = Processed(self.model, config, ids, mask, new) if processed_fields(config) else \
            sampling(self.model, bool(config.do_sample), config.temperature, config.top_k, config.top_p)
        gen = self._generator(ids, new)
        tokens, self.last_stats = run_blocks(gen, ids, new, mask, eos, pad, chosen)
        return tokens

    def _config(self, generation_config, kwargs):
        """transformers' merge: a copy of the given (or the model's) config, updated by the
        keyword arguments that name its fields; the rest are the model's inputs."""
        config = copy.deepcopy(generation_config if generation_config is not None else self.model.generation_config)
        model_kwargs = config.update(**kwargs)
        # (a field set to an off value -- False, None, 0, empty -- changes nothing: output_attentions=False)
        unread = sorted(k for k, v in config.to_diff_dict().items() if k not in _READ | PROCESSED_FIELDS and v)
        unread += sorted(k for k, v in model_kwargs.items() if k not in _MODEL_KWARGS | {"input_ids"} and v is not None)
        if unread:
            raise NotImplementedError(
                f"memsched's routed generate does not support {', '.join(unread)}: it runs greedy decoding or "
                "sampling (temperature, top_k, top_p) up to max_new_tokens with eos/pad tokens, an attention "
                "mask and the logits processors of the generation config's fields that read the ids so far "
                "(repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_new_tokens, ...); call the "
                "model's own generate (memsched.route_generate(...).close()) for the rest")
        return config, {k: v for k, v in model_kwargs.items() if v is not None}

    def _generator(self, ids: torch.Tensor, new: int):
        key = (tuple(ids.shape), new)
        if key in self._generators:
            self._generators.move_to_end(key)
            return self._generators[key]
        while len(self._generators) >= self.max_shapes:   # their threads and buffers go first
            self._generators.popitem(last=False)[1].close()
        with torch.random.fork_rng():   # planning draws nothing of the run's random numbers
            gen, _, _ = plan_generator(self.model, self.budget, ids, new, **self.options)
        self._generators[key] = gen
        return gen

    def close(self) -> None:
        """Give the model its own generate back and free the planned generators."""
        for gen in self._generators.values():
            gen.close()
        self._generators.clear()
        if vars(self.model).get("generate") is self:
            del self.model.generate

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _new_tokens(model, config, prompt_len: int) -> int:
    """As transformers 5 counts them: max_new_tokens; else max_length less the prompt; else 20,
    within the model's positions."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    if config.max_length is not None:
        return config.max_length - prompt_len
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return min(prompt_len + DEFAULT_NEW_TOKENS, limit if isinstance(limit, int) else 1 << 62) - prompt_len


def route_generate(model: torch.nn.Module, budget, **options) -> RoutedGenerate:
    """Make ``model.generate(...)`` run memsched's decoding loop inside ``budget`` device bytes
    (options as ``memsched.generate``'s: device, offload_dir, hardware, weights, block_size,
    goal, ...). Returns the installed callable; ``.close()`` (or leaving a ``with`` block)
    restores the model's own generate."""
    return RoutedGenerate(model, budget, **options)
