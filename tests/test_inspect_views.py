"""Inspection views of a plan: steps as rows, memory and timeline plots, the notebook HTML.

One GPT-2 from the zoo is compiled at 40 % of its unconstrained peak (weights stream from a
slow disk) and run once, so the plan has moves, stalls and measured stats. The plotted stack is
checked geometrically against the simulator's timeline; the rows' times against its spans.
"""
from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch

import memsched
from memsched.ir.meta import annotate, info  # noqa: E402
from memsched.cost_models.simulator import simulate
from memsched.inspect import plots
from memsched.inspect.html import plan_html
from helpers import FIXED_CPU
from memsched.inspect.memory import CATEGORIES, memory_by_kind
from memsched.inspect.steps import COLUMNS
from memsched.ir import ops
from zoo import build

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def compiled():
    model, args, kwargs = build("gpt2")
    base = memsched.plan(model, args, budget=10**13, example_kwargs=kwargs)
    budget = max(int(base.unconstrained.peak_device_bytes * 0.4), base.min_budget_bytes)
    # the fixed CPU profile with a slow disk: weights stream from disk and compute stalls
    hw = FIXED_CPU.replace(disk_read_bw=2e8, disk_write_bw=2e8)
    cm = memsched.compile(model, budget, device="cpu", hardware=hw, example_inputs=args, example_kwargs=kwargs)
    cm(*args, **kwargs)
    yield cm
    cm.close()


@pytest.fixture(scope="module")
def plan(compiled):
    p = compiled.plan
    assert p.bytes_moved, "the budget should make weights move"
    assert p.measured is not None
    return p


def test_steps_are_plain_rows_for_pandas(plan):
    rows = plan.steps()
    nodes = list(plan.graph.graph.nodes)
    assert len(rows) == len(nodes)
    df = pd.DataFrame(rows)
    assert tuple(df.columns) == COLUMNS
    for row in rows:
        assert all(v is None or type(v) in (str, int, float) for v in row.values()), row
    assert list(df["name"]) == [n.name for n in nodes]
    assert list(df["index"]) == list(range(len(nodes)))
    assert list(df["live_bytes"]) == [b for _, b in plan.sim.timeline]
    assert set(df["op"]) >= {"placeholder", "prefetch", "wait", "free", "output"}
    assert any(op.startswith("aten.") for op in df["op"])
    # the inserted nodes carry their pass, placeholders their kind and tier
    assert set(df.loc[df.op.isin(["prefetch", "wait", "free"]), "pass"]) == {"placement"}
    for row, n in zip(rows, nodes):
        if n.op == "placeholder":
            assert row["kind"] == info(n).kind and row["tier"] == info(n).tier


def test_steps_moves_add_up_to_bytes_moved(plan):
    df = pd.DataFrame(plan.steps())
    moves = df[df.op.isin(["prefetch", "offload"])]
    assert (moves.nbytes > 0).all() and (df[~df.op.isin(["prefetch", "offload"])].nbytes == 0).all()
    per_link: dict[str, int] = {}
    for stream, nbytes in zip(moves["stream"], moves["nbytes"]):
        for link in stream.split("+"):
            per_link[link] = per_link.get(link, 0) + int(nbytes)
    assert per_link == plan.bytes_moved
    fetches = df[df.op == "prefetch"]
    assert set(fetches["move"]) <= {"host->device", "disk->device"}
    assert fetches["value"].notna().all()


def test_steps_times_follow_the_simulator(plan):
    rows = plan.steps()
    spans = {s.name: s for s in plan.sim.spans if s.stream == "compute"}
    for row in rows:
        if row["name"] in spans:
            s = spans[row["name"]]
            assert (row["start_s"], row["end_s"]) == (s.start, s.end)
            assert row["stream"] == "compute"
        assert row["end_s"] >= row["start_s"]
    assert math.isclose(sum(r["stall_s"] for r in rows), plan.sim.stall_s, rel_tol=1e-9, abs_tol=1e-12)
    assert plan.sim.stall_s > 0, "streaming GPT-2 from disk should stall somewhere"
    assert math.isclose(max(r["end_s"] for r in rows), plan.predicted_time_s, rel_tol=1e-9)
    # compute never runs before the waits in front of it have ended
    ready = 0.0
    for row in rows:
        if row["op"] == "wait":
            ready = max(ready, row["end_s"])
        elif row["stream"] == "compute":
            assert row["start_s"] >= ready - 1e-15


