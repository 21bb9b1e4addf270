"""Weights straight from a safetensors checkpoint: a model on the meta device runs with weights
homed on disk read from the checkpoint's own files, outputs equal to the real model's; the
model stays on meta; hostile or mismatched files fail before anything runs."""
from __future__ import annotations

import os
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import memsched
from helpers import FIXED_CPU
from zoo import build, quiet_transformers


def _meta_twin(model):
    import accelerate

    with quiet_transformers(), accelerate.init_empty_weights():
        meta = type(model)(model.config).eval()
    meta.tie_weights()
    return meta


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def saved(request, tmp_path_factory):
    model, _, kw = build(request.param)
    d = tmp_path_factory.mktemp(f"ckpt_{request.param}")
    with quiet_transformers():
        model.save_pretrained(d, max_shard_size="1MB")  # shards and an index json
    with torch.no_grad():
        ref = model(**kw).logits
    return model, kw, d, ref


def _as_hub_cache(d, root):
    """``d``'s files laid out as Hugging Face's cache lays out a download: each file a blob, the
    snapshot directory links to them (relative links, the index json's too)."""
    (root / "blobs").mkdir()
    snapshot = root / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(d.iterdir())):
        (root / "blobs" / f"blob{i}").write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(f"../../blobs/blob{i}")
    return snapshot


@pytest.mark.parametrize("source", ["dir", "index", "one_file", "hub_cache"])
def test_meta_model_runs_from_checkpoint(saved, source, tmp_path):
    model, kw, d, ref = saved
    if source == "hub_cache":
        weights = _as_hub_cache(d, tmp_path)
    elif source == "index":
        weights = d / "model.safetensors.index.json"
    elif source == "dir":
        weights = d
    else:
        from safetensors.torch import save_model

        weights = tmp_path / "model.safetensors"
        save_model(model, str(weights))
    meta = _meta_twin(model)
    peak = memsched.plan(meta, (), budget=10**12, example_kwargs=kw, hardware=FIXED_CPU).unconstrained.peak_device_bytes
    for budget in (10**9, int(peak * 0.4)):
        cm = memsched.compile(meta, budget, device="cpu", hardware=FIXED_CPU, weights=weights, offload_dir=tmp_path)
        try:
            with torch.no_grad():
                out = cm(**kw).logits
            assert torch.equal(out, ref)
            assert cm.stats.peak_device_bytes <= budget
            if budget < 10**9:
                assert cm.plan.tier_bytes()["disk"] > 0 and cm.stats.bytes_moved.get("disk_read", 0) > 0
                assert not cm._stores._homes  # weights are read in place: none copied into an offload file
        finally:
            cm.close()
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_generate_from_checkpoint(saved, tmp_path):
    model, kw, d, _ = saved
    ids = kw["input_ids"][:, :8]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    meta = _meta_twin(model)
    probe = memsched.Generator(meta, "1GB", batch=ids.shape[0], prompt_len=8, max_len=14, sample_ids=ids,
                               device="cpu", hardware=FIXED_CPU, weights=d)
    budget = max(p.min_budget_bytes for p in probe.plans)
    probe.close()
    tokens = memsched.generate(meta, ids, budget=budget, max_new_tokens=6, weights=d, device="cpu",
                               hardware=FIXED_CPU, eos_token_id=None, offload_dir=tmp_path)
    assert torch.equal(tokens, ref)


def test_checkpoint_changed_while_in_use_is_detected(saved, tmp_path):
    model, kw, d, ref = saved
    from safetensors.torch import save_model

    path = tmp_path / "model.safetensors"
    save_model(model, str(path))
    meta = _meta_twin(model)
    cm = memsched.compile(meta, memsched.plan(meta, (), 10**12, example_kwargs=kw, hardware=FIXED_CPU).min_budget_bytes,
                          device="cpu", hardware=FIXED_CPU, weights=path, offload_dir=tmp_path)
    try:
        with torch.no_grad():
            assert torch.equal(cm(**kw).logits, ref)
            streamed = [c.entry for (_, tier), c in cm._stores._loaded.items() if tier == "disk"]
            assert streamed
            with open(path, "r+b") as f:  # flip the first bytes of a weight streamed from disk
                f.seek(streamed[0].offset)
                head = f.read(16)
                f.seek(streamed[0].offset)
                f.write(bytes(b ^ 0xFF for b in head))
            with pytest.raises(memsched.DiskIntegrityError, match="changed"):
                cm(**kw)
    finally:
        cm.close()


