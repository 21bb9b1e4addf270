"""The KV cache as model state: a decoder wrapped so that each step is a pure function.

``CachedDecoder`` owns one key and one value tensor per attention layer, sized for the whole
generation (batch, kv heads, max length, head dim) and registered as buffers of kind
``kv_cache``. A step reads them (read-only: the planner homes and streams them like weights,
on the device, in host RAM or on disk), writes the step's new keys and values into a
functional copy for its own attention, and returns those new entries; the generation loop
then writes them into the cache's slots between steps (``write``). So one captured program
serves every decode step (the shapes never change: no plan per length), nothing in the graph
mutates state, and the new entries are small outputs. A prompt's program attends to the
prompt alone and never reads the cache. Slots past the current position may hold a previous
run's entries: the mask gives them exactly zero weight, so the cache is never cleared.

The attention mask is built here as a 4-D additive mask over the whole cache (padding from
the 2-D mask, causality from each query's slot), so transformers' own mask code, which would
read the cache's length as a Python number and bake it into the program, is bypassed. A layer
with a sliding window shorter than the generation keeps a ring of window slots instead (see
``Window``); its mask reads which position each ring slot holds from the step's slot.

A recurrent layer (a state-space or linear-attention mixer, a short convolution) keeps
fixed-size states instead, through transformers' cache interface for them: they are buffers of
the same kind, which a prompt's program never reads and a new token's reads (as functional
copies, which transformers' update kernels write in place) and hands back whole; the loop
writes them over the old between steps.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..frontend.capture import quiet_fake_tensor_log

KV_PREFIX = "kv_cache"  # buffers named kv_cache.k<layer> / kv_cache.v<layer> hold the cache
DECODE_ATTENTION = "memsched_decode"  # the attention implementation a decode step runs
_PENDING: dict[int, object] = {}  # while a decode step is traced: id(cache keys) -> its layer


class AttendsByItself(UnsupportedModelError):
    """A decode step's layer attended to the cache without transformers' attention interface,
    or with more than memsched's decode attention computes."""


class MaskRefused(UnsupportedModelError):
    """The model failed before any layer wrote the cache: it builds its attention inputs itself
    from the 2-D mask (e.g. BLOOM's ALiBi biases) instead of taking a 4-D one."""


@dataclass(frozen=True)
class Attention:
    """How a decoder attends, as one fake decode step found (``probe_attention``)."""

    by_itself: bool = False   # its layers compute attention over the cache they are handed
    mask_2d: bool = False     # it reads the 2-D mask (ALiBi positions); its causal mask is memsched's


@dataclass(frozen=True)
class Window:
    """Sliding-window attention, as transformers' sliding-window overlay masks it: a query at
    cache slot i sees the keys at slots after i - ``size``. A sliding layer's cache is a ring of
    ``size`` slots, slot s kept at s mod size: what falls behind the window is overwritten."""

    size: int
    mixed: bool = False   # other layers attend fully: the model takes a mask per layer type
    layers: tuple[bool, ...] = ()   # which layers slide (empty: every one)

    def slides(self, layer: int) -> bool:
        return not self.layers or self.layers[layer]


