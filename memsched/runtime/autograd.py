"""Training steps as one autograd node.

``memsched.compile(model, budget, train=True)`` returns outputs produced by a
``torch.autograd.Function`` whose inputs are the model's trained parameters (and the user
inputs that require grad: a module compiled inside a model whose other layers autograd runs).
Its forward runs the scheduled program up to the boundary; its backward resumes the program
with the gradients of the outputs and returns one gradient per parameter and input. Autograd
then accumulates those into ``param.grad`` exactly as it does for eager PyTorch, on the
parameter's own device, so a standard ``torch.optim`` optimizer built on
``model.parameters()`` steps them unchanged, and passes the inputs' on to the layers before.
"""
from __future__ import annotations

import threading
import weakref

import torch

from ..errors import ModelTensorsChanged, UnsupportedModelError
from ..frontend.fake import size1_only
from ..frontend.joint import JointCaptured, gradient_sources
from .executor import Executor


class _Forward:
    """One forward of a step: what its autograd node holds to name it at its backward."""


class TrainStep:
    """The state one compiled training step needs between its forward and its backward.

    The trained parameters and the updated buffers are looked up in the model by name at every
    forward, so parameters replaced after compile (``load_state_dict(..., assign=True)``) get
    their gradients. ``lock`` (the compiled module's) is held by the backward too, so a step
    never runs beside another call of the same module."""

    def __init__(self, captured: JointCaptured, executor: Executor, model: torch.nn.Module,
                 lock=None):
        self.captured, self.executor, self.model = captured, executor, model
        self.lock = lock if lock is not None else threading.RLock()
        self.outputs: list = []
        self.params: list[torch.Tensor] = []
        self.mutated_buffers: list[torch.Tensor] = []  # model buffers the forward returns new values of
        self.sources = gradient_sources(captured)   # per parameter, the output gradients it reads
        self.pending: _Forward | None = None   # the forward whose backward may still run
        self._done = weakref.WeakSet()       # forwards whose backward ran
        self.lookup()

    def lookup(self) -> None:
        params = dict(self.model.named_parameters(remove_duplicate=False))
        buffers = dict(self.model.named_buffers(remove_duplicate=False))
        missing = [t for t in self.captured.grad_targets if t not in params]
        missing += [t for t in self.captured.mutation_targets if t not in buffers]
        if missing:
            raise ModelTensorsChanged(f"the model has no tensor {missing[0]!r} any more")
        self.params = [params[t] for t in self.captured.grad_targets]
        self.mutated_buffers = [buffers[t] for t in self.captured.mutation_targets]

    def release(self) -> None:
        """Release the state of a forward whose backward has not run (it never will)."""
        self.executor.abandon()
        self.pending = None

    def forward(self, flat_inputs: list) -> list:
        self.release()  # a forward whose backward never ran
        out = self.executor.start(flat_inputs)
        self.pending = _Forward()
        with torch.no_grad():
            for buf, new in zip(self.mutated_buffers, out[:self.captured.n_mutations]):
                buf.copy_(new)
        self.outputs = out
        return out

    def backward(self, grad_outputs: tuple, params: list[torch.Tensor], forward: _Forward) -> list:
        """One gradient per parameter in ``params`` (those of the forward that ran), for the
        forward ``forward`` (``pending`` when it ran): the program resumes from its state, which
        exists once, for the last forward only."""
        with self.lock:
            if forward is not self.pending:
                raise RuntimeError(_STALE_BACKWARD if forward in self._done else _RELEASED_FORWARD)
            self.pending = None
            self._done.add(forward)
            return self._backward(grad_outputs, params)

    def _backward(self, grad_outputs: tuple, params: list[torch.Tensor]) -> list:
        c = self.captured
        user = grad_outputs[c.n_mutations:]
        tangents, given = [], 0
        for i, g in enumerate(user):
            if i in c.diff_outputs:
                out = self.outputs[c.n_mutations + i]
                given |= (g is not None) << len(tangents)
                g = torch.zeros_like(out) if g is None else g.to(out.device, out.dtype)
                tangents.append(_laid_out_as_traced(g, c.tangent_strides[len(tangents)]))
            elif g is not None and bool(torch.any(g != 0)):
                self.executor.abandon()
                planned = ", ".join(c.output_name(j) for j in c.diff_outputs)
                raise RuntimeError(
                    f"memsched planned the backward from {planned} (the scalar loss when there is one), but "
                    f"{c.output_name(i)} received a gradient too; compile with grad_outputs='all' to train "
                    "through every output")
        self.outputs = []  # the caller's now: memsched keeps no reference past the step
        result = self.executor.resume(tangents)
        # gradients the plan delivered to host or disk arrive as those copies
        # (one copy can be several parameters' gradient: an LSTM's two biases get the same one)
        grads = self.executor.engine.materialize_all(list(result[c.n_outputs:]))
        # a parameter (or input) none of whose output gradients was given gets none, as in eager autograd
        return _on_params([None if src and not src & given else g for g, src in zip(grads, self.sources)], params)


