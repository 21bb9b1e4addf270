"""Joint capture: forward and backward of one training step as a single fx graph.

The forward is exported with torch.export (as for inference), then the exported ATen graph is
run under ``make_fx`` with the parameters requiring grad and ``torch.autograd.grad`` called on
its differentiable outputs. Autograd's backward ops are traced into the same graph, right
after the forward, so saved activations are ordinary values read by backward nodes and their
lifetimes are explicit. Tracing runs on FakeTensors: no memory is used, and meta models work.

Where the forward ends, a ``boundary`` node is inserted: it reads the forward outputs and
yields the gradients of the outputs (the tangents), which backward nodes read through
getitems. The program's outputs are the forward outputs (held by the caller until the step
ends), one gradient per trained parameter, then one per user input that requires grad (a
module compiled inside a model trained around it: its input comes from layers autograd runs).
"""
from __future__ import annotations

import contextlib
import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.proxy_tensor import get_innermost_proxy_mode, make_fx

from ..errors import CaptureError, UnsupportedModelError, warn_at_caller
from ..ir import ops
from ..ir.effects import is_impure
from ..ir.graph_module import make_lazy
from ..ir.kinds import Kind
from ..ir.meta import annotate
from ..kernels import attention  # noqa: F401  (registers torch.ops.memsched.scaled_dot_product_attention)
from .capture import _KIND, Captured, Placeholder, drop_asserts, export_model
from .dense_only import reject_sparse
from .fake import RNN_LAYER, eager_meta, share_storages_as_eager
from .functions import Functions, custom_applications
from .hooks import warn_user_hooks
from .inplace import accumulate_in_place
from .kernel_patterns import select_kernels
from .loss_head import chunk_loss_heads
from .mask_writes import static_mask_writes


@dataclass
class JointCaptured(Captured):
    """A captured training step. Outputs: ``n_outputs`` forward outputs (``n_mutations``
    buffer updates first, then the user's), one gradient per ``grad_targets`` entry, then one
    per ``grad_inputs`` entry."""

    n_outputs: int = 0
    n_mutations: int = 0
    mutation_targets: list[str] = field(default_factory=list)  # state keys of updated buffers
    grad_targets: list[str] = field(default_factory=list)      # state keys of trained parameters
    grad_inputs: list[int] = field(default_factory=list)       # flat user inputs that take a gradient
    diff_outputs: list[int] = field(default_factory=list)      # user outputs that take a gradient
    grad_capable: list[int] = field(default_factory=list)      # user outputs that depend on a parameter
    output_names: list[str] = field(default_factory=list)      # user outputs as the caller reaches them
    # per diff output, the strides its gradient was traced with (the output's own): the backward's
    # views were traced for that layout, so a gradient handed in otherwise is laid out so first
    tangent_strides: list[tuple] = field(default_factory=list)
    boundary: str = ""                                         # name of the boundary node
    # the exported forward it was traced from (module paths in its nodes' meta) and the names
    # of that graph's weight, buffer and constant inputs: what passes/chunking.py reads
    forward: tuple | None = None

    def forward_outputs(self, flat_outputs: list) -> list:
        return flat_outputs[self.n_mutations:self.n_outputs]

    def output_name(self, i: int) -> str:
        """User output ``i`` as the caller reaches it (``output.logits``)."""
        return self.output_names[i]


class CustomBackwardWarning(UserWarning):
    """The model applies an autograd.Function with its own backward that cannot be applied again
    in the captured step (frontend/functions.py): the captured backward is autograd's derivative
    of the ops of its forward, not the Function's formula."""


@contextlib.contextmanager
def _custom_backwards():
    """The names of the autograd.Functions with a backward of their own applied while the
    forward is exported (a set, filled as it runs): only then is it exported again with each
    application marked."""
    seen: set[str] = set()

    def note(cls, apply, args, kwargs):
        seen.add(cls.__qualname__)
        return apply(cls, *args, **kwargs)

    with custom_applications(note):
        yield seen


def _state(model: torch.nn.Module, ep) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    state.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return state


