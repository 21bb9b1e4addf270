"""The planning pipeline: a declared list of passes, run in order by one wrapper.

    capture → remat → analysis → loss_head → segments → chunk → placement → schedule → simulate → layers → fuse

Each pass is a function of the planning state that fills in its part (the captured graph, the
program's analysis, the segments, the placement, the scheduled candidates, the chosen plan)
and returns a note for the record. ``run_pass`` times it, records it (``PassRecord``),
snapshots the program it leaves for ``plan.history`` and, with ``MEMSCHED_VERIFY=1`` in the
environment (or ``verify=True``), runs the independent verifier on the scheduled program after
it, naming the pass that broke it. Adding a pass is one line in ``PASSES``.
"""
from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch

from .budget import parse_budget
from .cost_models.hardware import Hardware
from .cost_models.op_cost import estimate_op_time, op_time
from .cost_models.simulator import SimResult, simulate
from .errors import CaptureError, InfeasibleBudgetError, UnsupportedModelError
from .frontend.autocast import autocast_as, autocast_state, no_autocast
from .frontend.capture import Captured, capture, input_signature, keep_random_state
from .frontend.input_values import described
from .frontend.joint import capture_joint
from .frontend.kernel_patterns import kernel_counts
from .frontend.repeats import capture_repeated
from .frontend.row_gathers import hoist_row_gathers
from .ir.graph_module import lazy_graph_module
from .ir.kinds import PERSISTENT
from .ir.meta import KEY
from .ir.units import format_bytes
from .kernels import runs_triton
from .passes.analysis import START, Program, analyze
from .passes.chunking import Chunking, chunked, chunkings, loss_chunks, splittable_modules, steps_outside
from .passes.floor import op_floor
from .passes.fusion import fuse as fuse_regions
from .passes.fusion import fused_op_time
from .passes.layer_recompute import layer_of_weights, recompute_layers, recomputed_ops
from .passes.remat import rematerialize
from .passes.placement import Placement, solve_placement
from .passes.placement.problem import PlacementModel
from .passes.schedule import build_schedule
from .passes.segments import Segments, make_segments, split_binding
from .plan_records import PassRecord, PassSnapshot
from .plans import Plan
from .verify import PlanError, verify_schedule

DEFAULT_MAX_SEGMENTS = 128
DEFAULT_TIME_LIMIT_S = 10.0


@dataclass
class Candidate:
    """One placement, its scheduled program and (after the simulate pass) its simulation."""

    placement: Placement
    scheduled: torch.fx.GraphModule
    sim: SimResult | None = None


@dataclass
class PlanningState:
    """What the passes read and fill in, in the order they run."""

    budget: int
    hw: Hardware
    max_segments: int = DEFAULT_MAX_SEGMENTS
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    model: torch.nn.Module | None = None
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    train: bool = False
    grad_outputs: str = "auto"
    autocast: tuple = ()   # the caller's torch.autocast: every capture runs under it (frontend/autocast.py)
    captured: Captured | None = None
    program: Program | None = None
    step_time: np.ndarray | None = None
    cut_time: np.ndarray | None = None               # the roofline's step times: where segments are cut
    fused_time: np.ndarray | None = None             # with fuse: a pointwise step's arithmetic (NaN: others)
    before_remat: torch.fx.GraphModule | None = None # the captured program, when remat_pass changed it
    segments: Segments | None = None
    placement_model: PlacementModel | None = None   # the problem on those segments
    min_budget: int | None = None                    # the lowest minimum of the counts tried
    chunking: list[Chunking] = field(default_factory=list)   # modules split, when the budget asks
    chunk_ops: bool = True                           # False: never split a module (chunk_pass)
    fuse: bool = False                               # True: fuse compute into regions (fuse_pass)
    shared_loss_heads: bool = False                  # a returned logits' loss read in slices (loss_head_pass)
    recompute_layers: bool | str = "auto"            # layer_recompute_pass: "auto", True or False
    kernels: bool | str = "auto"                     # memsched's kernel ops for the patterns found (capture_pass)
    host_outputs: bool = False                       # inference outputs may leave the device once made
    placement: Placement | None = None
    candidates: list[Candidate] = field(default_factory=list)
    chosen: Candidate | None = None
    unconstrained: SimResult | None = None
    passes: list[PassRecord] = field(default_factory=list)
    history: list[PassSnapshot] = field(default_factory=list)
    last_snapshot_of: object = None     # the program the last snapshot copied
    verified: set = field(default_factory=set)   # ids of the scheduled programs verified
    verify_s: float = 0.0


