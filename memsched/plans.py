"""Plan: the schedule memsched runs, with what it predicts, printable and checkable.

One kind of Plan, made by the pipeline or loaded from a file: both carry the placement facts
(``facts``: computed once from the program and the placement when a plan is made, read back
when it is loaded), so the summary, the saved activations and the views read the same thing
either way. Only a freshly made plan also keeps ``program`` and ``placement`` (None when loaded).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from .cost_models.hardware import Hardware
from .cost_models.op_cost import estimate_op_time
from .cost_models.simulator import SimResult, simulate
from .inspect.summary import summarize, summary_text, values_text
from .io.serialize import load_fields, plan_fields, save_plan
from .ir.kinds import PERSISTENT
from .ir.listing import listing
from .ir.meta import info
from .ir.tensors import distinct_storage_bytes
from .ir.ops import Op, is_compute, op_of
from .ir.regions import reads_region, region_of
from .ir.units import format_bytes
from .passes.analysis import Program
from .passes.placement import KEEP, Placement
from .plan_records import PassRecord, PassSnapshot, PlacementFacts

__all__ = ["Plan", "PassRecord", "PassSnapshot", "PlacementFacts", "as_plan", "placement_facts"]


@dataclass
class Plan:
    model_name: str
    budget_bytes: int
    hardware: Hardware
    graph: fx.GraphModule                 # the scheduled program
    program: Program | None               # analysis of the captured graph (None: loaded plan)
    placement: Placement | None           # (None: loaded plan)
    sim: SimResult
    unconstrained: SimResult              # the same model with nothing moved
    passes: list[PassRecord] = field(default_factory=list)
    n_segments: int = 0
    history: list[PassSnapshot] = field(default_factory=list)
    measured: object | None = None        # RunStats of the last run, set by CompiledModule
    facts: PlacementFacts | None = None   # computed from program + placement when not given
    signature: tuple | None = None        # input_signature of the example inputs it was planned for
    chunking: tuple = ()                  # modules run on slices of their input (passes/chunking.py)
    # (what is read, the value) of each value read off the inputs that shaped the program
    # (frontend/input_values.py): it serves calls whose values are these
    input_values: tuple = ()

    def __post_init__(self):
        if self.facts is None:
            if self.program is None or self.placement is None:
                raise ValueError("a Plan needs its placement facts, or a program and placement to compute them")
            self.facts = placement_facts(self.program, self.placement)

    # -- headline numbers -------------------------------------------------------------------
    @property
    def peak_device_bytes(self) -> int:
        return self.sim.peak_device_bytes

    @property
    def predicted_time_s(self) -> float:
        return self.sim.time_s

    @property
    def bytes_moved(self) -> dict:
        return dict(self.sim.bytes_moved)

    @property
    def min_budget_bytes(self) -> int:
        return self.facts.min_budget_bytes

    @property
    def code(self) -> str:
        return str(self)

    def placement_facts(self) -> PlacementFacts:
        """Solver status, minimum budget, bytes per tier, saved activations (``facts``)."""
        return self.facts

    def tier_bytes(self) -> dict:
        """Bytes of the model's tensors per home tier."""
        return dict(self.facts.tier_bytes)

    def kind_tier_bytes(self, kind: str) -> dict:
        """Bytes of the model's tensors of one kind (e.g. "kv_cache") per home tier, read from
        the program's placeholders (live and loaded plans alike)."""
        out = {"device": 0, "host": 0, "disk": 0}
        for n in self.graph.graph.nodes:
            rec = info(n)
            if n.op == "placeholder" and rec.kind == kind and rec.tier in out:
                out[rec.tier] += distinct_storage_bytes(n.meta.get("val"))
        return out

    def offloaded_activation_bytes(self) -> dict:
        """Bytes of activations offloaded per tier (host, disk)."""
        return dict(self.facts.offloaded_activation_bytes)

    # -- printing ---------------------------------------------------------------------------
    def header(self) -> list[str]:
        pl = self.facts
        solver = pl.status + (f", gap {pl.mip_gap:.1%}" if pl.mip_gap is not None else "")
        return [
            f"memsched plan for {self.model_name}: budget {format_bytes(self.budget_bytes)} on "
            f"{self.hardware.name} ({self.hardware.device_type})",
            "passes: " + " · ".join(f"{p.name} {p.seconds * 1e3:.0f} ms" + (f" ({p.note})" if p.note else "")
                                    for p in self.passes),
            f"placement: {solver}; {self.n_segments} segments, {pl.movable_gaps} movable gaps, "
            f"min budget {format_bytes(pl.min_budget_bytes)}",
            f"predicted {self.predicted_time_s * 1e3:.2f} ms (unconstrained "
            f"{self.unconstrained.time_s * 1e3:.2f} ms), peak device {format_bytes(self.peak_device_bytes)}",
        ] + ([f"planned for values read off the inputs: {values_text(self.input_values)}"] if self.input_values else [])

    def __str__(self) -> str:
        return listing(self.graph, self.header())

    def __repr__(self) -> str:
        return (f"<Plan {self.model_name} budget={format_bytes(self.budget_bytes)} "
                f"peak={format_bytes(self.peak_device_bytes)} predicted={self.predicted_time_s * 1e3:.2f} ms>")

    def summary(self) -> str:
        """The summary (memsched/inspect/summary.py) as text: the plan, memory per tier, bytes
        per link, saved activations of a training step, predicted time, planning passes."""
        return summary_text(summarize(self))

    # -- training steps ---------------------------------------------------------------------
    @property
    def is_training(self) -> bool:
        """A training step: the program hands its forward outputs to autograd (a boundary)."""
        return any(op_of(n) is Op.BOUNDARY for n in self.graph.graph.nodes)

    def saved_activations(self) -> list[dict]:
        """Each activation the forward saves for the backward, with what the plan does with it
        across the boundary: keep, host, disk (offloaded and prefetched) or recompute."""
        return [dict(r) for r in self.facts.saved_activations]

    def recomputed_nodes(self) -> set[str]:
        """Compute nodes the plan runs a second time (not the frees that follow them), those
        fused into regions included (by the names they had)."""
        names = {n.name for n in self.graph.graph.nodes if info(n).made_by == "recompute" and is_compute(n)}
        for reg in self._regions():
            names.update(name for x, name in zip(_ops_of(reg), reg.names) if info(x).made_by == "recompute")
        return names

    def recompute_overhead_s(self) -> float:
        """Predicted seconds of recomputation per step; of a fused region, the share of its time
        its recomputed ops take by the roofline."""
        names = self.recomputed_nodes()
        spans = {s.name: s.end - s.start for s in self.sim.spans if s.stream == "compute"}
        total = 0.0
        for n in self.graph.graph.nodes:
            reg = region_of(n)
            if reg is not None:
                ops = _ops_of(reg)
                cost = [estimate_op_time(x, self.hardware) for x in ops]
                again = sum(c for x, c in zip(ops, cost) if info(x).made_by == "recompute")
                total += spans.get(n.name, 0.0) * (again / sum(cost) if sum(cost) else 0.0)
            elif n.name in names and not reads_region(n):
                total += spans.get(n.name, 0.0)
        return total

    def _regions(self) -> list:
        return [region_of(n) for n in self.graph.graph.nodes if region_of(n) is not None]

    # -- inspection (memsched/inspect/) -------------------------------------------------------
    def steps(self) -> list[dict]:
        """One plain dict per scheduled node: op, tier moves, live bytes, predicted start/end."""
        from .inspect.steps import plan_steps

        return plan_steps(self)

    def plot_memory(self, path=None, *, ax=None):
        """Device bytes over the program, stacked by kind, with the budget line."""
        from .inspect.plots import plot_memory

        return plot_memory(self, path, ax=ax)

    def plot_timeline(self, path=None, *, ax=None):
        """Gantt chart of compute and each transfer stream."""
        from .inspect.plots import plot_timeline

        return plot_timeline(self, path, ax=ax)

    def _repr_html_(self) -> str:
        from .inspect.html import plan_html

        return plan_html(self)

    # -- files (memsched/io/serialize.py) -----------------------------------------------------
    def save(self, path) -> None:
        """Write the plan as versioned JSON (``Plan.load`` reads it back)."""
        save_plan(self, path)

    @classmethod
    def load(cls, path) -> "Plan":
        """A plan written by ``save``: prints, summarises and verifies without re-solving.
        The file is data: every field is checked before use and nothing in it runs
        (PlanFileError, a ValueError, for another file, a newer format or a damaged one)."""
        return cls(**load_fields(path))

    @classmethod
    def from_dict(cls, d: dict, source: str = "the plan") -> "Plan":
        """A plan from the saved JSON document (``memsched.io.serialize.plan_to_dict``),
        checked as ``load`` checks a file (PlanFileError)."""
        return cls(**plan_fields(d, source))

    def predict(self) -> SimResult:
        """The schedule simulated again now: fused regions and ops priced by their measured times
        when they have run on this machine (the local CPU profile: runtime/regions.py,
        runtime/op_timing.py), the roofline otherwise. ``plan.predicted_time_s`` keeps the
        prediction the plan was made with."""
        return simulate(self.graph, self.hardware)

    def verify(self) -> int:
        """Check the schedule with the independent verifier; returns its peak device bytes."""
        from .verify import verify_schedule

        return verify_schedule(self.graph, self.budget_bytes, self.hardware)


