import json
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from memsched.cost_models import (
    LINKS,
    PRESETS,
    Hardware,
    estimate_op_time,
    get_hardware,
    is_metadata_only,
    list_hardware,
    local_hardware,
    op_flops_bytes,
    transfer_time,
)
from memsched.cost_models import hardware as hw_mod

NUMERIC = [
    "device_bytes", "peak_flops", "peak_flops_fp32", "mem_bw",
    "h2d_bw", "d2h_bw", "disk_read_bw", "disk_write_bw", "op_overhead_s",
]
# measured on the local profile only (presets leave them 0)
LOCAL_ONLY = ["skinny_flops_fp32", "gemv_flops_fp32", "special_elems_per_s", "runtime_op_s", "runtime_move_s",
              "cpu_cores", "compute_threads"]


def _export(model, *args):
    return torch.export.export(model, args, strict=False).graph


def _nodes(graph, name):
    return [n for n in graph.nodes if n.op == "call_function" and name in str(n.target)]


# ---------------------------------------------------------------- hardware


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_positive(name):
    hw = PRESETS[name]
    assert hw.name == name and hw.device_type == "cuda"
    for f in NUMERIC:
        assert getattr(hw, f) > 0, f
    assert hw.host_bytes > 0 and hw.source
    assert hw.peak_flops > hw.peak_flops_fp32  # tensor cores beat plain fp32
    for link in LINKS:
        assert hw.bandwidth(link) > 0


def test_required_presets_and_list():
    for name in ["t4", "rtx3090", "rtx4090", "a100-40gb", "a100-80gb", "h100", "h200"]:
        assert name in PRESETS
    assert list_hardware() == list(PRESETS.values())


def test_get_hardware_by_name():
    assert get_hardware("H100") is PRESETS["h100"]
    assert get_hardware("A100_80GB") is PRESETS["a100-80gb"]
    assert get_hardware(PRESETS["t4"]) is PRESETS["t4"]


def test_get_hardware_unknown_lists_names():
    with pytest.raises(ValueError) as e:
        get_hardware("tpu-v9")
    for name in PRESETS:
        assert name in str(e.value)


def test_bandwidth_unknown_link():
    with pytest.raises(ValueError, match="h2d"):
        PRESETS["h100"].bandwidth("nvlink")


def test_flops_for_dtypes():
    hw = PRESETS["h100"]
    assert hw.flops_for(torch.bfloat16) == hw.flops_for(torch.float16) == hw.peak_flops
    assert hw.flops_for(torch.float32) == hw.peak_flops_fp32
    assert hw.flops_for(torch.float64) == hw.peak_flops_fp32 / 2


def test_dict_round_trip_and_replace():
    hw = PRESETS["rtx4090"]
    d = json.loads(json.dumps(hw.to_dict()))
    assert Hardware.from_dict(d) == hw
    bigger = hw.replace(host_bytes=1 << 40)
    assert bigger.host_bytes == 1 << 40 and hw.host_bytes != 1 << 40


def test_local_hardware_measures_once_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSCHED_CACHE_DIR", str(tmp_path))
    hw = local_hardware("cpu")
    assert hw.device_type == "cpu" and hw.host_bytes == 0
    for f in NUMERIC + LOCAL_ONLY:
        assert getattr(hw, f) > 0, f
    assert hw_mod._cache_path("cpu").exists()

    def boom(device):
        raise AssertionError("re-measured despite cache")

    monkeypatch.setattr(hw_mod, "_calibrate", boom)
    assert local_hardware("cpu") == hw
    assert get_hardware(None) == hw and get_hardware("local") == hw


