"""Golden listings: the printed schedule of a small MLP at its minimum budget, and of the zoo's
GPT-2 (transformers) in a budget below its weights, so they stream from host, on a preset GPU.

The "passes:" header line holds wall times and is left out; everything else (the solver's
status, the roofline predictions of a preset profile, every node) is deterministic. Regenerate
after an intended change with MEMSCHED_UPDATE_GOLDEN=1, and read the diff.

Each golden records the versions of the libraries whose tracing it depends on
(``golden/VERSIONS.json``); when a listing differs and those versions differ from the installed
ones, the failure says so (a newer transformers traces some models differently), so the diff is
read as what it is before regenerating.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import memsched

GOLDEN_DIR = Path(__file__).parent / "golden"
VERSIONS = GOLDEN_DIR / "VERSIONS.json"
# the libraries whose tracing each golden depends on
TRACED_WITH = {"mlp_t4_min_budget": ("torch",), "gpt2_t4_1MB": ("torch", "transformers"),
               "mlp_train_t4": ("torch",), "mlp_train_t4_fused": ("torch",)}


def _installed(libs) -> dict:
    import importlib.metadata as md

    return {lib: md.version(lib).split("+")[0] for lib in libs}


def _check_versions(name: str, text: str, golden: str) -> None:
    if text == golden:
        return
    made_with = json.loads(VERSIONS.read_text()).get(name, {}) if VERSIONS.exists() else {}
    now = _installed(TRACED_WITH[name])
    changed = {lib: (made_with.get(lib), v) for lib, v in now.items() if made_with.get(lib) != v}
    if changed:
        pytest.fail(f"golden {name} was made with {made_with}, installed {now}: the trace may differ for "
                    f"that reason; install the locked versions (requirements/dev.lock) or read the diff and "
                    f"regenerate with MEMSCHED_UPDATE_GOLDEN=1")


def _mlp_plan() -> memsched.Plan:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 16)).eval()
    x = torch.randn(4, 64)
    minimum = memsched.plan(model, (x,), budget=10**9, hardware="t4").min_budget_bytes
    return memsched.plan(model, (x,), budget=minimum, hardware="t4")


def _gpt2_plan() -> memsched.Plan:
    pytest.importorskip("transformers")
    from zoo import build

    model, args, kwargs = build("gpt2")  # 4 layers, ~3.7 MB of weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 1 MB for the tensors, beside the cuBLAS workspace a T4 plan counts
        budget = memsched.get_hardware("t4").workspace_bytes + 10**6
        return memsched.plan(model, args, budget=budget, example_kwargs=kwargs, hardware="t4")


def _mlp_train_plan(fuse: bool = False) -> memsched.Plan:
    """A training step between its minimum budget and its peak: saved activations kept,
    offloaded to host or recomputed, gradients delivered (``fuse``: its compute between
    scheduling points in regions)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 16)).train()
    x = torch.randn(32, 64)
    free = memsched.plan(model, (x,), budget=10**9, hardware="t4", train=True)
    budget = (free.min_budget_bytes + free.program.peak_bytes) // 2
    return memsched.plan(model, (x,), budget=budget, hardware="t4", train=True, fuse=fuse)


PLANS = {"mlp_t4_min_budget": _mlp_plan, "gpt2_t4_1MB": _gpt2_plan, "mlp_train_t4": _mlp_train_plan,
         "mlp_train_t4_fused": lambda: _mlp_train_plan(fuse=True)}
_cache: dict = {}


def _plan(name) -> memsched.Plan:
    if name not in _cache:
        _cache[name] = PLANS[name]()
    return _cache[name]


def _masked(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("# passes:")) + "\n"


@pytest.mark.parametrize("name", list(PLANS))
def test_listing_matches_golden(name):
    text = _masked(str(_plan(name)))
    golden = GOLDEN_DIR / f"{name}.txt"
    if os.environ.get("MEMSCHED_UPDATE_GOLDEN"):
        golden.write_text(text)
        stamps = json.loads(VERSIONS.read_text()) if VERSIONS.exists() else {}
        stamps[name] = _installed(TRACED_WITH[name])
        VERSIONS.write_text(json.dumps(stamps, indent=1, sort_keys=True) + "\n")
    _check_versions(name, text, golden.read_text())
    assert text == golden.read_text()


def test_gpt2_golden_streams_weights():
    plan = _plan("gpt2_t4_1MB")
    assert plan.tier_bytes()["host"] > plan.tier_bytes()["device"] > 0
    assert plan.bytes_moved.get("h2d", 0) > 0 and plan.peak_device_bytes <= plan.budget_bytes
    assert plan.peak_device_bytes - plan.hardware.workspace_bytes <= 10**6   # 1 MB for the tensors


@pytest.mark.parametrize("name", list(PLANS))
def test_saved_and_loaded_listing_matches_golden(name, tmp_path):
    _plan(name).save(tmp_path / "plan.json")
    loaded = memsched.Plan.load(tmp_path / "plan.json")
    golden = (GOLDEN_DIR / f"{name}.txt").read_text()
    _check_versions(name, _masked(str(loaded)), golden)
    assert _masked(str(loaded)) == golden


@pytest.mark.parametrize("name", list(PLANS))
def test_listing_names_the_pass_of_every_inserted_node(name):
    for line in _masked(str(_plan(name))).splitlines():
        if any(f"= {op}(" in line or line.strip().startswith(f"{op}(") for op in ("prefetch", "wait", "free", "offload")):
            assert "[placement]" in line, line