def _safetensors(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _tiny():
    return torch.nn.Sequential(torch.nn.Linear(4, 3)).eval()


def _meta_tiny():
    with torch.device("meta"):
        return _tiny()


GOOD = {"0.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
        "0.bias": {"dtype": "F32", "shape": [3], "data_offsets": [48, 60]}}


@pytest.mark.parametrize("case, match", [
    ("truncated", "too short"),
    ("header_too_long", "does not fit"),
    ("not_json", "not a valid safetensors file: .*invalid JSON"),
    ("not_object", "not a valid safetensors file: .*invalid JSON"),
    ("bad_dtype", "not a valid safetensors file: .*Q4"),
    ("unread_dtype", "a dtype memsched does not read \\(C64"),
    ("offsets_outside", "not a valid safetensors file: .*not fully covered"),
    ("offsets_wrong_size", "not a valid safetensors file: .*invalid offset"),
    ("offsets_overlap", "not a valid safetensors file: .*invalid offset"),
    ("bad_shape", "not a valid safetensors file: .*-3"),
    ("missing_tensor", "not in checkpoint"),
    ("one_shard", r"not in checkpoint .*values\. model-00001-of-00002.safetensors is one shard of a checkpoint "
                  r"of 2 files: pass its directory \(.*\) or its index \(model.safetensors.index.json\) as weights="),
    ("shape_mismatch", "the model"),
    ("dtype_mismatch", "the model"),
    ("no_file", "does not exist"),
    ("index_escapes", "outside its directory"),
    ("index_names_no_file", "the names of shard files, found 5"),
    ("index_nests_deep", "nests too deep"),
    ("a_pipe", "not a regular file"),   # a read would wait for a writer forever
    ("torch_save_zip", "is a PyTorch pickle, not a safetensors file: memsched reads only safetensors"),
    ("legacy_pickle", "is a PyTorch pickle"),   # never unpickled: that could run code the file names
    ("directory_of_bins", r"no \*.safetensors file in .* \(it holds pytorch_model.bin: memsched reads only"),
])
def test_hostile_checkpoints_fail_before_anything_runs(tmp_path, case, match):
    p = tmp_path / "model.safetensors"
    data = bytes(60)
    if case == "truncated":
        p.write_bytes(b"\x01\x02")
    elif case == "header_too_long":
        _safetensors(p, GOOD, data, length=10**9)
    elif case == "not_json":
        _safetensors(p, b"{not json", data)
    elif case == "not_object":
        _safetensors(p, b"[1, 2]", data)
    elif case == "bad_dtype":
        _safetensors(p, {**GOOD, "0.bias": {"dtype": "Q4", "shape": [3], "data_offsets": [48, 60]}}, data)
    elif case == "unread_dtype":
        _safetensors(p, {**GOOD, "0.bias": {"dtype": "C64", "shape": [1], "data_offsets": [48, 56]}}, bytes(56))
    elif case == "offsets_overlap":
        _safetensors(p, {**GOOD, "0.bias": {"dtype": "F32", "shape": [3], "data_offsets": [36, 48]}}, bytes(48))
    elif case == "offsets_outside":
        _safetensors(p, {**GOOD, "0.bias": {"dtype": "F32", "shape": [3], "data_offsets": [48, 60]}}, bytes(50))
    elif case == "offsets_wrong_size":
        _safetensors(p, {**GOOD, "0.bias": {"dtype": "F32", "shape": [3], "data_offsets": [40, 60]}}, data)
    elif case == "bad_shape":
        _safetensors(p, {**GOOD, "0.bias": {"dtype": "F32", "shape": [-3], "data_offsets": [48, 60]}}, data)
    elif case == "missing_tensor":
        _safetensors(p, {"0.weight": GOOD["0.weight"]}, bytes(48))
    elif case == "one_shard":   # the first of transformers' shards given where its directory was meant
        p = tmp_path / "model-00001-of-00002.safetensors"
        _safetensors(p, {"0.weight": GOOD["0.weight"]}, bytes(48))
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "0.weight": p.name, "0.bias": "model-00002-of-00002.safetensors"}}))
    elif case == "shape_mismatch":
        _safetensors(p, {**GOOD, "0.weight": {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]}}, data)
    elif case == "dtype_mismatch":
        _safetensors(p, {**GOOD, "0.weight": {"dtype": "I32", "shape": [3, 4], "data_offsets": [0, 48]}}, data)
    elif case == "no_file":
        p = tmp_path / "absent.safetensors"
    elif case == "index_escapes":
        p = tmp_path / "model.safetensors.index.json"
        p.write_text(json.dumps({"weight_map": {"0.weight": "../elsewhere.safetensors"}}))
    elif case == "index_names_no_file":
        p = tmp_path / "model.safetensors.index.json"
        p.write_text(json.dumps({"weight_map": {"0.weight": 5}}))
    elif case == "index_nests_deep":
        p = tmp_path / "model.safetensors.index.json"
        p.write_text("[" * 100_000)
    elif case == "a_pipe":
        os.mkfifo(p)
    elif case in ("torch_save_zip", "legacy_pickle"):
        p = tmp_path / "pytorch_model.bin"
        torch.save(_tiny().state_dict(), p, _use_new_zipfile_serialization=case == "torch_save_zip")
    elif case == "directory_of_bins":
        torch.save(_tiny().state_dict(), tmp_path / "pytorch_model.bin")
        p = tmp_path
    meta = _meta_tiny()
    with pytest.raises(memsched.CheckpointError, match=match):
        memsched.compile(meta, "1GB", device="cpu", hardware=FIXED_CPU, weights=p)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 400)))
