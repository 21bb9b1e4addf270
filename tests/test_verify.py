"""The independent verifier (``memsched.verify_schedule``): it accepts the plans memsched
makes for the zoo at tight budgets, and rejects deliberately broken copies of a plan, each
with a ``PlanError`` whose message names the offending step (``step N (node)``).

Broken plans are built from ``copy.deepcopy(plan.graph)`` with fx graph surgery.
"""
from __future__ import annotations

import copy
import functools
import os
import re
import sys
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo import ZOO, build  # noqa: E402

import memsched  # noqa: E402
from memsched.ir.meta import annotate, info  # noqa: E402
from memsched.ir import ops  # noqa: E402

TIME_LIMIT_S = 2.0
UNLIMITED = 10**15
_STEP = re.compile(r"step (\d+) \(([^)]+)\)")


@functools.lru_cache(maxsize=None)
def _hw() -> memsched.Hardware:
    return memsched.get_hardware(None, "cpu")


def _plan(model, args, kwargs, budget) -> memsched.Plan:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.plan(model, args, budget=budget, example_kwargs=kwargs, hardware=_hw(),
                             time_limit_s=TIME_LIMIT_S)


def _min_budget(model, args, kwargs) -> tuple[int, int]:
    """(min budget, unconstrained peak) of a model."""
    p0 = _plan(model, args, kwargs, 10**12)
    return p0.min_budget_bytes, p0.unconstrained.peak_device_bytes


def _kind(node: fx.Node) -> str | None:
    if ops.is_inserted(node):
        return node.target.__name__
    return None


def _index(gm: fx.GraphModule, node: fx.Node) -> int:
    return list(gm.graph.nodes).index(node)


def assert_rejected_at(gm: fx.GraphModule, budget: int, node: fx.Node, *phrases: str) -> str:
    """verify_schedule raises PlanError naming ``node`` (its step index and name)."""
    with pytest.raises(memsched.PlanError) as info:
        memsched.verify_schedule(gm, budget)
    msg = str(info.value)
    m = _STEP.search(msg)
    assert m, f"the message names no step: {msg!r}"
    assert (int(m.group(1)), m.group(2)) == (_index(gm, node), node.name), (
        f"expected step {_index(gm, node)} ({node.name}), got: {msg!r}")
    for phrase in phrases:
        assert phrase in msg, f"{phrase!r} not in {msg!r}"
    return msg


# -- the verifier accepts what the planner produces ------------------------------------------


@functools.lru_cache(maxsize=None)
def _zoo_budgets(name):
    model, args, kwargs = build(name)
    lo, peak = _min_budget(model, args, kwargs)
    return model, args, kwargs, lo, peak


@pytest.mark.parametrize("tightness", ["min", "mid"])
@pytest.mark.parametrize("name", list(ZOO))
def test_verifier_accepts_zoo_plans(name, tightness):
    model, args, kwargs, lo, peak = _zoo_budgets(name)
    budget = lo if tightness == "min" else (lo + peak) // 2
    plan = _plan(model, args, kwargs, budget)
    if tightness == "min":
        assert any(_kind(n) == "prefetch" for n in plan.graph.graph.nodes), "nothing moves at the min budget"
    counted = plan.verify()
    assert counted <= budget
    # the verifier and the simulator count device bytes the same way, independently
    assert counted == plan.peak_device_bytes
    # so does a deep copy (the broken plans below are deep copies)
    assert memsched.verify_schedule(copy.deepcopy(plan.graph), budget) == counted


# -- broken plans ----------------------------------------------------------------------------


class SkipNet(nn.Module):
    """A chain of matmuls with a long skip connection and a weight reused at the end: at its
    minimum budget the plan prefetches weights, refetches w0, and offloads the skip."""

    def __init__(self, d=64, n=6):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.ParameterList(
            [nn.Parameter(torch.randn(d, d) / d**0.5, requires_grad=False) for _ in range(n)])

    def forward(self, x):
        h0 = x @ self.w[0]
        h = h0
        for w in self.w[1:]:
            h = torch.tanh(h @ w)
        return (h @ self.w[0]) + h0


@functools.lru_cache(maxsize=None)
def _base_plan(name) -> memsched.Plan:
    if name == "skipnet":
        torch.manual_seed(1)
        model, args, kwargs = SkipNet().eval(), (torch.randn(64, 64),), {}
        lo, _ = _min_budget(model, args, kwargs)
    else:
        model, args, kwargs, lo, _ = _zoo_budgets(name)
    plan = _plan(model, args, kwargs, lo)
    plan.verify()
    return plan


BASES = ["skipnet", "vit"]


