"""Saved plans (``memsched/io/serialize.py``): save -> load gives a plan that prints,
summarises and verifies like the original without re-solving; a loaded plan re-applied with
``memsched.compile(model, plan=...)`` runs the same model bit for bit without calling the
solver; wrong files, newer formats and hand-broken programs fail clearly; and the CLI's
``plan -f json / -o``, ``verify`` and ``show`` read and write the same format.
"""
from __future__ import annotations

import copy
import functools
import json
import math
import os
import sys
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli_helpers import on_gpu  # noqa: E402
from helpers import assert_outputs_equal, eager, forbid_solver  # noqa: E402

import memsched  # noqa: E402
from memsched.cli import main  # noqa: E402
from memsched.io.serialize import (  # noqa: E402
    FORMAT, VERSION, PlanFileError, PlanMismatchError, _decode, _encode, dumps, save_plan, saved_target)
from memsched.ir import ops  # noqa: E402

load_plan = memsched.Plan.load  # memsched.io.serialize reads fields; the Plan is made by plans.py

HW = "t4"


class SkipNet(nn.Module):
    """Matmuls with a long skip and a weight reused at the end: at its minimum budget the plan
    prefetches every weight, refetches w0 and offloads the skip (every inserted op)."""

    def __init__(self, d=64, n=6):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.ParameterList([nn.Parameter(torch.randn(d, d) / d**0.5, requires_grad=False)
                                   for _ in range(n)])

    def forward(self, x):
        h0 = x @ self.w[0]
        h = h0
        for w in self.w[1:]:
            h = torch.tanh(h @ w)
        return (h @ self.w[0]) + h0


class ConstNet(nn.Module):
    """Arguments of every kind the format tags: -inf and nan floats, dtypes, devices, layouts,
    bools, lists, a view (slice) sharing its base's storage, a tuple of outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(32, 32)
        self.lin2 = nn.Linear(32, 32)

    def forward(self, x):
        h = self.lin(x)
        mask = torch.arange(h.shape[-1], device=x.device) % 3 == 0
        h = h.masked_fill(mask, float("-inf")).softmax(-1)
        y = h.to(torch.float64).clamp(min=-float("inf"), max=0.5)
        z = torch.zeros(h.shape, dtype=torch.float32, layout=torch.strided, device=x.device)
        w = self.lin2(h).t().contiguous()
        n = torch.nan_to_num(h.new_full((2,), float("nan")), nan=0.25)
        return y.float() + z, w[:, 1::2], n


def _skipnet():
    torch.manual_seed(1)
    return SkipNet().eval(), (torch.randn(64, 64),), {}


def _constnet():
    torch.manual_seed(2)
    return ConstNet().eval(), (torch.randn(4, 32),), {}


def _gpt2():
    pytest.importorskip("transformers")
    from zoo import build

    return build("gpt2")


MODELS = {"skipnet": _skipnet, "constnet": _constnet, "gpt2": _gpt2}


def _plan(model, args, kwargs, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.plan(model, args, budget=budget, example_kwargs=kwargs, hardware=HW, **kw)


@functools.lru_cache(maxsize=None)
def _case(name):
    """(model, args, kwargs, plan at the minimum budget)."""
    model, args, kwargs = MODELS[name]()
    lo = _plan(model, args, kwargs, 10**12).min_budget_bytes
    return model, args, kwargs, _plan(model, args, kwargs, lo)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> path of the saved min-budget plan."""
    root = tmp_path_factory.mktemp("plans")
    paths = {}

    def get(name):
        if name not in paths:
            paths[name] = root / f"{name}.json"
            _case(name)[3].save(paths[name])
        return paths[name]

    return get


def _kinds(gm):
    return {n.target.__name__ for n in gm.graph.nodes if ops.is_inserted(n)}


# -- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_prints_summarises_and_verifies_like_the_original(name, saved):
    plan = _case(name)[3]
    loaded = memsched.Plan.load(saved(name))
    assert loaded.program is None and loaded.placement is None  # nothing re-solved
    assert str(loaded) == str(plan)
    assert loaded.summary() == plan.summary()
    assert loaded.verify() == plan.verify() == plan.peak_device_bytes
    assert loaded.peak_device_bytes == plan.peak_device_bytes
    assert loaded.predicted_time_s == plan.predicted_time_s
    assert loaded.bytes_moved == plan.bytes_moved
    assert loaded.min_budget_bytes == plan.min_budget_bytes
    assert loaded.tier_bytes() == plan.tier_bytes()
    assert loaded.offloaded_activation_bytes() == plan.offloaded_activation_bytes()
    assert loaded.sim == plan.sim and loaded.unconstrained == plan.unconstrained
    assert loaded.hardware == plan.hardware and loaded.signature == plan.signature
    assert [(p.name, p.seconds, p.note) for p in loaded.passes] == [(p.name, p.seconds, p.note) for p in plan.passes]
    assert dumps(loaded) == saved(name).read_text()  # saving a loaded plan writes the same file


