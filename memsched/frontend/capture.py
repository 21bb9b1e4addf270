"""Capture: an nn.Module plus example inputs becomes an ATen-level fx graph.

We use torch.export (non-strict) so parameters and buffers arrive lifted to placeholders and
every node carries a FakeTensor in ``meta["val"]``; a model built on the meta device captures
the same way, which is what lets ``memsched.plan`` plan models that were never allocated.
"""
from __future__ import annotations

import builtins
import contextlib
import functools
import inspect
import linecache
import logging
import os
import random
import re
import sys
import threading
import traceback
from dataclasses import dataclass, field, is_dataclass

import torch
import torch.fx.config
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from ..errors import CaptureError, UnsupportedModelError, warn_at_caller
from ..ir.effects import is_impure, written_args, written_root
from ..ir.graph_module import make_lazy
from ..ir.kinds import PERSISTENT, Kind
from ..ir.tensors import tensor_leaves
from .autocast import autocast_state, inline_autocast_regions, make_casts_explicit
from .composites import expand_bool_attention_masks, expand_cross_entropy, expand_math_attention
from .constant_masks import MaskReads
from .counted_selections import CountedSelections, kept_guards
from .ctc_targets import static_ctc_loss
from .dense_only import reject_sparse
from .fake import eager_meta, share_storages_as_eager
from .hooks import warn_user_hooks
from .inline import drop_unused_subgraphs, inline_call
from .integer_reads import IntegerReads
from .input_values import read_input_values
from .kernel_patterns import select_kernels
from .masked_losses import whole_tensor_masked_losses
from .nested_encoders import padded_positions_as_eager
from .value_checks import value_checks_as_asserts

# the kind of each graph input, from the point of view of placement
_KIND = {
    InputKind.PARAMETER: Kind.WEIGHT,
    InputKind.BUFFER: Kind.BUFFER,
    InputKind.CONSTANT_TENSOR: Kind.CONSTANT,
    InputKind.USER_INPUT: Kind.INPUT,
}
# Ops that only check metadata at trace time; they produce nothing and are dropped.
_ASSERT_OPS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_async.msg,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


@dataclass
class Placeholder:
    name: str          # fx placeholder name
    kind: Kind         # WEIGHT / BUFFER / CONSTANT / INPUT
    target: str | None # state_dict key for weights, buffers and constants


@dataclass
class Captured:
    """The exported graph and what is needed to feed it and rebuild its outputs."""

    gm: torch.fx.GraphModule
    placeholders: list[Placeholder]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    # a stack grown from one traced layer (frontend/repeats.py): node name -> (block, layer,
    # position in the block) for the nodes of every layer made from that one, so placement can
    # decide for them once; a parameter's block is "P" and its position its name in the layer
    layer_roles: dict[str, tuple] = field(default_factory=dict)
    # values made from the inputs alone that sized a selection, decided a branch or an attention
    # mask's skip (input_values.py): the program serves calls where each is what it was
    value_guards: tuple = ()
    # input placeholders that stand for an embedding lookup done before the program runs, on the
    # table where it lives (frontend/row_gathers.py): name -> RowGather
    gathers: dict = field(default_factory=dict)
    # the modules, hooks and config settings it was traced with, checked at each call (module_tree.py)
    module_tree: object = None

    def flatten_inputs(self, args: tuple, kwargs: dict) -> list:
        from torch.export._tree_utils import reorder_kwargs

        flat, spec = pytree.tree_flatten((tuple(args), reorder_kwargs(dict(kwargs), self.in_spec)))
        if spec != self.in_spec:
            raise ValueError(
                f"inputs do not match the captured signature: expected {self.in_spec}, got {spec}"
            )
        return flat

    def unflatten_outputs(self, flat_outputs: list):
        return pytree.tree_unflatten(list(flat_outputs), self.out_spec)


def input_signature(args: tuple, kwargs: dict) -> tuple:
    """Hashable key of the inputs' shapes/dtypes/devices (non-tensor leaves by value). A tensor
    passed again (the same object, as in ``model(input_ids=ids, labels=ids)``) also names the
    leaf it repeats: export traces one value for them all, so a program captured so reads that
    one wherever the model reads any of them and must not run distinct tensors."""
    flat, spec = pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))
    key, first = [], {}
    for i, leaf in enumerate(flat):
        if isinstance(leaf, torch.Tensor):
            again = first.setdefault(id(leaf), i)
            key.append(("T", tuple(leaf.shape), str(leaf.dtype), leaf.device.type) + ((again,) if again != i else ()))
        else:
            key.append(("V", repr(leaf)))
    return (str(spec), tuple(key))


