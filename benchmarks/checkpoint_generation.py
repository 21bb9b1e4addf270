#!/usr/bin/env python
"""Generation straight from a safetensors checkpoint: a ~1B LLaMA-shaped decoder on the meta device.

Stages, each in its own Python process (so one stage's memory never shows in another's RSS;
this parent process only imports the standard library and watches the children's RSS):

  1. write     a LLaMA-shaped decoder (default hidden 2048, 16 layers, intermediate 5504, 16 heads,
               8 kv heads (GQA), vocab 32000, untied embeddings: 0.87 B params, 3.5 GB fp32) is built
               on the meta device (accelerate.init_empty_weights) and written as safetensors shards
               of ~--shard-mb each with a model.safetensors.index.json weight_map and config.json.
               Each shard's tensors are created (seeded per tensor: linear weights normal(0, 0.02),
               the embedding table normal(0, 1) as nn.Embedding initialises it, norms ones), saved
               with safetensors.torch.save_file and freed before the next: the whole model is never
               in RAM. (With 0.02 for the embedding too, greedy decoding of such a random model
               repeats one token from the first step on; --embed-std 0.02 gives that.)
  2. generate  the model is built on meta again (init_empty_weights + tie_weights; rotary buffers
               stay real) and memsched.Generator(meta_model, budget, batch=1, prompt_len=P,
               max_len=P+N, device="cpu", weights=<dir>) plans prefill and decode up front; then
               --runs generations of N greedy tokens (the first pays for loading the weights the
               plan keeps resident; later ones are warm). Budget = --budget-fraction (0.25) of the
               checkpoint's bytes (memsched's minimum, marked '*', if that is infeasible).
               Before this stage the checkpoint's cached pages are dropped (fsync +
               posix_fadvise(DONTNEED); --warm skips it): /proc/self/io read_bytes then shows what
               really came from storage, rchar what was read through syscalls (page cache hits too).
  3. check     on a --quick-size model (the main checkpoint itself under --quick, otherwise a
               second, small checkpoint written the same way): memsched's tokens against
               transformers' greedy model.generate(do_sample=False) on a real model loaded with
               LlamaForCausalLM.from_pretrained(<dir>) from the same files (--no-check skips it).

Measured: write time and rate; planning time (Generator.plan_s and its passes); prefill, per-token
decode time and tokens/s; stats.peak_device_bytes against the budget; bytes read from the checkpoint
per token (stats.bytes_moved["disk_read"]) and per decode step; host memory of the generate process:
VmHWM (/proc/self/status, reset after planning via /proc/self/clear_refs so planning and generation
peaks are apart), ru_maxrss, and RssAnon / RssFile peaks sampled by the parent, against the model's
size and against baseline (imports + meta model) + budget + what is homed on the host tier + the KV
cache; RSS of mapped *.safetensors files (/proc/self/smaps) at each snapshot. RssFile also counts
library code pages (libtorch) that running the model touches for the first time. Nothing is
asserted; the ratios are for reading.

On a CPU device host RAM is the device tier: weights the plan keeps "on the device" are loaded once
into RAM and count in the budget; the local CPU profile has no host tier, so the rest is read from
the checkpoint files at every use. Those files fit the page cache of most machines: after the first
token the per-token reads usually hit it (see read_bytes vs rchar).

    python benchmarks/checkpoint_generation.py            # ~0.87 B params, 3.5 GB on disk (minutes)
    python benchmarks/checkpoint_generation.py --quick    # ~100 M params, 0.4 GB (< 2 min)
    python benchmarks/checkpoint_generation.py --layers 4 --dir /tmp/ckpt   # shrink it, keep the files
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import _common
from _common import table

FULL = dict(hidden=2048, layers=16, intermediate=5504, heads=16, kv_heads=8, vocab=32000)
QUICK = dict(hidden=768, layers=12, intermediate=2048, heads=12, kv_heads=4, vocab=16000)


def fmt_bytes(n) -> str:
    """memsched.format_bytes without importing memsched (and torch) into the parent process."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# -- memory and I/O of this process -------------------------------------------------------------
def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile (bytes) from /proc/self/status and ru_maxrss (bytes)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return out


