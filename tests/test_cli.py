"""The `memsched` command line, run in-process through `memsched.cli.main`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cli_helpers import calibration_cache, on_gpu, record_status, run  # noqa: F401  (an autouse fixture)
from memsched.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FACTORY = textwrap.dedent("""
    import torch
    import torch.nn as nn

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                              nn.Linear(256, 64)).eval()
        return model, (torch.randn(2, 64),)

    def build_kwargs(batch=1):
        model, (x,) = build()
        return model, (), {"input": torch.randn(batch, 64)}

    def not_a_model():
        return 42, (torch.zeros(1),)

    def warns():
        import warnings
        warnings.warn("the factory's own note")
        return build()

    def fast_path():   # eager takes PyTorch's transformer fast path: memsched warns at capture
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True).eval().requires_grad_(False)
        return layer, (torch.randn(2, 5, 32),)
""")


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    path = tmp_path_factory.mktemp("targets") / "tiny_mlp.py"
    path.write_text(FACTORY)
    return path




def test_a_warning_prints_as_one_line(capsys, factory):
    """As errors do: no file, line and source of the call that raised it (--debug keeps them)."""
    code, _, err = run(capsys, "plan", f"{factory}:warns", "--budget", on_gpu("t4", "1MB"), "--hardware", "t4")
    assert code == 0, err
    assert err.splitlines() == ["memsched: warning: UserWarning: the factory's own note"]


def test_memscheds_own_warning_is_prefixed_once(capsys, factory):
    code, _, err = run(capsys, "plan", f"{factory}:fast_path", "--budget", on_gpu("t4", "1MB"), "--hardware", "t4")
    assert code == 0, err
    assert err.startswith("memsched: warning: TransformerEncoderLayer (the model itself) runs on PyTorch's "
                          "transformer fast path"), err


def test_hardware_lists_presets(capsys):
    code, out, err = run(capsys, "hardware")
    assert code == 0, err
    for name in ("h100", "a100-40gb", "t4"):
        assert name in out
    assert "GiB" in out


def test_hardware_json(capsys):
    code, out, _ = run(capsys, "hardware", "--format", "json")
    assert code == 0
    names = {hw["name"] for hw in json.loads(out)}
    assert {"h100", "h200", "t4"} <= names


def test_plan_json_within_budget(capsys, factory):
    budget = int(on_gpu("h100", "1MB"))
    code, out, err = run(capsys, "plan", f"{factory}:build", "--budget", budget, "--hardware", "h100",
                         "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["format"], report["version"]) == ("memsched-plan", 1)
    assert report["budget_bytes"] == budget
    assert 0 < report["predicted"]["peak_device_bytes"] <= budget
    assert report["placement"]["min_budget_bytes"] <= budget
    assert report["hardware"]["name"] == "h100"
    assert set(report["placement"]["tier_bytes"]) == {"device", "host", "disk"}
    assert report["predicted"]["time_s"] >= report["unconstrained"]["time_s"] > 0
    assert [p["name"] for p in report["passes"]][0] == "capture"
    assert report["input_signature"]["leaves"] == [{"shape": [2, 64], "dtype": "torch.float32", "device": "cpu"}]


def test_plan_tight_budget_moves_weights(capsys, factory):
    # weights are ~393 KB: a budget well under that must stream some of them in
    code, out, err = run(capsys, "plan", f"{factory}:build", "--budget", on_gpu("t4", "300KB"), "--hardware", "t4",
                         "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["predicted"]["peak_device_bytes"] <= int(on_gpu("t4", "300KB"))
    assert report["predicted"]["bytes_moved"].get("h2d", 0) > 0


def test_plan_table_default_hardware(capsys, factory):
    code, out, err = run(capsys, "plan", f"{factory}:build_kwargs", "--budget", "2MB", "--batch", "3")
    assert code == 0, err
    assert "Memory per tier" in out and "Bytes moved per call" in out
    assert "Planning time per pass" in out and "placement" in out
    assert "local:" in out  # the calibrated profile of this machine
    assert "def program(" not in out


def test_plan_code(capsys, factory):
    code, out, err = run(capsys, "plan", f"{factory}:build", "--budget", on_gpu("h100", "1MB"), "--hardware", "h100",
                         "-f", "code")
    assert code == 0, err
    assert "def program(" in out
    assert out.index("def program(") < out.index("Memory per tier")


def test_plan_fuse_lists_regions(capsys, factory):
    code, out, err = run(capsys, "plan", f"{factory}:build", "--budget", on_gpu("h100", "1GB"), "--hardware", "h100",
                         "-f", "code", "--fuse")
    assert code == 0, err
    assert " = region(" in out and "# [fuse]" in out and "fused regions" in out


def test_plan_module_factory(capsys, factory, monkeypatch):
    monkeypatch.syspath_prepend(str(factory.parent))
    code, out, err = run(capsys, "plan", "tiny_mlp:build_kwargs", "--budget", on_gpu("h100", "1MB"), "--hardware", "h100",
                         "--batch", "4", "-f", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "Sequential (tiny_mlp:build_kwargs)"
    assert report["input_signature"]["leaves"][0]["shape"] == [4, 64]
    assert report["predicted"]["peak_device_bytes"] <= int(on_gpu("h100", "1MB"))


def test_plan_hf_config_path(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500).save_pretrained(tmp_path)
    code, out, err = run(capsys, "plan", tmp_path, "--budget", on_gpu("a100-40gb", "2MB"), "--hardware", "a100-40gb",
                         "--seq-len", "16", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"].startswith("GPT2LMHeadModel")
    assert 0 < report["predicted"]["peak_device_bytes"] <= int(on_gpu("a100-40gb", "2MB"))
    # the same config by file path, in a budget below the weights (~0.8 MB) so some stream in
    code, out, err = run(capsys, "plan", tmp_path / "config.json", "--budget", on_gpu("a100-40gb", "600KB"),
                         "--hardware", "a100-40gb", "--seq-len", "16", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["predicted"]["peak_device_bytes"] <= int(on_gpu("a100-40gb", "600KB"))
    assert report["placement"]["tier_bytes"]["host"] + report["placement"]["tier_bytes"]["disk"] > 0


def test_plan_a_vision_config_without_an_image_size(capsys, tmp_path):
    """A convolutional config names no image size (ResNet): the CLI plans it at 224 x 224 and says so."""
    transformers = pytest.importorskip("transformers")
    transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]).save_pretrained(tmp_path)
    code, out, err = run(capsys, "plan", tmp_path, "--budget", on_gpu("t4", "4MB"), "--hardware", "t4",
                         "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"].endswith("image 224x224)")
    assert report["input_signature"]["leaves"][0]["shape"] == [1, 3, 224, 224]


def test_plan_a_dual_encoder_config_reads_text_and_images(capsys, tmp_path):
    """CLIP's main input is its text, but its forward reads images too: the CLI synthesizes
    both, the images as its vision config sizes them (it failed to capture before)."""
    transformers = pytest.importorskip("transformers")
    transformers.CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 32},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "num_channels": 3},
        projection_dim=16).save_pretrained(tmp_path)
    code, out, err = run(capsys, "plan", tmp_path, "--budget", on_gpu("t4", "4MB"), "--hardware", "t4",
                         "--seq-len", "16", "--format", "json")
    assert code == 0, err
    shapes = sorted(leaf["shape"] for leaf in json.loads(out)["input_signature"]["leaves"])
    assert shapes == [[1, 3, 32, 32], [1, 16]], shapes


def test_plan_a_config_whose_weights_ignore_the_meta_device(capsys, tmp_path):
    """XLNet makes its attention weights by torch.FloatTensor, which builds on the host under
    the meta device, and names -1 as its maximum length: both failed the plan before (a device
    mismatch in the capture; "--seq-len 16 exceeds the model's maximum of -1")."""
    transformers = pytest.importorskip("transformers")
    transformers.XLNetConfig(d_model=32, n_layer=1, n_head=2, d_inner=64, vocab_size=100).save_pretrained(tmp_path)
    code, out, err = run(capsys, "plan", tmp_path, "--budget", on_gpu("t4", "4MB"), "--hardware", "t4",
                         "--seq-len", "16", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["input_signature"]["leaves"][0]["shape"] == [1, 16]


@pytest.mark.parametrize("kind", ["whisper", "wav2vec2"])
def test_plan_an_audio_config(capsys, tmp_path, kind):
    """Audio models take features or a waveform: --seq-len counts the encoder's frames (Whisper's
    log-mel length is the one its positions cover; a waveform is as many samples as the
    feature encoder turns into that many frames) and an encoder-decoder's decoder tokens."""
    transformers = pytest.importorskip("transformers")
    if kind == "whisper":
        transformers.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                                   decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                   num_mel_bins=8, max_source_positions=32, max_target_positions=32,
                                   vocab_size=100, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                   decoder_start_token_id=0).save_pretrained(tmp_path)
        want = {"input_features": [1, 8, 64], "decoder_input_ids": [1, 16]}
    else:
        transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                    conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                    num_conv_pos_embedding_groups=2, vocab_size=32).save_pretrained(tmp_path)
        want = {"input_values": [1, 20 + 15 * 10]}   # one frame's receptive field, then 15 strides
    code, out, err = run(capsys, "plan", tmp_path, "--budget", on_gpu("t4", "64MB"), "--hardware", "t4",
                         "--seq-len", "16", "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert "audio" in report["model"]
    assert sorted(leaf["shape"] for leaf in report["input_signature"]["leaves"]) == sorted(want.values())


def test_plan_training_step(capsys, tmp_path):
    """--train plans forward and backward: the saved activations and what happens to each."""
    transformers = pytest.importorskip("transformers")
    transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500).save_pretrained(tmp_path)
    code, out, err = run(capsys, "plan", tmp_path, "--train", "--budget", on_gpu("t4", "3MB"), "--hardware", "t4",
                         "--seq-len", "32", "--time-limit", "2")
    assert code == 0, err
    assert "Saved activations" in out and "recompute overhead" in out
    assert "Predicted time per training step" in out
    code, out, err = run(capsys, "plan", tmp_path, "--train", "--budget", on_gpu("t4", "3MB"), "--hardware", "t4",
                         "--seq-len", "32", "--time-limit", "2", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["predicted"]["peak_device_bytes"] <= int(on_gpu("t4", "3MB"))
    # a saved training plan loads and verifies like any other
    (tmp_path / "step.json").write_text(out)
    code, out, err = run(capsys, "verify", tmp_path / "step.json")
    assert code == 0, err


def _table_block(out: str, title: str, next_title: str) -> str:
    """The lines of the rich table titled ``title`` (up to the next table's title)."""
    start = out.index(title)
    return out[start:out.index(next_title, start)]


def test_show_saved_training_plan_prints_its_saved_activations(capsys, tmp_path):
    """`memsched show` of a saved training plan prints the same saved-activations table as
    `memsched plan --train` did, from the rows stored in the file."""
    transformers = pytest.importorskip("transformers")
    import memsched

    transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=500).save_pretrained(tmp_path)
    path = tmp_path / "step.json"
    code, planned, err = run(capsys, "plan", tmp_path, "--train", "--budget", on_gpu("t4", "3MB"), "--hardware", "t4",
                             "--seq-len", "16", "--time-limit", "2", "-o", path)
    assert code == 0, err
    code, shown, err = run(capsys, "show", path)
    assert code == 0, err
    assert "Saved activations" in shown and "recompute overhead" in shown
    assert "Predicted time per training step" in shown
    block = _table_block(shown, "Saved activations", "Predicted time per training step")
    assert block == _table_block(planned, "Saved activations", "Predicted time per training step")
    loaded = memsched.Plan.load(path)
    rows = loaded.saved_activations()
    assert loaded.is_training and rows
    assert f"Saved activations ({len(rows)})" in block
    for r in sorted(rows, key=lambda r: -r["bytes"])[:40]:
        assert any(line.split()[:1] == [r["value"]] and line.split()[-1] == r["decision"]
                   for line in block.splitlines()), r


