"""Greedy generation inside a memory budget: two planned programs, prefill and decode.

The decoder is wrapped with its KV cache as state (see kv_cache.py) and compiled once; the
prompt runs as one program (planned per prompt length), every new token as another whose
shapes never change (planned once). The planner places the weights *and* the KV cache across
device, host and disk like any other model tensors, so a cache that does not fit on the device
is streamed per layer. A run makes two plans whatever the number of new tokens.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from ..api import CompiledModule, outside_inference_mode
from ..api import plan as plan_program
from ..budget import format_bytes, parse_budget
from ..cost_models.hardware import get_hardware
from ..errors import InfeasibleBudgetError, UnsupportedModelError
from ..frontend.fake import meta_as_empty
from .blocks import choose_block
from .kv_cache import CachedDecoder, Window, cache_shapes, probe_attention, text_config
from .sampling import CONFIG, PROCESSED_FIELDS, from_model_config, greedy, sampling


@dataclass
class GenerationStats:
    """What one ``generate`` call did and measured."""

    plans: int = 0                  # programs the generator planned (prefill + decode: 2)
    plan_s: float = 0.0             # planning both programs (capture, solve, schedule)
    prompt_tokens: int = 0
    new_tokens: int = 0             # tokens generated per sequence
    batch: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    peak_device_bytes: int = 0      # the largest measured over every call
    bytes_moved: dict = field(default_factory=dict)
    kv_cache_bytes: int = 0
    block_size: int = 0             # sequences decoded together (0: the whole batch)
    blocks: list = field(default_factory=list)  # the candidate blocks priced ("auto")

    def absorb(self, other: "GenerationStats") -> None:
        """Add a block's run to these totals."""
        self.new_tokens = max(self.new_tokens, other.new_tokens)
        self.prefill_s += other.prefill_s
        self.decode_s += other.decode_s
        self.peak_device_bytes = max(self.peak_device_bytes, other.peak_device_bytes)
        self.kv_cache_bytes = other.kv_cache_bytes
        self.plans = other.plans
        for link, n in other.bytes_moved.items():
            self.bytes_moved[link] = self.bytes_moved.get(link, 0) + n

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens (all sequences) per second of prefill and decode (planning apart)."""
        total = self.prefill_s + self.decode_s
        return self.batch * self.new_tokens / total if total > 0 else 0.0

    def __str__(self) -> str:
        moved = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(self.bytes_moved.items()) if v)
        return (f"{self.batch}x{self.new_tokens} new tokens after {self.prompt_tokens} · "
                f"{self.tokens_per_s:.1f} tokens/s"
                + (f" · blocks of {self.block_size}" if self.block_size and self.block_size < self.batch else "")
                + f" · prefill {self.prefill_s * 1e3:.1f} ms · "
                f"decode {self.decode_s * 1e3:.1f} ms · plans {self.plans} ({self.plan_s:.2f} s) · "
                f"peak device {format_bytes(self.peak_device_bytes)} · KV cache "
                f"{format_bytes(self.kv_cache_bytes)}" + (f" · moved {moved}" if moved else ""))


OLDEST_TRANSFORMERS = 5   # major version: 4.x builds its masks and caches otherwise (tested: 5.17, 5.24)


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _check_decoder(model: torch.nn.Module, max_len: int) -> Window | None:
    """Refuse what memsched's KV cache cannot serve; the sliding window its masks apply, if any."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generate"):
        raise TypeError(f"memsched.generate takes a transformers causal language model, got "
                        f"{type(model).__name__}")
    version = transformers_version()
    if int(version.split(".")[0]) < OLDEST_TRANSFORMERS:
        raise UnsupportedModelError(
            f"memsched.generate needs transformers {OLDEST_TRANSFORMERS}.0 or newer (its cache and attention "
            f"interfaces); this is transformers {version}: pip install 'transformers>=5'")
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"{type(model).__name__} is an encoder-decoder; memsched.generate "
                                  "runs decoder-only models")
    text = text_config(model)
    # GPT-Neo names its layers "global" / "local" (attention_layers) and its window window_size;
    # its local layers mask by their own length-sized bias, not by transformers' masks
    own_masks = not getattr(text, "layer_types", None) and bool(getattr(text, "attention_layers", None))
    named = {"global": "full_attention", "local": "sliding_attention"}
    layers = getattr(text, "layer_types", None) or [named.get(t, t) for t in getattr(text, "attention_layers", ())]
    types = set(layers or ["full_attention"])
    window = getattr(text, "sliding_window", None) if getattr(text, "use_sliding_window", True) is not False else None
    if "sliding_attention" in types and not window:
        window = getattr(text, "window_size", None)
    # a sliding window as long as the whole generation masks nothing: such layers attend as
    # full-attention ones (a query at slot i sees the keys after slot i - window)
    # (a config naming its layers' types slides where they say so; one naming none, as Mistral's,
    # in every layer when it has a window)
    named_types = bool(getattr(text, "layer_types", None) or getattr(text, "attention_layers", None))
    slides_somewhere = "sliding_attention" in types if named_types else bool(window)
    sliding = slides_somewhere and not (window and max_len <= window)
    if types - {"full_attention", "sliding_attention", *RECURRENT_TYPES} or sliding and (own_masks or not window):
        other = sorted(types - {*named.values(), *RECURRENT_TYPES})   # chunked or indexed attention
        raise NotImplementedError(
            f"{type(model).__name__} has {', '.join(other) if other else 'sliding-window'} layers (layer types "
            f"{sorted(types)}, sliding window {window}) and this generation is {max_len} tokens long; "
            "memsched.generate's cache covers full-attention layers, sliding-window ones masked through "
            "transformers' mask interface, and recurrent layers (state-space, linear attention) that keep "
            "their states through transformers' cache interface")
    if not sliding:
        return None
    slides = tuple(t == "sliding_attention" for t in getattr(text, "layer_types", None) or ())
    return Window(int(window), mixed=any(slides) and not all(slides), layers=slides)