@dataclass(frozen=True)
class LayerShapes:
    """One decoder layer's cache for the whole generation: its keys and values (batch, kv heads,
    max length, head dim) where it attends; the fixed-size states of its recurrent part (a
    state-space or linear-attention mixer: a convolution's last inputs, the recurrence's state),
    batch first, by transformers' state index, where it has one; neither for a layer that keeps
    no cache (an MLP-only layer of a hybrid)."""

    kv: tuple[torch.Size, torch.Size] | None = None
    conv: tuple[tuple[int, torch.Size, torch.dtype], ...] = ()        # (state index, shape, dtype)
    recurrent: tuple[tuple[int, torch.Size, torch.dtype], ...] = ()

    @property
    def keeps_states(self) -> bool:
        return bool(self.conv or self.recurrent)

    def rows(self, batch: int) -> LayerShapes:
        """The same cache for ``batch`` rows."""
        def resized(specs):
            return tuple((i, torch.Size((batch, *shape[1:])), dtype) for i, shape, dtype in specs)
        kv = None if self.kv is None else tuple(torch.Size((batch, *s[1:])) for s in self.kv)
        return LayerShapes(kv, resized(self.conv), resized(self.recurrent))


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of q new queries over the cache (``key``/``value``, masked where a slot is
    empty or not yet reached) and over the step's own new entries, merged through one softmax:
    exactly softmax([q.K, q.k_new]) . [V; v_new], without materialising the cache with the new
    entries written in. Grouped-query heads are handled by reshaping the queries, not by
    repeating the cache."""
    layer = _PENDING.get(id(key))
    # anything else attends as the model does, over the cache with the step's entries written
    # in (a copy per layer and step): what that attention adds is the model's own to compute
    if layer is None:
        raise AttendsByItself(f"{type(module).__name__} attends over keys other than the cache's own "
                              "(changed after the cache update)")
    if value is not layer.values:   # DiffLlama: halves of the values, each repeated over the heads
        raise AttendsByItself(f"{type(module).__name__} attends over values other than the cache's own "
                              "(changed after the cache update)")
    extra = [k for k in ("softcap", "position_bias", "s_aux") if kwargs.get(k) is not None]
    extra += ["sinks"] if getattr(module, "sinks", None) is not None else []
    if extra:
        raise AttendsByItself(f"{type(module).__name__}'s attention adds {', '.join(extra)} to "
                              "scaled dot-product attention")
    layer.attended = True
    k_new, v_new = layer.new
    B, H, q, D = query.shape
    Hkv = sum(k.shape[1] for k in layer.key_chunks)
    G = H // Hkv
    scale = scaling if scaling is not None else D ** -0.5
    mask = _f32(attention_mask)[:, :, None] if attention_mask is not None else None
    # a query attends to its own new entries causally; one query (a decode step) to all of them
    own_mask = torch.ones(q, q, dtype=torch.bool, device=query.device).triu(1) if q > 1 else None
    dtype = query.dtype   # the output's: the attention itself runs in float32
    # computed once for every head, not per group of kv heads: the scaled queries and their
    # scores against the step's own entries (each group is a dozen program lines, not thirty)
    query = (_f32(query) * scale).reshape(B, Hkv, G, q, D)
    k_new, v_new = _f32(k_new), _f32(v_new)
    own = torch.einsum("bkgqd,bknd->bkgqn", query, k_new)
    own = own.masked_fill(own_mask, float("-inf")) if own_mask is not None else own
    outs, h0 = [], 0
    for K, V in zip(layer.key_chunks, layer.value_chunks):  # kv heads are independent
        h1 = h0 + K.shape[1]
        outs.append(_attend(query[:, h0:h1], _f32(K), _f32(V), own[:, h0:h1], v_new[:, h0:h1], mask))
        h0 = h1
    out = torch.cat(outs, dim=1) if len(outs) > 1 else outs[0]
    return out.reshape(B, H, q, -1).transpose(1, 2).to(dtype).contiguous(), None


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t in float32; a tensor already in it is not cast (each cast is a line of the program)."""
    return t if t.dtype == torch.float32 else t.float()


def _attend(qg, K, V, own, v_new, mask):
    """softmax([q.K + mask, own]) . [V; v_new] for scaled queries grouped per kv head, ``own``
    their scores against the step's new keys (causally masked), all in float32: one softmax
    over both, without a copy of the cache with the new entries written in."""
    old = torch.einsum("bkgqd,bkld->bkgql", qg, K)
    old = old + mask if mask is not None else old
    p = torch.cat([old, own], dim=-1).softmax(dim=-1)
    L = K.shape[2]
    return (torch.einsum("bkgql,bkld->bkgqd", p[..., :L], V)
            + torch.einsum("bkgqn,bknd->bkgqd", p[..., L:], v_new))


def _register_decode_attention() -> None:
    from transformers import AttentionInterface

    if DECODE_ATTENTION not in AttentionInterface._global_mapping:
        AttentionInterface.register(DECODE_ATTENTION, decode_attention)


