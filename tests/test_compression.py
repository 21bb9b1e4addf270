"""Compressed weights and KV cache on the disk tier (compress_weights= / compress_kv_cache=
"int8"/"int4"): group-wise integers, widened at each fetch; disk traffic falls 4x / 8x against fp32 and the outputs' error is
measured (they are not bit-exact, which is why it is off by default)."""
from __future__ import annotations

import pytest
import torch

import memsched
from helpers import FIXED_CPU
from memsched.runtime import quantize
from zoo import build


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_is_at_most_half_a_step_per_group(bits):
    torch.manual_seed(0)
    x = torch.randn(64, 128) * torch.logspace(-3, 1, 128)  # groups of very different ranges
    q, scale = quantize.quantize(x, bits)
    assert q.dtype == torch.uint8 and q.numel() == quantize.stored_nbytes(x.numel(), bits)
    out = torch.empty_like(x)
    quantize.dequantize_into(q, scale, bits, out)
    step = scale.reshape(-1, 1).expand(-1, quantize.GROUP).reshape(x.shape)
    assert bool(((out - x).abs() <= step / 2 + 1e-7).all())


@pytest.mark.parametrize("bits", [8, 4])
def test_widening_in_place_gives_the_general_path_s_values(bits):
    """A contiguous float32 destination is widened and scaled in place; a strided one goes
    through float temporaries: the same values, bit for bit."""
    torch.manual_seed(0)
    x = torch.randn(96, 128)
    q, scale = quantize.quantize(x, bits)
    fast, strided = torch.empty(96, 128), torch.empty(128, 96).t()
    quantize.dequantize_into(q, scale, bits, fast)
    quantize.dequantize_into(q, scale, bits, strided)
    assert torch.equal(fast, strided)


def test_a_transposed_weight_comes_back_in_its_own_layout():
    x = torch.randn(128, 64).t()  # not contiguous
    q, scale = quantize.quantize(x, 8)
    out = torch.empty(128, 64).t()
    quantize.dequantize_into(q, scale, 8, out)
    torch.testing.assert_close(out, x, atol=float(scale.max()), rtol=0)


@pytest.mark.parametrize("compress, min_cosine, ratio", [(None, 1.0, 1), ("int8", 0.999, 4), ("int4", 0.9, 8)])
def test_compiled_outputs_and_disk_traffic(compress, min_cosine, ratio, tmp_path):
    model, args, kw = build("llama")
    with torch.no_grad():
        ref = model(**kw).logits
    peak = memsched.plan(model, args, 10**12, example_kwargs=kw, hardware=FIXED_CPU).unconstrained.peak_device_bytes
    exact = memsched.compile(model, int(peak * 0.4), device="cpu", hardware=FIXED_CPU, offload_dir=tmp_path)
    cm = memsched.compile(model, int(peak * 0.4), device="cpu", hardware=FIXED_CPU, offload_dir=tmp_path,
                          compress_weights=compress)
    try:
        with torch.no_grad():
            exact(**kw)
            out = cm(**kw).logits
        if compress is None:
            assert torch.equal(out, ref)
        cosine = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0).item()
        assert cosine >= min_cosine
        full, read = exact.stats.bytes_moved["disk_read"], cm.stats.bytes_moved["disk_read"]
        # biases and norms stay exact: a little over 1/ratio of the bytes
        assert full / ratio <= read <= full / ratio * 1.1, (full, read)
    finally:
        cm.close()
        exact.close()


def test_compressed_generation_and_a_bad_option(tmp_path):
    model, _, kw = build("gpt2")
    ids = kw["input_ids"][:, :8]
    tokens, stats = memsched.generate(model, ids, budget=900_000, max_new_tokens=4, eos_token_id=None, device="cpu",
                                      hardware=FIXED_CPU, compress_weights="int8", offload_dir=tmp_path,
                                      return_stats=True)
    assert tokens.shape == (2, 12) and stats.peak_device_bytes <= 900_000
    with pytest.raises(ValueError, match="compress_weights"):
        memsched.compile(model, "1GB", device="cpu", compress_weights="int3")
    with pytest.raises(ValueError, match="compress_kv_cache"):
        memsched.compile(model, "1GB", device="cpu", compress_kv_cache=8)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("head_dim", [64, 32], ids=["slots_alone", "whole"])
