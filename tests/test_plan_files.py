"""Plan files are data (memsched/io/serialize.py): whatever a file says, loading it, showing it,
verifying it and running it (``memsched.compile(model, plan=path)``) never executes its text,
never fails with anything but the documented errors, and never verifies a schedule that then
computes something else than eager PyTorch.

Hypothesis mutates real saved plans (a small MLP's inference plan and a small training step,
both of which also run: the step's gradients must be eager's) at random paths: values replaced by others of any JSON type, by code, by
huge or negative numbers, by deep nesting, by the plan's own names in the wrong places; keys
and elements deleted and inserted; the text itself cut and corrupted. A canary file that any
executed payload would create must never appear. Specific regressions follow.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import FIXED_CPU, assert_outputs_equal, eager  # noqa: E402

import memsched  # noqa: E402
from memsched.cli import main  # noqa: E402
from memsched.errors import PlanFileError  # noqa: E402
from memsched.io import serialize  # noqa: E402
from memsched.io.reapply import PlanMismatchError  # noqa: E402
from memsched.verify import PlanError  # noqa: E402

HW = "t4"
# one name per test run, the same in every pytest-xdist worker (test ids must agree between them)
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", f"{os.getpid()}-{uuid.uuid4().hex}")[:16]
CANARY = Path(tempfile.gettempdir()) / f"memsched-canary-{_RUN}"
CODE = f"__import__('os').system('touch {CANARY}')"
# payloads in every syntactic position a name or target could be pasted into
PAYLOADS = [
    CODE, f"x={CODE}", f"x, y={CODE}", f"a\")or {CODE} or(\"", f"a'){CODE}#", f"a; {CODE}", f"{CODE}#",
    f"a\n    {CODE}\n", f"lambda: {CODE}", f"exec(\"{CODE}\")", f"eval({CODE!r})", f"a.b({CODE})",
    f"__import__('os').system('touch {CANARY}') or 'input'",
]
BAD_TARGETS = [
    "builtins.eval", "builtins.exec", "builtins.__import__", "torch.os.system", "os.system", "posix.system",
    "subprocess.call", "torch.ops.aten.mm.default", "aten::name.upper", "aten::_dir.pop", "aten::mm.__class__",
    "aten::__class__.__init__", "higher_order::cond", "higher_order::__init__", "torch.load", "memsched.nothing",
    "operator.attrgetter", "math.exp", "importlib.import_module", "aten::mm.no_such_overload", "prims::",
]
ODD_NAMES = [
    "", " ", "a.b", "a..b", "0abc", "é", "ﬁx", "fix", "\x1b[31mred", "a\u202eb", "self", "class", "input", "print",
    "__class__", "__init__", "__import__", "forward", "graph", "training", "_private", "track", "release",
    "c0", "f1", "rt", "output", "x" * 2000, "a-b", "None", "True", "inf", "nan", "torch", "device",
]
OTHER = ["cpu", "cuda:1", "meta", "cuda:99999", "mps", "bogus", "float32", "int64", "torch.float32", "qint8",
         "host", "disk", "device", "unused", "weight", "activation", "grad", "tangent", "keep", "recompute",
         "inf", "-inf", "nan", "strided", "channels_last", "h2d", "compute", "memsched-plan"]
HUGE_INTS = [0, 1, -1, 2, 7, 2**31, 2**48, 2**48 + 1, 2**50, 2**50 + 1, 2**62, 2**63 - 1, 2**63, -2**63 - 1,
             10**30, -10**30, 2**200]
FIELDS = ["name", "op", "target", "args", "kwargs", "meta", "val", "tensor", "shape", "stride", "dtype",
          "offset", "storage", "node", "tuple", "dict", "float", "device", "layout", "memory_format", "slice",
          "ellipsis", "memsched.pass", "memsched.kind", "memsched.tier", "memsched.nbytes", "memsched.restores",
          "memsched.saves", "memsched.delivers", "memsched.grad_of", "memsched.step", "memsched.buffers",
          "memsched.evil", "__class__", "format", "version", "budget_bytes", "program", "nodes", "storages"]


# ----------------------------------------------------------------------------- the plans


def _quiet_plan(model, args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lo = memsched.plan(model, args, budget=10**12, hardware=HW, **kw).min_budget_bytes
        return memsched.plan(model, args, budget=lo, hardware=HW, **kw)


@pytest.fixture(scope="module")
def inference():
    """(model, args, eager output, saved document) of a small MLP at its minimum budget: every
    weight but one streamed in (prefetch, wait, free)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    args = (torch.randn(4, 16),)
    doc = json.loads(serialize.dumps(_quiet_plan(model, args)))
    kinds = {n["target"] for n in doc["program"]["nodes"]}
    assert {"memsched.prefetch", "memsched.wait", "memsched.free"} <= kinds
    return model, args, eager(model, args, {}), doc


