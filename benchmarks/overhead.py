#!/usr/bin/env python
"""Runtime overhead of memsched at an unlimited budget vs eager PyTorch (target: <= 5%).

At a budget of 100% of the device nothing is moved, so the compiled program runs the same ATen ops
as eager PyTorch; whatever it costs on top is memsched's runtime: the generated straight-line
program, per-op tensor accounting, input flattening and output rebuilding.

Same model, same inputs, on the CPU. After warm-up, eager (under torch.no_grad) and compiled
calls are interleaved, alternating which goes first, so machine noise hits both alike.
Reported: median per call, the ratio compiled/eager of the medians and of the minima, the
extra microseconds per graph op, and memsched's own executor wall time (stats.wall_s).

Models
  gpt2-6L   GPT2Config n_layer=6, n_embd=512, n_head=8, vocab 8000; input 4 x 256 (quick: 2 x 64)
  llama-6L  LlamaConfig hidden 512, intermediate 1376, 6 layers, 8 heads, vocab 8000; same input
  zoo-gpt2  tests/zoo.py gpt2 (2 layers, n_embd 128, 2 x 16 tokens): ops are tiny, so this shows
            the per-op overhead floor rather than a realistic ratio

    python benchmarks/overhead.py             # full run (~3 min)
    python benchmarks/overhead.py --quick     # short run
    python benchmarks/overhead.py --profile gpt2-6L   # also cProfile the compiled calls
    python benchmarks/overhead.py --against-compile        # fusion: memsched fuse=True vs torch.compile
    python benchmarks/overhead.py --against-compile --train   # the same for a training step

--against-compile times four ways of running the same model, interleaved (the order rotates each
round): eager, torch.compile (inductor, default options), memsched at an unlimited budget, and
memsched with fuse=True (its compute in regions compiled by Inductor). The target there is memsched
with fusion <= 1.05x torch.compile's median time per call (or training step: forward with labels,
loss, backward; gradients set to None before each).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import _common
from _common import median, table

import torch

import memsched

TARGET = 0.05
UNLIMITED = "100%"  # of the device: nothing is moved


def build_gpt2(batch, seq):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=6, n_embd=512, n_head=8, vocab_size=8000, n_positions=max(seq, 256),
                     bos_token_id=0, eos_token_id=0, use_cache=False, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    return model, (), {"input_ids": torch.randint(0, 8000, (batch, seq), generator=g)}


def build_llama(batch, seq):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=max(seq, 256),
                      bos_token_id=1, eos_token_id=2, use_cache=False, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    return model, (), {"input_ids": torch.randint(0, 8000, (batch, seq), generator=g)}


def build_zoo(name):
    from zoo import build

    return build(name)


def first_tensor(out):
    import torch.utils._pytree as pytree

    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return next(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))


def n_graph_ops(cm) -> int:
    from memsched.ir import ops

    skip = {ops.prefetch, ops.wait, ops.offload, ops.free}
    return sum(1 for n in cm.plan.graph.graph.nodes if n.op == "call_function" and n.target not in skip)


def measure(name, model, args, kwargs, reps, warmup, profile_calls=0):
    def eager():
        with torch.no_grad():
            return model(*args, **kwargs)

    t0 = time.perf_counter()
    cm = memsched.compile(model, UNLIMITED, device="cpu")
    out = cm(*args, **kwargs)
    first_call = time.perf_counter() - t0
    ref = eager()
    a, b = first_tensor(out), first_tensor(ref)
    same = torch.equal(a, b)
    close = same or torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    maxdiff = (a - b).abs().max().item() if a.shape == b.shape else float("nan")

    for _ in range(warmup):
        eager()
        cm(*args, **kwargs)
    te, tc, inner = [], [], []
    for i in range(reps):
        order = ("e", "c") if i % 2 == 0 else ("c", "e")
        for which in order:
            if which == "e":
                t = time.perf_counter()
                eager()
                te.append(time.perf_counter() - t)
            else:
                t = time.perf_counter()
                cm(*args, **kwargs)
                tc.append(time.perf_counter() - t)
                inner.append(cm.stats.wall_s)

    prof_text = None
    if profile_calls:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(profile_calls):
            cm(*args, **kwargs)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
        prof_text = s.getvalue()

    n_ops = n_graph_ops(cm)
    me, mc = median(te), median(tc)
    res = dict(
        name=name, n_ops=n_ops, first_call=first_call, eager=me, compiled=mc, inner=median(inner),
        ratio=mc / me, ratio_min=min(tc) / min(te), per_op_us=(mc - me) / max(n_ops, 1) * 1e6,
        same=same, close=close, maxdiff=maxdiff, peak=cm.stats.peak_device_bytes,
        moved=sum(cm.stats.bytes_moved.values()), prof=prof_text,
    )
    cm.close()
    return res


def _train_copy(model):
    import copy

    m = copy.deepcopy(model).train()
    m.requires_grad_(True)
    return m


def measure_against_compile(name, model, args, kwargs, reps, warmup, train):
    """Median seconds per call (or training step) of eager, torch.compile, memsched and memsched
    with fuse=True, timed in rotating order; first-call seconds; max |output - eager|."""
    if train:
        kwargs = dict(kwargs, labels=kwargs["input_ids"])
    ways = {}
    for way in ("eager", "torch.compile", "memsched", "memsched+fuse"):
        m = _train_copy(model) if train else model
        if way == "torch.compile":
            f = torch.compile(m)
        elif way.startswith("memsched"):
            f = memsched.compile(m, UNLIMITED, device="cpu", train=train, fuse=way.endswith("fuse"))
        else:
            f = m
        ways[way] = (m, f)

    def run(way):
        m, f = ways[way]
        if train:
            m.zero_grad(set_to_none=True)
            out = f(*args, **kwargs)
            out.loss.backward()
            return out.loss.detach()
        with torch.no_grad():
            return first_tensor(f(*args, **kwargs))

    first, outs, times = {}, {}, {w: [] for w in ways}
    for way in ways:
        t = time.perf_counter()
        outs[way] = run(way)
        first[way] = time.perf_counter() - t
        for _ in range(warmup):
            run(way)
    order = list(ways)
    for i in range(reps):
        for way in order[i % 4:] + order[:i % 4]:
            t = time.perf_counter()
            run(way)
            times[way].append(time.perf_counter() - t)
    diff = {w: float((outs[w].float() - outs["eager"].float()).abs().max()) for w in ways}
    if train:   # the gradients too, relative to eager's largest
        ref = [p.grad for p in ways["eager"][0].parameters()]
        scale = max(float(g.abs().max()) for g in ref if g is not None)
        for w in ways:
            grads = [p.grad for p in ways[w][0].parameters()]
            diff[w] = max(diff[w], max(float((g - r).abs().max()) / scale
                                       for g, r in zip(grads, ref) if r is not None))
    for w in ways:
        if hasattr(ways[w][1], "close"):
            ways[w][1].close()
    return {"name": name, "median": {w: median(v) for w, v in times.items()}, "first": first, "diff": diff}


def report_against_compile(results, train):
    rows = []
    for r in results:
        med = r["median"]
        ratio = med["memsched+fuse"] / med["torch.compile"]
        rows.append([r["name"], *(f"{med[w] * 1e3:.2f}" for w in med),
                     f"{med['memsched'] / med['torch.compile']:.3f}x", f"{ratio:.3f}x "
                     + ("ok" if ratio <= 1 + TARGET else "OVER"),
                     " / ".join(f"{r['first'][w]:.1f}" for w in med),
                     " / ".join(f"{r['diff'][w]:.1e}" for w in med if w != "eager")])
    what = "training step" if train else "call"
    print()
    print(table(["model", "eager ms", "torch.compile ms", "memsched ms", "memsched+fuse ms", "memsched/compile",
                 f"fused/compile (target <= {1 + TARGET:.2f}x)", "first s (e/c/m/m+f)", "max diff (c/m/m+f)"],
                rows, title=f"memsched with fusion against torch.compile, unlimited budget, median per {what}"))
    print("first s: the first call, compiles included (torch.compile's and memsched's regions; Inductor's "
          "on-disk cache may make a rerun's quicker). max diff: outputs (and, for a step, gradients relative "
          "to eager's largest) against eager.")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller inputs (2 x 64) and 5 reps")
    ap.add_argument("--reps", type=int, default=None, help="timed calls of each (default 25, quick 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls of each (default 3, quick 1)")
    ap.add_argument("--batch", type=int, default=None, help="batch of the 6-layer models (default 4, quick 2)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 256, quick 64)")
    ap.add_argument("--models", default="gpt2-6L,llama-6L,zoo-gpt2",
                    help="comma-separated subset of gpt2-6L, llama-6L, zoo-gpt2, zoo-<name>")
    ap.add_argument("--profile", default=None, metavar="MODEL",
                    help="cProfile this many compiled calls of MODEL after timing, top 30 by cumtime")
    ap.add_argument("--profile-calls", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: left at torch's default); 1 is far less "
                         "sensitive to other processes competing for the cores")
    ap.add_argument("--against-compile", action="store_true",
                    help="eager, torch.compile, memsched and memsched fuse=True side by side")
    ap.add_argument("--train", action="store_true", help="with --against-compile: a training step")
    a = ap.parse_args()
    _common.quiet()
    _common.set_threads(a.threads)

    reps = a.reps or (5 if a.quick else 25)
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 3)
    batch = a.batch or (2 if a.quick else 4)
    seq = a.seq or (64 if a.quick else 256)
    print(f"memsched {memsched.__version__}, torch {torch.__version__}, torch threads "
          f"{torch.get_num_threads()}{'' if a.threads else ' (default)'}; reps {reps}, warm-up {warmup}; "
          f"budget {UNLIMITED}; {_common.loadavg()} at start")

    results = []
    for name in a.models.split(","):
        if name == "gpt2-6L":
            model, args, kwargs = build_gpt2(batch, seq)
            shape = f"{batch}x{seq}"
        elif name == "llama-6L":
            model, args, kwargs = build_llama(batch, seq)
            shape = f"{batch}x{seq}"
        elif name.startswith("zoo-"):
            model, args, kwargs = build_zoo(name[4:])
            shape = "zoo"
        else:
            raise SystemExit(f"unknown model {name}")
        n_params = sum(p.numel() for p in model.parameters())
        print(f"  {name}: {n_params / 1e6:.1f} M params, input {shape} ...", flush=True)
        if a.against_compile:
            r = measure_against_compile(name, model, args, kwargs, reps, warmup, a.train)
            results.append(r)
            print("    " + ", ".join(f"{w} {v * 1e3:.2f} ms" for w, v in r["median"].items()), flush=True)
            continue
        r = measure(name, model, args, kwargs, reps, warmup,
                    profile_calls=a.profile_calls if a.profile == name else 0)
        r["shape"] = shape
        results.append(r)
        print(f"    eager {r['eager'] * 1e3:.2f} ms, compiled {r['compiled'] * 1e3:.2f} ms, "
              f"ratio {r['ratio']:.3f}", flush=True)
        if r["prof"]:
            print(f"cProfile of {a.profile_calls} compiled calls of {name} (sorted by cumtime):")
            print(r["prof"])

    if a.against_compile:
        report_against_compile(results, a.train)
        return
    rows = []
    for r in results:
        over = r["ratio"] - 1.0
        verdict = "ok" if over <= TARGET else "OVER"
        rows.append([
            r["name"], r["shape"], str(r["n_ops"]), f"{r['first_call']:.2f}",
            f"{r['eager'] * 1e3:.2f}", f"{r['compiled'] * 1e3:.2f}", f"{r['inner'] * 1e3:.2f}",
            f"{r['ratio']:.3f}x", f"{r['ratio_min']:.3f}x", f"{r['per_op_us']:+.1f}",
            f"{over:+.1%} {verdict}",
            "equal" if r["same"] else ("allclose" if r["close"] else f"DIFF {r['maxdiff']:.2e}"),
        ])
    print()
    print(table(["model", "input", "ops", "1st call s", "eager ms", "compiled ms", "executor ms",
                 "ratio(median)", "ratio(min)", "us/op", f"overhead (target <= {TARGET:.0%})", "output"],
                rows, title="Runtime overhead at an unlimited budget (median per call)"))
    print("ratio = compiled/eager; executor ms = memsched's own stats.wall_s (the generated program "
          "only); us/op = (compiled - eager) / graph ops;")
    print("1st call s = compile + plan (torch.export) + first run. The CPU is shared and noisy: "
          "compare ratio(min) too.")
    print(f"{_common.loadavg()} at end (above the core count, other processes competed for the CPU and "
          "tiny ops slow down a lot with >1 torch thread; try --threads 1).")


if __name__ == "__main__":
    main()
