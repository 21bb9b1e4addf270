"""Public entry points: ``memsched.compile`` and ``memsched.plan``."""
from __future__ import annotations

import contextlib
import functools
import os
import threading
import time
import weakref
from collections import OrderedDict

import torch

from .budget import format_bytes, parse_budget
from .cost_models.hardware import Hardware, get_hardware
from .errors import ModelTensorsChanged, warn_at_caller
from .frontend.autocast import autocast_state
from .frontend.capture import input_signature
from .frontend.input_values import GuardSet, described, stand_in
from .frontend.fake import meta_as_empty
from .frontend.module_tree import ModuleTree, walk
from .frontend.nested_encoders import packs_padding
from .io.reapply import PlanMismatchError
from .pipeline import plan_model
from .plans import Plan, as_plan
from .reapply import reapply
from .runtime.autograd import TrainStep, run_step
from .runtime.checkpoint import Checkpoint
from .runtime.executor import Executor, RunStats
from .runtime.stores import Stores, make_offload_dir

_MANY_VALUES = 4   # programs planned for one input signature before saying why
_MANY_SHAPES = 8   # input shapes planned before saying that each new one plans again

# torch.export (inside plan_model and reapply) is not thread-safe: one capture at a time
_CAPTURE_LOCK = threading.Lock()


def _refuse_grad_inputs(args, kwargs) -> None:
    """An inference module called with grad mode on and an input requiring grad would return
    outputs without a gradient path: say so instead of dropping gradients silently."""
    import torch.utils._pytree as pytree

    for path, leaf in pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))[0]:
        if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
            where = ("args" if path[0].idx == 0 else "kwargs") + pytree.keystr(path[1:])
            raise RuntimeError(
                f"memsched: input {where} requires grad and grad mode is on, but this module was "
                "compiled for inference (train=False): its outputs would carry no gradient. Compile "
                "with memsched.compile(..., train=True) to train through it, or call it under "
                "torch.no_grad() / with the input detached (x.detach()) for inference")


def _inputs_taking_grads(args, kwargs) -> tuple[int, ...]:
    import torch.utils._pytree as pytree

    flat = pytree.tree_leaves((tuple(args), dict(sorted(kwargs.items()))))
    return tuple(i for i, leaf in enumerate(flat) if isinstance(leaf, torch.Tensor) and leaf.requires_grad)


