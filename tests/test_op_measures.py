"""Measured op prices (runtime/op_timing.py, ir/op_keys.py): the second and third calls of a
scheduled program on a CPU time every ATen op under a key made from its arguments, the same
key the cost model makes from a planned node's traced values; plans on this machine's own
profile are then priced by those times, plans on any other profile by the roofline."""
from __future__ import annotations

import warnings

import pytest
import torch

import memsched
from helpers import FIXED_CPU
from memsched.cost_models import measures
from memsched.cost_models.hardware import LOCAL_CPU
from memsched.cost_models.op_cost import estimate_op_time, op_time
from memsched.ir.op_keys import node_op_key, op_key
from memsched.runtime.op_timing import TIMED_CALLS
from zoo import build


def _ops(plan):
    """The plan's ATen ops: each is timed as the program calls it, composite ones (``linear``,
    ``einsum``, ``to``) whole."""
    return [n for n in plan.graph.graph.nodes if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)]


def _composite(n) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(n.target.name(), "CompositeImplicitAutograd")


def test_a_traced_node_and_a_running_call_have_one_key():
    """A traced (fake) tensor and the real one it stands for, a list and a tuple (fx holds
    lists): one key. Strides and keyword arguments are part of it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    permute, total = torch.ops.aten.permute.default, torch.ops.aten.sum.dim_IntList
    x = torch.randn(4, 6)[:, :3]
    fake = FakeTensorMode().from_tensor(x)
    assert op_key(permute, (fake, [1, 0]), {}) == op_key(permute, (x, (1, 0)), {})
    assert op_key(permute, (x.contiguous(), [1, 0]), {}) != op_key(permute, (x, [1, 0]), {})
    assert op_key(total, (x, [1]), {"dtype": torch.float64}) != op_key(total, (x, [1]), {})


def test_the_timed_calls_price_every_op_of_the_plan(measures_cache):
    model, args, kwargs = build("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, 10**10, device="cpu", fuse=False)
    try:
        cm(*args, **kwargs)                  # call 0 (plans): not timed
        assert cm.plan.hardware.name == LOCAL_CPU
        ops = _ops(cm.plan)
        assert not any(measures.measured_time(node_op_key(n)) for n in ops)
        for _ in range(max(TIMED_CALLS)):
            cm(*args, **kwargs)
        priced = [n for n in ops if measures.measured_time(node_op_key(n)) is not None]
        assert len(priced) == len(ops), [n.name for n in ops if n not in priced][:5]
        assert any(_composite(n) for n in priced)   # timed whole, not as the ops it is made of
        for n in ops:
            assert op_time(n, cm.plan.hardware) == measures.measured_time(node_op_key(n))
            assert op_time(n, FIXED_CPU) == estimate_op_time(n, FIXED_CPU)   # a preset: the roofline
        again = cm.plan.predict()
        assert again.compute_s != cm.plan.sim.compute_s
        # call 3 on: no more timing (the samples stay as the timed calls left them)
        before = dict(measures._TIMES)
        cm(*args, **kwargs)
        assert measures._TIMES == before
    finally:
        cm.close()


def test_a_training_step_times_its_backward_too(measures_cache):
    from train_zoo import build_train

    model, args, kwargs, loss_fn = build_train("mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, 10**10, train=True, device="cpu", fuse=False)
    try:
        for _ in range(max(TIMED_CALLS) + 1):
            loss_fn(cm(*args, **kwargs)).backward()
        ops = _ops(cm.plan)
        backward = [n for n in ops if "backward" in str(n.target) or n.name.startswith("t_")]
        assert backward
        assert all(measures.measured_time(node_op_key(n)) is not None for n in ops)
    finally:
        cm.close()


def test_the_minimum_budget_does_not_move_as_ops_get_measured(measures_cache):
    """Segments are cut by the roofline: a minimum found before the model ran is still the
    minimum after its ops were measured, however they measured (a training frontier found
    24 MiB, then could not plan at it once measured times had moved the cuts: 25 MiB). Here
    the measures are made up, every other op a thousand times dearer than the next, and the
    minimum is the one the chunk pass reaches (cut by measured times, it moved by 8%)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1024, n_positions=128,
                                       use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    ids = torch.randint(0, 1024, (4, 128), generator=torch.Generator().manual_seed(1))
    kwargs = {"input_ids": ids, "labels": ids}
    with pytest.raises(memsched.InfeasibleBudgetError) as lowest:
        memsched.plan(model, (), budget=1, example_kwargs=kwargs, train=True)
    minimum = lowest.value.min_budget_bytes
    first = memsched.plan(model, (), budget=10**9, example_kwargs=kwargs, train=True)
    assert first.hardware.name == LOCAL_CPU
    for i, n in enumerate(_ops(first)):
        measures.record_time(node_op_key(n), 1e-3 if i % 2 else 1e-6)
    again = memsched.plan(model, (), budget=minimum, example_kwargs=kwargs, train=True)
    assert again.min_budget_bytes == minimum


def test_a_linear_is_timed_whole_under_its_nodes_key(measures_cache):
    """``linear`` is a composite op (it runs as ``t`` and ``addmm``): the timer sees the program's
    call, so the node is priced by what the whole op took, and its parts are not recorded."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()
    x = torch.randn(32, 64)
    cm = memsched.compile(model, 10**9, device="cpu", fuse=False)
    try:
        for _ in range(max(TIMED_CALLS) + 1):
            cm(x)
        linears = [n for n in cm.plan.graph.graph.nodes if n.target is torch.ops.aten.linear.default]
        assert len(linears) == 2
        assert all(measures.measured_time(node_op_key(n)) is not None for n in linears)
        assert not any(key.startswith(("op:aten.addmm", "op:aten.t.")) for key in measures._TIMES)
    finally:
        cm.close()