def step_inputs(ids: torch.Tensor, first_slot: int, max_len: int, positions=None, mask=None) -> tuple:
    """A step program's inputs for ``ids`` taking cache slots ``first_slot`` onwards; each its
    own tensor (inputs sharing memory would be captured with symbolic sizes)."""
    rows, q = ids.shape
    slots = torch.arange(first_slot, first_slot + q)
    if positions is None:
        positions = slots[None].expand(rows, q)
    if mask is None:
        mask = (torch.arange(max_len) < first_slot + q).long()[None].expand(rows, -1)
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in (ids, positions, slots, mask))


def plan_generation(model, budget, *, batch: int, prompt_len: int, new_tokens: int, hardware=None,
                    kv_head_chunks="auto", **options):
    """Plan the two programs of a generation without running anything (the model may live on
    meta, e.g. a 7B-shaped decoder for a GPU profile): (prefill plan, decode plan). The prompt
    is planned for the whole batch, or the largest divisor of it that fits."""
    max_len = prompt_len + new_tokens
    window = _check_decoder(model, max_len)
    ids = torch.zeros(1, 1, dtype=torch.long)
    with meta_as_empty(model):
        shapes, dtype = cache_shapes(model, batch, max_len, ids)
        attention = probe_attention(model, shapes, dtype, step_inputs(ids, 1, max_len))
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    choices = [kv_head_chunks]
    if kv_head_chunks == "auto":
        hw = get_hardware(hardware, "cuda" if torch.cuda.is_available() else "cpu")
        choices = head_chunk_choices(shapes, dtype, parse_budget(budget, hw.device_bytes, over_capacity=True))
    where = "meta" if on_meta else "cpu"
    for i, chunks in enumerate(choices):
        decoder = CachedDecoder(model, shapes, dtype, device=where, head_chunks=chunks,
                                attention=attention, window=window).eval()

        def plan(rows: int, q: int, first: int, decoder=decoder):
            return plan_program(decoder, step_inputs(ids.expand(rows, q), first, max_len), budget,
                                hardware=hardware, host_outputs=True, **options)

        divisors = [d for d in range(batch, 0, -1) if batch % d == 0]
        for j, rows in enumerate(divisors):  # (its errors are final: the prompt never reads the cache)
            try:
                prefill = _named("prefill", plan, rows, prompt_len, 0)
                break
            except InfeasibleBudgetError as exc:
                if j == len(divisors) - 1:
                    finest = CachedDecoder(model, shapes, dtype, device=where, head_chunks=choices[-1],
                                           attention=attention, window=window).eval()
                    raise _generation_minimum(exc, lambda: _named("decode", plan, batch, 1, prompt_len, finest)) \
                        from None
        try:
            return prefill, _named("decode", plan, batch, 1, prompt_len)
        except InfeasibleBudgetError:  # a finer grouping may fit
            if i == len(choices) - 1:
                raise


