#!/usr/bin/env python
"""The GPU measurements a first GPU session needs, in a few minutes, as one table.

Run by benchmarks/gpu_check.sh after tests/test_cuda.py. Every ratio is against a baseline
measured in the same run, on the same GPU:

  link bandwidth   a pinned host buffer copied to the device and back (CUDA events), against
                   the hardware profile memsched plans with (``memsched.get_hardware``);
  streaming        GPT-2 inference with its weights homed on host at a budget of --stream-fraction
                   of the weights: time per call against eager with the whole model on the GPU,
                   (or memsched's minimum, if higher), the allocator's peak (torch.cuda.max_memory_allocated, after a warm-up call)
                   against the budget, and the overlap of copies with kernels from a profiler
                   timeline (runtime/overlap.py) with the blocking syncs the calling thread made;
  generation       greedy decoding (GPT-NeoX, weights 4x the budget) against eager on the GPU
                   and Accelerate's cpu_offload: time, tokens equal, decode step vs predicted;
  training         one GPT-2 training step (forward + loss + backward) at --train-fraction of
                   memsched's unconstrained training peak: step time against eager and against
                   checkpointing every block, allocator peaks, loss and gradient error vs eager;
  kernels          a LLaMA-shaped training step with memsched's RMSNorm and rotary kernels
                   (Triton on CUDA) against the same step without them: time, allocator peak,
                   gradient distance.

    bash benchmarks/gpu_check.sh              # on the GPU machine (tests, then this script)
    python benchmarks/gpu_check.py --device cpu --quick   # a dry run of the logic on a CPU
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import _common
from _common import build_gpt2, fmt_bytes, median, table

import torch

import memsched


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps):
    """Median seconds of ``reps`` calls after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return median(times)


def peak_of(fn, device):
    """The allocator's peak over one call, above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def held_by_plan(cm, hw, above_before):
    """The allocator's peak as the plan counts it: ``peak_of`` leaves out what was allocated
    before the call, which after a warm-up is the plan's resident tensors and cuBLAS's
    workspace, both inside the budget: they are added back."""
    if above_before is None:
        return None
    return above_before + cm.plan.tier_bytes()["device"] + hw.workspace_bytes


def print_profile(what, fn, top=18):
    """The calling thread's Python time of one call, the functions that took most of it."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(fn)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    print(f"-- profile: {what}\n" + "\n".join(out.getvalue().splitlines()[4:]), flush=True)


def link_rows(device, hw, nbytes):
    if device.type != "cuda":
        return [["link h2d / d2h", "-", "-", "needs CUDA"]]
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rows = []
    for name, dst, src, profile in (("h2d", dev, host, hw.h2d_bw), ("d2h", host, dev, hw.d2h_bw)):
        dst.copy_(src, non_blocking=True)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        bw = 5 * nbytes / (start.elapsed_time(end) / 1e3)
        rows.append([f"link {name} ({fmt_bytes(nbytes)} pinned)", f"{bw / 1e9:.1f} GB/s",
                     f"{bw / profile:.2f}x of profile", f"profile {profile / 1e9:.1f} GB/s"])
    return rows


