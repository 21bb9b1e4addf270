"""The command line's tables: a plan's summary (the sections of memsched/inspect/summary.py)
and the hardware profiles, as rich tables."""
from __future__ import annotations

from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..inspect.summary import SAVED_ACTIVATIONS_SHOWN, Section, saved_activations_section, summarize
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
    for hw in profiles:
        t.add_row(escape(hw.name), hw.device_type, fb(hw.device_bytes),
                  f"{flops(hw.peak_flops)} / {flops(hw.peak_flops_fp32)}", gbs(hw.mem_bw),
                  f"{gbs(hw.h2d_bw)} / {gbs(hw.d2h_bw)}",
                  f"{gbs(hw.disk_read_bw)} / {gbs(hw.disk_write_bw)}",
                  fb(hw.host_bytes) if hw.host_bytes else "(is device)")
    t.caption = ("use with `memsched plan ... --hardware NAME`; the default, 'local', is this machine "
                 "calibrated once and cached")
    t.caption_justify = "left"
    console.print(t)