def test_corrupted_checkpoints_run_exactly_or_fail_with_a_checkpoint_error(tmp_path, edits, cut):
    """Bytes of a real safetensors file changed or cut anywhere: the meta model either runs with
    the file's bytes (an edit that hit the data) or fails with CheckpointError before running,
    never with another error."""
    model = _tiny()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    raw = bytearray(path.read_bytes())
    for at, byte in edits:
        raw[at % len(raw)] = byte
    if cut is not None:
        del raw[cut % len(raw):]
    path.write_bytes(bytes(raw))
    try:
        cm = memsched.compile(_meta_tiny(), "1GB", device="cpu", hardware=FIXED_CPU, weights=path)
    except memsched.CheckpointError:
        return
    try:
        with torch.no_grad():
            out = cm(torch.ones(2, 4))
    except memsched.CheckpointError:
        return
    finally:
        cm.close()
    assert out.shape == (2, 3)   # ran on whatever the data bytes now hold


def test_meta_model_without_weights_is_refused():
    with pytest.raises(ValueError, match="weights="):
        memsched.compile(_meta_tiny(), "1GB", device="cpu")


def test_training_from_a_checkpoint_is_refused(tmp_path):
    from safetensors.torch import save_model

    save_model(_tiny(), str(tmp_path / "m.safetensors"))
    with pytest.raises(NotImplementedError, match="inference only"):
        memsched.compile(_meta_tiny().train(), "1GB", device="cpu", train=True, weights=tmp_path / "m.safetensors")


def test_experts_saved_one_at_a_time_are_refused_with_why_and_the_way_out(tmp_path):
    """transformers saves a Qwen3-MoE's stacked experts one expert at a time and stacks them
    again as it loads; memsched reads tensors by the model's own names, so it says that; the
    model's own state_dict saved through safetensors generates transformers' tokens."""
    import accelerate
    import transformers as T
    from safetensors.torch import save_file

    cfg = T.Qwen3MoeConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, intermediate_size=128, num_experts=4,
                           num_experts_per_tok=2, moe_intermediate_size=32, max_position_embeddings=64)
    with quiet_transformers():
        torch.manual_seed(0)
        model = T.Qwen3MoeForCausalLM(cfg).eval()
        model.save_pretrained(tmp_path / "hf")
        with accelerate.init_empty_weights():
            meta = T.Qwen3MoeForCausalLM(cfg).eval()
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(budget="1GB", max_new_tokens=4, eos_token_id=None, hardware=FIXED_CPU, device="cpu")
    with pytest.raises(memsched.CheckpointError, match="experts one expert at a time.*state_dict"):
        memsched.generate(meta, ids, weights=tmp_path / "hf", **kw)
    (tmp_path / "own").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "own" / "model.safetensors"))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert torch.equal(memsched.generate(meta, ids, weights=tmp_path / "own", **kw), ref)


def test_one_signature_keeps_its_device_weights_at_a_time(saved, tmp_path):
    """Two input shapes, two programs: the weights each keeps on the device are loaded when it
    runs and dropped when the other runs, so the device never holds both sets."""
    model, kw, d, _ = saved
    meta = _meta_twin(model)
    ids = kw["input_ids"]
    short = {"input_ids": ids[:, :8]}
    with torch.no_grad():
        refs = [model(**kw).logits, model(**short).logits]
    budget = int(memsched.plan(meta, (), 10**12, example_kwargs=kw, hardware=FIXED_CPU).unconstrained.peak_device_bytes * 0.6)
    cm = memsched.compile(meta, budget, device="cpu", hardware=FIXED_CPU, weights=d, offload_dir=tmp_path)

    def loaded(executor):
        return sum(executor._slots[r.index].nbytes for r in executor._model_slots
                   if r.tier == "device" and r.checkpointed and executor._slots[r.index] is not None)

    try:
        with torch.no_grad():
            for _ in range(2):
                for inputs, ref in zip((kw, short), refs):
                    assert torch.equal(cm(**inputs).logits, ref)
                    executors = [entry[2] for entry in cm._compiled.values()]
                    running = cm._last[2]
                    assert loaded(running) > 0
                    assert all(loaded(e) == 0 for e in executors if e is not running)
    finally:
        cm.close()