def test_loaded_training_plan_is_the_live_one(tmp_path):
    """A saved training step loads as a training step: the same saved activations (stored in
    the file) and the same summary, saved-activations section included."""
    from train_zoo import build_train

    model, args, kwargs, _ = build_train("mlp")
    lo = _plan(model, args, kwargs, 10**12, train=True).min_budget_bytes
    plan = _plan(model, args, kwargs, lo, train=True)
    plan.save(tmp_path / "step.json")
    loaded = memsched.Plan.load(tmp_path / "step.json")
    assert plan.is_training and loaded.is_training and loaded.program is None
    assert plan.saved_activations() and loaded.saved_activations() == plan.saved_activations()
    assert loaded.recompute_overhead_s() == plan.recompute_overhead_s()
    assert loaded.summary() == plan.summary() and "Saved activations" in plan.summary()
    assert dumps(loaded) == (tmp_path / "step.json").read_text()
    # a file written before the rows were saved still loads, with none
    doc = json.loads(dumps(plan))
    del doc["placement"]["saved_activations"]
    old = memsched.Plan.from_dict(doc)
    assert old.is_training and old.saved_activations() == []


def test_plans_move_something_so_the_round_trip_means_something():
    assert {"prefetch", "wait", "offload", "free"} <= _kinds(_case("skipnet")[3].graph)
    assert _case("gpt2")[3].tier_bytes()["host"] > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_loaded_values_are_meta_tensors_with_the_traced_layout_and_storage_sharing(name, saved):
    plan, loaded = _case(name)[3], load_plan(saved(name))
    orig = {n.name: n for n in plan.graph.graph.nodes}
    first_of_storage: dict = {}
    views = 0
    for n in loaded.graph.graph.nodes:
        o = orig[n.name]
        # a loaded placeholder is targeted by its name; the state key stays in its meta
        assert (n.op, saved_target(n)) == (o.op, saved_target(o))
        assert {k: v for k, v in n.meta.items() if k.startswith("memsched.")} == \
            {k: v for k, v in o.meta.items() if k.startswith("memsched.")}
        a, b = n.meta.get("val"), o.meta.get("val")
        if not isinstance(b, torch.Tensor):
            continue
        assert a.device.type == "meta"
        assert (a.shape, a.stride(), a.dtype, a.storage_offset()) == (b.shape, b.stride(), b.dtype, b.storage_offset())
        assert a.untyped_storage().nbytes() == b.untyped_storage().nbytes()
        # storages shared exactly where the traced ones are
        key_b = b.untyped_storage()._cdata
        if key_b in first_of_storage:
            views += 1
            assert a.untyped_storage()._cdata == first_of_storage[key_b]
        else:
            assert a.untyped_storage()._cdata not in first_of_storage.values()
            first_of_storage[key_b] = a.untyped_storage()._cdata
    assert views > 0  # views exist (and waits restore their value's storage)


def test_saved_text_is_strict_json_with_a_versioned_header(saved):
    text = saved("constnet").read_text()
    assert "NaN" not in text and "Infinity" not in text
    doc = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    assert (doc["format"], doc["version"]) == (FORMAT, VERSION)
    nodes = {n["name"]: n for n in doc["program"]["nodes"]}
    assert nodes["masked_fill"]["target"] == "aten::masked_fill.Scalar"
    assert nodes["masked_fill"]["args"][2] == {"float": "-inf"}
    assert nodes["new_full"]["args"][2] == {"float": "nan"}
    assert nodes["zeros"]["kwargs"]["layout"] == {"layout": "strided"}
    assert nodes["zeros"]["kwargs"]["dtype"] == {"dtype": "float32"}
    assert nodes["arange"]["kwargs"]["device"] == {"device": "cpu"}
    assert nodes["to"]["args"][1] == {"dtype": "float64"}
    assert any(n["target"] == "memsched.prefetch" for n in doc["program"]["nodes"])


