#!/usr/bin/env python
"""Planning time: how long ``memsched.plan`` takes, pass by pass.

* every model of the test zoo (tests/zoo.py), planned at 50% of its own unconstrained peak
  (if that is below the planner's minimum budget, the minimum budget is used and marked *);
* a LLaMA-2-7B-sized decoder (hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab
  32000, fp16, use_cache=False) built on the meta device (no weights are allocated) with
  input_ids (1, 512) on meta, planned for a100-40gb at 8GB and 16GB and for t4 at 8GB;
* first, the planning-time targets: LLaMA-shaped fp32 decoders, batch 1 x 2048, on meta —
  7B inference at 8GB on a100-40gb (<= 5 s), a 7B training step at 24GB on a100-40gb
  (<= 15 s), 70B (80 layers, hidden 8192, 8 kv heads) inference at 40GB on a100-80gb
  (<= 15 s) — each with its passes' seconds and shares of the wall time.

For each plan it prints the wall time of memsched.plan, the seconds of each recorded pass
(plan.passes: capture, analysis, segments, placement, schedule, simulate; "other" is the
rest of the wall time, mostly the unconstrained reference plan), the solver status, and the
predicted time against the unconstrained prediction.

    python benchmarks/planning_time.py            # full run (a few minutes)
    python benchmarks/planning_time.py --quick    # short run
    python benchmarks/planning_time.py --time-limit 30   # solver time limit (time_limit_s)
"""
from __future__ import annotations

import argparse
import time

import _common
from _common import fmt_bytes, median, table

import torch

import memsched

PASS_NAMES = ["capture", "analysis", "segments", "placement", "schedule", "simulate"]
LLAMA7B_CASES = [("a100-40gb", "8GB"), ("a100-40gb", "16GB"), ("t4", "8GB")]


def build_llama7b_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        use_cache=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    input_ids = torch.zeros(1, 512, dtype=torch.long, device="meta")
    return model, (), {"input_ids": input_ids}


# The targets: (name, layers, hidden, intermediate, heads, kv heads, train, hardware, budget,
# seconds). fp32, batch 1 x 2048, on the meta device; wall time of memsched.plan, capture included.
TARGETS = [
    ("7B inference", 32, 4096, 11008, 32, 32, False, "a100-40gb", "8GB", 5.0),
    ("7B training", 32, 4096, 11008, 32, 32, True, "a100-40gb", "24GB", 15.0),
    ("70B inference", 80, 8192, 28672, 64, 8, False, "a100-80gb", "40GB", 15.0),
]


def build_llama_fp32_meta(layers, hidden, intermediate, heads, kv_heads, train, seq=2048):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=4096, use_cache=False, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).train(train)
    ids = torch.zeros(1, seq, dtype=torch.long, device="meta")
    return model, {"input_ids": ids, "labels": ids} if train else {"input_ids": ids}


def run_targets(options, quick: bool) -> None:
    """Each target planned once; per pass its seconds and share of the wall time."""
    rows = []
    for name, layers, hidden, inter, heads, kv, train, hw, budget, limit in TARGETS[:1] if quick else TARGETS:
        model, kwargs = build_llama_fp32_meta(layers, hidden, inter, heads, kv, train)
        t0 = time.perf_counter()
        plan = memsched.plan(model, (), budget=budget, hardware=hw, example_kwargs=kwargs, train=train, **options)
        wall = time.perf_counter() - t0
        per = pass_seconds(plan)
        shares = " ".join(f"{n} {per.get(n, 0.0):.2f} ({per.get(n, 0.0) / wall:.0%})" for n in PASS_NAMES)
        capture_note = next((r.note for r in plan.passes if r.name == "capture"), "")
        rows.append([name, f"{hw} {budget}", f"{wall:.2f}", f"<= {limit:g}", "met" if wall <= limit else "MISSED",
                     shares, plan.placement.status,
                     f"{plan.predicted_time_s / plan.unconstrained.time_s:.2f}x", capture_note])
        print(f"  {name}: {wall:.2f} s", flush=True)
    print()
    print(table(["target", "hardware, budget", "wall s", "target s", "", "per pass: seconds (share of wall)",
                 "solver", "pred/unconstr", "capture"], rows,
                title="Planning-time targets (LLaMA-shaped, fp32, 1 x 2048, meta)"))
    print()


def plan_timed(model, args, kwargs, budget, hardware, options):
    t0 = time.perf_counter()
    p = memsched.plan(model, args, budget=budget, hardware=hardware, example_kwargs=kwargs, **options)
    return p, time.perf_counter() - t0


def pass_seconds(plan) -> dict:
    out = {}
    for r in plan.passes:
        out[r.name] = out.get(r.name, 0.0) + r.seconds
    return out


def rows_for(name, hw, budget_label, plan, runs):
    """(timing row, result row) for one plan; ``runs`` is [(wall, plan), ...] of repeats,
    timings are medians over them."""
    walls = [w for w, _ in runs]
    per_pass = [pass_seconds(p) for _, p in runs]
    names = PASS_NAMES + sorted({n for d in per_pass for n in d} - set(PASS_NAMES))
    med_pass = {n: median([d.get(n, 0.0) for d in per_pass]) for n in names}
    other = median([w - sum(d.values()) for w, d in zip(walls, per_pass)])
    unc = plan.unconstrained.time_s
    slow = plan.predicted_time_s / unc if unc else float("nan")
    status = plan.placement.status + (f" (gap {plan.placement.mip_gap:.1%})"
                                      if plan.placement.mip_gap is not None else "")
    timing = [name, hw, budget_label, f"{median(walls):.3f}",
              *[f"{med_pass.get(n, 0.0):.3f}" for n in PASS_NAMES], f"{other:.3f}"]
    result = [name, hw, budget_label, status, str(plan.n_segments),
              f"{plan.placement.solve_s:.2f}",
              f"{plan.predicted_time_s * 1e3:.2f}", f"{unc * 1e3:.2f}", f"{slow:.2f}x",
              fmt_bytes(plan.peak_device_bytes), fmt_bytes(plan.unconstrained.peak_device_bytes),
              fmt_bytes(plan.min_budget_bytes)]
    return timing, result


