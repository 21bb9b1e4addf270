"""CTC's loss as an operator whose output sizes are known from its inputs' sizes.

ATen's ``_ctc_loss`` is tagged as sized by data: with targets concatenated into one row, its
``log_alpha`` is ``[batch, T, 2 * max(target_lengths) + 1]``, so torch's tracer refuses it
whatever the targets' layout. With targets padded to one row per sample (``[batch, S]``) the
kernels take ``S`` for that maximum, a size the inputs' shapes give. ``ctc_loss`` here is that
case, named as an operator of its own (``torch.ops.memsched.ctc_loss``) with a fake
implementation saying so; it runs ATen's kernel and its backward is ATen's
(``_ctc_loss_backward``, which torch already traces). frontend/ctc_targets.py turns a model's
``F.ctc_loss`` call into it while the model is traced.
"""
from __future__ import annotations

import torch


@torch.library.custom_op("memsched::ctc_loss", mutates_args=())
def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
             target_lengths: torch.Tensor, blank: int, zero_infinity: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample negative log likelihood ``[batch]`` and the forward variables
    ``[batch, T, 2 * S + 1]`` of ``log_probs`` ``[T, batch, classes]`` against ``targets``
    ``[batch, S]`` (each row's first ``target_lengths`` entries)."""
    if targets.dim() != 2 or log_probs.dim() != 3:
        raise ValueError("memsched::ctc_loss takes log_probs [T, batch, classes] and targets [batch, S]")
    return torch.ops.aten._ctc_loss.Tensor(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity)


@ctc_loss.register_fake
def _(log_probs, targets, input_lengths, target_lengths, blank, zero_infinity):
    steps, batch = log_probs.shape[0], log_probs.shape[1]
    return log_probs.new_empty(batch), log_probs.new_empty(batch, steps, 2 * targets.shape[1] + 1)


def _setup_context(ctx, inputs, output):
    log_probs, targets, input_lengths, target_lengths, blank, zero_infinity = inputs
    ctx.save_for_backward(log_probs, targets, input_lengths, target_lengths, *output)
    ctx.blank, ctx.zero_infinity = blank, zero_infinity


def _backward(ctx, grad_nll, grad_alpha):
    log_probs, targets, input_lengths, target_lengths, nll, alpha = ctx.saved_tensors
    grad = torch.ops.aten._ctc_loss_backward.Tensor(grad_nll, log_probs, targets, input_lengths, target_lengths,
                                                    nll, alpha, ctx.blank, ctx.zero_infinity)
    return grad, None, None, None, None, None


ctc_loss.register_autograd(_backward, setup_context=_setup_context)