def test_local_hardware_measures_the_page_cache_path_and_remeasures_older_profiles(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSCHED_CACHE_DIR", str(tmp_path))
    older = PRESETS["t4"].replace(name="local:cpu", device_type="cpu", host_bytes=0).to_dict()
    del older["disk_cached_read_bw"]   # a profile an older memsched measured
    hw_mod._cache_path("cpu").write_text(json.dumps(older))
    hw = local_hardware("cpu")
    assert hw.disk_cached_read_bw > 0 and hw.disk_cached_write_bw > 0   # measured again


def test_a_cpu_profile_is_kept_per_thread_count(tmp_path, monkeypatch):
    """Compute rates scale with the threads torch runs ops on: a profile measured with two
    threads must not price a process that runs one."""
    monkeypatch.setenv("MEMSCHED_CACHE_DIR", str(tmp_path))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hw_mod._cache_path("cpu")
        torch.set_num_threads(2)
        assert hw_mod._cache_path("cpu") != one and "1t" in one.name
    finally:
        torch.set_num_threads(before)
    assert hw_mod._cache_path("cuda").name == f"hardware-cuda.v{hw_mod._PROFILE_VERSION}.json"


def test_skinny_matmuls_are_priced_at_their_measured_rate():
    """A matmul with few output rows (a decode step's linear) runs at the measured skinny rate,
    a large one at the peak, log-linear between; presets (not measured) and half types keep the
    peak."""
    hw = PRESETS["t4"].replace(device_type="cpu", peak_flops_fp32=1e11, skinny_flops_fp32=2.5e10)
    rates = [hw.matmul_flops(r, torch.float32) for r in (1, 32, 64, 128, 511, 512, 4096)]
    assert rates[0] == rates[1] == 2.5e10 and rates[4] < rates[5] == rates[6] == 1e11
    assert rates == sorted(rates)
    assert hw.matmul_flops(8, torch.bfloat16) == hw.peak_flops
    assert PRESETS["t4"].matmul_flops(8, torch.float32) == PRESETS["t4"].peak_flops_fp32

    def priced_rate(graph):
        mm = [n for n in graph.nodes if n.op == "call_function" and ("mm" in str(n.target) or "linear" in str(n.target))][0]
        flops, nbytes = op_flops_bytes(mm)
        assert flops / hw.matmul_flops(1, torch.float32) > nbytes / hw.mem_bw   # compute-bound here
        return flops / (estimate_op_time(mm, hw) - hw.op_overhead_s)

    # a linear runs one GEMM over its leading dims: (32, 1, 1024) has 32 rows, (4, 256, 1024) 1024
    assert priced_rate(_export(nn.Linear(1024, 1024, bias=False), torch.randn(32, 1, 1024))) == pytest.approx(2.5e10)
    assert priced_rate(_export(nn.Linear(1024, 1024, bias=False), torch.randn(4, 256, 1024))) == pytest.approx(1e11)

    class Bmm(nn.Module):
        def forward(self, q, k):
            return torch.bmm(q, k)

    # a batched matmul runs one per entry: 64 of (1 x 1024) @ (1024 x 1024) are each one row
    assert priced_rate(_export(Bmm(), torch.randn(64, 1, 1024), torch.randn(64, 1024, 1024))) == pytest.approx(2.5e10)


def test_transcendental_and_normalising_ops_are_priced_at_their_measured_rate():
    """GELU, softmax, LayerNorm (and their backwards) take at least numel / special_elems_per_s
    where the profile measured it (a CPU runs them far below its memory bandwidth); a plain add
    keeps the roofline, and so do profiles that did not measure the rate (presets)."""
    class Ops(nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x) + torch.softmax(x, -1), torch.nn.functional.layer_norm(x, (256,))

    graph = _export(Ops(), torch.randn(64, 256))
    nodes = {str(n.target).split(".")[1]: n for n in graph.nodes if n.op == "call_function"}
    base = PRESETS["t4"].replace(device_type="cpu", peak_flops_fp32=1e11, mem_bw=2e10)
    hw = base.replace(special_elems_per_s=1e8)
    for name in ("gelu", "softmax", "layer_norm"):
        assert estimate_op_time(nodes[name], hw) == pytest.approx(64 * 256 / 1e8 + hw.op_overhead_s), name
        assert estimate_op_time(nodes[name], base) < estimate_op_time(nodes[name], hw) / 10, name
    assert estimate_op_time(nodes["add"], hw) == estimate_op_time(nodes["add"], base)


def test_attention_backward_is_priced_as_its_five_matmuls():
    """An SDPA backward takes (grad_out, q, k, v, ...): it recomputes the scores and makes dV, dP,
    dQ and dK, 2*Lq*Lk*(3D + 2Dv) FLOPs per head, 2.5 times its forward's."""
    from memsched.frontend.joint import capture_joint

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(32))

        def forward(self, x):
            q = x * self.scale
            return F.scaled_dot_product_attention(q, x, x, is_causal=True).sum()

    gm = capture_joint(Attention(), (torch.randn(2, 4, 64, 32),)).gm
    sdpa = [n for n in gm.graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target)]
    forward = next(n for n in sdpa if "backward" not in str(n.target))
    backward = next(n for n in sdpa if "backward" in str(n.target))
    assert op_flops_bytes(forward)[0] == 2.0 * 8 * 64 * 64 * 64
    assert op_flops_bytes(backward)[0] == pytest.approx(2.5 * op_flops_bytes(forward)[0])