def capture_joint(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None,
                  grad_outputs: str = "auto", target: str = "cpu", loss_chunks: int = 0,
                  shared_loss_heads: bool = False, kernels: bool = False) -> JointCaptured:
    """Trace one training step of ``model(*args, **kwargs)``.

    ``grad_outputs``: "auto" expects gradients only for scalar outputs when there are any (a
    loss), else for every differentiable output; "all" for every differentiable output.
    ``target``: the device type the step will run on. The trace runs where the model's tensors
    are (usually the CPU), where scaled-dot-product attention lowers to CPU-only kernels
    (``_scaled_dot_product_flash_attention_for_cpu`` and its backward); for another target it is
    ``memsched::scaled_dot_product_attention`` where it has no mask or dropout (kernels/attention.py),
    else the math backend's ops: ops that exist on every device.
    ``loss_chunks``: when > 1, an LM head whose logits only feed a cross-entropy runs on that
    many slices of rows, forward and backward (frontend/loss_head.py): the full logits never exist.
    ``shared_loss_heads``: a head whose logits are returned too has its loss read them in slices
    of rows whatever ``loss_chunks`` (its sums then differ from eager's in the last bits).
    ``kernels``: RMSNorm and rotary chains run as memsched's kernel ops, forward and backward
    (kernel_patterns.py).
    """
    if grad_outputs not in ("auto", "all"):
        raise ValueError(f"grad_outputs must be 'auto' or 'all', got {grad_outputs!r}")
    kwargs = dict(kwargs or {})
    warn_user_hooks(model, train=True)
    with _custom_backwards() as custom:
        ep = export_model(model, args, kwargs)
    functions = Functions()
    if custom:   # exported again, each application of those Functions marked (frontend/functions.py)
        with functions.recording():
            ep = export_model(model, args, kwargs)
    if getattr(ep.graph_signature, "user_inputs_to_mutate", None):
        raise UnsupportedModelError("forward mutates its inputs in place; memsched cannot plan that yet")
    primals, placeholders, slot_of = _primals(model, ep, args, kwargs)
    trained, grad_inputs, inputs = _differentiated(model, placeholders, primals)
    out_specs = ep.graph_signature.output_specs
    n_mut = sum(1 for s in out_specs if s.kind == OutputKind.BUFFER_MUTATION)
    if any(s.kind not in (OutputKind.BUFFER_MUTATION, OutputKind.USER_OUTPUT) for s in out_specs):
        raise UnsupportedModelError("forward has outputs other than its results and buffer updates")
    # (an output that is no tensor, e.g. None or a number in a returned list, is a constant there)
    out_vals = [n.meta.get("val") if isinstance(n, torch.fx.Node) else n
                for n in ep.graph_module.graph.output_node().args[0]]
    user_vals = out_vals[n_mut:]
    floating = [i for i, v in enumerate(user_vals) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    not_losses = []   # floating outputs "auto" leaves undifferentiated: the step returns a scalar
    if grad_outputs == "auto" and any(user_vals[i].dim() == 0 for i in floating):
        not_losses = [i for i in floating if user_vals[i].dim() != 0]
        floating = [i for i in floating if user_vals[i].dim() == 0]
    # (export_model dropped the forward's asserts: an `item` feeding one cannot run on FakeTensors)
    if kernels:
        select_kernels(ep.graph_module, {sp.arg.name for sp in ep.graph_signature.input_specs
                                         if sp.kind == InputKind.PARAMETER})
    static_mask_writes(ep.graph_module)   # x[mask] = v: a backward of static sizes
    traced = _portable_random(chunk_loss_heads(ep.graph_module, loss_chunks, shared_loss_heads), target, primals)
    trace = _Trace(traced, slot_of, trained + grad_inputs, n_mut, floating, functions, not_losses,
                   _output_names(ep.call_spec.out_spec, len(user_vals)))
    with _portable_attention(target, primals):
        joint = make_lazy(trace.run(model, primals, user_vals))  # code made when first run
    reject_sparse(joint.graph, model, {}, backward=True)   # a sparse gradient (an embedding with sparse=True)
    if functions.inlined:
        warn_at_caller(CustomBackwardWarning(
            f"{type(model).__name__} applies torch.autograd.Function(s) with a backward of their own "
            f"({', '.join(sorted(functions.inlined))}) that read tensors they are not handed or return "
            "other values: the captured step differentiates the ops of their forward instead, so gradients "
            "through them can differ from eager's in the last bits"), CustomBackwardWarning)
    boundary = _partition(joint, placeholders, len(primals), len(out_vals), trace, floating)
    share_storages_as_eager(joint.graph)
    accumulate_in_place(joint, boundary)
    _keep_grad_mode(joint)
    # (an input's gradient is a value the step returns on the device, as a forward output)
    for node, i in zip(list(joint.graph.output_node().args[0])[len(out_vals):], trained):
        if isinstance(node, torch.fx.Node):
            annotate(node, kind=Kind.GRAD, grad_of=placeholders[i].target)
    constants = {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
    return JointCaptured(
        joint, placeholders, ep.call_spec.in_spec, ep.call_spec.out_spec, constants,
        value_guards=ep.value_guards, n_outputs=len(out_vals), n_mutations=n_mut, boundary=boundary.name,
        mutation_targets=[s.target for s in out_specs if s.kind == OutputKind.BUFFER_MUTATION],
        grad_targets=[placeholders[i].target for i in trained], grad_inputs=[inputs.index(i) for i in grad_inputs],
        diff_outputs=list(trace.diff), output_names=trace.output_names,
        grad_capable=list(trace.capable), tangent_strides=[tuple(user_vals[i].stride()) for i in trace.diff],
        forward=(ep.graph_module, {sp.arg.name for sp in ep.graph_signature.input_specs if sp.kind != InputKind.USER_INPUT}))


def _output_names(out_spec, n: int) -> list[str]:
    """The user outputs as a caller reaches them in what the forward returns (``output.a[0]``,
    ``output['loss']``; ``output`` for a lone tensor)."""
    tree = pytree.tree_unflatten(list(range(n)), out_spec)
    return [f"output{pytree.keystr(path)}" for path, _ in pytree.tree_flatten_with_path(tree)[0]]


def _differentiated(model, placeholders: list[Placeholder], primals: list):
    """The primals the step differentiates: trained parameters, then user inputs that require
    grad; and every user input's primal (their order is the flat inputs')."""
    trained = [i for i, (ph, v) in enumerate(zip(placeholders, primals))
               if ph.kind == Kind.WEIGHT and isinstance(v, torch.Tensor) and v.requires_grad]
    inputs = [i for i, ph in enumerate(placeholders) if ph.kind == Kind.INPUT]
    grad_inputs = [i for i in inputs if isinstance(primals[i], torch.Tensor) and primals[i].requires_grad]
    if not trained and not grad_inputs:
        raise ValueError(f"{type(model).__name__} has no parameter that requires grad and no input that "
                         "does: nothing to train")
    for i in grad_inputs:
        if not (primals[i].is_floating_point() or primals[i].is_complex()):
            raise UnsupportedModelError(f"input {placeholders[i].name} requires grad but is "
                                        f"{primals[i].dtype}: only floating-point inputs take gradients")
    return trained, grad_inputs, inputs


def _trace_device_type(primals: list) -> str:
    return next((p.device.type for p in primals if isinstance(p, torch.Tensor) and p.device.type != "meta"), "cpu")


def _portable_attention(target: str, primals: list):
    """The math backend of scaled-dot-product attention while tracing on one device type for
    another (a no-op when the trace runs on the target's device type)."""
    if _trace_device_type(primals) == target:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _fused_dropout(x, p, train):
    """Dropout as a GPU runs it: one ``native_dropout`` (a CPU's dropout is ``bernoulli_`` and a
    multiply, which on a GPU draws other numbers than eager's fused kernel)."""
    if train and 0 < p < 1 and x.numel():
        return torch.ops.aten.native_dropout.default(x, p, train)[0]
    return torch.ops.aten.dropout.default(x, p, train)


def _attention_with_fused_dropout(*args, **kwargs):
    """Attention whose dropout is on, lowered (math backend) by PyTorch's Python decompositions,
    whose dropout is ``native_dropout``, as eager's math backend runs it on a GPU."""
    from torch._dispatch.python import enable_python_dispatcher

    with enable_python_dispatcher():
        return torch.ops.aten.scaled_dot_product_attention.default(*args, **kwargs)


def _saves_no_probabilities(query, key, value, attn_mask, dropout_p) -> bool:
    """Whether ``memsched::scaled_dot_product_attention`` (kernels/attention.py) takes this call:
    no mask (its alignment rules differ by kernel) and no dropout (its draws: the math path's)."""
    return attn_mask is None and not dropout_p and all(t.is_floating_point() for t in (query, key, value))


def _gpu_fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None,
                         enable_gqa=False):
    """Attention as a GPU's eager runs it, forward and backward: PyTorch's attention with the
    kernel it picks there, saving its inputs only; its backward runs it again (the math path,
    which tracing on the CPU lowers it to, saved the [batch, heads, q, k] probabilities of every
    layer: several times a layer's activations at long contexts)."""
    if not _saves_no_probabilities(query, key, value, attn_mask, dropout_p):
        return torch.ops.aten.scaled_dot_product_attention.default(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if enable_gqa and key.size(-3) != query.size(-3):   # each key/value head serves a group of query heads
        repeat = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    return torch.ops.memsched.scaled_dot_product_attention(query, key, value, is_causal, scale)


def _attention_dropout_p(node: torch.fx.Node) -> float:
    return node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)


def _portable_random(gm: torch.fx.GraphModule, target: str, primals: list) -> torch.fx.GraphModule:
    """For a step traced on the CPU to run on a GPU: its dropouts traced as the GPU's eager
    runs them, so the compiled step draws the numbers eager draws from the same seed (attention
    dropout: as eager's math backend draws them), and its attentions without dropout or a mask
    as memsched's, which saves no probabilities. A copy; ``gm`` is left as it is."""
    if target == "cpu" or _trace_device_type(primals) != "cpu":
        return gm
    graph = copy.deepcopy(gm.graph)
    hits = [n for n in graph.nodes if n.op == "call_function" and n.target in (
        torch.ops.aten.dropout.default, torch.ops.aten.scaled_dot_product_attention.default)]
    if not hits:
        return gm
    for n in hits:
        if n.target is torch.ops.aten.dropout.default:
            n.target = _fused_dropout
        else:   # attention with dropout: the math path's draws; without: no probabilities saved
            n.target = _attention_with_fused_dropout if _attention_dropout_p(n) else _gpu_fused_attention
    return torch.fx.GraphModule(gm, graph)


def _primals(model, ep, args, kwargs) -> tuple[list, list[Placeholder], list[int]]:
    """One primal per distinct tensor (tied weights are one parameter with one gradient), its
    placeholder, and for each graph input the primal it reads."""
    state = _state(model, ep)
    user_inputs = iter(pytree.tree_leaves((tuple(args), _reorder(kwargs, ep))))
    primals, placeholders, slot_of, seen = [], [], [], {}
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in _KIND:
            raise UnsupportedModelError(f"unsupported graph input kind {spec.kind.name} ({spec.arg})")
        if spec.kind == InputKind.USER_INPUT:
            value, key = next(user_inputs), None
        else:
            value, key = state[spec.target], id(state[spec.target])
        if key is not None and key in seen:
            slot_of.append(seen[key])
            continue
        if key is not None:
            seen[key] = len(primals)
        slot_of.append(len(primals))
        primals.append(value)
        placeholders.append(Placeholder(spec.arg.name, _KIND[spec.kind], spec.target))
    return primals, placeholders, slot_of


class _Trace:
    """The step traced under ``make_fx`` on FakeTensors: forward, then ``autograd.grad``."""

    def __init__(self, gm, slot_of, trained, n_mut, floating, functions: Functions, not_losses: list[int],
                 output_names: list[str]):
        self.gm, self.slot_of, self.trained, self.n_mut, self.floating = gm, slot_of, trained, n_mut, floating
        self.not_losses = not_losses       # outputs left undifferentiated beside scalar ones
        self.output_names = output_names   # each user output as the caller reaches it: output['loss']
        self.functions = functions   # custom-backward Functions applied again, not inlined
        self.fwd_last = None
        self.diff: list[int] = []      # user outputs the backward starts from
        self.capable: list[int] = []   # user outputs that depend on a parameter

    def step(self, flat_primals, tangents):
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) if i in self.trained else p
                      for i, p in enumerate(flat_primals)]
            flat = [leaves[s] for s in self.slot_of]
            outs = self.functions.run(self.gm, *flat) if self.functions.applied else self.gm(*flat)
            self.fwd_last = list(get_innermost_proxy_mode().tracer.graph.nodes)[-1]
            user_outs = outs[self.n_mut:]
            self.capable = [i for i, o in enumerate(user_outs) if isinstance(o, torch.Tensor) and o.requires_grad]
            self.diff = [i for i in self.floating if user_outs[i].requires_grad]
            if not self.diff and any(user_outs[i].requires_grad for i in self.not_losses):
                scalars = ", ".join(self.output_names[i] for i in self.floating)
                raise UnsupportedModelError(
                    f"the step returns {scalars}, a scalar taken for the loss (grad_outputs='auto'), which "
                    "depends on no trained parameter, where its other outputs do: compile with "
                    "grad_outputs='all' to differentiate every floating-point output")
            if not self.diff:
                raise UnsupportedModelError("no output depends on a trained parameter: nothing to differentiate"
                                            + _through_inlined(self.functions.inlined))
            grads = torch.autograd.grad([user_outs[i] for i in self.diff], [leaves[i] for i in self.trained],
                                        [tangents[self.floating.index(i)] for i in self.diff], allow_unused=True)
        return list(outs), list(grads)

    def run(self, model, primals, user_vals) -> torch.fx.GraphModule:
        fake_mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)  # constants baked in
        with fake_mode:
            fake_primals = [fake_mode.from_tensor(p, static_shapes=True) if isinstance(p, torch.Tensor) else p
                            for p in primals]
            fake_tangents = [torch.empty_strided(user_vals[i].shape, user_vals[i].stride(), dtype=user_vals[i].dtype,
                                                 device=_device_of(fake_primals)) for i in self.floating]
        try:
            step = lambda flat_primals, tangents: self.step(flat_primals, tangents)  # noqa: E731  (make_fx counts a bound method's self)
            with eager_meta():
                return make_fx(step, tracing_mode="real", record_module_stack=False)(fake_primals, fake_tangents)
        except UnsupportedModelError:
            raise
        except Exception as exc:  # autograd tracing raises many types; name the cause
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CaptureError(f"could not trace the backward of {type(model).__name__}: "
                               f"{type(exc).__name__}: {first}") from exc