@pytest.fixture(params=BASES)
def base(request):
    """(plan, deep copy of its graph to break)."""
    plan = _base_plan(request.param)
    return plan, copy.deepcopy(plan.graph)


def _nodes(gm, kind=None, op=None):
    return [n for n in gm.graph.nodes if (kind is None or _kind(n) == kind) and (op is None or n.op == op)]


def _computes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and _kind(n) is None]


def test_base_plans_have_every_inserted_op():
    for name in BASES:
        kinds = {_kind(n) for n in _base_plan(name).graph.graph.nodes}
        assert {"prefetch", "wait", "free"} <= kinds, name
    assert "offload" in {_kind(n) for n in _base_plan("skipnet").graph.graph.nodes}


# (a) use before prefetch


def test_rejects_compute_moved_before_its_wait(base):
    plan, gm = base
    wait = _nodes(gm, "wait")[0]
    user = next(u for u in wait.users if _kind(u) is None)
    wait.prepend(user)  # the compute now runs before the tensor it reads has landed
    assert_rejected_at(gm, UNLIMITED, user, wait.name, "before it is defined")
    assert_rejected_at(gm, plan.budget_bytes, user, wait.name, "before it is defined")


def test_rejects_compute_moved_before_its_prefetch(base):
    plan, gm = base
    wait = _nodes(gm, "wait")[-1]
    prefetch = wait.args[0]
    user = next(u for u in wait.users if _kind(u) is None)
    prefetch.prepend(user)
    assert_rejected_at(gm, UNLIMITED, user, "before it is defined")


def _drop_fetch(gm):
    """Delete the first fetch of a weight (its prefetch and wait): its compute users read the
    host/disk-homed placeholder directly and the frees of the wait lose that argument.
    Returns (first compute user, placeholder)."""
    wait = next(w for w in _nodes(gm, "wait") if w.args[0].args[0].op == "placeholder")
    prefetch = wait.args[0]
    home = prefetch.args[0]
    user = next(u for u in wait.users if _kind(u) is None)
    for u in list(wait.users):
        if _kind(u) == "free":
            rest = tuple(a for a in u.args if a is not wait)
            if rest:
                u.args = rest
            else:
                gm.graph.erase_node(u)
        else:
            u.replace_input_with(wait, home)
    gm.graph.erase_node(wait)
    gm.graph.erase_node(prefetch)
    return user, home


def _drop_wait(gm):
    """Delete the first wait on a weight; its users (compute and free) read the pending
    prefetch instead. Returns (first compute user, prefetch)."""
    wait = next(w for w in _nodes(gm, "wait") if w.args[0].args[0].op == "placeholder")
    prefetch = wait.args[0]
    user = next(u for u in wait.users if _kind(u) is None)
    wait.replace_all_uses_with(prefetch)
    gm.graph.erase_node(wait)
    return user, prefetch


def test_rejects_compute_reading_a_home_tensor(base):
    plan, gm = base
    user, home = _drop_fetch(gm)
    assert info(home).tier in ("host", "disk")
    assert_rejected_at(gm, plan.budget_bytes, user, home.name)


def test_rejects_wait_deleted_users_read_pending(base):
    plan, gm = base
    user, prefetch = _drop_wait(gm)
    assert_rejected_at(gm, plan.budget_bytes, user, prefetch.name)


# (b) budget exceeded


def test_rejects_budget_below_peak(base):
    plan, gm = base
    peak = memsched.verify_schedule(gm, plan.budget_bytes)
    assert peak == plan.peak_device_bytes
    # the first node at which the simulator's timeline reaches the peak (with what an op holds
    # inside itself while it runs: a convolution's or an attention's scratch)
    nodes = list(gm.graph.nodes)
    first = next(i for i, (_, held) in enumerate(plan.sim.timeline) if held + (info(nodes[i]).scratch or 0) == peak)
    node = nodes[first]
    msg = assert_rejected_at(gm, peak - 1, node, "over the budget")
    assert f"{peak} device bytes held" in msg and f"budget of {peak - 1}" in msg


def test_rejects_tiny_budget_at_first_device_tensor(base):
    plan, gm = base
    first = next(n for n in gm.graph.nodes
                 if n.op == "placeholder" and (info(n).tier or "device") == "device")
    assert_rejected_at(gm, 1, first, "over the budget of 1")


# (c) double free


def _insert_after(node, target, args):
    with node.graph.inserting_after(node):
        return node.graph.call_function(target, args)


def test_rejects_second_free_of_a_freed_value(base):
    plan, gm = base
    free = next(f for f in _nodes(gm, "free") if _kind(f.args[0]) is None and f.args[0].op != "placeholder")
    x = free.args[0]
    again = _insert_after(free, ops.free, (x,))
    assert_rejected_at(gm, UNLIMITED, again, x.name, "freed")


