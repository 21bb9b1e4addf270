"""Errors memsched raises before anything runs, so a bad request never half-executes; and where
its warnings are shown."""
from __future__ import annotations

import os
import sys
import warnings

import torch

# memsched's package and torch's: a warning is shown at the first frame outside both
_INSIDE = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (__file__, torch.__file__))


def warn_at_caller(message, category: type[Warning] = UserWarning) -> None:
    """Warn at the user's line, the first frame outside memsched and torch, whatever the depth
    (a compiled module's call passes through torch.compiler.disable's wrapper; a capture, a
    generation loop or the CLI through more of memsched)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class InfeasibleBudgetError(ValueError):
    """The budget cannot hold what some program point needs on the device.

    ``min_budget_bytes`` is the smallest budget this planner can meet for the same model,
    inputs and hardware, so the caller can retry with it.
    """

    def __init__(self, budget_bytes: int, min_budget_bytes: int, detail: str = ""):
        self.budget_bytes = int(budget_bytes)
        self.min_budget_bytes = int(min_budget_bytes)
        self.detail = detail   # where the minimum binds, and what it already assumes
        from .ir.units import format_bytes

        msg = (
            f"budget {format_bytes(budget_bytes)} is below the minimum this model needs on the "
            f"device, {format_bytes(min_budget_bytes)} ({self.min_budget_bytes} bytes)"
        )
        super().__init__(msg + (f": {detail}" if detail else ""))


class CaptureError(RuntimeError):
    """The model could not be traced into an ATen graph; the message names the construct."""


class UnsupportedModelError(CaptureError):
    """The model traced, but uses something memsched does not handle yet (named in the message)."""


class ModelTensorsChanged(RuntimeError):
    """A model tensor a program reads is gone, or has another shape, dtype or device, than when
    the program was planned (``model.half()`` or a Parameter swapped behind the compiled module's
    back). Raised before the program runs anything; ``change`` says what changed. The compiled
    module plans again on it, as torch.compile recompiles; other callers see the message."""

    def __init__(self, change: str):
        self.change = change
        super().__init__(f"memsched: {change} since this program was planned; the plan does not fit it any more: "
                         "compile the model again (memsched.compile)")


class BudgetExceededError(RuntimeError):
    """The runtime's device-tier accounting would pass the budget: a planner bug, never silent."""


class PlanFileError(ValueError):
    """A file (or document) that is not a memsched plan this memsched reads: not JSON, another
    format, a newer version, or damaged; the message names what is wrong and where. Nothing in
    a plan file is ever executed or imported: every field is checked against the format."""


class TargetError(ValueError):
    """A CLI target could not be built: its file or module failed to import, or its factory
    raised; the message names the target and the error (the original is the ``__cause__``)."""