def _through_inlined(names: set[str]) -> str:
    """Why an output may seem not to depend on a parameter: a custom-backward Function that had
    to run as its exported ops computes without autograd inside (reversible layers do)."""
    if not names:
        return ""
    return (f" (the parameters may reach the outputs through {', '.join(sorted(names))}: torch.autograd."
            "Function(s) whose forward reads tensors it is not handed and computes without autograd, so "
            "memsched traces their ops and can neither apply their own backward nor differentiate those ops)")


def _partition(joint, placeholders, n_primals, n_outputs, trace: _Trace, floating) -> torch.fx.Node:
    """Name the placeholders, put the boundary where the forward ends (its tangents replace
    the tangent inputs), and clean the graph up."""
    graph = joint.graph
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    for node, ph in zip(phs, placeholders):   # named as export names them, targeted by that name as the
        node._rename(ph.name)                  # scheduled program is (a saved plan pairs by both)
        node.target = node.name
    tangent_nodes = phs[n_primals:]
    fwd_outputs = list(graph.output_node().args[0])[:n_outputs]
    boundary = _insert_boundary(graph, trace.fwd_last, fwd_outputs,
                                [tangent_nodes[floating.index(i)] for i in trace.diff])
    for t in tangent_nodes:
        graph.erase_node(t)
    graph.eliminate_dead_code(is_impure_node=is_impure)
    drop_asserts(graph)
    graph._codegen = torch.fx.graph.CodeGen()  # flat placeholders, as the executor feeds them
    graph.lint()
    joint.recompile()
    return boundary