def test_one_row_matmuls_and_einsums_are_priced_as_the_gemms_they_run():
    """Below 32 rows the rate falls log-linearly to the measured one-row rate; an einsum is
    priced as its batched matmul: batch, rows and columns read from the equation, FLOPs from
    the contracted letters (a decode step's per-head scores run at the one-row rate)."""
    hw = PRESETS["t4"].replace(device_type="cpu", peak_flops_fp32=1e11, skinny_flops_fp32=2.5e10,
                               gemv_flops_fp32=5e9, mem_bw=1e15)
    rates = [hw.matmul_flops(r, torch.float32) for r in (1, 2, 8, 31, 32, 64)]
    assert rates[0] == pytest.approx(5e9) and rates[4] == pytest.approx(2.5e10) and rates == sorted(rates)
    assert hw.replace(gemv_flops_fp32=0.0).matmul_flops(1, torch.float32) == 2.5e10  # not measured

    class Scores(nn.Module):
        def forward(self, q, k):
            return torch.einsum("bkgqd,bkld->bkgql", q, k)

    q, k = torch.randn(4, 2, 3, 1, 64), torch.randn(4, 2, 160, 64)
    node = _nodes(_export(Scores(), q, k), "einsum")[0]
    flops, _ = op_flops_bytes(node)
    assert flops == 2 * (4 * 2 * 3 * 1 * 160) * 64            # 2 x output x contracted d
    rows = 3                                                   # g x q per (b, k) entry; 160 columns
    assert estimate_op_time(node, hw) - hw.op_overhead_s == pytest.approx(flops / hw.matmul_flops(rows, torch.float32))


def test_disk_is_priced_on_the_page_cache_only_where_the_data_fits():
    hw = PRESETS["t4"].replace(disk_read_bw=1e9, disk_write_bw=3e8, disk_cached_read_bw=2e9,
                               disk_cached_write_bw=5e9)
    cached = hw.page_cached(1 << 30, available=4 << 30)
    assert (cached.bandwidth("disk_read"), cached.bandwidth("disk_write")) == (2e9, 5e9)
    assert "page cache" in cached.source and cached.page_cached(1 << 30, available=4 << 30) is cached
    assert hw.page_cached(3 << 30, available=4 << 30) is hw          # more than half the free RAM
    assert hw.page_cached(1 << 30, available=0) is hw                 # free RAM unknown
    assert PRESETS["t4"].page_cached(1, available=4 << 30) is PRESETS["t4"]   # not measured: presets
    slower = hw.replace(disk_cached_read_bw=5e8)   # never priced below the device's own rate
    assert slower.page_cached(1 << 30, available=4 << 30).bandwidth("disk_read") == 1e9


