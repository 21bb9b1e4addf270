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
        r = measure(name, model, args, kwargs, reps, warmup,
                    profile_calls=a.profile_calls if a.profile == name else 0)
        r["shape"] = shape
        results.append(r)
        print(f"    eager {r['eager'] * 1e3:.2f} ms, compiled {r['compiled'] * 1e3:.2f} ms, "
              f"ratio {r['ratio']:.3f}", flush=True)
        if r["prof"]:
            print(f"cProfile of {a.profile_calls} compiled calls of {name} (sorted by cumtime):")
            print(r["prof"])

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