# -- the passes -------------------------------------------------------------------------------
def capture_pass(s: PlanningState) -> str:
    """The model's ATen graph; a deep stack of identical layers is traced on five of them and
    the rest repeated (frontend/repeats.py)."""
    kernels = uses_kernels(s.kernels, s.hw.device_type, s.fuse)
    if s.train:
        def trace(model):
            return capture_joint(model, s.args, s.kwargs, grad_outputs=s.grad_outputs, target=s.hw.device_type,
                                 loss_chunks=loss_chunks(s.chunking), shared_loss_heads=s.shared_loss_heads, kernels=kernels)
    else:
        def trace(model):
            return capture(model, s.args, s.kwargs, kernels=kernels, device_type=s.hw.device_type)
    with chunked(s.model, s.chunking), autocast_as(s.autocast):
        s.captured, how = capture_repeated(s.model, trace)
    if not s.train:   # a lookup's rows are gathered where its table lives, before the program
        s.captured.gathers = hoist_row_gathers(s.captured.gm, s.captured.placeholders)
    found = kernel_counts(s.captured.gm) if kernels else None
    used = f"kernels: {found}" if found else ""
    return "; ".join(x for x in ("forward + backward" if s.train else "", how, used) if x)


def uses_kernels(kernels: bool | str, device_type: str, fuse: bool = False) -> bool:
    """``kernels=`` of compile/plan: True, False, or "auto": where they run Triton (on CUDA, or
    under Triton's interpreter; elsewhere their fallback is the composite they replace) in a
    program that is not fused (a fused one leaves the chains to Inductor, which fuses them with
    their neighbours)."""
    if kernels == "auto":
        return runs_triton(device_type) and not fuse
    if not isinstance(kernels, bool):
        raise ValueError(f"kernels must be True, False or 'auto', got {kernels!r}")
    return kernels


def remat_pass(s: PlanningState) -> str:
    """With fusion, a training step recomputes in the backward the pointwise values that are
    cheaper to recompute there than to save (passes/remat.py)."""
    s.before_remat = None
    if not (s.train and s.fuse):
        return "off" if s.train else ""
    weights = {p.name for p in s.captured.placeholders if p.kind in PERSISTENT}
    gm, done = rematerialize(s.captured.gm, s.hw, weights)   # a new program: the capture's stays as it was
    if gm is not s.captured.gm:
        s.before_remat, s.captured.gm = s.captured.gm, gm
    return done.note()


def analysis_pass(s: PlanningState) -> str:
    s.program = analyze(s.captured, s.hw.alloc_block_bytes, s.hw.workspace_bytes, s.hw.device_type,
                        host_outputs=s.host_outputs)
    nodes = {n.name: n for n in s.captured.gm.graph.nodes}
    s.step_time = np.array([op_time(nodes[name], s.hw) for name in s.program.steps], dtype=np.float64)
    # segments are cut by the roofline, not by measured times: the minimum budget depends on
    # where the cuts fall, and must not move as the runtime measures more ops
    s.cut_time = np.array([estimate_op_time(nodes[name], s.hw) for name in s.program.steps], dtype=np.float64)
    if s.fuse:   # what a recomputed pointwise chain costs inside the region that reads it
        priced = [fused_op_time(nodes[name], s.hw) for name in s.program.steps]
        s.fused_time = np.array([np.nan if t is None else t for t in priced], dtype=np.float64)
    # what the program could put on disk fits in the page cache: its reads and writes go there
    before, s.hw = s.hw, s.hw.page_cached(sum(b.nbytes for b in s.program.storages))
    return "" if s.hw is before else "disk reads and writes priced on the page cache (its data fits in free RAM)"


