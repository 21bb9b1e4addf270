"""The ``memsched`` command line: plan a model inside a budget, check and show saved plans,
list hardware profiles.

    memsched plan hf:gpt2 --budget 200MB --hardware t4
    memsched plan path/to/model.py:build --budget 8GB --format code
    memsched plan ./llama-config/ --budget 8GiB --hardware a100-40gb -o plan.json
    memsched verify plan.json
    memsched show plan.json --format code
    memsched hardware

Exit codes: 0 ok; 1 a saved plan fails verification (the message names the step);
2 bad usage, bad budget or target, a model that does not capture, a file that is not a
memsched plan; 3 a budget below the minimum the model needs (the message names that minimum).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_INFEASIBLE = 0, 1, 2, 3
FORMATS = ("table", "json", "code")

_EPILOG = """\
targets:
  path/to/file.py:factory    import the file, call factory()
  package.module:factory     import the module, call factory()
      factory() returns (model, args), (model, args, kwargs) or (model, kwargs_dict);
      if it takes parameters named batch / seq_len, --batch / --seq-len are passed in
  hf:<model_type>            a Hugging Face architecture with its default config
                             (hf:gpt2, hf:llama, hf:bert, hf:t5, ...), built on the meta device
  path/to/config.json        a Hugging Face config (or a directory containing config.json)
  Nothing is downloaded and no weights are allocated for hf: and config targets.

budgets: bytes (1000000), 8GB (10^9), 8GiB (2^30), 512MB, 512MiB, or 50% of the device.

saving: --format json prints the plan as the JSON that `memsched verify` and `memsched show`
read (and memsched.compile(model, plan="plan.json") runs without solving); -o PATH saves the
same JSON to PATH (with --format json nothing is printed then; table and code still print).

exit codes: 0 ok, 2 usage / budget / target / capture error, 3 budget below the minimum.
"""


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="memsched",
        description="Plan PyTorch models to run inside a memory budget (GPU, host RAM, disk).",
    )
    parser.add_argument("--version", action="version", version=f"memsched {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "plan", help="plan a model inside a budget and print the schedule",
        description="Plan TARGET to run inside --budget device bytes and print the plan.\n"
                    "Planning only: nothing runs and no device is needed.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("target", metavar="TARGET",
                   help="file.py:factory, package.module:factory, hf:<model_type>, or a config.json path")
    p.add_argument("--budget", "-b", required=True, metavar="BUDGET",
                   help="device memory budget, e.g. 8GB, 8GiB, 512MB, 50%%")
    p.add_argument("--hardware", metavar="NAME", default=None,
                   help="hardware profile: a preset (see `memsched hardware`) or 'local' "
                        "(default: this machine, calibrated once and cached)")
    p.add_argument("--train", action="store_true",
                   help="plan a training step: forward and backward, saved activations kept, "
                        "offloaded or recomputed")
    p.add_argument("--format", "-f", choices=FORMATS, default="table",
                   help="table: summary tables (default); code: the schedule listing, then the "
                        "summary; json: the saved-plan JSON (what -o writes)")
    p.add_argument("--output", "-o", metavar="PATH", default=None,
                   help="save the plan as JSON to PATH (with --format json, instead of printing it)")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="N",
                   help="batch size of the synthesized inputs (hf:/config targets; default 1)")
    p.add_argument("--seq-len", type=_positive_int, default=128, metavar="N",
                   help="sequence length of the synthesized inputs (hf:/config targets; default 128)")
    p.add_argument("--time-limit", type=_positive_float, default=None, metavar="S",
                   help="solver time limit in seconds (default: the planner's, 10 s)")
    p.add_argument("--debug", action="store_true", help="show full tracebacks for errors")

    v = sub.add_parser(
        "verify", help="check a saved plan with the independent verifier",
        description="Load a saved plan (memsched plan -o / Plan.save) and check it with the "
                    "independent verifier: every read after its load and before its free, nothing "
                    "freed twice, every tensor accounted for at the end, device bytes within the "
                    "budget at every step.",
        epilog="exit codes: 0 the plan verifies, 1 it does not (the message names the step), "
               "2 the file is not a readable memsched plan or the budget is not valid.")
    v.add_argument("plan", metavar="PLAN", help="a saved plan (.json)")
    v.add_argument("--budget", "-b", metavar="BUDGET", default=None,
                   help="check against this budget instead of the plan's own (e.g. 512MB, 50%%)")
    v.add_argument("--debug", action="store_true", help="show full tracebacks for errors")

    sh = sub.add_parser("show", help="print a saved plan",
                        description="Print a saved plan as `memsched plan` does: summary tables, or the "
                                    "schedule listing and then the tables.")
    sh.add_argument("plan", metavar="PLAN", help="a saved plan (.json)")
    sh.add_argument("--format", "-f", choices=("table", "code"), default="table",
                    help="table: summary tables (default); code: the schedule listing, then the summary")
    sh.add_argument("--debug", action="store_true", help="show full tracebacks for errors")

    h = sub.add_parser("hardware", help="list the hardware profiles",
                       description="List the hardware presets usable with `memsched plan --hardware`.")
    h.add_argument("--local", action="store_true",
                   help="also show this machine's calibrated profile (measures it on first use)")
    h.add_argument("--format", "-f", choices=("table", "json"), default="table")
    return parser


def _positive(kind, what: str):
    """An argparse type: a finite ``kind`` (int or float) greater than zero."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