@pytest.mark.parametrize("value", [
    None, True, False, 0, -3, 2**63 - 1, 1.5, -0.0, float("inf"), float("-inf"), "s", [], (),
    [1, (2, [3.0, None])], (torch.float16,), torch.bfloat16, torch.device("cuda", 1), torch.device("cpu"),
    torch.strided, torch.sparse_coo, torch.channels_last, torch.contiguous_format, torch.preserve_format,
    slice(1, None, 2), {"a": (1, torch.int8)},
])
def test_constants_round_trip(value):
    text = json.dumps(_encode(value, "test"), allow_nan=False)
    back = _decode(json.loads(text))
    assert back == value and type(back) is type(value)


def test_nan_round_trips():
    back = _decode(json.loads(json.dumps(_encode(float("nan"), "test"), allow_nan=False)))
    assert isinstance(back, float) and math.isnan(back)


def test_unsavable_argument_is_named():
    plan = _case("skipnet")[3]
    gm = copy.deepcopy(plan.graph)
    node = next(n for n in gm.graph.nodes if ops.is_compute(n))
    node.args = (*node.args[:-1], object())
    broken = copy.copy(plan)
    broken.graph = gm
    with pytest.raises(PlanFileError, match=node.name):
        dumps(broken)


# -- wrong files -------------------------------------------------------------------------------


def _write(tmp_path, doc, name="plan.json"):
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_not_json_is_not_a_plan(tmp_path):
    with pytest.raises(PlanFileError, match="is not a memsched plan"):
        load_plan(_write(tmp_path, "def program():\n"))


@pytest.mark.parametrize("doc", [{"hello": 1}, [1, 2], {"format": "other", "version": 1}])
def test_other_json_is_not_a_plan(tmp_path, doc):
    with pytest.raises(PlanFileError, match='is not a memsched plan'):
        load_plan(_write(tmp_path, doc))


def test_newer_version_asks_for_an_upgrade(tmp_path, saved):
    doc = json.loads(saved("skipnet").read_text())
    doc["version"] = VERSION + 1
    with pytest.raises(PlanFileError, match=r"newer memsched.*version 2.*upgrade memsched"):
        load_plan(_write(tmp_path, doc))


@pytest.mark.parametrize("version", ["1", 0, None, True])
def test_invalid_version(tmp_path, saved, version):
    doc = json.loads(saved("skipnet").read_text())
    doc["version"] = version
    with pytest.raises(PlanFileError, match="not valid"):
        load_plan(_write(tmp_path, doc))


def test_missing_section_is_named(tmp_path, saved):
    doc = json.loads(saved("skipnet").read_text())
    del doc["predicted"]
    with pytest.raises(PlanFileError, match="damaged: 'predicted' is missing"):
        load_plan(_write(tmp_path, doc))


def test_unknown_operator_is_named(tmp_path, saved):
    doc = json.loads(saved("skipnet").read_text())
    node = next(n for n in doc["program"]["nodes"] if n["target"].startswith("aten::tanh"))
    node["target"] = "aten::no_such_op_xyz.default"
    with pytest.raises(PlanFileError, match="no_such_op_xyz"):
        load_plan(_write(tmp_path, doc))


def test_missing_file(tmp_path):
    with pytest.raises(PlanFileError, match="cannot read"):
        load_plan(tmp_path / "nope.json")