_LOSSES = frozenset({torch.ops.aten.nll_loss_forward.default, torch.ops.aten.nll_loss2d_forward.default,
                     torch.ops.aten.cross_entropy_loss.default})


def loss_head_pass(s: PlanningState) -> str:
    """A fused training step whose LM head's logits are returned beside the loss: its loss can
    read them in slices of rows (frontend/loss_head.py), so the cross-entropy's [tokens, vocab]
    values never exist whole, at the price of more and smaller matmuls in the backward (4.5% of
    a GPT-2 step on a CPU). Captured whole first; when that program does not fit the budget
    whole, captured again with the slices, kept if its peak is lower."""
    if not (s.train and s.fuse) or s.shared_loss_heads or s.budget >= s.program.peak_bytes:
        return ""
    if not any(n.target in _LOSSES for n in s.captured.gm.graph.nodes):
        return ""
    trial = replace(s, shared_loss_heads=True, passes=[], history=[], candidates=[])
    for run in (capture_pass, remat_pass, analysis_pass):
        run(trial)
    before, after = s.program.peak_bytes, trial.program.peak_bytes
    if after >= before:
        return f"the loss read in slices does not lower the peak ({format_bytes(before)})"
    for f in _PROGRAM_FIELDS + ("hw", "before_remat", "shared_loss_heads"):
        setattr(s, f, getattr(trial, f))
    return (f"the loss reads the returned logits in slices (the whole program does not fit): peak "
            f"{format_bytes(before)} -> {format_bytes(after)}")


def cut_segments(p: Program, step_time: np.ndarray, count: int) -> Segments:
    """At most ``count`` segments of even compute and bytes of model tensors first read."""
    first_use_bytes = np.zeros(p.n_steps)
    for b in p.storages:
        if b.kind in PERSISTENT and len(b.events) > 1:
            first = next(e for e in b.events if e != START)
            if first < p.n_steps:  # a model tensor only returned, never read, has no step
                first_use_bytes[first] += b.nbytes
    return make_segments(step_time, first_use_bytes, count)


def segments_pass(s: PlanningState) -> str:
    """The program cut into segments (``_segments``). Recomputing in the backward (remat_pass)
    adds transients there: when that leaves the budget below the minimum, the program without
    it is cut too, and kept if its minimum is lower."""
    note = _segments(s)
    if s.before_remat is None or s.budget >= s.min_budget:
        return note
    plain = replace(s, captured=replace(s.captured, gm=s.before_remat), before_remat=None, passes=[], history=[],
                    candidates=[])
    analysis_pass(plain)
    plain_note = _segments(plain)
    if plain.min_budget >= s.min_budget:
        return note
    undone = (f"{plain_note}; without the backward's recomputation (remat): its minimum was "
              f"{format_bytes(s.min_budget)}, without it {format_bytes(plain.min_budget)}")
    for f in _PROGRAM_FIELDS + ("hw", "before_remat"):
        setattr(s, f, getattr(plain, f))
    return undone


_PROGRAM_FIELDS = ("captured", "program", "step_time", "cut_time", "fused_time", "segments", "placement_model",
                   "min_budget")


def _segments(s: PlanningState) -> str:
    p = s.program
    # Finer segments hold each storage for less time around its uses, so they lower the
    # minimum, and cost solver time. The default count is kept when it fits the budget; below
    # its minimum, up to four times as many are used. The minimum reported is the lowest.
    tried = []
    for k in _segment_counts(s.max_segments, p.n_steps):
        segments = cut_segments(p, s.cut_time, k)
        if tried and segments.bounds == tried[-1][1].bounds:
            continue  # the same cut again (steps dearer than a segment's share are never split)
        model = PlacementModel(p, segments, s.step_time, s.hw, s.budget, fused_time=s.fused_time)
        tried.append((model.min_budget(), segments, model))
    # then cut finer only where the minimum binds, down to single ops: the minimum reported is
    # counted per op there; a budget below the uniform cuts' minima is planned on them
    tried += _split_where_binding(s, min(tried, key=lambda t: t[0]))
    fits = [t for t in tried if s.budget >= t[0]]
    _, s.segments, s.placement_model = fits[0] if fits else min(tried, key=lambda t: t[0])
    s.min_budget = min(t[0] for t in tried)
    return f"{s.segments.count}" + (f" (refined from {tried[0][1].count})" if s.segments is not tried[0][1] else "")