def capture(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
            kernels: bool = False, device_type: str = "cpu") -> Captured:
    """Export ``model(*args, **kwargs)`` to an ATen fx graph; CaptureError names what failed.
    ``kernels``: RMSNorm and rotary chains become memsched's kernel ops (kernel_patterns.py).
    ``device_type``: where the program will run (a CPU's attention on its math path is written
    out as its ops, composites.py)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"memsched compiles torch.nn.Module instances, got {type(model).__name__}")
    warn_fast_paths(model)
    warn_user_hooks(model)
    ep = export_model(model, args, kwargs)
    _reject_mutations(ep, model)
    gm = make_lazy(ep.graph_module)  # the passes below recompile it: once, when first run
    placeholders = [
        Placeholder(spec.arg.name, _state_kind(model, spec.target) or _KIND.get(spec.kind, Kind.INPUT), spec.target)
        for spec in ep.graph_signature.input_specs
    ]
    _inline_no_grad_regions(gm)
    _drop_constant_detaches(gm, {spec.arg.name for spec in ep.graph_signature.input_specs
                                 if spec.kind == InputKind.CONSTANT_TENSOR})
    _reject_hidden_mutations(gm, model, {p.name for p in placeholders if p.kind == Kind.BUFFER}, _input_names(ep))
    _merge_tied(gm, {p.name for p in placeholders if p.kind in PERSISTENT})
    _normalize(gm)   # (an eval-mode dropout is its input: before casts are read off values)
    _explicit_autocasts(gm)
    expand_cross_entropy(gm)   # its log_softmax becomes a value the planner counts
    expand_bool_attention_masks(gm)   # and attention's float mask
    if device_type == "cpu":
        expand_math_attention(gm)   # and its scores, where the CPU has no fused kernel for it
    if kernels:
        select_kernels(gm)
    share_storages_as_eager(gm.graph)
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in _KIND:
            raise UnsupportedModelError(f"unsupported graph input kind {spec.kind.name} ({spec.arg})")
    constants = {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
    return Captured(gm, placeholders, ep.call_spec.in_spec, ep.call_spec.out_spec, constants,
                    value_guards=ep.value_guards)


def _state_kind(model: torch.nn.Module, target: str | None) -> Kind | None:
    """A module may name what some of its buffers hold: ``memsched_state_kinds`` maps a
    state-dict prefix to a kind (a generation wrapper marks its KV cache this way)."""
    for prefix, kind in getattr(model, "memsched_state_kinds", {}).items():
        if target is not None and target.startswith(prefix):
            return Kind(kind)
    return None


@contextlib.contextmanager
def quiet_fake_tensor_log():
    """torch logs the whole traceback of an op failing on fake tensors (a wrong input shape)
    before raising it; the CaptureError raised here names that failure, once. Its shape solver
    also warns that it found no user code for a size made from data: traces record no stacks
    here (``_no_stack_traces``), and the CaptureError names the model's line from the exception."""
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL)
    shapes = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    no_user_code = _DropMessages("Unable to find user code")
    shapes.addFilter(no_user_code)
    try:
        yield
    finally:
        log.setLevel(level)
        shapes.removeFilter(no_user_code)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


@contextlib.contextmanager
def _no_stack_traces():
    """Tracing records each node's Python stack by default (a third of a small model's export
    time here); memsched never reads ``node.stack_trace``, and the hint for a data-dependent
    branch comes from the exception, not from the nodes."""
    fx_config = torch.fx.config
    before = getattr(fx_config, "do_not_emit_stack_traces", None)
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        if before is None:
            del fx_config.do_not_emit_stack_traces
        else:
            fx_config.do_not_emit_stack_traces = before


@contextlib.contextmanager
def _no_partial_graph_dump():
    """When tracing fails, torch.export prints the partial graph (every node traced so far: a
    hundred lines for a one-layer model) to stderr before it raises. The CaptureError names the
    cause in one line; the graph stays on the exception (``partial_fx_graph``) for --debug."""
    import torch.export._trace as trace

    def quiet_print(*args, **kwargs):
        if not (kwargs.get("file") is sys.stderr and len(args) == 1 and "def forward" in str(args[0])):
            builtins.print(*args, **kwargs)

    trace.print = quiet_print   # a module global shadows the builtin in that module only
    try:
        yield
    finally:
        del trace.print


@contextlib.contextmanager
def _casts_that_change_nothing():
    """``module.to(dtype/device)`` that every tensor of the module already matches returns the
    module untouched, as it does in eager (Switch Transformers' and NLLB-MoE's routers cast their
    classifier to their own dtype on every call). Under a trace the parameters are FakeTensors,
    which ``Module._apply`` swaps rather than re-points even for a cast that changes nothing, and
    the swap fails. A cast that would change a tensor runs as torch runs it."""
    to = torch.nn.Module.to

    def unchanged_to(self, *args, **kwargs):
        try:
            device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        except (TypeError, RuntimeError):
            return to(self, *args, **kwargs)
        tensors = [*self.parameters(), *self.buffers()]
        if memory_format is None and tensors and all(
                (device is None or t.device == device)
                and (dtype is None or t.dtype == dtype or not (t.is_floating_point() or t.is_complex()))
                for t in tensors):
            return self
        return to(self, *args, **kwargs)

    torch.nn.Module.to = unchanged_to
    try:
        yield
    finally:
        torch.nn.Module.to = to