def test_infeasible_budget_exits_3_with_minimum(capsys, factory):
    code, out, err = run(capsys, "plan", f"{factory}:build", "--budget", on_gpu("h100", "1KB"), "--hardware", "h100")
    assert code == 3
    assert out == ""
    assert "minimum" in err and "--budget" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["--budget", "8 bananas"], "budget"),
    (["--budget", "1MB", "--hardware", "tpu-v9"], "unknown hardware"),
])
def test_bad_requests_exit_2(capsys, factory, argv, needle):
    code, out, err = run(capsys, "plan", f"{factory}:build", *argv)
    assert code == 2
    assert needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize("target, needle", [
    ("does/not/exist.py:build", "does not exist"),
    ("{dir}/tiny_mlp.py:nope", "no factory 'nope'"),
    ("{dir}/tiny_mlp.py:not_a_model", "nn.Module"),
    ("{dir}/tiny_mlp.py", "no factory"),
    ("{dir}/missing/config.json", "does not exist"),
    ("no_such_module_xyz:build", "no module named"),
    ("hf:not-a-model-type", "unknown Hugging Face model_type"),
    ("justaword", "not understood"),
])
def test_bad_targets_exit_2(capsys, factory, target, needle):
    code, out, err = run(capsys, "plan", target.format(dir=factory.parent), "--budget", on_gpu("h100", "1MB"),
                         "--hardware", "h100")
    assert code == 2
    assert needle in err
    assert out == ""


