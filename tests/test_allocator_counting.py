"""Device bytes counted as CUDA's caching allocator counts them, planned on this CPU machine.

``torch.cuda.max_memory_allocated`` holds more than a program's tensors: cuBLAS's workspace
(made at the first matmul on a stream, kept) and every allocation rounded up to whole 512-byte
blocks. A plan for a CUDA target counts both (``Hardware.workspace_bytes`` and
``alloc_block_bytes``), so its peak and minimum are the allocator's figure; the verifier and
the runtime's accountant count the same way. The GPU half (the allocator's measured peak
against the budget) is tests/test_cuda.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import memsched
from memsched.cost_models.hardware import CUDA_BLOCK_BYTES, PRESETS, Hardware, cublas_workspace_bytes
from memsched.errors import InfeasibleBudgetError, PlanFileError
from memsched.runtime.accounting import DeviceAccountant
from zoo import build

MiB = 1 << 20


def test_the_workspace_follows_atens_rule_and_its_environment_variable(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert cublas_workspace_bytes(9) == 32 * MiB          # Hopper: 4096 KiB x 8
    assert cublas_workspace_bytes(8) == 8 * MiB + 128 * 1024   # before: 4096 KiB x 2 + 16 KiB x 8
    assert cublas_workspace_bytes(None) == 32 * MiB       # unknown: the larger
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:2:16:8")
    assert cublas_workspace_bytes(9) == 8 * MiB + 128 * 1024
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")   # the deterministic-algorithms setting
    assert cublas_workspace_bytes(9) == 128 * 1024


def test_cuda_profiles_count_blocks_and_a_workspace_and_cpu_ones_count_exact_bytes():
    assert PRESETS["h100"].workspace_bytes == PRESETS["h200"].workspace_bytes == 32 * MiB
    assert PRESETS["a100-40gb"].workspace_bytes == PRESETS["t4"].workspace_bytes == 8 * MiB + 128 * 1024
    assert all(hw.alloc_block_bytes == CUDA_BLOCK_BYTES for hw in PRESETS.values())
    cpu = memsched.get_hardware("local")
    assert (cpu.alloc_block_bytes, cpu.workspace_bytes) == (1, 0)
    made = Hardware("mine", "cuda", 1 << 30, 0, 1e12, 1e12, 1e11, 1e10, 1e10, 1e9, 1e9, 1e-6)
    assert made.alloc_block_bytes == CUDA_BLOCK_BYTES and made.workspace_bytes > 0
    assert made.replace(workspace_bytes=0).workspace_bytes == 0
    with pytest.raises(ValueError, match="alloc_block_bytes"):
        made.replace(alloc_block_bytes=0)


class Tiny(nn.Module):
    """Tensors of 60, 20, 48 and 80 bytes: each one 512-byte block on CUDA."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 5)

    def forward(self, x):
        return self.fc(x)


def _peak(hw: Hardware) -> int:
    plan = memsched.plan(Tiny().eval(), (torch.randn(4, 3),), budget=10**9, hardware=hw)
    return plan.unconstrained.peak_device_bytes


def test_each_storage_takes_whole_blocks_and_the_workspace_is_held_throughout():
    gpu = PRESETS["a100-40gb"]
    exact = gpu.replace(alloc_block_bytes=1, workspace_bytes=0)
    assert _peak(exact) == 60 + 20 + 48 + 80
    assert _peak(gpu.replace(workspace_bytes=0)) == 4 * CUDA_BLOCK_BYTES
    assert _peak(gpu) == 4 * CUDA_BLOCK_BYTES + gpu.workspace_bytes


@pytest.mark.parametrize("train", [False, True])
def test_a_gpu_plans_minimum_and_peak_leave_room_for_the_workspace(train):
    model, args, kwargs = build("gpt2")
    model.train(train).requires_grad_(train)
    gpu = PRESETS["h100"]
    without = gpu.replace(workspace_bytes=0)

    def plan(budget, hw):
        return memsched.plan(model, args, budget=budget, example_kwargs=kwargs, hardware=hw, train=train)

    free = plan(10**12, gpu)
    assert free.min_budget_bytes == plan(10**12, without).min_budget_bytes + gpu.workspace_bytes
    tight = plan(free.min_budget_bytes, gpu)
    assert gpu.workspace_bytes < tight.peak_device_bytes <= tight.budget_bytes
    # the independent verifier counts as the allocator does when given the hardware
    assert tight.verify() == memsched.verify_schedule(tight.graph, tight.budget_bytes, gpu) <= tight.budget_bytes
    exact = memsched.verify_schedule(tight.graph, tight.budget_bytes)
    assert exact <= tight.verify() - gpu.workspace_bytes    # blocks round up: never fewer bytes
    with pytest.raises(memsched.PlanError, match="over the budget"):
        memsched.verify_schedule(tight.graph, tight.verify() - 1, gpu)


