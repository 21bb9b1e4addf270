"""Re-applying a saved schedule to a fresh capture of the same model, without solving.

``check_signature`` compares the inputs with those the plan was made for; ``apply_plan``
pairs the saved program's nodes with the captured ones and rebuilds the schedule on the
capture. Either raises PlanMismatchError naming the first difference. The orchestration
(capture, verify, wrap in a Plan) is ``memsched.reapply.reapply``.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from ..frontend.capture import Captured
from ..ir import ops
from ..ir.graph_module import lazy_graph_module
from ..ir.effects import draws_nothing, is_impure, written_args
from ..ir.meta import KEY, info


class PlanMismatchError(ValueError):
    """A saved plan does not fit the model or inputs it is applied to; the message names the
    first difference."""


# A loaded program's placeholders are named and targeted by their (checked) node name, so that
# the code fx generates for the program never holds text from the file; the state key the file
# gives (the target the capture had) is kept here in the node's meta.
SAVED_TARGET = "memsched_saved_target"

# Names the runtime's generated code (runtime/codegen.py: values are ``_<node>``, next to its
# parameters ``_track``/``_release`` and globals ``_c<i>``/``_f<i>``) cannot give a value without
# shadowing its own. The capture never names an inserted node so; a file that does is refused.
_RUNTIME_NAMES = re.compile(r"track|release|[cf][0-9]+")
_AGAIN = re.compile(r"(.+)_again(?:_[0-9]+)?")


def saved_target(n: fx.Node) -> str:
    """A placeholder's target as captured: the state key a loaded plan keeps beside its graph,
    or the node's own target in a live plan."""
    return n.meta.get(SAVED_TARGET, n.target)


class _Ref(str):
    """A node in ``_call``'s text: printed as its bare name."""

    def __repr__(self) -> str:
        return str(self)


def _call(n: fx.Node, name=lambda x: x.name) -> str:
    """A node's arguments as comparable text, nodes named by ``name``: ``(mm_1, 0, dim=-1)``."""
    ref = lambda x: _Ref(name(x))  # noqa: E731
    args = fx.node.map_arg(n.args, ref)
    kwargs = fx.node.map_arg(dict(sorted(n.kwargs.items())), ref)
    return "(" + ", ".join([repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]) + ")"


def _target_text(n: fx.Node) -> str:
    """A node's target as the saved plan names it (``aten::gelu.default``, ``operator.getitem``)."""
    t = n.target
    if isinstance(t, torch._ops.OpOverload):
        return f"{t._schema.name}.{t._overloadname}"
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"higher_order::{t.name()}"
    module, qualname = getattr(t, "__module__", None), getattr(t, "__qualname__", None)
    module = {"_operator": "operator"}.get(module, module)
    return f"{module}.{qualname}" if module and qualname else str(t)


def _fx_name(name: str) -> str:
    """The name fx gives a node first called ``name`` in a new graph (``input`` -> ``input_1``)."""
    return fx.Graph()._graph_namespace.create_name(name, None)


def _pair_inputs(ph_saved: list[fx.Node], ph_cap: list[fx.Node]) -> None:
    """Graph inputs pair by position, with the captured target and name (a scheduled graph may
    rename one the capture named after a Python builtin, e.g. input -> input_1; the target
    keeps the original). The runtime knows the model's tensors by these names."""
    for i in range(max(len(ph_saved), len(ph_cap))):
        a = saved_target(ph_saved[i]) if i < len(ph_saved) else "nothing"
        b = ph_cap[i].target if i < len(ph_cap) else "nothing"
        if a != b:
            raise PlanMismatchError(f"graph input {i}: the plan has {a}, the model captures {b}")
        s, c = ph_saved[i].name, ph_cap[i].name
        if s not in (c, _fx_name(c)):
            raise PlanMismatchError(f"graph input {i} ({b}): the plan names it {s}, the model {c}")