class _ExactPointwise(nn.Module):
    """Pointwise chains whose every op rounds once, so that Inductor's loops give eager's bits."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.a(x)
        h = torch.relu(h * 2 + h).neg().abs()
        h = self.b(h)
        return self.c(torch.maximum(h * 2, -h) + h)


@pytest.fixture(scope="module")
def fused():
    """(model, args, eager output, saved document) of a fused plan at its minimum budget:
    regions of pointwise ops (and a linear) between streamed weights."""
    torch.manual_seed(0)
    model, args = _ExactPointwise().eval(), (torch.randn(4, 16),)
    doc = json.loads(serialize.dumps(_quiet_plan(model, args, fuse=True)))
    kinds = [n["target"] for n in doc["program"]["nodes"]]
    assert kinds.count("memsched.region") >= 2 and "memsched.prefetch" in kinds
    return model, args, eager(model, args, {}), doc


@pytest.fixture(scope="module")
def training():
    """The saved document of a small MLP's training step at its minimum budget (a boundary, an
    offloaded activation, streamed weights, delivered gradients)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)).train()
    args = (torch.randn(4, 16),)
    doc = json.loads(serialize.dumps(_quiet_plan(model, args, train=True)))
    kinds = {n["target"] for n in doc["program"]["nodes"]}
    assert {"memsched.boundary", "memsched.offload", "memsched.prefetch"} <= kinds
    return model, args, _step(model, args, lambda x: model(*x)), doc


def _step(model, args, run) -> tuple:
    """The output and the gradients of one step (the output summed to a loss)."""
    for p in model.parameters():
        p.grad = None
    out = run(args)
    out.sum().backward()
    return out.detach(), tuple(p.grad.clone() for p in model.parameters())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("plan-files")


@pytest.fixture(autouse=True)
def _no_canary():
    CANARY.unlink(missing_ok=True)
    yield
    assert not CANARY.exists(), "a plan file's text was executed"


# ----------------------------------------------------------------------------- running a file


def _cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _write(path: Path, doc) -> Path:
    if isinstance(doc, bytes):
        path.write_bytes(doc)
    else:
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def _load(path: Path):
    """The loaded plan, or None when the file is refused (PlanFileError; nothing else)."""
    try:
        return memsched.Plan.load(path)
    except PlanFileError as e:
        assert str(e), "a PlanFileError says what is wrong"
        return None