def test_memory_split_sums_to_the_simulator(plan):
    rows = memory_by_kind(plan)
    assert [r.total for r in rows] == [b for _, b in plan.sim.timeline]
    assert all(r.total == sum(r.by_category.values()) for r in rows)
    assert all(sum(r.by_category.values()) == r.total for r in rows)
    assert all(v >= 0 for r in rows for v in r.by_category.values())
    # after the placeholders: weights are exactly the storages of device-homed model tensors
    nodes = list(plan.graph.graph.nodes)
    last = max(i for i, n in enumerate(nodes) if n.op == "placeholder")
    storages = {}
    for n in nodes[:last + 1]:
        if info(n).tier == "device" and info(n).kind in ("weight", "buffer", "constant"):
            st = n.meta["val"].untyped_storage()
            storages[st._cdata] = st.nbytes()
    assert rows[last].by_category["weights"] == sum(storages.values()) > 0
    assert max(r.by_category["weights"] for r in rows) > rows[last].by_category["weights"], \
        "streamed weights should add to the weights area"


def _inside(collections, x, y) -> bool:
    return any(p.contains_point((x, y)) for c in collections for p in c.get_paths())


def test_memory_plot_stack_tops_at_the_timeline(plan, tmp_path):
    fig = plan.plot_memory()
    ax = fig.axes[0]
    stack = ax.collections
    assert 1 <= len(stack) <= len(CATEGORIES)
    peak = max(b for _, b in plan.sim.timeline)
    scale = peak / max(max(p.get_extents().y1 for c in stack for p in c.get_paths()), 1e-30)
    eps = 1e-6 * peak / scale
    for i, (_, total) in enumerate(plan.sim.timeline):
        y = total / scale
        if total > 0:
            assert _inside(stack, i + 0.5, y - eps), f"node {i}: the stack is lower than {total} bytes"
        assert not _inside(stack, i + 0.5, y + eps), f"node {i}: the stack is higher than {total} bytes"
    # the budget line at the budget, in the same unit
    budget_lines = [ln for ln in ax.lines if ln.get_label().startswith("budget")]
    assert len(budget_lines) == 1
    assert math.isclose(budget_lines[0].get_ydata()[0] * scale, plan.budget_bytes, rel_tol=1e-9)


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<svg")])
def test_plots_are_written(plan, tmp_path, suffix, magic):
    for fn in (plan.plot_memory, plan.plot_timeline):
        path = tmp_path / f"{fn.__name__}{suffix}"
        fig = fn(path)
        assert path.stat().st_size > 1000
        head = path.read_bytes()[:4096]
        assert (head.startswith(magic) if suffix == ".png" else magic in head)
        assert fig.axes and fig._repr_png_().startswith(b"\x89PNG")


def test_plots_draw_into_a_given_axes(plan):
    from matplotlib.figure import Figure

    fig = Figure()
    left, right = fig.subplots(1, 2)
    assert plan.plot_memory(ax=left) is fig
    assert plan.plot_timeline(ax=right) is fig
    assert left.collections and right.collections


def test_timeline_rows_and_stalls(plan):
    fig = plan.plot_timeline()
    ax = fig.axes[0]
    labels = [t.get_text().split("\n")[0] for t in ax.get_yticklabels()]
    assert set(labels) == {s.stream for s in plan.sim.spans}
    assert labels[-1] == "compute"  # on top
    idle = plots.compute_idle(plan.sim.spans, plan.sim.time_s)
    assert math.isclose(sum(b - a for a, b in idle), plan.sim.stall_s, rel_tol=1e-9)
    n_bars = sum(len(c.get_paths()) for c in ax.collections)
    n_spans = len(plan.sim.spans)
    assert n_bars == n_spans + len(idle)  # every span a bar, every stall a hatched box
    assert "stall" in ax.get_title() and any("longest wait" in t.get_text() for t in ax.texts)


def test_html_summary_plots_measured_history(plan):
    page = plan._repr_html_()
    assert page.count("<table>") >= 3
    assert "GPT2LMHeadModel" in page
    assert page.count('src="data:image/png;base64,') == 2
    assert "predicted vs measured" in page
    assert memsched.format_bytes(plan.measured.peak_device_bytes) in page
    for link in plan.bytes_moved:
        assert f"bytes moved on {link}" in page
    for p in plan.passes:
        assert f"<td>{p.name}</td>" in page
    assert plan.history and all(f"after {snap.name}" in page for snap in plan.history)
    assert "recompute overhead" in page and "solver" in page