def test_local_hardware_unwritable_cache(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    monkeypatch.setenv("MEMSCHED_CACHE_DIR", str(blocker / "sub"))
    fake = PRESETS["t4"].replace(name="local:cpu", device_type="cpu", host_bytes=0)
    monkeypatch.setattr(hw_mod, "_calibrate", lambda device: fake)
    assert local_hardware("cpu") == fake  # no crash, just no cache


def test_local_hardware_corrupt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSCHED_CACHE_DIR", str(tmp_path))
    hw_mod._cache_path("cpu").write_text("{not json")
    fake = PRESETS["t4"].replace(name="local:cpu", device_type="cpu", host_bytes=0)
    monkeypatch.setattr(hw_mod, "_calibrate", lambda device: fake)
    assert local_hardware("cpu") == fake
    assert Hardware.from_dict(json.loads(hw_mod._cache_path("cpu").read_text())) == fake


# ---------------------------------------------------------------- op costs


def test_linear_flops_on_exported_graph():
    B = 4
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    graph = _export(model, torch.randn(B, 32))
    linears = _nodes(graph, "linear")
    assert len(linears) == 2
    flops, nbytes = op_flops_bytes(linears[0])
    assert flops == 2 * B * 32 * 64
    # input + weight + bias + output, fp32
    assert nbytes == 4 * (B * 32 + 64 * 32 + 64 + B * 64)
    assert op_flops_bytes(linears[1])[0] == 2 * B * 64 * 8
    relu = _nodes(graph, "relu")[0]
    assert op_flops_bytes(relu) == (B * 64, 4 * 2 * B * 64)
    for n in graph.nodes:
        if n.op != "call_function":
            assert op_flops_bytes(n) == (0, 0) and estimate_op_time(n, PRESETS["t4"]) == 0


def test_sdpa_flops():
    B, H, L, S, D = 2, 3, 16, 24, 8

    class Attn(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

    q = torch.randn(B, H, L, D)
    k = torch.randn(B, H, S, D)
    graph = _export(Attn(), q, k, torch.randn(B, H, S, D))
    (node,) = _nodes(graph, "scaled_dot_product")
    assert op_flops_bytes(node)[0] == 4 * B * H * L * S * D


def test_conv_and_matmul_flops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 8, 3, groups=2)

        def forward(self, img, a, b):
            return self.conv(img), torch.bmm(a, b), a @ b

    graph = _export(M(), torch.randn(1, 4, 10, 10), torch.randn(5, 6, 7), torch.randn(5, 7, 9))
    (conv,) = _nodes(graph, "conv")
    assert op_flops_bytes(conv)[0] == 2 * (1 * 8 * 8 * 8) * (4 // 2) * 3 * 3
    for node in _nodes(graph, "bmm") + _nodes(graph, "matmul"):
        assert op_flops_bytes(node)[0] == 2 * 5 * 6 * 9 * 7


def test_views_and_asserts_are_free():
    class M(nn.Module):
        def forward(self, x):
            y = x.view(4, 8).transpose(0, 1).unsqueeze(0)
            a, b = y.split(4, dim=1)
            same = x.to(torch.float32)  # no-op .to(): aliases x
            return a.permute(0, 2, 1), b * 2, same * 3, y.reshape(32), x.to(torch.float64)

    graph = _export(M(), torch.randn(32))
    hw = PRESETS["h100"]
    by_name = {n.name: n for n in graph.nodes}
    views = [n for n in graph.nodes if is_metadata_only(n)]
    names = {str(n.target) for n in views}
    assert {"aten.view.default", "aten.transpose.int", "aten.split.Tensor"} <= names
    assert any(n.target is operator.getitem for n in views)
    assert is_metadata_only(by_name["to"])  # same dtype: an alias
    assert not is_metadata_only(by_name["to_1"])  # fp32 -> fp64 copies
    assert not is_metadata_only(by_name["reshape"])  # of a transposed tensor: copies
    assert op_flops_bytes(by_name["to_1"])[1] == 32 * 4 + 32 * 8
    for n in views:
        assert op_flops_bytes(n) == (0, 0)
        assert 0 < estimate_op_time(n, hw) < hw.op_overhead_s
    asserts = _nodes(graph, "_assert_tensor_metadata")
    assert asserts
    for n in asserts:
        assert op_flops_bytes(n) == (0, 0) and estimate_op_time(n, hw) == 0


def test_eval_dropout_is_an_alias():
    for train, alias in ((False, True), (True, False)):
        model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)).train(train)
        (node,) = _nodes(_export(model, torch.randn(2, 4)), "dropout")
        assert is_metadata_only(node) is alias
        assert (op_flops_bytes(node) == (0, 0)) is alias


def test_estimate_op_time_monotone():
    class MM(nn.Module):
        def forward(self, a, b):
            return a @ b

    hw = PRESETS["a100-80gb"]
    times = []
    for n in (16, 64, 256):
        graph = _export(MM(), torch.randn(n, n), torch.randn(n, n))
        (node,) = [x for x in graph.nodes if x.op == "call_function"]
        times.append(estimate_op_time(node, hw))
    assert times[0] > 0
    assert times[0] < times[1] < times[2]
    # 256^3 fp32 matmul: compute-bound on the fp32 peak
    assert times[2] == pytest.approx(2 * 256**3 / hw.peak_flops_fp32 + hw.op_overhead_s)


def test_transfer_time():
    hw = PRESETS["h100"]
    assert transfer_time(35 * 10**9, "h2d", hw) == pytest.approx(1.0)
    assert transfer_time(0, "disk_read", hw) == 0
    with pytest.raises(ValueError):
        transfer_time(1, "pcie", hw)