def export_model(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None) -> ExportedProgram:
    """torch.export (non-strict); CaptureError names the model and the cause."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"memsched compiles torch.nn.Module instances, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):   # torch.export takes no TorchScript
        raise UnsupportedModelError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script or torch.jit.trace), which "
            "torch.export cannot trace: give memsched the Python module it was made from")
    _reject_opaque_objects(model)
    register_output_types(model)
    try:
        ep, values = _export(model, args, kwargs, ones_mask=None)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # export raises many types; we re-raise one, naming the cause
        shape = _absent_mask_shape(model, args, kwargs)
        if shape is None:
            raise _capture_error(model, exc) from exc
        try:   # a model that makes its mask of ones in eager only (see _absent_mask_shape)
            ep, values = _export(model, args, kwargs, ones_mask=shape)
        except Exception as again:   # what stops it further on (the retry got past the mask)
            if type(again) is type(exc) and _first_line(again) == _first_line(exc):
                raise _capture_error(model, exc) from exc   # the same stop: the mask was not the cause
            raise _capture_error(model, again, " (captured with a mask of ones, as the model makes when "
                                 "given none: without it the capture failed on the missing mask)") from again
    # a size made from data that only a check read (taken as an assert: value_checks.py) goes with it
    drop_asserts(ep.graph_module.graph)
    ep.graph_module.graph.eliminate_dead_code(is_impure_node=is_impure)
    ep.graph_module.recompile()
    _reject_data_dependent_sizes(ep, model)
    reject_sparse(ep.graph_module.graph, model, _input_names(ep))
    _drop_self_copies(ep.graph_module)
    ep.value_guards = kept_guards(ep.graph_module.graph, values.guards)   # values of the inputs it is for
    return ep


def _reject_opaque_objects(model: torch.nn.Module) -> None:
    """Refuse, naming them, the TorchScript objects torch.export cannot trace (no
    ``__obj_flatten__``): the packed weights of torch.ao's quantized modules, whose capture
    otherwise fails deep inside torch.export on a missing field."""
    found = [(f"{name}.{attr}".lstrip("."), type(module), obj) for name, module in model.named_modules()
             for attr, obj in vars(module).items()
             if isinstance(obj, torch.ScriptObject) and not obj._has_method("__obj_flatten__")]
    if not found:
        return
    path, owner, obj = found[0]
    quantized = owner.__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
    raise UnsupportedModelError(
        f"{type(model).__name__} holds {len(found)} TorchScript object(s) torch.export cannot trace, first "
        f"{path} ({obj._type().qualified_name()} of {owner.__name__})"
        + (": the packed weights of torch.ao's quantized modules. memsched plans float models: give it the "
           "model as it was before quantization (compress_weights=8 or 4 keeps weights quantized while off the "
           "device, dequantized where they are used)" if quantized else
           ": give the class an __obj_flatten__ and a fake class "
           "(torch._library.fake_class_registry.register_fake_class), or keep the object out of the module"))


_INPUT_WORDS = {InputKind.USER_INPUT: "input", InputKind.PARAMETER: "parameter", InputKind.BUFFER: "buffer",
                InputKind.CONSTANT_TENSOR: "tensor attribute"}


def _input_names(ep: ExportedProgram) -> dict[str, str]:
    """Each graph input as the user knows it: ``input 'adj'``, ``buffer 'adj'``."""
    return {spec.arg.name: f"{_INPUT_WORDS.get(spec.kind, 'input')} {spec.target or spec.arg.name!r}"
            for spec in ep.graph_signature.input_specs}


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _capture_error(model: torch.nn.Module, exc: Exception, note: str = "") -> CaptureError:
    first = _first_line(exc)
    return CaptureError(f"could not capture {type(model).__name__} with torch.export: {type(exc).__name__}: "
                        f"{first}{_data_dependent_hint(exc) or _raised_in_model(exc)}{note}{_packed_hint(exc)}"
                        f"{_sized_by_data_hint(exc)}{_traced_values_hint(first)}")


def _traced_values_hint(message: str) -> str:
    """A model's own message formats tensors it was handed: under a trace they print as
    ``FakeTensor(..., size=...)``, which says nothing of the values it checked."""
    if "FakeTensor(" not in message:
        return ""
    return (". (FakeTensor(...) in the message is a tensor the trace followed without computing it; "
            "calling the model eagerly with these inputs shows the values)")


def _sized_by_data_hint(exc: BaseException) -> str:
    """torch names only the op whose output size is made from its inputs' values."""
    if type(exc).__name__ != "DynamicOutputShapeException":
        return ""
    return (". That op's output has a size made from its inputs' values (nonzero from a mask; CTC's loss "
            "on targets in one row with lengths as tensors, unless the model made that row with "
            "masked_select and the lengths as that mask's sum(-1): pad the targets to one row per sample "
            "instead): memsched plans one static program per input signature and needs every size before "
            "the model runs")


def _packed_hint(exc: BaseException) -> str:
    """A recurrent layer handed a PackedSequence (``pack_padded_sequence``) fails somewhere
    inside torch, on a size that is a tensor: say what it is about."""
    tb = exc.__traceback__
    while tb is not None:
        if any(isinstance(v, torch.nn.utils.rnn.PackedSequence) for v in tb.tb_frame.f_locals.values()):
            return (". A recurrent layer was handed a PackedSequence: its batch sizes are the lengths' "
                    "values, data a static program cannot size itself by; run it on the padded batch "
                    "(and mask the padded steps' outputs) instead")
        tb = tb.tb_next
    return ""


def _export(model: torch.nn.Module, args: tuple, kwargs: dict | None, ones_mask):
    with _no_host_random_draws(model), eager_meta(), read_input_values(model, args, kwargs) as values, \
            eager_attention_masks(args, kwargs, values), _eager_algorithms(model), \
            value_checks_as_asserts(values.truth), IntegerReads(values), CountedSelections(values), static_ctc_loss(), \
            whole_tensor_masked_losses(), \
            quiet_fake_tensor_log(), _no_stack_traces(), _no_partial_graph_dump(), _casts_that_change_nothing(), \
            _dataclass_outputs_seen_into(model), _inference_mode_for_inference_tensors(model), \
            _given_mask_of_ones(model, ones_mask), padded_positions_as_eager(model):
        return torch.export.export(model, tuple(args), dict(kwargs or {}), strict=False), values