# -- re-applying without solving ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_reapplied_plan_runs_like_the_compiled_model_without_solving(name, saved, monkeypatch):
    model, args, kwargs, plan = _case(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, plan.budget_bytes, hardware=HW, device="cpu")
        expected = cm(*args, **kwargs)
    assert cm.plan.verify() == plan.peak_device_bytes
    path = saved(name)
    forbid_solver(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = memsched.compile(model, plan=path, device="cpu")  # budget and hardware from the plan
        out = again(*args, **kwargs)
    try:
        assert again.budget_bytes == plan.budget_bytes and again.hardware == plan.hardware
        assert_outputs_equal(out, expected)
        assert_outputs_equal(out, eager(model, args, kwargs))
        assert again.stats.peak_device_bytes == cm.stats.peak_device_bytes <= plan.budget_bytes
        assert again.stats.bytes_moved == cm.stats.bytes_moved
        # the schedule it runs is the saved one, on the fresh capture's values
        assert str(again.plan).splitlines()[2:] == str(plan).splitlines()[2:]
        assert again.plan.verify() == plan.peak_device_bytes
        assert [p.name for p in again.plan.passes][-2:] == ["capture", "apply"]
        assert again.source == cm.source
    finally:
        cm.close()
        again.close()


def test_reapply_from_a_plan_in_memory_and_a_larger_budget(monkeypatch):
    model, args, kwargs, plan = _case("skipnet")
    forbid_solver(monkeypatch)
    cm = memsched.compile(model, plan.budget_bytes * 2, plan=load_plan_from(plan), device="cpu")
    try:
        assert_outputs_equal(cm(*args), eager(model, args, kwargs))
        assert cm.plan.budget_bytes == plan.budget_bytes * 2
    finally:
        cm.close()


def load_plan_from(plan):
    """A loaded copy of an in-memory plan (through the JSON text, no file)."""
    return memsched.Plan.from_dict(json.loads(dumps(plan)))


def test_reapply_with_a_budget_below_the_plan_peak_is_infeasible(saved, monkeypatch):
    model, args, kwargs, plan = _case("skipnet")
    path = saved("skipnet")
    forbid_solver(monkeypatch)
    cm = memsched.compile(model, plan.peak_device_bytes - 1, plan=path, device="cpu")
    with pytest.raises(memsched.InfeasibleBudgetError) as info:
        cm(*args)
    assert info.value.min_budget_bytes == plan.peak_device_bytes


def test_reapply_rejects_other_input_shapes(saved, monkeypatch):
    model, args, kwargs, plan = _case("skipnet")
    path = saved("skipnet")
    forbid_solver(monkeypatch)
    cm = memsched.compile(model, plan=path, device="cpu")
    with pytest.raises(PlanMismatchError, match=r"input leaf 0 is float32\[32,64\].*made for float32\[64,64\]"):
        cm(torch.randn(32, 64))


def _mlp(act):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), act, nn.Linear(32, 8)).eval()


def test_reapply_names_the_first_compute_node_that_differs(tmp_path, monkeypatch):
    x = torch.randn(4, 16)
    plan = memsched.plan(_mlp(nn.GELU()), (x,), budget=int(on_gpu(HW, "1MB")), hardware=HW)
    plan.save(tmp_path / "gelu.json")
    forbid_solver(monkeypatch)
    with pytest.raises(PlanMismatchError, match=r"compute node 1: the plan has gelu = aten::gelu.default, "
                                                r"the model captures relu = aten::relu.default"):
        memsched.compile(_mlp(nn.ReLU()), plan=tmp_path / "gelu.json", device="cpu")(x)
    with pytest.raises(PlanMismatchError, match=r"gelu = aten::gelu.default: the plan passes .*the model .*tanh"):
        memsched.compile(_mlp(nn.GELU(approximate="tanh")), plan=tmp_path / "gelu.json", device="cpu")(x)
    deeper = nn.Sequential(*_mlp(nn.GELU()), nn.ReLU()).eval()
    with pytest.raises(PlanMismatchError, match=r"compute node 3: the plan has nothing more, the model captures "
                                                r"relu = aten::relu.default"):
        memsched.compile(deeper, plan=tmp_path / "gelu.json", device="cpu")(x)


def test_reapply_rejects_a_hand_broken_file_by_step(tmp_path, saved, monkeypatch):
    doc = json.loads(saved("skipnet").read_text())
    step, user = _drop_first_wait(doc)
    model, args, _, _ = _case("skipnet")
    forbid_solver(monkeypatch)
    cm = memsched.compile(model, plan=_write(tmp_path, doc), device="cpu")
    with pytest.raises(memsched.PlanError, match=rf"step {step} \({user}\)"):
        cm(*args)


# -- hand-broken programs (JSON surgery) -------------------------------------------------------


def _refs(value):
    if isinstance(value, list):
        return [r for x in value for r in _refs(x)]
    if isinstance(value, dict):
        if set(value) == {"node"}:
            return [value["node"]]
        return [r for x in value.values() for r in _refs(x)]
    return []


def _replace_ref(value, old, new):
    if isinstance(value, list):
        return [_replace_ref(x, old, new) for x in value]
    if isinstance(value, dict):
        if value == {"node": old}:
            return {"node": new}
        return {k: _replace_ref(x, old, new) for k, x in value.items()}
    return value