def _named(program: str, plan, *args):
    """``plan(*args)``, its budget error naming the program (prefill or decode)."""
    try:
        return plan(*args)
    except InfeasibleBudgetError as exc:
        exc.args = (f"the {program} program: {exc.args[0]}",) + exc.args[1:]
        raise


def _generation_minimum(prefill_error: InfeasibleBudgetError, plan_decode) -> InfeasibleBudgetError:
    """The error for a prompt's program that does not fit even one row at a time. Its minimum
    is the prompt's alone; the decode step (every row at once, reading the cache) can bind
    higher, so it is planned too (at the finest grouping of the cache) and the error with the
    larger minimum is raised: a retry at that minimum plans both programs."""
    try:
        plan_decode()
    except InfeasibleBudgetError as decode_error:
        if decode_error.min_budget_bytes > prefill_error.min_budget_bytes:
            return decode_error
    return prefill_error


# layer types whose cache is a recurrent state (or none), checked against the cache the model makes
RECURRENT_TYPES = ("linear_attention", "conv", "hybrid", "mlp", "moe")


def head_chunk_choices(shapes, dtype: torch.dtype, budget_bytes: int) -> list[int]:
    """The groupings of kv heads each layer's cache may be kept in, to plan in order: first the
    fewest that make every cache tensor at most a quarter of the budget, so that the planner can
    move part of a layer's cache without the rest (one tensor per layer when that already
    holds), then each finer one, tried when a coarser one leaves the decode step over the budget.
    Fewer groups mean fewer program lines and transfers per step (at batch 32 here, four groups
    instead of eight cut a decode step by about a tenth)."""
    kv = [layer.kv for layer in shapes if layer.kv is not None]
    if not kv:   # a state-space model: no keys and values to group
        return [1]
    heads = kv[0][0][1]
    largest = max(s.numel() for pair in kv for s in pair) * dtype.itemsize
    divisors = [c for c in range(1, heads + 1) if heads % c == 0]
    first = next((c for c in divisors if largest // c <= budget_bytes // 4), heads)
    return [c for c in divisors if c >= first]


class Generator:
    """A decoder compiled for generation at one batch size, prompt length and maximum length:
    both programs are planned at construction (``plans``: prefill, decode), and the generator
    can be called again for any prompt of that shape."""

    @outside_inference_mode()   # its KV cache is written between calls
    def __init__(self, model, budget, *, batch: int, prompt_len: int, max_len: int, sample_ids: torch.Tensor,
                 device=None, offload_dir=None, hardware=None, weights=None, prefill_batch: int | None = None,
                 kv_head_chunks="auto", **options):
        window = _check_decoder(model, max_len)
        if model.training:
            raise ValueError("memsched.generate needs the model in eval mode (call model.eval())")
        if not 0 < prompt_len < max_len:
            raise ValueError(f"a prompt of {prompt_len} tokens leaves no room in {max_len}")
        with meta_as_empty(model):  # a model on meta (weights=...) is sized like a real one
            shapes, dtype = cache_shapes(model, batch, max_len, sample_ids)
            attention = probe_attention(model, shapes, dtype, step_inputs(sample_ids[:1, :1].cpu(), 1, max_len))
        home = next((p.device for p in model.parameters()), torch.device("cpu"))
        home = torch.device("cpu") if home.type == "meta" else home  # the cache is real, on the host
        self.batch, self.prompt_len, self.max_len = batch, prompt_len, max_len

        def compiled(chunks: int) -> CompiledModule:
            self.decoder = CachedDecoder(model, shapes, dtype, device=home, head_chunks=chunks,
                                         attention=attention, window=window).eval()
            # the step's new cache entries go to the cache on the host as they are made (a long
            # prompt's, across every layer, would otherwise be held on the device to the end)
            return CompiledModule(self.decoder, budget, device=device, offload_dir=offload_dir, hardware=hardware,
                                  max_plans=2, weights=weights, weights_prefix="model.", host_outputs=True,
                                  **options)

        self.compiled = compiled(1 if kv_head_chunks == "auto" else kv_head_chunks)
        choices = [kv_head_chunks] if kv_head_chunks != "auto" else \
            head_chunk_choices(shapes, dtype, self.compiled.budget_bytes)  # the budget is parsed now
        t0 = time.perf_counter()
        ids = sample_ids[:1, :1].cpu()
        try:
            with torch.no_grad():
                for i, chunks in enumerate(choices):
                    if chunks != self.decoder.head_chunks:
                        self.compiled.close()
                        self.compiled = compiled(chunks)
                    try:
                        prefill = self._plan_prefill(ids, prompt_len, prefill_batch)  # (the cache is not read)
                    except InfeasibleBudgetError as exc:
                        raise _generation_minimum(exc, lambda: self._plan_finest_decode(compiled, choices[-1], ids)) \
                            from None
                    try:
                        self.plans = (prefill, self._prepare("decode", ids.expand(batch, 1), prompt_len))
                        break
                    except InfeasibleBudgetError:  # a finer grouping may fit
                        if i == len(choices) - 1:
                            raise
        except BaseException:
            self.compiled.close()
            raise
        self.kv_cache_bytes = sum(t.numel() * t.element_size() for t in self.decoder.tensors())
        self.plan_s = time.perf_counter() - t0

    def __repr__(self) -> str:
        groups = self.decoder.head_chunks
        return (f"Generator({type(self.decoder.model).__name__}, batch {self.batch}, prompt {self.prompt_len}, "
                f"max length {self.max_len}, budget {format_bytes(self.compiled.budget_bytes)}, prefill "
                f"micro-batch {self.prefill_batch}, KV cache {format_bytes(self.kv_cache_bytes)} in "
                f"{groups} group{'s' if groups > 1 else ''} of heads per layer)")

    def _plan_prefill(self, ids: torch.Tensor, prompt_len: int, prefill_batch):
        """Plan the prompt's program for the largest micro-batch (a divisor of the batch, or
        ``prefill_batch``) that fits the budget: a prompt's activations and new cache entries grow
        with the rows it runs, and the rows run one micro-batch after another."""
        sizes = [prefill_batch] if prefill_batch else [d for d in range(self.batch, 0, -1) if self.batch % d == 0]
        if prefill_batch is not None and (prefill_batch < 1 or self.batch % prefill_batch):
            raise ValueError(f"prefill_batch must divide the batch ({self.batch}), got {prefill_batch}")
        for i, rows in enumerate(sizes):
            try:
                plan = self._prepare("prefill", ids.expand(rows, prompt_len), 0)
            except InfeasibleBudgetError:
                if i == len(sizes) - 1:
                    raise
                continue
            self.prefill_batch = rows
            return plan

    def _plan_finest_decode(self, compiled, chunks: int, ids: torch.Tensor):
        """Plan the decode step with the cache in its finest grouping (for the error of a prompt
        that does not fit: what the generation needs in all)."""
        if chunks != self.decoder.head_chunks:
            self.compiled.close()
            self.compiled = compiled(chunks)
        return self._prepare("decode", ids.expand(self.batch, 1), self.prompt_len)

    def _prepare(self, program: str, ids: torch.Tensor, first_slot: int):
        return _named(program, self.compiled.prepare, *self._inputs(ids, first_slot))

    def _inputs(self, ids: torch.Tensor, first_slot: int, positions=None, mask=None) -> tuple:
        return step_inputs(ids, first_slot, self.max_len, positions, mask)

    def _call(self, stats: GenerationStats, inputs: tuple, rows: slice = slice(None)):
        logits, new = self.compiled(*inputs)
        stats.plans = self.compiled.plans_made
        run = self.compiled.stats
        stats.peak_device_bytes = max(stats.peak_device_bytes, run.peak_device_bytes)
        for link, n in run.bytes_moved.items():
            stats.bytes_moved[link] = stats.bytes_moved.get(link, 0) + n
        self.compiled.wait_patched()  # the last patch's checksums read the cache: before writing it
        self.decoder.write(inputs[2], new, rows)
        # the next token is chosen on the host: a micro-batch's logits kept for the next ones, the
        # last step's kept through the next, and the sampling warpers' temporaries (a float32
        # copy, top-p's sort, the softmax: several times the logits) would be device memory
        # outside every plan
        return logits.cpu()

    def _prefill(self, stats: GenerationStats, input_ids, positions, mask) -> torch.Tensor:
        """The prompt, one micro-batch after another, into a cleared cache; memsched's copies
        of the cache are brought up to date once at the end."""
        self.compiled.wait_patched()
        self.decoder.reset()  # no stale entries (say a previous run's NaN) behind the mask
        logits = []
        for r in range(0, self.batch, self.prefill_batch):
            rows = slice(r, r + self.prefill_batch)
            logits.append(self._call(stats, self._inputs(input_ids[rows], 0, positions[rows], mask[rows]), rows))
        self._patched(torch.arange(self.max_len))
        return torch.cat(logits)

    @torch.no_grad()
    @outside_inference_mode()
    def __call__(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask=None,
                 eos_token_id=None, pad_token_id=None, sampling=None) -> tuple[torch.Tensor, GenerationStats]:
        """Generate ``max_new_tokens`` after each prompt: greedy, or drawn as ``sampling``
        (a generation.sampling.Sampling) says."""
        check_prompt(self.decoder.model, input_ids, attention_mask, max_new_tokens)
        B, P = input_ids.shape
        if B != self.batch or P != self.prompt_len or P + max_new_tokens > self.max_len:
            raise ValueError(f"this generator was planned for batch {self.batch}, prompts of "
                             f"{self.prompt_len} tokens and {self.max_len} tokens in all; got batch {B} "
                             f"with {P} + {max_new_tokens} tokens")
        stats = GenerationStats(prompt_tokens=P, batch=B, kv_cache_bytes=self.kv_cache_bytes,
                                plan_s=self.plan_s)
        input_ids = input_ids.cpu()
        prompt_mask = torch.ones(B, P, dtype=torch.long) if attention_mask is None else attention_mask.cpu().long()
        mask = torch.zeros(B, self.max_len, dtype=torch.long)
        mask[:, :P] = prompt_mask
        # positions count real tokens only, as transformers' generate does for left padding
        positions = (prompt_mask.cumsum(-1) - 1).masked_fill(prompt_mask == 0, 1)
        eos = torch.tensor(sorted(_token_set(eos_token_id)), dtype=torch.long)
        pad = torch.tensor(pad_token_id if pad_token_id is not None else 0)
        out = [input_ids]
        t0 = time.perf_counter()
        logits = self._prefill(stats, input_ids, positions, mask)
        stats.prefill_s, t0 = time.perf_counter() - t0, time.perf_counter()
        with contextlib.ExitStack() as trusted:
            choose = greedy if sampling is None else sampling.choose
            self._decode(stats, logits, P, max_new_tokens, positions, mask, eos, pad, out, trusted, choose)
        stats.decode_s = time.perf_counter() - t0
        return torch.cat(out, dim=1), stats

    def _decode(self, stats, logits, P, max_new_tokens, positions, mask, eos, pad, out, trusted, choose) -> None:
        unfinished = torch.ones(self.batch, dtype=torch.bool)
        for step in range(max_new_tokens):
            if step == 1:  # both programs have run once, checking every copy: trust the loop
                trusted.enter_context(self.compiled.unchanged_weights())
            token = choose(logits, out)
            logits = None   # not held through the next step (on a CPU it is the program's output)
            if len(eos):
                token = torch.where(unfinished, token, pad)
                unfinished &= ~torch.isin(token, eos)
            out.append(token[:, None])
            stats.new_tokens = step + 1
            if step == max_new_tokens - 1 or not unfinished.any():
                break
            mask[:, P + step] = 1
            inputs = self._inputs(token[:, None], P + step, positions[:, -1:] + step + 1, mask)
            logits = self._call(stats, inputs)
            self._patched(inputs[2])  # memsched's copies take the new slots only

    def _patched(self, slots: torch.Tensor) -> None:
        for names, dim, index in self.decoder.slot_groups(slots):
            self.compiled.patched(names, dim, index)

    def close(self) -> None:
        self.compiled.close()


def _token_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        return {int(x) for x in eos_token_id.flatten()}
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(x) for x in eos_token_id}


def generate(model, input_ids: torch.Tensor, *, budget, max_new_tokens: int | None = None, attention_mask=None,
             weights=None, device=None, offload_dir=None, hardware=None, eos_token_id="config",
             pad_token_id="config", block_size=None, goal: str = "throughput", return_stats: bool = False,
             do_sample: bool = False, temperature=CONFIG, top_k=CONFIG, top_p=CONFIG, **options):
    """Greedy (or sampled) decoding of a transformers causal LM inside ``budget`` device bytes.

    Returns the prompt followed by the new tokens, (batch, prompt + new), as transformers'
    ``model.generate(..., do_sample=False)`` does (sequences that reach an end-of-sequence token
    are padded with ``pad_token_id`` after it; generation stops when all have); with
    ``return_stats=True`` a ``(tokens, GenerationStats)`` pair. ``eos_token_id`` and
    ``pad_token_id`` default to the model's generation config; pass None to never stop early.
    Logits processors the model's generation config sets (a repetition penalty, a forced end
    token) are applied as transformers' generate applies them, unasked; the generation-config
    fields that make them (``sampling.PROCESSED_FIELDS``: ``repetition_penalty``,
    ``no_repeat_ngram_size``, ``min_new_tokens``, ``bad_words_ids``, ...) may also be passed here,
    over the config's. Other arguments of transformers' generate (beam search, several sequences
    per prompt, ``max_length``, streamers) are refused by name before anything is planned.
    Two programs are planned (prompt, then one for every new token), and the KV cache for
    prompt + new tokens is placed by the planner with the weights. ``weights=``: a safetensors
    checkpoint for a model built on the meta device (see ``memsched.compile``).
    ``block_size``: sequences that decode together (None: the whole batch; an int dividing the
    batch; "auto": planned for ``goal``, "throughput" or "latency", see blocks.py); blocks run
    one after another through the same two plans.
    ``do_sample=True`` draws each token as transformers' ``generate(do_sample=True)`` does:
    its warpers for ``temperature``, ``top_k`` and ``top_p`` (by default the model's generation
    config's), softmax, ``torch.multinomial`` on the global RNG. Planning leaves the RNG as it
    found it, so seeded as transformers' run, the draws are the same (rows drawn together: with
    ``block_size`` below the batch the blocks draw one after another, in another order).
    """
    processors = _processor_fields(options)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    check_prompt(model, input_ids, attention_mask, max_new_tokens)
    eos_token_id, pad_token_id = _special_tokens(model, eos_token_id, pad_token_id)
    chosen = sampling(model, do_sample, temperature, top_k, top_p)
    chosen = from_model_config(model, input_ids, attention_mask, max_new_tokens, do_sample, eos_token_id, pad_token_id,
                               processors, temperature=temperature, top_k=top_k, top_p=top_p) or chosen
    with torch.random.fork_rng():   # planning (a calibration's random operands) draws nothing of the run's
        gen, tried, made = plan_generator(model, budget, input_ids, max_new_tokens, block_size=block_size,
                                          goal=goal, device=device, offload_dir=offload_dir, hardware=hardware,
                                          weights=weights, **options)
    try:
        tokens, stats = run_blocks(gen, input_ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id,
                                   chosen)
    finally:
        gen.close()
    stats.plans, stats.plan_s = sum(n for n, _ in made), sum(t for _, t in made)
    stats.blocks = [c.describe(max_new_tokens) for c in tried]
    return (tokens, stats) if return_stats else tokens


def plan_generator(model, budget, input_ids: torch.Tensor, max_new_tokens: int, *, block_size=None,
                   goal: str = "throughput", **options):
    """The Generator for ``input_ids``'s prompts at the block size asked for (see ``generate``);
    also the candidate blocks priced ("auto") and, per generator planned, (plans, seconds)."""
    B, P = input_ids.shape
    made = []

    def make(rows: int) -> Generator:
        gen = Generator(model, budget, batch=rows, prompt_len=P, max_len=P + max_new_tokens,
                        sample_ids=input_ids, **options)
        made.append((gen.compiled.plans_made, gen.plan_s))
        return gen

    gen, tried = _block_generator(make, block_size, goal, B, max_new_tokens)
    return gen, tried, made


def _processor_fields(options: dict) -> dict:
    """Takes the logits-processor fields out of ``options`` (what is left goes to the planner);
    any other argument of transformers' generate is refused by name: planning would take it
    for an option of its own and fail on it, far from the call."""
    from transformers import GenerationConfig

    processors = {k: options.pop(k) for k in list(options) if k in PROCESSED_FIELDS}
    theirs = sorted(k for k in options if k in GenerationConfig().to_dict() or k in _GENERATE_ONLY)
    if theirs:
        hint = " (max_length counts the prompt: pass max_new_tokens)" if "max_length" in theirs else ""
        raise NotImplementedError(
            f"memsched.generate does not take transformers' {', '.join(theirs)}{hint}: it runs greedy decoding "
            "or sampling (temperature, top_k, top_p) for max_new_tokens, with eos/pad tokens, an attention mask "
            "and the logits processors of repetition_penalty, no_repeat_ngram_size, min_new_tokens, bad_words_ids, ... "
            "(sampling.PROCESSED_FIELDS); call the model's own generate, outside memsched, for the rest")
    return processors


# arguments of transformers' generate that are not generation-config fields
_GENERATE_ONLY = {"generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn",
                  "synced_gpus", "assistant_model", "streamer", "negative_prompt_ids",
                  "negative_prompt_attention_mask", "custom_generate", "tokenizer", "past_key_values"}


def check_prompt(model, input_ids, attention_mask, max_new_tokens: int) -> None:
    """Clear errors, before anything is planned or run, for prompts the model cannot take."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (batch, prompt length) tensor of token ids")
    if input_ids.dtype not in (torch.int64, torch.int32) or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must hold at least one token per sequence as int64 or int32 ids, got "
                         f"{list(input_ids.shape)} {input_ids.dtype}")
    text = text_config(model)
    vocab = getattr(text, "vocab_size", None)
    if isinstance(vocab, int) and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
        raise ValueError(f"input_ids holds ids outside the model's vocabulary [0, {vocab}): "
                         f"{int(input_ids.min())}..{int(input_ids.max())}")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask is {list(attention_mask.shape)}, input_ids {list(input_ids.shape)}: "
                         "they must have the same shape")
    limit = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(text, k, None), int)), None)
    total = input_ids.shape[1] + max_new_tokens
    if limit is not None and total > limit:
        raise ValueError(f"{input_ids.shape[1]} prompt tokens + {max_new_tokens} new ones = {total} positions, "
                         f"beyond the {limit} the model's config allows")


def _special_tokens(model, eos_token_id, pad_token_id):
    config = getattr(model, "generation_config", None)
    if eos_token_id == "config":
        eos_token_id = getattr(config, "eos_token_id", None)
    if pad_token_id == "config":
        pad_token_id = getattr(config, "pad_token_id", None)
        if pad_token_id is None and eos_token_id is not None:
            pad_token_id = next(iter(sorted(_token_set(eos_token_id))))
    return eos_token_id, pad_token_id


def _block_generator(make, block_size, goal: str, batch: int, new_tokens: int):
    if block_size == "auto":
        return choose_block(make, batch, new_tokens, goal)
    if block_size is None:
        return make(batch), []
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1 or batch % block_size:
        raise ValueError(f"block_size must be None, 'auto' or a positive int dividing the batch ({batch}), "
                         f"got {block_size!r}")
    return make(block_size), []


def run_blocks(gen: Generator, input_ids, max_new_tokens, attention_mask, eos_token_id, pad_token_id,
               sampling=None):
    """Every block of rows through ``gen``; sequences of blocks that stopped early are padded."""
    outs, total = [], GenerationStats(prompt_tokens=input_ids.shape[1], batch=input_ids.shape[0],
                                      block_size=gen.batch, plan_s=gen.plan_s)
    for r in range(0, input_ids.shape[0], gen.batch):
        rows = slice(r, r + gen.batch)
        chosen = sampling.rows(rows) if hasattr(sampling, "rows") else sampling   # (processors hold rows)
        tokens, stats = gen(input_ids[rows], max_new_tokens, None if attention_mask is None else attention_mask[rows],
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id, sampling=chosen)
        outs.append(tokens)
        total.absorb(stats)
    width = max(t.shape[1] for t in outs)
    pad = pad_token_id if pad_token_id is not None else 0
    outs = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=pad) for t in outs]
    return torch.cat(outs), total
