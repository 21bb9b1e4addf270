#!/usr/bin/env python
"""Training memory/speed frontier: memsched train=True against PyTorch's own memory savers.

One GPT-2 (transformers GPT2Config, random weights, dropout 0; default n_layer=6, n_embd=256,
n_head=4, vocab 4096, input 4 x 256) and one training step = forward with labels -> loss ->
backward (no optimizer step; gradients are set to None before every step, so each step
allocates them afresh, as the first step of training does; the model output, logits included,
is held through the backward as in `out = model(**batch); out.loss.backward()`; with --loss-only
every method trains a wrapper returning the loss alone instead, the form in which memsched can
run the LM head with its cross-entropy in slices of rows). Measured in the same process:

  eager            the model as is;
  checkpoint       every transformer block (model.transformer.h[i]) run through
                   torch.utils.checkpoint.checkpoint(..., use_reentrant=False);
  save_on_cpu      the forward under torch.autograd.graph.save_on_cpu(): on a CPU-only machine
                   it saves nothing (tensor.cpu() of a CPU tensor is the tensor itself): reported
                   anyway, it shows the cost of the hooks;
  compile@B        torch.compile (inductor) with torch._functorch.config.activation_memory_budget
                   = B (the min-cut partitioner recomputes activations to stay under that fraction
                   of the saved-activation bytes); compile time is reported separately;
  memsched@F       memsched.compile(model, F x the unconstrained training peak, train=True,
                   device="cpu") for F in --fractions, and at the minimum budget;
  memsched+fuse@F  the same with fuse=True: the compute between scheduling points runs as regions
                   compiled by Inductor (--fuse off|on|both, default both).

Timing: every method does --warmup steps (the first includes compile / plan), then --reps rounds
in which every method does one timed step (the order rotates each round so noise hits all
alike); the median is reported. Peaks are measured in separate passes (not timed):

  tracked peak     a TorchDispatchMode that sees every ATen op's outputs and counts their
                   storages (by StorageImpl, so views and aliases count once) until they are
                   freed, plus the parameters and inputs live from the start: weights + saved and
                   transient activations + produced gradients, as op outputs. Comparable with
                   memsched's own stats.peak_device_bytes (which counts the same things in its
                   runtime). Blind to inductor's buffers (allocated outside the dispatcher), so not
                   used for compile rows;
  allocator peak   the profiler's CPU allocator events (torch.profiler, profile_memory=True) over
                   one step, plus the parameters and inputs: every allocation, including buffers
                   inside ops that no tensor output shows. The one measure compile rows have, and
                   the second frontier comparison uses it for every row.

memsched's tracked and allocator peaks are taken on the first call of a freshly compiled module
(planned at construction), so that everything it holds is allocated inside the measured step.

    python benchmarks/train_frontier.py --threads 1   # full run (~4-8 min; inductor compiles are slow)
    python benchmarks/train_frontier.py --quick       # small model, no torch.compile (~30-60 s)

On a small shared machine use --threads 1: with more torch threads than idle cores every step
becomes several times slower (OpenMP threads wait on each other).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import gc
import shutil
import tempfile
import time

import _common
from _common import build_gpt2, fmt_bytes, median, table

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import memsched
from memsched.runtime.regions import allocator_peak as _allocator_peak


# -- the model ------------------------------------------------------------------------------

def build_model(n_layer, n_embd, n_head, vocab, seq, loss_only=False):
    model = build_gpt2(n_layer, n_embd, n_head, vocab, seq, train=True)
    return LossOnly(model) if loss_only else model


class LossOnly(torch.nn.Module):
    """The LM whose forward returns the loss alone (--loss-only): no method holds the logits
    through the backward, and memsched can run the LM head with its loss in slices of rows."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    @property
    def transformer(self):
        return self.lm.transformer

    def forward(self, input_ids, labels):
        return self.lm(input_ids=input_ids, labels=labels).loss


def loss_of(out):
    return out if isinstance(out, torch.Tensor) else out.loss


def tensor_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[StorageWeakRef(st).cdata] = st.nbytes()
    return sum(seen.values())


