"""Two pictures of a plan: device memory over the program, and a Gantt chart of its streams.

matplotlib is optional (``pip install matplotlib`` or the ``viz`` extra) and imported only
here, when a plot is asked for. Figures are built with ``matplotlib.figure.Figure`` rather
than pyplot, so nothing changes a global backend and nothing opens a window; the figure
renders itself as PNG in a notebook and is saved to ``path`` (PNG, SVG, PDF by suffix).
"""
from __future__ import annotations

import io

from ..ir.meta import info
from ..ir.units import format_bytes
from .memory import CATEGORIES, inserted_op, memory_by_kind
from .steps import plan_steps

_COLORS = {"weights": "#4C72B0", "kv cache": "#8172B3", "activations": "#DD8452", "grads": "#55A868", "other": "#8C8C8C",
           "workspace": "#C9B46B"}
_STREAM_ORDER = ("compute", "h2d", "disk_read", "d2h", "disk_write")
_STREAM_COLORS = {"compute": "#4C72B0", "h2d": "#55A868", "disk_read": "#8172B3",
                  "d2h": "#DD8452", "disk_write": "#C44E52"}
_RECOMPUTE_COLOR = "#CCB974"
_STALL_COLOR = "#D62728"

_figure_class = None


def _figure_cls():
    """``matplotlib.figure.Figure`` with a PNG repr, so a notebook shows it without pyplot."""
    global _figure_class
    if _figure_class is None:
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError("memsched's plots need matplotlib: pip install matplotlib "
                              "(or pip install 'memsched[viz]')") from e

        class PlanFigure(Figure):
            def _repr_png_(self):
                buf = io.BytesIO()
                self.savefig(buf, format="png", bbox_inches="tight")
                return buf.getvalue()

        _figure_class = PlanFigure
    return _figure_class


