"""Joint capture: forward and backward of one training step as a single fx graph.

The forward is exported with torch.export (as for inference), then the exported ATen graph is
run under ``make_fx`` with the parameters requiring grad and ``torch.autograd.grad`` called on
its differentiable outputs. Autograd's backward ops are traced into the same graph, right
after the forward, so saved activations are ordinary values read by backward nodes and their
lifetimes are explicit. Tracing runs on FakeTensors: no memory is used, and meta models work.

Where the forward ends, a ``boundary`` node is inserted: it reads the forward outputs and
yields the gradients of the outputs (the tangents), which backward nodes read through
getitems. The program's outputs are the forward outputs (held by the caller until the step
ends) followed by one gradient per trained parameter.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind
from torch.fx.experimental.proxy_tensor import get_innermost_proxy_mode, make_fx

from ..errors import CaptureError, UnsupportedModelError
from ..runtime import ops
from .capture import _KIND, INPUT, WEIGHT, Captured, Placeholder, _is_impure, export_model

TANGENT = "tangent"  # a gradient of a forward output, given at the boundary


@dataclass
class JointCaptured(Captured):
    """A captured training step. Outputs: ``n_outputs`` forward outputs (``n_mutations``
    buffer updates first, then the user's), then one gradient per ``grad_targets`` entry."""

    n_outputs: int = 0
    n_mutations: int = 0
    mutation_targets: list[str] = field(default_factory=list)  # state keys of updated buffers
    grad_targets: list[str] = field(default_factory=list)      # state keys of trained parameters
    diff_outputs: list[int] = field(default_factory=list)      # user outputs that take a gradient
    grad_capable: list[int] = field(default_factory=list)      # user outputs that depend on a parameter
    boundary: str = ""                                         # name of the boundary node

    def forward_outputs(self, flat_outputs: list) -> list:
        return flat_outputs[self.n_mutations:self.n_outputs]


def _state(model: torch.nn.Module, ep) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    state.update({k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)})
    return state