def streaming_rows(a, device, hw, root):
    model = build_gpt2(a.layers, a.embd, a.heads, a.vocab, a.seq)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = memsched.plan(model, (), 10**13, example_kwargs={"input_ids": ids}, hardware=hw).min_budget_bytes
    budget = max(floor, int(a.stream_fraction * weights))   # the LM head needs its whole weight
    eager = copy.deepcopy(model).to(device)
    ids_d = ids.to(device)
    with torch.no_grad():
        t_eager = timed(lambda: eager(input_ids=ids_d), device, a.reps)
        want = eager(input_ids=ids_d).logits.float().cpu()
    del eager
    cm = memsched.compile(model, budget, device=device, hardware=hw, offload_dir=root)
    try:
        got = cm(input_ids=ids).logits.float().cpu()
        t_ms = timed(lambda: cm(input_ids=ids), device, a.reps)
        peak = held_by_plan(cm, hw, peak_of(lambda: cm(input_ids=ids), device))
        stats = cm.stats
        if a.profile:
            print_profile("streaming call", lambda: cm(input_ids=ids))
        overlap = None
        if device.type == "cuda":
            from memsched.runtime.overlap import overlap_report

            overlap = overlap_report(lambda: cm(input_ids=ids))
    finally:
        cm.close()
    err = (got - want).abs().max().item()
    rows = [[f"stream: GPT-2 {a.layers}x{a.embd} infer {a.batch}x{a.seq}, weights {fmt_bytes(weights)}, "
             f"budget {fmt_bytes(budget)}", f"{t_ms * 1e3:.1f} ms", f"{t_ms / t_eager:.2f}x eager",
             f"eager (all on GPU) {t_eager * 1e3:.1f} ms; max |logits diff| {err:.1e}"],
            ["  stream: memsched peak / allocator peak", fmt_bytes(stats.peak_device_bytes), fmt_bytes(peak),
             "allocator/budget " + ("-" if peak is None else f"{peak / budget:.3f}")],
            ["  stream: moved per call", ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(stats.bytes_moved.items())),
             f"stall {stats.stall_s * 1e3:.1f} ms", ""]]
    if overlap is not None:
        rows.append(["  stream: copies overlapped with kernels", f"{overlap['overlapped']:.0%}",
                     f"h2d {overlap['h2d_ms']:.1f} ms, kernels {overlap['kernel_ms']:.1f} ms",
                     f"blocking syncs: caller {overlap['cpu_syncs']}, workers {overlap['worker_syncs']}"])
    return rows


def train_rows(a, device, hw, root):
    from train_frontier import wrap_checkpoint

    base = build_gpt2(a.layers, a.embd, a.heads, a.vocab, a.seq, train=True)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "labels": ids}

    def eager_like(model):
        m = model.to(device)
        kw_d = {k: v.to(device) for k, v in kw.items()}

        def step():
            m.zero_grad(set_to_none=True)
            m(**kw_d).loss.backward()
        return m, step

    eager, e_step = eager_like(copy.deepcopy(base))
    ckpt, c_step = eager_like(wrap_checkpoint(copy.deepcopy(base)))
    t_eager, p_eager = timed(e_step, device, a.reps), peak_of(e_step, device)
    t_ckpt, p_ckpt = timed(c_step, device, a.reps), peak_of(c_step, device)
    e_step()
    ref = [p.grad.float().cpu() for p in eager.parameters()]
    del eager, ckpt
    p0 = memsched.plan(base, (), budget=10**13, example_kwargs=kw, train=True, hardware=hw)
    budget = max(p0.min_budget_bytes, int(a.train_fraction * p0.program.peak_bytes))
    cm = memsched.compile(base, budget, train=True, device=device, hardware=hw, offload_dir=root)

    def m_step():
        base.zero_grad(set_to_none=True)
        cm(**kw).loss.backward()
    try:
        t_ms = timed(m_step, device, a.reps)
        p_ms = held_by_plan(cm, hw, peak_of(m_step, device))
        own = cm.stats.peak_device_bytes
        pred, header = cm.plan.predicted_time_s, cm.plan.header()
        if a.profile:
            print_profile("train step", m_step)
    finally:
        cm.close()
    # the same step with no budget to meet: the runtime's own cost, apart from the plan's moves
    t_free, pred_free = step_at(base, kw, p0.peak_device_bytes, device, hw, root, a.reps)
    print("  " + "\n  ".join(header), flush=True)
    rows = []
    if p_ckpt is not None:   # at what checkpointing holds in all (its weights and cuBLAS's workspace too)
        held = p_ckpt + sum(p.numel() * p.element_size() for p in base.parameters()) + hw.workspace_bytes
        try:
            t_at, pred_at = step_at(base, kw, held, device, hw, root, a.reps)
            rows.append([f"  train: memsched at checkpointing's memory ({fmt_bytes(held)})", f"{t_at * 1e3:.1f} ms",
                         f"{t_at / t_ckpt:.2f}x ckpt", f"predicted {pred_at * 1e3:.1f} ms"])
        except memsched.InfeasibleBudgetError as exc:
            rows.append([f"  train: memsched at checkpointing's memory ({fmt_bytes(held)})", "infeasible",
                         f"minimum {fmt_bytes(exc.min_budget_bytes)}", ""])
    scale = max(r.abs().max().item() for r in ref)
    err = max((p.grad.float().cpu() - r).abs().max().item() for p, r in zip(base.parameters(), ref)) / scale
    alloc = lambda p: "-" if p is None else fmt_bytes(p)  # noqa: E731
    return [[f"train: GPT-2 {a.layers}x{a.embd} step {a.batch}x{a.seq}, budget {fmt_bytes(budget)} "
             f"({a.train_fraction:g} of {fmt_bytes(p0.program.peak_bytes)})", f"{t_ms * 1e3:.1f} ms",
             f"{t_ms / t_eager:.2f}x eager, {t_ms / t_ckpt:.2f}x ckpt",
             f"eager {t_eager * 1e3:.1f} ms, checkpoint {t_ckpt * 1e3:.1f} ms; grad err {err:.1e}"],
            ["  train: allocator peaks", alloc(p_ms), f"eager {alloc(p_eager)}, ckpt {alloc(p_ckpt)}",
             f"memsched's own {fmt_bytes(own)}; allocator/budget " + ("-" if p_ms is None else f"{p_ms / budget:.3f}")],
            ["  train: measured / predicted", f"{t_ms * 1e3:.1f} / {pred * 1e3:.1f} ms",
             f"no budget: {t_free * 1e3:.1f} / {pred_free * 1e3:.1f} ms", f"no budget {t_free / t_eager:.2f}x eager"]
            ] + rows


