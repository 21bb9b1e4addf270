"""The plan file's JSON Schema (memsched/io/plan_schema.py): a valid draft 2020-12 schema, what
``memsched schema`` publishes, met by every kind of plan memsched saves (checked by a plain
``jsonschema`` validator, as a tool without memsched would check it), and stricter than JSON
Schema's defaults where Python would carry a wrong value on (1.0 as an integer, a name with a
trailing newline). Mutated and hostile files are tests/test_plan_files.py's."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import warnings

import jsonschema
import pytest
import torch
import torch.nn as nn

import memsched
from helpers import FIXED_CPU
from memsched.cli import main
from memsched.errors import PlanFileError
from memsched.io import plan_schema, serialize


def _doc(model, args, hardware="t4", budget=None, **kw) -> dict:
    """The saved document of ``model``'s plan at ``budget`` (default: its minimum)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if budget is None:
            budget = memsched.plan(model, args, budget=10**12, hardware=hardware, **kw).min_budget_bytes
        return json.loads(serialize.dumps(memsched.plan(model, args, budget=budget, hardware=hardware, **kw)))


def _mlp(depth: int = 2) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(16, 32), nn.GELU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(32, 32), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(32, 8))


@pytest.fixture(scope="module")
def documents() -> dict:
    """Saved plans of each shape a file takes: inference, a training step (saved activations,
    delivered gradients), fused regions (a program inside a node)."""
    x = torch.randn(4, 16)
    docs = {"inference": _doc(_mlp().eval(), (x,)), "training": _doc(_mlp(3).train(), (x,), train=True),
            "fused": _doc(_mlp(3).eval(), (x,), hardware=FIXED_CPU, budget=10**9, fuse=True)}
    assert any("region" in n for n in docs["fused"]["program"]["nodes"])
    assert docs["training"]["placement"].get("saved_activations")
    return docs


def test_the_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(plan_schema.SCHEMA)


def test_memsched_schema_prints_the_schema():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["schema"]) == 0
    assert json.loads(out.getvalue()) == json.loads(json.dumps(plan_schema.SCHEMA))


@pytest.mark.parametrize("kind", ["inference", "training", "fused"])
def test_saved_plans_meet_the_published_schema(documents, kind):
    published = json.loads(json.dumps(plan_schema.SCHEMA))  # as a tool reads it from `memsched schema`
    jsonschema.Draft202012Validator(published).validate(documents[kind])
    assert plan_schema.first_error(documents[kind]) is None


def _set(doc: dict, path: tuple, value) -> dict:
    doc = copy.deepcopy(doc)
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return doc


def _gelu_index(doc) -> int:
    return next(i for i, n in enumerate(doc["program"]["nodes"]) if n["target"] == "aten::gelu.default")


@pytest.mark.parametrize("path, value, message", [
    (("budget_bytes",), 1.0, "budget_bytes: expected an integer, got a number"),
    (("budget_bytes",), True, "budget_bytes: expected an integer, got a boolean"),
    (("placement", "tier_bytes", "host"), "1", "placement.tier_bytes.host: expected an integer, got a string"),
    (("placement", "segments"), -1, "placement.segments: -1 is out of range (0 to 4000000)"),
    (("hardware", "peak_flops"), -1.0, "hardware.peak_flops: -1.0 is negative"),
    (("predicted", "spans", 0, 2), {"float": "soon"}, "predicted.spans[0][2].float: 'soon' is not one of"),
    (("predicted", "timeline", 0), ["x"], "predicted.timeline[0]: 1 items, fewer than 2"),
    (("passes", 0, "seconds"), {"float": "-inf"}, "passes[0].seconds.float: '-inf' is not one of inf"),
    (("chunking",), [{"path": "_modules", "dim": 0, "chunks": 2}], "chunking[0].path: '_modules' is not"),
    (("input_signature",), {"spec": "x", "leaves": [{"shape": [1], "dtype": "float32", "device": "cpu"}]},
     "input_signature.leaves[0]"),
])
def test_sections_are_held_to_their_types(documents, path, value, message):
    wrong = plan_schema.first_error(_set(documents["inference"], path, value))
    assert wrong is not None and wrong.startswith(message), wrong


@pytest.mark.parametrize("name", ["gelu\n", "gelu \n", "lambda", "__init__", "self", "a" * 1025])
def test_node_names_a_regular_expression_would_let_through_are_refused(documents, name):
    doc = documents["inference"]
    i = _gelu_index(doc)
    wrong = plan_schema.first_error(_set(doc, ("program", "nodes", i, "name"), name))
    assert wrong is not None and wrong.startswith(f"program.nodes[{i}].name: ") and "is not a node name" in wrong


def test_argument_values_are_checked_through_nested_tags(documents):
    doc = documents["inference"]
    i = _gelu_index(doc)
    deep = {"tuple": [[{"dict": {"k": {"slice": [0, {"node": "not a name"}, None]}}}]]}
    wrong = plan_schema.first_error(_set(doc, ("program", "nodes", i, "args"), [deep]))
    assert wrong is not None and "is not a node name" in wrong and f"program.nodes[{i}].args[0]" in wrong
    tensor_in_args = {"tensor": {"shape": [1], "stride": [1], "dtype": "float32", "offset": 0, "storage": 0}}
    wrong = plan_schema.first_error(_set(doc, ("program", "nodes", i, "args"), [tensor_in_args]))
    assert wrong is not None and "unknown key 'tensor'" in wrong
    wrong = plan_schema.first_error(_set(doc, ("program", "nodes", i, "args"), [2**63]))
    assert wrong is not None and "out of range" in wrong


def test_the_reader_reports_the_schema_error_with_the_file(documents, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(_set(documents["training"], ("placement", "saved_activations", 0, "decision"),
                                    "evict")))
    with pytest.raises(PlanFileError, match=r"plan.json is damaged: placement.saved_activations\[0\].decision: "
                                            r"'evict' is not one of keep, refetch"):
        memsched.Plan.load(path)