def capture_joint(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None,
                  grad_outputs: str = "auto") -> JointCaptured:
    """Trace one training step of ``model(*args, **kwargs)``.

    ``grad_outputs``: "auto" expects gradients only for scalar outputs when there are any (a
    loss), else for every differentiable output; "all" for every differentiable output.
    """
    if grad_outputs not in ("auto", "all"):
        raise ValueError(f"grad_outputs must be 'auto' or 'all', got {grad_outputs!r}")
    kwargs = dict(kwargs or {})
    ep = export_model(model, args, kwargs)
    sig = ep.graph_signature
    if getattr(sig, "user_inputs_to_mutate", None):
        raise UnsupportedModelError("forward mutates its inputs in place; memsched cannot plan that yet")
    state = _state(model, ep)
    user_inputs = iter(pytree.tree_leaves((tuple(args), _reorder(kwargs, ep))))

    # one primal per distinct tensor: tied weights are one parameter with one gradient
    primals, placeholders, slot_of, seen = [], [], [], {}
    for spec in sig.input_specs:
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
    trained = [i for i, (ph, v) in enumerate(zip(placeholders, primals))
               if ph.kind == WEIGHT and isinstance(v, torch.Tensor) and v.requires_grad]
    if not trained:
        raise ValueError(f"{type(model).__name__} has no parameter that requires grad: nothing to train")
    if any(ph.kind == INPUT and isinstance(v, torch.Tensor) and v.requires_grad
           for ph, v in zip(placeholders, primals)):
        raise UnsupportedModelError("inputs that require grad are not supported: memsched trains "
                                    "parameters; detach the inputs")

    out_specs = sig.output_specs
    n_mut = sum(1 for s in out_specs if s.kind == OutputKind.BUFFER_MUTATION)
    if any(s.kind not in (OutputKind.BUFFER_MUTATION, OutputKind.USER_OUTPUT) for s in out_specs):
        raise UnsupportedModelError("forward has outputs other than its results and buffer updates")
    out_vals = [n.meta.get("val") for n in ep.graph_module.graph.output_node().args[0]]
    user_vals = out_vals[n_mut:]
    floating = [i for i, v in enumerate(user_vals) if isinstance(v, torch.Tensor) and v.is_floating_point()]
    if grad_outputs == "auto" and any(user_vals[i].dim() == 0 for i in floating):
        floating = [i for i in floating if user_vals[i].dim() == 0]
    gm = ep.graph_module
    n_primals = len(primals)
    fwd_last: list = [None]
    diff: list[int] = []
    capable: list[int] = []

    def step(flat_primals, tangents):
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_(True) if i in trained else p for i, p in enumerate(flat_primals)]
            outs = gm(*[leaves[s] for s in slot_of])
            fwd_last[0] = list(get_innermost_proxy_mode().tracer.graph.nodes)[-1]
            user_outs = outs[n_mut:]
            capable[:] = [i for i, o in enumerate(user_outs) if isinstance(o, torch.Tensor) and o.requires_grad]
            diff[:] = [i for i in floating if user_outs[i].requires_grad]
            if not diff:
                raise UnsupportedModelError("no output depends on a trained parameter: nothing to differentiate")
            grads = torch.autograd.grad([user_outs[i] for i in diff], [leaves[i] for i in trained],
                                        [tangents[floating.index(i)] for i in diff], allow_unused=True)
        return list(outs), list(grads)

    fake_mode = torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True)  # constants baked into the export
    with fake_mode:
        fake_primals = [fake_mode.from_tensor(p, static_shapes=True) if isinstance(p, torch.Tensor) else p
                        for p in primals]
        fake_tangents = [torch.empty_strided(user_vals[i].shape, user_vals[i].stride(), dtype=user_vals[i].dtype,
                                             device=_device_of(fake_primals)) for i in floating]
    try:
        joint = make_fx(step, tracing_mode="real", record_module_stack=False)(fake_primals, fake_tangents)
    except UnsupportedModelError:
        raise
    except Exception as exc:  # autograd tracing raises many types; name the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"could not trace the backward of {type(model).__name__}: "
                           f"{type(exc).__name__}: {first}") from exc

    graph = joint.graph
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    for node, ph in zip(phs, placeholders):
        node._rename(ph.name)
    tangent_nodes = phs[n_primals:]
    outputs = list(graph.output_node().args[0])
    fwd_outputs, grads = outputs[:len(out_vals)], outputs[len(out_vals):]
    boundary = _insert_boundary(graph, fwd_last[0], fwd_outputs, [tangent_nodes[floating.index(i)] for i in diff])
    for t in tangent_nodes:
        graph.erase_node(t)
    graph.eliminate_dead_code(is_impure_node=_is_impure)
    _drop_asserts(graph)
    graph._codegen = torch.fx.graph.CodeGen()  # flat placeholders, as the executor feeds them
    graph.lint()
    joint.recompile()
    for node, i in zip(grads, trained):
        if isinstance(node, torch.fx.Node):
            node.meta["memsched.kind"] = "grad"
            node.meta["memsched.grad_of"] = placeholders[i].target
    mutated = [s.target for s in out_specs if s.kind == OutputKind.BUFFER_MUTATION]
    constants = {k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}
    return JointCaptured(
        joint, placeholders, ep.call_spec.in_spec, ep.call_spec.out_spec, constants,
        n_outputs=len(out_vals), n_mutations=n_mut, mutation_targets=mutated,
        grad_targets=[placeholders[i].target for i in trained], diff_outputs=list(diff),
        grad_capable=list(capable),
        boundary=boundary.name)


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
    boundary.meta["memsched.pass"] = "partition"
    last = boundary
    for i, t in enumerate(tangents):
        with graph.inserting_after(last):
            get = graph.call_function(operator.getitem, (boundary, i))
        get._rename(f"tangent_{i}")
        get.meta["val"] = t.meta["val"]
        get.meta["memsched.kind"] = TANGENT
        t.replace_all_uses_with(get)
        last = get
    return boundary


def _drop_asserts(graph: torch.fx.Graph) -> None:
    from .capture import _ASSERT_OPS

    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in _ASSERT_OPS and not node.users:
            graph.erase_node(node)
