#!/usr/bin/env python
"""Disk streaming: a GPT-2 decoder whose weights do not fit the budget, streamed from disk.

The model (default n_layer=6, n_embd=1024, n_head=16, vocab 16000: ~92 M params, ~369 MB
fp32) is run on the CPU three ways, in one process, on the same inputs (default 1 x 128):

  (a) eager     the model in RAM, torch.no_grad: the reference speed (no budget);
  (b) memsched  memsched.compile(model, budget, device="cpu", offload_dir=<tmp>/memsched) with
                budget = 25% of the weight bytes: the planner homes most weights on disk and
                prefetches them ahead of use (on a CPU device host RAM *is* the device tier);
  (c) accelerate  accelerate.disk_offload(deepcopy(model), offload_dir=<tmp>/accelerate,
                execution_device=cpu, offload_buffers=True): every weight is memory-mapped from
                disk and loaded by a hook right before its module runs (no budget, no overlap).

Reported per forward: median wall time, tokens/s (batch*seq / time), ratios, memsched's
measured peak device bytes against the budget, logical bytes read from disk per call
(memsched: stats.bytes_moved["disk_read"]; accelerate: the size of its offloaded files, all
of which are loaded each call) and physical reads (/proc/self/io read_bytes: what missed
the page cache). Outputs of (b) and (c) are checked against (a) with torch.allclose.

The OS page cache: after the first call both offload files sit in RAM, so "warm" reps read
from the page cache (a memcpy, not the disk). With --cold (on by default in the full run) a
second set of reps drops the files' cached pages before each call (fsync +
posix_fadvise(DONTNEED)) for a colder measurement; eager RAM runs are interleaved too as a
noise reference. The physical-reads column shows whether the drop took effect (on some VMs
the host caches the disk image anyway).

    python benchmarks/disk_streaming.py            # full run (~3-4 min)
    python benchmarks/disk_streaming.py --quick    # short run, small model
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import shutil
import tempfile
import time

import _common
from _common import build_gpt2, fmt_bytes, median, proc_io, table

import torch

import memsched


def build_model(n_layer, n_embd, n_head, vocab, seq):
    return build_gpt2(n_layer, n_embd, n_head, vocab, seq, train=False)


def weight_bytes(model) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small model (4 layers, n_embd 512, vocab 2000; ~55 MB), 3 warm reps, 2 cold reps")
    ap.add_argument("--layers", type=int, default=None, help="n_layer (default 6, quick 4)")
    ap.add_argument("--embd", type=int, default=None, help="n_embd (default 1024, quick 512)")
    ap.add_argument("--heads", type=int, default=None, help="n_head (default 16, quick 8)")
    ap.add_argument("--vocab", type=int, default=None, help="vocab size (default 16000, quick 2000)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--fraction", type=float, default=0.25, help="budget as a fraction of the weight bytes")
    ap.add_argument("--reps", type=int, default=None, help="warm reps of each (default 10, quick 3)")
    ap.add_argument("--cold-reps", type=int, default=None,
                    help="reps with the offload files dropped from the page cache before each call "
                         "(default 5, quick 2; 0 disables)")
    ap.add_argument("--offload-root", default=None,
                    help="directory for both offload dirs (default: a fresh dir under the system temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    a = ap.parse_args()
    _common.quiet()
    _common.set_threads(a.threads)

    n_layer = a.layers or (4 if a.quick else 6)
    n_embd = a.embd or (512 if a.quick else 1024)
    n_head = a.heads or (8 if a.quick else 16)
    vocab = a.vocab or (2000 if a.quick else 16000)
    reps = a.reps or (3 if a.quick else 10)
    cold_reps = a.cold_reps if a.cold_reps is not None else (2 if a.quick else 5)
    tokens = a.batch * a.seq

    model = build_model(n_layer, n_embd, n_head, vocab, a.seq)
    wbytes = weight_bytes(model)
    budget = int(wbytes * a.fraction)
    g = torch.Generator().manual_seed(1)
    kwargs = {"input_ids": torch.randint(0, vocab, (a.batch, a.seq), generator=g)}
    root = tempfile.mkdtemp(prefix="memsched-bench-", dir=a.offload_root)
    print(f"memsched {memsched.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{_common.loadavg()} at start")
    print(f"GPT-2 n_layer={n_layer} n_embd={n_embd} n_head={n_head} vocab={vocab}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, weights {fmt_bytes(wbytes)} "
          f"({wbytes / 1e6:.0f} MB); input {a.batch}x{a.seq}; budget {fmt_bytes(budget)} "
          f"({a.fraction:.0%} of weights); offload root {root}")

    try:
        # (a) eager reference
        def eager():
            with torch.no_grad():
                return model(**kwargs)

        with _common.timer() as t:
            ref = logits(eager())
        print(f"  eager first call {t['s']:.2f} s", flush=True)

        # (b) memsched
        ms_dir = os.path.join(root, "memsched")
        with _common.timer() as t:
            cm = memsched.compile(model, budget, device="cpu", offload_dir=ms_dir)
            try:
                out_ms = logits(cm(**kwargs))
            except memsched.InfeasibleBudgetError as exc:
                print(f"  budget {fmt_bytes(budget)} is below memsched's minimum for this model, "
                      f"{fmt_bytes(exc.min_budget_bytes)}: using the minimum ({exc.min_budget_bytes / wbytes:.0%} "
                      "of weights)")
                budget = exc.min_budget_bytes
                cm = memsched.compile(model, budget, device="cpu", offload_dir=ms_dir)
                out_ms = logits(cm(**kwargs))
        ms_setup = t["s"]
        plan = cm.plan
        tiers = plan.tier_bytes()
        print(f"  memsched first call (plan + write disk-homed weights + run) {ms_setup:.2f} s; "
              f"weights device/host/disk {fmt_bytes(tiers['device'])}/{fmt_bytes(tiers['host'])}/"
              f"{fmt_bytes(tiers['disk'])}; solver {plan.placement.status}; predicted "
              f"{plan.predicted_time_s * 1e3:.0f} ms vs unconstrained {plan.unconstrained.time_s * 1e3:.0f} ms",
              flush=True)
        # memsched's offload file is unnamed (reclaimed by the kernel on any exit): reach it
        # through this process's descriptor to drop it from the page cache
        ms_files = [cm._stores.disk.proc_path] if cm._stores.has_disk else []

        # (c) accelerate
        import accelerate

        acc_dir = os.path.join(root, "accelerate")
        with _common.timer() as t:
            acc_model = copy.deepcopy(model)
            accelerate.disk_offload(acc_model, offload_dir=acc_dir, execution_device=torch.device("cpu"),
                                    offload_buffers=True)
            with torch.no_grad():
                out_acc = logits(acc_model(**kwargs))
        acc_setup = t["s"]
        acc_files = glob.glob(os.path.join(acc_dir, "*.dat"))
        acc_bytes = sum(os.path.getsize(f) for f in acc_files)
        print(f"  accelerate {accelerate.__version__} setup (deepcopy + disk_offload + first call) "
              f"{acc_setup:.2f} s; {len(acc_files)} files, {fmt_bytes(acc_bytes)}", flush=True)

        def run_acc():
            with torch.no_grad():
                return acc_model(**kwargs)

        checks = []
        for label, out in (("memsched", out_ms), ("accelerate", out_acc)):
            ok = torch.allclose(out, ref, rtol=1e-4, atol=1e-5)
            checks.append((label, ok, (out - ref).abs().max().item()))

        runners = {"eager": eager, "memsched": lambda: cm(**kwargs), "accelerate": run_acc}

        def measure(n, cold):
            times = {k: [] for k in runners}
            phys = {k: [] for k in runners}
            extra = {"peak": [], "disk_read": [], "stall": []}
            names = list(runners)
            for i in range(n):
                order = names[i % 3:] + names[:i % 3]
                for k in order:
                    if cold:
                        _common.drop_file_cache(ms_files + acc_files)
                    io0 = proc_io().get("read_bytes", 0)
                    t0 = time.perf_counter()
                    runners[k]()
                    times[k].append(time.perf_counter() - t0)
                    phys[k].append(proc_io().get("read_bytes", 0) - io0)
                    if k == "memsched":
                        st = cm.stats
                        extra["peak"].append(st.peak_device_bytes)
                        extra["disk_read"].append(st.bytes_moved.get("disk_read", 0))
                        extra["stall"].append(st.stall_s)
            return times, phys, extra

        runs = []
        for _ in range(1):  # one untimed warm-up round of each
            for f in runners.values():
                f()
        print(f"  timing {reps} warm reps ...", flush=True)
        runs.append(("warm (page cache)", *measure(reps, cold=False)))
        if cold_reps:
            print(f"  timing {cold_reps} cold reps (fadvise DONTNEED before each call) ...", flush=True)
            runs.append(("cold (fadvise)", *measure(cold_reps, cold=True)))

        rows = []
        for mode, times, phys, extra in runs:
            med = {k: median(v) for k, v in times.items()}
            for k in runners:
                if k == "eager":
                    logical, peak, stall = "0 (in RAM)", "no budget", "-"
                elif k == "memsched":
                    logical = fmt_bytes(median(extra["disk_read"]))
                    peak = f"{fmt_bytes(max(extra['peak']))} ({max(extra['peak']) / budget:.0%})"
                    stall = f"{median(extra['stall']) * 1e3:.0f}"
                else:
                    logical, peak, stall = fmt_bytes(acc_bytes), "n/a", "-"
                rows.append([
                    mode, k, f"{med[k] * 1e3:.0f}", f"{min(times[k]) * 1e3:.0f}", f"{tokens / med[k]:.0f}",
                    f"{med[k] / med['eager']:.2f}x",
                    f"{med['memsched'] / med['accelerate']:.2f}x" if k == "memsched" else "",
                    peak, logical, fmt_bytes(median(phys[k])), stall,
                ])
        print()
        print(table(["mode", "runner", "median ms", "min ms", "tokens/s", "vs eager", "memsched/accel",
                     "peak device (of budget)", "disk read/call", "physical read/call", "stall ms"], rows,
                    title=f"Disk streaming: GPT-2 {fmt_bytes(wbytes)} of weights, budget {fmt_bytes(budget)}, "
                          f"input {a.batch}x{a.seq} (per forward)"))
        print("Outputs vs eager: " + "; ".join(
            f"{k} {'allclose' if ok else 'MISMATCH'} (max |diff| {d:.2e})" for k, ok, d in checks))
        print(f"Setup: memsched first call {ms_setup:.2f} s (plan + weights to disk + run); accelerate "
              f"{acc_setup:.2f} s (deepcopy + offload_state_dict + first call).")
        print("Page cache: warm reps read the offload files from RAM (page cache), for both memsched "
              "and accelerate, so they measure the runtime's own cost, not the disk. Cold reps drop "
              "the files' pages first; 'physical read/call' (/proc/self/io read_bytes) shows how much "
              "really came from storage. accelerate's 'disk read/call' is the size of all its offloaded "
              "files (each weight is loaded on every call; a tied weight is stored twice).")
        print(f"Threads: torch uses {torch.get_num_threads()} intra-op threads; memsched's transfer workers are "
              "extra threads on the same cores (accelerate loads weights on the calling thread), so on a "
              "small CPU compare with --threads 1 (or cores-1).")
        print(f"{_common.loadavg()} at end.")
        cm.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
