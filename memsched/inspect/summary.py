"""The plan's summary as data: one list of sections that every view renders.

``summarize(plan)`` gives the sections -- the plan (model, hardware, budget, peaks, minimum
budget), memory per tier, bytes moved per link, the saved activations of a training step,
predicted time and the solver, planning time per pass -- each a title and rows of a label
and value texts (with the raw numbers behind them). ``summary_text`` renders them as text
(``Plan.summary()``); memsched/inspect/html.py renders them as HTML tables and
memsched/cli/render.py as rich tables. A plan made here and the same plan loaded from its
file give the same sections.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..ir.kinds import LINKS
from ..ir.ops import Op, op_of
from ..ir.regions import region_of
from ..ir.units import format_bytes as fb
from ..passes.chunking import LOSS_HEAD

SAVED_ACTIVATIONS_SHOWN = 40  # the largest saved activations listed (the caption totals all)


@dataclass(frozen=True)
class Row:
    """A label and its value texts (one per column after the label). ``values``: the raw
    numbers behind the texts (bytes, seconds, ratios; None where a text has none). ``mark``:
    "over" (beyond the budget), "total", or a saved activation's decision, for renderers to
    emphasise."""

    label: str
    cells: tuple[str, ...]
    values: tuple = ()
    mark: str = ""

    @property
    def value(self) -> str:
        return "  ".join(self.cells)


@dataclass(frozen=True)
class Section:
    """A titled table. ``columns``: the header, the label column's first (none: label/value
    rows); ``numeric``: indices of the columns that align right (0 is the label)."""

    key: str
    title: str
    rows: tuple[Row, ...]
    columns: tuple[str, ...] = ()
    numeric: tuple[int, ...] = ()
    caption: str = ""


def _ms(seconds: float, digits: int = 3) -> str:
    return f"{seconds * 1e3:.{digits}f} ms"


def _per(training: bool) -> str:
    return "training step" if training else "call"


def plan_section(plan, training: bool) -> Section:
    hw, peak, budget = plan.hardware, plan.peak_device_bytes, plan.budget_bytes
    share = f" ({peak / budget:.0%} of budget)" if budget else ""
    rows = (  # the title names the model
        Row("program", ("training step (forward and backward)" if training else "inference call",)),
        Row("hardware", (f"{hw.name} ({hw.device_type}, {fb(hw.device_bytes)} device memory)",),
            (hw.device_bytes,)),
        Row("budget", (fb(budget),), (budget,)),
        Row("peak device (predicted)", (fb(peak) + share,), (peak,), "over" if peak > budget else ""),
        Row("unconstrained peak", (fb(plan.unconstrained.peak_device_bytes),),
            (plan.unconstrained.peak_device_bytes,)),
        Row("minimum budget", (fb(plan.min_budget_bytes) + _minimum_note(plan),), (plan.min_budget_bytes,)),
        *_allocator_rows(hw),
        *_limit_rows(plan.facts),
        *_chunk_rows(getattr(plan, "chunking", ())),
        *_value_rows(getattr(plan, "input_values", ())),
        *_region_rows(plan.graph),
    )
    return Section("plan", f"memsched plan for {plan.model_name}", rows)


def _minimum_note(plan) -> str:
    """The minimum is this program's: a plan with every module whole may reach lower by splitting
    modules (passes/chunking.py), which memsched only tries for a budget below it."""
    if getattr(plan, "chunking", ()):
        return " (with the modules split as below)"
    return " (every module whole; below it, modules are split unless chunk_ops=False)"


def _allocator_rows(hw) -> tuple:
    """How device bytes are counted where the allocator counts more than the tensors hold."""
    if hw.workspace_bytes == 0 and hw.alloc_block_bytes == 1:
        return ()
    return (Row("counted as the allocator does", (f"{fb(hw.workspace_bytes)} of library workspace (cuBLAS) held "
                                                  f"throughout, each tensor in {hw.alloc_block_bytes}-byte blocks",),
                (hw.workspace_bytes,)),)


def _limit_rows(facts) -> tuple:
    """The floor (no plan needs less without splitting an op) and where the minimum binds."""
    if not facts.floor_bytes:
        return ()
    return (Row("floor (largest single op)", (f"{fb(facts.floor_bytes)}: {facts.floor_at}",),
                (facts.floor_bytes,)),
            Row("minimum binds at", (facts.binds_at,)))


def _chunk_rows(chunking) -> tuple:
    """The modules run on slices of their input (passes/chunking.py), when the budget asked."""
    if not chunking:
        return ()
    most = max(c.chunks for c in chunking)
    shown = sorted(chunking, key=lambda c: c.path != LOSS_HEAD)   # the loss head first
    return (Row("modules split", (f"{len(chunking)}, up to {most} slices: {', '.join(map(str, shown[:3]))}"
                                  + (", ..." if len(chunking) > 3 else ""),)),)


def _value_rows(values) -> tuple:
    """The values read off the inputs that shaped the program (frontend/input_values.py)."""
    return (Row("planned for values", (values_text(values),)),) if values else ()


def values_text(values, shown: int = 4, width: int = 40) -> str:
    """``(what, value)`` pairs as one line: the first ``shown``, each value cut at ``width``."""
    cut = lambda v: v if len(v) <= width else v[:width - 3] + "..."  # noqa: E731
    return "; ".join(f"{what} = {cut(value)}" for what, value in values[:shown]) + \
        (f"; and {len(values) - shown} more" if len(values) > shown else "")


def _region_rows(gm) -> tuple:
    """The fused regions (passes/fusion.py), when fusion ran."""
    regions = [region_of(n) for n in gm.graph.nodes if op_of(n) is Op.REGION]
    if not regions:
        return ()
    kinds = len({r.key for r in regions})
    ops = sum(len(r.ops) for r in regions)
    return (Row("fused regions", (f"{len(regions)} ({kinds} distinct), {ops} ops",), (len(regions),)),)


def memory_section(plan) -> Section:
    facts, hw = plan.facts, plan.hardware
    tiers, acts = facts.tier_bytes, facts.offloaded_activation_bytes
    peak, budget = plan.peak_device_bytes, plan.budget_bytes
    rows = [Row("device", (f"{fb(budget)} budget", fb(peak), fb(tiers["device"]), "-"),
                (budget, peak, tiers["device"], None), "over" if peak > budget else "")]
    for tier in ("host", "disk"):
        capacity = "-" if tier == "disk" else (fb(hw.host_bytes) if hw.host_bytes else "(is device)")
        held = tiers[tier] + acts[tier]
        rows.append(Row(tier, (capacity, "≤ " + fb(held), fb(tiers[tier]), fb(acts[tier])),
                        (hw.host_bytes if tier == "host" else None, held, tiers[tier], acts[tier])))
    kv = plan.kind_tier_bytes("kv_cache") if hasattr(plan, "kind_tier_bytes") else {}
    caption = ("of the model's tensors homed, the KV cache: "
               + ", ".join(f"{fb(n)} on {t}" for t, n in kv.items() if n)) if any(kv.values()) else ""
    return Section("memory", "Memory per tier", tuple(rows),
                   ("tier", "capacity", "peak held", "weights homed", "activations offloaded"), (1, 2, 3, 4),
                   caption)


def links_section(plan, training: bool) -> Section:
    moved, hw = plan.bytes_moved, plan.hardware
    rows = []
    for link in [*LINKS, *sorted(set(moved) - set(LINKS))]:
        n = int(moved.get(link, 0))
        if not n and link not in LINKS:
            continue
        bw = hw.bandwidth(link) if link in LINKS else 0.0
        busy = n / bw if bw and n else None
        rows.append(Row(link, (fb(n) if n else "-", f"{bw / 1e9:.1f} GB/s" if bw else "-",
                               _ms(busy, 2) if busy is not None else "-"), (n, bw, busy)))
    total = sum(moved.values())
    return Section("links", f"Bytes moved per {_per(training)}", tuple(rows),
                   ("link", "bytes", "bandwidth", "link busy"), (1, 2, 3),
                   f"total {fb(total)}" if total else "nothing moves")


def saved_activations_section(plan, limit: int = SAVED_ACTIVATIONS_SHOWN) -> Section:
    """What a training plan does with each activation the forward saves for the backward."""
    saved = plan.saved_activations()
    totals: dict[str, int] = {}
    for r in saved:
        totals[r["decision"]] = totals.get(r["decision"], 0) + r["bytes"]
    rows = tuple(Row(r["value"], (fb(r["bytes"]), str(r["defined"]), str(r["last_use"]), r["decision"]),
                     (r["bytes"], r["defined"], r["last_use"], None), r["decision"])
                 for r in sorted(saved, key=lambda r: -r["bytes"])[:limit])
    caption = "totals: " + " · ".join(f"{k} {fb(v)}" for k, v in sorted(totals.items())) + (
        f" (largest {limit} shown)" if len(saved) > limit else "")
    return Section("saved_activations", f"Saved activations ({len(saved)})", rows,
                   ("value", "bytes", "forward step", "backward use", "decision"), (1, 2, 3), caption)


def time_section(plan, training: bool) -> Section:
    facts, sim = plan.facts, plan.sim
    t_pred, t_free = plan.predicted_time_s, plan.unconstrained.time_s
    slow = t_pred / t_free if t_free else 1.0
    recompute_s, recomputed = plan.recompute_overhead_s(), len(plan.recomputed_nodes())
    gap = f", gap {facts.mip_gap:.1%}" if facts.mip_gap is not None else ""
    rows = [
        Row("predicted", (_ms(t_pred),), (t_pred,)),
        Row("unconstrained", (_ms(t_free),), (t_free,)),
        Row("slowdown", (f"{slow:.2f}x",), (slow,)),
        Row("compute", (_ms(sim.compute_s),), (sim.compute_s,)),
        Row("stall on transfers", (_ms(sim.stall_s),), (sim.stall_s,)),
    ]
    contention = sim.contention_s
    own = sim.time_s - sim.compute_s - sim.stall_s - contention   # the runtime's own lines and transfer calls
    if own > 1e-9:
        rows.append(Row("runtime's own work", (_ms(own),), (own,)))
    if contention > 1e-9:
        rows.append(Row("copies on compute's cores", (_ms(contention),), (contention,)))
    rows += [
        Row("recompute overhead", (f"{_ms(recompute_s)} ({recomputed} recomputed nodes)",), (recompute_s,)),
        Row("solver", (f"{facts.status}{gap} in {facts.solve_s:.2f} s ({plan.n_segments} segments, "
                       f"{facts.movable_gaps} movable gaps)",), (facts.solve_s,)),
    ]
    if facts.notes:
        rows.append(Row("notes", ("; ".join(facts.notes),)))
    return Section("time", f"Predicted time per {_per(training)}", tuple(rows))


def passes_section(plan, load_s: float | None = None) -> Section:
    timed = ([("load target", load_s, "")] if load_s is not None else []) + \
        [(p.name, p.seconds, p.note or "") for p in plan.passes]
    rows = [Row(name, (_ms(s, 1), note), (s, None)) for name, s, note in timed]
    total = sum(s for _, s, _ in timed)
    rows.append(Row("total", (_ms(total, 1), ""), (total, None), "total"))
    return Section("passes", "Planning time per pass", tuple(rows), ("pass", "time", "note"), (1,))


def summarize(plan, *, load_s: float | None = None, limit: int = SAVED_ACTIVATIONS_SHOWN) -> list[Section]:
    """The plan's summary, section by section (``load_s``: time spent building the model,
    shown as the first planning pass; ``limit``: saved activations listed)."""
    training = plan.is_training
    sections = [plan_section(plan, training), memory_section(plan), links_section(plan, training)]
    if training:
        sections.append(saved_activations_section(plan, limit))
    sections += [time_section(plan, training), passes_section(plan, load_s)]
    return sections


def _text_table(section: Section) -> list[str]:
    table = [(r.label, *r.cells) for r in section.rows]
    if section.columns:
        table.insert(0, section.columns)
    width = [max(len(row[i]) for row in table if i < len(row)) for i in range(max(map(len, table)))]

    def line(row) -> str:
        cells = [c.rjust(width[i]) if i in section.numeric else c.ljust(width[i]) for i, c in enumerate(row)]
        return ("  " + "  ".join(cells)).rstrip()

    return [line(row) for row in table]


def summary_text(sections: list[Section]) -> str:
    """The sections as aligned plain text, one block per section."""
    blocks = []
    for s in sections:
        lines = [s.title, *_text_table(s)]
        if s.caption:
            lines.append("  " + s.caption)
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