_positive_int = _positive(int, "a positive integer")
_positive_float = _positive(float, "a positive number of seconds")


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: return argparse's code
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        if args.command == "hardware":
            return _cmd_hardware(args)
        if args.command == "verify":
            return _cmd_verify(args)
        if args.command == "show":
            return _cmd_show(args)
        return _cmd_plan(args)
    except KeyboardInterrupt:
        print("memsched: interrupted", file=sys.stderr)
        return 130


def _error(message: str) -> None:
    print(f"memsched: error: {message}", file=sys.stderr)


def _stdout_console():
    from rich.console import Console

    # Piped output gets a fixed width (rich would use 80) so tables do not wrap.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
    return Console(file=sys.stdout, width=width, highlight=False, soft_wrap=False)


@contextlib.contextmanager
def _status(message: str):
    """A spinner on stderr while something slow runs, with the current stage and the time
    elapsed; nothing at all when stderr is not a terminal. Yields ``update(msg)``."""
    if not sys.stderr.isatty():
        yield lambda _msg: None
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(escape(message), total=None)
        yield lambda msg: progress.update(task, description=escape(msg))


# ----------------------------------------------------------------------------- plan


def _cmd_plan(args) -> int:
    import memsched
    from .errors import CaptureError, InfeasibleBudgetError
    from .targets import load_target

    try:
        with _status("memsched: resolving hardware") as update:
            hw = _resolve_hardware(args.hardware, update)
            budget_bytes = memsched.parse_budget(args.budget, hw.device_bytes)
            update(f"memsched: building {args.target}")
            t0 = time.perf_counter()
            model, inputs, kwargs, name = load_target(args.target, batch=args.batch, seq_len=args.seq_len)
            load_s = time.perf_counter() - t0
            if args.train:
                kwargs = _training_target(model, kwargs)
            what = "a training step of " if args.train else ""
            what = f"memsched: planning {what}{type(model).__name__} in {memsched.format_bytes(budget_bytes)}"
            update(what)
            options = {} if args.time_limit is None else {"time_limit_s": args.time_limit}
            plan = memsched.plan(model, inputs, budget_bytes, hardware=hw, example_kwargs=kwargs, train=args.train,
                                 progress=lambda stage: update(f"{what}: {stage}"), **options)
    except InfeasibleBudgetError as e:
        if args.debug:
            raise
        _error(str(e))
        print(f"memsched: the smallest budget that works is {memsched.format_bytes(e.min_budget_bytes)} "
              f"({e.min_budget_bytes} bytes): retry with --budget {_budget_hint(e.min_budget_bytes)}",
              file=sys.stderr)
        return EXIT_INFEASIBLE
    except (ValueError, CaptureError, NotImplementedError) as e:
        if args.debug:
            raise
        kind = "cannot capture the model" if isinstance(e, CaptureError) else None
        _error(f"{kind}: {e}" if kind else str(e))
        return EXIT_USAGE

    from .inspect.serialize import dumps

    plan.model_name = name  # the target as the user named it, kept in the saved plan
    if args.output is not None:
        try:
            Path(args.output).write_text(dumps(plan))
        except OSError as e:
            _error(f"cannot write {args.output}: {e.strerror or e}")
            return EXIT_USAGE
    if args.format == "json":
        if args.output is None:
            sys.stdout.write(dumps(plan))
        return EXIT_OK
    console = _stdout_console()
    if args.format == "code":
        print(str(plan))
        print()
        sys.stdout.flush()
    render_plan(console, plan, name=name, load_s=load_s)
    return EXIT_OK


def _training_target(model, kwargs: dict) -> dict:
    """Training mode with every parameter trained; language models get labels, so the step
    starts from their loss."""
    import inspect

    model.train()
    model.requires_grad_(True)
    if "input_ids" in kwargs and "labels" not in kwargs and \
            "labels" in inspect.signature(model.forward).parameters:
        kwargs = dict(kwargs, labels=kwargs["input_ids"])
    return kwargs