def _cache_classes():
    """memsched's cache layers on transformers' Cache classes (imported late: memsched does not
    depend on it)."""
    from transformers.cache_utils import Cache, DummyLayer, StaticLayer

    class SlotLayer(StaticLayer):
        """One layer's cache: a step's keys and values go to ``slots``, functionally."""

        def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slots: torch.Tensor, fresh: bool,
                     whole: bool = False, ring: int | None = None):
            super().__init__(max_cache_len=keys[0].shape[2])
            self.write_at = slots if ring is None else slots % ring   # where the step's entries go
            self.whole = whole   # decode: hand back the cache with the new entries written in
            # the layer's cache, one tensor per group of kv heads (placed one by one)
            self.key_chunks, self.value_chunks = keys, values
            self.keys, self.values, self.slots, self.fresh = keys[0], values[0], slots, fresh
            self.device, self.is_initialized = keys[0].device, True
            self.new: tuple[torch.Tensor, torch.Tensor] | None = None
            self.attended = False  # decode: the step's attention came through decode_attention

        def update(self, key_states, value_states, *args, **kwargs):
            # copies, so a view into a fused projection does not keep the whole of it alive
            self.new = (key_states.clone(), value_states.clone())
            if self.fresh:  # a prompt attends to itself: the cache is not read at all
                return key_states, value_states
            if self.whole:
                # a model that computes attention itself reads what this returns: a copy of the
                # layer's cache with the step's entries in their slots (the cache itself is
                # written between steps)
                self.attended = True
                return tuple(_written(chunks, x, self.write_at) for chunks, x in
                             ((self.key_chunks, key_states), (self.value_chunks, value_states)))
            # a new token attends to the cache as it is and to its own entries apart (see
            # decode_attention, which finds this layer by the tensor it is handed): no copy of
            # the cache with the new entries written in
            _PENDING[id(self.keys)] = self
            return self.keys, self.values

        def get_seq_length(self):
            # tokens cached before this step, as a tensor: a Python number would be baked into
            # the captured program as one step's length
            return self.slots[0]

    slot_states, slot_hybrid = _state_classes(SlotLayer)

    class SlotCache(Cache):
        def __init__(self, layers):
            super().__init__(layers=layers)

    return SlotLayer, slot_states, slot_hybrid, DummyLayer, SlotCache


def _state_classes(slot_layer: type):
    """memsched's cache layers for recurrent layers: alone, and beside attention (``slot_layer``)."""
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    class SlotStates(LinearAttentionCacheLayerMixin):
        """A recurrent layer's states (``conv``, ``recurrent``: the cache's tensors by state
        index). A prompt starts from none; a new token from functional copies of the cache's,
        which transformers' update kernels may write in place. What the step leaves in
        ``conv_states`` / ``recurrent_states`` is its output: the cache takes it whole between
        steps."""

        def __init__(self, conv: dict[int, torch.Tensor], recurrent: dict[int, torch.Tensor], fresh: bool):
            LinearAttentionCacheLayerMixin.__init__(self, number_of_states=1 + max((*conv, *recurrent), default=0))
            self.state_fresh = fresh
            for i in range(self.number_of_states):
                self.has_previous_state[i] = not fresh
            if not fresh:
                self.conv_states, self.recurrent_states = _CopiedOnRead(conv), _CopiedOnRead(recurrent)
            for held, ready in ((conv, self.is_conv_states_initialized),
                                (recurrent, self.is_recurrent_states_initialized)):
                ready.update(dict.fromkeys(held, not fresh))
            self.conv_kernel_size.update({i: t.shape[-1] for i, t in conv.items()})
            first = next(iter({**conv, **recurrent}.values()))
            self.device, self.dtype = first.device, first.dtype
            self.held = (conv, recurrent)
            self.written: set[tuple[str, int]] = set()   # the states the step updated

        def lazy_initialization(self, *args, **kwargs) -> None:   # sized by the cache's tensors
            pass

        def update_conv_state(self, conv_states, state_idx: int = 0, conv_kernel_size=None, **kwargs):
            # as transformers' layer: a prompt's inputs padded on the left to the kernel, a new
            # token's after the kept ones; the last kernel-size columns are kept
            size = self.conv_kernel_size[state_idx]
            before = None if self.state_fresh else self.conv_states.current(state_idx)
            full = conv_states if before is None else torch.cat([before, conv_states.to(before.dtype)], dim=-1)
            if full.shape[-1] < size:
                full = torch.nn.functional.pad(full, (size - full.shape[-1], 0))
            self.conv_states[state_idx] = full[..., -size:].clone()
            self.written.add(("conv", state_idx))
            return full

        def update_recurrent_state(self, recurrent_states, state_idx: int = 0, **kwargs):
            self.recurrent_states[state_idx] = recurrent_states
            self.written.add(("recurrent", state_idx))
            return recurrent_states

        def new_states(self, model: str, layer: int) -> list[torch.Tensor]:
            """The states the step leaves, in the cache's order (conv, then recurrent)."""
            out = []
            for kind, held, now in (("conv", self.held[0], self.conv_states),
                                    ("recurrent", self.held[1], self.recurrent_states)):
                for i, t in held.items():
                    if self.state_fresh and (kind, i) not in self.written:
                        raise UnsupportedModelError(f"{model}: layer {layer}'s prompt did not write its {kind} "
                                                    f"state {i}")
                    out.append(now[i].to(t.dtype))
            return out

    class SlotHybrid(SlotStates, slot_layer):
        """A layer with both (Falcon-H1's, Zamba's attention beside a state-space mixer)."""

        def __init__(self, states: tuple, *kv):
            slot_layer.__init__(self, *kv)
            SlotStates.__init__(self, *states, fresh=self.fresh)

    return SlotStates, SlotHybrid