def test_html_escapes_text(plan):
    odd = dataclasses.replace(plan, model_name="<script>alert('x')</script>")
    page = plan_html(odd)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_without_matplotlib(plan, monkeypatch):
    monkeypatch.setattr(plots, "_figure_class", None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plan.plot_memory()
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plan.plot_timeline()
    page = plan._repr_html_()
    assert "pip install matplotlib" in page and "data:image" not in page
    assert "predicted vs measured" in page and "<table>" in page


def test_plan_that_never_ran():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).eval()
    p = memsched.plan(model, (torch.randn(2, 32),), budget=10**9)
    assert p.measured is None and not p.bytes_moved
    page = p._repr_html_()
    assert "predicted vs measured" not in page and "not run" in page
    assert "nothing moves" in page
    fig = p.plot_memory()  # a budget far above the peak is named, not drawn
    assert any("above the plotted range" in t.get_text() for t in fig.axes[0].texts)


def boundary(x):
    """An op no view knows about, standing in for ops later passes may add."""
    return x


def _with_recompute_and_unknown_op(plan):
    """A copy of the program where one activation is recomputed (a fresh storage, tagged by a
    "recompute" pass) and an unknown op is inserted, re-simulated."""
    gm = torch.fx.GraphModule(plan.graph, plan.graph.graph.__deepcopy__())
    g = gm.graph
    target = next(n for n in g.nodes if n.op == "call_function" and not ops.is_inserted(n)
                  and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].numel() > 1000)
    val = target.meta["val"]
    with g.inserting_after(target):
        again = g.call_function(target.target, target.args, target.kwargs)
    with val.fake_mode:
        again.meta["val"] = torch.empty_like(val)
    annotate(again, made_by="recompute")
    with g.inserting_after(again):
        mark = g.call_function(boundary, (again,))
    mark.meta["val"] = again.meta["val"]
    annotate(mark, made_by="training")
    with g.inserting_after(mark):
        dead = g.call_function(ops.free, (again, mark))
    annotate(dead, made_by="recompute")
    gm.recompile()
    sim = simulate(gm, plan.hardware)
    return dataclasses.replace(plan, graph=gm, sim=sim), again, val


def test_views_handle_recompute_and_unknown_ops(plan):
    changed, again, val = _with_recompute_and_unknown_op(plan)
    names = [n.name for n in changed.graph.graph.nodes]
    i = names.index(again.name)
    rows = changed.steps()
    recomputed, alias, dead = rows[i], rows[i + 1], rows[i + 2]
    assert recomputed["pass"] == "recompute" and recomputed["kind"] == "activation"
    assert recomputed["live_bytes"] == rows[i - 1]["live_bytes"] + val.untyped_storage().nbytes()
    assert alias["op"] == "boundary" and alias["stream"] == "compute"
    assert alias["live_bytes"] == recomputed["live_bytes"]  # an alias costs nothing
    assert dead["op"] == "free" and dead["live_bytes"] == rows[i - 1]["live_bytes"]
    assert all(r.total == sum(r.by_category.values()) for r in memory_by_kind(changed))
    span = next(s for s in changed.sim.spans if s.name == again.name)
    assert (changed.recompute_overhead_s(), len(changed.recomputed_nodes())) == (span.end - span.start, 1)
    assert "(1 recomputed nodes)" in changed._repr_html_()
    fig = changed.plot_timeline()
    assert "recompute" in fig.axes[0].get_legend_handles_labels()[1]


def test_history_is_copied_when_read_and_an_edited_program_is_refused():
    """``plan.history`` copies each program when first read; a program edited in place since
    its snapshot is refused by name, never shown as it was not."""
    model, args, kwargs = build("mlp")
    p = memsched.plan(model, args, budget=10**13, example_kwargs=kwargs, hardware=FIXED_CPU)
    listings = [str(snap) for snap in p.history[:-1]]    # copied now
    last = p.history[-1]
    assert last.name == "schedule" and last._graph is None   # not copied yet: nobody read it
    graph = p.graph.graph
    node = next(n for n in graph.nodes if n.op == "call_function")
    with graph.inserting_after(node):
        graph.call_function(torch.ops.aten.clone.default, (node,))
    with pytest.raises(RuntimeError, match="after pass 'schedule' was edited in place"):
        last.graph
    assert [str(snap) for snap in p.history[:-1]] == listings
