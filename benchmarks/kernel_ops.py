#!/usr/bin/env python
"""memsched's RMSNorm and rotary kernel ops (``kernels=True``) against the same training step
without them (``kernels=False``), both planned by memsched at no budget to meet, in one process.

For each decoder (LLaMA, Qwen3 with its per-head q/k norms, Gemma), float32 and bfloat16, one
training step (forward, loss, backward) of ``--batch`` x ``--seq`` tokens:

  planned peak    the plan's unconstrained peak device bytes (what the planner must fit: the
                  saved activations); with the ops a norm saves x and 1/rms, not its normalized
                  values, and in bfloat16 x at 16 bits, not the model's float32 upcast of it;
  allocator peak  the CPU allocator's peak over one step (torch.profiler's memory events);
  step            median of --reps steps, the two programs alternating;
  grads equal     every gradient of the two programs bit for bit (on a CPU the ops run the
                  chain's own arithmetic in autograd's order).

On a CPU the ops run their PyTorch fallback (Triton needs CUDA), so the time column shows the
ops' dispatch, not Triton's fusion; on a GPU run it with --device cuda.

    python benchmarks/kernel_ops.py             # ~2 min on 2 cores
    python benchmarks/kernel_ops.py --quick
"""
from __future__ import annotations

import argparse
import copy
import time

import _common
from _common import fmt_bytes, median, table
from train_frontier import allocator_peak

import torch

import memsched

ARCHS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", {"head_dim": 32}),
    "gemma": ("GemmaForCausalLM", "GemmaConfig", {"head_dim": 32}),
}


def build(arch: str, dtype, a):
    import transformers as T

    cls, config_cls, extra = ARCHS[arch]
    config = getattr(T, config_cls)(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3,
                                    num_hidden_layers=a.layers, num_attention_heads=a.hidden // 32,
                                    num_key_value_heads=a.hidden // 64, use_cache=False, **extra)
    torch.manual_seed(0)
    return getattr(T, cls)(config).to(dtype).train()


def measure(arch: str, dtype, a, device):
    base = build(arch, dtype, a)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "labels": ids}
    runs = {}
    for kernels in (False, True):
        model = copy.deepcopy(base)
        free = memsched.plan(model, (), "100%", example_kwargs=kw, train=True, kernels=kernels)
        cm = memsched.compile(model, free.peak_device_bytes, train=True, device=device, kernels=kernels)

        def step(model=model, cm=cm):
            model.zero_grad(set_to_none=True)
            cm(**kw).loss.backward()
        step()
        runs[kernels] = dict(model=model, cm=cm, step=step, planned=free.peak_device_bytes, times=[],
                             alloc=allocator_peak(step), note=cm.plan.passes[0].note)
    for rep in range(a.reps):   # alternating, so the machine's noise hits both alike
        for kernels in ((False, True) if rep % 2 == 0 else (True, False)):
            t = time.perf_counter()
            runs[kernels]["step"]()
            runs[kernels]["times"].append(time.perf_counter() - t)
    for r in runs.values():
        r["step"]()   # the gradients compared: one more step each from the same weights
    equal = all(torch.equal(p.grad, q.grad) for p, q in zip(runs[False]["model"].parameters(),
                                                            runs[True]["model"].parameters()))
    for r in runs.values():
        r["cm"].close()
    off, on = runs[False], runs[True]
    t_off, t_on = median(off["times"]), median(on["times"])
    found = on["note"].split("kernels: ")[-1] if "kernels: " in on["note"] else "none"
    return [f"{arch} {str(dtype).removeprefix('torch.')} ({found})",
            f"{fmt_bytes(on['planned'])} / {fmt_bytes(off['planned'])} = {on['planned'] / off['planned']:.3f}",
            f"{fmt_bytes(on['alloc'])} / {fmt_bytes(off['alloc'])} = {on['alloc'] / off['alloc']:.3f}",
            f"{t_on * 1e3:.1f} / {t_off * 1e3:.1f} ms = {t_on / t_off:.2f}", "yes" if equal else "NO"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, 2 reps")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    _common.quiet()
    _common.set_threads(a.threads)
    a.hidden, a.layers, a.vocab, a.batch, a.seq = (64, 2, 256, 2, 32) if a.quick else (256, 4, 2048, 4, 128)
    a.reps = a.reps or (2 if a.quick else 7)
    print(f"memsched {memsched.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{_common.loadavg()}", flush=True)
    rows = [measure(arch, dtype, a, a.device) for arch in ARCHS for dtype in (torch.float32, torch.bfloat16)]
    print(table(["model (ops found)", "planned peak with / without", "allocator peak with / without",
                 "step with / without", "grads equal"], rows,
                title=f"kernel ops: training step {a.batch}x{a.seq}, hidden {a.hidden}, {a.layers} layers, no budget"))


if __name__ == "__main__":
    main()