def _random(n: fx.Node) -> bool:
    """An op that draws random numbers as called (not dropout with p = 0)."""
    t = n.target
    return isinstance(t, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in t.tags and not draws_nothing(n)


def _dead_code(c: fx.Node) -> bool:
    """A captured op a planning pass may have removed once nothing read it (the views autograd
    saved a value through, when the remat pass recomputes the value; a layer's statistics when
    the layer is recomputed): it writes nothing and draws nothing."""
    return c.op == "call_function" and not is_impure(c) and not written_args(c) and not _random(c)


def _pair_compute(comp_saved: list[fx.Node], comp_cap: list[fx.Node], dropped: bool) -> list[tuple[fx.Node, fx.Node]]:
    """Compute nodes pair in program order (the schedule keeps the captured order) by name and
    target. ``dropped``: in a training step's plan a captured op the plan lacks may be dead code
    a pass removed (``_dead_code``). The first pair that differs is the mismatch reported."""
    pairs, i = [], 0
    for k in range(len(comp_saved) + 1):
        s = comp_saved[k] if k < len(comp_saved) else None
        skipped = i
        while dropped and i < len(comp_cap) and (s is None or comp_cap[i].name != s.name) \
                and _dead_code(comp_cap[i]):
            i += 1
        c = comp_cap[i] if i < len(comp_cap) else None
        if s is None and c is None:
            return pairs
        if s is None or c is None or s.name != c.name or s.target != c.target:
            c = comp_cap[skipped] if skipped < len(comp_cap) else None   # the first the plan does not have
            plan_has = f"{s.name} = {_target_text(s)}" if s is not None else "nothing more"
            model_has = f"{c.name} = {_target_text(c)}" if c is not None else "nothing more"
            raise PlanMismatchError(f"compute node {k}: the plan has {plan_has}, the model captures {model_has}")
        pairs.append((s, c))
        i += 1
    return pairs


def _is_rerun(s: fx.Node) -> bool:
    """A compute node the planner added: a value the placement drops and brings back, or one the
    remat pass recomputes in the backward instead of saving (passes/remat.py)."""
    return info(s).restores is not None or info(s).made_by == "remat"


def _rerun_of(s: fx.Node, cap: dict[str, fx.Node]) -> fx.Node:
    """The captured node an added compute node re-runs: named after it (``mm_3_again``, fx
    suffixing repeats; ``mm_3_again_again`` when the placement drops and re-makes a value the
    remat pass recomputed), with its target."""
    name, c = s.name, None
    while c is None and (match := _AGAIN.fullmatch(name)):
        name = match.group(1)
        c = cap.get(name)
    if c is None or c.op != s.op or _target_text(c) != _target_text(s):
        raise PlanMismatchError(f"{s.name} = {_target_text(s)}: re-runs no node of the model")
    if _random(c):   # a second draw would differ from the first: the planner never re-runs one
        raise PlanMismatchError(f"{s.name} = {_target_text(s)}: re-runs an op that draws random numbers")
    return c


def _origins(saved: fx.GraphModule, captured: Captured) -> dict[str, fx.Node]:
    """Saved node name -> the captured node it holds (inputs, compute nodes, and for prefetches
    and waits the value they restore); PlanMismatchError at the first node that differs."""
    cap_nodes = list(captured.gm.graph.nodes)
    cap = {n.name: n for n in cap_nodes}
    saved_nodes = list(saved.graph.nodes)
    ph_saved = [n for n in saved_nodes if n.op == "placeholder"]
    ph_cap = [n for n in cap_nodes if n.op == "placeholder"]
    _pair_inputs(ph_saved, ph_cap)
    compute = [n for n in saved_nodes if n.op in ("call_function", "get_attr") and not ops.is_inserted(n)]
    # compute the scheduler added (a recomputed op, a view re-made on a restored value) says
    # what it brings back; the rest pairs with the capture in program order
    comp_saved = [n for n in compute if not _is_rerun(n)]
    comp_cap = [n for n in cap_nodes if n.op in ("call_function", "get_attr") and not ops.is_inserted(n)]
    bounds_saved = [n for n in saved_nodes if ops.op_of(n) is ops.Op.BOUNDARY]
    paired = _pair_compute(comp_saved, comp_cap, dropped=bool(bounds_saved))
    origin = {s.name: c for s, c in zip(ph_saved, ph_cap)}
    origin.update((s.name, c) for s, c in paired)
    # a training step's boundary (where the forward hands its outputs to autograd) is the capture's
    bounds_cap = [n for n in cap_nodes if ops.op_of(n) is ops.Op.BOUNDARY]
    if len(bounds_saved) != len(bounds_cap):
        raise PlanMismatchError(f"the plan has {len(bounds_saved)} forward/backward boundaries, the capture "
                                f"{len(bounds_cap)}: a training plan applies to a training step")
    origin.update((s.name, c) for s, c in zip(bounds_saved, bounds_cap))
    for s in compute:
        if _is_rerun(s):
            origin[s.name] = _rerun_of(s, cap)
    for s in saved_nodes:
        if ops.is_inserted(s) and _RUNTIME_NAMES.fullmatch(s.name):  # other names are the capture's
            raise PlanMismatchError(f"{s.name}: the runtime reserves this name; an inserted node cannot have it")
        if ops.op_of(s) in (ops.Op.PREFETCH, ops.Op.WAIT):
            restores = info(s).restores
            if restores in cap:
                origin[s.name] = cap[restores]
            elif restores in origin and origin[restores].op != "placeholder":   # a value a pass added (remat)
                origin[s.name] = origin[restores]
            else:
                raise PlanMismatchError(f"{s.name}: restores {restores!r}, which the model does not have")

    def held(x: fx.Node) -> str:
        if ops.op_of(x) is ops.Op.OFFLOAD:   # a training step returns some gradients on the host
            return held(x.args[0])
        return origin[x.name].name if x.name in origin else x.name

    reruns = [(s, origin[s.name]) for s in compute if _is_rerun(s)]
    for s, c in paired + reruns + list(zip(bounds_saved, bounds_cap)):
        if _call(s, held) != _call(c):
            raise PlanMismatchError(f"{s.name} = {_target_text(c)}: the plan passes {_call(s, held)}, "
                                    f"the model {_call(c)}")
    out_s, out_c = saved.graph.output_node(), captured.gm.graph.output_node()
    if _call(out_s, held) != _call(out_c):
        raise PlanMismatchError(f"the plan returns {_call(out_s, held)}, the model {_call(out_c)}")
    return origin


def apply_plan(saved: fx.GraphModule, captured: Captured) -> fx.GraphModule:
    """The saved schedule rebuilt on a fresh capture of the same model.

    Placeholders and compute nodes take the captured nodes' targets and metadata (their traced
    values), prefetches and waits the value of what they restore; the inserted ops and every
    ``memsched.*`` annotation come from the saved program. PlanMismatchError names the first
    node where the capture and the plan disagree (inputs, names, targets, arguments, outputs).
    """
    origin = _origins(saved, captured)
    g = fx.Graph()
    env: dict[str, fx.Node] = {}
    for s in saved.graph.nodes:
        args = fx.node.map_arg(s.args, lambda x: env[x.name])
        kwargs = fx.node.map_arg(s.kwargs, lambda x: env[x.name])
        if s.op == "output":
            g.output(args[0])
            continue
        source = origin.get(s.name)
        # placeholders and compute nodes are the captured ones: their targets, their metadata
        captured_node = source is not None and source.op == s.op and not ops.is_inserted(s)
        new = g.create_node(s.op, source.target if captured_node else s.target, args, kwargs, name=s.name)
        if source is not None and source.op == s.op:  # all the captured metadata
            new.meta.update(source.meta)
        elif source is not None:  # prefetch / wait: the value it restores
            new.meta["val"] = source.meta.get("val")
        new.meta[KEY] = info(s)
        if new.name != s.name:
            raise PlanMismatchError(f"node {s.name!r} could not keep its name (got {new.name!r})")
        env[s.name] = new
    g.lint()
    return lazy_graph_module(captured.gm, g, class_name="ScheduledProgram")


def _describe_leaf(leaf) -> str:
    if leaf[0] == "T":
        again = f" (the tensor of input leaf {leaf[4]} again)" if len(leaf) > 4 else ""
        return f"{leaf[2].removeprefix('torch.')}[{','.join(map(str, leaf[1]))}]{again}"
    return leaf[1]


def check_input_values(saved: tuple, now: tuple) -> None:
    """PlanMismatchError unless the values read off the inputs (a mask's padding, a count, an
    integer: frontend/input_values.py) are those the plan was made for. (A file written before
    plans kept them has none: its program is paired op by op, as before.)"""
    if not saved or tuple(saved) == tuple(now):
        return
    cut = lambda v: v if len(v) <= 60 else v[:57] + "..."  # noqa: E731
    differ = [f"{what} is {cut(value)}, the plan was made for {cut(was)}"
              for (what, value), (_, was) in zip(now, saved) if value != was]
    if len(now) != len(saved) or [w for w, _ in now] != [w for w, _ in saved]:
        differ = [f"this call reads {len(now)} values ({', '.join(sorted({w for w, _ in now}))}), the plan "
                  f"was made for {len(saved)} ({', '.join(sorted({w for w, _ in saved}))})"]
    raise PlanMismatchError("values read off the inputs differ from those the plan was made for: "
                            + "; ".join(differ) + ": plan again for these inputs")


def check_signature(saved: tuple, now: tuple) -> None:
    """PlanMismatchError unless the inputs have the structure, shapes, dtypes and non-tensor
    values the plan was made for (devices may differ: a plan made on meta inputs runs on real ones)."""
    if saved[0] != now[0]:
        raise PlanMismatchError(f"the inputs are structured differently from those the plan was made for: "
                                f"{now[0]} vs {saved[0]}")
    for i, (a, b) in enumerate(zip(saved[1], now[1])):
        if a[0] != b[0] or ((a[:3], a[4:]) != (b[:3], b[4:]) if a[0] == "T" else a != b):
            raise PlanMismatchError(f"input leaf {i} is {_describe_leaf(b)}, the plan was made for "
                                    f"{_describe_leaf(a)}: plan again for these inputs")
