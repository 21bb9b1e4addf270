"""Compressed weights on the disk tier (compress_weights="int8"/"int4"): group-wise integers,
widened at each fetch; disk traffic falls 4x / 8x against fp32 and the outputs' error is
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
