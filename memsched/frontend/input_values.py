"""Values the call's inputs alone decide, read off them while a model is traced.

A model's Python sometimes needs a value of its data: the count of a mask it selects by
(``x[~bool_masked_pos]``, counted_selections.py), the truth of a test it branches on (FSMT's
``if not padding_mask.any(): padding_mask = None``), the integer it slices or pads by
(``n = int(lengths.max()); x[:, :n]``), the list it splits by (``x.split(lengths.tolist())``,
as Qwen2-VL's vision attention splits its images). Traced on fake tensors, that value is
unknown and torch.export refuses the model. Yet where the value is made from the call's inputs
alone (inputs, the model's buffers, literals in its code, and deterministic ops on them: no
parameter, no activation, no random draw), it is known before the model runs, as a shape is.
``InputValues`` finds the ops making it in the trace so far, copies them into a small program of
their own, runs that on the call's own tensors, and keeps it as a ``ValueGuard``: the compiled
module runs each guard on every call's inputs and keys its programs by the values (api.py), so a
call whose value differs gets a program of its own, as another shape would.
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import weakref
from typing import NamedTuple

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils._mode_utils import no_dispatch

from ..errors import UnsupportedModelError
from .constant_masks import _traced_node


class ValueGuard(NamedTuple):
    """A value made by ``program`` from the call's inputs at ``paths`` (("arg", i), ("kw", name),
    or ("buffer", name): a buffer of the model's, as it is at the call): its count of nonzero
    elements (``reads == "count"``), its truth ("truth"), whether every element is one ("ones"),
    the integer it holds ("integer") or its integers as nested tuples ("list"); ``value`` is what
    the capture saw."""
    paths: tuple
    program: fx.GraphModule
    reads: str
    value: object

    def held(self, args: tuple, kwargs: dict, buffer) -> object:
        """The value for this call's inputs (``buffer(name)``: the model's buffer now)."""
        inputs = [_input(path, args, kwargs, buffer) for path in self.paths]
        if self.writes():
            inputs = [t.clone() for t in inputs]   # (it writes in place, as the model did into its own copy)
        with torch.no_grad():
            return self.read(self.program(*inputs))

    def read(self, made: torch.Tensor) -> object:
        if self.reads == "count":
            return int(torch.count_nonzero(made))
        if self.reads == "list":
            return _frozen(made.tolist())
        if self.reads == "ones":   # one, not just nonzero: a cast on the way may truncate
            return bool((made == 1).all())
        return bool(made) if self.reads == "truth" else made.item()   # (a bool for a bool tensor)

    def writes(self) -> bool:
        return any(n.op == "call_function" and _writes(n.target) for n in self.program.graph.nodes)

    def key(self) -> tuple:
        return self.reads, self.paths, self.program.code

    def said(self, names: list[str]) -> str:
        """What it reads, of the inputs named ``names`` ("integer of attention_mask")."""
        if self.reads == "ones":
            return f"{', '.join(names)} all ones"
        return f"{'integers' if self.reads == 'list' else self.reads} of {', '.join(names)}"


def input_name(model: torch.nn.Module, path: tuple) -> str:
    """The name a user knows an input at ``path`` by: its parameter's name in ``forward``."""
    kind, at = path
    if kind == "arg":
        try:
            names = [n for n, p in inspect.signature(model.forward).parameters.items()
                     if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        except (TypeError, ValueError):
            names = []
        return names[at] if at < len(names) else f"input {at}"
    return f"buffer {at}" if kind == "buffer" else str(at)


def described(model: torch.nn.Module, guards) -> tuple[tuple[str, str], ...]:
    """What each guard reads and the value its program was made for, as text (a plan shows them,
    its file keeps them, and a saved plan is applied only to calls with the same values)."""
    return tuple((g.said([input_name(model, path) for path in g.paths]), repr(g.value)) for g in guards)


# zeros standing in for inputs given on the meta device (memsched.plan captures with them):
# their shapes are the inputs', their values are no one's
_STAND_INS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()   # id -> the tensor


def stand_in(meta: torch.Tensor) -> torch.Tensor:
    """Zeros on the CPU shaped as ``meta``, known as a stand-in: a value read off it is refused."""
    zeros = torch.zeros(meta.shape, dtype=meta.dtype)
    _STAND_INS[id(zeros)] = zeros
    return zeros


def _stands_in(t: torch.Tensor) -> bool:
    return _STAND_INS.get(id(t)) is t


def _input(path: tuple, args: tuple, kwargs: dict, buffer) -> torch.Tensor:
    kind, at = path
    return args[at] if kind == "arg" else kwargs[at] if kind == "kw" else buffer(at)


class GuardSet:
    """The guards of one input signature run as one program: their ops merged where they are the
    same op on the same values (Qwen2-VL's dozens of integers are elements of a few tensors, each
    made once per call, not once per integer). A guard writing in place gets its own copies of
    the inputs and ops of its own."""

    def __init__(self, guards: tuple[ValueGuard, ...]):
        self.guards = guards
        graph, root = fx.Graph(), torch.nn.Module()
        self.paths: list[tuple] = []
        shared: dict = {}   # (op, its arguments) -> the merged node
        placeholders: dict = {}
        outputs = []
        for i, guard in enumerate(guards):
            own = guard.writes()
            env = {}
            ins = [n for n in guard.program.graph.nodes if n.op == "placeholder"]
            for n, path in zip(ins, guard.paths):
                if path not in placeholders:
                    placeholders[path] = graph.placeholder(f"input_{len(self.paths)}")
                    self.paths.append(path)
                env[n] = graph.call_function(torch.ops.aten.clone.default, (placeholders[path],)) if own \
                    else placeholders[path]
            for n in guard.program.graph.nodes:
                if n.op == "get_attr":
                    name = f"guard_{i}_{n.target}"
                    root.register_buffer(name, getattr(guard.program, n.target))
                    env[n] = graph.get_attr(name)
                elif n.op == "call_function":
                    args, kwargs = fx.map_arg(n.args, env.__getitem__), fx.map_arg(n.kwargs, env.__getitem__)
                    key = None if own else _merge_key(n.target, args, kwargs)
                    if key is not None and key in shared:
                        env[n] = shared[key]
                    else:
                        env[n] = graph.call_function(n.target, args, kwargs)
                        if key is not None:
                            shared[key] = env[n]
                elif n.op == "output":
                    outputs.append(env[n.args[0]])
        graph.output(tuple(outputs))
        self.program = fx.GraphModule(root, graph)

    def values(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
        """Each guard's value for this call of ``model`` (part of the compiled module's key)."""
        if not self.guards:
            return ()
        with torch.no_grad():
            made = self.program(*[_input(path, args, kwargs, model.get_buffer) for path in self.paths])
            return tuple(g.read(m) for g, m in zip(self.guards, made))


def _merge_key(target, args, kwargs):
    """A hashable name for ``target`` on these arguments (nodes by identity), or None where an
    argument cannot be named so."""
    def named(v):
        if isinstance(v, fx.Node):
            return ("node", id(v))
        if isinstance(v, (list, tuple)):
            return (type(v).__name__, tuple(named(e) for e in v))
        if isinstance(v, dict):
            return ("dict", tuple(sorted((k, named(e)) for k, e in v.items())))
        return ("value", type(v).__name__, repr(v))
    if _writes(target):
        return None
    return target, named(args), named(kwargs)


@contextlib.contextmanager
def read_input_values(model: torch.nn.Module, args: tuple, kwargs: dict | None):
    """While ``model(*args, **kwargs)`` is traced, the ``InputValues`` of that call."""
    values = InputValues(model, args, kwargs)
    handle = model.register_forward_pre_hook(values.hook, with_kwargs=True, prepend=True)
    try:
        yield values
    finally:
        handle.remove()


class ReadingMode(TorchFunctionMode):
    """A torch function mode answering some functions through ``values`` (entered on the thread
    that traces: torch function modes are per thread): ``handlers`` maps a function to a method
    ``(func, args, kwargs)`` giving its result, or None to leave the call to torch."""

    def __init__(self, values: InputValues):
        super().__init__()
        self.values = values
        self.handlers: dict = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = self.handlers.get(func)
        out = handler(func, args, kwargs) if handler is not None else None
        return func(*args, **kwargs) if out is None else out


class InputValues:
    """``hook`` (a forward pre-hook on the model) learns which traced values are the call's
    inputs; ``count``, ``truth``, ``ones``, ``integer`` and ``integers`` read a traced tensor's
    value off the call's own tensors where they alone make it, recording a guard each;
    ``guards`` maps a guard's number to it."""

    def __init__(self, model: torch.nn.Module, args: tuple, kwargs: dict | None):
        self.model, self.args, self.kwargs = model, tuple(args), dict(kwargs or {})
        # the model's buffers as they are (the trace swaps in stand-ins), those with values only
        self.buffers = {name: b for name, b in model.named_buffers() if b.device.type != "meta"}
        self.inputs: dict[fx.Node, tuple] = {}
        self.guards: dict[int, ValueGuard] = {}

    def hook(self, module, args, kwargs):
        if self.inputs:   # the model's own call only, not a call of it from inside
            return
        for path, t in [(("arg", i), a) for i, a in enumerate(args)] + [(("kw", k), v) for k, v in kwargs.items()] \
                + [(("buffer", name), b) for name, b in module.named_buffers() if name in self.buffers]:
            node = _traced_node(t)
            if node is not None and node.op == "placeholder":
                self.inputs[node] = path

    def count(self, t: torch.Tensor) -> tuple[int, int] | None:
        """(guard number, count of nonzero elements) of ``t``, or None where the inputs alone
        do not make it."""
        return self._read(t, "count")

    def truth(self, t) -> bool | None:
        """The truth of ``t`` (a one-element tensor), or None where the inputs alone do not
        make it."""
        if not isinstance(t, torch.Tensor) or not isinstance(t.numel(), int) or t.numel() != 1:
            return None
        read = self._read(t, "truth")
        return None if read is None else read[1]

    def ones(self, t: torch.Tensor) -> bool | None:
        """Whether every element of ``t`` is one (an attention mask without padding), or None
        where the inputs alone do not make it."""
        read = self._read(t, "ones")
        return None if read is None else read[1]

    def integer(self, t: torch.Tensor) -> int | bool | None:
        """The integer (or bool) a one-element integer or boolean tensor holds (``t.item()``, ``int(t)``,
        a tensor used as an index or a size), or None where the inputs alone do not make it.
        (A floating value is left to torch: a program per value of a float would be planned
        again at nearly every call.)"""
        if t.dtype.is_floating_point or t.dtype.is_complex or not isinstance(t.numel(), int) or t.numel() != 1:
            return None
        read = self._read(t, "integer")
        return None if read is None else read[1]

    def integers(self, t: torch.Tensor) -> list | None:
        """``t.tolist()`` of an integer or boolean tensor (its size may be made from data too:
        the values are read, not traced), or None where the inputs alone do not make it."""
        if t.dtype.is_floating_point or t.dtype.is_complex:
            return None
        read = self._read(t, "list")
        return None if read is None else _thawed(read[1])

    def _read(self, t: torch.Tensor, reads: str):
        made = self._program(t)
        if made is None:
            return None
        program, paths = made
        guard = ValueGuard(paths, program, reads, 0)
        on_meta = [path for path in paths if _stands_in(_input(path, self.args, self.kwargs, self.buffers.get))]
        if on_meta:
            if reads == "ones":   # a mask not known to hold ones is kept, as eager keeps a padded one
                return None
            names = [input_name(self.model, path) for path in paths]
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: the program depends on the {guard.said(names)}, a value read "
                "off the call's inputs, but "
                f"{', '.join(input_name(self.model, path) for path in on_meta)} was given on the meta device, "
                "with no values to read: plan with real inputs (their values decide the program)")
        with no_dispatch(), torch._C.DisableTorchFunction():   # the call's own tensors, outside the trace
            value = guard.held(self.args, self.kwargs, self.buffers.__getitem__)
        number = len(self.guards)
        self.guards[number] = guard._replace(value=value)
        return number, value

    def _program(self, made: torch.Tensor):
        """The ops making ``made`` from the call's inputs, as a program of them (and the inputs'
        paths), or None when it reads anything else or draws at random. Writes in place into what
        it reads, or into views of that (``m = zeros(...); m[:, :k] = 1``), are among its ops."""
        node = _traced_node(made)
        if node is None:
            return None
        before = list(node.graph.nodes)
        before = before[:before.index(node) + 1]
        needed: set = set()
        grown = self._reads(node, needed)
        while grown:
            aliases = set(needed)
            for n in before:   # views of what is needed, and the writes into any of them
                if n.op != "call_function" or n in needed or not n.args or not isinstance(n.args[0], fx.Node):
                    continue
                if _is_view(n.target) and n.args[0] in aliases:
                    aliases.add(n)
                elif _writes(n.target) and n.args[0] in aliases:
                    grown = self._reads(n, needed)
                    if grown is None:
                        return None
                    break
            else:
                grown = False
        if grown is None:
            return None
        graph, env, root = fx.Graph(), {}, torch.nn.Module()
        placeholders = [n for n in before if n in needed and n.op == "placeholder"]
        for i, n in enumerate(placeholders):
            env[n] = graph.placeholder(f"input_{i}")
        for n in before:
            if n in needed and n.op == "get_attr":   # a tensor written in the model's code
                name = f"literal_{len(env)}"
                root.register_buffer(name, _literal(n))
                env[n] = graph.get_attr(name)
            elif n in needed and n.op == "call_function":
                env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(env[node])
        return fx.GraphModule(root, graph), tuple(self.inputs[n] for n in placeholders)

    def _reads(self, node: fx.Node, needed: set):
        """Add ``node`` and what it is made from to ``needed``: True when that grew it, None
        when it reads a parameter or buffer, or draws at random."""
        grew, stack = False, [node]
        while stack:
            n = stack.pop()
            if n in needed:
                continue
            if n.op == "placeholder" and n not in self.inputs:
                return None   # a parameter (or a buffer without values, on meta)
            if n.op == "get_attr" and _literal(n) is None:
                return None
            if n.op == "call_function" and not _deterministic(n.target) or n.op not in ("placeholder", "get_attr",
                                                                                           "call_function"):
                return None
            needed.add(n)
            grew = True
            stack.extend(n.all_input_nodes)
        return grew


def _frozen(value):
    """Nested lists as nested tuples (a key's part)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def _thawed(value):
    return [_thawed(v) for v in value] if isinstance(value, tuple) else value


def _literal(node: fx.Node):
    """The real tensor a ``get_attr`` of the trace in progress holds (a literal such as
    ``torch.tensor(1)`` in the model's code), or None."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.fx.experimental import proxy_tensor

    mode = proxy_tensor.get_proxy_mode()
    value = getattr(getattr(mode, "tracer", None), "root", None)
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    return value if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) else None


def _is_view(target) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.is_view


def _writes(target) -> bool:
    """An op writing into its first argument (``fill_``, ``copy_``, ``index_put_``)."""
    if not isinstance(target, torch._ops.OpOverload) or not target._schema.arguments:
        return False
    alias = target._schema.arguments[0].alias_info
    return alias is not None and alias.is_write


def _deterministic(target) -> bool:
    """An op whose output its inputs decide (no random draw, no state)."""
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded not in target.tags
    return target is operator.getitem
