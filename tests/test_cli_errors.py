"""The command line's exit code for every class of failure (``memsched.cli.commands.EXIT_CODES``),
each with one line on stderr and no traceback, unless ``--debug`` asks for it:

0 ok; 1 a plan fails verification; 2 the user's error (usage, budget, target that does not
import or whose factory raises, a model that does not capture, a file that is not a readable
plan, a file that cannot be read or written); 3 a budget below the minimum; 4 an internal
error; 130 interrupted.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import memsched.cli.commands as commands
from cli_helpers import calibration_cache, on_gpu, run  # noqa: F401  (an autouse fixture)
from memsched.cli import main
from memsched.errors import PlanFileError
from memsched.verify import PlanError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HW = "t4"

FACTORIES = {
    "good.py": """
        import torch
        import torch.nn as nn

        def build():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval(), (torch.randn(2, 16),)

        def raises():
            raise RuntimeError("the factory's own bug")

        def bad_model():
            class Bad(nn.Module):
                def forward(self, x):
                    return x.numpy()  # not traceable
            return Bad(), (torch.randn(2, 16),)
    """,
    "broken_import.py": """
        import no_such_module_for_memsched_tests

        def build():
            pass
    """,
    "syntax_error.py": """
        def build(:
            pass
    """,
    "raises_at_import.py": """
        raise ValueError("configuration missing")
    """,
    "cli_errors_pkg_broken.py": """
        import no_such_dependency_for_memsched_tests

        def build():
            pass
    """,
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    for name, text in FACTORIES.items():
        (root / name).write_text(textwrap.dedent(text))
    return root



@pytest.fixture(scope="module")
def saved(files):
    """A saved plan of the good factory's model, written by the CLI."""
    path = files / "plan.json"
    assert main(["plan", f"{files / 'good.py'}:build", "-b", on_gpu(HW, "1MB"), "--hardware", HW, "-f", "json", "-o",
                 str(path)]) == 0
    return path



def clean(err: str) -> bool:
    """One or two lines on stderr, each from memsched, no traceback."""
    lines = err.strip().splitlines()
    return "Traceback" not in err and 1 <= len(lines) <= 2 and all(line.startswith("memsched: ") for line in lines)


def edited(saved, tmp_path, edit, name="edited.json"):
    doc = json.loads(saved.read_text())
    edit(doc)
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


# -- targets (2) -------------------------------------------------------------------------------


@pytest.mark.parametrize("target, needle", [
    ("good.py:raises", r"the factory raises\(\) failed \(good.py, line \d+\): RuntimeError: the factory's own bug"),
    ("broken_import.py:build", r"importing .*broken_import.py failed \(broken_import.py, line 2\): "
                               r"ModuleNotFoundError: No module named 'no_such_module_for_memsched_tests'"),
    ("syntax_error.py:build", r"importing .*syntax_error.py failed \(syntax_error.py, line 2\): SyntaxError"),
    ("raises_at_import.py:build", r"importing .* failed \(raises_at_import.py, line 2\): ValueError: configuration"),
    ("good.py:bad_model", r"cannot capture the model"),
])
def test_a_target_whose_code_fails_exits_2(capsys, files, target, needle):
    code, out, err = run(capsys, "plan", files / target, "-b", on_gpu(HW, "1MB"), "--hardware", HW)
    assert code == 2 and out == "" and clean(err), err
    assert re.search(needle, err), err


def test_a_module_target_whose_own_import_fails_exits_2(capsys, files, monkeypatch):
    monkeypatch.syspath_prepend(str(files))
    code, _, err = run(capsys, "plan", "cli_errors_pkg_broken:build", "-b", on_gpu(HW, "1MB"), "--hardware", HW)
    assert code == 2 and clean(err), err
    assert "importing cli_errors_pkg_broken failed" in err and "no_such_dependency_for_memsched_tests" in err
    sys.modules.pop("cli_errors_pkg_broken", None)


# -- saved plans (2, 1) --------------------------------------------------------------------------


_LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_hidden_layers": 1, "vocab_size": 100}


@pytest.mark.parametrize("edit, needle", [
    ({"hidden_size": -4}, r"could not build LlamaConfig: RuntimeError: Trying to create tensor with negative"),
    ({"num_attention_heads": 5}, r"The hidden size \(64\) is not a multiple of the number of attention heads \(5\)"),
    ({"hidden_size": 64.5}, r"Field 'hidden_size' expected int, got float"),
    ({"num_attention_heads": 0}, r"cannot read Hugging Face config .*ZeroDivisionError"),
    ({"pad_token_id": 500},
     r"transformers could not build LlamaConfig: \w+: Padding_idx must be within num_embeddings"),
    ({"vocab_size": 10**12}, r"model.embed_tokens.weight \(\[1000000000000, 64\], torch.float32: "
                             r"256,000,000,000,000 bytes\) is too large for this machine to reserve at once"),
])
def test_a_config_json_with_values_transformers_or_the_machine_refuse_exits_2(capsys, tmp_path, edit, needle):
    """A hostile config.json is the user's error (2), named, not an internal error (4)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**_LLAMA, **edit}))
    code, out, err = run(capsys, "plan", path, "-b", "1GB", "--hardware", HW, "--seq-len", "8")
    assert code == 2 and out == "" and clean(err), err
    assert re.search(needle, err), err


@pytest.mark.parametrize("command", ["show", "verify"])
@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["program"]["nodes"][5].__setitem__("args", [{"device": "tpu:0"}]), "'tpu:0' is not a device"),
    (lambda d: d["program"]["storages"].__setitem__(0, -1), r"program.storages\[0\]: -1 is out of range"),
    (lambda d: d["program"]["nodes"][0].__setitem__("target", "x=__import__('os')"), "is not a state key"),
    (lambda d: d.__setitem__("version", 99), "newer memsched"),
])
def test_a_damaged_plan_file_exits_2(capsys, saved, tmp_path, command, edit, needle):
    code, out, err = run(capsys, command, edited(saved, tmp_path, edit))
    assert code == 2 and out == "" and clean(err), err
    assert re.search(needle, err), err


@pytest.mark.parametrize("command", ["show", "verify"])
@pytest.mark.parametrize("content, needle", [
    ("[" * 200_000 + "]" * 200_000, "nests deeper than 64 levels"),
    ('{"a": ' + "[" * 70 + "1" + "]" * 70 + "}", "nests deeper"),
    (b"\x80\x81 not text", "not UTF-8"),
    ("{not json", "not JSON"),
])
def test_a_file_that_is_not_a_plan_exits_2(capsys, tmp_path, command, content, needle):
    path = tmp_path / "file.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = run(capsys, command, path)
    assert code == 2 and out == "" and clean(err) and needle in err, err


@pytest.mark.parametrize("command", ["show", "verify"])
def test_unreadable_files_exit_2(capsys, tmp_path, command):
    for path in (tmp_path, tmp_path / "missing.json"):
        code, _, err = run(capsys, command, path)
        assert code == 2 and clean(err) and "cannot read" in err, err
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked.json"
        locked.write_text("{}")
        locked.chmod(0)
        code, _, err = run(capsys, command, locked)
        assert code == 2 and clean(err) and "cannot read" in err, err


def test_a_plan_whose_budget_is_below_its_own_peak(capsys, saved, tmp_path):
    path = edited(saved, tmp_path, lambda d: d.__setitem__("budget_bytes", d["predicted"]["peak_device_bytes"] - 1))
    code, out, err = run(capsys, "verify", path)
    assert code == 1 and out == "" and clean(err) and "does not verify" in err and "over the budget" in err, err
    code, out, err = run(capsys, "show", path)  # a plan that does not verify still prints
    assert code == 0 and "Memory per tier" in out, err


def test_a_plan_that_fails_the_pipeline_s_verification_exits_1(capsys, files, monkeypatch):
    def broken(*args, **kwargs):
        raise PlanError("step 3 (mm) reads wait_1 after it was freed")

    monkeypatch.setattr(commands, "make_plan", broken)
    code, out, err = run(capsys, "plan", f"{files / 'good.py'}:build", "-b", on_gpu(HW, "1MB"), "--hardware", HW)
    assert code == 1 and out == "" and clean(err) and "does not verify: step 3 (mm)" in err, err


# -- writing (2) --------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["missing-dir/plan.json", "."])
def test_an_output_that_cannot_be_written_exits_2(capsys, files, tmp_path, where):
    code, out, err = run(capsys, "plan", f"{files / 'good.py'}:build", "-b", on_gpu(HW, "1MB"), "--hardware", HW, "-f", "json",
                         "-o", tmp_path / where)
    assert code == 2 and out == "" and clean(err) and "cannot write" in err, err


def test_a_plan_that_cannot_be_saved_exits_2(capsys, files, monkeypatch):
    def unsavable(plan):
        raise PlanFileError("mm_1: cannot save its target <custom op> by name")

    monkeypatch.setattr(commands, "dumps", unsavable)
    code, out, err = run(capsys, "plan", f"{files / 'good.py'}:build", "-b", on_gpu(HW, "1MB"), "--hardware", HW, "-f", "json")
    assert code == 2 and out == "" and clean(err) and "cannot save the plan: mm_1" in err, err


# -- budgets (2, 3), usage (2) -------------------------------------------------------------------


def test_budgets(capsys, files, saved):
    code, _, err = run(capsys, "plan", f"{files / 'good.py'}:build", "-b", "lots", "--hardware", HW)
    assert code == 2 and clean(err) and "budget" in err
    code, _, err = run(capsys, "plan", f"{files / 'good.py'}:build", "-b", "1KB", "--hardware", HW)
    assert code == 3 and clean(err) and "smallest budget that works" in err
    code, _, err = run(capsys, "verify", saved, "--budget=-5MB")
    assert code == 2 and clean(err), err
    code, _, err = run(capsys, "plan", f"{files / 'good.py'}:build", "-b", "1MB", "--hardware", "tpu-v9")
    assert code == 2 and clean(err) and "unknown hardware" in err


def test_usage_errors_exit_2(capsys):
    assert run(capsys, "plan")[0] == 2
    assert run(capsys, "frobnicate")[0] == 2
    assert run(capsys, "show")[0] == 2
    assert run(capsys)[0] == 2


# -- internal errors (4), interrupts (130), --debug ------------------------------------------------


def test_an_internal_error_exits_4_and_points_at_debug(capsys, files, saved, monkeypatch):
    def bug(*args, **kwargs):
        raise KeyError("a planner bug")

    monkeypatch.setattr(commands, "make_plan", bug)
    code, out, err = run(capsys, "plan", f"{files / 'good.py'}:build", "-b", on_gpu(HW, "1MB"), "--hardware", HW)
    assert code == 4 and out == "" and clean(err), err
    assert "internal error" in err and "KeyError" in err and "--debug" in err
    monkeypatch.setattr(commands, "_print_plan", bug)
    code, out, err = run(capsys, "show", saved)
    assert code == 4 and clean(err) and "internal error" in err, err
    with pytest.raises(KeyError, match="a planner bug"):  # --debug: the exception itself
        main(["show", str(saved), "--debug"])


def test_an_interrupt_exits_130(capsys, saved, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_print_plan", interrupted)
    code, _, err = run(capsys, "show", saved)
    assert code == 130 and "interrupted" in err


def test_debug_lets_user_errors_propagate(files, saved, tmp_path):
    with pytest.raises(PlanFileError, match="nests deeper"):
        path = tmp_path / "deep.json"
        path.write_text("[" * 1000 + "]" * 1000)
        main(["verify", str(path), "--debug"])
    with pytest.raises(ValueError, match="the factory raises"):
        main(["plan", f"{files / 'good.py'}:raises", "-b", on_gpu(HW, "1MB"), "--hardware", HW, "--debug"])


def test_every_command_documents_the_exit_codes(capsys):
    for command in ([], ["plan"], ["verify"], ["show"], ["hardware"]):
        code, out, _ = run(capsys, *command, "--help")
        assert code == 0 and "exit codes:" in out
        for line in ("0    ok", "1    a plan fails verification", "2    the user's error", "3    a budget below",
                     "4    an internal error", "130  interrupted", "--debug"):
            assert line in out, (command, line)


def test_subprocess_debug_prints_the_traceback_and_plain_does_not(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    argv = [sys.executable, "-m", "memsched", "show", str(path)]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert plain.returncode == 2 and plain.stdout == "" and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("memsched: error: ") and "nests deeper" in plain.stderr
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "PlanFileError" in debug.stderr and "nests deeper" in debug.stderr


def test_subprocess_output_cut_short_by_a_closed_pipe_is_not_an_error(saved):
    proc = subprocess.Popen([sys.executable, "-m", "memsched", "show", str(saved), "--format", "code"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    proc.stdout.close()  # like `| head -0`: gone before the first line is written (torch takes seconds to import)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0 and err == "", err