def kernel_rows(a, device, hw, root):
    """A LLaMA-shaped decoder's training step at no budget to meet, with memsched's RMSNorm and
    rotary kernels (kernels="auto": Triton on CUDA) against the same plan without them: step
    time, allocator peak, and the gradients' distance from each other."""
    import transformers as T

    layers, hidden, heads = (2, 128, 2) if a.quick else (8, 1024, 16)
    config = T.LlamaConfig(vocab_size=a.vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                           use_cache=False)
    torch.manual_seed(0)
    base = T.LlamaForCausalLM(config).train()
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids, "labels": ids}
    measured, grads = {}, {}
    for kernels in (False, "auto"):
        free = memsched.plan(base, (), 10**13, example_kwargs=kw, train=True, hardware=hw, kernels=kernels)
        cm = memsched.compile(base, free.peak_device_bytes, train=True, device=device, hardware=hw,
                              offload_dir=root, kernels=kernels)

        def step():
            base.zero_grad(set_to_none=True)
            cm(**kw).loss.backward()
        try:
            measured[kernels] = (timed(step, device, a.reps), peak_of(step, device), cm.plan.passes[0].note)
            grads[kernels] = [p.grad.float().cpu() for p in base.parameters()]
        finally:
            cm.close()
    (t_off, p_off, _), (t_on, p_on, note) = measured[False], measured["auto"]
    scale = max(g.abs().max().item() for g in grads[False])
    err = max((x - y).abs().max().item() for x, y in zip(grads["auto"], grads[False])) / scale
    alloc = lambda p: "-" if p is None else fmt_bytes(p)  # noqa: E731
    return [[f"kernels: LLaMA {layers}x{hidden} step {a.batch}x{a.seq}, no budget ({note})", f"{t_on * 1e3:.1f} ms",
             f"{t_on / t_off:.2f}x without", f"without {t_off * 1e3:.1f} ms; grad err {err:.1e}"],
            ["  kernels: allocator peaks", alloc(p_on), "-" if None in (p_on, p_off) else f"{p_on / p_off:.3f}x without",
             f"without {alloc(p_off)}"]]


def step_at(base, kw, budget, device, hw, root, reps):
    """memsched's training step of ``base`` at ``budget``: (median seconds, predicted seconds)."""
    cm = memsched.compile(base, budget, train=True, device=device, hardware=hw, offload_dir=root)

    def step():
        base.zero_grad(set_to_none=True)
        cm(**kw).loss.backward()
    try:
        return timed(step, device, reps), cm.plan.predicted_time_s
    finally:
        cm.close()