class _CopiedOnRead(dict):
    """A recurrent layer's states as a new token's step is handed them: each a functional copy of
    the cache's tensor (transformers' update kernels write it in place), made when the layer first
    reads it, so that one layer's copy, not every layer's from the step's start, is held at a time."""

    def __init__(self, held: dict[int, torch.Tensor]):
        super().__init__()
        self.held = held

    def __missing__(self, i: int) -> torch.Tensor:
        self[i] = copy = self.held[i].clone()
        return copy

    def current(self, i: int) -> torch.Tensor:
        """The state as it stands, without a copy where the step has not read it yet."""
        return dict.get(self, i, self.held[i])


def _cache_keyword(model: nn.Module) -> str:
    """The keyword a causal LM takes its KV cache by: ``cache`` in newer transformers,
    ``past_key_values`` before (5.17 and older); a model that names neither takes it by
    ``**kwargs`` under the newer name."""
    params = inspect.signature(model.forward).parameters
    return "past_key_values" if "past_key_values" in params and "cache" not in params else "cache"


def _written(chunks: list[torch.Tensor], new: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    whole = torch.cat(chunks, dim=1) if len(chunks) > 1 else chunks[0]
    return whole.index_copy(2, slots, new.to(whole.dtype))


class CachedDecoder(nn.Module):
    """``model`` (a transformers causal LM) with a fixed-size KV cache as buffers.

    ``forward(input_ids, position_ids, slots, attention_mask)``: ``input_ids`` and
    ``position_ids`` are (batch, q), ``slots`` (q,) the cache positions the q tokens take,
    ``attention_mask`` (batch, max_len) 1 where a cache slot holds a real token. Returns the
    logits of the last query (batch, vocab) and, per layer, the q new keys and values and then
    the whole new states of its recurrent part (a hybrid's state-space or linear-attention
    mixer), in the cache's order.
    """

    memsched_state_kinds = {f"{KV_PREFIX}.": "kv_cache"}  # read by capture: these buffers are the cache
    memsched_trace_all_layers = True  # read by capture: each layer has its cache slots and outputs

    def __init__(self, model: nn.Module, shapes: list[LayerShapes], dtype: torch.dtype,
                 device: torch.device | str = "cpu", head_chunks: int = 1, attention: Attention = Attention(),
                 window: Window | None = None):
        super().__init__()
        self.model = model
        self.window = window
        # a model whose layers compute attention themselves (GPT-Neo, Falcon) is handed each
        # layer's cache with the new entries written in, a copy per layer and step; the others
        # attend through memsched's decode attention, which copies nothing
        self.attends_by_itself = attention.by_itself
        # a model that reads the 2-D mask (BLOOM's ALiBi, a recurrent layer's padding) is handed
        # it, and its module's causal mask builders hand back memsched's 4-D mask while it runs
        self.mask_2d = attention.mask_2d
        self.n_layers = len(shapes)
        self.shapes, self.dtype = shapes, dtype
        self.batch = next(s[0] for layer in shapes for s in (*(layer.kv or ()),
                                                             *(x[1] for x in layer.conv + layer.recurrent)))
        self.attending = [i for i, layer in enumerate(shapes) if layer.kv is not None]
        heads = shapes[self.attending[0]].kv[0][1] if self.attending else 1
        if not 1 <= head_chunks <= heads or heads % head_chunks:
            raise ValueError(f"kv_head_chunks must divide the {heads} kv heads, got {head_chunks}")
        self.head_chunks = head_chunks
        self.max_len = shapes[self.attending[0]].kv[0][2] if self.attending else 0
        if window is not None and window.layers and len(window.layers) != len(shapes):
            raise UnsupportedModelError(
                f"{type(model).__name__} names {len(window.layers)} layer types but its cache has "
                f"{len(shapes)} layers: memsched cannot tell which of them slide")
        # a sliding layer's ring: its window's slots, when shorter than the generation
        self.rings = [window.size if window is not None and window.slides(i) and window.size < self.max_len
                      else None for i in range(len(shapes))]
        cache = nn.Module()
        for i, layer in enumerate(shapes):  # a tensor per layer, K or V, and group of kv heads
            for c in range(head_chunks if layer.kv is not None else 0):
                for kv, shape in zip("kv", layer.kv):
                    part = (shape[0], shape[1] // head_chunks, self.rings[i] or shape[2], *shape[3:])
                    cache.register_buffer(self._leaf(kv, i, c), torch.zeros(part, dtype=dtype, device=device))
            for name, shape, state_dtype in self._states(i):   # and one per recurrent state
                cache.register_buffer(name, torch.zeros(shape, dtype=state_dtype, device=device))
        setattr(self, KV_PREFIX, cache)

    def _leaf(self, kv: str, i: int, c: int) -> str:
        return f"{kv}{i}" if self.head_chunks == 1 else f"{kv}{i}_{c}"

    def _states(self, i: int) -> list[tuple[str, torch.Size, torch.dtype]]:
        """Layer i's recurrent states: (buffer name, shape, dtype), conv ones first."""
        layer = self.shapes[i]
        return [(f"{kind}{i}_{s}", shape, dtype) for kind, specs in (("conv", layer.conv), ("state", layer.recurrent))
                for s, shape, dtype in specs]

    def names(self, layers=None) -> list[str]:
        """The state-dict keys of the cache's key and value tensors (of ``layers``, by default
        all)."""
        return [f"{KV_PREFIX}.{self._leaf(kv, i, c)}" for i in (self.attending if layers is None else layers)
                for c in range(self.head_chunks) for kv in "kv"]

    def state_names(self) -> list[str]:
        return [f"{KV_PREFIX}.{name}" for i in range(self.n_layers) for name, _, _ in self._states(i)]

    def slot_groups(self, slots: torch.Tensor) -> list[tuple[list[str], int, torch.Tensor]]:
        """(cache tensor names, dim, indices along it) that a step at ``slots`` wrote: the slots
        themselves along the length of full-length caches, their places in each ring, and every
        row of the recurrent states (a step replaces them whole)."""
        groups = {}
        for i in self.attending:
            groups.setdefault(self.rings[i], []).append(i)
        written = [(self.names(layers), 2, slots if ring is None else torch.unique(slots % ring))
                   for ring, layers in groups.items()]
        states = self.state_names()
        if states:
            written.append((states, 0, torch.arange(self.batch)))
        return written

    def chunks(self, i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Layer i's key tensors and value tensors, a group of kv heads each."""
        cache = getattr(self, KV_PREFIX)
        return ([getattr(cache, self._leaf("k", i, c)) for c in range(self.head_chunks)],
                [getattr(cache, self._leaf("v", i, c)) for c in range(self.head_chunks)])

    def states(self, i: int) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Layer i's conv states and recurrent states, by transformers' state index."""
        cache, layer = getattr(self, KV_PREFIX), self.shapes[i]
        return ({s: getattr(cache, f"conv{i}_{s}") for s, _, _ in layer.conv},
                {s: getattr(cache, f"state{i}_{s}") for s, _, _ in layer.recurrent})

    def tensors(self) -> list[torch.Tensor]:
        cache = getattr(self, KV_PREFIX)
        return [t for i in self.attending for pair in zip(*self.chunks(i)) for t in pair] + \
            [getattr(cache, name) for i in range(self.n_layers) for name, _, _ in self._states(i)]

    def _masks(self, slots, attention_mask, fresh: bool, whole: bool, dtype):
        """(the full layers' 4-D additive mask, the sliding layers' or None, the 2-D mask over
        the keys a prompt attends to)."""
        keys = slots if fresh else torch.arange(attention_mask.shape[1], device=slots.device)
        real = attention_mask.index_select(1, keys) if fresh else attention_mask
        # a prompt: causal over itself; a new token: the slots before its own (its own entries,
        # not yet in the cache, are attended apart)
        reach = (keys[None, None, None, :] <= slots[None, None, :, None]) if fresh or whole else \
            (keys[None, None, None, :] < slots[None, None, :1, None])
        allowed = real[:, None, None, :].bool() & reach
        if whole:   # the step's own slots hold its entries in what the layers are handed
            allowed = allowed | (keys[None, None, None, :] == slots[None, None, :, None])
        if self.window is None:
            return _additive(allowed, dtype), None, real
        size = self.window.size
        if fresh:   # the prompt's keys after each query's slot - window
            near = allowed & (keys[None, None, None, :] > slots[None, None, :, None] - size)
            return _additive(allowed, dtype), _additive(near, dtype), real
        # a new token at slot p: ring place j holds slot p - 1 - ((p - 1 - j) mod size), the
        # latest before p that lands there; the one at p's own place fell behind the window
        p = slots[:1]
        place = torch.arange(size, device=slots.device)
        held = p - 1 - torch.remainder(p - 1 - place, size)
        near = attention_mask.index_select(1, held.clamp(min=0)).bool() & (held >= 0) & (held > p - size)
        near = near[:, None, None, :]
        if whole:
            near = near | (place == p % size)[None, None, None, :]
        return _additive(allowed, dtype), _additive(near, dtype), real

    def forward(self, input_ids, position_ids, slots, attention_mask):
        # a prompt (more than one token) attends to itself only, so its program never reads the
        # cache; a new token attends to every slot, the empty ones masked
        fresh = input_ids.shape[1] > 1
        whole = self.attends_by_itself and not fresh
        layers = self._layers(slots, fresh, whole)
        slot_cache = _cache_classes()[-1]
        mask, sliding, real = self._masks(slots, attention_mask, fresh, whole, self.dtype)
        # one mask per layer type where they differ (transformers takes that dict as it is); a
        # model whose every layer slides takes the sliding one alone
        masks = mask if sliding is None else \
            {"full_attention": mask, "sliding_attention": sliding} if self.window.mixed else sliding
        config = self.model.config
        before = config._attn_implementation
        if not fresh and not whole:
            _register_decode_attention()
            config._attn_implementation = DECODE_ATTENTION
        if self.mask_2d and not fresh and any(layer.keeps_states for layer in self.shapes):
            # recurrent layers zero padding by the 2-D mask, taken as long as their input (Mamba's
            # multiply by it): a new token, never padding, is handed its own slot's column
            real = attention_mask.index_select(1, slots)
        try:
            with _causal_masks_as(self.model, mask, sliding) if self.mask_2d else contextlib.nullcontext():
                out = self.model(input_ids=input_ids, attention_mask=real if self.mask_2d else masks,
                                 position_ids=position_ids, use_cache=True,
                                 **{_cache_keyword(self.model): slot_cache(layers)},
                                 logits_to_keep=1)
        except AttendsByItself:
            raise
        except (TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
            wrote = sum(getattr(layer, "new", None) is not None for layer in layers)
            if wrote and not fresh and not whole:
                # what the cache handed back stands for it in decode_attention (one group of kv
                # heads): a model that computes with it otherwise attends by itself
                raise AttendsByItself(f"{type(self.model).__name__} failed with what memsched's cache hands "
                                      f"its attention ({type(exc).__name__}: {exc})") from exc
            if wrote:  # e.g. a layer adding its own position bias sized for transformers' own cache
                raise UnsupportedModelError(
                    f"{type(self.model).__name__} failed after {wrote} of its {len(layers)} layers wrote "
                    f"memsched's cache ({type(exc).__name__}: {exc}); memsched.generate runs decoders whose "
                    "attention goes through transformers' cache and attention interfaces") from exc
            # it failed before any layer wrote the cache: the model builds its attention inputs
            # itself (e.g. ALiBi biases from a 2-D mask) instead of taking transformers' 4-D mask
            given = "2-D attention mask and its own causal mask" if self.mask_2d else "4-D attention mask"
            raise MaskRefused(
                f"{type(self.model).__name__} failed before its first attention layer with memsched's "
                f"cache and {given} ({type(exc).__name__}: {exc}); memsched.generate runs "
                "decoders whose attention goes through transformers' cache and attention interfaces"
            ) from exc
        finally:
            config._attn_implementation = before
            _PENDING.clear()
        new, name = [], type(self.model).__name__
        for i, layer in enumerate(layers):
            if self.shapes[i].kv is not None:
                if layer.new is None:
                    raise UnsupportedModelError(f"{name}: layer {i} did not write the KV cache")
                if not fresh and not layer.attended:  # it attended to the cache without its new entries
                    raise AttendsByItself(f"{name}: layer {i} computes attention itself rather than through "
                                          "transformers' attention interface")
                new.extend(layer.new)
            if self.shapes[i].keeps_states:
                new.extend(layer.new_states(name, i))
        return out.logits[:, -1, :], tuple(new)

    def _layers(self, slots: torch.Tensor, fresh: bool, whole: bool) -> list:
        """transformers' cache layers for one step: memsched's over each layer's tensors."""
        slot_layer, slot_states, slot_hybrid, dummy, _ = _cache_classes()
        layers = []
        for i, shapes in enumerate(self.shapes):
            kv = (*self.chunks(i), slots, fresh, whole, self.rings[i]) if shapes.kv is not None else None
            states = self.states(i) if shapes.keeps_states else None
            layers.append(slot_hybrid(states, *kv) if kv and states else slot_layer(*kv) if kv else
                          slot_states(*states, fresh=fresh) if states else dummy())
        return layers

    @torch.no_grad()
    def write(self, slots: torch.Tensor, new: tuple[torch.Tensor, ...], rows: slice = slice(None)) -> None:
        """Put a step's new keys and values into their slots and its new recurrent states in
        place of the old (between steps, in place), for the batch ``rows`` they were computed for."""
        new = iter(new)
        for i, ring in enumerate(self.rings):
            # a ring takes the last of a prompt's entries it holds, each at its slot mod window
            at, keep = (slots, slice(None)) if ring is None else (slots[-ring:] % ring, slice(-ring, None))
            for chunks in self.chunks(i) if self.shapes[i].kv is not None else ():
                x, h0 = next(new), 0
                for t in chunks:
                    h1 = h0 + t.shape[1]
                    t[rows].index_copy_(2, at.to(t.device), x[:, h0:h1, keep].to(t.device, t.dtype))
                    h0 = h1
            for held in self.states(i):
                for t in held.values():
                    t[rows] = next(new).to(t.device, t.dtype)

    @torch.no_grad()
    def reset(self) -> None:
        for t in self.tensors():
            t.zero_()


@contextlib.contextmanager
def _experts_traceable_on_fakes(model: nn.Module):
    """Mixture-of-experts layers of transformers that run their experts by ``grouped_mm`` run
    them by batched matmuls for the fake step: on a CPU transformers calls ``grouped_mm`` in
    float32 outside compilers, which torch's fake (meta) kernel refuses (bfloat16 only). The
    cache's shapes do not depend on it; the model's configs are restored after."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if getattr(c, "_experts_implementation_internal", None) == "grouped_mm"}
    for c in configs.values():
        c._experts_implementation_internal = "batched_mm"
    try:
        yield
    finally:
        for c in configs.values():
            c._experts_implementation_internal = "grouped_mm"


def _as_exported():
    """The state torch.export traces a model in (``torch.compiler.is_compiling()`` true), so that
    the probe takes the paths the captured step takes: models skip data-dependent checks there
    (XGLM's sinusoidal positions compare a tensor's max with a size, which fake tensors can't)."""
    try:
        from torch._export.utils import _compiling_state_context
    except ImportError:  # a torch without it: the probe runs as eager, the capture still decides
        return contextlib.nullcontext()
    return _compiling_state_context()


def probe_attention(model: nn.Module, shapes, dtype: torch.dtype, inputs: tuple) -> Attention:
    """How ``model`` attends: one decode step (``inputs``, batch 1) run on fake tensors as
    memsched runs it, with the 4-D mask, then (when the model refuses it before any layer ran)
    with the 2-D mask. Whether its layers compute attention themselves rather than through
    transformers' attention interface shows there. Any other failure is left to the step's
    capture to report. A model with recurrent layers takes the 2-D mask: they zero a prompt's
    padding by it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    one = [layer.rows(1) for layer in shapes]
    recurrent = any(layer.keeps_states for layer in shapes)
    for mask_2d in (True,) if recurrent else (False, True):
        # a failure here decides the path (or is the capture's to report): torch's log of its
        # traceback would show the user an error that is not one
        with torch.no_grad(), _experts_traceable_on_fakes(model), _as_exported(), quiet_fake_tensor_log(), \
                FakeTensorMode(allow_non_fake_inputs=True):
            probe = CachedDecoder(model, one, dtype, attention=Attention(mask_2d=mask_2d)).eval()
            try:
                probe(*inputs)
            except AttendsByItself:
                return Attention(True, mask_2d)
            except MaskRefused:
                continue
            except Exception:  # noqa: BLE001 - reported by the capture of the real step
                pass
        return Attention(False, mask_2d)
    return Attention(mask_2d=recurrent)   # refused: the capture of the real step says so


# transformers' builders of the 4-D mask, called by a model's forward from its own module
_MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_chunked_causal_mask")


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


@contextlib.contextmanager
def _causal_masks_as(model: nn.Module, mask: torch.Tensor, sliding: torch.Tensor | None = None):
    """While ``model`` runs, its modules' causal mask builders return ``mask`` (memsched's, over
    the whole cache; ``sliding`` from the sliding-window builder, if given): the model reads
    the 2-D mask for its own biases and attends with these."""
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    saved = [(mod, name, getattr(mod, name)) for mod in modules if mod is not None
             for name in _MASK_BUILDERS if callable(getattr(mod, name, None))]
    for mod, name, _ in saved:
        made = sliding if sliding is not None and name == "create_sliding_window_causal_mask" else mask
        setattr(mod, name, lambda *args, made=made, **kwargs: made)
    try:
        yield
    finally:
        for mod, name, builder in saved:
            setattr(mod, name, builder)


def cache_shapes(model: nn.Module, batch: int, max_len: int, sample_ids: torch.Tensor):
    """Per layer, its cache (``LayerShapes``) for ``batch`` x ``max_len``, and the dtype of its
    keys and values, read from one fake step of the model (FakeTensors: no compute, no memory)."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
    from transformers.cache_utils import DummyLayer

    with torch.no_grad(), _experts_traceable_on_fakes(model), quiet_fake_tensor_log(), \
            FakeTensorMode(allow_non_fake_inputs=True) as mode:
        ids = mode.from_tensor(sample_ids[:1, :1])
        try:
            out = model(input_ids=ids, use_cache=True)
        except DataDependentOutputException as exc:   # XLM: assert lengths.max().item() <= slen
            raise UnsupportedModelError(
                f"{type(model).__name__} reads a tensor's value in its forward ({exc.func}), so memsched "
                "cannot run the step without compute that reads its KV cache's shapes; memsched.generate "
                "runs decoders whose forward depends on their inputs' shapes only") from exc
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if cache is None or not getattr(cache, "layers", None):
        raise ValueError(f"{type(model).__name__} returns no KV cache with use_cache=True: "
                         "memsched.generate needs a transformers decoder with a cache")
    layers = list(cache.layers)
    # a cache sized by another count than the layers that write it (BartForCausalLM's by the
    # config's encoder layers) keeps trailing layers no step fills: they are not the model's
    while len(layers) > 1 and _unwritten(layers[-1]):
        layers.pop()
    types = getattr(text_config(model), "layer_types", None) or ()
    shapes = []
    for i, layer in enumerate(layers):
        if isinstance(layer, DummyLayer):
            if i >= len(types) or types[i] not in _UNCACHED_TYPES:
                raise UnsupportedModelError(
                    f"{type(model).__name__}'s layer {i} keeps no cache of its own (it reads another layer's: "
                    "shared keys and values); memsched.generate's cache covers layers that each keep theirs")
            shapes.append(LayerShapes())
            continue
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        kv = None
        if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and k.dim() == 4:
            kv = (torch.Size((batch, k.shape[1], max_len, k.shape[3])),
                  torch.Size((batch, v.shape[1], max_len, v.shape[3])))
        conv, recurrent = _state_shapes(layer, batch)
        if kv is None and (k is not None or v is not None or not conv and not recurrent):
            raise ValueError(f"{type(model).__name__}: cache layer {i} ({type(layer).__name__}) is not "
                             "a (batch, heads, length, dim) key/value cache or a recurrent layer's states")
        shapes.append(LayerShapes(kv, conv, recurrent))
    dtype = next((layer.keys.dtype for layer in layers if isinstance(getattr(layer, "keys", None), torch.Tensor)),
                 next((d for layer in shapes for _, _, d in layer.conv + layer.recurrent), torch.float32))
    return shapes, dtype


# layer types that keep no cache (Nemotron-H's MLP and mixture-of-experts layers)
_UNCACHED_TYPES = ("mlp", "moe")


def text_config(model: nn.Module):
    """The decoder's config (a multimodal model's text one)."""
    config = getattr(model, "config", None)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _state_shapes(layer, batch: int):
    """A recurrent layer's (conv, recurrent) states after the fake step, for ``batch`` rows:
    (state index, shape, dtype) each."""
    def specs(states):
        return tuple((s, torch.Size((batch, *t.shape[1:])), t.dtype) for s, t in sorted((states or {}).items())
                     if isinstance(t, torch.Tensor))
    return specs(getattr(layer, "conv_states", None)), specs(getattr(layer, "recurrent_states", None))


def _unwritten(layer) -> bool:
    from transformers.cache_utils import DummyLayer

    states = _state_shapes(layer, 1)
    return getattr(layer, "keys", None) is None and getattr(layer, "values", None) is None and \
        not states[0] and not states[1] and not isinstance(layer, DummyLayer)