MAX_SPLIT_ROUNDS = 16


def _split_where_binding(s: PlanningState, start: tuple) -> list[tuple]:
    """From ``start`` (minimum, segments, model), the segments where the minimum binds split into
    single steps, round after round while the minimum falls (at most four times the default
    count of segments): each round's (minimum, segments, model), coarsest first."""
    rounds, (minimum, segments, model) = [], start
    for _ in range(MAX_SPLIT_ROUNDS):
        finer = split_binding(segments, model.const, 4 * s.max_segments)
        if finer is None:
            break
        model = PlacementModel(s.program, finer, s.step_time, s.hw, s.budget, fused_time=s.fused_time)
        if model.min_budget() >= minimum:
            break
        minimum, segments = model.min_budget(), finer
        rounds.append((minimum, segments, model))
    return rounds


def _segment_counts(default: int, n_steps: int) -> list[int]:
    counts = [default]
    while counts[-1] < min(4 * default, n_steps):
        counts.append(2 * counts[-1])
    return counts


CHUNK_COUNTS = (2, 4, 8, 16, 32, 64)


def chunk_pass(s: PlanningState) -> str:
    """Below the minimum, the modules that keep their input's rows apart and make wider values
    inside (passes/chunking.py: an MLP) run on slices of it: capture, analysis and segments are
    redone with 2, 4, 8, ... slices while the minimum falls, and the fewest slices that fit the
    budget are kept -- each more costs more, smaller ops, which the op costs price. When none
    fits, the lowest minimum is the one reported."""
    if s.model is None or s.budget >= s.min_budget or not s.chunk_ops:
        return ""
    found = splittable_modules(s.model, s.captured)
    if not found:
        return "no module keeps its rows apart: nothing to split"
    if not s.train:   # the ops a split leaves alone already need the minimum: no split lowers it
        outside = op_floor(s.program, s.captured.gm.graph, steps_outside(s.program, s.captured.gm, found))
        if outside is not None and outside.bytes >= s.min_budget:
            return f"the minimum binds outside the {len(found)} module(s) that split: {outside.op}"
    best, before, failed = s, s.min_budget, ""
    for count in CHUNK_COUNTS:
        plan = chunkings(found, count)
        if not plan or (best.chunking and plan == best.chunking):
            break   # the rows are all split already
        trial = replace(s, chunking=plan, passes=[], history=[], candidates=[])
        try:
            for run in (capture_pass, remat_pass, analysis_pass, segments_pass):
                run(trial)
        except (CaptureError, UnsupportedModelError) as e:   # the split does not trace: keep the last
            failed = f"; {count} slices do not capture ({str(e).splitlines()[0][:100]})"
            break
        if trial.min_budget >= best.min_budget:
            break
        best = trial
        if trial.min_budget <= s.budget:
            break
    if best is s:
        return f"splitting {len(found)} module(s) does not lower the minimum{failed}"
    for f in _PROGRAM_FIELDS + ("chunking", "before_remat"):
        setattr(s, f, getattr(best, f))
    most = max(c.chunks for c in s.chunking)
    return (f"{len(s.chunking)} module(s) split in up to {most} slices ({s.chunking[0]}, ...): minimum "
            f"{format_bytes(before)} -> {format_bytes(s.min_budget)}{failed}")


def placement_pass(s: PlanningState) -> str:
    try:
        s.placement = solve_placement(s.program, s.segments, s.step_time, s.hw, s.budget,
                                      time_limit_s=s.time_limit_s, graph=s.captured.gm.graph,
                                      model=s.placement_model, min_budget=s.min_budget,
                                      roles=s.captured.layer_roles)
    except InfeasibleBudgetError as e:
        if not s.chunking:
            raise
        # the minimum named is the split program's: say so, or the caller sees a minimum below
        # the one an unconstrained plan reports and cannot tell why
        split = ", ".join(map(str, s.chunking[:2])) + (", ..." if len(s.chunking) > 2 else "")
        raise InfeasibleBudgetError(e.budget_bytes, e.min_budget_bytes,
                                    f"{e.detail}; that minimum already runs {len(s.chunking)} module(s) on "
                                    f"slices of their input ({split})") from None
    return s.placement.status