def _axes(ax, size):
    cls = _figure_cls()  # raises the clear ImportError even when an ax is given
    if ax is not None:
        return ax.figure, ax
    fig = cls(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _finish(fig, path):
    if path is not None:
        fig.savefig(path)
    return fig


def _unit(top: float) -> tuple[str, int]:
    """The binary unit that puts ``top`` between 1 and 1024, for readable axis ticks."""
    for name, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if top >= size:
            return name, size
    return "B", 1


def plot_memory(plan, path=None, *, ax=None):
    """Predicted device bytes after every node, stacked by kind, with the budget line.

    The stack is this package's own per-storage count (``memory.memory_by_kind``); its top is
    the simulator's timeline, node for node. Returns the figure (``ax.figure`` when given).
    """
    fig, ax = _axes(ax, (10, 4))
    rows = memory_by_kind(plan)
    n = len(rows)
    peak = max((r.total for r in rows), default=0)
    show_budget = plan.budget_bytes <= 2 * max(peak, 1)
    top = max(peak, plan.budget_bytes if show_budget else 0, 1)
    unit, size = _unit(top)
    x = list(range(n + 1))  # one step past the end, so the last node has a width
    ys = [[r.by_category[c] / size for r in rows] for c in CATEGORIES]
    ys = [y + y[-1:] for y in ys]
    shown = [(c, y) for c, y in zip(CATEGORIES, ys) if any(y)]
    if shown:
        ax.stackplot(x, *[y for _, y in shown], labels=[c for c, _ in shown],
                     colors=[_COLORS[c] for c, _ in shown], step="post", alpha=0.85, linewidth=0)
    if show_budget:
        ax.axhline(plan.budget_bytes / size, color=_STALL_COLOR, linestyle="--", linewidth=1.2,
                   label=f"budget {format_bytes(plan.budget_bytes)}")
    else:
        ax.text(0.99, 0.97, f"budget {format_bytes(plan.budget_bytes)} (above the plotted range)",
                transform=ax.transAxes, ha="right", va="top", fontsize=8, color=_STALL_COLOR)
    if rows:
        at = max(rows, key=lambda r: r.total)
        ax.annotate(f"peak {format_bytes(peak)} at {at.name}", xy=(at.index, peak / size), xytext=(0, 3),
                    textcoords="offset points", ha="center", va="bottom", fontsize=8)
    for op, color in (("prefetch", _STREAM_COLORS["h2d"]), ("offload", _STREAM_COLORS["d2h"])):
        idx = [r.index for r, node in zip(rows, plan.graph.graph.nodes) if inserted_op(node) == op]
        if idx:  # a rug under the curve: where the moves are issued
            ax.plot(idx, [0] * len(idx), "|", color=color, markersize=10, markeredgewidth=1.5,
                    clip_on=False, label=f"{op} issued")
    ax.set_xlim(0, max(n, 1))
    ax.set_ylim(0, top / size * 1.12)
    ax.set_xlabel("node of the scheduled program")
    ax.set_ylabel(f"device {unit} (predicted)")
    ax.set_title(f"{plan.model_name}: device memory by kind")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    return _finish(fig, path)


def _streams(spans) -> list[str]:
    seen = {s.stream for s in spans}
    return [s for s in _STREAM_ORDER if s in seen] + sorted(seen - set(_STREAM_ORDER))


def compute_idle(spans, end: float, eps: float = 1e-12) -> list[tuple[float, float]]:
    """Intervals where compute waits (on a fetch landing or a copy leaving), in seconds."""
    compute = sorted((s.start, s.end) for s in spans if s.stream == "compute")
    out, now = [], 0.0
    for start, stop in compute:
        if start > now + eps:
            out.append((now, start))
        now = max(now, stop)
    if end > now + eps:
        out.append((now, end))
    return out


def plot_timeline(plan, path=None, *, ax=None):
    """Gantt chart of the predicted schedule: compute and every transfer link on its own row,
    stalls of compute shaded and summed. Returns the figure (``ax.figure`` when given)."""
    spans = plan.sim.spans
    streams = _streams(spans)
    fig, ax = _axes(ax, (10, 1.0 + 0.55 * max(len(streams), 1)))
    recompute = {n.name for n in plan.graph.graph.nodes if info(n).made_by == "recompute"}
    ms = 1e3
    height = 0.7
    for row, stream in enumerate(streams):
        y = len(streams) - 1 - row  # compute on top
        mine = [s for s in spans if s.stream == stream]
        plain = [(s.start * ms, (s.end - s.start) * ms) for s in mine if s.name not in recompute]
        again = [(s.start * ms, (s.end - s.start) * ms) for s in mine if s.name in recompute]
        ax.broken_barh(plain, (y - height / 2, height), facecolors=_STREAM_COLORS.get(stream, "#937860"),
                       edgecolor="white", linewidth=0.2)
        if again:
            ax.broken_barh(again, (y - height / 2, height), facecolors=_RECOMPUTE_COLOR,
                           edgecolor="white", linewidth=0.2, label="recompute")
        if stream == "compute":
            idle = compute_idle(spans, plan.sim.time_s)
            if idle:
                ax.broken_barh([(a * ms, (b - a) * ms) for a, b in idle], (y - height / 2, height),
                               facecolors="none", edgecolor=_STALL_COLOR, hatch="////", linewidth=0.5,
                               label="compute waits")
    labels = []
    for stream in streams:
        moved = plan.sim.bytes_moved.get(stream)
        labels.append(stream if moved is None else f"{stream}\n{format_bytes(moved)}")
    ax.set_yticks(range(len(streams)), labels[::-1])
    total = plan.sim.time_s
    share = plan.sim.stall_s / total if total else 0.0
    ax.set_title(f"{plan.model_name}: predicted {total * ms:.2f} ms, stall {plan.sim.stall_s * ms:.2f} ms "
                 f"({share:.0%}); unconstrained {plan.unconstrained.time_s * ms:.2f} ms", fontsize=10)
    longest = max(plan_steps(plan), key=lambda r: r["stall_s"], default=None)
    if longest is not None and longest["stall_s"] > 0:
        y = len(streams) - 1 - streams.index("compute") if "compute" in streams else 0
        what = f": {longest['value']}" if longest["value"] else ""
        mid = (longest["start_s"] + longest["end_s"]) / 2
        side = "left" if mid < 0.3 * total else "right" if mid > 0.7 * total else "center"
        ax.annotate(f"longest wait {longest['stall_s'] * ms:.2f} ms ({longest['name']}{what})",
                    xy=(mid * ms, y + height / 2),
                    xytext=(0, 6), textcoords="offset points", ha=side, va="bottom", fontsize=8,
                    color=_STALL_COLOR, arrowprops={"arrowstyle": "-", "color": _STALL_COLOR})
    ax.set_xlim(0, max(total * ms, 1e-9) * 1.01)
    ax.set_ylim(-0.6, max(len(streams), 1) - 0.1)
    ax.set_xlabel("time (ms, predicted)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    return _finish(fig, path)