def test_rejects_free_of_the_same_value_twice_in_one_step(base):
    plan, gm = base
    free = _nodes(gm, "free")[0]
    x = free.args[0]
    free.args = (x,) + tuple(free.args)
    assert_rejected_at(gm, UNLIMITED, free, x.name, "twice")


def test_rejects_second_free_of_a_fetched_weight(base):
    plan, gm = base
    free = next(f for f in _nodes(gm, "free") if any(_kind(a) == "wait" for a in f.args))
    w = next(a for a in free.args if _kind(a) == "wait")
    later = _computes(gm)[-1]
    with gm.graph.inserting_before(later):
        again = gm.graph.call_function(ops.free, (w,))
    assert_rejected_at(gm, UNLIMITED, again, w.name, "freed")


# (d) use after free


def test_rejects_free_moved_before_a_later_use(base):
    plan, gm = base
    # a free of a compute value whose last use is a compute step
    for free in _nodes(gm, "free"):
        x = next((a for a in free.args if _kind(a) is None and a.op != "placeholder"), None)
        if x is None:
            continue
        users = [u for u in x.users if u is not free and _kind(u) is None]
        if users:
            break
    else:  # pragma: no cover
        pytest.fail("no freed compute value with a compute user")
    last = max(users, key=lambda u: _index(gm, u))
    last.prepend(free)
    assert_rejected_at(gm, UNLIMITED, last, "after it was freed")


def test_rejects_read_of_an_offload_handle_after_free():
    plan = _base_plan("skipnet")
    gm = copy.deepcopy(plan.graph)
    offload = _nodes(gm, "offload")[0]
    prefetch = next(u for u in offload.users if _kind(u) == "prefetch")
    free = next(u for u in offload.users if _kind(u) == "free")
    prefetch.prepend(free)  # the handle is released before the fetch back reads it
    assert_rejected_at(gm, UNLIMITED, prefetch, offload.name, "after it was freed")


# (e) wait on something that is not a prefetch


def test_rejects_wait_on_a_compute_value(base):
    plan, gm = base
    c = _computes(gm)[0]
    w = _insert_after(c, ops.wait, (c,))
    assert_rejected_at(gm, UNLIMITED, w, c.name, "not a prefetch")


def test_rejects_wait_on_an_offload_handle():
    plan = _base_plan("skipnet")
    gm = copy.deepcopy(plan.graph)
    wait = next(w for w in _nodes(gm, "wait") if _kind(w.args[0].args[0]) == "offload")
    prefetch = wait.args[0]
    handle = prefetch.args[0]
    wait.args = (handle,)  # skip the fetch back: wait on the handle itself
    gm.graph.erase_node(prefetch)
    assert_rejected_at(gm, UNLIMITED, wait, handle.name, "not a prefetch")


def test_rejects_wait_on_a_home_placeholder(base):
    plan, gm = base
    wait = next(w for w in _nodes(gm, "wait") if w.args[0].args[0].op == "placeholder")
    prefetch = wait.args[0]
    wait.args = (prefetch.args[0],)
    assert_rejected_at(gm, UNLIMITED, wait, prefetch.args[0].name, "not a prefetch")


# other rules: what a prefetch may read, where an offload may go


def test_rejects_prefetch_of_a_device_tensor(base):
    plan, gm = base
    ph = next(n for n in gm.graph.nodes
              if n.op == "placeholder" and (info(n).tier or "device") == "device")
    p = _insert_after(ph, ops.prefetch, (ph,))
    annotate(p, nbytes=4)
    assert_rejected_at(gm, UNLIMITED, p, ph.name, "not host or disk")


def test_rejects_prefetch_of_a_compute_value(base):
    plan, gm = base
    c = _computes(gm)[0]
    p = _insert_after(c, ops.prefetch, (c,))
    annotate(p, nbytes=4)
    assert_rejected_at(gm, UNLIMITED, p, c.name, "neither a home tensor nor an offload")


def test_rejects_offload_to_an_unknown_tier():
    plan = _base_plan("skipnet")
    gm = copy.deepcopy(plan.graph)
    offload = _nodes(gm, "offload")[0]
    offload.args = (offload.args[0], "tape")
    assert_rejected_at(gm, UNLIMITED, offload, "unknown tier")


def test_intact_copy_is_accepted(base):
    plan, gm = base
    assert memsched.verify_schedule(gm, plan.budget_bytes) == plan.verify()


# (f) every tensor accounted for at the return


