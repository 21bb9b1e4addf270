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
import importlib.metadata
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..api import plan as make_plan
from ..budget import parse_budget
from ..cost_models.hardware import get_hardware, list_hardware
from ..errors import CaptureError, InfeasibleBudgetError
from ..io.serialize import dumps
from ..ir.units import format_bytes
from ..plans import Plan
from ..verify import PlanError, verify_schedule
from .render import render_hardware, render_plan

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
    parser = argparse.ArgumentParser(
        prog="memsched",
        description="Plan PyTorch models to run inside a memory budget (GPU, host RAM, disk).",
    )
    parser.add_argument("--version", action="version", version=f"memsched {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_plan_parser(sub)
    _add_verify_parser(sub)
    _add_show_parser(sub)
    _add_hardware_parser(sub)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("memsched")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "(not installed)"


def _add_plan_parser(sub) -> None:
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


def _add_verify_parser(sub) -> None:
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


def _add_show_parser(sub) -> None:
    sh = sub.add_parser("show", help="print a saved plan",
                        description="Print a saved plan as `memsched plan` does: summary tables, or the "
                                    "schedule listing and then the tables.")
    sh.add_argument("plan", metavar="PLAN", help="a saved plan (.json)")
    sh.add_argument("--format", "-f", choices=("table", "code"), default="table",
                    help="table: summary tables (default); code: the schedule listing, then the summary")
    sh.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


def _add_hardware_parser(sub) -> None:
    h = sub.add_parser("hardware", help="list the hardware profiles",
                       description="List the hardware presets usable with `memsched plan --hardware`.")
    h.add_argument("--local", action="store_true",
                   help="also show this machine's calibrated profile (measures it on first use)")
    h.add_argument("--format", "-f", choices=("table", "json"), default="table")


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
    try:
        plan, load_s = _make_plan(args)
    except InfeasibleBudgetError as e:
        if args.debug:
            raise
        _error(str(e))
        print(f"memsched: the smallest budget that works is {format_bytes(e.min_budget_bytes)} "
              f"({e.min_budget_bytes} bytes): retry with --budget {_budget_hint(e.min_budget_bytes)}",
              file=sys.stderr)
        return EXIT_INFEASIBLE
    except (ValueError, CaptureError, NotImplementedError) as e:
        if args.debug:
            raise
        kind = "cannot capture the model" if isinstance(e, CaptureError) else None
        _error(f"{kind}: {e}" if kind else str(e))
        return EXIT_USAGE

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
    _print_plan(plan, args.format, load_s=load_s)
    return EXIT_OK


def _make_plan(args):
    """The plan for ``args.target`` (named as the user named it, which the saved plan keeps),
    and the seconds spent building the model."""
    from .targets import load_target

    with _status("memsched: resolving hardware") as update:
        hw = _resolve_hardware(args.hardware, update)
        budget_bytes = parse_budget(args.budget, hw.device_bytes)
        update(f"memsched: building {args.target}")
        t0 = time.perf_counter()
        model, inputs, kwargs, name = load_target(args.target, batch=args.batch, seq_len=args.seq_len)
        load_s = time.perf_counter() - t0
        if args.train:
            kwargs = _training_target(model, kwargs)
        what = "a training step of " if args.train else ""
        what = f"memsched: planning {what}{type(model).__name__} in {format_bytes(budget_bytes)}"
        update(what)
        options = {} if args.time_limit is None else {"time_limit_s": args.time_limit}
        plan = make_plan(model, inputs, budget_bytes, hardware=hw, example_kwargs=kwargs, train=args.train,
                         progress=lambda stage: update(f"{what}: {stage}"), **options)
    plan.model_name = name
    return plan, load_s


def _print_plan(plan, fmt: str, *, load_s: float | None = None) -> None:
    """The summary tables; with ``fmt`` "code" the schedule listing first."""
    if fmt == "code":
        print(str(plan))
        print()
        sys.stdout.flush()
    render_plan(_stdout_console(), plan, load_s=load_s)


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


# ----------------------------------------------------------------------------- saved plans


def _load(args):
    """The saved plan args.plan names, or None after printing why not."""
    try:
        return Plan.load(args.plan)
    except ValueError as e:  # PlanFileError: not a plan, newer format, damaged, unreadable
        if args.debug:
            raise
        _error(str(e))
        return None


def _cmd_verify(args) -> int:
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
    note = "" if peak == plan.peak_device_bytes else f"; the plan predicted {format_bytes(plan.peak_device_bytes)}"
    print(f"OK {args.plan}: {steps} steps verified, peak device {format_bytes(peak)} ({peak} bytes) within "
          f"the budget of {format_bytes(budget)}{note}")
    return EXIT_OK


def _cmd_show(args) -> int:
    plan = _load(args)
    if plan is None:
        return EXIT_USAGE
    _print_plan(plan, args.format)
    return EXIT_OK


# ----------------------------------------------------------------------------- hardware


def _cmd_hardware(args) -> int:
    profiles = list_hardware()
    if args.local:
        with _status("memsched: calibrating this machine (cached after the first run)"):
            profiles.append(get_hardware(None, "cuda" if torch.cuda.is_available() else "cpu"))
    if args.format == "json":
        print(json.dumps([hw.to_dict() for hw in profiles], indent=2, default=_json_default))
        return EXIT_OK
    render_hardware(_stdout_console(), profiles)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
