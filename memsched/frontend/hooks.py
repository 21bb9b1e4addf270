"""A warning for the hooks a user registered on the model: they run while it is traced, not per call.

torch.export runs a module's forward hooks and pre-hooks as Python while it traces, once,
on FakeTensors: what a hook returns in place of an output or an input becomes part of the
program, but what else it does (append an output to a list to extract features, count calls,
log) happens then only, with traced values, and never again when the compiled module is called.
A list a feature-extraction hook fills holds FakeTensors. Nothing tells a user so unless
memsched does: ``warn_user_hooks`` names the modules carrying such hooks (and the global ones).
Hooks written by the libraries memsched captures through (transformers' own, for gradient
checkpointing, are trace-safe: they set a flag on the output) are not the user's and are left out.
"""
from __future__ import annotations

import torch

from ..errors import warn_at_caller

_LIBRARIES = ("torch.", "transformers.", "accelerate.", "memsched.")


class HookWarning(UserWarning):
    """Hooks on the model run once while memsched traces it, not at each call."""


def _users(hooks) -> list:
    return [h for h in hooks.values()
            if not (getattr(h, "__module__", None) or "").startswith(_LIBRARIES)]


def warn_user_hooks(model: torch.nn.Module, train: bool = False) -> None:
    """Warn, naming up to four modules, when forward hooks (or backward hooks, for a training
    step) a user registered are on ``model``'s modules or registered globally."""
    kinds = ["_forward_hooks", "_forward_pre_hooks"] + (["_backward_hooks", "_backward_pre_hooks"] if train else [])
    hooked = [name or "the model itself" for name, m in model.named_modules()
              if any(_users(getattr(m, kind, None) or {}) for kind in kinds)]
    glob = torch.nn.modules.module
    if _users(glob._global_forward_hooks) or _users(glob._global_forward_pre_hooks):
        hooked.append("every module (global hooks)")
    if not hooked:
        return
    shown = ", ".join(hooked[:4]) + (f" and {len(hooked) - 4} more" if len(hooked) > 4 else "")
    warn_at_caller(
        f"memsched: hooks are registered on {type(model).__name__}'s modules ({shown}). They run once, "
        "while memsched traces the model on FakeTensors, not at each call of the compiled module: what a "
        "hook returns in place of an output becomes part of the program, but whatever else it does "
        "(keep an output in a list, count or log calls) happens only then, with traced values. Return "
        "the values you need from forward instead, or call the eager model for them.",
        HookWarning)