def test_rejects_a_value_never_freed(base):
    plan, gm = base
    free = next(f for f in _nodes(gm, "free") if any(_kind(a) is None and a.op != "placeholder" for a in f.args))
    x = next(a for a in free.args if _kind(a) is None and a.op != "placeholder")
    rest = tuple(a for a in free.args if a is not x)
    if rest:
        free.args = rest
    else:
        gm.graph.erase_node(free)
    out = gm.graph.output_node()
    msg = assert_rejected_at(gm, UNLIMITED, out, x.name, "still held on the device")
    assert "missing free" in msg


def test_rejects_an_input_never_freed(base):
    plan, gm = base
    inp = next(n for n in gm.graph.nodes if n.op == "placeholder" and info(n).kind == "input")
    free = next(f for f in _nodes(gm, "free") if inp in f.args)
    rest = tuple(a for a in free.args if a is not inp)
    if rest:
        free.args = rest
    else:
        gm.graph.erase_node(free)
    assert_rejected_at(gm, UNLIMITED, gm.graph.output_node(), inp.name, "still held")


def test_resident_weights_and_outputs_may_stay(base):
    plan, gm = base
    held = [n for n in gm.graph.nodes if n.op == "placeholder" and info(n).tier == "device"
            and info(n).kind == "weight"]
    assert memsched.verify_schedule(gm, UNLIMITED) == plan.peak_device_bytes
    assert held or plan.tier_bytes()["device"] == 0


def test_rejects_a_prefetch_never_waited_on(base):
    plan, gm = base
    prefetch = _nodes(gm, "prefetch")[0]
    extra = _insert_after(prefetch, ops.prefetch, (prefetch.args[0],))
    extra.meta.update(prefetch.meta)
    assert_rejected_at(gm, UNLIMITED, gm.graph.output_node(), extra.name, "never waited on")


def test_rejects_an_offload_handle_never_freed():
    plan = _base_plan("skipnet")
    gm = copy.deepcopy(plan.graph)
    offload = _nodes(gm, "offload")[0]
    free = next(u for u in offload.users if _kind(u) == "free")
    gm.graph.erase_node(free)
    assert_rejected_at(gm, UNLIMITED, gm.graph.output_node(), offload.name, "never freed")


def test_every_message_names_a_step():
    """Each rule's message, as raised on a real plan, carries ``step N (node)``."""
    plan = _base_plan("skipnet")
    gm = copy.deepcopy(plan.graph)
    prefetch = _nodes(gm, "prefetch")[0]
    annotate(prefetch, nbytes=info(prefetch).nbytes + 4)
    assert_rejected_at(gm, UNLIMITED, prefetch, "says it moves")


# MEMSCHED_VERIFY=1: the verifier runs on every plan made


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)).eval(), (torch.randn(4, 32),)


T4_1MB = memsched.get_hardware("t4").workspace_bytes + 10**6   # 1 MB beside the workspace a T4 plan counts


def test_env_var_runs_the_verifier_after_planning(monkeypatch):
    monkeypatch.delenv("MEMSCHED_VERIFY", raising=False)  # the suite's conftest turns it on
    model, args = _model()
    plan = memsched.plan(model, args, budget=T4_1MB, hardware="t4")
    assert "verify" not in [p.name for p in plan.passes]
    monkeypatch.setenv("MEMSCHED_VERIFY", "1")
    plan = memsched.plan(model, args, budget=T4_1MB, hardware="t4")
    assert "verify" in [p.name for p in plan.passes]
    monkeypatch.setenv("MEMSCHED_VERIFY", "0")
    assert "verify" not in [p.name for p in memsched.plan(model, args, budget=T4_1MB, hardware="t4").passes]
    assert "verify" in [p.name for p in memsched.plan(model, args, budget=T4_1MB, hardware="t4", verify=True).passes]


def test_env_var_catches_a_planner_bug(monkeypatch):
    """A rewriting pass that forgets a free is caught at planning time, not at run time."""
    import memsched.pipeline as pipeline

    real = pipeline.build_schedule

    def forgetful(*a, **k):
        gm = real(*a, **k)
        free = next(n for n in gm.graph.nodes if _kind(n) == "free")
        gm.graph.erase_node(free)
        return gm

    monkeypatch.setattr(pipeline, "build_schedule", forgetful)
    monkeypatch.delenv("MEMSCHED_VERIFY", raising=False)  # the suite's conftest turns it on
    model, args = _model()
    memsched.plan(model, args, budget=10**9, hardware="t4")  # unchecked: the bug goes through
    monkeypatch.setenv("MEMSCHED_VERIFY", "1")
    with pytest.raises(memsched.PlanError, match=r"step \d+ \(output\).*still held"):
        memsched.plan(model, args, budget=10**9, hardware="t4")
    with pytest.raises(memsched.PlanError, match="still held"):
        memsched.compile(model, 10**9, example_inputs=args, hardware="t4", device="cpu")
