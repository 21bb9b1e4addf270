"""The planning pipeline in the order it runs: capture, analysis, segments, placement,
rewriting, simulation. Each stage is timed and recorded on the Plan.

``MEMSCHED_VERIFY=1`` in the environment (or ``verify=True``) runs the independent verifier
(``memsched/verify.py``) on every plan made, so a planner bug fails at planning time."""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from ..budget import parse_budget
from ..cost_models.hardware import Hardware
from ..cost_models.op_cost import estimate_op_time
from ..cost_models.simulator import simulate
from ..passes.analysis import START, analyze
from ..passes.placement import solve_placement
from ..passes.schedule import build_schedule
from ..passes.segments import make_segments
from ..plan import PassRecord, PassSnapshot, Plan
from .capture import PERSISTENT, Captured, capture, input_signature
from .joint import capture_joint

DEFAULT_MAX_SEGMENTS = 128
DEFAULT_TIME_LIMIT_S = 10.0


def plan_captured(captured: Captured, budget: int, hw: Hardware, *, model_name: str = "model",
                  max_segments: int = DEFAULT_MAX_SEGMENTS, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                  passes: list[PassRecord] | None = None, verify: bool | None = None,
                  progress=None) -> Plan:
    """``progress``, if given, is called with the name of each stage as it starts."""
    progress = progress or (lambda stage: None)
    passes = list(passes or [])
    history = [snapshot("capture", captured.gm)]
    progress("analysis")
    t = time.perf_counter()
    program = analyze(captured)
    history.append(snapshot("analysis", captured.gm))
    nodes = {n.name: n for n in captured.gm.graph.nodes}
    step_time = np.array([estimate_op_time(nodes[s], hw) for s in program.steps], dtype=np.float64)
    passes.append(PassRecord("analysis", time.perf_counter() - t))

    progress("segments")
    t = time.perf_counter()
    first_use_bytes = np.zeros(program.n_steps)
    for b in program.buffers:
        if b.kind in PERSISTENT and len(b.events) > 1:
            first = next(e for e in b.events if e != START)
            if first < program.n_steps:  # a model tensor only returned, never read, has no step
                first_use_bytes[first] += b.nbytes
    segments = make_segments(step_time, first_use_bytes, max_segments)
    passes.append(PassRecord("segments", time.perf_counter() - t, f"{segments.count}"))

    progress(f"placement (solver, at most {time_limit_s:g} s)")
    t = time.perf_counter()
    placement = solve_placement(program, segments, step_time, hw, budget, time_limit_s=time_limit_s)
    passes.append(PassRecord("placement", time.perf_counter() - t, placement.status))

    progress("schedule")
    t = time.perf_counter()
    scheduled = build_schedule(captured, program, segments, placement)
    passes.append(PassRecord("schedule", time.perf_counter() - t))

    progress("simulate")
    t = time.perf_counter()
    sim = simulate(scheduled, hw)
    # the MIP prices time per segment; the simulator replays real queues. When the greedy plan
    # the solver started from simulates faster, it is the better plan and is kept.
    if placement.alternative is not None:
        other = build_schedule(captured, program, segments, placement.alternative)
        other_sim = simulate(other, hw)
        if other_sim.time_s < sim.time_s:
            note = (f"solver plan simulated {sim.time_s * 1e3:.2f} ms, greedy "
                    f"{other_sim.time_s * 1e3:.2f} ms: greedy kept")
            placement.alternative.min_budget_bytes = placement.min_budget_bytes
            placement.alternative.solve_s = placement.solve_s
            placement.alternative.notes.append(note)
            placement.alternative.status = f"greedy (solver {placement.status})"
            placement, scheduled, sim = placement.alternative, other, other_sim
    passes.append(PassRecord("simulate", time.perf_counter() - t))
    unconstrained = _unconstrained(captured, program, segments, step_time, hw)
    history.append(snapshot("schedule", scheduled))
    if verify or (verify is None and os.environ.get("MEMSCHED_VERIFY", "") not in ("", "0")):
        from ..verify import verify_schedule

        progress("verify")
        t = time.perf_counter()
        verify_schedule(scheduled, budget)
        passes.append(PassRecord("verify", time.perf_counter() - t))
    return Plan(model_name, budget, hw, scheduled, program, placement, sim, unconstrained,
                passes, segments.count, history)


def snapshot(name: str, gm: torch.fx.GraphModule) -> PassSnapshot:
    """A copy of the graph as it is now (node metadata copied shallowly: cheap, and later
    passes annotating the live graph do not change the snapshot)."""
    graph = torch.fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return PassSnapshot(name, torch.fx.GraphModule(gm, graph, class_name=f"After_{name}"))


def _unconstrained(captured, program, segments, step_time, hw):
    """The same program with an unlimited budget: nothing moves."""
    big = int(program.peak_bytes * 4 + 2**40)
    placement = solve_placement(program, segments, step_time, hw, big, use_solver=False)
    return simulate(build_schedule(captured, program, segments, placement), hw)


def plan_model(model: torch.nn.Module, args: tuple, kwargs: dict, budget, hw: Hardware, *,
               train: bool = False, grad_outputs: str = "auto", **options) -> tuple[Plan, Captured]:
    budget_bytes = parse_budget(budget, hw.device_bytes)
    if options.get("progress"):
        options["progress"]("capture")
    t = time.perf_counter()
    if train:
        captured = capture_joint(model, args, kwargs, grad_outputs=grad_outputs)
        record = PassRecord("capture", time.perf_counter() - t, "forward + backward")
    else:
        captured = capture(model, args, kwargs)
        record = PassRecord("capture", time.perf_counter() - t)
    plan = plan_captured(captured, budget_bytes, hw, model_name=type(model).__name__, passes=[record], **options)
    plan.signature = input_signature(args, kwargs)
    return plan, captured