def _reads(rec):
    return _refs(rec.get("args", [])) + _refs(rec.get("kwargs", {}))


def _drop_first_wait(doc):
    """Delete the first wait; its readers read the pending prefetch. Returns the step index
    and name of the first compute node that now reads a prefetch handle."""
    nodes = doc["program"]["nodes"]
    i = next(i for i, n in enumerate(nodes) if n["target"] == "memsched.wait")
    wait = nodes.pop(i)
    prefetch = wait["args"][0]["node"]
    for n in nodes:
        for key in ("args", "kwargs"):
            if key in n:
                n[key] = _replace_ref(n[key], wait["name"], prefetch)
    j = next(j for j, n in enumerate(nodes)
             if n["op"] == "call_function" and not n["target"].startswith("memsched.") and prefetch in _reads(n))
    return j, nodes[j]["name"]


def _move_free_earlier(doc):
    """Move a free of a compute value to right after its definition, before a later read.
    Returns the step index and name of the read that now comes after the free."""
    nodes = doc["program"]["nodes"]
    index = {n["name"]: i for i, n in enumerate(nodes)}
    for fi, free in enumerate(nodes):
        if free["target"] != "memsched.free":
            continue
        for x in _reads(free):
            d = index[x]
            if nodes[d]["op"] != "call_function" or nodes[d]["target"].startswith("memsched."):
                continue
            readers = [i for i in range(d + 1, fi) if x in _reads(nodes[i])]
            if readers:
                nodes.insert(d + 1, nodes.pop(fi))
                return readers[0] + 1, nodes[readers[0] + 1]["name"]
    raise AssertionError("no free to move")


def _drop_a_free(doc):
    """Remove a compute value from the free that releases it. Returns the value's name."""
    nodes = doc["program"]["nodes"]
    index = {n["name"]: n for n in nodes}
    for free in nodes:
        if free["target"] != "memsched.free":
            continue
        for x in _reads(free):
            if index[x]["op"] == "call_function" and not index[x]["target"].startswith("memsched."):
                free["args"] = [a for a in free["args"] if a != {"node": x}]
                if not free["args"]:
                    nodes.remove(free)
                return x
    raise AssertionError("no free of a compute value")


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["skipnet", "gpt2"])
def test_verify_cli_accepts_a_saved_plan(capsys, saved, name):
    plan, path = _case(name)[3], saved(name)
    code, out, err = _cli(capsys, "verify", path)
    assert code == 0, err
    assert out.startswith(f"OK {path}:") and f"({plan.peak_device_bytes} bytes)" in out


@pytest.mark.parametrize("breaker, phrase", [
    (_drop_first_wait, "handle, not a device tensor (missing wait?)"),
    (_move_free_earlier, "after it was freed"),
])
def test_verify_cli_rejects_a_broken_program_naming_the_step(capsys, tmp_path, saved, breaker, phrase):
    doc = json.loads(saved("skipnet").read_text())
    step, name = breaker(doc)
    code, out, err = _cli(capsys, "verify", _write(tmp_path, doc))
    assert code == 1
    assert out == ""
    assert f"does not verify: step {step} ({name})" in err and phrase in err, err
    assert "Traceback" not in err


def test_verify_cli_rejects_a_leak_at_the_return(capsys, tmp_path, saved):
    doc = json.loads(saved("skipnet").read_text())
    leaked = _drop_a_free(doc)
    step = len(doc["program"]["nodes"]) - 1
    # a budget with room for the leak, so the first broken rule is the leak at the return
    code, _, err = _cli(capsys, "verify", _write(tmp_path, doc), "--budget", "1GB")
    assert code == 1
    assert f"step {step} (output)" in err and leaked in err and "still held" in err, err


def test_verify_cli_rejects_a_malformed_node_by_step(capsys, tmp_path, saved):
    doc = json.loads(saved("skipnet").read_text())
    nodes = doc["program"]["nodes"]
    step = next(i for i, n in enumerate(nodes) if n["target"] == "memsched.offload")
    nodes[step]["args"] = nodes[step]["args"][:1]  # the tier is gone
    code, _, err = _cli(capsys, "verify", _write(tmp_path, doc))
    assert code == 1 and f"step {step} ({nodes[step]['name']}): malformed offload node" in err, err
    assert "Traceback" not in err


