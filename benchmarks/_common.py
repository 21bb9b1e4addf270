"""Small helpers shared by the benchmark scripts (not a benchmark itself).

Nothing here asserts: benchmarks measure their baseline in the same run and print ratios.
"""
from __future__ import annotations

import contextlib
import logging
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
if TESTS not in sys.path:  # the model zoo lives in tests/zoo.py
    sys.path.insert(0, TESTS)


def quiet() -> None:
    """Silence transformers' config chatter and Python warnings for readable output."""
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers missing
        pass
    logging.getLogger("torch").setLevel(logging.ERROR)


def fmt_bytes(n) -> str:
    from memsched import format_bytes

    return "-" if n is None else format_bytes(n)


def fmt_s(s, unit: str = "ms") -> str:
    if s is None:
        return "-"
    if unit == "ms":
        return f"{s * 1e3:.1f}"
    return f"{s:.3f}"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def table(headers: list[str], rows: list[list], title: str | None = None) -> str:
    """A plain fixed-width table (right-aligned numbers, left-aligned text)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def is_num(s: str) -> bool:
        s = s.rstrip("x%*").replace(".", "", 1).replace("-", "", 1).replace("+", "", 1)
        return s.isdigit()

    def line(r):
        return "  ".join(c.rjust(w) if is_num(c) else c.ljust(w) for c, w in zip(r, widths)).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(headers))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in cells)
    return "\n".join(out)


@contextlib.contextmanager
def timer():
    box = {}
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - t0


def proc_io() -> dict:
    """/proc/self/io counters (read_bytes = bytes fetched from the storage layer,
    i.e. page-cache misses); empty dict where unavailable."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def drop_file_cache(paths) -> int:
    """Ask the kernel to drop cached pages of ``paths`` (fsync first: dirty pages are not
    dropped). Returns how many files were advised. Best effort: a VM or overlay filesystem
    may keep pages cached anyway; /proc/self/io read_bytes tells whether reads hit storage."""
    n = 0
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                os.fsync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        except (AttributeError, OSError):
            pass
        finally:
            os.close(fd)
    return n


def loadavg() -> str:
    """The 1-minute load average and core count, to judge how noisy a run was."""
    try:
        one = os.getloadavg()[0]
    except OSError:
        return "load average unavailable"
    return f"load average {one:.2f} on {os.cpu_count()} cores"


def set_threads(n: int | None) -> None:
    """torch.set_num_threads(n) when n is given; by default the torch default is kept."""
    if n:
        import torch

        torch.set_num_threads(n)


def build_gpt2(n_layer, n_embd, n_head, vocab, seq, *, train: bool = False):
    """A GPT-2 from its config (random, seeded weights; dropout off): eval and frozen for
    inference benchmarks, train mode with every parameter trained for training ones."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                     n_positions=max(seq, 128), bos_token_id=0, eos_token_id=0, use_cache=False,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    return model.train().requires_grad_(True) if train else model.eval().requires_grad_(False)