def generation_rows(a, device, hw, root):
    """Greedy decoding of a GPT-NeoX decoder whose weights are 4x the budget (FlexGen's
    workload): memsched.Generator against eager with the whole model on the GPU and against
    Accelerate's cpu_offload (each module's weights copied in from RAM right before it runs)."""
    from generation import build_model, weight_bytes

    B, P, N = a.gen_batch, a.gen_prompt, a.gen_new
    model = build_model(a.gen_layers, a.gen_hidden, a.gen_hidden // 128, 4 * a.gen_hidden, a.gen_vocab, P + N)
    ids = torch.randint(1, a.gen_vocab, (B, P), generator=torch.Generator().manual_seed(2))
    wbytes = weight_bytes(model)
    budget = int(a.stream_fraction * wbytes)

    def hf_runner(m):
        ids_d = ids.to(device)
        return lambda: m.generate(ids_d, attention_mask=torch.ones_like(ids_d), max_new_tokens=N,
                                  do_sample=False, pad_token_id=0)
    eager = copy.deepcopy(model).to(device)
    with torch.no_grad():
        ref = hf_runner(eager)().cpu()
        t_eager = timed(hf_runner(eager), device, a.gen_reps)
    del eager
    torch.cuda.empty_cache() if device.type == "cuda" else None
    gen = memsched.Generator(model, budget, batch=B, prompt_len=P, max_len=P + N, sample_ids=ids,
                             device=device, hardware=hw, offload_dir=root)
    try:
        toks, st = gen(ids, N)
        same = torch.equal(toks.cpu(), ref)
        t_ms = timed(lambda: gen(ids, N), device, a.gen_reps)
        peak = peak_of(lambda: gen(ids, N), device)
        _, st = gen(ids, N)
        pred = gen.plans[1].predicted_time_s
    finally:
        gen.close()
    rows = [[f"generate: GPT-NeoX {a.gen_layers}x{a.gen_hidden} b{B} {P}+{N}, weights {fmt_bytes(wbytes)}, "
             f"budget {fmt_bytes(budget)}", f"{t_ms * 1e3:.0f} ms", f"{t_ms / t_eager:.2f}x eager",
             f"eager (all on GPU) {t_eager * 1e3:.0f} ms; tokens equal eager: {same}"],
            ["  generate: decode step measured / predicted", f"{st.decode_s / max(N - 1, 1) * 1e3:.1f} ms",
             f"{pred * 1e3:.1f} ms predicted", f"prefill {st.prefill_s * 1e3:.0f} ms; plan {st.plan_s:.1f} s"],
            ["  generate: memsched peak / allocator peak", fmt_bytes(st.peak_device_bytes),
             "-" if peak is None else fmt_bytes(peak), "allocator/budget " + ("-" if peak is None else f"{peak / budget:.3f}")]]
    try:
        from accelerate import cpu_offload

        acc = cpu_offload(copy.deepcopy(model), execution_device=device)
        with torch.no_grad():
            acc_same = torch.equal(hf_runner(acc)().cpu(), ref)
            t_acc = timed(hf_runner(acc), device, a.gen_reps)
        rows.append(["  generate: accelerate cpu_offload", f"{t_acc * 1e3:.0f} ms",
                     f"memsched {t_acc / t_ms:.2f}x faster", f"tokens equal eager: {acc_same}"])
    except ImportError:
        rows.append(["  generate: accelerate cpu_offload", "-", "-", "accelerate not installed"])
    return rows


def big_generation_rows(a, device, hw, root):
    """Issue 12's GPU case: a 7B-shaped LLaMA decoder (fp16, random weights made on the host)
    generating inside an 8 GB budget, weights streamed from pinned host memory: time per new
    token, the host->device bandwidth it achieved against the profile's, and eager with the
    whole model on the GPU (it fits an H200) as the bound."""
    from transformers import LlamaConfig, LlamaForCausalLM

    h, layers, inter = (256, 2, 688) if a.quick else (4096, 32, 11008)
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=max(h // 128, 2),
                      intermediate_size=inter, vocab_size=32000, max_position_embeddings=512, torch_dtype="float16")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval().requires_grad_(False)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).mul_(0.02))
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(cfg)   # its inv_freq buffer made again, for real
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = None, 0
    B, P, N = 1, 128, a.gen_new
    ids = torch.randint(1, 32000, (B, P), generator=gen)
    wbytes = sum(t.numel() * t.element_size() for t in model.parameters())
    budget = (64 << 20) if a.quick else 8 * 10**9
    with _common.timer() as t_gen:
        toks, st = memsched.generate(model, ids, budget=budget, max_new_tokens=N, device=device, hardware=hw,
                                     offload_dir=root, return_stats=True)
    step_s = st.decode_s / max(N - 1, 1)
    h2d = st.bytes_moved.get("h2d", 0)
    bw = h2d / (st.prefill_s + st.decode_s) if st.prefill_s + st.decode_s else 0.0
    rows = [[f"generate 7B-shaped: LLaMA {layers}x{h} fp16 b{B} {P}+{N}, weights {fmt_bytes(wbytes)}, "
             f"budget {fmt_bytes(budget)}", f"{step_s * 1e3:.0f} ms/token", f"plan {st.plan_s:.0f} s",
             f"prefill {st.prefill_s * 1e3:.0f} ms; whole call {t_gen['s']:.0f} s; peak {fmt_bytes(st.peak_device_bytes)}"],
            ["  7B: host->device achieved", f"{bw / 1e9:.1f} GB/s", f"{bw / hw.h2d_bw:.2f}x of profile",
             f"{fmt_bytes(h2d)} moved; profile {hw.h2d_bw / 1e9:.1f} GB/s"]]
    eager = model.to(device)
    ids_d = ids.to(device)
    with torch.no_grad():
        run = lambda: eager.generate(ids_d, attention_mask=torch.ones_like(ids_d), max_new_tokens=N,  # noqa: E731
                                     do_sample=False, pad_token_id=0)
        same = torch.equal(run().cpu(), toks)
        t_eager = timed(run, device, 1)
    rows.append(["  7B: eager, whole model on the GPU", f"{t_eager / N * 1e3:.0f} ms/token",
                 f"memsched {(st.prefill_s + st.decode_s) / t_eager:.1f}x its time", f"tokens equal: {same}"])
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="a small GPT-2 (a dry run of the logic)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of one call of each memsched part")
    ap.add_argument("--stream-fraction", type=float, default=0.25, help="streaming budget, of the weights")
    ap.add_argument("--big", action="store_true", help="also a 7B-shaped decoder generating in 8 GB (minutes)")
    ap.add_argument("--train-fraction", type=float, default=0.5, help="training budget, of the unconstrained peak")
    a = ap.parse_args()
    _common.quiet()
    q = a.quick
    a.layers, a.embd, a.heads, a.vocab = (2, 128, 2, 1024) if q else (12, 768, 12, 50257)
    a.batch, a.seq = (2, 64) if q else (8, 512)
    a.gen_layers, a.gen_hidden, a.gen_vocab = (2, 256, 1024) if q else (8, 2048, 32000)
    a.gen_batch, a.gen_prompt, a.gen_new, a.gen_reps = (2, 16, 4, 1) if q else (8, 128, 32, 2)
    device = torch.device(a.device)
    hw = memsched.get_hardware(None, device.type)
    root = tempfile.mkdtemp(prefix="memsched-gpu-check-")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"memsched {memsched.__version__}, torch {torch.__version__}, {name}; profile {hw.name}", flush=True)
    t0 = time.perf_counter()
    rows = link_rows(device, hw, 16 << 20 if q else 256 << 20)
    for part in (streaming_rows, train_rows, kernel_rows, generation_rows) + ((big_generation_rows,) if a.big else ()):
        try:
            rows += part(a, device, hw, root)
        except Exception as exc:  # noqa: BLE001 - one failing part must not hide the others' numbers
            rows.append([part.__name__, "FAILED", type(exc).__name__, str(exc).splitlines()[0][:160] if str(exc) else ""])
        print(f"  {part.__name__} done at {time.perf_counter() - t0:.0f} s", flush=True)
    print(table(["measure", "value", "ratio", "baseline / note"], rows, title="GPU check"))


if __name__ == "__main__":
    main()