def mapped_checkpoint_rss() -> int:
    """RSS of this process's mappings of *.safetensors files (/proc/self/smaps): checkpoint bytes
    that a memory map (safetensors' loader) keeps counted in RssFile."""
    total, ckpt = 0, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):  # a mapping's header line
                    ckpt = line.rstrip().endswith(".safetensors")
                elif ckpt and first == "Rss:":
                    total += int(line.split()[1]) * 1024
    except OSError:
        return 0
    return total


def snapshot(label: str) -> dict:
    s = proc_status()
    s["ckpt_mapped"] = mapped_checkpoint_rss()
    s.update({k: v for k, v in _common.proc_io().items() if k in ("rchar", "read_bytes", "wchar", "write_bytes")})
    s["label"], s["t"] = label, time.perf_counter()
    return s


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: '5' to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# -- the model --------------------------------------------------------------------------------
def make_config(shape: dict, dtype: str, max_pos: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=shape["hidden"], num_hidden_layers=shape["layers"],
                      intermediate_size=shape["intermediate"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                      max_position_embeddings=max_pos, tie_word_embeddings=False, use_cache=True,
                      attention_dropout=0.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.dtype = dtype
    cfg._attn_implementation = "sdpa"
    return cfg


def meta_model(cfg, dtype: str):
    """The decoder with its parameters on meta (buffers, e.g. rotary frequencies, real), built
    in ``dtype`` as from_pretrained(dtype=...) builds it."""
    import accelerate
    import torch
    from transformers import LlamaForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with accelerate.init_empty_weights():
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.tie_weights()
    return model.eval().requires_grad_(False)


def param_count(shape: dict) -> int:
    h, L, i, v = shape["hidden"], shape["layers"], shape["intermediate"], shape["vocab"]
    kv = shape["kv_heads"] * (h // shape["heads"])
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return L * per_layer + 2 * v * h + h


# -- stage 1: write ---------------------------------------------------------------------------
def stage_write(a) -> dict:
    import torch
    from safetensors.torch import save_file

    shape = json.loads(a.shape)
    dtype = getattr(torch, a.dtype)
    cfg = make_config(shape, a.dtype, a.max_pos)
    t0 = time.perf_counter()
    model = meta_model(cfg, a.dtype)
    specs = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    n_params = sum(p.numel() for p in model.parameters())
    del model
    item = torch.empty((), dtype=dtype).element_size()
    shards, cur, cur_bytes = [], [], 0
    limit = int(a.shard_mb * 1e6)
    for name, shp in specs:
        nb = item
        for d in shp:
            nb *= d
        if cur and cur_bytes + nb > limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shp))
        cur_bytes += nb
    if cur:
        shards.append(cur)
    os.makedirs(a.dir, exist_ok=True)
    weight_map, total, per_shard = {}, 0, []
    index = {n: i for i, (n, _) in enumerate(specs)}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        ts = time.perf_counter()
        tensors = {}
        for name, shp in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(shp, dtype=dtype)
            else:
                g = torch.Generator().manual_seed(a.seed * 100003 + index[name])
                std = a.embed_std if name.endswith("embed_tokens.weight") else a.init_std
                t = torch.empty(shp, dtype=torch.float32).normal_(0.0, std, generator=g)
                t = t.to(dtype) if dtype != torch.float32 else t
            tensors[name] = t
            weight_map[name] = fname
        made = time.perf_counter() - ts
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, os.path.join(a.dir, fname), metadata={"format": "pt"})
        del tensors, t
        per_shard.append({"file": fname, "tensors": len(shard), "bytes": nbytes, "create_s": made,
                          "save_s": time.perf_counter() - ts - made,
                          "rss_after": proc_status().get("VmRSS", 0)})
        total += nbytes
        print(f"    wrote {fname}: {len(shard)} tensors, {fmt_bytes(nbytes)} (create {made:.1f} s, save "
              f"{per_shard[-1]['save_s']:.1f} s)", flush=True)
    with open(os.path.join(a.dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    cfg.save_pretrained(a.dir)
    write_s = time.perf_counter() - t0
    return {"n_params": n_params, "bytes": total, "shards": per_shard, "write_s": write_s,
            "mem": proc_status(), "files": [s["file"] for s in per_shard]}


# -- stage 2: generate ------------------------------------------------------------------------
def plan_info(p) -> dict:
    def num(x):
        try:
            return float(x)
        except Exception:  # noqa: BLE001
            return None

    f = p.facts
    return {"status": f.status + (f", gap {f.mip_gap:.1%}" if f.mip_gap is not None else ""),
            "weights": p.kind_tier_bytes("weight"), "kv": p.kind_tier_bytes("kv_cache"),
            "tiers": {str(k): v for k, v in p.tier_bytes().items()},
            "predicted_s": num(p.predicted_time_s), "unconstrained_s": num(p.unconstrained.time_s),
            "peak": p.peak_device_bytes, "min_budget": p.min_budget_bytes,
            "moved": {str(k): v for k, v in p.bytes_moved.items()},
            "passes": [(r.name, r.seconds) for r in p.passes]}


def device_weights_union(plans) -> int | None:
    """Bytes of the weights that either plan homes on the device. Each plan's budget counts its
    own set; a Generator loads each checkpoint tensor once per tier and keeps it for its life,
    so the process holds the union. (Reads memsched's IR metadata; None if that changes.)"""
    try:
        from memsched.ir.meta import info

        sizes = {}
        for p in plans:
            for n in p.graph.graph.nodes:
                rec = info(n)
                if n.op == "placeholder" and rec.kind == "weight" and rec.tier == "device":
                    v = n.meta["val"]
                    sizes[n.name] = v.numel() * v.element_size()
        return sum(sizes.values())
    except Exception:  # noqa: BLE001 - a diagnostic only
        return None


def stage_generate(a) -> dict:
    snaps = [snapshot("start")]
    _common.quiet()
    import torch

    import memsched

    _common.set_threads(a.threads)
    snaps.append(snapshot("imports"))
    shape = json.loads(a.shape)
    from transformers import LlamaConfig

    cfg = LlamaConfig.from_pretrained(a.dir)
    cfg._attn_implementation = "sdpa"
    model = meta_model(cfg, a.dtype)
    on_meta = sum(1 for p in model.parameters() if p.device.type == "meta")
    snaps.append(snapshot("meta model"))
    with open(os.path.join(a.dir, "model.safetensors.index.json")) as f:
        wbytes = json.load(f)["metadata"]["total_size"]
    P, N = a.prompt, a.new_tokens
    ids = torch.randint(0, shape["vocab"], (1, P), generator=torch.Generator().manual_seed(a.seed))
    budget, at_min, oddities = int(wbytes * a.budget_fraction), False, []
    offload = os.path.join(a.work, "offload")
    os.makedirs(offload, exist_ok=True)

    def make(b):
        return memsched.Generator(model, b, batch=1, prompt_len=P, max_len=P + N, sample_ids=ids, device="cpu",
                                  weights=a.dir, offload_dir=offload)

    t0 = time.perf_counter()
    try:
        gen = make(budget)
    except memsched.InfeasibleBudgetError as exc:
        print(f"    budget {fmt_bytes(budget)} is below memsched's minimum {fmt_bytes(exc.min_budget_bytes)}: "
              f"using the minimum ({exc})", flush=True)
        budget, at_min = exc.min_budget_bytes, True
        t0 = time.perf_counter()
        gen = make(budget)
    construct_s = time.perf_counter() - t0
    snaps.append(snapshot("planned"))
    plan_hwm = snaps[-1].get("VmHWM", 0)
    hwm_reset = reset_hwm()
    plans = {"prefill": plan_info(gen.plans[0]), "decode": plan_info(gen.plans[1])}
    device_union = device_weights_union(gen.plans)
    runs, error = [], None
    try:
        for r in range(a.runs):
            s0 = snapshot(f"run {r + 1} start")
            tokens, st = gen(ids, N, eos_token_id=None)
            last = gen.compiled.stats  # the last decode step's RunStats
            s1 = snapshot(f"run {r + 1}")
            snaps.append(s1)
            runs.append({"prefill_s": st.prefill_s, "decode_s": st.decode_s, "new_tokens": st.new_tokens,
                         "tokens_per_s": st.tokens_per_s, "peak": st.peak_device_bytes,
                         "moved": dict(st.bytes_moved), "plans": st.plans,
                         "last_step": {"moved": dict(last.bytes_moved), "peak": last.peak_device_bytes,
                                       "stall_s": last.stall_s, "wall_s": last.wall_s},
                         "rchar": s1.get("rchar", 0) - s0.get("rchar", 0),
                         "read_bytes": s1.get("read_bytes", 0) - s0.get("read_bytes", 0),
                         "wchar": s1.get("wchar", 0) - s0.get("wchar", 0),
                         "wall_s": s1["t"] - s0["t"], "tokens": tokens.tolist(), "str": str(st)})
            print(f"    run {r + 1}: {st}", flush=True)
            if r == 0 and not torch.equal(tokens[:, :P], ids):
                oddities.append("the returned tokens do not start with the prompt")
    except Exception as exc:  # noqa: BLE001 - reported with the numbers measured so far
        error = f"{type(exc).__name__}: {exc}"
        print(f"    generation failed: {error}", flush=True)
    gen.close()
    snaps.append(snapshot("closed"))
    return {"params_on_meta": on_meta, "weight_bytes": wbytes, "budget": budget, "at_min": at_min,
            "kv_cache_bytes": gen.kv_cache_bytes, "plan_s": gen.plan_s, "construct_s": construct_s,
            "plans": plans, "runs": runs, "snaps": snaps, "device_union": device_union, "plan_hwm": plan_hwm,
            "hwm_reset": hwm_reset,
            "ids": ids.tolist(), "threads": torch.get_num_threads(), "oddities": oddities, "error": error,
            "versions": {"torch": torch.__version__, "memsched": getattr(memsched, "__version__", "?")}}


# -- stage 3: reference -----------------------------------------------------------------------
def stage_reference(a) -> dict:
    _common.quiet()
    import torch
    from transformers import LlamaForCausalLM

    _common.set_threads(a.threads)
    t0 = time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(a.dir, dtype=getattr(torch, a.dtype), attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - t0
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with open(a.ids) as f:
        ids = torch.tensor(json.load(f))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    gen_s = time.perf_counter() - t0
    # the greedy margins: how close the top two logits were at each step (ties flip on rounding)
    with torch.no_grad():
        logits = model(out[:, :-1]).logits[0, ids.shape[1] - 1:]
    top2 = logits.topk(2, dim=-1).values
    margin = float((top2[:, 0] - top2[:, 1]).min())
    return {"tokens": out.tolist(), "load_s": load_s, "generate_s": gen_s, "min_margin": margin,
            "mem": proc_status()}


# -- the parent -------------------------------------------------------------------------------
def run_stage(stage: str, a, extra: list[str], max_rss: int, label: str) -> tuple[dict | None, float, dict, str]:
    """Run one stage in a fresh interpreter; returns (result or None, wall s, the largest VmRSS,
    RssAnon and RssFile sampled every 0.2 s, error)."""
    result = os.path.join(a.work, f"{stage}-{label}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "--stage", stage, "--result", result,
           "--work", a.work, "--seed", str(a.seed), "--budget-fraction", str(a.budget_fraction),
           "--runs", str(a.runs), "--dtype", a.dtype, "--init-std", str(a.init_std),
           "--embed-std", str(a.embed_std)] + extra
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak, killed = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}, ""
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in peak:
                        peak[key] = max(peak[key], int(line.split()[1]) * 1024)
        except OSError:
            pass
        if peak["VmRSS"] > max_rss and not killed:
            killed = f"RSS {fmt_bytes(peak['VmRSS'])} passed --max-rss-gb: killed"
            proc.kill()
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not os.path.exists(result):
        return None, wall, peak, killed or f"exit status {proc.returncode}"
    with open(result) as f:
        return json.load(f), wall, peak, ""


def shape_args(shape: dict, a, P: int, N: int) -> list[str]:
    return ["--shape", json.dumps(shape), "--max-pos", str(max(2048, P + N)), "--prompt", str(P),
            "--new-tokens", str(N), "--shard-mb", str(a.shard_mb)]


def pct(x, y) -> str:
    return f"{x / y:.2f}x" if y else "-"


def run_stages(a, shape: dict, qshape: dict, P: int, N: int, max_rss: int) -> tuple:
    """Stages 1-3 in their subprocesses; returns (stages, rows_time, check, errors)."""
    stages, rows_time, errors, check = {}, [], [], None
    try:
        # 1. write
        print("[1/3] writing the checkpoint (one shard in RAM at a time)", flush=True)
        w, wall, peak, err = run_stage("write", a, shape_args(shape, a, P, N) + ["--dir", a.dir], max_rss, "main")
        stages["write"] = (w, wall, peak)
        if w is None:
            raise RuntimeError(f"write stage failed: {err}")
        rows_time.append(["write checkpoint (subprocess wall)", f"{wall:.1f}",
                          f"{fmt_bytes(w['bytes'])} in {len(w['shards'])} shards, "
                          f"{w['bytes'] / w['write_s'] / 1e6:.0f} MB/s incl. random init"])
        files = [os.path.join(a.dir, f) for f in w["files"]]
        # 2. generate
        dropped = 0 if a.warm else _common.drop_file_cache(files)
        cache = "warm: cache kept" if a.warm else f"cached pages of {dropped} files dropped first"
        print(f"[2/3] generating with memsched from the checkpoint ({cache})", flush=True)
        g, wall, peak, err = run_stage("generate", a, shape_args(shape, a, P, N) + ["--dir", a.dir], max_rss, "main")
        stages["generate"] = (g, wall, peak)
        if g is None:
            raise RuntimeError(f"generate stage failed: {err}")
        rows_time.append(["generate (subprocess wall)", f"{wall:.1f}", "imports, meta model, plan, runs"])
        if g.get("error"):
            errors.append(f"memsched generation failed: {g['error']}")
        # 3. check
        if not a.no_check:
            print("[3/3] correctness: memsched vs transformers' generate on a --quick-size model", flush=True)
            same_model = shape == qshape
            cdir, cg = a.dir, g
            if not same_model:
                cdir = os.path.join(a.work, "check-ckpt")
                cw, wall_w, _, err = run_stage("write", a, shape_args(qshape, a, P, N) + ["--dir", cdir,
                                               "--shard-mb", "128"], max_rss, "check")
                if cw is None:
                    raise RuntimeError(f"check: write failed: {err}")
                cg, wall_g, _, err = run_stage("generate", a, shape_args(qshape, a, P, N) + ["--dir", cdir],
                                               max_rss, "check")
                if cg is None:
                    raise RuntimeError(f"check: memsched generate failed: {err}")
                rows_time.append(["check: write + memsched generate", f"{wall_w + wall_g:.1f}",
                                  f"{param_count(qshape) / 1e6:.0f} M params"])
            ids_path = os.path.join(a.work, "ids.json")
            with open(ids_path, "w") as f:
                json.dump(cg["ids"], f)
            ref, wall, peak, err = run_stage("reference", a, shape_args(qshape, a, P, N)
                                             + ["--dir", cdir, "--ids", ids_path], max_rss, "check")
            if ref is None:
                raise RuntimeError(f"check: transformers reference failed: {err}")
            rows_time.append(["check: transformers from_pretrained + generate", f"{wall:.1f}",
                              f"load {ref['load_s']:.1f} s, generate {ref['generate_s']:.1f} s"])
            ms_tokens = [r["tokens"] for r in cg["runs"]]
            if not ms_tokens:
                raise RuntimeError(f"check: memsched generated nothing ({cg.get('error')})")
            check = {"equal": all(t == ref["tokens"] for t in ms_tokens), "ref": ref, "ms": ms_tokens[0],
                     "margin": ref["min_margin"], "P": P}
    except RuntimeError as exc:
        errors.append(str(exc))
    return stages, rows_time, check, errors


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="~100 M params (hidden 768, 12 layers, intermediate 2048, 12 heads, 4 kv heads, "
                         "vocab 16000; 0.4 GB fp32), 128 MB shards; also the correctness check's model")
    for k in FULL:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None,
                        help=f"{k} (default {FULL[k]}, quick {QUICK[k]})")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new-tokens", type=int, default=8, help="new tokens (default 8)")
    ap.add_argument("--budget-fraction", type=float, default=0.25, help="budget / checkpoint bytes (0.25)")
    ap.add_argument("--runs", type=int, default=2, help="generations with one Generator (default 2: cold, warm)")
    ap.add_argument("--shard-mb", type=float, default=None, help="shard size in MB (default 1000, quick 128)")
    ap.add_argument("--dir", default=None, help="write the checkpoint here and keep it (default: a temporary dir)")
    ap.add_argument("--warm", action="store_true", help="do not drop the checkpoint's cached pages before generating")
    ap.add_argument("--no-check", action="store_true", help="skip the comparison with transformers' generate")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-std", type=float, default=0.02, help="std of the random linear weights (0.02)")
    ap.add_argument("--embed-std", type=float, default=1.0,
                    help="std of the random embedding table (1.0, nn.Embedding's default init: with 0.02 "
                         "greedy decoding of these random models repeats one token, a weak equality check)")
    ap.add_argument("--max-rss-gb", type=float, default=16.0, help="kill a stage whose RSS passes this (16)")
    # internal: one stage in a child process
    ap.add_argument("--stage", choices=["write", "generate", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--max-pos", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--ids", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.stage:
        _common.quiet()
        out = {"write": stage_write, "generate": stage_generate, "reference": stage_reference}[a.stage](a)
        with open(a.result, "w") as f:
            json.dump(out, f)
        return

    if a.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the first comes from the prefill)")
    base = QUICK if a.quick else FULL
    shape = {k: getattr(a, k) or base[k] for k in FULL}
    qshape = dict(QUICK)
    a.shard_mb = a.shard_mb or (128 if a.quick else 1000)
    P, N = a.prompt, a.new_tokens
    a.work = tempfile.mkdtemp(prefix="memsched-ckpt-gen-")
    keep = a.dir is not None
    a.dir = os.path.abspath(a.dir) if keep else os.path.join(a.work, "ckpt")
    max_rss = int(a.max_rss_gb * 2**30)
    t_all = time.perf_counter()
    n = param_count(shape)
    print(f"{_common.loadavg()} at start; work dir {a.work}" + (f"; checkpoint kept in {a.dir}" if keep else ""))
    print(f"LLaMA-shaped decoder {shape} {a.dtype}: {n:,} params ({n / 1e9:.3f} B), "
          f"{fmt_bytes(n * (4 if a.dtype == 'float32' else 2))}; prompt {P} + {N} new tokens, batch 1, budget "
          f"{a.budget_fraction:.0%} of the weight bytes, CPU", flush=True)
    try:
        stages, rows_time, check, errors = run_stages(a, shape, qshape, P, N, max_rss)
        total = time.perf_counter() - t_all
        report(a, shape, n, stages, rows_time, check, errors, total, P, N)
    finally:
        shutil.rmtree(a.work, ignore_errors=True)  # the checkpoint too, unless --dir put it elsewhere
    if keep:
        print(f"checkpoint kept in {a.dir}")
    print(f"{_common.loadavg()} at end; total {total:.1f} s")
    if errors:
        sys.exit(1)


def report(a, shape, n, stages, rows_time, check, errors, total, P, N):
    print()
    w = stages.get("write", (None,))[0]
    if w:
        wpeak = stages["write"][2]
        print(table(["what", "value"], [
            ["params (counted on the meta model)", f"{w['n_params']:,} ({w['n_params'] / 1e9:.3f} B)"],
            ["checkpoint bytes", f"{fmt_bytes(w['bytes'])} ({w['bytes'] / 1e9:.2f} GB)"],
            ["shards", ", ".join(f"{fmt_bytes(s['bytes'])}" for s in w["shards"])],
            ["create / save time", f"{sum(s['create_s'] for s in w['shards']):.1f} s / "
                                   f"{sum(s['save_s'] for s in w['shards']):.1f} s"],
            ["writer peak RSS (VmHWM; sampled)", f"{fmt_bytes(w['mem'].get('VmHWM', 0))}; {fmt_bytes(wpeak['VmRSS'])} "
                                                 f"({pct(w['mem'].get('VmHWM', 0), w['bytes'])} of the model)"],
        ], title="Checkpoint"))
        print()
    g = stages.get("generate", (None,))[0]
    if g:
        wb, budget = g["weight_bytes"], g["budget"]
        star = "*" if g["at_min"] else ""
        runs = g["runs"]
        rows = [["planning (Generator construction; plan_s)", f"{g['construct_s']:.2f} s ({g['plan_s']:.2f} s)"]]
        for name in ("prefill", "decode"):
            pi = g["plans"][name]
            passes = ", ".join(f"{k} {v:.1f}" for k, v in pi["passes"] if v >= 0.05)
            rows.append([f"  {name} plan", f"solver {pi['status']}; passes (s): {passes}"])
        for i, r in enumerate(runs):
            steps = max(r["new_tokens"] - 1, 1)
            rows.append([f"run {i + 1}{' (first: loads resident weights)' if i == 0 else ''}",
                         f"prefill {r['prefill_s'] * 1e3:.0f} ms, decode {r['decode_s'] * 1e3:.0f} ms = "
                         f"{r['decode_s'] / steps * 1e3:.0f} ms/token, {r['tokens_per_s']:.2f} tokens/s, "
                         f"wall {r['wall_s']:.1f} s"])
        print(table(["stage", "time"], rows, title=f"Generation timing ({g['threads']} torch threads)"))
        print()
        rows = []
        for name in ("prefill", "decode"):
            pi = g["plans"][name]
            wt, kv = pi["weights"], pi["kv"]
            moved = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(pi["moved"].items()) if v) or "nothing"
            rows.append([name, "/".join(fmt_bytes(wt.get(t, 0)) for t in ("device", "host", "disk")),
                         "/".join(fmt_bytes(kv.get(t, 0)) for t in ("device", "host", "disk")),
                         fmt_bytes(pi["peak"]), fmt_bytes(pi["min_budget"]),
                         f"{pi['predicted_s'] * 1e3:.0f}" if pi["predicted_s"] is not None else "?",
                         f"{pi['unconstrained_s'] * 1e3:.0f}" if pi["unconstrained_s"] is not None else "?", moved])
        print(table(["plan", "weights dev/host/disk", "KV dev/host/disk", "pred. peak", "min budget",
                     "pred. ms/call", "unconstr. ms", "moves/call (predicted)"], rows,
                    title=f"Plans at budget {fmt_bytes(budget)}{star} ({budget / wb:.0%} of {fmt_bytes(wb)} weights)"))
        print()
        rows = []
        for i, r in enumerate(runs):
            ntok = max(r["new_tokens"], 1)
            steps = max(r["new_tokens"] - 1, 1)
            dr = r["moved"].get("disk_read", 0)
            rows.append([f"run {i + 1}", f"{fmt_bytes(r['peak'])} / {fmt_bytes(budget)}{star}",
                         f"{r['peak'] / budget:.0%}", fmt_bytes(dr), fmt_bytes(dr / ntok),
                         fmt_bytes(r["last_step"]["moved"].get("disk_read", 0)),
                         f"{r['last_step']['stall_s'] * 1e3:.0f}/{r['last_step']['wall_s'] * 1e3:.0f}",
                         fmt_bytes(r["rchar"]), fmt_bytes(r["read_bytes"]), fmt_bytes(r["wchar"])])
        print(table(["run", "peak device / budget", "peak %", "disk_read", "disk_read/token",
                     "last decode step", "stall/wall ms", "rchar", "read_bytes (storage)", "wchar"], rows,
                    title="Device bytes and reads (disk_read = memsched's reads from the checkpoint; rchar = all read "
                          "syscalls; read_bytes = what missed the page cache)"))
        print()
        snaps = {s["label"]: s for s in g["snaps"]}
        base, planned = snaps["meta model"]["VmRSS"], snaps["planned"]["VmRSS"]
        host_homed = g["plans"]["decode"]["weights"].get("host", 0) + g["plans"]["decode"]["kv"].get("host", 0)
        expect = planned + budget + host_homed + g["kv_cache_bytes"]
        gen_hwm = snaps[f"run {len(runs)}"].get("VmHWM", 0) if runs else 0
        maxrss = snaps["closed"]["ru_maxrss"]
        sampled = stages["generate"][2]
        anon_growth = sampled["RssAnon"] - snaps["planned"].get("RssAnon", 0)
        ckpt_mapped = max(s.get("ckpt_mapped", 0) for s in g["snaps"])
        rows = []
        labels = ["start", "imports", "meta model", "planned"] + [f"run {i + 1}" for i in range(len(runs))]
        for label in labels + ["closed"]:
            s = snaps[label]
            rows.append([label, fmt_bytes(s.get("VmRSS", 0)), fmt_bytes(s.get("RssAnon", 0)),
                         fmt_bytes(s.get("RssFile", 0)), fmt_bytes(s.get("ckpt_mapped", 0)),
                         fmt_bytes(s.get("VmHWM", 0)), fmt_bytes(s["ru_maxrss"]),
                         fmt_bytes(s.get("read_bytes", 0)), fmt_bytes(s.get("rchar", 0))])
        print(table(["after", "VmRSS", "RssAnon", "RssFile", "ckpt mapped", "VmHWM", "ru_maxrss", "read_bytes",
                     "rchar"], rows,
                    title="Host memory of the generate process (ckpt mapped = RSS of *.safetensors mappings, smaps; "
                          "read_bytes/rchar cumulative)"
                          + ("" if g["hwm_reset"] else "; VmHWM could NOT be reset after planning")))
        print()
        dev = [g["plans"][p]["weights"].get("device", 0) for p in ("prefill", "decode")]
        union = g.get("device_union")
        rows = [
            ["model size (checkpoint bytes)", fmt_bytes(wb), "1.00x", ""],
            ["RSS before planning (imports + meta model)", fmt_bytes(base), pct(base, wb), ""],
            ["RSS after planning (+ both plans)", fmt_bytes(planned), pct(planned, wb), ""],
            ["budget" + star, fmt_bytes(budget), pct(budget, wb), ""],
            ["weights homed on the device: prefill / decode plan", f"{fmt_bytes(dev[0])} / {fmt_bytes(dev[1])}",
             f"{pct(dev[0], wb)} / {pct(dev[1], wb)}", "each inside its plan's budget"],
            ["  either plan (union: what the Generator loads and keeps)", fmt_bytes(union),
             pct(union, wb) if union is not None else "-", f"{pct(union, budget)} of the budget" if union else ""],
            ["homed on host tier (weights + KV) + KV cache tensors", fmt_bytes(host_homed + g["kv_cache_bytes"]),
             pct(host_homed + g["kv_cache_bytes"], wb), ""],
            ["expected bound: RSS after planning + budget + host + KV", fmt_bytes(expect), pct(expect, wb), ""],
            ["peak RSS while planning (VmHWM)", fmt_bytes(g["plan_hwm"]), pct(g["plan_hwm"], wb), ""],
            ["peak RSS while generating (VmHWM" + (", reset after planning)" if g["hwm_reset"] else ")"),
             fmt_bytes(gen_hwm), pct(gen_hwm, wb), f"{pct(gen_hwm, expect)} of the expected bound"],
            ["peak RSS, whole process (ru_maxrss)", fmt_bytes(maxrss), pct(maxrss, wb),
             f"{pct(maxrss, expect)} of the bound"],
            ["peak RSS sampled by the parent (every 0.2 s)", fmt_bytes(sampled["VmRSS"]), pct(sampled["VmRSS"], wb),
             ""],
            ["  largest RssAnon sampled", fmt_bytes(sampled["RssAnon"]), pct(sampled["RssAnon"], wb), ""],
            ["  its growth over RSS after planning", fmt_bytes(anon_growth), pct(anon_growth, wb),
             f"{pct(anon_growth, budget)} of the budget"],
            ["  largest RssFile sampled (libraries + mapped files)", fmt_bytes(sampled["RssFile"]),
             pct(sampled["RssFile"], wb), ""],
            ["  checkpoint files mapped, largest at a snapshot", fmt_bytes(ckpt_mapped), pct(ckpt_mapped, wb),
             f"{pct(ckpt_mapped, budget)} of the budget"],
        ]
        print(table(["host memory", "bytes", "/ model", "note"], rows,
                    title="Host memory against the model and the budget"))
        print(f"  (generating peak - RSS after planning) / budget: {pct(gen_hwm - planned, budget)}; "
              f"generating peak / model size: {pct(gen_hwm, wb)}")
        if g.get("error"):
            print(f"  ERROR in generation (run {len(runs) + 1}): {g['error']}")
        if g["oddities"]:
            print("  oddities: " + "; ".join(g["oddities"]))
        print()
    if check:
        ref = check["ref"]
        P = check["P"]
        lines = [["memsched tokens == transformers generate", "yes" if check["equal"] else "NO"],
                 ["new tokens (memsched)", str(check["ms"][0][P:])],
                 ["new tokens (transformers)", str(ref["tokens"][0][P:])],
                 ["distinct new tokens", str(len(set(ref["tokens"][0][P:])))],
                 ["smallest top-1/top-2 logit gap (transformers)", f"{check['margin']:.2e}"],
                 ["transformers eager generate (from RAM)",
                  f"{ref['generate_s']:.2f} s for {len(ref['tokens'][0]) - P} tokens"],
                 ["transformers reader peak RSS (VmHWM)", fmt_bytes(ref["mem"].get("VmHWM", 0))]]
        print(table(["correctness (quick-size model, same checkpoint files)", ""], lines))
        print()
    print(table(["stage", "s", "note"], rows_time + [["total", f"{total:.1f}", ""]], title="Stage wall times"))
    for e in errors:
        print(f"ERROR: {e}")


if __name__ == "__main__":
    main()
