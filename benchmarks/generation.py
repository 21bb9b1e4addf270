#!/usr/bin/env python
"""Generation: greedy decoding of a GPT-NeoX decoder whose weights do not fit the budget.

A GPT-NeoX causal LM built from its config (random, seeded weights; default hidden 512,
4 layers, 8 heads, intermediate 2048, vocab 1536: ~14.2 M params, ~57 MB fp32; sdpa
attention, eval mode, use_cache on) generates ``--new-tokens`` tokens (default 32) after a
prompt of ``--prompt`` tokens (default 128), greedily, at each batch size in ``--batches``
(default 1,32). Four ways, in one process, on the same prompts, on the CPU (RAM is the
device tier):

  (a) eager       model.generate(do_sample=False) from RAM, no budget: the bound;
  (b) memsched    memsched.Generator(model, budget, ..., device="cpu", offload_dir=<tmp>):
                  prefill and decode programs planned once (planning time reported apart),
                  then warm gen(...) calls timed. Budget = --budget-fraction (25%) of the
                  weight bytes; if that is below memsched's minimum for a batch size, the
                  minimum is used and the row is marked '*'; with --fuse, fuse=True (row
                  'memsched+fuse'): the compute between scheduling points runs as Inductor-
                  compiled regions, compiled during the first (untimed) generation; with
                  --compress int8|int4 (row 'memsched+int8'), the weights and KV cache homed on
                  disk are kept there as group-wise integers (FlexGen's compression): not
                  bit-exact, so the tokens column gives the share of new tokens equal to eager's;
  (c) acc-disk    accelerate.disk_offload(deepcopy(model), offload_dir=<tmp>, execution_device
                  =cpu, offload_buffers=True) driving model.generate: every weight is memory-
                  mapped from disk and loaded right before its module runs, every forward;
  (d) acc-map     accelerate.infer_auto_device_map(deepcopy(model), max_memory={"cpu": budget})
                  + dispatch_model(..., main_device="cpu", offload_dir=<tmp>): the modules that
                  fit the budget stay in RAM, the rest are loaded from disk every forward.
                  (max_memory bounds the weights only; activations and the KV cache are not
                  counted by Accelerate.) Same budget as memsched's row.

Reported per generation (median of --reps warm runs, the order rotating each rep): time,
tokens/s (batch x new tokens / time), ratio to acc-disk and to eager, memsched's measured peak
device bytes against its budget, bytes read from disk per generated token (memsched:
stats.bytes_moved["disk_read"] / (batch x new tokens); Accelerate: bytes its weight loader
returned for disk-offloaded weights, counted by wrapping OffloadedWeightsLoader.__getitem__)
and per decode step (memsched: the last call's RunStats, i.e. one decode step), and memsched's
predicted time per decode step (the decode plan's predicted_time_s) next to the measured one
(decode_s / (new_tokens - 1)). Tokens of (b), (c), (d) are compared with eager's.

The offload files live in the OS page cache after the first generation, so these are warm
runs: they measure each runtime's cost of moving weights, not the storage device.

    python benchmarks/generation.py            # full run (a few minutes on 2 cores)
    python benchmarks/generation.py --quick    # tiny model, short prompts (< 2 min)
    python benchmarks/generation.py --arch mamba2   # a state-space decoder of the same width instead:
                                                    # its cache is per-layer recurrent states, not keys/values
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import io
import logging
import os
import pstats
import shutil
import tempfile
import time

import _common
from _common import fmt_bytes, median, table

import torch

import memsched


ARCHS = {"gpt_neox": "GPT-NeoX", "mamba2": "Mamba-2"}


def build_model(layers, hidden, heads, intermediate, vocab, max_pos, arch="gpt_neox"):
    import transformers as T

    if arch == "mamba2":   # heads of 64 channels over the expanded width, a state of 64 per channel
        cfg = T.Mamba2Config(hidden_size=hidden, num_hidden_layers=layers, num_heads=2 * hidden // 64, head_dim=64,
                             state_size=64, n_groups=1, expand=2, chunk_size=64, vocab_size=vocab, use_cache=True)
        make = T.Mamba2ForCausalLM
    else:
        cfg = T.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                              intermediate_size=intermediate, vocab_size=vocab, max_position_embeddings=max_pos,
                              hidden_dropout=0.0, attention_dropout=0.0, use_cache=True,
                              attn_implementation="sdpa")
        make = T.GPTNeoXForCausalLM
    torch.manual_seed(0)
    model = make(cfg).eval().requires_grad_(False)
    # never stop early: every method generates exactly new_tokens tokens
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def weight_bytes(model) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


ODDITIES: list[str] = []


def as_float(x, what: str) -> float:
    """A plan's predicted number as a float; a torch.SymFloat (a symbolic size leaked into the
    cost model) is converted by its hint and reported as an oddity."""
    if isinstance(x, float | int):
        return float(x)
    ODDITIES.append(f"{what} is a {type(x).__module__}.{type(x).__name__} ({x}), not a float: "
                    "f-string formatting (Plan.__repr__/__str__/summary) fails on it")
    return float(x)


class AccelerateReads:
    """Counts the bytes accelerate's OffloadedWeightsLoader returns for weights that are not in
    its in-RAM state dict (i.e. loaded from its offload folder), while ``on``."""

    def __init__(self):
        from accelerate.utils.offload import OffloadedWeightsLoader

        self.cls = OffloadedWeightsLoader
        self.orig = OffloadedWeightsLoader.__getitem__
        self.bytes = 0
        self.on = False
        counter = self

        def getitem(loader, key):
            t = counter.orig(loader, key)
            if counter.on and key not in loader.state_dict and isinstance(t, torch.Tensor):
                counter.bytes += t.numel() * t.element_size()
            return t

        OffloadedWeightsLoader.__getitem__ = getitem

    def restore(self):
        self.cls.__getitem__ = self.orig


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="gpt_neox",
                    help="the decoder (mamba2: a state-space model, no attention; --heads, --intermediate unused)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny model (2 layers, hidden 256, vocab 1024; ~9 MB), prompt 32 + 8 new tokens, "
                         "batches 1,4, 1 rep")
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default 4, quick 2)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden_size (default 512, quick 256)")
    ap.add_argument("--heads", type=int, default=None, help="num_attention_heads (default 8, quick 4)")
    ap.add_argument("--intermediate", type=int, default=None, help="intermediate_size (default 4 x hidden)")
    ap.add_argument("--vocab", type=int, default=None, help="vocab_size (default 1536, quick 1024)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128, quick 32)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 32, quick 8)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32, quick 1,4)")
    ap.add_argument("--budget-fraction", type=float, default=0.25, help="budget as a fraction of the weight bytes")
    ap.add_argument("--reps", type=int, default=None, help="timed warm generations of each method (default 3, quick 1)")
    ap.add_argument("--skip-accelerate", action="store_true", help="leave out both Accelerate baselines")
    ap.add_argument("--offload-root", default=None,
                    help="directory for all offload dirs (default: a fresh dir under the system temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--compress", choices=["int8", "int4"], default=None,
                    help="memsched keeps the weights and KV cache it homes on disk as group-wise integers "
                         "(compress_weights= and compress_kv_cache=; row 'memsched+int8'): not bit-exact, the "
                         "tokens column gives the share of new tokens equal to eager's")
    ap.add_argument("--fuse", action="store_true",
                    help="memsched with fuse=True: the compute between its scheduling points runs as Inductor-"
                         "compiled regions (compiled on the first generation, which is reported apart)")
    ap.add_argument("--profile", action="store_true",
                    help="also print a cProfile (cumulative) of one warm memsched generation at the first batch size")
    a = ap.parse_args()
    _common.quiet()
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "Some parameters are on the meta device ..."
    _common.set_threads(a.threads)

    layers = a.layers or (2 if a.quick else 4)
    hidden = a.hidden or (256 if a.quick else 512)
    heads = a.heads or (4 if a.quick else 8)
    inter = a.intermediate or 4 * hidden
    vocab = a.vocab or (1024 if a.quick else 1536)
    P = a.prompt or (32 if a.quick else 128)
    N = a.new_tokens or (8 if a.quick else 32)
    batches = [int(b) for b in (a.batches or ("1,4" if a.quick else "1,32")).split(",")]
    reps = a.reps or (1 if a.quick else 3)
    if N < 2:
        ap.error("--new-tokens must be at least 2 (one prefill token + decode steps)")

    model = build_model(layers, hidden, heads, inter, vocab, max(256, P + N), a.arch)
    wbytes = weight_bytes(model)
    budget0 = int(wbytes * a.budget_fraction)
    root = tempfile.mkdtemp(prefix="memsched-gen-bench-", dir=a.offload_root)
    print(f"memsched {memsched.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{_common.loadavg()} at start")
    shape = f"heads={heads} intermediate={inter} " if a.arch == "gpt_neox" else ""
    print(f"{ARCHS[a.arch]} layers={layers} hidden={hidden} {shape}vocab={vocab}: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, weights {fmt_bytes(wbytes)} "
          f"({wbytes / 1e6:.1f} MB); prompt {P} + {N} new tokens, batches {batches}; budget "
          f"{fmt_bytes(budget0)} ({a.budget_fraction:.0%} of weights); {reps} warm rep(s); offload root {root}",
          flush=True)
    if torch.get_num_threads() >= (os.cpu_count() or 1):
        print(f"  note: torch uses {torch.get_num_threads()} threads on {os.cpu_count()} cores; memsched's transfer "
              "threads and any other load then make OpenMP threads wait on each other (eager generations of a "
              "tiny model vary 10x here): compare with --threads 1 on a small machine", flush=True)

    rows, notes, details = [], [], []
    acc_reads = None
    acc_disk_model = None
    acc_map_models: dict[int, tuple] = {}
    try:
        if not a.skip_accelerate:
            try:
                import accelerate

                acc_reads = AccelerateReads()
                with _common.timer() as t:
                    acc_disk_model = copy.deepcopy(model)
                    accelerate.disk_offload(acc_disk_model, offload_dir=os.path.join(root, "acc-disk"),
                                            execution_device=torch.device("cpu"), offload_buffers=True)
                print(f"  accelerate {accelerate.__version__} disk_offload setup (deepcopy + write) {t['s']:.2f} s",
                      flush=True)
            except Exception as exc:  # reported in the rows
                acc_disk_model = exc

        def acc_map_for(budget):
            """A device_map-dispatched copy for ``budget`` (cached per budget) or the exception."""
            if budget in acc_map_models:
                return acc_map_models[budget]
            try:
                from accelerate import dispatch_model, infer_auto_device_map

                m = copy.deepcopy(model)
                # clean_result=False: at small budgets the cleaned map is {"": "disk"}, which
                # dispatch_model (accelerate 1.15) cannot offload (it writes no index.json and fails)
                dmap = infer_auto_device_map(m, max_memory={"cpu": budget}, clean_result=False,
                                             no_split_module_classes=list(m._no_split_modules or []))
                sizes = {"cpu": 0, "disk": 0}
                named = dict(m.named_parameters())
                named.update(dict(m.named_buffers()))
                for name, t in named.items():
                    dev = next((d for k, d in dmap.items() if k == "" or name == k or name.startswith(k + ".")),
                               "cpu")
                    sizes[str(dev) if str(dev) in sizes else "cpu"] += t.numel() * t.element_size()
                m = dispatch_model(m, dmap, main_device="cpu",
                                   offload_dir=os.path.join(root, f"acc-map-{budget}"), offload_buffers=True)
                entry = (m, dmap, sizes)
            except Exception as exc:
                entry = (exc, None, None)
            acc_map_models[budget] = entry
            return entry

        for B in batches:
            g = torch.Generator().manual_seed(B)
            ids = torch.randint(0, vocab, (B, P), generator=g)
            mask = torch.ones_like(ids)
            print(f"batch {B}:", flush=True)

            def hf_generate(m):
                with torch.no_grad():
                    return m.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)

            with _common.timer() as t:
                ref = hf_generate(model)
            print(f"  eager first generation {t['s']:.2f} s", flush=True)

            runners, failed, token_ok = {}, {}, {}
            runners["eager"] = lambda: hf_generate(model)

            # (b) memsched
            budget, at_min = budget0, False
            gen = None
            ms_extra = {"stats": [], "last": []}
            ms_options = dict(fuse=a.fuse)
            if a.compress:
                ms_options.update(compress_weights=a.compress, compress_kv_cache=a.compress)
            try:
                try:
                    gen = memsched.Generator(model, budget, batch=B, prompt_len=P, max_len=P + N, sample_ids=ids,
                                             device="cpu", offload_dir=os.path.join(root, f"memsched-{B}"),
                                             **ms_options)
                except memsched.InfeasibleBudgetError as exc:
                    print(f"  budget {fmt_bytes(budget)} is below memsched's minimum at batch {B}, "
                          f"{fmt_bytes(exc.min_budget_bytes)} ({exc.min_budget_bytes / wbytes:.0%} of weights): "
                          "using the minimum", flush=True)
                    budget, at_min = exc.min_budget_bytes, True
                    gen = memsched.Generator(model, budget, batch=B, prompt_len=P, max_len=P + N, sample_ids=ids,
                                             device="cpu", offload_dir=os.path.join(root, f"memsched-{B}"),
                                             **ms_options)
                pre, dec = gen.plans
                ms_extra["prefill_calls"] = B // gen.prefill_batch   # the prompt runs in micro-batches
                with _common.timer() as t:
                    toks, st = gen(ids, N)
                first_s = t["s"]
                token_ok["memsched"] = torch.equal(toks, ref)
                agree = (toks[:, P:] == ref[:, P:]).float().mean().item()
                print(f"  memsched plan (prefill + decode) {gen.plan_s:.2f} s; first generation {first_s:.2f} s "
                      f"(prefill {st.prefill_s * 1e3:.0f} ms, decode {st.decode_s * 1e3:.0f} ms); KV cache "
                      f"{fmt_bytes(gen.kv_cache_bytes)}", flush=True)
                for label, p in (("prefill", pre), ("decode", dec)):
                    tiers = p.tier_bytes()
                    moved = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(p.bytes_moved.items()) if v)
                    pred = as_float(p.predicted_time_s, f"batch {B} {label} plan.predicted_time_s")
                    free = as_float(p.unconstrained.time_s, f"batch {B} {label} plan.unconstrained.time_s")
                    details.append(f"  batch {B} {label} plan: solver {p.placement.status if p.placement else '-'}; "
                                   f"home device/host/disk {fmt_bytes(tiers.get('device', 0))}/"
                                   f"{fmt_bytes(tiers.get('host', 0))}/{fmt_bytes(tiers.get('disk', 0))}; "
                                   f"predicted {pred * 1e3:.1f} ms/call (unconstrained {free * 1e3:.1f} ms), "
                                   f"peak {fmt_bytes(p.peak_device_bytes)}; moves/call: {moved or 'nothing'}")
                    if hasattr(p, "kind_tier_bytes"):  # the KV cache's share of those homes
                        kv = p.kind_tier_bytes("kv_cache")
                        details[-1] += " (KV cache device/host/disk " + "/".join(
                            fmt_bytes(kv.get(k, 0)) for k in ("device", "host", "disk")) + ")"

                def run_ms(gen=gen, extra=ms_extra):
                    io0 = _common.proc_io()
                    out = gen(ids, N)
                    io1 = _common.proc_io()
                    extra["stats"].append(out[1])
                    extra["last"].append(gen.compiled.stats)
                    extra.setdefault("wchar", []).append(io1.get("wchar", 0) - io0.get("wchar", 0))
                    return out[0]

                runners["memsched"] = run_ms
            except Exception as exc:
                failed["memsched"] = f"{type(exc).__name__}: {exc}"
                print(f"  memsched failed: {failed['memsched']}", flush=True)

            # (c) accelerate disk_offload
            if a.skip_accelerate:
                failed["acc-disk"] = failed["acc-map"] = "skipped (--skip-accelerate)"
            else:
                acc_counts = {"acc-disk": [], "acc-map": []}

                def counted(m, key):
                    def run():
                        acc_reads.bytes, acc_reads.on = 0, True
                        try:
                            return hf_generate(m)
                        finally:
                            acc_reads.on = False
                            acc_counts[key].append(acc_reads.bytes)
                    return run

                def first_run(key, model, note=lambda: ""):
                    """The first generation of an Accelerate baseline: checked, then kept as a runner."""
                    if isinstance(model, Exception):
                        failed[key] = f"{type(model).__name__}: {model}"
                        return
                    try:
                        with _common.timer() as t:
                            out = counted(model, key)()
                        token_ok[key] = torch.equal(out, ref)
                        print(f"  {key} first generation {t['s']:.2f} s{note()}", flush=True)
                        runners[key] = counted(model, key)
                    except Exception as exc:
                        failed[key] = f"{type(exc).__name__}: {exc}"

                first_run("acc-disk", acc_disk_model)
                # (d) accelerate device_map at the same budget
                m, dmap, sizes = acc_map_for(budget)
                first_run("acc-map", m, lambda: (
                    f"; weights in RAM {fmt_bytes(sizes['cpu'])}, on disk {fmt_bytes(sizes['disk'])}; device_map "
                    f"{sum(1 for d in dmap.values() if d == 'disk')} of {len(dmap)} entries on disk"))
                for k, v in acc_counts.items():
                    v.clear()  # drop the warm-up counts
            for k, why in failed.items():
                if not why.startswith("skipped"):
                    print(f"  {k} cannot run: {why}", flush=True)

            # timed warm reps, order rotating
            for f in runners.values():  # one untimed warm-up round of each
                f()
            if "memsched" in runners:
                ms_extra["stats"].clear(), ms_extra["last"].clear(), ms_extra.get("wchar", []).clear()
            if not a.skip_accelerate:
                for v in acc_counts.values():
                    v.clear()
            times = {k: [] for k in runners}
            names = list(runners)
            for i in range(reps):
                order = names[i % len(names):] + names[:i % len(names)]
                for k in order:
                    t0 = time.perf_counter()
                    runners[k]()
                    times[k].append(time.perf_counter() - t0)
            med = {k: median(v) for k, v in times.items()}

            if a.profile and B == batches[0] and gen is not None:
                prof = cProfile.Profile()
                prof.enable()
                gen(ids, N)
                prof.disable()
                s = io.StringIO()
                pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(30)
                notes.append(f"cProfile of one warm memsched generation, batch {B}:\n{s.getvalue()}")

            gen_tokens = B * N
            for k in ("eager", "memsched", "acc-disk", "acc-map"):
                label = k + ("+fuse" if k == "memsched" and a.fuse else "")
                label += f"+{a.compress}" if k == "memsched" and a.compress else ""
                label += "*" if k in ("memsched", "acc-map") and at_min else ""
                if k in failed:
                    rows.append([label, B] + ["-"] * 8 + [f"cannot run: {failed[k]}"])
                    continue
                tm = med[k]
                vs_acc = f"{tm / med['acc-disk']:.2f}x" if "acc-disk" in med else "-"
                vs_eager = f"{tm / med['eager']:.2f}x"
                peak = per_tok = per_step = pred = "-"
                same = "reference" if k == "eager" else ("yes" if token_ok.get(k) else "NO")
                if k == "memsched" and a.compress:
                    same = f"{agree:.0%} of new tokens"
                if k == "eager":
                    per_tok = per_step = "0 (in RAM)"
                elif k == "memsched":
                    sts, last = ms_extra["stats"], ms_extra["last"]
                    pk = max(s.peak_device_bytes for s in sts)
                    peak = f"{fmt_bytes(pk)} / {fmt_bytes(budget)} ({pk / budget:.0%})"
                    per_tok = fmt_bytes(median([s.bytes_moved.get("disk_read", 0) for s in sts]) / gen_tokens)
                    per_step = fmt_bytes(median([s.bytes_moved.get("disk_read", 0) for s in last]))
                    meas = median([s.decode_s / (N - 1) for s in sts])
                    pred = f"{float(dec.predicted_time_s) * 1e3:.1f} / {meas * 1e3:.1f}"
                    moved = ", ".join(f"{lk} {fmt_bytes(v)}" for lk, v in sorted(sts[-1].bytes_moved.items()) if v)
                    details.append(
                        f"  batch {B} memsched: prefill {median([s.prefill_s for s in sts]) * 1e3:.1f} ms (predicted "
                        f"{float(pre.predicted_time_s) * 1e3:.1f} ms a call x {ms_extra['prefill_calls']} micro-batches), decode "
                        f"{median([s.decode_s for s in sts]) * 1e3:.1f} ms for {N - 1} steps; tokens/s (stats) "
                        f"{median([s.tokens_per_s for s in sts]):.1f}; moved per generation: {moved}; write() "
                        f"syscall bytes per generation (/proc/self/io wchar) "
                        f"{fmt_bytes(median(ms_extra.get('wchar', [0])))}; last decode step: stall "
                        f"{last[-1].stall_s * 1e3:.1f} ms, wall {last[-1].wall_s * 1e3:.1f} ms")
                else:
                    reads = acc_counts[k]
                    if reads:
                        per_tok = fmt_bytes(median(reads) / gen_tokens)
                        per_step = fmt_bytes(median(reads) / N) + " (avg/fwd)"
                    if k == "acc-map":
                        peak = f"weights in RAM {fmt_bytes(sizes['cpu'])}"
                rows.append([label, B, f"{tm * 1e3:.0f}", f"{gen_tokens / tm:.1f}", vs_acc, vs_eager, peak,
                             per_tok, per_step, pred, same])
            if gen is not None:
                gen.close()

        print()
        print(table(["method", "batch", "ms/generation", "tokens/s", "vs acc-disk", "vs eager",
                     "peak / budget", "disk read/token", "disk read/decode step",
                     "decode step ms pred/meas", "tokens = eager"], rows,
                    title=f"Generation: {ARCHS[a.arch]} {fmt_bytes(wbytes)} of weights, prompt {P} + {N} new tokens, "
                          f"budget {fmt_bytes(budget0)} ({a.budget_fraction:.0%} of weights); median of {reps} "
                          "warm generation(s)"))
        print("\n".join(details))
        print("Notes: '*' = the budget was below memsched's minimum at that batch size, so memsched and acc-map "
              "ran at memsched's minimum instead. Times exclude planning (memsched) and setup (Accelerate). "
              "memsched's disk read/decode step is the last decode call's RunStats; Accelerate's per-step column "
              "is its total over the generation / new tokens (prefill forward included). The offload files sit "
              "in the page cache (warm), so disk reads cost a memcpy, not the storage device. Accelerate's "
              "max_memory bounds the weights it keeps in RAM, not activations or its KV cache.")
        for n in sorted(set(ODDITIES)):
            print(f"memsched oddity: {n}")
        for n in notes:
            print(n)
        print(f"{_common.loadavg()} at end.")
    finally:
        if acc_reads is not None:
            acc_reads.restore()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
