"""Running a saved plan on a model without solving: capture, check, rebuild, verify.

``memsched.compile(model, plan=...)`` calls ``reapply`` once per input signature; the pairing
of saved and captured nodes is memsched/io/reapply.py.
"""
from __future__ import annotations

import time

import torch

from .cost_models.op_scratch import hold_kernel_storages, op_scratch_bytes
from .errors import InfeasibleBudgetError
from .frontend.autocast import autocast_as, autocast_state, no_autocast
from .frontend.capture import Captured, capture, input_signature, keep_random_state
from .frontend.input_values import described
from .frontend.joint import capture_joint
from .frontend.repeats import capture_repeated
from .frontend.row_gathers import hoist_row_gathers
from .io.reapply import PlanMismatchError, apply_plan, check_input_values, check_signature
from .ir.meta import annotate, info
from .ir.ops import Op, op_of
from .ir.regions import region_of
from .passes.chunking import LOSS_HEAD, chunked, loss_chunks
from .passes.fusion import fuse_as, unfuse
from .plan_records import PassRecord
from .plans import Plan
from .verify import verify_schedule


def reapply(saved: Plan, model: torch.nn.Module, args: tuple, kwargs: dict, budget: int, *,
            train: bool = False, grad_outputs: str = "auto") -> tuple[Plan, Captured]:
    """Capture ``model`` (no solver), check it against ``saved`` and rebuild the schedule on it.
    The capture runs under the caller's torch.autocast, the rest with it off (frontend/autocast.py)."""
    autocast = autocast_state()
    with no_autocast():
        return _reapply(saved, model, args, kwargs, budget, train, grad_outputs, autocast)


def _reapply(saved: Plan, model: torch.nn.Module, args: tuple, kwargs: dict, budget: int, train: bool,
             grad_outputs: str, autocast: tuple) -> tuple[Plan, Captured]:
    """Capture ``model`` (no solver), check it against ``saved`` and rebuild the schedule on it.

    A training plan is re-captured as a training step (forward and backward, ``grad_outputs`` as
    compile's) with the loss head the plan was made with. The rebuilt program is checked by the
    independent verifier; a budget below what the saved plan holds raises InfeasibleBudgetError
    (a saved plan is applied as it is)."""
    key = input_signature(args, kwargs)
    if saved.signature is not None:
        check_signature(saved.signature, key)
    if saved.is_training != train:
        raise PlanMismatchError("the saved plan is a training step: call the module with autograd enabled"
                                if saved.is_training else "the saved plan is an inference plan, this call a training step")
    verify_schedule(saved.graph, saved.budget_bytes, saved.hardware)  # a hand-edited file fails here, by step
    fused = any(op_of(n) is Op.REGION for n in saved.graph.graph.nodes)
    # a fused plan pairs with the capture by its ops, then its regions are made again of the
    # same ops (and compiled anew: a file holds their ops, never code)
    program = unfuse(saved.graph) if fused else saved.graph
    kernels = any(n.op == "call_function" and getattr(n.target, "namespace", None) == "memsched"
                  for n in program.graph.nodes)   # planned with memsched's kernel ops
    for c in saved.chunking:   # the modules the plan runs on slices must be there to split
        if c.path != LOSS_HEAD and not isinstance(_submodule(model, c.path), torch.nn.Module):
            raise PlanMismatchError(f"the plan runs module {c.path!r} on slices of its input; the model has no such module")

    def recapture(shared_loss_heads: bool) -> Captured:
        """The model traced as it was planned (the same loss head, kernels and slices)."""
        def trace(m):
            if train:
                return capture_joint(m, args, kwargs, grad_outputs=grad_outputs, target=saved.hardware.device_type,
                                     loss_chunks=loss_chunks(list(saved.chunking)),
                                     shared_loss_heads=shared_loss_heads, kernels=kernels)
            return capture(m, args, kwargs, kernels=kernels, device_type=saved.hardware.device_type)
        with chunked(model, list(saved.chunking)), keep_random_state(), autocast_as(autocast):
            captured = capture_repeated(model, trace)[0]
        if not train:   # as planning did (pipeline.capture_pass)
            captured.gathers = hoist_row_gathers(captured.gm, captured.placeholders)
        return captured

    t = time.perf_counter()
    captured = recapture(False)
    values = described(model, captured.value_guards)
    check_input_values(saved.input_values, values)
    try:
        gm = apply_plan(program, captured)
    except PlanMismatchError as first:
        # a fused training step may have had its loss read the returned logits in slices
        # (pipeline.loss_head_pass): the file keeps the program, not that choice
        if not (train and fused):
            raise
        captured = recapture(True)
        try:
            gm = apply_plan(program, captured)
        except PlanMismatchError:
            raise first from None
    capture_s = time.perf_counter() - t   # pairing included: it is a small part
    t = time.perf_counter()
    _scratch_here(gm, saved.hardware.device_type)
    if fused:
        groups = [region_of(n).names for n in saved.graph.graph.nodes if op_of(n) is Op.REGION]
        try:
            gm, _ = fuse_as(gm, groups, saved.hardware)
        except ValueError as e:
            raise PlanMismatchError(f"the plan's fused regions: {e}") from None
    peak = verify_schedule(gm, max(budget, saved.budget_bytes), saved.hardware)
    if peak > budget:
        raise InfeasibleBudgetError(budget, peak, "the saved plan holds that much on the device and is "
                                    "applied as it is; plan again for a smaller budget")
    apply_s = time.perf_counter() - t
    passes = [*saved.passes, PassRecord("capture", capture_s, "re-captured"),
              PassRecord("apply", apply_s, "saved plan, not solved")]
    plan = Plan(saved.model_name, budget, saved.hardware, gm, None, None, saved.sim, saved.unconstrained,
                passes, saved.n_segments, facts=saved.facts, signature=key, chunking=saved.chunking,
                input_values=values)
    return plan, captured


def _scratch_here(gm: torch.fx.GraphModule, device_type: str) -> None:
    """What ops hold inside themselves is measured again on this machine (cost_models/op_scratch.py:
    the attention kernel's blocks are per torch thread): where it is more than the file says, the
    program holds the larger, and the verifier below checks the budget with it."""
    for n in gm.graph.nodes:
        hold_kernel_storages(n, device_type)   # the storages its kernels make, as planned
        here = op_scratch_bytes(n, device_type)
        if here > (info(n).scratch or 0):
            annotate(n, scratch=here)


def _submodule(model: torch.nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