def schedule_pass(s: PlanningState) -> str:
    """The scheduled program of the placement and, when the solver improved on the greedy
    plan it started from, of that greedy plan too: the simulate pass arbitrates."""
    placements = [s.placement] + ([s.placement.alternative] if s.placement.alternative is not None else [])
    s.candidates = [Candidate(pl, build_schedule(s.captured, s.program, s.segments, pl)) for pl in placements]
    return f"{len(s.candidates)} candidate(s)" if len(s.candidates) > 1 else ""


def simulate_pass(s: PlanningState) -> str:
    """The MIP prices time per segment; the simulator replays real queues. The candidate
    that simulates fastest is kept."""
    for c in s.candidates:
        c.sim = simulate(c.scheduled, s.hw)
    s.chosen = min(s.candidates, key=lambda c: c.sim.time_s)
    if s.chosen is not s.candidates[0]:
        _keep_greedy(s.candidates[0], s.chosen)
    s.unconstrained = s.chosen.sim if s.chosen.placement.status == "fits" else _unconstrained(s)
    return ""


def layer_recompute_pass(s: PlanningState) -> str:
    """A training step whose moves cost time is planned a second time as per-layer recompute
    (passes/layer_recompute.py: each layer's saved values rebuilt in the backward from its
    inputs); that plan is kept when it fits the budget and simulates faster ("auto"), or whenever
    it fits (True)."""
    if not s.train or s.model is None or s.recompute_layers is False:
        return ""
    plain = s.chosen.sim.time_s
    auto = s.recompute_layers == "auto"
    if auto and plain <= s.unconstrained.time_s:
        return ""   # nothing moves at a cost: recomputing can only add time
    weights = layer_of_weights(s.model, s.captured.placeholders)
    held = {p.name for p in s.captured.placeholders if p.kind in PERSISTENT}
    gm, done = recompute_layers(s.captured.gm, weights, held)
    if gm is s.captured.gm:
        return "" if auto else "no layer of a stack to recompute"
    if auto:
        # it cannot beat the step run once plus the ops it runs again: not worth planning
        again = recomputed_ops(gm)
        floor = s.unconstrained.time_s + sum(t for name, t in zip(s.program.steps, s.step_time.tolist()) if name in again)
        if plain <= floor:
            return ""
    # (no chunk pass: it captures the model again; no remat fallback: it would undo this program)
    trial = replace(s, captured=replace(s.captured, gm=gm), before_remat=None, passes=[], history=[],
                    candidates=[], chosen=None)
    try:
        for run in (analysis_pass, segments_pass, placement_pass, schedule_pass, simulate_pass):
            run(trial)
    except InfeasibleBudgetError as e:
        return f"per-layer recompute needs {format_bytes(e.min_budget_bytes)}: not kept"
    faster = trial.chosen.sim.time_s
    if auto and faster >= plain:
        return f"per-layer recompute simulates {faster * 1e3:.1f} ms against {plain * 1e3:.1f} ms: not kept"
    for f in _PROGRAM_FIELDS + ("before_remat", "placement", "candidates", "chosen"):
        setattr(s, f, getattr(trial, f))
    return f"per-layer recompute kept ({done.note()}): simulates {faster * 1e3:.1f} ms against {plain * 1e3:.1f} ms"


def fuse_pass(s: PlanningState) -> str:
    """The chosen program's compute between scheduling points fused into regions (passes/
    fusion.py), each within the budget, then simulated again with the regions' prices."""
    if not s.fuse:
        return "off"
    fused, regions = fuse_regions(s.chosen.scheduled, s.budget, s.hw)
    if not regions:
        return "no run of two or more ops to fuse"
    s.chosen.scheduled, s.chosen.sim = fused, simulate(fused, s.hw)
    ops = sum(len(r.ops) for r in regions)
    return f"{len(regions)} region(s) of {ops} ops, {len({r.key for r in regions})} distinct"


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[PlanningState], str]
    snapshot: bool = False   # record the program after it even when it is the same object