def gradient_sources(captured: JointCaptured) -> list[int]:
    """Per grad target, a bit mask of the output gradients its gradient is computed from (bit
    k: the boundary's tangent k, the k-th of ``diff_outputs``); 0 where it reads none. Eager
    autograd leaves a parameter's gradient None when none of them was given."""
    graph = captured.gm.graph
    mask: dict[torch.fx.Node, int] = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target is operator.getitem and getattr(n.args[0], "target", None) \
                is ops.boundary:
            mask[n] = 1 << n.args[1]
            continue
        m = 0
        for a in n.all_input_nodes:
            m |= mask.get(a, 0)
        if m:
            mask[n] = m
    grads = list(graph.output_node().args[0])[captured.n_outputs:]
    return [mask.get(g, 0) if isinstance(g, torch.fx.Node) else 0 for g in grads]


def _reorder(kwargs: dict, ep) -> dict:
    from torch.export._tree_utils import reorder_kwargs

    return reorder_kwargs(kwargs, ep.call_spec.in_spec)


def _device_of(values) -> torch.device:
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def _insert_boundary(graph: torch.fx.Graph, fwd_last, fwd_outputs, tangents) -> torch.fx.Node:
    """A boundary node after the last forward node; backward reads the tangents from it."""
    with graph.inserting_after(fwd_last):
        args = tuple(fwd_outputs)
        boundary = graph.call_function(ops.boundary, args)
    boundary._rename("boundary")
    boundary.meta["val"] = tuple(t.meta["val"] for t in tangents)
    annotate(boundary, made_by="partition")
    last = boundary
    for i, t in enumerate(tangents):
        with graph.inserting_after(last):
            get = graph.call_function(operator.getitem, (boundary, i))
        get._rename(f"tangent_{i}")
        get.meta["val"] = t.meta["val"]
        annotate(get, kind=Kind.TANGENT)
        t.replace_all_uses_with(get)
        last = get
    return boundary


