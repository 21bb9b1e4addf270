"""Which implementation a kernel call runs: Triton or the PyTorch fallback, and why.

Triton runs when it imports and every tensor is on CUDA, or when ``TRITON_INTERPRET=1`` is set
(its interpreter runs the same kernels on CPU tensors, slowly: for tests). Otherwise the
PyTorch fallback runs. ``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is *decorated*:
Triton's own library (tl.sum, tl.max) when triton is first imported, so the variable must be
set before that (``torch.export`` imports triton); our kernel module is (re)loaded whenever
the setting differs from the one it was built with.
"""
from __future__ import annotations

import importlib
import os
from typing import NamedTuple

import torch

TRITON = "triton"
TORCH = "torch"


class Backend(NamedTuple):
    name: str  # "triton" or "torch"
    reason: str


def interpret_requested() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it (1/true/on/yes)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def interpreter_ready() -> bool:
    """TRITON_INTERPRET=1, and set before triton was imported: Triton's own library (tl.sum,
    tl.max) is decorated when triton is imported, for the compiler or for the interpreter."""
    if not interpret_requested() or triton_import_error() is not None:
        return False
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.sum, InterpretedFunction)


def triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install raises more than ImportError
        return f"{type(exc).__name__}: {exc}"
    return None


def backend(*tensors: torch.Tensor | None) -> Backend:
    """The implementation a call on ``tensors`` runs, and why. With no tensors: for tensors on
    this machine's default accelerator (CUDA when available, else CPU)."""
    error = triton_import_error()
    if error is not None:
        return Backend(TORCH, f"triton does not import ({error})")
    if interpret_requested():
        if interpreter_ready():
            return Backend(TRITON, "TRITON_INTERPRET=1: Triton's interpreter runs the kernels")
        return Backend(TORCH, "TRITON_INTERPRET=1 was set after triton was imported (by torch.export, "
                              "say): triton's library is built for the compiler; set it before")
    devices = {t.device.type for t in tensors if t is not None}
    if not devices:
        devices = {"cuda" if torch.cuda.is_available() else "cpu"}
    if devices == {"cuda"}:
        return Backend(TRITON, "triton imports and the tensors are on CUDA")
    where = ", ".join(sorted(devices))
    return Backend(TORCH, f"tensors on {where}: Triton needs CUDA (or TRITON_INTERPRET=1)")


def use_triton(impl: str | None, *tensors: torch.Tensor | None) -> bool:
    """``impl`` forces "torch" or "triton"; None picks by ``backend``."""
    if impl is None:
        return backend(*tensors).name == TRITON
    if impl not in (TRITON, TORCH):
        raise ValueError(f"impl must be 'triton', 'torch' or None, got {impl!r}")
    if impl == TRITON and backend(*tensors).name != TRITON:
        raise RuntimeError(f"impl='triton' cannot run here: {backend(*tensors).reason}")
    return impl == TRITON


def triton_kernels():
    """The module of Triton kernels, built for the current ``TRITON_INTERPRET`` setting."""
    module = importlib.import_module("memsched.kernels._triton")
    if module.INTERPRET != interpret_requested():
        module = importlib.reload(module)
    return module