def _resolve_hardware(spec, update):
    import torch

    from .cost_models.hardware import get_hardware

    if spec is None or str(spec).strip().lower() == "local":
        # The locally calibrated profile: of the GPU when there is one, else of the CPU.
        update("memsched: calibrating this machine (cached after the first run)")
        return get_hardware(None, "cuda" if torch.cuda.is_available() else "cpu")
    return get_hardware(spec)


def _budget_hint(min_bytes: int) -> str:
    """A budget string at or above ``min_bytes`` that is pleasant to type (e.g. "4.21MB")."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if min_bytes >= scale:
            value = math.ceil(min_bytes * 100 / scale) / 100
            while int(value * scale) < min_bytes:  # float rounding: never suggest too little
                value += 0.01
            return f"{value:.2f}".rstrip("0").rstrip(".") + unit
    return str(int(min_bytes))


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _json_default(obj):
    """numpy scalars and the like: their Python value; anything else: its str."""
    if hasattr(obj, "item"):
        with contextlib.suppress(TypeError, ValueError):
            return _finite(obj.item())
    return str(obj)


def render_plan(console, plan, *, name: str = "", load_s: float | None = None) -> None:
    """The plan's summary as rich tables: memory per tier, transfers, time, planning passes."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from .budget import format_bytes as fb
    from .cost_models.hardware import LINKS

    hw, pl = plan.hardware, plan.placement_facts()
    tiers, acts = pl.tier_bytes, pl.offloaded_activation_bytes
    console.print(f"[bold]memsched plan[/bold] for {escape(name or plan.model_name)}")
    console.print(f"budget {fb(plan.budget_bytes)} on {hw.name} ({hw.device_type}, "
                  f"{fb(hw.device_bytes)} device memory)", markup=False)

    mem = Table(title="Memory per tier", box=box.SIMPLE_HEAD, title_justify="left")
    mem.add_column("tier")
    mem.add_column("capacity", justify="right")
    mem.add_column("peak held", justify="right")
    mem.add_column("weights homed", justify="right")
    mem.add_column("activations offloaded", justify="right")
    fits = "[green]" if plan.peak_device_bytes <= plan.budget_bytes else "[red]"
    mem.add_row("device", f"{fb(plan.budget_bytes)} budget", f"{fits}{fb(plan.peak_device_bytes)}[/]",
                fb(tiers["device"]), "-")
    host_cap = fb(hw.host_bytes) if hw.host_bytes else "(is device)"
    mem.add_row("host", host_cap, "≤ " + fb(tiers["host"] + acts["host"]), fb(tiers["host"]), fb(acts["host"]))
    mem.add_row("disk", "-", "≤ " + fb(tiers["disk"] + acts["disk"]), fb(tiers["disk"]), fb(acts["disk"]))
    mem.caption = (f"unconstrained peak {fb(plan.unconstrained.peak_device_bytes)} · minimum budget "
                   f"{fb(plan.min_budget_bytes)}")
    mem.caption_justify = "left"
    console.print(mem)

    moved = plan.bytes_moved
    links = Table(title="Bytes moved per call", box=box.SIMPLE_HEAD, title_justify="left")
    links.add_column("link")
    links.add_column("bytes", justify="right")
    links.add_column("bandwidth", justify="right")
    links.add_column("link busy", justify="right")
    for link in [*LINKS, *sorted(set(moved) - set(LINKS))]:
        n = int(moved.get(link, 0))
        if not n and link not in LINKS:
            continue
        bw = hw.bandwidth(link) if link in LINKS else 0.0
        busy = f"{n / bw * 1e3:.2f} ms" if bw and n else "-"
        links.add_row(link, fb(n) if n else "-", f"{bw / 1e9:.1f} GB/s" if bw else "-", busy)
    console.print(links)

    if plan.is_training:
        render_saved_activations(console, plan)

    t_pred, t_free = plan.predicted_time_s, plan.unconstrained.time_s
    slow = t_pred / t_free if t_free else 1.0
    per = "training step" if plan.is_training else "call"
    timing = Table(title=f"Predicted time per {per}", box=box.SIMPLE_HEAD, title_justify="left")
    timing.add_column("")
    timing.add_column("")
    timing.show_header = False
    timing.add_row("predicted", f"{t_pred * 1e3:.3f} ms")
    timing.add_row("unconstrained", f"{t_free * 1e3:.3f} ms")
    timing.add_row("slowdown", f"{slow:.2f}x")
    timing.add_row("compute", f"{plan.sim.compute_s * 1e3:.3f} ms")
    timing.add_row("stall on transfers", f"{plan.sim.stall_s * 1e3:.3f} ms")
    if plan.is_training:
        timing.add_row("recompute overhead", f"{plan.recompute_overhead_s() * 1e3:.3f} ms")
    solver = pl.status + (f", gap {pl.mip_gap:.1%}" if pl.mip_gap is not None else "")
    timing.add_row("solver", f"{escape(solver)} in {pl.solve_s:.2f} s ({plan.n_segments} segments, "
                             f"{pl.movable_gaps} movable gaps)")
    console.print(timing)

    passes = Table(title="Planning time per pass", box=box.SIMPLE_HEAD, title_justify="left")
    passes.add_column("pass")
    passes.add_column("time", justify="right")
    passes.add_column("note")
    if load_s is not None:
        passes.add_row("load target", f"{load_s * 1e3:.0f} ms", "")
    for p in plan.passes:
        passes.add_row(escape(p.name), f"{p.seconds * 1e3:.0f} ms", escape(p.note or ""))
    total = sum(p.seconds for p in plan.passes) + (load_s or 0.0)
    passes.add_row("[bold]total[/bold]", f"[bold]{total * 1e3:.0f} ms[/bold]", "")
    console.print(passes)


