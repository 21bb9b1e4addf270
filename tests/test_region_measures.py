"""Fused regions' measured times and the offload file's rates outlive the process
(cost_models/measures.py): saved beside the hardware profile, read back by a later process,
whose plans are then priced by them; a damaged file is ignored."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from memsched.cost_models import measures as rm
from memsched.runtime.op_timing import TIMED_CALLS

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture
def cache(measures_cache):
    return measures_cache


def test_measures_are_saved_and_read_back(cache):
    for s in (3.0, 1.0, 2.0):
        rm.record_time("abc", s)
    rm.save()
    rm.forget()
    assert rm.measured_time("abc") == 2.0
    assert rm.measured_time("other") is None


def test_only_the_last_samples_price_a_region(cache):
    for s in [100.0] * rm.SAMPLES + [1.0] * rm.SAMPLES:
        rm.record_time("k", s)
    assert rm.measured_time("k") == 1.0


def test_a_time_no_call_could_take_is_not_recorded(cache):
    for bad in (float("nan"), float("inf"), -1.0):
        rm.record_time("k", bad)
    assert rm.measured_time("k") is None
    rm.record_time("k", 2.0)
    rm.record_time("k", float("nan"))
    assert rm.measured_time("k") == 2.0


def test_a_measure_belongs_to_the_thread_count_it_ran_on(cache):
    threads = torch.get_num_threads()
    rm.record_time("k", 1.0)
    try:
        torch.set_num_threads(threads + 1)
        assert rm.measured_time("k") is None
    finally:
        torch.set_num_threads(threads)
    assert rm.measured_time("k") == 1.0


def test_saving_merges_with_what_another_process_wrote(cache):
    rm.record_time("mine", 1.0)
    rm.save()
    other = json.loads(rm.cache_path().read_text())
    other["times"]["theirs/1t"] = [5.0]
    rm.cache_path().write_text(json.dumps(other))
    rm.record_time("mine", 1.0)
    rm.save()
    saved = json.loads(rm.cache_path().read_text())["times"]
    assert "theirs/1t" in saved and any(k.startswith("mine/") for k in saved)


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"times": {"k/1t": ["x"]}}', '{"times": 3}',
                                  '{"times": {"k/1t": [-1.0]}}', '{"times": {"k/1t": [NaN]}}',
                                  '{"times": {"k/1t": [true]}}', '{"times": {"k/1t": []}}'])
def test_a_damaged_cache_file_is_ignored(cache, text):
    rm.cache_path().parent.mkdir(parents=True, exist_ok=True)
    rm.cache_path().write_text(text.replace("k/1t", f"k/{torch.get_num_threads()}t"))   # this process's entry
    assert rm.measured_time("k") is None
    rm.record_time("k", 1.0)
    rm.save()   # and replaced by a good one
    rm.forget()
    assert rm.measured_time("k") == 1.0


def test_an_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("MEMSCHED_CACHE_DIR", str(blocker / "sub"))
    rm.forget()
    rm.record_time("k", 1.0)
    rm.save()
    assert rm.measured_time("k") == 1.0
    rm.forget()


_RUN = textwrap.dedent("""
    import sys, warnings, torch
    sys.path.insert(0, "tests")
    import memsched
    from memsched.ir.ops import Op, op_of
    from memsched.ir.regions import region_of
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.LayerNorm(16))
                                  for _ in range(2)]).eval()
    x = torch.randn(4, 16)
    cm = memsched.compile(model, "1GB", device="cpu", example_inputs=(x,), fuse=True)
    regions = [region_of(n) for n in cm.plan.graph.graph.nodes if op_of(n) is Op.REGION]
    from memsched.cost_models.measures import measured_time
    print("KNOWN", all(measured_time(r.key) is not None for r in regions))
    print("PREDICTED", cm.plan.predicted_time_s)
    with torch.no_grad():
        for _ in range(3):
            cm(x)
    print("REPREDICTED", cm.plan.predict().time_s)
