"""What the CLI tests share: running ``memsched`` in-process and keeping the calibration cache
out of the home directory."""
from __future__ import annotations

import pytest

from memsched.cli import main


@pytest.fixture(autouse=True)
def calibration_cache(tmp_path_factory, monkeypatch):
    """`--hardware` left out means the locally calibrated profile: keep its cache out of ~/.
    (Autouse in every module that imports it.)"""
    monkeypatch.setenv("MEMSCHED_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "memsched-cache"))


def run(capsys, *argv):
    """``memsched *argv`` in-process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def record_status(monkeypatch) -> list:
    """The messages the CLI's status line shows (its spinner), recorded instead of drawn."""
    import contextlib

    import memsched.cli.commands as cli

    shown = []

    @contextlib.contextmanager
    def recording(message):
        shown.append(message)
        yield shown.append

    monkeypatch.setattr(cli, "_status", recording)
    return shown


def on_gpu(hardware: str, budget: str) -> str:
    """``budget`` for the program's tensors on the preset GPU ``hardware``, plus the cuBLAS
    workspace a plan for it counts beside them (tests/test_allocator_counting.py), in bytes."""
    import memsched

    return str(memsched.parse_budget(budget) + memsched.get_hardware(hardware).workspace_bytes)
