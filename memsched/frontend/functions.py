"""autograd.Functions with a backward of their own, kept through the export of a training step.

torch.export keeps only the ops of a Function's forward (BLOOM's GeLU, Megatron-style fused
ops): differentiated, those give autograd's derivative, not the Function's formula, and the
gradients differ from eager's in the last bits. While the forward is exported for a training
step, each application of such a Function (``Functions.recording``) is marked in the graph:
its tensor arguments pass through an ``alias`` tagged as its inputs, its ops are tagged as its
body, its tensor results pass through an ``alias`` tagged as its outputs; the Function and its
other arguments are kept aside. When the joint trace runs the exported graph
(``Functions.run``), a body is skipped and the Function applied again to the values of its
inputs, so autograd records its own backward, as eager's does.

An application whose body reads a tensor that is not one of its arguments (a parameter it
closes over), or that returns anything but tensors, runs as its exported ops; its name is then
in ``inlined`` (the caller warns). Reentrant activation checkpointing (``CheckpointFunction``)
is not kept: its function runs as it is, differentiated, since the plan recomputes what it drops.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
import torch.utils.checkpoint

_BODY, _IN, _OUT = "memsched_function", "memsched_function_input", "memsched_function_output"


@dataclass
class _Application:
    cls: type
    args: tuple          # the arguments, a tensor replaced by its index among the tensors
    kwargs: dict
    n_inputs: int


class _Slot(int):
    """A tensor argument's index among the application's tensor arguments."""


@dataclass
class Functions:
    """The custom-backward Functions applied while a forward was exported (``recording``)."""

    applied: list[_Application] = field(default_factory=list)
    inlined: set[str] = field(default_factory=set)

    @contextlib.contextmanager
    def recording(self):
        with custom_applications(self._record), fx_traceback.preserve_node_meta():
            yield self

    def _record(self, cls, apply, args, kwargs):
        token = len(self.applied)
        flat, spec = pytree.tree_flatten((args, kwargs))
        inputs, marked = [], []
        for x in flat:
            if isinstance(x, torch.Tensor):
                with fx_traceback.annotate({_IN: (token, len(inputs))}):
                    inputs.append(torch.ops.aten.alias(x))
                x = _Slot(len(inputs) - 1)
            marked.append(x)
        args_t, kwargs_t = pytree.tree_unflatten(marked, spec)
        self.applied.append(_Application(cls, args_t, kwargs_t, len(inputs)))
        with fx_traceback.annotate({_BODY: token}):
            out = apply(cls, *_filled(args_t, inputs), **_filled(kwargs_t, inputs))
        results = out if isinstance(out, tuple) else (out,)
        marked_out = []
        for j, r in enumerate(results):
            if isinstance(r, torch.Tensor):
                with fx_traceback.annotate({_OUT: (token, j)}):
                    r = torch.ops.aten.alias(r)
            marked_out.append(r)
        return tuple(marked_out) if isinstance(out, tuple) else marked_out[0]

    def replayable(self, gm: fx.GraphModule) -> set[int]:
        """The applications of ``gm`` that can be applied again: their body reads only their
        inputs and each other, and every result is a tensor; the others go to ``inlined``."""
        tags = {n: n.meta.get("custom") or {} for n in gm.graph.nodes}
        ok = set(range(len(self.applied)))
        for n, tag in tags.items():
            if _BODY not in tag:
                continue
            token = tag[_BODY]
            for a in n.all_input_nodes:
                t = tags[a]
                if t.get(_BODY) != token and (t.get(_IN) or (None,))[0] != token:
                    ok.discard(token)   # reads a tensor it was not handed
        for token, app in enumerate(self.applied):
            outs = [n for n, t in tags.items() if (t.get(_OUT) or (None,))[0] == token]
            ins = [n for n, t in tags.items() if (t.get(_IN) or (None,))[0] == token]
            if not outs or len(ins) != app.n_inputs:   # an argument the forward never read is gone
                ok.discard(token)
        self.inlined |= {self.applied[t].cls.__qualname__ for t in set(range(len(self.applied))) - ok}
        return ok

    def run(self, gm: fx.GraphModule, *args):
        """``gm(*args)``, applying the replayable Functions again instead of their bodies."""
        return _Replay(gm, self, self.replayable(gm)).run(*args)


# a custom operator's registered backward (torch.library.register_autograd) runs as a Function
# made in this module: the graph keeps the operator itself, whose autograd kernel applies that
# Function again in the joint trace, so its backward is eager's without being marked
_CUSTOM_OP_AUTOGRAD = "torch._library.autograd"
_REENTRANT_CHECKPOINT = getattr(torch.utils.checkpoint, "CheckpointFunction", None)


@contextlib.contextmanager
def custom_applications(handle):
    """While it lasts, each application of an autograd.Function with a backward of its own,
    with grad on, goes to ``handle(cls, apply, args, kwargs)`` (``apply`` runs it as usual)."""
    original = torch.autograd.Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if (not torch.is_grad_enabled() or cls.backward is torch.autograd.Function.backward
                or cls.__module__ == _CUSTOM_OP_AUTOGRAD):
            return original.__func__(cls, *args, **kwargs)
        if cls is _REENTRANT_CHECKPOINT and not kwargs:
            # reentrant activation checkpointing (use_reentrant=True) runs its function without
            # autograd and again in its backward: memsched plans its own recomputation, so the
            # function runs as it is, differentiated (without checkpointing, eager's gradients)
            run_function, _preserve_rng_state, *inputs = args
            return run_function(*inputs)
        return handle(cls, original.__func__, args, kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = original


def _filled(template, tensors: list):
    return pytree.tree_map(lambda x: tensors[x] if isinstance(x, _Slot) else x, template)


class _Replay(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, functions: Functions, tokens: set[int]):
        super().__init__(gm)
        self.functions, self.tokens = functions, tokens
        self.inputs: dict[int, dict[int, torch.Tensor]] = {}
        self.results: dict[int, tuple] = {}

    def run_node(self, n: fx.Node):
        tag = n.meta.get("custom") or {}
        # (a tensor the body makes from a constant, torch.tensor(...), is lifted to a graph input
        # tagged as the body's: it still takes its argument)
        if tag.get(_BODY) in self.tokens and n.op != "placeholder":
            return None                       # the Function is applied again at its first output
        out = tag.get(_OUT)
        if out is not None and out[0] in self.tokens:
            token, j = out
            if token not in self.results:
                app = self.functions.applied[token]
                tensors = [self.inputs[token][i] for i in range(app.n_inputs)]
                r = app.cls.apply(*_filled(app.args, tensors), **_filled(app.kwargs, tensors))
                self.results[token] = r if isinstance(r, tuple) else (r,)
            return torch.ops.aten.alias(self.results[token][j])
        value = super().run_node(n)
        inp = tag.get(_IN)
        if inp is not None and inp[0] in self.tokens:
            self.inputs.setdefault(inp[0], {})[inp[1]] = value
        return value