def _host_random_states() -> dict:
    states = {"Python's random": random.getstate()}
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        states["NumPy's global random generator"] = numpy.random.get_state(legacy=False)
    return states


def _same_state(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if hasattr(a, "tolist") and hasattr(b, "tolist"):   # a NumPy array
        return a.tolist() == b.tolist()
    return a == b


@contextlib.contextmanager
def _no_host_random_draws(model: torch.nn.Module):
    """Refuse a forward that draws from Python's or NumPy's random generator while it is traced
    (the trace would keep its draws as constants, repeated at every call, where eager draws anew:
    SpecAugment's masks in Wav2Vec2-style models in training); either way the generators are
    left as they were, so a capture draws nothing of the caller's. (Only a generator that moved is
    set back: another thread drawing from it meanwhile would be refused too, and set back.)"""
    before = _host_random_states()
    drew = []
    try:
        yield
    finally:
        after = _host_random_states()
        drew = [name for name in before if not _same_state(before[name], after.get(name))]
        if "Python's random" in drew:
            random.setstate(before["Python's random"])
        if "NumPy's global random generator" in drew:
            sys.modules["numpy"].random.set_state(before["NumPy's global random generator"])
    if drew:
        raise UnsupportedModelError(
            f"{type(model).__name__}'s forward draws from {' and '.join(drew)} while it is traced: the "
            "captured program would repeat those draws as constants at every call, where eager draws anew "
            "(e.g. SpecAugment's masks in Wav2Vec2-style models in training: draw the time masks yourself each "
            "step and pass them, mask_time_indices=torch.from_numpy(transformers.models.wav2vec2."
            "modeling_wav2vec2._compute_mask_indices((batch, frames), mask_time_prob, mask_time_length, "
            "min_masks=2)), with mask_feature_prob 0; or set the config's mask_time_prob and mask_feature_prob "
            "to 0). memsched follows torch's own random ops.")


def _absent_mask_shape(model: torch.nn.Module, args: tuple, kwargs: dict | None):
    """(batch, length) of the attention mask a call leaves out, when the model takes one by
    that name and is handed ``input_ids`` or ``inputs_embeds`` to size it by; else None.

    Some transformers models (LongT5, SwitchTransformers) make a mask of ones when given none,
    but only outside compilers: under torch.export they index the None. A mask of ones means
    "no padding", so such a model is captured again with one made inside the program (a
    constant of the call's shape, not an input): the same computation eager runs."""
    if getattr(model, "config", None) is None:   # transformers' models only: others may read None otherwise
        return None
    try:
        bound = inspect.signature(model.forward).bind_partial(*args, **(kwargs or {})).arguments
    except (TypeError, ValueError):
        return None
    if "attention_mask" in bound or "attention_mask" not in inspect.signature(model.forward).parameters:
        return None
    for name in ("input_ids", "inputs_embeds"):
        t = bound.get(name)
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return tuple(t.shape[:2]), t.device
    return None


@contextlib.contextmanager
def _given_mask_of_ones(model: torch.nn.Module, shape_device):
    """While the model is traced, its forward is handed a mask of ones of ``(shape, device)``
    where the call gives none (nothing when None)."""
    if shape_device is None:
        yield
        return
    shape, device = shape_device

    def hook(module, args, kwargs):
        return args, {**kwargs, "attention_mask": torch.ones(shape, dtype=torch.long, device=device)}

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _reject_data_dependent_sizes(ep: ExportedProgram, model: torch.nn.Module) -> None:
    """A value whose size depends on the data (``nonzero``, a mask's selection, an ``item()``
    turned into a size) traces with a symbolic size: the planner prices and places bytes, so it
    needs every size before the model runs. Refused here, naming the first op that makes one."""
    for n in ep.graph_module.graph.nodes:
        for t in tensor_leaves(n.meta.get("val")):
            if not all(isinstance(d, int) for d in (*t.shape, *t.stride())):
                shape = ", ".join(str(d) for d in t.shape)
                raise UnsupportedModelError(
                    f"{type(model).__name__} makes a tensor whose size depends on the data it is given "
                    f"({n.target} -> [{shape}]): memsched plans one static program per input signature "
                    f"and needs every size before the model runs{_selection_hint(n)}")


_SELECTIONS = {"aten.index.Tensor", "aten.masked_select.default", "aten.nonzero.default", "aten.argwhere.default"}


def _selection_hint(node) -> str:
    """Picking elements by a boolean mask (``x[mask]``) is the usual cause: say what keeps sizes."""
    if str(node.target) not in _SELECTIONS:
        return ""
    return (". A boolean mask's selection (x[mask], masked_select, nonzero) is the usual cause: a mask made "
            "from the call's inputs alone is traced at its count, but this one reads the model's weights, its "
            "activations or a random draw. Keep the whole tensor and mask it instead (torch.where(mask, x, 0); "
            "a loss's ignore_index, e.g. cross_entropy(logits, labels.masked_fill(~mask, -100)); "
            "reduction='none' times the mask)")


_RAISED_AT = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in [\w<>]+\s*\n\s*(.+)')


# the shorter form, a path relative to the import root: "Caused by: (pkg/mod.py:12 in forward)"
_CAUSED_BY = re.compile(r"Caused by: \((\S+?\.py):(\d+) in \w+\)")


def _source_line(path: str, line: int) -> str:
    """The line of source a traceback names, found on the import path when it is relative."""
    for root in ([""] if os.path.isabs(path) else sys.path):
        full = os.path.join(root, path)
        if os.path.isfile(full):
            return linecache.getline(full, line).strip()
    return ""


def _data_dependent_hint(exc: Exception) -> str:
    """For a branch on a tensor's value: where the model takes it, and what to do about it."""
    if type(exc).__name__ not in ("GuardOnDataDependentSymNode", "UserError") or "data-dependent" not in str(exc):
        return ""
    return _data_dependent_hint_at(_branch_site(exc))


def _branch_site(exc: Exception) -> str:
    """The model's line taking the branch: the frame that asked for the value's truth
    (value_checks.py notes it), else the one torch names, else the innermost model frame."""
    asked = getattr(exc, "asked_at", None)
    if asked is not None and _in_model_code(asked[0]):
        return _site(*asked)
    at = _RAISED_AT.search(str(exc))
    if at and _in_model_code(at.group(1)):
        return f" at {os.path.basename(at.group(1))}:{at.group(2)} (`{at.group(3).strip()}`)"
    caused = _CAUSED_BY.search(str(exc))   # a guard on a size made from data (nonzero, a mask's count)
    if caused and not _tracer_file(caused.group(1)):
        return _site(caused.group(1), int(caused.group(2)))
    frame = _model_frame(exc)
    return _site(frame.filename, frame.lineno) if frame is not None else ""


def _site(path: str, line: int) -> str:
    code = _source_line(path, line)
    return f" at {os.path.basename(path)}:{line}" + (f" (`{code}`)" if code else "")


def _data_dependent_hint_at(where: str) -> str:
    if "layerdrop" in where.lower():   # transformers' LayerDrop: a random draw per layer and step
        return (f". The model branches on a random draw{where}: LayerDrop skips each layer at random in "
                "training, a program whose layers change every step, which memsched cannot plan statically. "
                "Set its probabilities to 0 before compiling: `layerdrop`, `encoder_layerdrop` and "
                "`decoder_layerdrop` in the config (`model.config.layerdrop = 0.0`, read at every call), "
                "and on the modules that copied them when built: `[setattr(m, 'layerdrop', 0.0) for m in "
                "model.modules() if hasattr(m, 'layerdrop')]`")
    return (f". The model branches on a tensor's value{where}: memsched plans one static program per "
            "input signature, so it cannot follow control flow that depends on data made inside the model "
            "(from its weights, activations or random draws; a value the call's inputs alone make decides "
            "the branch per call, a program per answer). Write the branch "
            "with torch.where or torch.cond, or turn off what takes it (random layer dropping and "
            "masking in training: LayerDrop, SpecAugment; call model.eval() for inference)")


# frames of these packages are the tracer's, not the model's: an error is shown where the
# model's own code (its modeling file, or a library it calls) last ran before it was raised
_TRACER_DIRS = tuple(d + os.sep for d in (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__))))
_STDLIB_DIR = os.path.dirname(contextlib.__file__) + os.sep


