#!/usr/bin/env python
"""The minimum budget against the floor, over architectures the tests don't build.

For each model (transformers architectures from small configs, random weights; no download),
planned for inference and for a training step with a fixed CPU-like profile (so the numbers do
not move with this machine's calibration):

  peak      the unconstrained peak (nothing moved);
  min       memsched's minimum budget, as a share of the peak: what ``InfeasibleBudgetError``
            reports for a budget one byte under the floor (below the uniform cuts' minimum,
            ``plan.min_budget_bytes`` of the unconstrained plan, the planner splits the
            segments where the minimum binds down to single ops); "uniform" is that
            unconstrained plan's figure, for comparison;
  floor     the largest single op's working set plus what cannot leave the device there (what
            the caller holds, state updated in place): no plan goes lower without splitting
            that op;
  min/floor how close the planner gets to it (below 1 when running modules on slices of their
            input -- passes/chunking.py -- splits the op that sets the floor: "split: ..." then
            names them, and min is the split plan's minimum);
  fits      whether the targets are met: training at 30% and inference at 25% of the peak, or
            within 10% of the floor when the floor is above them.

    python benchmarks/floor_survey.py            # all models (~1 min)
    python benchmarks/floor_survey.py vit bert   # some
"""
from __future__ import annotations

import argparse
import time
import warnings

import _common
from _common import fmt_bytes, table

import torch

import memsched
from memsched.cost_models.hardware import Hardware

# a measured 2-core CPU, rounded (as the tests' fixed profile), so the survey is repeatable
PROFILE = Hardware(name="survey:cpu", device_type="cpu", device_bytes=24 << 30, host_bytes=0,
                   peak_flops=3.3e11, peak_flops_fp32=1.5e11, mem_bw=1.0e10, h2d_bw=5.0e9, d2h_bw=5.0e9,
                   disk_read_bw=1.1e9, disk_write_bw=8.9e8, op_overhead_s=6e-6, source="floor_survey.py")
TARGET = {"train": 0.30, "infer": 0.25}


def _ids(vocab, *shape):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0))


def _pixels():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def build(name):
    """(model, kwargs with labels) of one small config."""
    import transformers as T

    torch.manual_seed(0)
    if name == "gpt2":
        m = T.GPT2LMHeadModel(T.GPT2Config(n_layer=4, n_embd=128, n_head=4, vocab_size=2048, use_cache=False))
        ids = _ids(2048, 2, 128)
        return m, {"input_ids": ids, "labels": ids}
    if name == "qwen2-gqa":
        m = T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=2048, hidden_size=128, intermediate_size=384,
                                             num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                             use_cache=False))
        ids = _ids(2048, 2, 128)
        return m, {"input_ids": ids, "labels": ids}
    if name == "bert-mlm":
        m = T.BertForMaskedLM(T.BertConfig(vocab_size=2048, hidden_size=128, num_hidden_layers=4,
                                           num_attention_heads=4, intermediate_size=512))
        ids = _ids(2048, 2, 128)
        return m, {"input_ids": ids, "labels": ids}
    if name == "t5":
        m = T.T5ForConditionalGeneration(T.T5Config(vocab_size=2048, d_model=128, d_ff=512, num_layers=2,
                                                    num_heads=4, d_kv=32, decoder_start_token_id=0,
                                                    pad_token_id=0, use_cache=False))
        ids = _ids(2048, 2, 64)
        return m, {"input_ids": ids, "decoder_input_ids": ids, "labels": ids}
    if name == "vit":
        m = T.ViTForImageClassification(T.ViTConfig(image_size=64, patch_size=8, hidden_size=128,
                                                    num_hidden_layers=4, num_attention_heads=4,
                                                    intermediate_size=512, num_labels=10))
        return m, {"pixel_values": _pixels(), "labels": torch.tensor([1, 2])}
    if name == "resnet":
        m = T.ResNetForImageClassification(T.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                                                          depths=[1, 1, 2, 1], num_labels=10))
        return m, {"pixel_values": _pixels(), "labels": torch.tensor([1, 2])}
    if name == "convnext":
        m = T.ConvNextForImageClassification(T.ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1],
                                                              num_labels=10))
        return m, {"pixel_values": _pixels(), "labels": torch.tensor([1, 2])}
    raise KeyError(name)


MODELS = ("gpt2", "qwen2-gqa", "bert-mlm", "t5", "vit", "resnet", "convnext")


def survey(name, mode):
    model, kwargs = build(name)
    train = mode == "train"
    model.train(train).requires_grad_(train)
    if not train:
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = memsched.plan(model, (), budget=10**13, example_kwargs=kwargs, train=train, hardware=PROFILE)
    peak, uniform, floor = p.program.peak_bytes, p.min_budget_bytes, p.placement.floor_bytes
    lo, binds = uniform, p.placement.binds_at
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = memsched.plan(model, (), budget=floor - 1, example_kwargs=kwargs, train=train, hardware=PROFILE)
        # under the floor of the whole ops, it fits by running modules on slices: its minimum
        lo, binds = q.min_budget_bytes, "split: " + ", ".join(map(str, q.chunking[:2]))
    except memsched.InfeasibleBudgetError as e:
        lo, binds = e.min_budget_bytes, str(e).split("the minimum binds at ")[-1]
    # the target: the share of the peak, or within 10% of the floor where that is higher
    target = max(TARGET[mode] * peak, 1.1 * floor)
    return [name, mode, fmt_bytes(peak), f"{lo / peak:.1%}", f"{uniform / peak:.1%}", f"{floor / peak:.1%}",
            f"{lo / floor:.2f}", "yes" if lo <= target else "no", f"{time.perf_counter() - t0:.1f}", binds[:70]]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=list(MODELS), help=f"any of {', '.join(MODELS)}")
    ap.add_argument("--quick", action="store_true", help="gpt2, vit and resnet only")
    a = ap.parse_args()
    _common.quiet()
    rows = []
    for name in (["gpt2", "vit", "resnet"] if a.quick else a.models):
        for mode in ("infer", "train"):
            try:
                rows.append(survey(name, mode))
            except Exception as exc:  # noqa: BLE001 - a model that fails is a row, not the end
                rows.append([name, mode, "failed", "", "", "", "", "", "", f"{type(exc).__name__}: {exc}"[:70]])
            print(f"  {rows[-1][0]} {rows[-1][1]}: min {rows[-1][3]} floor {rows[-1][5]}", flush=True)
    print()
    print(table(["model", "mode", "peak", "min", "uniform", "floor", "min/floor", "fits target", "plan s", "minimum binds at"],
                rows, title=f"Minimum budget vs the floor ({PROFILE.name}; targets: training 30%, inference 25% "
                            "of the peak, or within 10% of the floor when it is higher)"))


if __name__ == "__main__":
    main()