def test_overlap_measure_unions_and_intersects_intervals():
    """runtime/overlap.py's interval arithmetic (its profiler half needs a GPU: test_cuda.py)."""
    from memsched.runtime.overlap import covered, length, merged

    assert merged([(5, 7), (0, 2), (1, 3), (7, 8)]) == [(0, 3), (5, 8)]
    copies, kernels = [(0, 4), (10, 12)], [(1, 2), (3, 11), (20, 30)]
    assert length(copies) == 6
    assert covered(copies, kernels) == 1 + 1 + 1   # (1,2), (3,4), (10,11)
    assert covered(copies, []) == 0 and covered([], kernels) == 0


# ---------------------------------------------------------------- the runtime's own costs


def test_the_simulator_charges_the_runtimes_own_work():
    """Each program line costs ``runtime_op_s`` on the calling thread and each transfer issued
    ``runtime_move_s``: with nothing moved the step is longer by exactly the lines' cost; with
    moves, longer but by no more than everything charged (transfers may hide some of it)."""
    import memsched
    from memsched.cost_models.simulator import simulate
    from memsched.ir.ops import Op, op_of
    from tests.helpers import FIXED_CPU
    from tests.zoo import MLP

    model = MLP().eval()
    x = torch.randn(8, 128)
    costly = FIXED_CPU.replace(runtime_op_s=1e-3, runtime_move_s=1e-2)
    free_plan = memsched.plan(model, (x,), "1GB", hardware=FIXED_CPU)
    lines = [n for n in free_plan.graph.graph.nodes if n.op == "call_function"]
    assert not any(op_of(n) in (Op.PREFETCH, Op.OFFLOAD) for n in lines)
    extra = simulate(free_plan.graph, costly).time_s - simulate(free_plan.graph, FIXED_CPU).time_s
    assert extra == pytest.approx(len(lines) * 1e-3)
    # on a GPU a line's cost hides behind the kernels before it: it shows only above them
    gpu, gpu_costly = FIXED_CPU.replace(device_type="cuda"), costly.replace(device_type="cuda")
    base = simulate(free_plan.graph, gpu).time_s
    assert base < simulate(free_plan.graph, gpu_costly).time_s <= base + len(lines) * 1e-3 + 1e-9

    tight = memsched.plan(model, (x,), free_plan.min_budget_bytes, hardware=FIXED_CPU)
    nodes = [n for n in tight.graph.graph.nodes if n.op == "call_function"]
    moves = sum(op_of(n) in (Op.PREFETCH, Op.OFFLOAD) for n in nodes)
    assert moves > 0
    extra = simulate(tight.graph, costly).time_s - simulate(tight.graph, FIXED_CPU).time_s
    assert 0 < extra <= (len(nodes) - moves) * 1e-3 + moves * 1e-2 + 1e-9


def test_copies_take_compute_cores_on_a_cpu_device_only_when_none_is_spare():
    """On a CPU device a move is a worker thread's copy: with torch's threads on every core the
    links' busy time delays the step; with a core spare it is absorbed up to the step's length;
    GPUs and presets (cores not measured) never pay it."""
    import memsched
    from memsched.cost_models.simulator import simulate
    from tests.helpers import FIXED_CPU
    from tests.zoo import MLP

    model, x = MLP().eval(), torch.randn(8, 128)
    tight = memsched.plan(model, (x,), memsched.plan(model, (x,), "1GB", hardware=FIXED_CPU).min_budget_bytes,
                          hardware=FIXED_CPU)
    base = simulate(tight.graph, FIXED_CPU)
    busy = sum(s.end - s.start for s in base.spans if s.stream != "compute")
    assert busy > 0 and base.contention_s == 0
    full = simulate(tight.graph, FIXED_CPU.replace(cpu_cores=2, compute_threads=2))
    assert full.contention_s == pytest.approx(busy) and full.time_s == pytest.approx(base.time_s + busy)
    spare = simulate(tight.graph, FIXED_CPU.replace(cpu_cores=2, compute_threads=1))
    assert spare.contention_s == pytest.approx(max(busy - base.time_s, 0.0))
    gpu = FIXED_CPU.replace(device_type="cuda")
    assert simulate(tight.graph, gpu.replace(cpu_cores=2, compute_threads=2)).time_s == simulate(tight.graph, gpu).time_s