def render_saved_activations(console, plan, limit: int = 40) -> None:
    """What the training plan does with each activation the forward saves for the backward."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    from .budget import format_bytes as fb

    rows = plan.saved_activations()
    totals: dict[str, int] = {}
    for r in rows:
        totals[r["decision"]] = totals.get(r["decision"], 0) + r["bytes"]
    table = Table(title=f"Saved activations ({len(rows)})", box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("value")
    table.add_column("bytes", justify="right")
    table.add_column("forward step", justify="right")
    table.add_column("backward use", justify="right")
    table.add_column("decision")
    colour = {"keep": "", "host": "[cyan]", "disk": "[magenta]", "recompute": "[yellow]"}
    for r in sorted(rows, key=lambda r: -r["bytes"])[:limit]:
        c = colour.get(r["decision"], "")
        table.add_row(escape(r["value"]), fb(r["bytes"]), str(r["defined"]), str(r["last_use"]),
                      f"{c}{r['decision']}[/]" if c else r["decision"])
    table.caption = "totals: " + " · ".join(f"{k} {fb(v)}" for k, v in sorted(totals.items())) + (
        f" (largest {limit} shown)" if len(rows) > limit else "")
    table.caption_justify = "left"
    console.print(table)


# ----------------------------------------------------------------------------- saved plans


def _load(args):
    """The saved plan args.plan names, or None after printing why not."""
    from .inspect.serialize import load_plan

    try:
        return load_plan(args.plan)
    except ValueError as e:  # PlanFileError: not a plan, newer format, damaged, unreadable
        if args.debug:
            raise
        _error(str(e))
        return None


def _cmd_verify(args) -> int:
    from .budget import format_bytes as fb
    from .budget import parse_budget
    from .verify import PlanError, verify_schedule

    plan = _load(args)
    if plan is None:
        return EXIT_USAGE
    budget = plan.budget_bytes
    if args.budget is not None:
        try:
            budget = parse_budget(args.budget, plan.hardware.device_bytes)
        except ValueError as e:
            _error(str(e))
            return EXIT_USAGE
    try:
        peak = verify_schedule(plan.graph, budget)
    except PlanError as e:
        if args.debug:
            raise
        _error(f"{args.plan} does not verify: {e}")
        return EXIT_INVALID
    steps = len(plan.graph.graph.nodes)
    note = "" if peak == plan.peak_device_bytes else f"; the plan predicted {fb(plan.peak_device_bytes)}"
    print(f"OK {args.plan}: {steps} steps verified, peak device {fb(peak)} ({peak} bytes) within the "
          f"budget of {fb(budget)}{note}")
    return EXIT_OK


def _cmd_show(args) -> int:
    plan = _load(args)
    if plan is None:
        return EXIT_USAGE
    if args.format == "code":
        print(str(plan))
        print()
        sys.stdout.flush()
    render_plan(_stdout_console(), plan)
    return EXIT_OK


# ----------------------------------------------------------------------------- hardware


def _cmd_hardware(args) -> int:
    import torch

    from .cost_models.hardware import get_hardware, list_hardware

    profiles = list_hardware()
    if args.local:
        with _status("memsched: calibrating this machine (cached after the first run)"):
            profiles.append(get_hardware(None, "cuda" if torch.cuda.is_available() else "cpu"))
    if args.format == "json":
        print(json.dumps([hw.to_dict() for hw in profiles], indent=2, default=_json_default))
        return EXIT_OK
    render_hardware(_stdout_console(), profiles)
    return EXIT_OK


def render_hardware(console, profiles) -> None:
    from rich import box
    from rich.table import Table

    from .budget import format_bytes as fb

    from rich.markup import escape

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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
