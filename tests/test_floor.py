"""The memory floor (the largest single op's working set) and where the minimum binds: named by
InfeasibleBudgetError, never above the minimum the planner reaches."""
from __future__ import annotations

import pytest
import torch

import memsched
from memsched.frontend.capture import capture
from memsched.passes.analysis import analyze
from memsched.passes.floor import op_floor


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256)).eval()


def test_floor_is_the_largest_single_op_working_set():
    model, x = _mlp(), torch.randn(64, 256)
    captured = capture(model, (x,))
    floor = op_floor(analyze(captured), captured.gm.graph)
    # the second linear reads gelu's output (64x1024) and a 1024x256 weight, makes 64x256
    first = 4 * (64 * 256 + 1024 * 256 + 1024 + 64 * 1024)
    second = 4 * (64 * 1024 + 1024 * 256 + 256 + 64 * 256)
    assert floor.bytes == max(first, second)
    assert "aten.linear" in floor.op


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _mlp()

    def forward(self, x):
        return self.mlp(x) + x


def test_the_callers_input_counts_until_its_last_read():
    # the caller holds x: moving it off the device frees nothing, so the floor at the wide
    # second linear includes it (the planner's minimum counts it there too)
    model, x = _Residual().eval(), torch.randn(64, 256)
    captured = capture(model, (x,))
    floor = op_floor(analyze(captured), captured.gm.graph)
    second = 4 * (64 * 1024 + 1024 * 256 + 256 + 64 * 256)
    assert floor.bytes == second + x.nbytes
    assert floor.bytes <= memsched.plan(model, (x,), budget=10**12).min_budget_bytes


def test_infeasible_budget_names_the_binding_step_and_the_floor():
    model, x = _mlp(), torch.randn(64, 256)
    with pytest.raises(memsched.InfeasibleBudgetError) as err:
        memsched.plan(model, (x,), budget=1000, hardware="t4")
    msg = str(err.value)
    assert "the minimum binds at" in msg and "step" in msg and "aten." in msg
    assert "largest there" in msg and "weight" in msg
    assert "the floor" in msg


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt2"])
def test_floor_never_exceeds_the_minimum(name):
    from zoo import build

    model, args, kwargs = build(name)
    plan = memsched.plan(model, args, budget=10**12, example_kwargs=kwargs)
    captured = capture(model, args, kwargs)
    floor = op_floor(analyze(captured), captured.gm.graph)
    assert 0 < floor.bytes <= plan.min_budget_bytes