def test_a_budget_the_workspace_alone_fills_is_refused_before_anything_runs():
    model, args, kwargs = build("gpt2")
    gpu = PRESETS["h100"]
    with pytest.raises(InfeasibleBudgetError) as e:
        memsched.plan(model, args, budget=gpu.workspace_bytes, example_kwargs=kwargs, hardware=gpu)
    assert e.value.min_budget_bytes > gpu.workspace_bytes


def test_the_accountant_counts_blocks_and_the_workspace():
    acct = DeviceAccountant(budget=3000, block=512, workspace=1000)
    assert acct.current == acct.peak == 1000
    x = torch.empty(25)                     # 100 bytes: one block
    acct.track(x)
    assert acct.current == 1512
    acct.track(x[1:])                       # a view: its storage is already held
    assert acct.current == 1512
    acct.track(torch.empty(200))            # 800 bytes: two blocks, 2536
    assert acct.current == 2536
    with pytest.raises(memsched.BudgetExceededError):
        acct.track(torch.empty(25))         # one more block: 3048 > 3000


def test_saved_gpu_plans_keep_their_counting_and_refuse_a_bad_one(tmp_path):
    model, args, kwargs = build("gpt2")
    gpu = PRESETS["a100-40gb"].replace(workspace_bytes=3 * MiB)
    plan = memsched.plan(model, args, budget=10**12, example_kwargs=kwargs, hardware=gpu)
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = memsched.Plan.load(path)
    assert (loaded.hardware.alloc_block_bytes, loaded.hardware.workspace_bytes) == (CUDA_BLOCK_BYTES, 3 * MiB)
    assert loaded.verify() == plan.verify()
    text = path.read_text().replace('"alloc_block_bytes": 512', '"alloc_block_bytes": 0')
    path.write_text(text)
    with pytest.raises(PlanFileError, match="alloc_block_bytes"):
        memsched.Plan.load(path)


class _FakeCuda:
    """The torch.cuda calls AllocatorLimit makes, on a pretend GPU of 10^9 bytes."""

    def __init__(self, monkeypatch, allocated: int, fraction: float = 1.0):
        self.fraction, self.set = fraction, []
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: type("P", (), {"total_memory": 10**9}))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d: allocated)
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d: self.fraction)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", self._set)

    def _set(self, fraction, device):
        self.fraction = fraction
        self.set.append(fraction)


def test_the_hard_limit_bounds_the_allocator_for_one_call_and_restores_it(monkeypatch):
    from memsched.runtime.allocator_limit import SEGMENT_MARGIN, AllocatorLimit

    cuda = _FakeCuda(monkeypatch, allocated=300 << 20, fraction=0.9)
    # memsched holds 100 MiB of the 300 allocated: 200 MiB are someone else's
    with AllocatorLimit(torch.device("cuda", 0), 50 << 20, held=100 << 20) as limit:
        assert limit.limit == (200 << 20) + (50 << 20) + SEGMENT_MARGIN
        assert cuda.fraction == limit.limit / 10**9
    assert cuda.fraction == 0.9     # the user's own fraction is back
    with pytest.raises(memsched.BudgetExceededError, match="hard limit"):
        with AllocatorLimit(torch.device("cuda", 0), 50 << 20, held=100 << 20):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert cuda.fraction == 0.9
    cuda.fraction = 0.01            # a lower fraction the user set is never raised
    with AllocatorLimit(torch.device("cuda", 0), 50 << 20, held=100 << 20):
        assert cuda.fraction == 0.01


def test_hard_limit_is_an_option_of_compile_and_a_no_op_off_cuda():
    model = Tiny().eval()
    x = torch.randn(4, 3)
    cm = memsched.compile(model, "1MB", hard_limit=True)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=0, atol=0)
    assert cm.hard_limit and not any(e[2].hard_limit for e in cm._compiled.values())


def test_run_stats_print_the_allocators_peak_beside_memscheds_own():
    from memsched.runtime.executor import RunStats

    assert "allocator" not in str(RunStats(peak_device_bytes=1000))
    shown = str(RunStats(peak_device_bytes=1000, cuda_max_memory_allocated=5 * MiB))
    assert "peak device 1000 B (allocator's peak 5.0 MiB, the whole process)" in shown, shown


def test_the_memory_view_of_a_gpu_plan_shows_the_workspace_under_the_simulators_line(tmp_path):
    from memsched.inspect.memory import memory_by_kind

    model, args, kwargs = build("gpt2")
    gpu = PRESETS["t4"]
    plan = memsched.plan(model, args, budget=gpu.workspace_bytes + 10**6, example_kwargs=kwargs, hardware=gpu)
    rows = memory_by_kind(plan)
    assert [r.total for r in rows] == [b for _, b in plan.sim.timeline]
    assert all(r.by_category["workspace"] == gpu.workspace_bytes for r in rows)
    fig = plan.plot_memory(tmp_path / "memory.png")
    assert "workspace" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