PASSES: tuple[Pass, ...] = (
    Pass("capture", capture_pass, snapshot=True),
    Pass("remat", remat_pass),
    Pass("analysis", analysis_pass, snapshot=True),   # annotates the captured graph
    Pass("loss_head", loss_head_pass),
    Pass("segments", segments_pass),
    Pass("chunk", chunk_pass),
    Pass("placement", placement_pass),
    Pass("schedule", schedule_pass),
    Pass("simulate", simulate_pass),
    Pass("layers", layer_recompute_pass),
    Pass("fuse", fuse_pass),
)


# -- the wrapper --------------------------------------------------------------------------------
def _current_program(s: PlanningState):
    if s.chosen is not None:
        return s.chosen.scheduled
    if s.candidates:
        return s.candidates[0].scheduled
    return s.captured.gm if s.captured is not None else None


def run_pass(p: Pass, s: PlanningState, *, verify: bool = False) -> None:
    """Run one pass: time it, record it, snapshot a changed program, verify scheduled ones."""
    t = time.perf_counter()
    # captures trace under the caller's autocast and write its casts out (capture_pass): nothing
    # else may cast again (frontend/autocast.py)
    with no_autocast():
        note = p.run(s)
    s.passes.append(PassRecord(p.name, time.perf_counter() - t, note or ""))
    program = _current_program(s)
    if program is not None and (p.snapshot or program is not s.last_snapshot_of):
        s.history.append(snapshot(p.name, program))
        s.last_snapshot_of = program
    t = time.perf_counter()
    for c in s.candidates if verify else ():
        if id(c.scheduled) not in s.verified:
            try:
                verify_schedule(c.scheduled, s.budget, s.hw)
            except PlanError as e:
                raise PlanError(f"after pass {p.name}: {e}") from None
            s.verified.add(id(c.scheduled))
    s.verify_s += time.perf_counter() - t


def plan_state(s: PlanningState, *, passes=PASSES, verify: bool | None = None, progress=None) -> PlanningState:
    """Run ``passes`` in order on ``s``; ``progress``, if given, gets each pass's name as it starts."""
    progress = progress or (lambda stage: None)
    verify = verify or (verify is None and os.environ.get("MEMSCHED_VERIFY", "") not in ("", "0"))
    with rare_collections():
        for p in passes:
            progress(f"placement (solver, at most {s.time_limit_s:g} s)" if p.name == "placement" else p.name)
            run_pass(p, s, verify=verify)
    if verify:
        s.passes.append(PassRecord("verify", s.verify_s, f"{len(s.verified)} program(s), after each pass"))
    return s


# while planning, the cyclic collector runs after this many new container objects, not 700
PLANNING_GC_THRESHOLD = 50_000


