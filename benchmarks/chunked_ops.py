#!/usr/bin/env python
"""Chunked ops: how far running row-local modules on slices lowers the minimum, and what it costs.

For decoders whose MLP is wide beside their vocabulary (so an MLP op sets the floor, as in long
sequences), transformers architectures from small configs with random weights, for inference and
a training step on a fixed CPU-like profile:

  min whole   memsched's minimum with no module split (``chunk_ops=False``), as a share of the
              unconstrained peak;
  min split   the minimum with splitting (the default), and the slices the planner chose there;
  ratio       min split / min whole;
  then each plan is run at its own minimum on this CPU (median of --repeats calls, after a
  warm-up) beside eager in the same process: measured peak <= budget, and time / eager for
  both.

    python benchmarks/chunked_ops.py            # all models (~3 min)
    python benchmarks/chunked_ops.py llama      # some
"""
from __future__ import annotations

import argparse
import copy
import time
import warnings

import _common
from _common import fmt_bytes, median, table

import torch

import memsched
from memsched.cost_models.hardware import Hardware

PROFILE = Hardware(name="chunk:cpu", device_type="cpu", device_bytes=24 << 30, host_bytes=0,
                   peak_flops=3.3e11, peak_flops_fp32=1.5e11, mem_bw=1.0e10, h2d_bw=5.0e9, d2h_bw=5.0e9,
                   disk_read_bw=1.1e9, disk_write_bw=8.9e8, op_overhead_s=6e-6, source="chunked_ops.py")
SEQ, VOCAB = 512, 256


def build(name):
    import transformers as T

    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(0))
    small = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=1024, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**small)), ids
    if name == "qwen2-gqa":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**small)), ids
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**small, sliding_window=128)), ids
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=128, n_inner=1024, n_head=4, vocab_size=VOCAB,
                                              n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                              use_cache=False)), ids
    raise KeyError(name)


MODELS = ("llama", "qwen2-gqa", "mistral", "gpt2")


def _minimum(model, kwargs, train, chunk_ops) -> int:
    try:
        memsched.plan(model, (), 1, example_kwargs=kwargs, train=train, hardware=PROFILE, chunk_ops=chunk_ops)
    except memsched.InfeasibleBudgetError as e:
        return e.min_budget_bytes
    raise AssertionError("a 1-byte budget planned")


def _time(call, repeats) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return median(times)


def _step(fn, params, kwargs, train):
    """One call of ``fn``: a training step (loss, backward) or a forward without autograd."""
    def call():
        if train:
            params.zero_grad(set_to_none=True)
            fn(**kwargs).loss.backward()
        else:
            with torch.no_grad():
                fn(**kwargs)
    return call


def _run(model, kwargs, train, budget, chunk_ops, repeats):
    """(seconds per call, measured peak, plan) of the compiled model at ``budget``."""
    cm = memsched.compile(model, budget, train=train, device="cpu", hardware=PROFILE, chunk_ops=chunk_ops)
    try:
        return _time(_step(cm, model, kwargs, train), repeats), cm.stats.peak_device_bytes, cm.plan
    finally:
        cm.close()


def row(name, mode, repeats):
    model, ids = build(name)
    train = mode == "train"
    model.train(train).requires_grad_(train)
    kwargs = {"input_ids": ids, "labels": ids} if train else {"input_ids": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peak = memsched.plan(model, (), 10**13, example_kwargs=kwargs, train=train, hardware=PROFILE).program.peak_bytes
        whole = _minimum(model, kwargs, train, chunk_ops=False)
        split = _minimum(model, kwargs, train, chunk_ops=True)
        ref = copy.deepcopy(model)
        t_eager = _time(_step(ref, ref, kwargs, train), repeats)
        t_whole, peak_whole, _ = _run(model, kwargs, train, whole, False, repeats)
        t_split, peak_split, plan = _run(model, kwargs, train, split, True, repeats)
    slices = max((c.chunks for c in plan.chunking), default=1)
    ok = peak_whole <= whole and peak_split <= split
    return [name, mode, fmt_bytes(peak), f"{whole / peak:.1%}", f"{split / peak:.1%}", f"{split / whole:.2f}",
            f"{len(plan.chunking)} x{slices}", "yes" if ok else "NO", f"{t_whole / t_eager:.2f}x",
            f"{t_split / t_eager:.2f}x", f"{t_split / t_whole:.2f}x"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(MODELS), help=f"any of {', '.join(MODELS)}")
    ap.add_argument("--quick", action="store_true", help="llama only, 3 repeats")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    _common.quiet()
    _common.set_threads(a.threads)
    rows = []
    for name in (["llama"] if a.quick else a.models):
        for mode in ("infer", "train"):
            rows.append(row(name, mode, 3 if a.quick else a.repeats))
            print(f"  {' '.join(rows[-1][:6])}", flush=True)
    print()
    print(table(["model", "mode", "peak", "min whole", "min split", "ratio", "modules x slices", "peak<=budget",
                 "whole/eager", "split/eager", "split/whole"], rows,
                title=f"Chunked ops ({PROFILE.name}; batch 1 x {SEQ}, vocab {VOCAB}, MLP 128 -> 1024; times on this CPU, "
                      f"{_common.loadavg()})"))


if __name__ == "__main__":
    main()
