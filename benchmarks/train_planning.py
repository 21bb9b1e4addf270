#!/usr/bin/env python
"""Planning time for training: ``memsched.plan(..., train=True)`` on a LLaMA-2-7B-sized model.

The model (transformers LlamaConfig: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab
32000, bf16, use_cache=False) is built on the meta device (no weights are allocated), with
input_ids and labels (1, 512) on meta, and planned as one training step (forward, loss,
backward: weights, activations, gradients) for the "a100-80gb" hardware profile at several
budgets (default: unconstrained, 40GB, 24GB, 16GB; "0.6x" means 60% of the model's unconstrained
training peak, "min" its minimum budget). A budget below the minimum is reported with the time
memsched took to say so.

For each plan: wall time of memsched.plan, the seconds of each recorded pass (plan.passes:
capture = torch.export of the joint forward+backward, analysis, segments, placement, schedule,
simulate; "other" is the rest, mostly the unconstrained reference simulation), the solver
status, the predicted step time against the unconstrained prediction, the predicted peak, the
minimum budget, where the weights live, and what happens to each saved activation (kept on
the device, offloaded to host/disk, recomputed) with the predicted recompute time.

A scaling table plans the same architecture with fewer layers (default 2 and 8, beside the
32 of the main table) at the unconstrained budget and at 0.6x, to show how planning time grows.

    python benchmarks/train_planning.py            # full run (~5 min on a 2-core machine)
    python benchmarks/train_planning.py --quick    # the 7B model at 24GB only (~1 min)
"""
from __future__ import annotations

import argparse
import collections
import time

import _common
from _common import fmt_bytes, table

import torch

import memsched

PASS_NAMES = ["capture", "analysis", "segments", "placement", "schedule", "simulate"]
UNCONSTRAINED = 10**15


