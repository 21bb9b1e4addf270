"""Run a GPT-2 decoder (random weights, ~500 MB) on the CPU inside a budget well under its
weight size: memsched homes the weights in a file on disk and streams them through the
budget, prefetching the next layer while the current one computes.

    python examples/stream_gpt2_from_disk.py [--budget 128MiB] [--layers 12]
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import memsched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", default=None, help="device budget (default: 40%% of the weight bytes; the LM head alone needs a third)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--show-code", action="store_true", help="print the whole scheduled program")
    args = ap.parse_args()

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                        use_cache=False)
    model = GPT2LMHeadModel(config).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = args.budget or int(weight_bytes * 0.4)
    input_ids = torch.randint(0, config.vocab_size, (1, args.seq_len))
    print(f"GPT-2, {args.layers} layers, {memsched.format_bytes(weight_bytes)} of weights; "
          f"budget {budget if isinstance(budget, str) else memsched.format_bytes(budget)}")

    t0 = time.perf_counter()
    cm = memsched.compile(model, budget, device="cpu", example_kwargs={"input_ids": input_ids})
    print(f"planned in {time.perf_counter() - t0:.1f} s\n")
    plan = cm.plan
    print(plan.summary())
    listing = str(plan).splitlines()
    if args.show_code:
        print("\n".join(listing))
    else:
        start = listing.index("):") + 1
        body = listing[:4] + ["def program(...):  # model tensors and inputs; --show-code lists them"] + \
            [line for line in listing[start:] if not line.lstrip().startswith("# p_")]
        print("\nfirst lines of the scheduled program (--show-code prints all of it):")
        print("\n".join(body[:24]))
        print("    ...")

    with torch.no_grad():
        t0 = time.perf_counter()
        expected = model(input_ids=input_ids).logits
        eager_s = time.perf_counter() - t0
    for _ in range(2):  # the first call warms the page cache and allocator
        out = cm(input_ids=input_ids)
    same = torch.equal(out.logits, expected)
    stats = cm.stats
    print(f"\noutputs equal eager: {same}")
    print(f"measured: {stats}")
    print(f"predicted: {plan.predicted_time_s * 1e3:.1f} ms, peak {memsched.format_bytes(plan.peak_device_bytes)}; "
          f"eager (all weights in RAM): {eager_s * 1e3:.1f} ms")
    assert stats.peak_device_bytes <= plan.budget_bytes, "budget exceeded"
    assert same, "outputs differ from eager"
    cm.close()


if __name__ == "__main__":
    main()
