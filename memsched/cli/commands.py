"""The ``memsched`` command line: plan a model inside a budget, check and show saved plans,
generate tokens inside a budget (random weights), list hardware profiles, print the plan
files' JSON Schema.

    memsched plan hf:gpt2 --budget 200MB --hardware t4
    memsched plan path/to/model.py:build --budget 8GB --format code
    memsched plan ./llama-config/ --budget 8GiB --hardware a100-40gb -o plan.json
    memsched verify plan.json
    memsched show plan.json --format code
    memsched generate hf:gpt2 --budget 200MB --prompt-len 32 --new-tokens 16 --hardware t4
    memsched hardware
    memsched schema > plan.schema.json

Exit codes (``EXIT_CODES``; also in every command's help): 0 ok; 1 a plan fails verification
(the message names the step); 2 the user's error: bad usage, budget, hardware name or target (a
file or module that does not import, a factory that raises), a model that does not capture, a
file that is not a readable memsched plan, a plan that does not fit the model, a file that cannot
be read or written; 3 a budget below the minimum (the message names it); 4 an internal error
(a bug in memsched); 130 interrupted. Errors are one line on stderr, no traceback: ``--debug``
lets the exception propagate with its traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import importlib
import importlib.metadata
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from ..api import plan as make_plan
from ..budget import parse_budget
from ..cost_models.hardware import get_hardware, list_hardware
from ..errors import CaptureError, InfeasibleBudgetError, PlanFileError, TargetError
from ..io import plan_schema
from ..io.reapply import PlanMismatchError
from ..io.serialize import dumps
from ..ir.units import format_bytes
from ..plans import Plan
from ..verify import PlanError, verify_schedule
from .render import generation_sections, render_hardware, render_plan, section_table

EXIT_OK, EXIT_INVALID, EXIT_USAGE, EXIT_INFEASIBLE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
FORMATS = ("table", "json", "code")

EXIT_CODES = """\
exit codes:
  0    ok
  1    a plan fails verification (the message names the step)
  2    the user's error: bad usage, budget, hardware name or target (a file or module that
       does not import, a factory that raises), a model that does not capture, a file that
       is not a readable memsched plan (damaged, from a newer memsched, too large or too
       deep), a file that cannot be read or written
  3    a budget below the minimum the model needs (the message names it)
  4    an internal error: a bug in memsched (the message says so)
  130  interrupted
  Errors are one line on stderr, without a traceback; --debug lets the exception propagate
  with its traceback instead. Output cut short by its reader (| head) is not an error: 0.
"""

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
read (and memsched.compile(model, plan="plan.json") runs without solving, a --train plan with
train=True); -o PATH saves the
same JSON to PATH (with --format json nothing is printed then; table and code still print).

""" + EXIT_CODES


# ----------------------------------------------------------------------------- parser


_KERNELS = {"auto": "auto", "on": True, "off": False}   # --kernels -> compile(kernels=...)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memsched",
        description="Plan PyTorch models to run inside a memory budget (GPU, host RAM, disk).",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"memsched {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_plan_parser(sub)
    _add_verify_parser(sub)
    _add_show_parser(sub)
    _add_generate_parser(sub)
    _add_hardware_parser(sub)
    sub.add_parser("schema", help="print the JSON Schema of saved plans",
                   description="Print the JSON Schema (draft 2020-12) every saved plan is checked against "
                               "when it is read, for tools that read plan files without memsched.",
                   epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--fuse", action="store_true",
                   help="fuse the compute between scheduling points into regions (compile(..., fuse=True)); "
                        "the listing shows each region and its ops")
    p.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                   help="run RMSNorm and rotary-embedding patterns as memsched's kernel ops "
                        "(compile(..., kernels=...)); auto: where they run Triton (CUDA)")
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
        epilog="A plan file is data: it is checked field by field and nothing in it is executed.\n\n"
               + EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("plan", metavar="PLAN", help="a saved plan (.json)")
    v.add_argument("--import", dest="imports", metavar="MODULE", action="append", default=[],
                    help="import MODULE first: it registers custom operators the plan calls "
                         "(e.g. transformers.integrations.moe for transformers' mixture-of-experts layers)")
    v.add_argument("--budget", "-b", metavar="BUDGET", default=None,
                   help="check against this budget instead of the plan's own (e.g. 512MB, 50%%)")
    v.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


