"""Public entry points: ``memsched.compile`` and ``memsched.plan``."""
from __future__ import annotations

import os

import torch

from .budget import parse_budget
from .cost_models.hardware import Hardware, get_hardware
from .frontend.capture import input_signature
from .pipeline import plan_model
from .plans import Plan, as_plan
from .reapply import reapply
from .runtime.autograd import TrainStep, run_step
from .runtime.executor import Executor, RunStats
from .runtime.stores import make_offload_dir


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported: use 'cuda' or 'cpu'")
    return device


def _model_tensors(model: torch.nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _to_meta(tree):
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x, tree)


class CompiledModule:
    """A drop-in callable for the model that runs its plan inside the budget.

    Plans lazily at the first call per input signature (or at construction when example inputs
    are given). The model's own tensors are only read: host- and disk-homed copies are taken
    when a signature is first planned. With ``plan=`` (a Plan or a saved plan's path) nothing
    is solved: the model is re-captured and the saved schedule applied (budget and hardware
    default to the plan's).
    """

    def __init__(self, model, budget=None, *, example_inputs=None, example_kwargs=None, device=None,
                 offload_dir=None, hardware=None, train=False, grad_outputs="auto", plan=None, **options):
        if grad_outputs not in ("auto", "all"):
            raise ValueError(f"grad_outputs must be 'auto' or 'all', got {grad_outputs!r}")
        if train and plan is not None:
            raise NotImplementedError("re-applying a saved plan supports inference plans only; "
                                      "a training step is planned again")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"memsched.compile takes a torch.nn.Module, got {type(model).__name__}")
        meta = [name for name, t in _model_tensors(model) if t.device.type == "meta"]
        if meta:
            raise ValueError(f"{meta[0]} (and {len(meta) - 1} more) is on the meta device: compile "
                             "needs real weights; memsched.plan plans meta models without them")
        self._saved = None
        if plan is not None:
            self._saved = as_plan(plan)
            budget = self._saved.budget_bytes if budget is None else budget
            hardware = self._saved.hardware if hardware is None else hardware
        if budget is None:
            raise ValueError("memsched.compile needs a budget (or a saved plan: plan=...)")
        self.model = model
        self.device = _resolve_device(device)
        self.hardware: Hardware = get_hardware(hardware, self.device)
        self.budget_bytes = parse_budget(budget, self.hardware.device_bytes)
        if offload_dir is not None:  # fail now, not at the first call
            os.rmdir(make_offload_dir(offload_dir))
        self.offload_dir = offload_dir
        self.options = options
        self.train, self.grad_outputs = bool(train), grad_outputs
        self._compiled: dict = {}
        self._last = None
        if example_inputs is not None or example_kwargs is not None:
            self._prepare(tuple(example_inputs or ()), dict(example_kwargs or {}))

    def _prepare(self, args, kwargs):
        # train=True plans a training step when autograd is on, and inference under no_grad
        train = self.train and torch.is_grad_enabled()
        key = (train, self.model.training, input_signature(args, kwargs))
        entry = self._compiled.get(key)
        if entry is None:
            if self._saved is not None:
                plan, captured = reapply(self._saved, self.model, args, kwargs, self.budget_bytes)
            else:
                plan, captured = plan_model(self.model, args, kwargs, self.budget_bytes, self.hardware,
                                            train=train, grad_outputs=self.grad_outputs, **self.options)
            executor = Executor(plan.graph, captured, self.model, self.device, self.budget_bytes, self.offload_dir)
            step = None
            if train:
                params = dict(self.model.named_parameters(remove_duplicate=False))
                buffers = dict(self.model.named_buffers(remove_duplicate=False))
                step = TrainStep(captured, executor, [params[t] for t in captured.grad_targets],
                                 [buffers[t] for t in captured.mutation_targets])
            entry = self._compiled[key] = (plan, captured, executor, step)
        self._last = entry
        return entry

    def __call__(self, *args, **kwargs):
        plan, captured, executor, step = self._prepare(args, kwargs)
        flat = captured.flatten_inputs(args, kwargs)
        if step is not None:
            # the step's stats are complete once its backward ran (see ``stats``)
            out = captured.forward_outputs(run_step(step, flat))
        else:
            out = executor.run(flat)
            plan.measured = executor.last_stats
        return captured.unflatten_outputs(out)

    @property
    def plan(self) -> Plan:
        if self._last is None:
            raise RuntimeError("no plan yet: call the module once or pass example_inputs to compile()")
        return self._last[0]

    @property
    def stats(self) -> RunStats:
        """What the last call measured (for a training step: forward and backward)."""
        if self._last is None:
            return RunStats()
        self._last[0].measured = self._last[2].last_stats
        return self._last[2].last_stats

    @property
    def source(self) -> str:
        """The Python the executor runs for the last signature."""
        return self._last[2].source if self._last else ""

    def close(self) -> None:
        """Release transfer threads and delete offload files now (also done at garbage collection)."""
        for _, _, executor, _ in self._compiled.values():
            executor.close()
        self._compiled.clear()
        self._last = None


def compile(model, budget=None, *, example_inputs=None, example_kwargs=None, device=None, offload_dir=None,
            hardware=None, train=False, grad_outputs="auto", plan=None, **options) -> CompiledModule:
    """Compile ``model`` to run within ``budget`` device bytes (see DESIGN.md for the forms).

    ``train=True``: calls made with autograd enabled run a planned training step (forward and
    backward in one plan, see runtime/autograd.py); ``grad_outputs`` says which outputs the
    backward starts from: "auto" (the scalar outputs, i.e. the loss, when there are any) or "all".
    ``plan=``: a Plan or saved plan file runs that schedule instead of planning.
    """
    return CompiledModule(model, budget, example_inputs=example_inputs, example_kwargs=example_kwargs,
                          device=device, offload_dir=offload_dir, hardware=hardware, train=train,
                          grad_outputs=grad_outputs, plan=plan, **options)


def plan(model, example_inputs=(), budget=None, *, hardware=None, train=False, example_kwargs=None,
         **options) -> Plan:
    """Plan only: no weights are read and no device is needed (the model may live on meta)."""
    if budget is None:
        raise ValueError("memsched.plan needs a budget")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    hw = get_hardware(hardware, _resolve_device(None))  # None: this machine's calibrated device
    args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    if any(t.device.type == "meta" for _, t in _model_tensors(model)):
        args, kwargs = _to_meta((args, kwargs))  # plan a never-allocated model on meta inputs
    result, _ = plan_model(model, args, kwargs, budget, hw, train=train, **options)
    return result