def _run(model, args, path, train=False):
    """The compiled model's output with the saved plan (and for a training step its gradients),
    or the documented error it raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cm = memsched.compile(model, plan=path, device="cpu", train=train)
            try:
                return (_step(model, args, lambda x: cm(*x)) if train else cm(*args)), None
            finally:
                cm.close()
        except (PlanError, ValueError) as e:  # PlanFileError, PlanMismatchError, InfeasibleBudgetError
            return None, e


def check_file(path: Path, inference=None, train=False) -> str:
    """Load, show, verify and (with ``inference`` = (model, args, expected)) run the file, a
    training step with ``train`` (expected: its output and gradients); assert that only
    documented errors happen and that a run matches eager. Returns what happened: "refused",
    "rejected" (loads, does not verify), "verified" or "ran"."""
    plan = _load(path)
    code, out, err = _cli("show", path)
    assert "Traceback" not in err and code == (0 if plan is not None else 2), (code, err)
    if plan is None:
        assert err.startswith("memsched: error: ") and out == ""
    code, out, err = _cli("verify", path)
    assert "Traceback" not in err
    assert code in ((0, 1) if plan is not None else (2,)), (code, err)
    verified = code == 0
    outcome = "refused" if plan is None else "verified" if verified else "rejected"
    if inference is not None and plan is not None:
        model, args, expected = inference
        out, error = _run(model, args, path, train)
        if error is None:  # _run lets nothing but PlanError and ValueErrors through
            assert verified, "a plan that does not verify ran"
            assert_outputs_equal(out, expected)   # a step's output and gradients
            outcome = "ran"
    assert not CANARY.exists(), "a plan file's text was executed"
    return outcome


# ----------------------------------------------------------------------------- mutations


def _paths(doc) -> list[tuple]:
    out, stack = [], [((), doc)]
    while stack:
        path, v = stack.pop()
        out.append(path)
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        stack.extend((path + (k,), x) for k, x in items)
    return sorted(out, key=lambda p: [str(x) for x in p])


def _strings(doc) -> list[str]:
    return sorted({x for p in _paths(doc) if isinstance(x := _get(doc, p), str)} | set(_node_names(doc)))


def _node_names(doc) -> list[str]:
    try:
        return [n["name"] for n in doc["program"]["nodes"] if isinstance(n.get("name"), str)]
    except (KeyError, TypeError, AttributeError):
        return []


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _nested(depth: int):
    v = 0
    for _ in range(depth):
        v = [v]
    return v


def _values(doc):
    """Any JSON value: the plan's own strings and names, payloads, targets, edge numbers,
    tagged values, small containers of those, and deep nesting."""
    names = _node_names(doc) or ["x"]
    scalars = st.one_of(
        st.none(), st.booleans(), st.sampled_from(HUGE_INTS), st.integers(-2**70, 2**70),
        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(PAYLOADS + BAD_TARGETS + ODD_NAMES + OTHER),
        st.sampled_from(_strings(doc) or ["x"]), st.text(max_size=12))
    tagged = st.one_of(
        st.builds(lambda n: {"node": n}, st.sampled_from(names + PAYLOADS + ODD_NAMES)),
        st.builds(lambda t, v: {t: v}, st.sampled_from(["float", "dtype", "device", "layout", "memory_format",
                                                        "ellipsis", "tensor", "evil"]),
                  st.sampled_from(OTHER + PAYLOADS + [None, 0, -1])),
        st.builds(lambda s, o, sid: {"tensor": {"shape": s, "stride": [1] * len(s), "dtype": "float32",
                                                "offset": o, "storage": sid}},
                  st.lists(st.sampled_from([0, 1, 4, 2**20, 2**47, -1]), max_size=3),
                  st.sampled_from([0, 5, -1, 2**60]), st.sampled_from([0, 1, 99, -1])))
    leaves = st.one_of(scalars, tagged)
    nested = st.recursive(leaves, lambda c: st.one_of(
        st.lists(c, max_size=3), st.builds(lambda xs: {"tuple": xs}, st.lists(c, max_size=3)),
        st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), c, max_size=3)), max_leaves=8)
    return st.one_of(nested, st.sampled_from([20, 58, 60, 63, 64, 65, 200, 500]).map(_nested))


def _similar(data, doc, v):
    """A value close to ``v``: the kind of edit that could slip past a check."""
    names = _node_names(doc) or ["x"]
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return data.draw(st.sampled_from([v + 1, v - 1, 0, -v, 2 * v, v // 2, -1, 2**63, v + 2**40]))
    if isinstance(v, float):
        return data.draw(st.sampled_from([-v, 0.0, v * 1e10, 1e308, v + 1.0]))
    if isinstance(v, str):
        return data.draw(st.sampled_from(names + _strings(doc)[:200] + OTHER))
    if isinstance(v, dict) and set(v) == {"node"}:
        return {"node": data.draw(st.sampled_from(names))}
    if isinstance(v, list) and v:
        return data.draw(st.permutations(v)) if data.draw(st.booleans()) else v[:-1]
    return data.draw(_values(doc))


def _mutate(data, doc):
    """One random edit of ``doc`` at a random path: replace, nudge, delete or insert."""
    path = data.draw(st.sampled_from(_paths(doc)), label="path")
    action = data.draw(st.sampled_from(["replace", "similar", "similar", "delete", "insert"]), label="action")
    if not path:
        return data.draw(_values(doc)) if action == "replace" else doc
    parent, key = _get(doc, path[:-1]), path[-1]
    if action == "replace":
        parent[key] = data.draw(_values(doc), label="value")
    elif action == "similar":
        parent[key] = _similar(data, doc, parent[key])
    elif action == "delete":
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, data.draw(st.one_of(_values(doc), st.just(copy.deepcopy(parent[key])))))
    else:
        parent[data.draw(st.sampled_from(FIELDS) | st.text(max_size=8), label="key")] = data.draw(_values(doc))
    return doc


def _node_edit(data, doc):
    """An edit of one program node's name, target, an argument or a fact, to another node's
    name or a payload: the edits most likely to load and reach the verifier and the runtime."""
    nodes = doc["program"]["nodes"]
    rec = data.draw(st.sampled_from(nodes), label="node")
    names = _node_names(doc) or ["x"]
    field = data.draw(st.sampled_from(["name", "target", "ref", "ref", "fact", "fact", "val", "move", "move"]),
                      label="field")
    if field == "move":  # run a node at another step (not after the output)
        nodes.remove(rec)
        nodes.insert(data.draw(st.integers(0, len(nodes) - 1), label="to"), rec)
    elif field == "name":
        old, new = rec["name"], data.draw(st.sampled_from(PAYLOADS + ODD_NAMES + names))
        rec["name"] = new
        if data.draw(st.booleans(), label="rename readers"):
            text = json.dumps(doc).replace(json.dumps({"node": old}), json.dumps({"node": new}))
            return json.loads(text)
    elif field == "target":
        targets = sorted({n["target"] for n in nodes if isinstance(n.get("target"), str)})
        rec["target"] = data.draw(st.sampled_from(PAYLOADS + BAD_TARGETS + targets))
    elif field == "ref":
        refs = [p for p in _paths(rec) if p and p[-1] == "node"]
        if refs:
            path = data.draw(st.sampled_from(refs))
            _get(rec, path[:-1])["node"] = data.draw(st.sampled_from(names + PAYLOADS[:3]))
    elif field == "fact" and isinstance(rec.get("meta"), dict) and rec["meta"]:
        key = data.draw(st.sampled_from(sorted(rec["meta"])))
        rec["meta"][key] = _similar(data, doc, rec["meta"][key])
    elif field == "val" and "val" in rec:
        leaves = [p for p in _paths(rec["val"]) if p and not isinstance(_get(rec["val"], p), (dict, list))]
        if leaves:
            path = data.draw(st.sampled_from(leaves))
            _get(rec["val"], path[:-1])[path[-1]] = _similar(data, doc, _get(rec["val"], path))
    return doc


def _mutated(data, base):
    doc = copy.deepcopy(base)
    for _ in range(data.draw(st.sampled_from([1, 1, 1, 2, 3]), label="edits")):
        if isinstance(doc, dict) and isinstance(doc.get("program"), dict) and \
                isinstance(doc["program"].get("nodes"), list) and len(doc["program"]["nodes"]) > 1 and \
                all(isinstance(n, dict) and "name" in n for n in doc["program"]["nodes"]) and \
                data.draw(st.sampled_from([True, True, False]), label="node edit"):
            doc = _node_edit(data, doc)
        else:
            doc = _mutate(data, doc)
    return doc


FUZZ = settings(max_examples=100, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_mutated_inference_plans_fail_cleanly_or_run_like_eager(data, inference, workdir):
    model, args, expected, doc = inference
    path = _write(workdir / "inference.json", json.dumps(_mutated(data, doc)))
    outcome = check_file(path, (model, args, expected))
    event(outcome)
    with contextlib.suppress(PlanFileError):  # the document in memory is checked the same way
        memsched.Plan.from_dict(json.loads(path.read_text()))
        assert outcome != "refused"


def _region_edit(data, doc):
    """An edit of one region: the names its ops had (swapped, or another node's), or a node of
    the program of its ops."""
    rec = data.draw(st.sampled_from([n for n in doc["program"]["nodes"] if n["target"] == "memsched.region"]))
    region = rec["region"]
    names = region["names"]
    edit = data.draw(st.sampled_from(["swap", "rename", "inner"]), label="region edit")
    if edit == "swap" and len(names) > 1:
        i, j = data.draw(st.permutations(range(len(names))).map(lambda p: p[:2]), label="swap")
        names[i], names[j] = names[j], names[i]
    elif edit == "rename":
        i = data.draw(st.integers(0, len(names) - 1), label="at")
        names[i] = data.draw(st.sampled_from(_node_names(doc) + ODD_NAMES[:6]), label="to")
    else:
        region["program"] = _node_edit(data, {"program": region["program"]})["program"]
    return doc


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_mutated_fused_plans_fail_cleanly_or_run_like_eager(data, fused, workdir):
    """A saved region is re-made of the ops it names (``fuse_as``): names swapped or taken from
    other ops, or the region's own program edited, either fail with a documented error or run
    with eager's bits."""
    model, args, expected, doc = fused
    edited = _region_edit(data, copy.deepcopy(doc)) if data.draw(st.booleans(), label="region") else \
        _mutated(data, doc)
    event(check_file(_write(workdir / "fused.json", json.dumps(edited)), (model, args, expected)))


@settings(FUZZ, max_examples=50)
@given(data=st.data())
def test_mutated_training_plans_fail_cleanly_or_train_like_eager(data, training, workdir):
    event(check_file(_write(workdir / "training.json", json.dumps(_mutated(data, training[3]))), training[:3],
                     train=True))


@settings(FUZZ, max_examples=40)
@given(data=st.data())
def test_corrupted_text_fails_cleanly(data, inference, workdir):
    raw = bytearray(json.dumps(inference[3], indent=1).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        edit = data.draw(st.sampled_from(["cut", "byte", "insert"]))
        if edit == "cut":
            del raw[i:]
            if not raw:
                break
        elif edit == "byte":
            raw[i] = data.draw(st.integers(0, 255))
        else:
            raw[i:i] = data.draw(st.sampled_from([b"NaN", b"Infinity", b"1e999", b"[" * 5000, b"\xff\xfe",
                                                  b'"a": 1, "a": 2', b"9" * 5000, b"\x00", CODE.encode()]))
    event(check_file(_write(workdir / "text.json", bytes(raw)), (inference[0], inference[1], inference[2])))


def test_the_unmutated_plans_pass_the_same_checks(inference, training, workdir):
    assert check_file(_write(workdir / "a.json", inference[3]), inference[:3]) == "ran"
    assert check_file(_write(workdir / "b.json", training[3]), training[:3], train=True) == "ran"


# ----------------------------------------------------------------------------- regressions


def _node(doc, pred):
    return next(n for n in doc["program"]["nodes"] if pred(n))


def _refused(path: Path, needle: str) -> None:
    with pytest.raises(PlanFileError, match=needle):
        memsched.Plan.load(path)
    for command in ("show", "verify"):
        code, out, err = _cli(command, path)
        assert code == 2 and out == "" and "Traceback" not in err, (command, code, err)
    assert not CANARY.exists()


def test_a_placeholder_target_carrying_code_is_refused(inference, workdir):
    doc = copy.deepcopy(inference[3])
    placeholders = [n for n in doc["program"]["nodes"] if n["op"] == "placeholder"]
    placeholders[-1]["target"] = f"x={CODE}"  # once pasted as a default argument, run at load
    _refused(_write(workdir / "ph.json", doc), r"target: .* is not a state key")
    with pytest.raises(PlanFileError):
        memsched.compile(inference[0], plan=workdir / "ph.json", device="cpu")


def test_a_loaded_placeholder_keeps_its_state_key_out_of_the_generated_code(inference, workdir):
    plan = memsched.Plan.load(_write(workdir / "ok.json", inference[3]))
    ph = [n for n in plan.graph.graph.nodes if n.op == "placeholder"]
    assert [n.target for n in ph] == [n.name for n in ph]  # generated code holds checked names only
    assert [serialize.saved_target(n) for n in ph] == [n["target"] for n in inference[3]["program"]["nodes"]
                                                       if n["op"] == "placeholder"]
    assert "input_1" in [n.name for n in ph] and "input" in [serialize.saved_target(n) for n in ph]
    assert serialize.dumps(plan) == serialize._layout(inference[3], 0) + "\n"  # saved as it was read


@pytest.mark.parametrize("name", [f"linear; {CODE}", f"a=({CODE})", "class", "__class__", "é", "self"])
def test_a_node_named_with_code_or_not_an_identifier_is_refused(inference, workdir, name):
    doc = copy.deepcopy(inference[3])
    rec = _node(doc, lambda n: n["target"] == "aten::gelu.default")
    text = json.dumps(doc).replace(json.dumps(rec["name"]), json.dumps(name))
    _refused(_write(workdir / "name.json", text), "is not a node name")


@pytest.mark.parametrize("target", ["builtins.eval", "torch.os.system", "os.system", "builtins.__import__",
                                    "aten::name.upper", "higher_order::cond", "subprocess.call", CODE])
def test_targets_outside_the_allowlist_are_refused(inference, workdir, target):
    doc = copy.deepcopy(inference[3])
    _node(doc, lambda n: n["target"] == "aten::gelu.default")["target"] = target
    _refused(_write(workdir / "target.json", doc), "unknown (target|operator)")


@pytest.mark.parametrize("where, value, needle", [
    (("kwargs",), {f"approximate='none', x={CODE}": 1}, "is not a keyword argument"),
    (("args", 0), {"device": "bogus"}, "'bogus' is not a device"),
    (("args", 0), {"dtype": "os"}, "dtype: 'os' is not one of"),
    (("args", 0), {"tuple": [{"float": "__import__"}]}, "'__import__' is not one of inf, -inf, nan"),
    (("args", 0), {"evil": 1}, "unknown key 'evil'"),
    (("args", 0), 2**64, "out of range"),
    (("args", 0), _nested(70), "nests deeper than 64 levels"),
    (("val", "tensor", "shape"), [-1, 32], "out of range"),
    (("val", "tensor", "shape"), [2**40, 2**40], "elements, more than"),
    (("val", "tensor", "shape"), [4, 33], "reaches byte"),
    (("val", "tensor", "stride"), [-32, 1], "out of range"),
    (("val", "tensor", "stride"), [1], "strides for 2 dimensions"),
    (("val", "tensor", "offset"), 2**60, "out of range"),
    (("val", "tensor", "offset"), 1, "reaches byte"),
    (("val", "tensor", "storage"), 10**6, "out of range"),
    (("val", "tensor", "dtype"), "torch.float32", "is not one of"),
    (("meta", "memsched.tier"), "__import__", "is not one of"),
    (("meta", "memsched.nbytes"), -5, "out of range"),
    (("meta", "memsched.step"), "0", "expected null or an integer, got a string"),
    (("meta", "memsched.evil"), 1, "unknown field 'memsched.evil'"),
    (("op",), "call_module", "is not one of"),
])
def test_bad_fields_of_a_node_are_named(inference, workdir, where, value, needle):
    doc = copy.deepcopy(inference[3])
    rec = _node(doc, lambda n: n["target"] == "aten::gelu.default")
    rec.setdefault("kwargs", {})
    parent = _get(rec, where[:-1]) if len(where) > 1 else rec
    if where[-1] == "kwargs":
        rec["kwargs"] = value
    else:
        parent[where[-1]] = value
    _refused(_write(workdir / "field.json", doc), needle)


@pytest.mark.parametrize("edit, needle", [
    (lambda d: d["program"]["storages"].__setitem__(0, -5), "storages.0.: -5 is out of range"),
    (lambda d: d["program"]["storages"].__setitem__(0, 2**80), "out of range"),
    (lambda d: d.__setitem__("budget_bytes", "8GB"), "budget_bytes: expected an integer"),
    (lambda d: d.__setitem__("budget_bytes", -1), "budget_bytes: -1 is out of range"),
    (lambda d: d["hardware"].__setitem__("device_type", "tpu"), "device_type: 'tpu' is not one of"),
    (lambda d: d["hardware"].__setitem__("h2d_bw", -1.0), "h2d_bw: -1.0 is negative"),
    (lambda d: d["hardware"].__setitem__("evil", 1), "unknown field 'evil'"),
    (lambda d: d["input_signature"]["leaves"][0].__setitem__("device", "tpu"), "is not one of"),
    (lambda d: d["predicted"]["timeline"].append(["x", -1]), "out of range"),
    (lambda d: d["predicted"]["spans"].append(["nowhere", "x", 0, 1]), "'nowhere' is not one of"),
    (lambda d: d.__setitem__("model", "a\x1b]0;pwned\x07"), "control characters"),
    (lambda d: d["program"]["nodes"].pop(), "ends with its one output node"),
    (lambda d: d["program"]["nodes"].insert(0, copy.deepcopy(d["program"]["nodes"][-1])), "before the end"),
    (lambda d: d["program"]["nodes"].insert(1, copy.deepcopy(d["program"]["nodes"][0])), "is repeated"),
    (lambda d: d["program"].__setitem__("nodes", []), "nodes: 0 items, fewer than 1"),
])
def test_bad_sections_are_named(inference, workdir, edit, needle):
    doc = copy.deepcopy(inference[3])
    edit(doc)
    _refused(_write(workdir / "section.json", doc), needle)


def test_a_get_attr_target_must_be_an_attribute_path(inference, workdir):
    doc = copy.deepcopy(inference[3])
    doc["program"]["nodes"].insert(0, {"name": "sub", "op": "get_attr", "target": f'a")or {CODE} or("'})
    _refused(_write(workdir / "attr.json", doc), "is not a subgraph attribute")
    doc["program"]["nodes"][0]["target"] = "graph"  # would replace the module's own
    _refused(_write(workdir / "attr.json", doc), "is not a subgraph attribute")


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000 + "]" * 100_000, "nests deeper than 64 levels"),
    (json.dumps(_nested(65)), "nests deeper than 64 levels"),
    ('{"format": "memsched-plan", "format": "memsched-plan"}', "appears twice"),
    ('{"format": "memsched-plan", "version": NaN}', "NaN is not JSON"),
    ('{"format": "memsched-plan", "version": 1e999}', "out of range"),
    ('{"version": ' + "9" * 5000 + "}", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ("", "not JSON"),
])
def test_documents_that_are_not_json_plans_are_refused(workdir, text, needle):
    _refused(_write(workdir / "doc.json", text), needle)