def test_a_patched_kv_cache_home_holds_what_quantising_it_whole_gives(bits, head_dim, tmp_path):
    """New slots written into a quantised KV cache home: with whole groups per slot only those
    slots' integers and scales are written (in the file, through its map), else it is
    requantised whole; either way a fetch gives exactly what quantising the whole cache gives."""
    from memsched.ir.kinds import Kind
    from memsched.runtime.stores import QuantizedCopy, Stores

    torch.manual_seed(0)
    cache = torch.zeros(2, 4, 16, head_dim)   # (batch, kv heads, slots, head dim)
    cache[:, :, :4] = torch.randn(2, 4, 4, head_dim)
    stores = Stores(torch.device("cpu"), tmp_path, compress_kv=bits)
    try:
        home = stores.home("kv.k0", cache, "disk", user=object(), kind=Kind.KV_CACHE)
        assert isinstance(home.handle, QuantizedCopy)
        written = []
        home.handle.store.write_slices = lambda *a, _w=home.handle.store.write_slices: (written.append(a), _w(*a))[1]
        for slot in (4, 5):
            cache[:, :, slot] = torch.randn(2, 4, head_dim) * (slot + 1)
            stores.patch("kv.k0", cache, 2, torch.tensor([slot]))
        stores.settle()
        assert len(written) == (2 if head_dim % quantize.GROUP == 0 else 0)
        out, want = torch.empty_like(cache), torch.empty_like(cache)
        home.handle.read_into(out)
        quantize.dequantize_into(*quantize.quantize(cache, bits), bits, want)
        assert torch.equal(out, want)
        assert stores.check(home, cache, changed=False) is False  # its checksums match what it holds
    finally:
        stores.close()


