"""The command line's tables: a plan's summary (the sections of memsched/inspect/summary.py),
a generator's two plans in brief, and the hardware profiles, as rich tables."""
from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..inspect.summary import SAVED_ACTIVATIONS_SHOWN, Row, Section, saved_activations_section, summarize
from ..ir.units import format_bytes as fb

# how a row's mark shows: beyond the budget, totals, and what happens to a saved activation
_STYLES = {"over": "red", "total": "bold", "host": "cyan", "disk": "magenta", "recompute": "yellow"}


def section_table(section: Section) -> Table:
    """One summary section as a rich table (label/value sections without a header)."""
    table = Table(title=escape(section.title), box=box.SIMPLE_HEAD, title_justify="left")
    if section.columns:
        for i, name in enumerate(section.columns):
            table.add_column(escape(name), justify="right" if i in section.numeric else "left")
    else:
        table.add_column("")
        table.add_column("")
        table.show_header = False
    for row in section.rows:
        table.add_row(*(Text(c) for c in (row.label, *row.cells)), style=_STYLES.get(row.mark))
    if section.caption:
        table.caption = escape(section.caption)
        table.caption_justify = "left"
    return table


def render_plan(console, plan, *, load_s: float | None = None, limit: int = SAVED_ACTIVATIONS_SHOWN) -> None:
    """The plan's summary as rich tables: the plan, memory per tier, transfers, saved
    activations (training steps), time, planning passes (``load_s``: building the model)."""
    for section in summarize(plan, load_s=load_s, limit=limit):
        console.print(section_table(section))


def render_saved_activations(console, plan, limit: int = SAVED_ACTIVATIONS_SHOWN) -> None:
    """What the training plan does with each activation the forward saves for the backward."""
    console.print(section_table(saved_activations_section(plan, limit)))


def _rings(gen) -> str:
    """What sliding-window layers keep instead of every position, and the recurrent layers'
    fixed-size states, if any."""
    rings = getattr(gen.decoder, "rings", [])
    sliding = [r for r in rings if r is not None]
    said = f"; {len(sliding)} of {len(rings)} layers slide, a ring of {sliding[0]}" if sliding else ""
    shapes = getattr(gen.decoder, "shapes", [])
    states = [spec for layer in shapes for spec in layer.conv + layer.recurrent]
    if states:
        held = sum(shape.numel() * dtype.itemsize for _, shape, dtype in states)
        said += (f"; {sum(layer.keeps_states for layer in shapes)} of {len(shapes)} layers keep "
                 f"recurrent states, {fb(held)} of it")
    return said


def generation_sections(gen, name: str) -> list[Section]:
    """A generator's two plans (memsched.Generator: prefill, decode) in brief: the budget, each
    program's peak, minimum and predicted time, and where the weights and the KV cache live."""
    prefill, decode = gen.plans
    hw, budget = prefill.hardware, prefill.budget_bytes
    rows = [Row("hardware", (f"{hw.name} ({hw.device_type}, {fb(hw.device_bytes)} device memory); "
                             f"runs on {gen.compiled.device}",), (hw.device_bytes,)),
            Row("budget", (fb(budget),), (budget,)),
            Row("KV cache", (f"{fb(gen.kv_cache_bytes)} (batch {gen.batch}, {gen.max_len} positions{_rings(gen)})",),
                (gen.kv_cache_bytes,))]
    rows.append(Row("prompt rows", (f"{gen.prefill_batch} of {gen.batch} at a time" if gen.prefill_batch < gen.batch
                                    else f"all {gen.batch} at once",), (gen.prefill_batch,)))
    for label, plan, per in (("prefill", prefill, "prompt"), ("decode", decode, "token")):
        peak = plan.peak_device_bytes
        rows.append(Row(label, (f"peak device {fb(peak)} ({peak / budget:.0%} of budget), minimum budget "
                                f"{fb(plan.min_budget_bytes)}, predicted {plan.predicted_time_s * 1e3:.3f} ms "
                                f"per {per}",), (peak,), "over" if peak > budget else ""))
        moved = ", ".join(f"{link} {fb(n)}" for link, n in sorted(plan.bytes_moved.items()) if n)
        rows.append(Row(f"moved per {per}", (moved or "nothing",), (sum(plan.bytes_moved.values()),)))
    rows.append(Row("planning", (f"{gen.plan_s:.2f} s (both programs)",), (gen.plan_s,)))
    return [Section("generation", f"memsched generation plan for {name}", tuple(rows)), _placement_section(gen)]


def _placement_section(gen) -> Section:
    """Bytes of weights and of the KV cache homed per tier, in each program."""
    split = []
    for plan in gen.plans:
        kv, tiers = plan.kind_tier_bytes("kv_cache"), plan.tier_bytes()
        split.append(({t: tiers[t] - kv[t] for t in tiers}, kv))
    rows = tuple(Row(tier, tuple(fb(part[tier]) for pair in split for part in pair),
                     tuple(part[tier] for pair in split for part in pair)) for tier in ("device", "host", "disk"))
    return Section("placement", "Where the weights and the KV cache live (bytes homed per tier)", rows,
                   ("tier", "prefill weights", "prefill KV cache", "decode weights", "decode KV cache"),
                   (1, 2, 3, 4))


def render_hardware(console, profiles) -> None:
    """The hardware profiles, one row each."""
    def gbs(x):
        return f"{x / 1e9:.1f}"

    def flops(x):
        return f"{x / 1e12:.1f}"

    t = Table(title="Hardware profiles", box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("name", no_wrap=True)
    t.add_column("type")
    t.add_column("memory", justify="right")
    t.add_column("TFLOP/s\nbf16 / fp32", justify="right")
    t.add_column("HBM\nGB/s", justify="right")
    t.add_column("H2D / D2H\nGB/s", justify="right")
    t.add_column("disk r / w\nGB/s", justify="right")
    t.add_column("host RAM", justify="right")
    t.add_column("BLAS\nworkspace", justify="right")   # counted in every plan's peak (Hardware.workspace_bytes)
    for hw in profiles:
        t.add_row(escape(hw.name), hw.device_type, fb(hw.device_bytes),
                  f"{flops(hw.peak_flops)} / {flops(hw.peak_flops_fp32)}", gbs(hw.mem_bw),
                  f"{gbs(hw.h2d_bw)} / {gbs(hw.d2h_bw)}",
                  f"{gbs(hw.disk_read_bw)} / {gbs(hw.disk_write_bw)}",
                  fb(hw.host_bytes) if hw.host_bytes else "(is device)",
                  fb(hw.workspace_bytes) if hw.workspace_bytes else "-")
    t.caption = ("use with `memsched plan ... --hardware NAME`; the default, 'local', is this machine "
                 "calibrated once and cached; a plan counts the BLAS workspace (cuBLAS's) as held throughout")
    t.caption_justify = "left"
    console.print(t)
