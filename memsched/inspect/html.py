"""A plan as HTML for notebooks (``Plan._repr_html_``): its summary (the sections of
memsched/inspect/summary.py as tables), the two plots, and -- after a run -- predicted against
measured side by side."""
from __future__ import annotations

import base64
import html
import io

from ..ir.units import format_bytes
from .summary import Section, summarize

_HISTORY_LINES = 300  # per snapshot; print(plan.history[i]) shows all of it

_STYLE = """<style>
.memsched-plan table {border-collapse: collapse; margin: 0.3em 0 0.8em 0; font-size: 0.9em}
.memsched-plan th, .memsched-plan td {border: 1px solid #ccc; padding: 2px 8px; text-align: left}
.memsched-plan td.num {text-align: right; font-variant-numeric: tabular-nums}
.memsched-plan img {max-width: 100%}
.memsched-plan pre {font-size: 0.8em; max-height: 30em; overflow: auto}
.memsched-plan p.caption {margin: -0.6em 0 0.8em 0; font-size: 0.85em; color: #555}
</style>"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _table(rows, header=None, numeric=()) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = []
        for i, c in enumerate(row):
            cls = ' class="num"' if i in numeric else ""
            cells.append(f"<td{cls}>{_e(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "".join(out)


def _ms(seconds) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _section(section: Section, heading: str = "h4") -> str:
    """One summary section as a heading and a table (label/value rows have no header)."""
    rows = [(r.label, *r.cells) for r in section.rows]
    caption = f'<p class="caption">{_e(section.caption)}</p>' if section.caption else ""
    return (f"<{heading}>{_e(section.title)}</{heading}>"
            + _table(rows, section.columns or None, numeric=section.numeric) + caption)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_e(fig.axes[0].get_title() if fig.axes else "plot")}" src="data:image/png;base64,{data}"/>'


def _figures(plan) -> str:
    from .plots import plot_memory, plot_timeline

    try:
        figs = [plot_memory(plan), plot_timeline(plan)]
    except ImportError as e:
        return f"<p><em>{_e(e)}</em></p>"
    return "<div>" + "<br/>".join(_png(f) for f in figs) + "</div>"


def _ratio(predicted: float, measured: float) -> str:
    return f"{measured / predicted:.2f}x" if predicted else ("-" if not measured else "not predicted")


def _measured(plan) -> str:
    m = plan.measured
    rows = [("peak device bytes", format_bytes(plan.peak_device_bytes), format_bytes(m.peak_device_bytes),
             _ratio(plan.peak_device_bytes, m.peak_device_bytes))]
    if getattr(m, "cuda_max_memory_allocated", None) is not None:
        rows.append(("CUDA max memory allocated", "", format_bytes(m.cuda_max_memory_allocated), ""))
    predicted = plan.bytes_moved
    for link in sorted(set(predicted) | set(m.bytes_moved)):
        p, got = predicted.get(link, 0), m.bytes_moved.get(link, 0)
        rows.append((f"bytes moved on {link}", format_bytes(p), format_bytes(got), _ratio(p, got)))
    rows.append(("stall", _ms(plan.sim.stall_s), _ms(m.stall_s), _ratio(plan.sim.stall_s, m.stall_s)))
    rows.append(("time", _ms(plan.predicted_time_s), _ms(m.wall_s), _ratio(plan.predicted_time_s, m.wall_s)))
    return ("<h4>predicted vs measured (last run)</h4>"
            + _table(rows, ("", "predicted", "measured", "measured / predicted"), numeric=(1, 2, 3)))


def _history(plan) -> str:
    if not plan.history:
        return ""
    parts = ["<h4>history</h4><p>the program after each pass (<code>plan.history[i]</code>):</p>"]
    for i, snap in enumerate(plan.history):
        lines = str(snap).splitlines()
        shown = "\n".join(lines[:_HISTORY_LINES])
        if len(lines) > _HISTORY_LINES:
            shown += f"\n# ... {len(lines) - _HISTORY_LINES} more lines: print(plan.history[{i}])"
        nodes = len(snap.graph.graph.nodes)
        parts.append(f"<details><summary>{i}: after {_e(snap.name)} ({nodes} nodes)</summary>"
                     f"<pre>{_e(shown)}</pre></details>")
    return "".join(parts)


def plan_html(plan) -> str:
    """The whole view as one HTML fragment (all text escaped; plots as inline PNG): the summary
    (memsched/inspect/summary.py), the plots, predicted against measured, the history."""
    sections = summarize(plan)
    parts = [
        '<div class="memsched-plan">',
        _STYLE,
        *(_section(s, "h3" if s.key == "plan" else "h4") for s in sections),
        _figures(plan),
        _measured(plan) if plan.measured is not None else
        "<p><em>not run yet: a plan from memsched.compile shows what its last run measured</em></p>",
        _history(plan),
        "</div>",
    ]
    return "\n".join(parts)