def _add_show_parser(sub) -> None:
    sh = sub.add_parser("show", help="print a saved plan",
                        description="Print a saved plan as `memsched plan` does: summary tables, or the "
                                    "schedule listing and then the tables.",
                        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sh.add_argument("plan", metavar="PLAN", help="a saved plan (.json)")
    sh.add_argument("--import", dest="imports", metavar="MODULE", action="append", default=[],
                    help="import MODULE first: it registers custom operators the plan calls "
                         "(e.g. transformers.integrations.moe for transformers' mixture-of-experts layers)")
    sh.add_argument("--format", "-f", choices=("table", "code"), default="table",
                    help="table: summary tables (default); code: the schedule listing, then the summary")
    sh.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


_GENERATE_EPILOG = """\
targets: as for `memsched plan` (hf:<model_type>, path/to/config.json, file.py:factory), a
  transformers causal language model (decoder-only, full attention: gpt2, llama, opt, ...).
  hf: and config.json targets are built without weights: they get RANDOM weights, initialised
  as the architecture initialises them and seeded by --seed (nothing is downloaded), unless
  --weights names a safetensors checkpoint to read them from (e.g. the directory holding the
  config.json); a factory's model keeps the weights it comes with. The prompt is --batch x --prompt-len random
  token ids (seeded by --seed), and greedy decoding never stops early: the text is meaningless,
  the timing is real.

output: where the weights and the KV cache live (device, host RAM, disk) in the prefill and
the decode programs, then tokens/s and the run's statistics. On a terminal a spinner on stderr
shows the stage; piped, stderr stays empty.

""" + EXIT_CODES


def _add_generate_parser(sub) -> None:
    g = sub.add_parser(
        "generate", help="generate tokens (greedy) inside a budget, with random weights and prompt",
        description="Plan TARGET's prefill and decode programs inside --budget device bytes, with its "
                    "KV cache placed by the planner like the weights, print where everything lives, "
                    "then run greedy generation and print tokens/s.",
        epilog=_GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g.add_argument("target", metavar="TARGET",
                   help="hf:<model_type> or a config.json path (given random weights), or "
                        "file.py:factory returning a causal LM")
    g.add_argument("--budget", "-b", required=True, metavar="BUDGET",
                   help="device memory budget, e.g. 8GB, 8GiB, 512MB, 50%%")
    g.add_argument("--prompt-len", type=_positive_int, required=True, metavar="N",
                   help="tokens in each (random) prompt")
    g.add_argument("--new-tokens", type=_positive_int, required=True, metavar="N",
                   help="tokens to generate per sequence")
    g.add_argument("--batch", type=_positive_int, default=1, metavar="N", help="sequences (default 1)")
    g.add_argument("--block", type=_block, default=None, metavar="N|auto",
                   help="sequences that decode together: a divisor of --batch, or 'auto' to plan "
                        "candidate blocks and keep the best for --goal (default: the whole batch)")
    g.add_argument("--goal", choices=("throughput", "latency"), default="throughput",
                   help="what --block auto optimises (default throughput)")
    g.add_argument("--hardware", metavar="NAME", default=None,
                   help="hardware profile to plan for: a preset (see `memsched hardware`) or 'local' "
                        "(default: the --device of this machine, calibrated once and cached)")
    g.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where the device tier is (default: cuda when there is one, else cpu)")
    g.add_argument("--offload-dir", metavar="DIR", default=None,
                   help="directory for the disk tier (default: a temporary one)")
    g.add_argument("--weights", metavar="PATH", default=None,
                   help="a safetensors checkpoint (file, directory of shards or index json) to read the "
                        "weights from, streamed from its own files (default: random weights)")
    g.add_argument("--compress", choices=("int8", "int4"), default=None,
                   help="keep the weights homed on disk as group-wise integers (not bit-exact)")
    g.add_argument("--compress-kv", choices=("int8", "int4"), default=None,
                   help="keep the KV cache homed on disk as group-wise integers (not bit-exact)")
    g.add_argument("--kernels", choices=("auto", "on", "off"), default="auto",
                   help="run RMSNorm and rotary-embedding patterns as memsched's kernel ops; "
                        "auto: where they run Triton (CUDA)")
    g.add_argument("--hard-limit", action="store_true",
                   help="on CUDA, each step runs with the caching allocator limited to the budget (plus what "
                        "others hold and a segment margin): memory the plan does not count fails at once")
    g.add_argument("--seed", type=_seed, default=0, metavar="S",
                   help="seed of the random weights and prompt (default 0)")
    g.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


def _add_hardware_parser(sub) -> None:
    h = sub.add_parser("hardware", help="list the hardware profiles",
                       description="List the hardware presets usable with `memsched plan --hardware`.",
                       epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    h.add_argument("--local", action="store_true",
                   help="also show this machine's calibrated profile (measures it on first use)")
    h.add_argument("--format", "-f", choices=("table", "json"), default="table")
    h.add_argument("--debug", action="store_true", help="show full tracebacks for errors")


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


def _block(text: str):
    """An argparse type: 'auto' or a positive integer."""
    return "auto" if text == "auto" else _positive_int(text)


def _seed(text: str) -> int:
    """An argparse type: an integer seed torch accepts (0 to 2**63 - 1)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**63 - 1, got {text!r}")
    return value


# ----------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code (``EXIT_CODES``). Errors print one line on stderr;
    with ``--debug`` they propagate with their traceback."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: return argparse's code
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USAGE)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    command = {"hardware": _cmd_hardware, "verify": _cmd_verify, "show": _cmd_show, "plan": _cmd_plan,
               "generate": _cmd_generate, "schema": _cmd_schema}
    try:
        with _one_line_warnings(getattr(args, "debug", False)):
            return command[args.command](args)
    except KeyboardInterrupt:
        print("memsched: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `memsched show plan.json | head`: the reader left, nothing is wrong
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        code, message = _describe_error(e)
        _error(message)
        return code


@contextlib.contextmanager
def _one_line_warnings(debug: bool):
    """A warning prints as errors do, ``memsched: warning: ...``: Python's format adds the file,
    line and source of the call that raised it, memsched's internals, of no use on a command
    line (``--debug`` keeps them)."""
    if debug:
        yield
        return
    before = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip()
        # memsched's own (by category, or by a message that names memsched, as the API's do):
        # named once, without a category
        own = category.__module__.startswith("memsched") or text.startswith("memsched: ")
        origin = "" if own else f"{category.__name__}: "
        print(f"memsched: warning: {origin}{text.removeprefix('memsched: ')}", file=file or sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = before


def _describe_error(e: Exception) -> tuple[int, str]:
    """The exit code of an error that reached ``main`` and the line that says what happened."""
    if isinstance(e, InfeasibleBudgetError):
        return EXIT_INFEASIBLE, str(e)
    if isinstance(e, PlanError):
        return EXIT_INVALID, f"the plan does not verify: {e}"
    if isinstance(e, CaptureError):
        return EXIT_USAGE, f"cannot capture the model: {e}"
    if isinstance(e, (PlanFileError, PlanMismatchError, TargetError, ValueError, NotImplementedError)):
        return EXIT_USAGE, str(e)
    if isinstance(e, OSError):
        where = f" {e.filename}" if e.filename else ""
        return EXIT_USAGE, f"cannot use{where}: {e.strerror or e}"
    return EXIT_INTERNAL, (f"internal error (a bug in memsched, please report it): {type(e).__name__}: {e}; "
                           f"run the command again with --debug for the traceback")


def _error(message: str) -> None:
    print(f"memsched: error: {message}", file=sys.stderr)


def _stdout_console():
    from rich.console import Console

    # Piped output gets a fixed width (rich would use 80) so tables do not wrap.
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
    console = Console(file=sys.stdout, width=width, highlight=False, soft_wrap=False)
    console.on_broken_pipe = _broken_pipe  # not rich's SystemExit(1): main() says what it means
    return console


def _broken_pipe():
    raise BrokenPipeError("stdout was closed")


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
    if args.output is not None or args.format == "json":
        try:
            text = dumps(plan)
        except PlanFileError as e:  # the program calls something a plan file cannot name
            if args.debug:
                raise
            _error(f"cannot save the plan: {e}")
            return EXIT_USAGE
    if args.output is not None:
        try:
            Path(args.output).write_text(text)
        except (OSError, ValueError) as e:
            if args.debug:
                raise
            _error(f"cannot write {args.output}: {getattr(e, 'strerror', None) or e}")
            return EXIT_USAGE
    if args.format == "json":
        if args.output is None:
            sys.stdout.write(text)
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
        if args.fuse:
            options["fuse"] = True
        options["kernels"] = _KERNELS[args.kernels]
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


def _resolve_hardware(spec, update, device: str | None = None):
    if spec is None or str(spec).strip().lower() == "local":
        # The locally calibrated profile: of ``device``; by default of the GPU when there is one,
        # else of the CPU.
        update("memsched: calibrating this machine (cached after the first run)")
        return get_hardware(None, device or ("cuda" if torch.cuda.is_available() else "cpu"))
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


# ----------------------------------------------------------------------------- generate


def _cmd_generate(args) -> int:
    from ..generation import plan_generator, run_blocks
    from .targets import quiet_transformers

    with _status("memsched: resolving hardware") as update:
        device = _generation_device(args.device)
        hw = _resolve_hardware(args.hardware, update, device)
        budget_bytes = parse_budget(args.budget, hw.device_bytes)
        update(f"memsched: building {args.target} with random weights")
        model, name = _generation_model(args)
        prompt = _random_prompt(model, args.batch, args.prompt_len, args.seed)
        what = f"memsched: planning {type(model).__name__} in {format_bytes(budget_bytes)}"
        update(what)
        try:
            with quiet_transformers():
                gen, tried, _ = plan_generator(model, budget_bytes, prompt, args.new_tokens, block_size=args.block,
                                               goal=args.goal, device=device, offload_dir=args.offload_dir,
                                               hardware=hw, progress=_programs(update, what),
                                               weights=args.weights, compress_weights=args.compress,
                                               compress_kv_cache=args.compress_kv, hard_limit=args.hard_limit,
                                               kernels=_KERNELS[args.kernels])
        except InfeasibleBudgetError as e:
            if args.debug:
                raise
            _error(f"{e}; retry with --budget {_budget_hint(e.min_budget_bytes)}")
            return EXIT_INFEASIBLE
    try:
        console = _stdout_console()
        for section in generation_sections(gen, name):
            console.print(section_table(section))
        sys.stdout.flush()
        for choice in tried:
            print(f"  {choice.describe(args.new_tokens)}" + ("  <- chosen" if choice.rows == gen.batch else ""))
        with _status(f"memsched: generating {args.batch} x {args.new_tokens} tokens"), quiet_transformers():
            _, stats = run_blocks(gen, prompt, args.new_tokens, None, None, None)
    finally:
        gen.close()
    print(f"generated {stats.batch} x {stats.new_tokens} tokens: {stats.tokens_per_s:.1f} tokens/s")
    print(stats)
    return EXIT_OK


def _programs(update, what: str):
    """The planner's progress callback for a generator: each pass, named with its program (the
    prefill is planned first, then the decode step; each starts with its capture; with --block
    auto a pair per candidate block)."""
    programs, current = itertools.cycle(("prefill", "decode")), ["prefill"]

    def progress(stage: str) -> None:
        if stage == "capture":
            current[0] = next(programs, current[0])
        update(f"{what}: {current[0]} {stage}")

    return progress


def _generation_device(choice: str | None) -> str:
    if choice is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    return choice


def _generation_model(args):
    """The model ``args.target`` names, a causal LM with real weights (random ones when the
    target is built without weights), in eval mode; and its display name."""
    from .targets import load_target

    try:
        model, _, _, name = load_target(args.target, batch=args.batch, seq_len=args.prompt_len)
    except ValueError as e:  # the targets' own length check names `memsched plan`'s flag
        if type(e) is not ValueError or "--seq-len" not in str(e):
            raise
        raise ValueError(str(e).replace("--seq-len", "--prompt-len")) from None
    if getattr(model, "config", None) is None or not callable(getattr(model, "generate", None)):
        raise ValueError(f"target {args.target!r}: {type(model).__name__} is not a transformers causal "
                         f"language model, which memsched generate needs (e.g. hf:gpt2, hf:llama)")
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    limit = next((getattr(text, k) for k in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(text, k, None), int)), None)
    total = args.prompt_len + args.new_tokens
    if limit is not None and total > limit:
        raise ValueError(f"{args.target}: --prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} = "
                         f"{total} positions exceeds the model's maximum of {limit}")
    if args.weights is None:
        _materialize(model, args.seed, args.target)
    else:
        _real_buffers(model)
    return model.eval(), name


def _materialize(model, seed: int, spec: str) -> None:
    """Give a model built on the meta device random weights on the CPU, initialised as its
    architecture initialises them (seeded); a model with real weights keeps them."""
    tensors = list({id(t): t for t in (*model.parameters(), *model.buffers())}.values())
    if not any(t.is_meta for t in tensors):
        return
    need, free = sum(t.numel() * t.element_size() for t in tensors), _available_host_bytes()
    if free and 2 * need > free:  # the weights, and the copies the host and disk tiers take
        raise ValueError(f"target {spec!r}: its random weights take {format_bytes(need)} of host RAM (up to "
                         f"twice that while generating) and {format_bytes(free)} is available: use a "
                         f"smaller config.json")
    model.to_empty(device="cpu")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        if callable(getattr(model, "init_weights", None)):  # transformers: its own init, ties included
            model.init_weights()
            return
        for t in tensors:  # what no reset_parameters below covers: small normal weights, zero buffers
            if t.is_floating_point() and isinstance(t, torch.nn.Parameter):
                torch.nn.init.normal_(t, std=0.02)
            else:
                t.zero_()
        for m in model.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()


def _real_buffers(model) -> None:
    """A model built on meta that will read its parameters from a checkpoint: its buffers are
    computed, not loaded (rotary frequencies, masks), so they are made real and initialised as
    the architecture does; the parameters stay on meta (initialising them there is a no-op)."""
    for module in model.modules():
        for name, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="cpu")
    if callable(getattr(model, "init_weights", None)):
        with torch.no_grad():
            model.init_weights()


def _available_host_bytes() -> int:
    """Host RAM available now (0: unknown)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 0


def _random_prompt(model, batch: int, prompt_len: int, seed: int) -> torch.Tensor:
    """(batch, prompt_len) token ids drawn uniformly from the model's vocabulary."""
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int):
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        vocab = getattr(embeddings, "num_embeddings", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"{type(model).__name__}: no vocabulary size in its config to draw a prompt from")
    return torch.randint(0, vocab, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- saved plans


def _load(args) -> Plan:
    """The saved plan args.plan names (PlanFileError: not a plan, newer format, damaged,
    unreadable; ``main`` prints it and exits 2)."""
    for name in args.imports:
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"--import {name!r} is not a module name")
        try:
            importlib.import_module(name)
        except Exception as e:  # the user's module: its own failure, named
            raise TargetError(f"--import {name}: importing it failed: {type(e).__name__}: {e}") from e
    return Plan.load(args.plan)


def _cmd_verify(args) -> int:
    plan = _load(args)
    budget = plan.budget_bytes
    if args.budget is not None:
        budget = parse_budget(args.budget, plan.hardware.device_bytes)
    try:
        peak = verify_schedule(plan.graph, budget, plan.hardware)
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
    _print_plan(_load(args), args.format)
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


def _cmd_schema(args) -> int:
    print(json.dumps(plan_schema.SCHEMA, indent=1))
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