def _laid_out_as_traced(g: torch.Tensor, stride: tuple) -> torch.Tensor:
    """``g`` in the layout its backward was traced for. The trace chose ``view`` where that
    layout allowed one; the caller's gradient can come in another (a transposed output's
    gradient from ``(out * w).sum()`` is row-major, a sum's is expanded), where such a view
    fails. Copied into that layout (the bytes the trace counted for it: a sliced output's
    gradient, DINOv2's pooled token, spans the rows it skips) unless it overlaps itself."""
    shape = tuple(g.shape)
    if len(stride) != len(shape) or size1_only(g.stride(), stride, shape):
        return g
    if not _non_overlapping(shape, stride):
        return g   # an expanded output: the trace's gradient was made so too
    return torch.empty_strided(shape, stride, dtype=g.dtype, device=g.device).copy_(g)


def _non_overlapping(shape: tuple, stride: tuple) -> bool:
    """No two elements of a tensor of ``shape`` laid out with ``stride`` share memory: each
    dimension, innermost first, steps past everything the dimensions inside it span."""
    span = 1
    for step, size in sorted((s, n) for n, s in zip(shape, stride) if n > 1):
        if step < span:
            return False
        span += step * (size - 1)
    return True


def _on_params(grads: list, params: list[torch.Tensor]) -> list:
    """Each gradient on its parameter's device, in its dtype. Gradients on a GPU for parameters
    on the host go down as non-blocking copies into pinned memory (PyTorch's caching host
    allocator takes it back when the gradient dies), then one wait: a blocking copy each into
    pageable memory ran at a tenth of the link's speed on an H200."""
    out, wait = [], None
    for g, p in zip(grads, params):
        if g is not None and g.device.type == "cuda" and p.device.type == "cpu":
            host = torch.empty_like(g, dtype=p.dtype, device="cpu", pin_memory=True)
            wait = torch.cuda.current_stream(g.device)
            g = host.copy_(g, non_blocking=True)
        elif g is not None:
            g = g.to(p.device, p.dtype)
        out.append(g)
    if wait is not None:
        wait.synchronize()
    return out


_STALE_BACKWARD = (
    "memsched: this training step's backward already ran, and it frees the step's saved values "
    "as it goes: a compiled step runs one backward per forward (retain_graph=True cannot run "
    "it twice); call the module again for another backward")
_DOUBLE_BACKWARD = (
    "memsched: a compiled training step's backward is a program of its own, not differentiable: "
    "create_graph=True (a double backward: a gradient penalty, a Hessian-vector product) is not "
    "supported. The step is still pending: its first-order backward can run; compute the "
    "second-order term on the eager model")
_RELEASED_FORWARD = (
    "memsched: a later call of this compiled module released this forward's saved values (one "
    "step is in flight at a time: a module called twice before one backward cannot run the "
    "first call's backward); run backward before calling it again, or for a loss over several "
    "calls (contrastive pairs, DPO's chosen and rejected) concatenate their inputs along the "
    "batch and call it once, or compile a second module for the second call")


class _StepFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, step: TrainStep, flat_inputs: list, *params):
        # (``params``: the trained parameters, then the inputs in ``flat_inputs`` that take a gradient)
        outs = step.forward(flat_inputs)
        ctx.step, ctx.params, ctx.forward = step, params, step.pending
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
        if torch.is_grad_enabled():   # create_graph=True: autograd asks for a differentiable backward
            raise NotImplementedError(_DOUBLE_BACKWARD)
        grads = ctx.step.backward(grad_outputs, ctx.params, ctx.forward)
        return (None, None, *grads)


def run_step(step: TrainStep, flat_inputs: list) -> list:
    """The forward outputs, connected to the parameters and to the inputs that take a gradient
    through one autograd node."""
    planned = step.captured.grad_inputs
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad and i not in planned
                                       for i, t in enumerate(flat_inputs)):
        # (the compiled module plans again for inputs that require grad: reached by a step planned
        # for others, the gradient would be lost)
        raise UnsupportedModelError(
            "memsched: an input of this training step requires grad, and the step was planned "
            "without its gradient: it would be lost")
    with step.lock:
        step.lookup()
        return list(_StepFunction.apply(step, flat_inputs, *step.params, *[flat_inputs[i] for i in planned]))