def as_plan(plan_or_path) -> Plan:
    """A Plan as given, or loaded from a path."""
    return plan_or_path if isinstance(plan_or_path, Plan) else Plan.load(plan_or_path)


# ----------------------------------------------------------------------------- facts


def placement_facts(program: Program, placement: Placement) -> PlacementFacts:
    """What a plan keeps of its program and placement: solver status, minimum budget, bytes
    per tier, and the saved activations of a training step."""
    pl = placement
    return PlacementFacts(pl.status, pl.mip_gap, pl.solve_s, pl.min_budget_bytes, len(pl.gaps),
                          _tier_bytes(program, pl), _offloaded_activation_bytes(program, pl), tuple(pl.notes),
                          tuple(_saved_activations(program, pl)), pl.floor_bytes, pl.floor_at, pl.binds_at)


def _tier_bytes(program: Program, placement: Placement) -> dict:
    out = {"device": 0, "host": 0, "disk": 0}
    for b in program.storages:
        if b.id in placement.resident:
            out["device"] += b.nbytes
        elif b.id in placement.home:
            out[placement.home[b.id]] += b.nbytes
    return out


def _offloaded_activation_bytes(program: Program, placement: Placement) -> dict:
    out = {"host": 0, "disk": 0}
    for g in placement.gaps:
        c = placement.gap_choice[g.id]
        if not g.persistent and c in out:
            out[c] += program.storages[g.buffer].nbytes
    return out


def _saved_activations(program: Program, placement: Placement) -> list[dict]:
    p, pl = program, placement
    if p.boundary is None:
        return []
    crossing = {}
    for g in pl.gaps:
        if not g.persistent and g.start < p.boundary < g.end:
            crossing[g.value] = pl.gap_choice[g.id]
    rows = []
    for v in p.values.values():
        if 0 <= v.step < p.boundary < v.last_use and v.storages:
            b = p.storages[v.storages[0]]
            if b.kind in PERSISTENT or b.values[0] != v.name or b.id in p.user_held:
                continue
            rows.append({"value": v.name, "bytes": b.nbytes, "defined": v.step, "last_use": v.last_use,
                         "decision": crossing.get(v.name, KEEP)})
    return rows


def _ops_of(region) -> list:
    """A fused region's ops, in the order its ``names`` list them."""
    return [x for x in region.graph.graph.nodes if x.op == "call_function"]
