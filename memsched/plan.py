"""Plan: the schedule memsched runs, with what it predicts, printable and checkable."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx

from .budget import format_bytes
from .cost_models.hardware import Hardware
from .cost_models.simulator import SimResult
from .passes.analysis import Program
from .compiler.capture import PERSISTENT
from .passes.placement import KEEP, Placement
from .printer import listing
from .runtime.ops import INSERTED_OPS


@dataclass
class PassRecord:
    name: str
    seconds: float
    note: str = ""


@dataclass
class PassSnapshot:
    """The program as one pass left it (``Plan.history``), for step-by-step inspection."""

    name: str
    graph: fx.GraphModule

    def __str__(self) -> str:
        return listing(self.graph, [f"after pass {self.name}"])


@dataclass(frozen=True)
class PlacementFacts:
    """What the header and the summary read from the placement and the analysis. A plan
    loaded from JSON has neither (it is not re-solved); it keeps these facts instead."""

    status: str
    mip_gap: float | None
    solve_s: float
    min_budget_bytes: int
    movable_gaps: int
    tier_bytes: dict
    offloaded_activation_bytes: dict
    notes: tuple = ()


@dataclass
class Plan:
    model_name: str
    budget_bytes: int
    hardware: Hardware
    graph: fx.GraphModule                 # the scheduled program
    program: Program | None               # analysis of the captured graph (None: loaded plan)
    placement: Placement | None           # (None: loaded plan, see ``facts``)
    sim: SimResult
    unconstrained: SimResult              # the same model with nothing moved
    passes: list[PassRecord] = field(default_factory=list)
    n_segments: int = 0
    history: list[PassSnapshot] = field(default_factory=list)
    measured: object | None = None        # RunStats of the last run, set by CompiledModule
    facts: PlacementFacts | None = None   # stored placement facts of a loaded plan
    signature: tuple | None = None        # input_signature of the example inputs it was planned for

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
        return self.placement_facts().min_budget_bytes

    @property
    def code(self) -> str:
        return str(self)

    def placement_facts(self) -> PlacementFacts:
        """Solver status, minimum budget and bytes per tier: from the placement, or as saved."""
        if self.placement is None or self.program is None:
            if self.facts is None:
                raise ValueError("this plan has neither a placement nor saved placement facts")
            return self.facts
        pl = self.placement
        return PlacementFacts(pl.status, pl.mip_gap, pl.solve_s, pl.min_budget_bytes, len(pl.gaps),
                              self.tier_bytes(), self.offloaded_activation_bytes(), tuple(pl.notes))

    def tier_bytes(self) -> dict:
        """Bytes of the model's tensors per home tier, and of activations offloaded per tier."""
        if self.placement is None or self.program is None:
            return dict(self.placement_facts().tier_bytes)
        out = {"device": 0, "host": 0, "disk": 0}
        for b in self.program.buffers:
            if b.id in self.placement.resident:
                out["device"] += b.nbytes
            elif b.id in self.placement.home:
                out[self.placement.home[b.id]] += b.nbytes
        return out

    def offloaded_activation_bytes(self) -> dict:
        if self.placement is None or self.program is None:
            return dict(self.placement_facts().offloaded_activation_bytes)
        out = {"host": 0, "disk": 0}
        for g in self.placement.gaps:
            c = self.placement.gap_choice[g.id]
            if not g.persistent and c in out:
                out[c] += self.program.buffers[g.buffer].nbytes
        return out

    # -- printing ---------------------------------------------------------------------------
    def header(self) -> list[str]:
        pl = self.placement_facts()
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
        ]

    def __str__(self) -> str:
        return listing(self.graph, self.header())

    def __repr__(self) -> str:
        return (f"<Plan {self.model_name} budget={format_bytes(self.budget_bytes)} "
                f"peak={format_bytes(self.peak_device_bytes)} predicted={self.predicted_time_s * 1e3:.2f} ms>")

    def summary(self) -> str:
        facts = self.placement_facts()
        tiers, acts = facts.tier_bytes, facts.offloaded_activation_bytes
        moved = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(self.bytes_moved.items())) or "nothing"
        slow = self.predicted_time_s / self.unconstrained.time_s if self.unconstrained.time_s else 1.0
        rows = [
            ("model", self.model_name),
            ("hardware", f"{self.hardware.name} ({self.hardware.device_type})"),
            ("budget", format_bytes(self.budget_bytes)),
            ("peak device (predicted)", format_bytes(self.peak_device_bytes)),
            ("unconstrained peak", format_bytes(self.unconstrained.peak_device_bytes)),
            ("minimum budget", format_bytes(self.min_budget_bytes)),
            ("weights on device / host / disk",
             " / ".join(format_bytes(tiers[t]) for t in ("device", "host", "disk"))),
            ("activations offloaded host / disk", " / ".join(format_bytes(acts[t]) for t in ("host", "disk"))),
            ("bytes moved per call", moved),
            ("predicted time", f"{self.predicted_time_s * 1e3:.2f} ms ({slow:.2f}x unconstrained "
                               f"{self.unconstrained.time_s * 1e3:.2f} ms)"),
            ("predicted stall", f"{self.sim.stall_s * 1e3:.2f} ms"),
            ("solver", f"{facts.status} in {facts.solve_s:.2f} s"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)

    # -- training steps ---------------------------------------------------------------------
    @property
    def is_training(self) -> bool:
        return self.program is not None and self.program.boundary is not None

    def saved_activations(self) -> list[dict]:
        """Each activation the forward saves for the backward, with what the plan does with it
        across the boundary: keep, host, disk (offloaded and prefetched) or recompute."""
        if not self.is_training:
            return []
        p, pl = self.program, self.placement
        crossing = {}
        for g in pl.gaps:
            if not g.persistent and g.start < p.boundary < g.end:
                crossing[g.value] = pl.gap_choice[g.id]
        rows = []
        for v in p.values.values():
            if 0 <= v.step < p.boundary < v.last_use and v.buffers:
                b = p.buffers[v.buffers[0]]
                if b.kind in PERSISTENT or b.values[0] != v.name or b.id in p.user_held:
                    continue
                rows.append({"value": v.name, "bytes": b.nbytes, "defined": v.step, "last_use": v.last_use,
                             "decision": crossing.get(v.name, KEEP)})
        return rows

    def recomputed_nodes(self) -> set[str]:
        """Compute nodes the plan runs a second time (not the frees that follow them)."""
        return {n.name for n in self.graph.graph.nodes if n.meta.get("memsched.pass") == "recompute"
                and n.op == "call_function" and n.target not in INSERTED_OPS}

    def recompute_overhead_s(self) -> float:
        """Predicted seconds of recomputation per step."""
        names = self.recomputed_nodes()
        return sum(s.end - s.start for s in self.sim.spans if s.stream == "compute" and s.name in names)

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

    def save(self, path) -> None:
        """Write the plan as versioned JSON (``Plan.load`` reads it back)."""
        from .inspect.serialize import save_plan

        save_plan(self, path)

    @classmethod
    def load(cls, path) -> "Plan":
        from .inspect.serialize import load_plan

        return load_plan(path)

    def verify(self) -> int:
        """Check the schedule with the independent verifier; returns its peak device bytes."""
        from .verify import verify_schedule

        return verify_schedule(self.graph, self.budget_bytes)