def wrap_checkpoint(model):
    """Every transformer block's forward through torch.utils.checkpoint (non-reentrant)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.transformer.h:
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward
    return model


# -- peak measurement ----------------------------------------------------------------------

class LiveTensorBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive at once, seen through the ATen dispatcher.

    Every output tensor of every op is registered by its storage (``StorageWeakRef.cdata``,
    the StorageImpl: a view or an in-place result shares its base's storage and counts once)
    with the storage's size, and stays counted until the storage is freed (its weak reference
    expires; checked before every op, so the peak is taken right after an op's outputs exist,
    with everything freed before that op gone). Tensors given to ``preexisting`` (weights,
    inputs) count from the start. What it cannot see: scratch buffers inside an op, and
    allocations that bypass the dispatcher (inductor's generated code) or happen on other
    threads (dispatch modes are thread-local)."""

    def __init__(self, preexisting=(), exclude=(), base_bytes=0):
        super().__init__()
        self.live: dict[int, list] = {}  # cdata -> [StorageWeakRef, nbytes]
        # storages never counted (memsched: the model's own weights, counted as base_bytes by tier)
        self.exclude = {StorageWeakRef(t.untyped_storage()).cdata for t in exclude}
        self._keep = list(exclude)  # their cdata must not be reused while we compare against it
        self.aside = False          # True: new storages are set aside, not counted (see delivered_apart)
        self.set_aside: dict = {}   # cdata -> StorageWeakRef
        self.current = base_bytes
        self.peak = 0
        self.ops = 0
        for t in preexisting:
            self._add(t)
        self.peak = self.current

    def _add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.is_sparse:
            return
        st = t.untyped_storage()
        n = st.nbytes()
        ref = StorageWeakRef(st)
        if self.aside and ref.cdata not in self.live:
            self.set_aside[ref.cdata] = ref   # a weak reference: autograd must still steal the tensor
        if ref.cdata in self.set_aside and self.set_aside[ref.cdata].expired():
            del self.set_aside[ref.cdata]     # that storage died; this is a new one at its address
        if ref.cdata in self.exclude or ref.cdata in self.set_aside:
            return
        entry = self.live.get(ref.cdata)
        if entry is None:
            if n:
                self.live[ref.cdata] = [ref, n]
                self.current += n
        elif entry[1] != n:  # resized in place (out= ops)
            self.current += n - entry[1]
            entry[1] = n

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current -= self.live.pop(k)[1]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._sweep()
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in pytree.tree_leaves(out):
            self._add(t)
        self.peak = max(self.peak, self.current)
        return out


@contextlib.contextmanager
def delivered_apart(tracker):
    """Gradients a memsched plan homes off the device (host or disk) are handed to the caller
    after the step, as host tensors (``TransferEngine.materialize``): the caller's, like the
    weights homed there, so the tracker counts them apart (``tracker.delivered``). On this
    CPU-only machine host and device are the same RAM, so they still show in the allocator peak."""
    from memsched.runtime.transfer import TransferEngine

    real = TransferEngine.materialize
    tracker.delivered = 0

    def materialize(engine, handle):
        tracker.aside = True   # the storages made here are the delivery's, not the step's
        try:
            out = real(engine, handle)
        finally:
            tracker.aside = False
        tracker.delivered += out.untyped_storage().nbytes()
        return out

    TransferEngine.materialize = materialize
    try:
        yield
    finally:
        TransferEngine.materialize = real


def allocator_peak(fn) -> int:
    """Peak bytes allocated by the CPU allocator during ``fn()`` and not yet freed (allocations
    made before ``fn`` are not counted: add them yourself). From torch.profiler's memory events,
    read by the helper memsched's runtime checks fused regions with."""
    return _allocator_peak(lambda _: fn(), (None,))[1]


# -- methods ------------------------------------------------------------------------------

