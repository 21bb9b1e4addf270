"""Training steps as one autograd node.

``memsched.compile(model, budget, train=True)`` returns outputs produced by a
``torch.autograd.Function`` whose inputs are the model's trained parameters. Its forward runs
the scheduled program up to the boundary; its backward resumes the program with the
gradients of the outputs and returns one gradient per parameter. Autograd then accumulates
those into ``param.grad`` exactly as it does for eager PyTorch, on the parameter's own device,
so a standard ``torch.optim`` optimizer built on ``model.parameters()`` steps them unchanged.
"""
from __future__ import annotations

import torch

from ..frontend.joint import JointCaptured
from .executor import Executor


class TrainStep:
    """The state one compiled training step needs between its forward and its backward."""

    def __init__(self, captured: JointCaptured, executor: Executor, params: list[torch.Tensor],
                 mutated_buffers: list[torch.Tensor]):
        self.captured, self.executor, self.params = captured, executor, params
        self.mutated_buffers = mutated_buffers  # model buffers the forward returns new values of
        self.outputs: list = []

    def forward(self, flat_inputs: list) -> list:
        self.executor.abandon()  # a forward whose backward never ran: release its state
        out = self.executor.start(flat_inputs)
        with torch.no_grad():
            for buf, new in zip(self.mutated_buffers, out[:self.captured.n_mutations]):
                buf.copy_(new)
        self.outputs = out
        return out

    def backward(self, grad_outputs: tuple) -> list:
        c = self.captured
        user = grad_outputs[c.n_mutations:]
        tangents = []
        for i, g in enumerate(user):
            if i in c.diff_outputs:
                out = self.outputs[c.n_mutations + i]
                tangents.append(torch.zeros_like(out) if g is None else g.to(out.device, out.dtype))
            elif g is not None and bool(torch.any(g != 0)):
                raise RuntimeError(
                    f"memsched planned the backward from outputs {c.diff_outputs} (the scalar loss when "
                    f"there is one), but output {i} received a gradient too; compile with "
                    f"grad_outputs='all' to train through every output")
        self.outputs = []  # the caller's now: memsched keeps no reference past the step
        result = self.executor.resume(tangents)
        # gradients the plan delivered to host or disk arrive as those copies
        grads = [g if g is None or isinstance(g, torch.Tensor) else self.executor.engine.materialize(g)
                 for g in result[c.n_outputs:]]
        return [None if g is None else g.to(p.device, p.dtype) for g, p in zip(grads, self.params)]


class _StepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step: TrainStep, flat_inputs: list, *params):
        outs = step.forward(flat_inputs)
        ctx.step = step
        ctx.set_materialize_grads(False)
        # outputs without a planned gradient stay differentiable, so that a loss built on
        # them reaches TrainStep.backward and gets a clear error instead of silence
        c = step.captured
        capable = {c.n_mutations + i for i in c.grad_capable}
        ctx.mark_non_differentiable(*[o for i, o in enumerate(outs) if isinstance(o, torch.Tensor)
                                      and i not in capable])
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        grads = ctx.step.backward(grad_outputs)
        return (None, None, *grads)


def run_step(step: TrainStep, flat_inputs: list) -> list:
    """The forward outputs, connected to the parameters through one autograd node."""
    return list(_StepFunction.apply(step, flat_inputs, *step.params))