def test_a_compressed_kv_cache_generates_and_reads_fewer_disk_bytes(tmp_path):
    """A decoder whose KV cache leaves the device: with int8 the cache's disk reads fall to about
    a quarter, the budget holds, and tokens are those of the exact cache until rounding flips a
    near-tie (random weights give near-flat logits), the first new token always (the prompt
    does not read the cache)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=512,
                                         max_position_embeddings=64)).eval()
    ids = torch.randint(3, 300, (8, 16), generator=torch.Generator().manual_seed(1))
    probe = memsched.Generator(model, "1GB", batch=8, prompt_len=16, max_len=40, sample_ids=ids, hardware=FIXED_CPU,
                               device="cpu")
    budget = max(p.min_budget_bytes for p in probe.plans)
    probe.close()
    runs = {}
    for kv in (None, "int8"):
        gen = memsched.Generator(model, budget, batch=8, prompt_len=16, max_len=40, sample_ids=ids,
                                 hardware=FIXED_CPU, device="cpu", offload_dir=tmp_path, compress_kv_cache=kv)
        try:
            tokens, _ = gen(ids, max_new_tokens=24, eos_token_id=None)
            stats = gen.compiled.stats   # the last decode step
            kv_homes = [h for (name, tier), h in gen.compiled._stores._homes.items()
                        if name.startswith("kv_cache.") and tier == "disk"]
            runs[kv] = tokens, stats, kv_homes
        finally:
            gen.close()
    (exact, s0, homes0), (int8, s1, homes1) = runs[None], runs["int8"]
    assert homes0 and len(homes1) == len(homes0)
    assert s1.peak_device_bytes <= budget
    assert torch.equal(int8[:, :17], exact[:, :17])
    cache_bytes = sum(h.handle.layout.nbytes for h in homes0)
    saved = s0.bytes_moved["disk_read"] - s1.bytes_moved["disk_read"]
    assert saved == pytest.approx(cache_bytes * 3 / 4, rel=0.05), (saved, cache_bytes)


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_patched_home_is_checked_by_its_bytes(tier, tmp_path):
    """A KV cache's home patched slot by slot: a host home is checksummed only when a check
    needs it (from its own bytes), a disk home on a worker after each write; either way a check
    finds it intact after the patches, and stale after a write the patches did not carry."""
    from memsched.ir.kinds import Kind
    from memsched.runtime.stores import HostCopy, Stores

    torch.manual_seed(0)
    cache = torch.zeros(2, 4, 16, 8)
    stores = Stores(torch.device("cpu"), tmp_path)
    try:
        home = stores.home("kv.k0", cache, tier, user=object(), kind=Kind.KV_CACHE)
        for slot in (0, 1, 2):
            cache[:, :, slot] = torch.randn(2, 4, 8)
            stores.patch("kv.k0", cache, 2, torch.tensor([slot]))
        stores.settle()
        if tier == "host":
            assert isinstance(home.handle, HostCopy) and home.digest is None   # none made per patch
            assert torch.equal(home.handle.tensor, cache)
        assert stores.check(home, cache, changed=False) is False
        cache[1, 2, 7, 3] = 5.0                              # not patched
        assert stores.check(home, cache, changed=False) is True
        out = torch.empty_like(cache)
        if tier == "host":
            out.copy_(home.handle.tensor)
        else:
            stores.disk.read_into(home.handle.region, out)
        assert torch.equal(out, cache)
    finally:
        stores.close()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_widening_a_chunk_at_a_time_gives_every_value(bits, dtype, transposed):
    """Destinations that cannot be widened in place (another dtype, a transposed layout) take
    their values a chunk at a time, each where the layout puts it: the values of widening the
    whole tensor at once, over several chunks."""
    torch.manual_seed(0)
    x = (torch.randn(3 * quantize.CHUNK // 256 + 4, 256) * 3).to(dtype)
    q, scale = quantize.quantize(x, bits)
    if bits == 8:
        ints = q.view(torch.int8).float()
    else:
        ints = torch.stack(((q & 0xF).to(torch.int8) - 8, (q >> 4).to(torch.int8) - 8), dim=1).reshape(-1).float()
    want = (ints.reshape(-1, quantize.GROUP) * scale.reshape(-1, 1)).reshape(x.shape).to(dtype)
    out = torch.empty(x.shape[::-1], dtype=dtype).t() if transposed else torch.empty_like(x)
    quantize.dequantize_into(q, scale, bits, out)
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_compressed_read_makes_no_copy_of_the_tensor(dtype, tmp_path):
    """A compressed home is widened straight from the offload file's pages (checksummed first):
    no temporary as large as its integers or values is allocated, memory a CPU device's budget
    would not see (before: the integers read into a buffer, bfloat16 widened through float32
    copies of the whole tensor)."""
    from test_real_memory import _allocator_peak

    from memsched.ir.kinds import Kind
    from memsched.runtime.stores import QuantizedCopy, Stores

    torch.manual_seed(0)
    w = torch.randn(1024, 1024).to(dtype)
    stores = Stores(torch.device("cpu"), tmp_path, compress=8)
    try:
        home = stores.home("w", w, "disk", user=object(), kind=Kind.WEIGHT)
        assert isinstance(home.handle, QuantizedCopy)
        out = torch.empty_like(w)
        peak = _allocator_peak(lambda: home.handle.read_into(out))
        assert peak <= 2 * quantize.CHUNK * 4, peak   # a chunk's float32 values, not the tensor's
        assert home.handle.region.mapped is None      # the map made for the read is gone
        assert (out.float() - w.float()).abs().max() <= w.float().abs().max() / 127
    finally:
        stores.close()


def test_widening_into_memory_with_gaps_is_refused():
    """A destination whose memory has gaps (a slice) cannot be widened chunk by chunk into its
    memory: refused, never written past its values."""
    q, scale = quantize.quantize(torch.randn(64, 128), 8)
    with pytest.raises(ValueError, match="holds exactly its values"):
        quantize.dequantize_into(q, scale, 8, torch.empty(64, 256)[:, :128])