@contextlib.contextmanager
def outside_inference_mode():
    """Plan and run as under ``torch.no_grad()`` when the caller is in ``torch.inference_mode()``:
    tensors made there (constants captured, recycled buffers, a KV cache) are inference tensors,
    which keep no version counter and refuse in-place writes once inference mode is left, while
    memsched keeps them across calls. The outputs are then ordinary tensors without a gradient."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def _resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this PyTorch sees no CUDA device (torch.cuda.is_available() "
                         "is False): use device='cpu', or install a CUDA build of torch")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device} is not supported: use 'cuda' or 'cpu'")
    return device


def _model_tensors(model: torch.nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _meta_as_zeros(tree):
    """Meta input tensors as zeros on the CPU (capture reads their shapes; a value read off one
    is refused: input_values.stand_in); one passed twice stays one tensor (input_signature)."""
    import torch.utils._pytree as pytree

    made: dict[int, torch.Tensor] = {}

    def zeros(x):
        if not (isinstance(x, torch.Tensor) and x.device.type == "meta"):
            return x
        if id(x) not in made:
            made[id(x)] = stand_in(x)
        return made[id(x)]

    return pytree.tree_map(zeros, tree)


_BITS = {None: None, "int8": 8, "int4": 4}


def _compression_bits(what: str, value) -> int | None:
    """``None``/``"int8"``/``"int4"`` as bits; anything else is refused, naming the option."""
    if not (value is None or isinstance(value, str)) or value not in _BITS:
        raise ValueError(f"{what} must be None, 'int8' or 'int4', got {value!r}")
    return _BITS[value]


class CompiledModule:
    """A drop-in callable for the model that runs its plan inside the budget.

    Plans lazily at the first call per input signature (or at construction when example inputs
    are given). The model's own tensors are only read: host- and disk-homed copies are taken
    when a signature is first planned. With ``plan=`` (a Plan or a saved plan's path) nothing
    is solved: the model is re-captured and the saved schedule applied (budget and hardware
    default to the plan's).
    """

    def __init__(self, model, budget=None, *, example_inputs=None, example_kwargs=None, device=None,
                 offload_dir=None, hardware=None, train=False, grad_outputs="auto", plan=None, max_plans=8,
                 weights=None, **options):
        if grad_outputs not in ("auto", "all"):
            raise ValueError(f"grad_outputs must be 'auto' or 'all', got {grad_outputs!r}")
        self._pid = os.getpid()
        self._warned_untrained = False
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"memsched.compile takes a torch.nn.Module, got {type(model).__name__}")
        meta = [name for name, t in _model_tensors(model) if t.device.type == "meta"]
        weights_prefix = options.pop("weights_prefix", "")
        self.hard_limit = bool(options.pop("hard_limit", False))
        self._compress = [_compression_bits(what, options.pop(what, None))
                          for what in ("compress_weights", "compress_kv_cache")]
        self._checkpoint = None
        if weights is not None:  # every meta tensor must be in it: checked before anything runs
            self._checkpoint = Checkpoint(weights, prefix=weights_prefix)
            self._checkpoint.bind(_model_tensors(model))
        elif meta:
            raise ValueError(f"{meta[0]} (and {len(meta) - 1} more) is on the meta device: compile "
                             "needs real weights, or a safetensors checkpoint to read them from "
                             "(weights=...); memsched.plan plans meta models without them")
        self._saved = None
        if plan is not None:
            self._saved = as_plan(plan)
            if self._saved.is_training != bool(train):
                raise PlanMismatchError(
                    "the saved plan is a training step: compile it with train=True" if self._saved.is_training
                    else "the saved plan is an inference plan: compile it with train=False (or plan a training step)")
            budget = self._saved.budget_bytes if budget is None else budget
            hardware = self._saved.hardware if hardware is None else hardware
        if budget is None:
            raise ValueError("memsched.compile needs a budget (or a saved plan: plan=...)")
        self.model = model
        self.device = _resolve_device(device)
        self.hardware: Hardware = get_hardware(hardware, self.device)
        # a budget larger than the device is refused unless the user plans for a larger machine
        self.budget_bytes = parse_budget(budget, self.hardware.device_bytes,
                                         over_capacity=options.pop("allow_over_capacity", False))
        if offload_dir is not None:  # fail now, not at the first call
            os.rmdir(make_offload_dir(offload_dir))
        self.offload_dir = offload_dir
        self.options = options
        if train and self._checkpoint is not None:
            raise NotImplementedError("training reads and updates the model's own parameters: weights= "
                                      "(a checkpoint for a meta model) runs inference only")
        self.trains, self.grad_outputs = bool(train), grad_outputs
        if isinstance(max_plans, bool) or not isinstance(max_plans, int) or max_plans < 1:
            raise ValueError(f"max_plans must be a positive int, got {max_plans!r}")
        self.max_plans = max_plans
        # one call at a time: planning and running share the executors' state (a second thread waits)
        self._lock = threading.RLock()
        # plans of the most recently used input signatures (least recent first), at most max_plans
        self._compiled: OrderedDict = OrderedDict()
        self._value_guards: dict = {}   # signature -> values made from the inputs that shaped a program
        self._plans_per_signature: dict = {}
        self._shapes_planned: set = set()   # input signatures planned, for the warning on many shapes
        self._planning_s = 0.0
        self._last = None
        self.plans_made = 0  # signatures planned (or re-applied) so far, evicted ones included
        self._new_stores()
        if isinstance(example_inputs, torch.Tensor):   # one input, as plan() takes it
            example_inputs = (example_inputs,)
        if example_inputs is not None or example_kwargs is not None:
            with self._lock:
                self._prepare(tuple(example_inputs or ()), dict(example_kwargs or {}))

    def _new_stores(self) -> None:
        # the host pool, offload file and weight homes every signature's executor shares: each
        # weight homed on disk is written once, not once per signature
        self._stores = Stores(self.device, self.offload_dir, checkpoint=self._checkpoint, compress=self._compress[0],
                              compress_kv=self._compress[1])
        self._stores_finalizer = weakref.finalize(self, self._stores.close)

    def _prepare(self, args, kwargs):
        # train=True plans a training step when autograd is on, and inference under no_grad
        train = self.trains and torch.is_grad_enabled()
        # on a CPU what some ops hold inside themselves grows with torch's threads (the attention
        # kernel's blocks, one per thread; cost_models/op_scratch.py): a plan per thread count
        threads = torch.get_num_threads() if self.device.type == "cpu" else None
        # a call under torch.autocast runs the casts its capture wrote out (frontend/autocast.py)
        # a training step returns a gradient for each input and parameter that requires grad:
        # planned per such set (a backbone unfrozen after compiling gets its gradients); each
        # module's training flag, not only the model's: a batch norm frozen in eval inside a model
        # in training runs another program
        tree = walk(self.model, trained=train)
        # an inference call's grad mode decides whether eager nn.TransformerEncoder packs its
        # padding (frontend/nested_encoders.py): a program per mode, for such models only
        grad_mode = torch.is_grad_enabled() if not train and packs_padding(tree.modules) else None
        signature = (train, tree.modes, input_signature(args, kwargs), threads, autocast_state(),
                     _inputs_taking_grads(args, kwargs) if train else (), tree.trained, grad_mode)
        key = self._key(signature, args, kwargs)
        entry = self._compiled.get(key)
        last = entry if entry is not None else self._last
        changed = last[1].module_tree.changed(self.model, tree) if last is not None else None
        if changed is not None:   # programs of the model as it was are dropped: it is planned again
            warn_at_caller(f"memsched: {changed} since the model was last planned: planning it again")
            for old_key, old in list(self._compiled.items()):
                if old is last or old[1].module_tree.changed(self.model, tree) is not None:
                    del self._compiled[old_key]
                    old[2].close()
            self._last = entry = None
        if entry is None:
            started = time.perf_counter()
            with _CAPTURE_LOCK:  # torch.export is not thread-safe
                if self._saved is not None:
                    with meta_as_empty(self.model):
                        plan, captured = reapply(self._saved, self.model, args, kwargs, self.budget_bytes,
                                                 train=train, grad_outputs=self.grad_outputs)
                else:
                    with meta_as_empty(self.model):  # a model read from a checkpoint captures as a real one
                        plan, captured = plan_model(self.model, args, kwargs, self.budget_bytes, self.hardware,
                                                    train=train, grad_outputs=self.grad_outputs, **self.options)
            self.plans_made += 1
            self._count_shape(signature[2], time.perf_counter() - started)
            # after planning: a library may settle its config lazily at the first forward
            captured.module_tree = ModuleTree.of(self.model)
            self._remember_guards(signature, captured)
            key = self._key(signature, args, kwargs)
            executor = Executor(plan.graph, captured, self.model, self.device, self.budget_bytes,
                                self.offload_dir, stores=self._stores, hardware=plan.hardware,
                                hard_limit=self.hard_limit)
            step = None
            if train:
                try:
                    step = TrainStep(captured, executor, self.model, self._lock)
                except BaseException:
                    executor.close()
                    raise
            entry = self._compiled[key] = (plan, captured, executor, step)
            while len(self._compiled) > self.max_plans:  # the least recently used plan goes
                _, old = self._compiled.popitem(last=False)
                old[2].close()
        else:
            self._compiled.move_to_end(key)
        if self._last is not None and self._last is not entry:
            for other in self._compiled.values():  # one program's resident weights on the device
                if other is not entry:
                    other[2].park()
        self._last = entry
        return entry

    def _count_shape(self, shape: tuple, planning_s: float) -> None:
        """Say once when many input shapes were planned: a program is made per shape (a capture
        and a solve, seconds), so sizes that change call after call (a sequence length per batch)
        plan at nearly every call, and past ``max_plans`` evicted programs are planned again."""
        self._planning_s += planning_s
        if shape in self._shapes_planned:
            return
        self._shapes_planned.add(shape)
        if len(self._shapes_planned) == _MANY_SHAPES:
            warn_at_caller(
                f"memsched: {_MANY_SHAPES} input shapes planned so far ({self._planning_s:.1f} s of planning): each "
                f"new shape is captured and planned again, and past max_plans ({self.max_plans}) the least recently "
                "used programs are dropped and planned again when their shape comes back. Pad the inputs to a few "
                "fixed sizes (bucket the sequence lengths) to reuse programs")

    def _remember_guards(self, signature: tuple, captured) -> None:
        """Keep what decided this capture's program besides the signature (the union over the
        signature's captures), and say once when values read off the inputs made it plan many
        programs for one shape: each new value plans again (seconds), as a new shape would."""
        known = {g.key(): g for g in self._value_guards[signature].guards} if signature in self._value_guards else {}
        known.update({g.key(): g for g in captured.value_guards})
        guards = tuple(known.values())
        self._value_guards[signature] = GuardSet(guards)
        self._plans_per_signature[signature] = planned = self._plans_per_signature.get(signature, 0) + 1
        if planned == _MANY_VALUES and guards:
            read = sorted({said for said, _ in described(self.model, guards)})
            warn_at_caller(
                f"memsched: {planned} programs planned for inputs of one shape, because values read off them differ "
                f"({'; '.join(read)}): each new value is planned again, as a new shape is. Keep those values "
                f"steady across calls (pad to a fixed length, bucket the counts) to reuse programs")

    def _key(self, signature: tuple, args: tuple, kwargs: dict) -> tuple:
        # a value made from the inputs alone sized a selection, decided a branch or an attention
        # mask's skip as it was (frontend/input_values.py): a program per answer
        return signature + (self._value_guards[signature].values(self.model, args, kwargs)
                            if signature in self._value_guards else (),)

    def prepare(self, *args, **kwargs) -> Plan:
        """Plan for inputs shaped like these now (nothing runs); the plan is kept as a call's is."""
        with self._lock, outside_inference_mode():
            return self._prepare(tuple(args), dict(kwargs))[0]

    # torch.compile around a compiled module runs it as one opaque call: tracing into it would
    # trace memsched's runtime (its threads, its accounting), not the model
    @torch.compiler.disable
    def __call__(self, *args, **kwargs):
        if os.getpid() != self._pid:   # before the lock, which a parent's thread may have held
            raise RuntimeError(
                "memsched: this module was compiled in another process (the parent of a fork); its worker "
                "threads, pinned buffers and offload file belong to that process: compile the model again here")
        if not self.trains and torch.is_grad_enabled():
            _refuse_grad_inputs(args, kwargs)
            self._warn_untrained()
        with self._lock, outside_inference_mode():
            try:
                return self._run(args, kwargs)
            except ModelTensorsChanged as exc:
                # a tensor converted or swapped on the model itself (``model.half()``), seen by the
                # executor before its program ran anything: every plan read the tensors as they were
                warn_at_caller(f"memsched: {exc.change} since the model was last planned: planning it again")
                self.close()
                return self._run(args, kwargs)

    def _run(self, args, kwargs):
        plan, captured, executor, step = self._prepare(args, kwargs)
        flat = captured.flatten_inputs(args, kwargs)
        # one step in flight per module, whatever plan it ran: a forward of another plan (other
        # shapes, inputs taking gradients or not) waiting for its backward holds up to the
        # budget too, so a call releases it (its backward then raises and says why)
        for *_, other in self._compiled.values():
            if other is not None and other is not step:
                other.release()
        if step is not None:
            # the step's stats are complete once its backward ran (see ``stats``)
            out = captured.forward_outputs(run_step(step, flat))
        else:
            out = executor.run(flat)
            plan.measured = executor.last_stats
        return captured.unflatten_outputs(out)

    def _warn_untrained(self) -> None:
        """A model in training mode with parameters that require grad, called with grad mode on,
        looks like a training loop; a module compiled for inference returns outputs without a
        gradient, so its backward would fail in PyTorch with no word of why: said once."""
        if self._warned_untrained or not self.model.training:
            return
        self._warned_untrained = True
        if any(p.requires_grad for p in self.model.parameters()):
            warn_at_caller(
                f"memsched: {type(self.model).__name__} is in training mode with parameters that require "
                "grad, but this module was compiled for inference (train=False): its outputs carry no "
                "gradient. Compile with memsched.compile(..., train=True) to train through it; for "
                "inference call model.eval() or run it under torch.no_grad()")

    def patched(self, names, dim: int, index: torch.Tensor) -> None:
        """Say that model tensors ``names`` (state-dict keys, or one key) had their slices
        ``index`` along ``dim`` written in place since the last call: the copies memsched holds
        (host, disk, device) take those slices, not a rewrite of the whole tensor at the next call."""
        names = [names] if isinstance(names, str) else list(names)
        with self._lock:
            tensors = dict(_model_tensors(self.model))
            for name in names:
                if name not in tensors:
                    raise KeyError(f"the model has no tensor {name!r}")
                self._stores.patch(name, tensors[name].detach(), dim, index)
                for entry in self._compiled.values():
                    entry[2].patched(name, dim, index)

    def wait_patched(self) -> None:
        """Wait until the copies ``patched`` updated have their checksums (computed in the
        background): call it before writing the patched tensors again."""
        self._stores.settle()

    @contextlib.contextmanager
    def unchanged_weights(self):
        """Inside this block the caller vouches that the model's tensors are not replaced
        (``p.data = ...``, ``load_state_dict(assign=True)``) and change only where PyTorch's
        version counter sees it (in-place ops on the tensors, reported with ``patched``): calls
        skip looking each tensor up and the checksum of every copied one, a pass over
        their bytes per call. Meant for loops that call the module many times in a row, such as
        token-by-token generation."""
        with self._lock:
            for entry in self._compiled.values():
                entry[2].trusted = True
            try:
                yield self
            finally:
                for entry in self._compiled.values():
                    entry[2].trusted = False

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

    def __getattr__(self, name):
        """What the compiled module lacks is the model's, as for torch.compile's wrapper, so code
        that rebinds ``model = memsched.compile(model, ...)`` keeps working: ``cm.parameters()``
        for an optimizer, ``cm.config``, ``cm.state_dict()``. A method that returns the model
        (``cm.eval()``, ``cm.train()``, ``cm.to(...)``) returns the compiled module instead, so
        ``cm = cm.eval()`` keeps it; after one that gives the model's tensors another dtype or
        shape (``cm.to(torch.bfloat16)``) the next call plans again, as after ``model.half()``
        (the executor sees it: ``ModelTensorsChanged``). ``forward`` runs the
        compiled module (with the model's signature, for code that inspects it); ``generate``,
        which would run the model eagerly outside the budget, is refused naming what runs it
        inside."""
        model = self.__dict__.get("model")
        if model is None or name.startswith("__"):
            raise AttributeError(name)
        if name == "forward":
            def forward(*args, **kwargs):
                return self(*args, **kwargs)
            return functools.wraps(model.forward)(forward)
        if name == "generate":   # transformers' loop would call the model itself
            raise AttributeError(f"memsched: {type(model).__name__}.generate through the compiled module would run "
                                 "the model eagerly, outside the budget: memsched.generate(model, ...) or "
                                 "memsched.route_generate(model, budget) runs transformers' generate inside it")
        value = getattr(model, name)
        if not callable(value) or getattr(value, "__self__", None) is not model:
            return value

        @functools.wraps(value)
        def method(*args, **kwargs):
            out = value(*args, **kwargs)
            return self if out is model else out
        return method

    def __repr__(self) -> str:
        # what a notebook prints for ``cm``: the model it runs and how, not an object address
        what = "training step" if self.trains else "inference"
        model = type(self.__dict__.get("model")).__name__
        return (f"CompiledModule({model}, budget {format_bytes(self.budget_bytes)}, device {self.device}, "
                f"{what}, plans: {len(self._compiled)} held, {self.plans_made} made)")

    def __reduce_ex__(self, protocol):
        # copy.deepcopy and pickle both come here: a copy would share or lose the worker threads,
        # pinned buffers and unnamed offload file this module holds
        raise TypeError("a memsched compiled module cannot be copied or pickled (it holds transfer threads, "
                        "pinned buffers and an offload file): copy or save the model (model.state_dict()), "
                        "and compile the copy with memsched.compile")

    def close(self) -> None:
        """Release transfer threads and delete offload files now (also done at garbage collection).
        A later call plans again."""
        with self._lock:
            for _, _, executor, _ in self._compiled.values():
                executor.close()
            self._compiled.clear()
            self._last = None
            self._stores_finalizer()
            self._new_stores()


def compile(model, budget=None, *, example_inputs=None, example_kwargs=None, device=None, offload_dir=None,
            hardware=None, train=False, grad_outputs="auto", plan=None, max_plans=8, weights=None,
            **options) -> CompiledModule:
    """Compile ``model`` to run within ``budget`` device bytes (see DESIGN.md for the forms).

    ``train=True``: calls made with autograd enabled run a planned training step (forward and
    backward in one plan, see runtime/autograd.py); ``grad_outputs`` says which outputs the
    backward starts from: "auto" (the scalar outputs, i.e. the loss, when there are any) or "all".
    ``plan=``: a Plan or saved plan file runs that schedule instead of planning.
    ``max_plans``: plans (one per input signature) kept at once; the least recently used one is
    dropped, its threads stopped and its buffers freed, when a new signature needs room.
    ``chunk_ops=False``: never run a module on slices of its input (by default, a budget below
    the minimum splits the modules that keep their rows apart, e.g. MLP blocks: passes/chunking.py).
    ``fuse=True``: the compute between scheduling points runs as regions compiled by Inductor
    (passes/fusion.py), each kept within the budget; off by default (compiling takes seconds
    per distinct region on a CPU, once per process).
    ``kernels``: RMSNorm and rotary-embedding chains found in the graph run as memsched's kernel
    ops (frontend/kernel_patterns.py): one Triton kernel each on CUDA, and a training step saves
    x and 1/rms for a norm's backward, not its normalized values. "auto" (default): where they
    run Triton (CUDA; or TRITON_INTERPRET=1) and ``fuse`` is off (Inductor fuses the chains with
    their neighbours itself); True: also elsewhere, where they run the same
    PyTorch ops as the model, op for op (outputs and gradients bit for bit eager's); False: never.
    ``recompute_layers``: a training step may save only each layer's inputs and rebuild the rest
    of the layer in the backward, as per-block checkpointing does (passes/layer_recompute.py).
    "auto" (default): planned beside the other program when moving saved values costs more
    than running the layers' forward again could, and kept when it fits and simulates faster;
    True: kept whenever it fits; False: never.
    ``host_outputs=True`` (inference): the outputs are the caller's on the host, as CPU tensors,
    so each may be offloaded as soon as it is made rather than held on the device to the end:
    outputs larger than the budget together fit (a prompt's KV cache entries, embeddings of a
    large batch). The planner offloads only those the budget needs off the device.
    ``allow_over_capacity=True``: accept a budget larger than the device's memory (refused by
    default: the device could not honour it).
    ``hard_limit=True`` (CUDA): each call runs with the caching allocator limited to the budget
    plus what others held and a segment margin, so memory the plan does not count (an op's
    scratch) fails at once as BudgetExceededError (runtime/allocator_limit.py).
    ``compress_weights="int8"`` or ``"int4"``: weights homed on disk are kept there as group-wise
    integers (64 values per float32 scale) and widened when fetched: 4x / 8x less disk traffic
    than fp32, outputs no longer bit-exact (off by default; see runtime/quantize.py).
    ``compress_kv_cache="int8"`` or ``"int4"``: the same for a KV cache homed on disk (a
    generation's; each step's new slots are quantised alone when a slot holds whole groups).
    ``weights=``: a safetensors checkpoint (a file, a directory of shards or an index json) for a
    model built on the meta device: weights the plan homes on disk are read from the checkpoint's
    own files at each use, the others loaded once (``weights_prefix=``: what the model puts
    before the checkpoint's names).
    """
    return CompiledModule(model, budget, example_inputs=example_inputs, example_kwargs=example_kwargs,
                          device=device, offload_dir=offload_dir, hardware=hardware, train=train,
                          grad_outputs=grad_outputs, plan=plan, max_plans=max_plans, weights=weights, **options)


def plan(model, example_inputs=(), budget=None, *, hardware=None, train=False, example_kwargs=None,
         **options) -> Plan:
    """Plan only: no weights are read and no device is needed (the model may live on meta)."""
    if budget is None:
        raise ValueError("memsched.plan needs a budget")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    hw = get_hardware(hardware, _resolve_device(None))  # None: this machine's calibrated device
    args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    # a model on meta captures as the same model with weights does (what compile re-captures
    # to apply the plan): its tensors uninitialised on the CPU, never touched, meta inputs as zeros
    args, kwargs = _meta_as_zeros((args, kwargs))
    with _CAPTURE_LOCK, meta_as_empty(model), outside_inference_mode():  # export is not thread-safe
        result, _ = plan_model(model, args, kwargs, budget, hw, train=train, **options)
    return result