""")


def test_a_later_process_plans_with_the_measured_times(tmp_path):
    """The first process plans on the roofline and runs its regions; the second plans the same
    model with their measured times, so its prediction is the first one's re-prediction."""
    env = dict(os.environ, MEMSCHED_CACHE_DIR=str(tmp_path), PYTHONPATH=ROOT)

    def run():
        out = subprocess.run([sys.executable, "-c", _RUN], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return {line.split()[0]: line.split()[1] for line in out.stdout.splitlines() if line.split()}

    first, second = run(), run()
    assert first["KNOWN"] == "False" and second["KNOWN"] == "True"
    assert float(second["PREDICTED"]) != float(first["PREDICTED"])
    assert list(tmp_path.glob("regions-cpu-*.json"))


# -- the offload file's rates, as steps ran ----------------------------------------------------
def test_a_local_profile_prices_the_page_cache_at_the_rates_steps_ran(cache):
    """Recorded rates replace the probe's on the page-cache path of this machine's profile; a
    preset, or a plan too large to stay cached, is priced as before."""
    from memsched.cost_models.hardware import PRESETS

    local = PRESETS["t4"].replace(name="local:cpu", device_type="cpu", host_bytes=0, disk_read_bw=1e9,
                                  disk_write_bw=3e8, disk_cached_read_bw=7e9, disk_cached_write_bw=6e9)
    assert local.page_cached(1 << 20, available=4 << 30).bandwidth("disk_read") == 7e9   # nothing recorded
    for seconds in (0.5, 0.25, 0.5):   # 1 GiB read in 0.5 s: 2 GiB/s
        rm.record_rate("cpu", "disk_read", 1 << 30, seconds)
    rm.record_rate("cpu", "disk_write", 1 << 10, 1.0)   # too few bytes to tell a rate: ignored
    cached = local.page_cached(1 << 20, available=4 << 30)
    assert cached.bandwidth("disk_read") == 2 * (1 << 30) and cached.bandwidth("disk_write") == 6e9
    assert "as steps ran" in cached.source
    assert local.page_cached(3 << 30, available=4 << 30) is local   # not cached: the device's rates
    preset = local.replace(name="t4")
    assert preset.page_cached(1 << 20, available=4 << 30).bandwidth("disk_read") == 7e9
    rm.record_rate("cpu", "disk_read", 1 << 30, float("nan"))   # never a price
    assert rm.measured_rate("cpu", "disk_read") == 2 * (1 << 30)
    for _ in range(rm.SAMPLES):   # a file read at a petabyte a second: not believed
        rm.record_rate("cpu", "disk_write", 1 << 30, 1e-6)
    assert rm.measured_rate("cpu", "disk_write") is None


def test_a_training_step_records_the_rates_of_its_disk_moves(cache, tmp_path):
    """After the first call (it grows the offload file) and the calls whose ops are timed
    (runtime/op_timing.py), each call that moved enough through the offload file records the
    rate the worker ran at."""
    import warnings

    import memsched
    from helpers import FIXED_CPU

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Tanh()) for _ in range(8)])
    x = torch.randn(1024, 512)
    budget = memsched.plan(model, (x,), 10**12, train=True, hardware=FIXED_CPU).min_budget_bytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, budget, example_inputs=(x,), train=True, device="cpu", hardware=FIXED_CPU,
                              offload_dir=tmp_path)
    try:
        for _ in range(1 + len(TIMED_CALLS)):
            cm(x).sum().backward()
            assert cm.stats.bytes_moved.get("disk_write", 0) >= rm.MIN_RATE_BYTES
            assert rm.measured_rate("cpu", "disk_write") is None
        cm(x).sum().backward()
        assert rm.measured_rate("cpu", "disk_write") > 0 and rm.measured_rate("cpu", "disk_read") > 0
    finally:
        cm.close()