def test_files_over_the_size_limit_are_refused_unread(workdir, monkeypatch):
    monkeypatch.setattr(serialize, "MAX_FILE_BYTES", 1000)
    _refused(_write(workdir / "big.json", " " * 1001 + "{}"), "larger than")


def test_unreadable_paths_are_refused(workdir):
    _refused(workdir, "cannot read")                       # a directory
    _refused(workdir / "missing.json", "cannot read")
    with pytest.raises(PlanFileError, match="cannot read"):
        memsched.Plan.load(str(workdir / "a\0b.json"))


def _retarget_a_prefetch(doc) -> tuple[int, str]:
    """Point the first prefetch at another streamed weight than the one it says it restores."""
    nodes = doc["program"]["nodes"]
    i, rec = next((i, n) for i, n in enumerate(nodes) if n["target"] == "memsched.prefetch")
    others = [n["name"] for n in nodes if n["op"] == "placeholder" and n.get("meta", {}).get("memsched.tier") == "host"
              and n["name"] != rec["args"][0]["node"]]
    rec["args"][0] = {"node": others[0]}
    return i, rec["name"]


def test_a_prefetch_of_another_weight_than_it_restores_fails_verify_and_compile(inference, workdir):
    doc = copy.deepcopy(inference[3])
    step, name = _retarget_a_prefetch(doc)
    path = _write(workdir / "prefetch.json", doc)
    code, out, err = _cli("verify", path)
    assert code == 1 and f"step {step} ({name})" in err and "restores" in err and "Traceback" not in err, err
    with pytest.raises(PlanError, match=rf"step {step} \({name}\)"):
        memsched.compile(inference[0], plan=path, device="cpu")(*inference[1])