def build_llama_meta(layers, hidden, intermediate, heads, vocab, batch, seq, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max(4096, seq),
        use_cache=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(dtype).train()
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    return model, {"input_ids": ids, "labels": ids}


def pass_seconds(plan) -> dict:
    out = {}
    for r in plan.passes:
        out[r.name] = out.get(r.name, 0.0) + r.seconds
    return out


def resolve_budget(spec: str, unconstrained_plan):
    """(budget for memsched.plan, label) from 'unconstrained', '40GB', '0.6x' or 'min'."""
    if spec == "unconstrained":
        return UNCONSTRAINED, "unconstrained"
    if spec == "min":
        b = unconstrained_plan.min_budget_bytes
        return b, f"min ({fmt_bytes(b)})"
    if spec.endswith("x"):
        b = int(unconstrained_plan.program.peak_bytes * float(spec[:-1]))
        return b, f"{spec} ({fmt_bytes(b)})"
    return spec, spec


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 32-layer model at 24GB only, no scaling table")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--hardware", default="a100-80gb")
    ap.add_argument("--budgets", default=None,
                    help="comma-separated: unconstrained, sizes (40GB), fractions of the unconstrained training "
                         "peak (0.6x), min (default unconstrained,40GB,24GB,16GB; quick 24GB)")
    ap.add_argument("--scaling", default=None,
                    help="comma-separated layer counts for the scaling table, planned at unconstrained and 0.6x "
                         "('' to skip; default 2,8; quick '')")
    ap.add_argument("--time-limit", type=float, default=10.0,
                    help="solver time limit, passed as time_limit_s= to memsched.plan (default 10)")
    ap.add_argument("--verbose", action="store_true", help="print each plan's summary()")
    a = ap.parse_args()
    _common.quiet()

    dtype = getattr(torch, a.dtype)
    budgets = (a.budgets or ("24GB" if a.quick else "unconstrained,40GB,24GB,16GB")).split(",")
    scaling = a.scaling if a.scaling is not None else ("" if a.quick else "2,8")
    scaling = [int(x) for x in scaling.split(",") if x.strip()]
    options = {"time_limit_s": a.time_limit}
    print(f"memsched {memsched.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{_common.loadavg()} at start; solver time limit {a.time_limit:g} s; hardware {a.hardware}")

    timing_rows, result_rows, notes = [], [], []

    def plan_once(model, kwargs, budget):
        t0 = time.perf_counter()
        plan = memsched.plan(model, (), budget=budget, example_kwargs=kwargs, train=True,
                             hardware=a.hardware, **options)
        return plan, time.perf_counter() - t0

    def record(name, label, plan, wall):
        ps = pass_seconds(plan)
        other = wall - sum(ps.values())
        timing_rows.append([name, label, f"{wall:.2f}", *[f"{ps.get(n, 0.0):.2f}" for n in PASS_NAMES],
                            f"{other:.2f}"])
        unc = plan.unconstrained.time_s
        status = plan.placement.status + (f" (gap {plan.placement.mip_gap:.1%})"
                                          if plan.placement.mip_gap is not None else "")
        saved = plan.saved_activations()
        count = collections.Counter(r["decision"] for r in saved)
        nbytes = collections.defaultdict(int)
        for r in saved:
            nbytes[r["decision"]] += r["bytes"]
        tiers = plan.tier_bytes()
        moved = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(plan.bytes_moved.items()) if v) or "nothing"
        result_rows.append([
            name, label, status, f"{plan.predicted_time_s * 1e3:.1f}", f"{unc * 1e3:.1f}",
            f"{plan.predicted_time_s / unc:.2f}x" if unc else "-",
            fmt_bytes(plan.peak_device_bytes), fmt_bytes(plan.program.peak_bytes), fmt_bytes(plan.min_budget_bytes),
            "/".join(fmt_bytes(tiers[t]) for t in ("device", "host", "disk")),
            f"{count.get('keep', 0)}/{count.get('host', 0)}/{count.get('disk', 0)}/{count.get('recompute', 0)}",
            "/".join(fmt_bytes(nbytes[k]) for k in ("keep", "host", "disk", "recompute")),
            f"{plan.recompute_overhead_s() * 1e3:.1f}", moved,
        ])
        print(f"  {name} {label}: {wall:.1f} s ({status}; capture {ps.get('capture', 0.0):.1f} s)", flush=True)
        if a.verbose:
            print(plan.summary())

    def run_model(layers, specs):
        name = f"llama {layers}L"
        with _common.timer() as t:
            model, kwargs = build_llama_meta(layers, a.hidden, a.intermediate, a.heads, a.vocab, a.batch, a.seq,
                                             dtype)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n_params / 1e9:.2f} B params ({fmt_bytes(n_params * dtype.itemsize)} {a.dtype}) on meta, "
              f"built in {t['s']:.1f} s; input {a.batch}x{a.seq} with labels", flush=True)
        # the unconstrained plan gives the training peak and minimum budget that "0.6x" and
        # "min" refer to; it is timed and reported like the others when asked for
        base = None
        if any(x == "unconstrained" or x == "min" or x.endswith("x") for x in specs):
            base, wall = plan_once(model, kwargs, UNCONSTRAINED)
        if "unconstrained" in specs:
            record(name, "unconstrained", base, wall)
        elif base is not None:
            notes.append(f"{name}: an unconstrained plan ({wall:.1f} s, not in the tables) gave the training "
                         f"peak {fmt_bytes(base.program.peak_bytes)} and minimum budget "
                         f"{fmt_bytes(base.min_budget_bytes)}")
        for spec in specs:
            if spec == "unconstrained":
                continue
            budget, label = resolve_budget(spec, base)
            t0 = time.perf_counter()
            try:
                plan, wall = plan_once(model, kwargs, budget)
            except memsched.InfeasibleBudgetError as exc:
                wall = time.perf_counter() - t0
                timing_rows.append([name, label, f"{wall:.2f}", *["-"] * len(PASS_NAMES), "-"])
                result_rows.append([name, label, "infeasible", "-", "-", "-", "-", "-" if base is None else fmt_bytes(base.program.peak_bytes),
                                    fmt_bytes(exc.min_budget_bytes), "-", "-", "-", "-", "-"])
                notes.append(f"{name} {label}: below the minimum budget {fmt_bytes(exc.min_budget_bytes)} "
                             f"(InfeasibleBudgetError after {wall:.1f} s)")
                print(f"  {name} {label}: infeasible after {wall:.1f} s", flush=True)
                continue
            record(name, label, plan, wall)

    with _common.timer() as total:
        run_model(a.layers, budgets)
        for layers in scaling:
            if layers != a.layers:
                run_model(layers, ["unconstrained", "0.6x"])
    print()
    print(table(["model", "budget", "wall s", *[f"{n} s" for n in PASS_NAMES], "other s"], timing_rows,
                title=f"Training planning time (seconds; wall = memsched.plan(..., train=True) end to end; "
                      f"{a.hardware}, {a.dtype}, input {a.batch}x{a.seq})"))
    print("other s = wall minus the recorded passes (mostly the unconstrained reference simulation).")
    print()
    print(table(["model", "budget", "solver", "pred ms", "unconstr ms", "slowdown", "pred peak", "unconstr peak",
                 "min budget", "weights dev/host/disk", "saved k/h/d/r", "saved bytes k/h/d/r", "recompute ms",
                 "moved/step"], result_rows, title="Training plans"))
    print("pred ms: predicted training step (forward + backward) at the budget; unconstr ms: with nothing "
          "moved; saved k/h/d/r: saved activations (forward values the backward reads) kept on the device / "
          "offloaded to host / to disk / recomputed (plan.saved_activations()); recompute ms = "
          "plan.recompute_overhead_s().")
    for n in notes:
        print(n)
    print(f"total {total['s']:.1f} s; {_common.loadavg()} at end (the machine may be shared: a load above the "
          "core count means the timings are inflated).")


if __name__ == "__main__":
    main()