def _tracer_file(relative: str) -> bool:
    """Is torch's short form of a location ("Caused by: (_decomp/decompositions.py:12 ...)", relative
    to torch's folder or to the import root) a file of torch's or memsched's?"""
    return relative.split("/")[0] in ("torch", "memsched") or any(os.path.isfile(d + relative) for d in _TRACER_DIRS)


def _in_model_code(path: str) -> bool:
    if path.startswith(_TRACER_DIRS) or path.startswith("<"):
        return False
    # the standard library's frames (contextlib, functools) are not the model's; packages
    # installed beneath it (a Python without a virtual environment) are
    return not path.startswith(_STDLIB_DIR) or any(d in path for d in ("site-packages", "dist-packages"))


def _raised_in_model(exc: BaseException) -> str:
    """Where in the model's code a failure that is not a branch on data was raised: the innermost
    frame outside torch, memsched and the standard library, with its line of source. Tracing
    runs the model's Python as eager does, so that line is what the model does differently under
    a trace (reads an input it was not given, changes its own modules, calls something a trace
    cannot follow)."""
    frame = _model_frame(exc)
    if frame is None:
        return ""
    code = (frame.line or "").strip()
    return f" (raised at {os.path.basename(frame.filename)}:{frame.lineno} in {frame.name}" + \
        (f": `{code}`)" if code else ")")


def _model_frame(exc: BaseException) -> traceback.FrameSummary | None:
    frame = None
    seen = set()
    while exc is not None and id(exc) not in seen:   # the raised error, then what it was raised from
        seen.add(id(exc))
        for f in traceback.extract_tb(exc.__traceback__):
            if _in_model_code(f.filename):
                frame = f
        exc = exc.__cause__ or exc.__context__
    return frame


class FastPathWarning(UserWarning):
    """Eager PyTorch runs part of this model on a fused fast path the captured program cannot
    take: outputs differ from eager's."""