def test_a_prefetch_that_says_it_moves_other_bytes_fails_verify(inference, workdir):
    doc = copy.deepcopy(inference[3])
    rec = _node(doc, lambda n: n["target"] == "memsched.prefetch")
    rec["meta"]["memsched.nbytes"] += 4
    path = _write(workdir / "nbytes.json", doc)
    code, _, err = _cli("verify", path)
    assert code == 1 and "says it moves" in err and "Traceback" not in err, err
    with pytest.raises(PlanError, match="says it moves"):
        memsched.compile(inference[0], plan=path, device="cpu")(*inference[1])


@pytest.mark.parametrize("name", ["track", "release", "c0", "f1"])
def test_an_inserted_node_named_like_the_runtime_s_own_values_is_refused(inference, workdir, name):
    doc = copy.deepcopy(inference[3])
    rec = _node(doc, lambda n: n["target"] == "memsched.wait")
    text = json.dumps(doc).replace(json.dumps(rec["name"]), json.dumps(name))
    out, error = _run(inference[0], inference[1], _write(workdir / "reserved.json", text))
    assert isinstance(error, PlanMismatchError) and "reserves" in str(error)


def test_a_plan_budget_below_its_own_peak_fails_verify_not_with_a_traceback(inference, workdir):
    doc = copy.deepcopy(inference[3])
    doc["budget_bytes"] = doc["predicted"]["peak_device_bytes"] - 1
    path = _write(workdir / "budget.json", doc)
    code, _, err = _cli("verify", path)
    assert code == 1 and "over the budget" in err and "Traceback" not in err
    assert _cli("show", path)[0] == 0  # it still prints
    out, error = _run(inference[0], inference[1], path)
    assert out is None and isinstance(error, PlanError)