def test_usage_errors_return_2(capsys):
    assert run(capsys, "plan", "x.py:f")[0] == 2            # --budget is required
    assert run(capsys, "plan", "x.py:f", "-b", "1MB", "--batch", "0")[0] == 2
    assert run(capsys)[0] == 2                               # no command
    code, out, _ = run(capsys, "plan", "--help")
    assert code == 0 and "hf:<model_type>" in out


def test_python_dash_m_hardware():
    proc = subprocess.run([sys.executable, "-m", "memsched", "hardware"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "160"})
    assert proc.returncode == 0, proc.stderr
    assert "h100" in proc.stdout


# -- progress ------------------------------------------------------------------------------


def test_plan_reports_each_stage_to_the_status_line(capsys, factory, monkeypatch):
    shown = record_status(monkeypatch)
    code, _, err = run(capsys, "plan", f"{factory}:build", "--budget", on_gpu("h100", "1MB"), "--hardware", "h100")
    assert code == 0, err
    stages = [m.split(": ")[-1] for m in shown if "planning Sequential" in m]
    for stage in ("capture", "analysis", "segments", "schedule", "simulate"):
        assert stage in stages, (stage, shown)
    assert any(s.startswith("placement (solver") for s in stages), shown


def test_status_spinner_on_a_terminal_only(capsys, monkeypatch):
    import memsched.cli.commands as cli

    with cli._status("memsched: working") as update:
        update("memsched: working: capture")
    assert capsys.readouterr().err == ""          # not a terminal: nothing at all
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with cli._status("memsched: working") as update:
        update("memsched: working: placement")
    assert "placement" in capsys.readouterr().err