def warn_fast_paths(model: torch.nn.Module) -> None:
    """Warn, naming the modules, when eager PyTorch would run ``nn.TransformerEncoderLayer`` /
    ``nn.MultiheadAttention`` on their fast path (eval mode, no gradient needed): fused kernels,
    and under ``nn.TransformerEncoder`` with a ``src_key_padding_mask`` a nested tensor whose
    padded positions come back as 0 (which the trace reproduces: frontend/nested_encoders.py).
    Tracing (FakeTensors) always takes the standard path, so the compiled program's outputs
    differ from eager's in the last bits. Turning the fast path off makes eager take the
    standard path too."""
    if not torch.backends.mha.get_fastpath_enabled():
        return
    nn = torch.nn
    grad = torch.is_grad_enabled()
    fast, nested = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer) and _layer_fast_path(m, grad):
            fast.append(name or "the model itself")
        elif isinstance(m, nn.MultiheadAttention) and _attention_fast_path(m, grad) and not any(
                isinstance(p, nn.TransformerEncoderLayer) and p.self_attn is m for p in model.modules()):
            fast.append(name or "the model itself")
        elif isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and not m.training:
            nested.append(name or "the model itself")
    if not fast and not nested:
        return
    shown = ", ".join((nested + fast)[:4]) + (f" and {len(nested + fast) - 4} more" if len(nested + fast) > 4 else "")
    padded = (f" ({', '.join(nested)} also turns its input into a nested tensor when given a "
              "src_key_padding_mask: the compiled program returns 0 at padded positions as eager does.)"
              if nested else "")
    warn_at_caller(
        f"memsched: {type(model).__name__} ({shown}) runs on PyTorch's transformer fast path in eager "
        f"mode here (eval mode, no gradient: fused kernels), which a captured program cannot take; "
        f"the compiled module takes the standard path, so its outputs differ from eager's in the last "
        f"bits.{padded} For identical outputs, turn the fast path off before calling either: "
        f"torch.backends.mha.set_fastpath_enabled(False).", FastPathWarning)


def _no_grad_needed(m: torch.nn.Module, grad: bool) -> bool:
    return not (grad and any(p.requires_grad for p in m.parameters()))


def _layer_fast_path(m, grad: bool) -> bool:
    """The static part of ``TransformerEncoderLayer.forward``'s fast-path test."""
    attn = m.self_attn
    return (not m.training and attn.batch_first and attn.in_proj_bias is not None and attn._qkv_same_embed_dim
            and getattr(m, "activation_relu_or_gelu", False) and m.norm1.eps == m.norm2.eps
            and attn.num_heads % 2 == 0 and _no_grad_needed(m, grad))


def _attention_fast_path(m, grad: bool) -> bool:
    """The static part of ``MultiheadAttention.forward``'s fast-path test (it also needs
    batched self-attention inputs, which eager checks per call)."""
    return (not m.training and m.batch_first and m._qkv_same_embed_dim and m.in_proj_bias is not None
            and m.bias_k is None and not m.add_zero_attn and _no_grad_needed(m, grad))


