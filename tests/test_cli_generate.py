"""`memsched generate`: random weights and prompt, both programs planned inside the budget,
where the weights and the KV cache live, then tokens/s; run in-process through
`memsched.cli.main` on a two-layer GPT-2 (hf:gpt2 itself takes ~40 s to plan and run here)."""
from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch

import memsched.cli.commands as cli
from cli_helpers import calibration_cache, on_gpu, record_status, run  # noqa: F401  (an autouse fixture)
from memsched.cli import main

pytest.importorskip("transformers")

TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 500,
             "n_positions": 64}
HW = "t4"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate") / "config.json"
    path.write_text(json.dumps(TINY_GPT2))
    return path




def one_error_line(err: str) -> bool:
    lines = err.strip().splitlines()
    return "Traceback" not in err and len(lines) == 1 and lines[0].startswith("memsched: error: ")


def placement_rows(out: str) -> dict:
    """tier -> (prefill weights, prefill KV cache, decode weights, decode KV cache) as printed."""
    rows = {}
    for line in out.splitlines():
        m = re.match(r"\s*(device|host|disk)\s+(\S+ \S+)\s+(\S+ \S+)\s+(\S+ \S+)\s+(\S+ \S+)\s*$", line)
        if m:
            rows[m.group(1)] = m.groups()[1:]
    return rows


def test_generate_prints_the_plan_and_tokens_per_second(capsys, monkeypatch, config, tmp_path):
    shown = record_status(monkeypatch)
    # 300KB holds the activations and part of the 531 KiB of weights: the rest lives in host RAM
    code, out, err = run(capsys, "generate", config, "--budget", on_gpu(HW, "300KB"), "--prompt-len", 8, "--new-tokens", 4,
                         "--batch", 2, "--hardware", HW, "--device", "cpu", "--offload-dir", tmp_path / "off",
                         "--seed", 3)
    assert code == 0, err
    assert err == ""  # piped: no spinner, and transformers' advice stays quiet
    assert "memsched generation plan for GPT2LMHeadModel" in out
    assert re.search(r"KV cache\s+24\.0 KiB \(batch 2, 12 positions\)", out), out
    for program, per in (("prefill", "prompt"), ("decode", "token")):
        assert re.search(rf"{program}\s+peak device .*? minimum budget .*? per\s+{per}", out, re.S), out
    rows = placement_rows(out)
    assert set(rows) == {"device", "host", "disk"}, out
    assert rows["host"][0] != "0 B" and rows["host"][2] != "0 B", out  # weights streamed from host
    assert re.search(r"^generated 2 x 4 tokens: \d+\.\d tokens/s$", out, re.M), out
    assert re.search(r"^2x4 new tokens after 8 · \d+\.\d tokens/s · prefill .* plans 2 ", out, re.M), out
    assert any("building" in m for m in shown), shown
    stages = [m.split(": ")[-1] for m in shown if "planning GPT2LMHeadModel" in m]
    for stage in ("prefill capture", "prefill schedule", "decode capture", "decode schedule"):
        assert stage in stages, (stage, shown)
    assert shown[-1] == "memsched: generating 2 x 4 tokens", shown  # the run has its own stage