def test_plan_subprocess_stderr_clean_when_not_a_terminal(tmp_path, factory):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "memsched", "plan", f"{factory}:build", "--budget", on_gpu("h100", "1MB"),
                           "--hardware", "h100", "-f", "json", "-o", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert json.loads(out.read_text())["format"] == "memsched-plan"


def test_plan_kernels_option_puts_the_kernel_ops_in_the_listing(capsys, tmp_path):
    """A LLaMA config planned for a GPU: with --kernels auto (the default) its norms and rotary
    print as memsched's ops (Triton runs them there); --kernels off leaves the chains."""
    pytest.importorskip("triton")
    import transformers as T

    T.LlamaConfig(vocab_size=200, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64).save_pretrained(tmp_path)
    listings = {}
    for kernels in ("auto", "off"):
        code, out, err = run(capsys, "plan", tmp_path / "config.json", "--budget", "1GB", "--hardware", "t4",
                             "--seq-len", "8", "--kernels", kernels, "-f", "code")
        assert code == 0, err
        listings[kernels] = " ".join(out.split())
    assert "kernels: 5 rms_norm, 4 rope" in listings["auto"] and "memsched.rope(" in listings["auto"]
    assert "memsched.rms_norm(" not in listings["off"] and "kernels:" not in listings["off"]
