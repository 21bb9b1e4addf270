"""Fused regions' measured times outlive the process (cost_models/region_measures.py):
saved beside the hardware profile, read back by a later process, whose plans are then priced by
them; a damaged file is ignored."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from memsched.cost_models import region_measures as rm

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSCHED_CACHE_DIR", str(tmp_path))
    rm.forget()
    yield tmp_path
    rm.forget()


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
    from memsched.cost_models.region_measures import measured_time
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