def _keep_grad_mode(gm: torch.fx.GraphModule) -> None:
    """Kernels that read grad mode run under the grad mode they were traced in. The step runs
    with grad mode off (nothing it computes is differentiated by autograd), but
    ``mkldnn_rnn_layer`` makes the workspace its backward reads only with grad mode on: each
    such call is wrapped, as export wraps a ``no_grad`` region, in
    ``wrap_with_set_grad_enabled(True, ...)`` (a higher-order op saved plans know). Never
    recomputed: the backward's re-run would have grad mode off again."""
    graph = gm.graph
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled
    layers = [n for n in graph.nodes if n.target is RNN_LAYER and _traced_with_workspace(n)]
    for i, node in enumerate(layers):
        sub = torch.fx.Graph()
        inputs = node.all_input_nodes
        env = {a: sub.placeholder(f"arg{j}") for j, a in enumerate(inputs)}
        sub.output(sub.call_function(RNN_LAYER, torch.fx.map_arg(node.args, env.get),
                                     torch.fx.map_arg(node.kwargs, env.get)))
        name = f"grad_mode_region_{i}"
        gm.add_submodule(name, torch.fx.GraphModule(torch.nn.Module(), sub, class_name="GradModeRegion"))
        with graph.inserting_before(node):
            region = graph.get_attr(name)
            call = graph.call_function(hop, (True, region, *inputs))
        call.meta.update(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        call._rename(node.name)
    if layers:
        graph.lint()
        gm.recompile()


def _traced_with_workspace(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, (tuple, list)) and len(val) == 4 and isinstance(val[3], torch.Tensor) \
        and val[3].numel() > 0