def test_verify_cli_with_a_smaller_budget(capsys, saved):
    plan = _case("skipnet")[3]
    code, _, err = _cli(capsys, "verify", saved("skipnet"), "--budget", str(plan.peak_device_bytes - 1))
    assert code == 1 and "over the budget" in err
    code, out, _ = _cli(capsys, "verify", saved("skipnet"), "--budget", str(plan.peak_device_bytes))
    assert code == 0 and out.startswith("OK")
    code, _, err = _cli(capsys, "verify", saved("skipnet"), "--budget", "lots")
    assert code == 2 and "budget" in err


def test_verify_and_show_cli_reject_other_files(capsys, tmp_path, saved):
    for command in ("verify", "show"):
        code, out, err = _cli(capsys, command, _write(tmp_path, {"hello": 1}))
        assert code == 2 and out == "" and "is not a memsched plan" in err
        doc = json.loads(saved("skipnet").read_text())
        doc["version"] = VERSION + 1
        code, _, err = _cli(capsys, command, _write(tmp_path, doc))
        assert code == 2 and "newer memsched" in err
        code, _, err = _cli(capsys, command, tmp_path / "missing.json")
        assert code == 2 and "cannot read" in err


def test_show_cli(capsys, saved):
    plan = _case("skipnet")[3]
    code, out, err = _cli(capsys, "show", saved("skipnet"))
    assert code == 0, err
    assert "Memory per tier" in out and "Bytes moved per call" in out and "def program(" not in out
    code, out, err = _cli(capsys, "show", saved("skipnet"), "--format", "code")
    assert code == 0, err
    assert out.startswith(str(plan) + "\n")
    assert out.index("def program(") < out.index("Memory per tier")


FACTORY = """
import torch
import torch.nn as nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64)).eval(), (torch.randn(2, 64),)
"""


def test_plan_cli_json_is_the_saved_plan(capsys, tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    target = f"{factory}:build"
    code, out, err = _cli(capsys, "plan", target, "-b", on_gpu(HW, "100KB"), "--hardware", HW, "-f", "json")
    assert code == 0, err
    printed = json.loads(out)
    # -o writes the file and prints nothing more with --format json
    path = tmp_path / "out.json"
    code, out, err = _cli(capsys, "plan", target, "-b", on_gpu(HW, "100KB"), "--hardware", HW, "-f", "json", "-o", path)
    assert code == 0 and out == "", err
    text = path.read_text()
    loaded = load_plan(path)
    assert dumps(loaded) == text                        # exactly what Plan.save writes
    written = json.loads(text)
    for doc in (printed, written):                      # wall times aside, the same document
        doc.pop("passes")
        doc["placement"].pop("solve_s")
    assert printed == written
    assert loaded.model_name == f"Sequential ({target})"
    assert loaded.tier_bytes()["host"] > 0 and loaded.peak_device_bytes <= int(on_gpu(HW, "100KB"))
    # -o with the table format still prints the tables
    code, out, err = _cli(capsys, "plan", target, "-b", on_gpu(HW, "100KB"), "--hardware", HW, "-o", tmp_path / "t.json")
    assert code == 0 and "Memory per tier" in out
    assert load_plan(tmp_path / "t.json").verify() == loaded.verify()
    # and the saved plan runs the factory's model
    import importlib.util

    spec = importlib.util.spec_from_file_location("cli_factory", factory)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, args = module.build()
    cm = memsched.compile(model, plan=path, device="cpu")
    try:
        assert_outputs_equal(cm(*args), eager(model, args, {}))
    finally:
        cm.close()


def test_plan_cli_output_unwritable(capsys, tmp_path):
    factory = tmp_path / "factory.py"
    factory.write_text(FACTORY)
    code, out, err = _cli(capsys, "plan", f"{factory}:build", "-b", on_gpu(HW, "1MB"), "--hardware", HW,
                          "-o", tmp_path / "no" / "such" / "dir" / "p.json")
    assert code == 2 and "cannot write" in err


def test_save_then_load_through_plan_methods(tmp_path):
    plan = _case("constnet")[3]
    save_plan(plan, tmp_path / "a.json")
    plan.save(tmp_path / "b.json")
    assert (tmp_path / "a.json").read_text() == (tmp_path / "b.json").read_text()
    assert isinstance(memsched.Plan.load(tmp_path / "b.json"), memsched.Plan)


def test_loaded_graph_is_an_fx_graph_module(saved):
    gm = load_plan(saved("skipnet")).graph
    assert isinstance(gm, fx.GraphModule)
    gm.graph.lint()