def register_output_types(model: torch.nn.Module) -> None:
    """Containers a model returns that torch.export must see into: transformers' caches (a
    ``DynamicCache`` in ``past_key_values`` whenever ``use_cache`` is on, the default). They are
    registered as pytree nodes, as transformers' own exporter does, so the program returns their
    tensors and the compiled module hands back the same cache object the model returns. Only
    when the process has imported transformers: memsched does not depend on it."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:  # an older transformers: its executorch helper knows DynamicCache
        try:
            from transformers.integrations.executorch import register_dynamic_cache_export_support
        except ImportError:
            return
        register_dynamic_cache_export_support()
        return
    register_cache_pytrees_for_model(model)


@contextlib.contextmanager
def _dataclass_outputs_seen_into(model: torch.nn.Module):
    """A model may return its own dataclasses (``@dataclass class Out: logits: Tensor``), which
    torch.export refuses as outputs it cannot see into. A hook on the model registers each one
    in the output that pytree does not know, as its error tells the user to do
    (``torch.export.register_dataclass``), before export flattens the output: the program
    returns their fields and the compiled module hands back an instance of the same class."""
    def register(module, inputs, output):
        pending = [output]
        while pending:
            for leaf in pytree.tree_leaves(pending.pop(), is_leaf=_unknown_dataclass):
                if _unknown_dataclass(leaf):
                    try:
                        torch.export.register_dataclass(type(leaf))
                    except (TypeError, ValueError):  # (e.g. a field left out of __init__): export says why
                        continue
                    pending.append(leaf)

    handle = model.register_forward_hook(register)
    try:
        yield
    finally:
        handle.remove()


def _inference_mode_for_inference_tensors(model: torch.nn.Module):
    """A model built under ``torch.inference_mode()`` holds inference tensors, which torch.export
    can only trace in that mode (it marks the traced parameters as requiring grad)."""
    inference = any(t.is_inference() for t in (*model.parameters(), *model.buffers()))
    return torch.inference_mode() if inference else contextlib.nullcontext()


def _unknown_dataclass(x) -> bool:
    return is_dataclass(x) and not isinstance(x, type) and type(x) not in pytree.SUPPORTED_NODES


@contextlib.contextmanager
def eager_attention_masks(args: tuple = (), kwargs: dict | None = None, values=None):
    """transformers builds no attention mask when none is given and attention is plainly causal
    or bidirectional (SDPA's ``is_causal`` path, or its native grouped-query attention), except
    under torch.export, where it materialises one so an exported graph stays right for masks
    given later. memsched captures per input signature, so it lets transformers decide as in
    eager: the captured program then runs eager's kernels, whose sums (grouped-query key/value
    gradients) are ordered differently from the masked path's. A mask given, or one the model
    makes of ones, is decided as eager decides it too (constant_masks.py: the given mask's values
    at capture, read through ``values``, an input_values.InputValues, a guard of the program).
    Likewise with no cache and no mask transformers looks for sequences packed into one row in
    the position ids, a check it cannot make on traced
    values; when the caller passes no position ids (only ``input_ids`` or keywords without them),
    the model makes them, one sequence per row, and the check says "none", as in eager. Only
    when the process has imported transformers."""
    reads = MaskReads(values)
    masking = sys.modules.get("transformers.masking_utils")
    if masking is None or not callable(getattr(masking, "is_torchdynamo_exporting", None)):
        yield
        return
    answers = {"is_torchdynamo_exporting": lambda *_: False}
    own_positions = len(args) <= 1 and "position_ids" not in (kwargs or {})
    if own_positions and callable(getattr(masking, "find_packed_sequence_indices", None)):
        answers["find_packed_sequence_indices"] = lambda *_: None
    for check in ("_ignore_causal_mask_sdpa", "_ignore_bidirectional_mask_sdpa"):
        if callable(getattr(masking, check, None)):
            answers[check] = reads.checked(getattr(masking, check))
    me = threading.get_ident()
    with _MASKING_LOCK:   # one capture patches at a time; other threads keep transformers' answers
        saved = {name: getattr(masking, name) for name in answers}
        for name, answer in answers.items():
            setattr(masking, name, _on_thread(me, answer, saved[name]))
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(masking, name, fn)


_MASKING_LOCK = threading.RLock()


@functools.cache
def _asks_exporting_alone(module_name: str) -> bool:
    """Does this module's code ask ``is_torchdynamo_exporting()`` and never
    ``is_torchdynamo_compiling()``?"""
    try:
        source = inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):
        return False
    return "is_torchdynamo_exporting()" in source and "is_torchdynamo_compiling()" not in source


# transformers modules whose only question of this kind picks an algorithm, not a check: SDPA
# packs a one-token query's grouped heads into the query length (a decode step given a padding
# mask) only when not compiling, and repeats the keys and values under a trace
_ALGORITHM_QUESTIONS = {"transformers.integrations.sdpa_attention": "is_torchdynamo_compiling"}


@contextlib.contextmanager
def _eager_algorithms(model: torch.nn.Module):
    """transformers code that asks whether it is traced only to pick an algorithm computes
    otherwise under torch.export than in eager, and the program's bits differ from eager's:
    models that ask only whether they are exported (never whether compiled) build the gated
    delta rule's triangular solve row by row for export targets (OLMo-hybrid, Qwen3-Next), and
    SDPA repeats grouped keys for a one-token query with a mask (``_ALGORITHM_QUESTIONS``).
    memsched runs the program on PyTorch itself, so there the question is answered as in eager,
    on the capturing thread. (Models that also ask whether they are compiled, Mamba's scan, take
    the exported path, which is eager's there.)"""
    names = {type(m).__module__ for m in model.modules()}
    asked = [(sys.modules[n], "is_torchdynamo_exporting") for n in sorted(names)
             if n.startswith("transformers.models.") and _asks_exporting_alone(n)]
    asked += [(sys.modules[n], q) for n, q in _ALGORITHM_QUESTIONS.items() if n in sys.modules]
    asked = [(mod, q) for mod, q in asked if callable(getattr(mod, q, None))]
    if not asked:
        yield
        return
    me = threading.get_ident()
    with _MASKING_LOCK:
        saved = [(mod, q, getattr(mod, q)) for mod, q in asked]
        for mod, q, ask in saved:
            setattr(mod, q, _on_thread(me, lambda *_: False, ask))
        try:
            yield
        finally:
            for mod, q, ask in saved:
                setattr(mod, q, ask)


def _on_thread(thread: int, here, elsewhere):
    return lambda *a, **k: here(*a, **k) if threading.get_ident() == thread else elsewhere(*a, **k)


def _reject_mutations(ep: ExportedProgram, model: torch.nn.Module) -> None:
    sig = ep.graph_signature
    if sig.buffers_to_mutate:
        names = ", ".join(sorted(set(sig.buffers_to_mutate.values()))[:4])
        hint = " (is the model in training mode? call model.eval())" if model.training else ""
        raise UnsupportedModelError(
            f"forward mutates buffers ({names}); memsched inference plans need a forward "
            f"without side effects{hint}"
        )
    if getattr(sig, "user_inputs_to_mutate", None):
        raise UnsupportedModelError("forward mutates its inputs in place; memsched cannot plan that yet")


def _inline_no_grad_regions(gm: torch.fx.GraphModule) -> None:
    """Inline ``torch.no_grad()`` regions (a higher-order op around a subgraph, e.g. rotary
    embeddings): memsched runs inference under no_grad anyway, so the wrapper only costs a
    call per region, and hides the region's tensors from the planner."""
    while True:   # outermost first: a region inside one comes up with its copy
        node = next((n for n in gm.graph.nodes if n.op == "call_function"
                     and type(n.target).__name__ == "WrapWithSetGradEnabled" and n.args[0] is False
                     and isinstance(n.args[1], torch.fx.Node)), None)
        if node is None:
            break
        inline_call(gm, node, node.args[1], node.args[2:])
    drop_unused_subgraphs(gm)


def _explicit_autocasts(gm: torch.fx.GraphModule) -> None:
    """Under torch.autocast (the caller's, or one the model opens) the casts it makes become
    values of the program (autocast.py), before composites are written out as their ops (a
    cross-entropy autocast runs in float32 is one op here). They are written out on values laid
    out as eager lays them out (a ``to`` that changes nothing is its input)."""
    if not autocast_state() and not any(type(n.target).__name__ == "WrapWithAutocast" for n in gm.graph.nodes):
        return
    share_storages_as_eager(gm.graph)
    with quiet_fake_tensor_log():   # ops run again on their values to see the casts: some fail without them
        make_casts_explicit(gm)
        inline_autocast_regions(gm)


def _drop_constant_detaches(gm: torch.fx.GraphModule, constants: set[str]) -> None:
    """``detach_`` of a constant the module makes in its forward changes autograd's view of it,
    not its data, and no gradient reaches a constant: the call goes, its readers read the
    constant. (Export records one for each of transformers' empty cache layers when the model
    is on meta; taken for a write into a graph input, it made such models unplannable.)"""
    for node in list(gm.graph.nodes):
        if node.target is torch.ops.aten.detach_.default and getattr(node.args[0], "name", None) in constants:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


_RENORM = (
    "{model} has an nn.Embedding with max_norm, which renormalises the rows it looks up in place in its "
    "weight at every call; memsched plans inference without side effects on weights. Renormalise the "
    "whole table once and look up without it: under torch.no_grad(), torch.embedding_renorm_(emb.weight, "
    "torch.arange(emb.num_embeddings), emb.max_norm, emb.norm_type), then emb.max_norm = None: eager's "
    "outputs (to the last bit at the first call; eager renormalises the rows it looks up again at every "
    "call, which can move a row by its last bit)")


def _reject_hidden_mutations(gm: torch.fx.GraphModule, model: torch.nn.Module, buffers: set[str],
                             names: dict[str, str]) -> None:
    """In-place writes export leaves in the graph (in-place ops; batch norm in training mode
    updating its running statistics) into a graph input or weight, or a view of one, are
    refused. A model buffer written in place (a step counter, a static KV cache filled slot by
    slot, the statistics of batch norm in a model in training mode called under no_grad) is
    pinned on the device by the planner (analysis: a written persistent storage), and copied
    back to the model after the call when the program wrote a copy of it (Executor._write_back)."""
    for node in gm.graph.nodes:
        for value in written_args(node):
            root = written_root(value)
            if root.op == "placeholder" and root.name not in buffers:
                if node.target == torch.ops.aten.embedding_renorm_.default:
                    raise UnsupportedModelError(_RENORM.format(model=type(model).__name__))
                raise UnsupportedModelError(
                    f"{type(model).__name__}'s forward writes in place into {names.get(root.name, root.name)} "
                    f"({node.target}); memsched plans inference forwards without side effects on the inputs "
                    "and weights (write into a copy: `y = x + 1`, not `x.add_(1)`)")


def _merge_tied(gm: torch.fx.GraphModule, persistent: set[str]) -> None:
    """Tied weights (one tensor under two names) become one placeholder, so one home serves
    both; the duplicate stays in the signature, unused."""
    from torch.multiprocessing.reductions import StorageWeakRef

    seen: dict = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.name not in persistent:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        key = (StorageWeakRef(val.untyped_storage()), tuple(val.shape), tuple(val.stride()),
               val.storage_offset(), val.dtype)
        if key in seen:
            node.replace_all_uses_with(seen[key])
        else:
            seen[key] = node


def keep_random_state():
    """A context that leaves the caller's random state as it found it. A training capture draws
    from it, and a model with random ops (drop-path's ``torch.rand``) would then draw other
    numbers than eager at the call that planned."""
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=cuda)