def test_sliding_layers_print_their_ring(capsys, tmp_path):
    """A decoder whose sliding window is shorter than the generation: the KV cache line says how
    many layers slide and the ring they keep instead of every position."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "mistral", "vocab_size": 300, "hidden_size": 64,
                                "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "sliding_window": 6}))
    code, out, err = run(capsys, "generate", path, "--budget", on_gpu(HW, "10MB"), "--prompt-len", 8, "--new-tokens", 4,
                         "--hardware", HW, "--device", "cpu", "--offload-dir", tmp_path / "off")
    assert code == 0, err
    # 2 layers x K and V x 2 kv heads x 6 slots x head dim 16 x 4 bytes
    flat = " ".join(out.split())   # (a narrow terminal wraps the row)
    assert "KV cache 3.0 KiB (batch 1, 12 positions; 2 of 2 layers slide, a ring of 6)" in flat, out


def test_a_budget_below_the_minimum_exits_3_with_one_line_that_names_it(capsys, config):
    code, out, err = run(capsys, "generate", config, "--budget", on_gpu(HW, "50KB"), "--prompt-len", 8, "--new-tokens", 4,
                         "--hardware", HW, "--device", "cpu")
    assert code == 3 and out == "" and one_error_line(err), err
    assert "below the minimum this model needs" in err and "library workspace (cuBLAS)" in err
    assert re.search(r"retry with --budget \d+(\.\d+)?MB$", err.strip()), err


@pytest.mark.parametrize("argv, needle", [
    (["--new-tokens", "0"], "--new-tokens: expected a positive integer, got '0'"),
    (["--new-tokens", "4", "--prompt-len", "-3"], "--prompt-len: expected a positive integer"),
    (["--new-tokens", "4", "--seed", "x"], "--seed: expected an integer"),
    (["--new-tokens", "4", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["--new-tokens", "4", "--budget", "lots"], "budget"),
])
def test_bad_arguments_exit_2(capsys, config, argv, needle):
    args = {"--budget": "1MB", "--prompt-len": "8"}
    args.update(dict(zip(argv[::2], argv[1::2])))
    code, out, err = run(capsys, "generate", config, "--hardware", HW, *(x for kv in args.items() for x in kv))
    assert code == 2 and out == "", err
    assert needle in err and "Traceback" not in err, err


def test_a_generation_longer_than_the_model_s_positions_exits_2(capsys, config):
    code, out, err = run(capsys, "generate", config, "--budget", on_gpu(HW, "1MB"), "--prompt-len", 60, "--new-tokens", 8,
                         "--hardware", HW)
    assert code == 2 and out == "" and one_error_line(err), err
    assert "--prompt-len 60 + --new-tokens 8 = 68 positions exceeds the model's maximum of 64" in err
    code, _, err = run(capsys, "generate", config, "--budget", on_gpu(HW, "1MB"), "--prompt-len", 80, "--new-tokens", 8,
                       "--hardware", HW)
    assert code == 2 and one_error_line(err) and "--prompt-len 80 exceeds" in err, err


def test_a_target_that_is_not_a_language_model_exits_2(capsys, tmp_path):
    path = tmp_path / "mlp.py"
    path.write_text(textwrap.dedent("""
        import torch
        import torch.nn as nn

        def build():
            return nn.Sequential(nn.Linear(8, 8)).eval(), (torch.randn(1, 8),)
    """))
    code, out, err = run(capsys, "generate", f"{path}:build", "-b", on_gpu(HW, "1MB"), "--prompt-len", 4, "--new-tokens", 2,
                         "--hardware", HW)
    assert code == 2 and out == "" and one_error_line(err), err
    assert "Sequential is not a transformers causal language model" in err
    with pytest.raises(ValueError, match="not a transformers causal language model"):  # --debug: the exception
        main(["generate", f"{path}:build", "-b", on_gpu(HW, "1MB"), "--prompt-len", "4", "--new-tokens", "2",
              "--hardware", HW, "--debug"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_device_cuda_without_one_exits_2(capsys, config):
    code, _, err = run(capsys, "generate", config, "-b", on_gpu(HW, "1MB"), "--prompt-len", 4, "--new-tokens", 2,
                       "--hardware", HW, "--device", "cuda")
    assert code == 2 and one_error_line(err) and "sees no CUDA device" in err, err


def test_random_weights_are_the_architecture_s_own_initialisation_and_seeded(config):
    from memsched.cli.targets import load_target

    def build(seed):
        model, *_ = load_target(str(config), batch=1, seq_len=4)
        cli._materialize(model, seed, str(config))
        return model

    state = torch.get_rng_state()
    a, b, c = build(1), build(1), build(2)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert not any(t.is_meta for t in (*a.parameters(), *a.buffers()))
    assert a.lm_head.weight is a.transformer.wte.weight  # tied again after to_empty
    assert abs(a.transformer.wte.weight.std().item() - 0.02) < 0.002  # GPT-2's initializer_range
    assert torch.equal(a.transformer.h[0].ln_1.weight, torch.ones(64))
    assert torch.equal(a.transformer.wte.weight, b.transformer.wte.weight)
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    prompt = cli._random_prompt(a, 2, 8, seed=5)
    assert prompt.shape == (2, 8) and 0 <= prompt.min() and prompt.max() < 500
    assert torch.equal(prompt, cli._random_prompt(a, 2, 8, seed=5))


def test_help_documents_random_weights_and_the_exit_codes(capsys):
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0 and "RANDOM weights" in out and "exit codes:" in out
    for line in ("2    the user's error", "3    a budget below", "4    an internal error", "130  interrupted"):
        assert line in out
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "generate" in out


def test_block_auto_prints_the_candidates_and_the_choice(capsys, config):
    code, out, err = run(capsys, "generate", config, "--budget", on_gpu(HW, "10MB"), "--prompt-len", 4, "--new-tokens", 3,
                         "--batch", 4, "--block", "auto", "--goal", "latency", "--hardware", HW, "--device", "cpu")
    assert code == 0, err
    assert re.search(r"block 1: prompt .* tokens/s predicted  <- chosen", out), out
    assert "blocks of 1" in out, out
    code, out, err = run(capsys, "generate", config, "--budget", on_gpu(HW, "10MB"), "--prompt-len", 4, "--new-tokens", 3,
                         "--batch", 4, "--block", "3", "--hardware", HW, "--device", "cpu")
    assert code == 2 and "block_size" in err, err


def test_weights_from_a_checkpoint_and_compressed(capsys, tmp_path):
    """--weights reads the parameters from a saved checkpoint (the same tokens as the saved
    model generates from the same prompt); --compress keeps the streamed ones quantised, and
    --compress-kv the KV cache homed on disk."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**TINY_GPT2)).eval()
    model.save_pretrained(tmp_path)  # config.json and model.safetensors
    ids = torch.randint(0, TINY_GPT2["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    shown = []
    import memsched.generation as generation

    original = generation.run_blocks

    def spy(gen, prompt, *a):
        tokens, stats = original(gen, prompt, *a)
        shown.append((prompt, tokens))
        return tokens, stats

    for compress in ((), ("--compress", "int8"), ("--compress", "int4", "--compress-kv", "int8")):
        shown.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(generation, "run_blocks", spy)
            code, out, err = run(capsys, "generate", tmp_path / "config.json", "--weights", tmp_path, "--budget",
                                 on_gpu(HW, "300KB"), "--prompt-len", 8, "--new-tokens", 4, "--hardware", HW, "--device", "cpu",
                                 "--seed", 3, *compress)
        assert code == 0, err
        prompt, tokens = shown[0]
        assert torch.equal(prompt, ids)
        if not compress:
            assert torch.equal(tokens, ref)


def test_hard_limit_reaches_the_compiled_programs(capsys, monkeypatch, config):
    """`--hard-limit` is the `hard_limit=True` of compile: each program's executor is made with it
    (it bounds the CUDA allocator; on this CPU device it changes nothing else)."""
    from memsched.runtime import executor

    made = []
    original = executor.Executor.__init__

    def spy(self, *args, **kwargs):
        made.append(kwargs.get("hard_limit"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(executor.Executor, "__init__", spy)
    code, out, err = run(capsys, "generate", config, "--budget", on_gpu(HW, "1MB"), "--prompt-len", 4, "--new-tokens", 2,
                         "--hardware", HW, "--device", "cpu", "--hard-limit")
    assert code == 0, err
    assert made and all(made), made