class Method:
    def __init__(self, name, model, call, *, kind, note="", preexisting=None):
        self.name, self.model, self.call, self.kind, self.note = name, model, call, kind, note
        self.times: list[float] = []
        self.first_s = None
        self.stats: list = []          # memsched RunStats per timed step
        self.tracked = None
        self.alloc = None
        self.loss = None
        self.grad_err = None
        self.error = None
        self.cm = None
        self.budget = None
        self.graphs = None
        self.fresh_peaks = None  # memsched: its own peaks in the peak passes
        self.delivered = 0       # memsched: gradient bytes handed over off the device after the step
        self.fuse = False        # memsched: planned with fuse=True
        self.preexisting = preexisting  # tensors live at the start of a step (weights, inputs)

    def step(self) -> float:
        self.model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        out = self.call()  # the whole output (logits too) stays alive through the backward,
        loss_of(out).backward()  # as in `out = model(**batch); out.loss.backward()`
        dt = time.perf_counter() - t0
        self.loss = loss_of(out).detach()
        if self.cm is not None:
            self.stats.append(self.cm.stats)
        return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small model (2 layers, n_embd 128, vocab 1024, input 2x128), 1 warmup, 3 reps, "
                         "memsched at 1.0/0.6/min, no torch.compile unless --compile-budgets is given")
    ap.add_argument("--layers", type=int, default=None, help="n_layer (default 6, quick 2)")
    ap.add_argument("--embd", type=int, default=None, help="n_embd (default 256, quick 128)")
    ap.add_argument("--heads", type=int, default=None, help="n_head (default 4, quick 2)")
    ap.add_argument("--vocab", type=int, default=None, help="vocab size (default 4096, quick 1024)")
    ap.add_argument("--batch", type=int, default=None, help="batch (default 4, quick 2)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 256, quick 128)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per method (default 2, quick 1)")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per method (default 7, quick 3)")
    ap.add_argument("--fractions", default=None,
                    help="memsched budgets as fractions of its unconstrained training peak, comma-separated; "
                         "'min' is the minimum budget, 'ckpt' checkpoint-every-block's measured peak "
                         "(default 1.0,0.8,0.6,ckpt,min; quick 1.0,0.6,min)")
    ap.add_argument("--compile-budgets", default=None,
                    help="activation_memory_budget values for torch.compile, comma-separated; '' skips "
                         "torch.compile (default 1.0,0.5,0.2; quick '')")
    ap.add_argument("--warm-compile-cache", action="store_true",
                    help="leave inductor's FX graph cache and AOTAutograd cache on (default: off, so the "
                         "compile time is a cold compile)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="memsched solver time limit (time_limit_s), default memsched's own (10 s)")
    ap.add_argument("--fuse", choices=("off", "on", "both"), default="both",
                    help="memsched rows without fusion, with it (fuse=True), or both (default)")
    ap.add_argument("--loss-only", action="store_true",
                    help="every method trains a wrapper whose forward returns the loss alone (the logits "
                         "are not held through the backward; memsched may split the LM head with its loss)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--offload-root", default=None, help="where memsched's offload files go (default: a temp dir)")
    a = ap.parse_args()
    _common.quiet()
    _common.set_threads(a.threads)

    q = a.quick
    n_layer = a.layers or (2 if q else 6)
    n_embd = a.embd or (128 if q else 256)
    n_head = a.heads or (2 if q else 4)
    vocab = a.vocab or (1024 if q else 4096)
    batch = a.batch or (2 if q else 4)
    seq = a.seq or (128 if q else 256)
    warmup = a.warmup if a.warmup is not None else (1 if q else 2)
    reps = a.reps or (3 if q else 7)
    fractions = (a.fractions or ("1.0,0.6,min" if q else "1.0,0.8,0.6,ckpt,min")).split(",")
    cbudgets = a.compile_budgets if a.compile_budgets is not None else ("" if q else "1.0,0.5,0.2")
    cbudgets = [float(x) for x in cbudgets.split(",") if x.strip()]
    ms_options = {} if a.time_limit is None else {"time_limit_s": a.time_limit}

    base = build_model(n_layer, n_embd, n_head, vocab, seq, loss_only=a.loss_only)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    kw = {"input_ids": ids, "labels": ids}
    params = list(base.parameters())
    wbytes = tensor_bytes(params)
    root = tempfile.mkdtemp(prefix="memsched-train-bench-", dir=a.offload_root)
    print(f"memsched {memsched.__version__}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"{_common.loadavg()} at start")
    print(f"GPT-2 n_layer={n_layer} n_embd={n_embd} n_head={n_head} vocab={vocab}: "
          f"{sum(p.numel() for p in params) / 1e6:.2f} M params, weights {fmt_bytes(wbytes)} fp32; input "
          f"{batch}x{seq} with labels; step = forward + loss + backward (grads set to None before each)")

    methods: list[Method] = []

    def inputs_of(model):
        return list(model.parameters()) + list(model.buffers()) + [ids]

    # eager, checkpoint, save_on_cpu
    eager_model = copy.deepcopy(base)
    methods.append(Method("eager", eager_model, lambda: eager_model(**kw), kind="baseline",
                          preexisting=inputs_of(eager_model)))
    ck_model = wrap_checkpoint(copy.deepcopy(base))
    methods.append(Method("checkpoint (every block)", ck_model, lambda: ck_model(**kw), kind="baseline",
                          preexisting=inputs_of(ck_model)))
    soc_model = copy.deepcopy(base)

    def soc_call():
        with torch.autograd.graph.save_on_cpu(pin_memory=False):
            return soc_model(**kw)

    methods.append(Method("save_on_cpu", soc_model, soc_call, kind="baseline",
                          note="CPU-only: .cpu() of a CPU tensor is itself, nothing is moved",
                          preexisting=inputs_of(soc_model)))

    # torch.compile at activation memory budgets
    if cbudgets:
        from torch._inductor.compile_fx import compile_fx

        if not a.warm_compile_cache:
            torch._inductor.config.fx_graph_cache = False
            torch._functorch.config.enable_autograd_cache = False

        for b in cbudgets:
            c_model = copy.deepcopy(base)
            graphs = []

            def backend(gm, example_inputs, _b=b, _graphs=graphs):
                # a distinct backend per budget: dynamo's backend guard keeps the compiled
                # graphs apart; the partitioner reads the budget while compile_fx partitions
                _graphs.append(len(gm.graph.nodes))
                with torch._functorch.config.patch(activation_memory_budget=_b):
                    return compile_fx(gm, example_inputs)

            compiled = torch.compile(c_model, backend=backend)
            m = Method(f"compile amb={b:g}", c_model, lambda _c=compiled: _c(**kw), kind="compile",
                       preexisting=inputs_of(c_model))
            m.graphs = graphs
            methods.append(m)

    # memsched at fractions of its unconstrained training peak
    ms_model = copy.deepcopy(base)
    with _common.timer() as t:
        p0 = memsched.plan(ms_model, (), budget=10**13, example_kwargs=kw, train=True, **ms_options)
    peak0, unsplit_min = p0.program.peak_bytes, p0.min_budget_bytes
    with _common.timer() as t_min:   # below the unsplit minimum memsched splits ops (chunk_ops): its own minimum
        try:
            memsched.plan(ms_model, (), budget=1, example_kwargs=kw, train=True, **ms_options)
        except memsched.InfeasibleBudgetError as e:
            min_budget = e.min_budget_bytes
    print(f"memsched unconstrained training peak {fmt_bytes(peak0)}, planned in {t['s']:.1f} s; minimum budget "
          f"{fmt_bytes(min_budget)} ({min_budget / peak0:.0%}; {fmt_bytes(unsplit_min)} without splitting ops), "
          f"found in {t_min['s']:.1f} s; hardware profile {p0.hardware.name}")
    seen_budgets = set()
    for f in fractions:
        if f == "ckpt":  # checkpoint-every-block's own peak, measured by the tracker (untimed)
            ck_model.zero_grad(set_to_none=True)
            tracker = LiveTensorBytes(inputs_of(ck_model))
            with tracker:
                out = ck_model(**kw)  # the output (logits) held through the backward, as timed
                loss_of(out).backward()
                del out
            ck_model.zero_grad(set_to_none=True)
            budget, label = tracker.peak, "ckpt"
        else:
            budget = min_budget if f == "min" else int(peak0 * float(f))
            label = "min" if f == "min" else f"{float(f):g}"
        if budget < min_budget:
            print(f"  memsched@{label}: {fmt_bytes(budget)} is below the minimum budget: skipped")
            continue
        if budget in seen_budgets:
            continue
        seen_budgets.add(budget)
        for fuse in {"off": (False,), "on": (True,), "both": (False, True)}[a.fuse]:
            cm = memsched.compile(ms_model, budget, train=True, device="cpu", offload_dir=root, fuse=fuse,
                                  **ms_options)
            m = Method(f"memsched{'+fuse' if fuse else ''} @{label}", ms_model, lambda _cm=cm: _cm(**kw),
                       kind="memsched")
            m.cm, m.budget, m.fuse = cm, budget, fuse
            methods.append(m)

    try:
        # warm-up (first step: compile / plan), correctness against eager's first step
        ref_grads = None
        for m in methods:
            try:
                for i in range(max(warmup, 1)):
                    dt = m.step()
                    if i == 0:
                        m.first_s = dt
                grads = [p.grad for p in m.model.parameters()]
                if ref_grads is None:
                    ref_grads = [g.clone() for g in grads]
                else:
                    scale = max(g.abs().max().item() for g in ref_grads)
                    m.grad_err = max((g - r).abs().max().item() for g, r in zip(grads, ref_grads)) / scale
                print(f"  {m.name}: first step {m.first_s:.2f} s, loss {m.loss.item():.6f}"
                      + ("" if m.graphs is None else f", {len(m.graphs)} graph(s) compiled"), flush=True)
            except Exception as exc:  # noqa: BLE001 - torch.compile needs inductor + a C++ compiler
                m.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
                print(f"  {m.name}: FAILED ({m.error})", flush=True)
        methods = [m for m in methods if m.error is None] + [m for m in methods if m.error is not None]
        ok = [m for m in methods if m.error is None]

        # timed rounds
        print(f"  timing {reps} rounds of {len(ok)} methods ...", flush=True)
        for r in range(reps):
            order = ok[r % len(ok):] + ok[:r % len(ok)]
            for m in order:
                m.times.append(m.step())
        print(f"  {_common.loadavg()} after timing", flush=True)

        # peak passes (untimed)
        print("  measuring peaks ...", flush=True)

        def fresh(m):
            """A new compiled module for the same budget, planned at construction: its first call
            starts with no recycled buffers and no earlier step's state, so every byte it holds
            during the step is allocated (and seen) inside the measured step."""
            return memsched.compile(ms_model, m.budget, train=True, device="cpu", offload_dir=root,
                                    example_kwargs=kw, fuse=m.fuse, **ms_options)

        for m in ok:
            model_tensors = list(m.model.parameters()) + list(m.model.buffers())
            if m.kind == "memsched":
                cms = [fresh(m), fresh(m)]
                calls = [lambda _c=c: _c(**kw) for c in cms]
                # each fresh module's own device-tier weights: planned after the timed steps, its
                # ops are priced by their measured times, so its placement may differ from the
                # timed module's
                resident = [c.plan.tier_bytes()["device"] for c in cms]
            else:
                calls = [m.call, m.call]

            def once(call):
                out = call()
                loss_of(out).backward()

            if m.kind != "compile":
                m.model.zero_grad(set_to_none=True)
                gc.collect()
                if m.kind == "memsched":
                    # memsched's device-tier weights by their bytes; its disk-homed weights are
                    # read into fresh buffers, which the tracker sees like any op output
                    tracker = LiveTensorBytes([ids], exclude=model_tensors, base_bytes=resident[0])
                else:
                    tracker = LiveTensorBytes(m.preexisting)
                with tracker, delivered_apart(tracker):
                    once(calls[0])
                m.tracked, m.delivered = tracker.peak, tracker.delivered
            m.model.zero_grad(set_to_none=True)
            gc.collect()
            if m.kind == "memsched":
                base_bytes = resident[1] + tensor_bytes([ids])
            else:
                base_bytes = tensor_bytes(m.preexisting)
            m.alloc = base_bytes + allocator_peak(lambda _call=calls[1]: once(_call))
            if m.kind == "memsched":
                m.fresh_peaks = [c.stats.peak_device_bytes for c in cms]
                for c in cms:
                    c.close()
            m.model.zero_grad(set_to_none=True)
        m_eager = ok[0]

        # -- tables --
        def own_peak(m):
            """The primary peak: what memsched reports for itself; the tracker for the others
            (None for compile rows: inductor's buffers are invisible to the tracker)."""
            if m.kind == "memsched":
                return max(s.peak_device_bytes for s in m.stats)
            return m.tracked

        def ratio(x, y):
            return "-" if x is None or not y else f"{x / y:.2f}x"

        med = {m.name: median(m.times) for m in ok}
        e_t = med["eager"]
        rows = []
        for m in ok:
            pk = own_peak(m)
            rows.append([m.name, fmt_bytes(pk), ratio(pk, m_eager.tracked), fmt_bytes(m.alloc),
                         ratio(m.alloc, m_eager.alloc),
                         f"{med[m.name] * 1e3:.0f}", f"{min(m.times) * 1e3:.0f}",
                         f"{med[m.name] / e_t:.2f}x", f"{m.first_s:.1f}",
                         "-" if m.grad_err is None else f"{m.grad_err:.1e}"])
        for m in methods:
            if m.error is not None:
                rows.append([m.name, "failed", "", "", "", "", "", "", "", ""])
        print()
        print(table(["method", "peak", "peak/eager", "alloc peak", "alloc/eager", "step ms (median)", "min ms",
                     "step/eager", "first step s", "grad err"], rows,
                    title=f"Training frontier: GPT-2 {n_layer}x{n_embd}, {fmt_bytes(wbytes)} weights, input "
                          f"{batch}x{seq}; median of {reps} steps"))
        print("peak: live tensor bytes (weights + activations + grads + inputs) from the dispatch tracker for "
              "eager/checkpoint/save_on_cpu, memsched's own stats.peak_device_bytes for memsched, none for "
              "compile (its buffers bypass the dispatcher). alloc peak: CPU allocator bytes over the step "
              "(torch.profiler) + what was live before it, the same measure for every row. grad err = "
              "max |grad - eager grad| / max |eager grad|. first step includes compile / plan.")

        # memsched details
        rows = []
        for m in ok:
            if m.kind != "memsched":
                continue
            plan = m.cm.plan
            dec = collections.Counter(r["decision"] for r in plan.saved_activations())
            nbytes = collections.defaultdict(int)
            for r in plan.saved_activations():
                nbytes[r["decision"]] += r["bytes"]
            moved = {k: median([s.bytes_moved.get(k, 0) for s in m.stats]) for k in ("disk_read", "disk_write",
                                                                                     "h2d", "d2h")}
            moved_s = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in moved.items() if v) or "nothing"
            offl = dec.get("host", 0) + dec.get("disk", 0)
            rows.append([m.name, fmt_bytes(m.budget), fmt_bytes(max(s.peak_device_bytes for s in m.stats)),
                         fmt_bytes(plan.peak_device_bytes),
                         f"{med[m.name] * 1e3:.0f}", f"{median([s.wall_s for s in m.stats]) * 1e3:.0f}",
                         f"{plan.predicted_time_s * 1e3:.0f}", f"{plan.predict().time_s * 1e3:.0f}",
                         f"{plan.unconstrained.time_s * 1e3:.0f}",
                         f"{plan.recompute_overhead_s() * 1e3:.1f}",
                         f"{median([s.stall_s for s in m.stats]) * 1e3:.0f}", moved_s,
                         f"{dec.get('keep', 0)}/{offl}/{dec.get('recompute', 0)}",
                         (f"{fmt_bytes(nbytes['keep'])}/{fmt_bytes(nbytes['host'] + nbytes['disk'])}/"
                          f"{fmt_bytes(nbytes['recompute'])}"),
                         plan.placement.status])
        print()
        print(table(["run", "budget", "measured peak", "predicted peak", "step ms", "stats.wall ms", "predicted ms",
                     "re-predicted ms", "unconstr pred ms", "recompute ms", "stall ms", "moved/step", "saved k/o/r", "bytes k/o/r",
                     "solver"], rows, title="memsched details"))
        print("re-predicted: plan.predict() after the timed steps, fused regions priced by their measured times "
              "(the roofline prices them when planning).")
        print("saved k/o/r: saved activations kept on device / offloaded (host or disk) / recomputed "
              "(plan.saved_activations()); predicted times are the local CPU profile's; recompute ms = "
              "plan.recompute_overhead_s(). Offloaded activations go to a file: on this machine it stays "
              "in the page cache, so a 'disk' move costs a memcpy and syscalls, not the storage device.")

        # peak measures side by side
        rows = []
        for m in ok:
            own = max(m.fresh_peaks) if m.kind == "memsched" else None
            rows.append([m.name, fmt_bytes(m.tracked), fmt_bytes(m.alloc), fmt_bytes(own),
                         "-" if (own is None or m.tracked is None) else f"{m.tracked / own:.3f}",
                         "-" if own is None else f"{m.alloc / own:.3f}",
                         fmt_bytes(m.delivered) if m.delivered else "-", m.note])
        print()
        print(table(["method", "tracked peak", "allocator peak", "memsched stats peak", "tracked/stats",
                     "alloc/stats", "grads handed over", "note"], rows,
                    title="Peak measures (one untimed step each)"))
        print("tracked: tensor storages alive at once, seen through a TorchDispatchMode, + weights and inputs "
              "(memsched: + its device-tier weights; disk-homed weights are fetched into buffers the tracker "
              "sees). allocator: CPU allocator bytes allocated during the step and not yet freed "
              "(torch.profiler memory events) + weights and inputs (memsched: + device-tier weights); includes "
              "scratch inside ops. memsched is measured on the first call of a freshly compiled module (planned "
              "at construction), so nothing it holds was allocated before the step; 'memsched stats peak' is "
              "that module's own number. A tracked or allocator peak above it means storages memsched has "
              "released from its accounting are still allocated. grads handed over: gradients the plan homes "
              "off the device, given to the caller as host tensors after the step (not in the tracked peak; "
              "in the allocator peak, since host and device share this machine's RAM).")

        # frontier: memsched at <= each baseline's peak, by each measure
        ms_rows = [m for m in ok if m.kind == "memsched"]

        def compare(title, peak):
            lines = []
            for m in ok:
                if m.kind == "memsched":
                    continue
                pk = peak(m)
                if pk is None:
                    lines.append(f"  {m.name}: no peak by this measure")
                    continue
                fits = [x for x in ms_rows if peak(x) is not None and peak(x) <= pk]
                if not fits:
                    lowest = min((x for x in ms_rows if peak(x) is not None), key=peak, default=None)
                    lines.append(f"  {m.name} (peak {fmt_bytes(pk)}, {med[m.name] * 1e3:.0f} ms): no memsched run "
                                 f"at <= this peak" + ("" if lowest is None else
                                                       f" (lowest: {lowest.name} at {fmt_bytes(peak(lowest))})"))
                    continue
                best = min(fits, key=lambda x: med[x.name])
                r = med[m.name] / med[best.name]
                word = f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"
                lines.append(f"  {m.name} (peak {fmt_bytes(pk)}, {med[m.name] * 1e3:.0f} ms): memsched at <= same "
                             f"peak is {word} ({best.name}: {fmt_bytes(peak(best))}, {med[best.name] * 1e3:.0f} ms)")
            print()
            print(title)
            print("\n".join(lines))

        compare("memsched at the same or lower peak, by memsched's own accounting vs the tracker (the fastest "
                "memsched run whose peak is <= the baseline's):", own_peak)
        compare("... and by the CPU allocator peak (one measure for every row, compile included):",
                lambda m: m.alloc)
        if any(m.kind == "compile" for m in ok):
            print("compile first-step times include the inductor compile"
                  + (" (inductor/AOTAutograd caches off: cold)." if not a.warm_compile_cache else " (caches on)."))
        print(f"{_common.loadavg()} at end (a load above the core count means other processes shared the CPU).")
    finally:
        for m in methods:
            if m.cm is not None:
                m.cm.close()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