def test_saving_refuses_what_loading_would_refuse(inference):
    plan = memsched.Plan.from_dict(inference[3])
    node = next(n for n in plan.graph.graph.nodes if n.op == "call_function" and "gelu" in n.name)
    node.target = torch.nn.functional.gelu  # a Python function outside the allowlist
    with pytest.raises(PlanFileError, match="cannot save its target"):
        serialize.dumps(plan)


def test_show_of_a_payload_file_in_a_fresh_process_runs_nothing(inference, workdir):
    doc = copy.deepcopy(inference[3])
    [n for n in doc["program"]["nodes"] if n["op"] == "placeholder"][-1]["target"] = f"x={CODE}"
    path = _write(workdir / "evil.json", doc)
    proc = subprocess.run([sys.executable, "-m", "memsched", "show", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "is not a state key" in proc.stderr
    assert not CANARY.exists()


def test_a_mixture_of_experts_plan_saves_and_runs_with_its_custom_operator(workdir):
    """transformers' experts call its own operator (transformers::grouped_mm_fallback, a
    torch.library custom op): a plan names it like an ATen op, loads where it is registered and
    runs as eager does (saving refused it before: every Mixtral plan failed to save)."""
    pytest.importorskip("transformers")
    from zoo import tiny_mixtral

    model = tiny_mixtral(layers=1)
    ids = torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    doc = json.loads(serialize.dumps(_quiet_plan(model, (ids,))))
    assert any(n["target"] == "transformers::grouped_mm_fallback.default" for n in doc["program"]["nodes"])
    path = _write(workdir / "moe.json", doc)
    out, error = _run(model, (ids,), path)
    assert error is None, error
    assert torch.equal(out.logits, eager(model, (ids,), {}).logits)


def test_a_plan_naming_an_unregistered_operator_says_what_to_import(inference, workdir):
    """The file is sound but the library that registers the operator is not imported: the
    error names the operator and the way to import it, not "damaged"; --import is the user's
    own choice of module (nothing a file says is imported)."""
    doc = copy.deepcopy(inference[3])
    _node(doc, lambda n: n["target"] == "aten::gelu.default")["target"] = "memsched_nowhere::gelu.default"
    path = _write(workdir / "unregistered.json", doc)
    code, _, err = _cli("show", path)
    assert code == 2 and "memsched_nowhere::gelu.default" in err and "--import MODULE" in err
    assert "damaged" not in err
    code, _, err = _cli("verify", path, "--import", "no_such_module_here")
    assert code == 2 and "--import no_such_module_here: importing it failed" in err
    assert _cli("show", _write(workdir / "sound.json", inference[3]), "--import", "json")[0] == 0


@torch.library.custom_op("memsched_plan_tests::touch_canary", mutates_args=())
def _touch_canary(x: torch.Tensor) -> torch.Tensor:
    CANARY.touch()   # what a registered operator with a side effect could do, if a file could call it
    return x.clone()


@_touch_canary.register_fake
def _(x):
    return torch.empty_like(x)


def test_a_registered_operator_the_model_does_not_call_never_runs(inference, workdir):
    """Any registered operator can be named, but a plan runs only on a fresh capture of the
    model, node paired with node: one the model does not call is a mismatch before any op runs."""
    doc = copy.deepcopy(inference[3])
    _node(doc, lambda n: n["target"] == "aten::gelu.default")["target"] = "memsched_plan_tests::touch_canary.default"
    path = _write(workdir / "foreign-op.json", doc)
    assert _load(path) is not None   # a sound file: the operator is registered here
    assert _cli("show", path)[0] == 0 and _cli("verify", path)[0] == 0   # data: printed, checked, not run
    out, error = _run(inference[0], inference[1], path)
    assert out is None and isinstance(error, PlanMismatchError) and "touch_canary" in str(error)
    assert not CANARY.exists()


def test_a_file_re_running_a_random_op_is_refused(workdir):
    """A second dropout draw into the same mask verifies (bytes and order are sound) but would
    train on other numbers than eager: a node that re-runs a random op pairs with nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.Linear(32, 8)).train()
    x = torch.randn(4, 16)
    # planned for a CPU, where dropout traces as bernoulli_ into a mask
    doc = json.loads(serialize.dumps(memsched.plan(model, (x,), budget=10**9, hardware=FIXED_CPU, train=True)))
    nodes = doc["program"]["nodes"]
    i, draw = next((i, n) for i, n in enumerate(nodes) if n["target"].startswith("aten::bernoulli_"))
    again = copy.deepcopy(draw)
    again["name"], again["meta"]["memsched.pass"] = draw["name"] + "_again", "remat"
    nodes.insert(i + 1, again)
    next(n for n in nodes[i + 2:] if n["target"] == "memsched.free")["args"].append({"node": again["name"]})
    path = _write(workdir / "redraw.json", json.dumps(doc))
    assert check_file(path) == "verified"
    with pytest.raises(PlanMismatchError, match="bernoulli__again .*re-runs an op that draws random numbers"):
        memsched.compile(model, plan=path, train=True, device="cpu")(x)