def _drop_self_copies(gm: torch.fx.GraphModule) -> None:
    """``self.steps += 1`` on a buffer exports as ``add_(b_steps, 1)`` followed by
    ``copy_(b_steps, add_)``: the setattr recorded as a copy of the buffer onto itself. It
    changes nothing but bumps the buffer's version, so a training step whose backward reads
    the updated buffer (``linear(x) * self.steps``) failed autograd's check where eager's passes.
    Such copies, of a value an in-place op wrote into the destination itself, are erased."""
    graph = gm.graph
    erased = False
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.copy_.default and not node.users \
                and _written_into(node.args[1]) is node.args[0]:
            graph.erase_node(node)
            erased = True
    if erased:
        gm.recompile()


def _written_into(value):
    """The tensor an in-place op (or a chain of them) wrote ``value`` into, else ``value``."""
    while isinstance(value, torch.fx.Node) and value.op == "call_function" \
            and isinstance(value.target, torch._ops.OpOverload) and value.args:
        schema = value.target._schema
        out, first = schema.returns[0].alias_info if schema.returns else None, schema.arguments[0].alias_info
        if not (out is not None and first is not None and first.is_write and out.before_set == first.before_set):
            break
        value = value.args[0]
    return value


def drop_asserts(graph: torch.fx.Graph) -> None:
    """Erase the asserts torch.export leaves in a graph: on metadata (checked when traced) and on
    data (a model's ``assert lengths.max().item() <= slen``, an ``item`` and a comparison feeding
    ``_assert_scalar``: the caller's dead-code pass then drops the ``item``, which a trace on
    FakeTensors could not run)."""
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERT_OPS and not node.users:
            graph.erase_node(node)


def _normalize(gm: torch.fx.GraphModule) -> None:
    """Make eval-mode dropout the identity it is (export_model dropped the asserts)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.dropout.default and len(node.args) >= 3 and node.args[2] is False:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    graph.eliminate_dead_code(is_impure_node=is_impure)
    graph.lint()
    gm.recompile()