@contextlib.contextmanager
def rare_collections():
    """Planning makes hundreds of thousands of objects that live until the plan is done (graph
    nodes, traced values, solver rows) and little cyclic garbage; at Python's default threshold
    the collector scans them again and again -- a fifth of a 7B training plan's wall time. The
    first threshold is raised while the passes run and given back after, even on an error
    (process-wide: other threads collect as rarely meanwhile)."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], PLANNING_GC_THRESHOLD), *before[1:])
    try:
        yield
    finally:
        gc.set_threshold(*before)


def snapshot(name: str, gm: torch.fx.GraphModule) -> PassSnapshot:
    """The graph as it is now, copied when first read: its nodes and each node's memsched
    record are kept now (later passes annotate the live graph with new records -- ``annotate``
    is the only writer of a node's metadata after capture -- so the snapshot keeps the old
    ones). Passes make new graphs rather than edit one they have handed on; if the graph was
    edited anyway, reading the snapshot says so."""
    nodes = tuple(gm.graph.nodes)
    records = [n.meta.get(KEY) for n in nodes]

    def copy() -> torch.fx.GraphModule:
        if tuple(gm.graph.nodes) != nodes:
            raise RuntimeError(f"the program after pass {name!r} was edited in place since: no snapshot of it")
        graph = torch.fx.Graph()
        env: dict = {}
        graph.output(graph.graph_copy(gm.graph, env))
        for n, record in zip(nodes, records):
            if n.op != "output":
                env[n].meta = {k: v for k, v in n.meta.items() if k != KEY}
                if record is not None:
                    env[n].meta[KEY] = record
        return lazy_graph_module(gm, graph, class_name=f"After_{name}")

    return PassSnapshot(name, copy=copy)


def _keep_greedy(solved: Candidate, greedy: Candidate) -> None:
    note = (f"solver plan simulated {solved.sim.time_s * 1e3:.2f} ms, greedy "
            f"{greedy.sim.time_s * 1e3:.2f} ms: greedy kept")
    pl, alt = solved.placement, greedy.placement
    alt.min_budget_bytes, alt.solve_s = pl.min_budget_bytes, pl.solve_s
    alt.notes.append(note)
    alt.status = f"greedy (solver {pl.status})"


def _unconstrained(s: PlanningState) -> SimResult:
    """The same program with an unlimited budget: nothing moves, so its time is its ops' times
    in order and its peak the analysis's exact peak (what simulating the all-kept schedule
    gives, without building and replaying a second program: a second or more on a 7B step)."""
    seconds = 0.0
    for t in s.step_time.tolist():   # in program order, summed as the simulator's clock does
        seconds += t
    return SimResult(seconds, seconds, 0.0, s.program.peak_bytes, [], {}, [])


def to_plan(s: PlanningState, model_name: str) -> Plan:
    c = s.chosen
    return Plan(model_name, s.budget, s.hw, c.scheduled, s.program, c.placement, c.sim, s.unconstrained,
                s.passes, s.segments.count, s.history, chunking=tuple(s.chunking))


def plan_captured(captured: Captured, budget: int, hw: Hardware, *, model_name: str = "model",
                  max_segments: int = DEFAULT_MAX_SEGMENTS, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                  verify: bool | None = None, progress=None) -> Plan:
    """Plan an already captured program (every pass after capture)."""
    s = PlanningState(budget, hw, max_segments, time_limit_s, captured=captured)
    s.history.append(snapshot("capture", captured.gm))
    s.last_snapshot_of = captured.gm
    plan_state(s, passes=PASSES[1:], verify=verify, progress=progress)
    return to_plan(s, model_name)


def plan_model(model: torch.nn.Module, args: tuple, kwargs: dict, budget, hw: Hardware, *,
               train: bool = False, grad_outputs: str = "auto", verify: bool | None = None, progress=None,
               max_segments: int = DEFAULT_MAX_SEGMENTS, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
               chunk_ops: bool = True, fuse: bool = False,
               recompute_layers: bool | str = "auto", kernels: bool | str = "auto",
               host_outputs: bool = False) -> tuple[Plan, Captured]:
    """Every pass, from capturing ``model(*args, **kwargs)`` to the chosen schedule
    (``chunk_ops=False``: no module is run on slices, whatever the budget; ``fuse=True``: the
    compute between scheduling points runs as compiled regions; ``host_outputs=True``: an
    inference program's outputs may be offloaded as soon as they are made and handed back from
    the host, so outputs larger than the budget together fit)."""
    s = PlanningState(parse_budget(budget, hw.device_bytes), hw, max_segments, time_limit_s, model=model,
                      args=args, kwargs=kwargs, train=train, grad_outputs=grad_outputs, chunk_ops=chunk_ops,
                      fuse=fuse, recompute_layers=recompute_layers, kernels=kernels, autocast=autocast_state(),
                      host_outputs=host_outputs)
    with keep_random_state():
        plan_state(s, verify=verify, progress=progress)
    plan = to_plan(s, type(model).__name__)
    plan.signature = input_signature(args, kwargs)
    plan.input_values = described(model, s.captured.value_guards)
    return plan, s.captured