TIMING_HEADERS = ["model", "hardware", "budget", "wall s", *[f"{n} s" for n in PASS_NAMES], "other s"]
RESULT_HEADERS = ["model", "hardware", "budget", "solver", "segs", "solve s", "pred ms", "unconstr ms",
                  "slowdown", "peak", "unconstr peak", "min budget"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="short run: one plan per zoo model, the 7B model only at a100-40gb/16GB, "
                         "solver time limit 2 s unless --time-limit is given")
    ap.add_argument("--models", default=None, help="comma-separated zoo models (default: all)")
    ap.add_argument("--hardware", default="a100-40gb", help="hardware preset for the zoo models")
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="zoo budget as a fraction of the unconstrained peak (default 0.5)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="plans per zoo model, median wall reported (default 3, quick 1)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="solver time limit in seconds, passed as time_limit_s= to memsched.plan "
                         "(default: memsched's own, 10 s)")
    ap.add_argument("--skip-7b", action="store_true", help="skip the LLaMA-2-7B-sized meta model")
    ap.add_argument("--skip-zoo", action="store_true", help="only the LLaMA-2-7B-sized meta model")
    ap.add_argument("--skip-targets", action="store_true",
                    help="skip the planning-time targets (7B inference/training, 70B inference, fp32 1x2048)")
    ap.add_argument("--verbose", action="store_true", help="print each plan's summary()")
    a = ap.parse_args()

    _common.quiet()
    from zoo import ZOO, build

    options = {}
    if a.time_limit is not None:
        options["time_limit_s"] = a.time_limit
    elif a.quick:
        options["time_limit_s"] = 2.0
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 3)
    names = [] if a.skip_zoo else (a.models.split(",") if a.models else list(ZOO))

    print(f"memsched {memsched.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"solver time limit: {options.get('time_limit_s', 'memsched default (10 s)')}")

    # Warm-up: the first torch.export in a process pays for imports and caches.
    m, args, kw = build("mlp")
    with _common.timer() as t:
        memsched.plan(m, args, budget=10**15, hardware=a.hardware, example_kwargs=kw)
    print(f"warm-up plan (mlp, first export in process): {t['s']:.2f} s (not in the table)")

    if not a.skip_targets:
        run_targets(options, a.quick)
    timing_rows, result_rows, notes = [], [], []
    for name in names:
        model, args, kwargs = build(name)
        ref, _ = plan_timed(model, args, kwargs, 10**15, a.hardware, options)
        peak = ref.unconstrained.peak_device_bytes
        budget = int(peak * a.fraction)
        label = f"{fmt_bytes(budget)} ({a.fraction:.0%})"
        try:
            plan, wall = plan_timed(model, args, kwargs, budget, a.hardware, options)
        except memsched.InfeasibleBudgetError as exc:
            budget = exc.min_budget_bytes
            label = f"{fmt_bytes(budget)}*"
            notes.append(f"* {name}: {a.fraction:.0%} of the unconstrained peak ({fmt_bytes(int(peak * a.fraction))})"
                         f" is below the minimum budget; planned at the minimum, {fmt_bytes(budget)} "
                         f"({budget / peak:.0%} of peak)")
            plan, wall = plan_timed(model, args, kwargs, budget, a.hardware, options)
        runs = [(wall, plan)]
        for _ in range(repeats - 1):
            p, w = plan_timed(model, args, kwargs, budget, a.hardware, options)
            runs.append((w, p))
        t_row, r_row = rows_for(name, a.hardware, label, plan, runs)
        timing_rows.append(t_row)
        result_rows.append(r_row)
        print(f"  {name}: {median([w for w, _ in runs]):.3f} s ({plan.placement.status})", flush=True)
        if a.verbose:
            print(plan.summary())

    if not a.skip_7b:
        cases = [("a100-40gb", "16GB")] if a.quick else LLAMA7B_CASES
        with _common.timer() as t:
            model, args, kwargs = build_llama7b_meta()
        n_params = sum(p.numel() for p in model.parameters())
        print(f"LLaMA-2-7B-sized decoder on meta: {n_params / 1e9:.2f} B params "
              f"({fmt_bytes(n_params * 2)} fp16), built in {t['s']:.2f} s")
        for hw, b in cases:
            plan, wall = plan_timed(model, args, kwargs, b, hw, options)
            t_row, r_row = rows_for("llama2-7b (meta)", hw, b, plan, [(wall, plan)])
            timing_rows.append(t_row)
            result_rows.append(r_row)
            print(f"  llama2-7b {hw} {b}: {wall:.2f} s ({plan.placement.status})", flush=True)
            for n in plan.placement.notes:
                notes.append(f"llama2-7b {hw} {b}: {n}")
            if a.verbose:
                print(plan.summary())

    print()
    print(table(TIMING_HEADERS, timing_rows,
                title="Planning time (seconds; wall = memsched.plan end to end"
                      + (f"; zoo models: median of {repeats} plans" if repeats > 1 else "")
                      + ")"))
    print("other s = wall minus the recorded passes (mostly the unconstrained reference plan).")
    print()
    print(table(RESULT_HEADERS, result_rows, title="Plans (solver status and predictions)"))
    print("pred ms / unconstr ms = predicted step time at the budget vs with nothing moved; "
          "slowdown = their ratio.")
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
