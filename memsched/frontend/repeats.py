"""Capture a deep stack of identical layers by tracing a few of them and repeating one.

Tracing costs about a millisecond per op: a 32-layer 7B training step takes seconds to
capture, nearly all of it the same layer over and over. When the model holds an
``nn.ModuleList`` of at least ``MIN_LAYERS`` layers with the same structure (classes,
parameter and buffer shapes, plain attributes; an attribute equal to the layer's own index,
``layer_idx``, may differ), the model is traced with ``TRACED`` of them in the list (the first
four and the last) and the graph is grown to the full depth:

* every node gets a layer tag: a parameter its layer; a forward node the highest tag of its
  inputs (so a layer's nodes before its first weight belong to the layer before), a backward
  node the lowest tag among its tagged inputs (gradients flow down the stack); a node without
  one, whose users all carry one tag, takes it (a mask sliced inside each layer). Nodes of a
  tag and direction form a block; blocks are numbered by position;
* the middle blocks (1, 2, 3) must be the same, node by node: op, constants, shapes, strides,
  dtypes, which of a node's inputs its outputs alias, and every input named by its role (a
  position in the same block, in the block one layer up or down, a parameter of that layer,
  or one fixed node shared by every layer). Otherwise the full model is traced;
* block 2 is then repeated for layers 3 .. L-3, and blocks 3 and 4 become layers L-2, L-1.
  Each repeat reads the inputs its roles name in its own layer; its traced values are made
  anew with the same shapes and the same aliasing, so storages are counted as in a full trace.

A model whose class sets ``memsched_trace_all_layers`` (the generation wrapper: each layer has
its own cache slots and outputs) is always traced in full.

The result is the graph a full trace gives (tests compare the two on several architectures),
planned and verified as a whole program like any other.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.utils._pytree as pytree
from torch.multiprocessing.reductions import StorageWeakRef

from ..ir.graph_module import lazy_graph_module
from ..ir.meta import annotate
from ..ir.tensors import on_storage
from .capture import Captured

MIN_LAYERS = 8       # fewer layers than this are traced in full (little to save)
MAX_PREFIX = 8       # at most this many layers before the repeated run may differ from it
TRACED = 5           # layers traced: 0, 1 (first two), 2, 3 (the middle pair), 4 (the last)
_FORWARD, _BACKWARD, _WEIGHTS = "F", "B", "W"   # block kinds; W: forward ops on weights alone


class NotRepeatable(Exception):
    """The stack's layers do not repeat exactly: trace the whole model."""


@dataclass(frozen=True)
class Stack:
    parent: torch.nn.Module
    attr: str
    prefix: str        # the ModuleList's state-key prefix, e.g. "model.layers"
    layers: torch.nn.ModuleList
    start: int = 0     # the first layer of the repeated run: those before it differ (DeepSeek's dense
                       # layers before its mixture-of-experts ones) and are traced as they are

    @property
    def depth(self) -> int:
        return len(self.layers)


# -- finding the stack -------------------------------------------------------------------------
def find_stack(model: torch.nn.Module) -> Stack | None:
    """The ModuleList whose identical layers (all, or all after the first few) hold the most
    parameters, if deep enough."""
    best, best_bytes = None, 0
    for path, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) < MIN_LAYERS or not path:
            continue
        start = next((k for k in range(min(MAX_PREFIX, len(module) - MIN_LAYERS) + 1)
                      if _identical(list(module)[k:], first=k)), None)
        if start is None:
            continue
        nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
        if nbytes > best_bytes and _owned_only(model, module):
            parent_path, _, attr = path.rpartition(".")
            best, best_bytes = Stack(model.get_submodule(parent_path), attr, path, module, start), nbytes
    return best


def _identical(layers: list, first: int = 0) -> bool:
    """Same classes, tensors (shapes, dtypes, grad) and plain attributes; an attribute may
    differ only by being each layer's own index (``first`` for the first of ``layers``). No hooks."""
    shapes, plains = [], []
    for layer in layers:
        parts, plain = [], {}
        for name, m in layer.named_modules(remove_duplicate=False):
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
                return False
            tensors = tuple((k, tuple(t.shape), t.dtype, t.requires_grad)
                            for k, t in list(m._parameters.items()) + list(m._buffers.items()) if t is not None)
            parts.append((name, type(m), tensors, m.training))
            plain.update({(name, k): v for k, v in vars(m).items() if not k.startswith("_")
                          and isinstance(v, (int, float, str, bool, type(None), tuple))})
        shapes.append(tuple(parts))
        plains.append(plain)
    if any(p != shapes[0] for p in shapes) or any(p.keys() != plains[0].keys() for p in plains):
        return False
    for key in plains[0]:
        values = [repr(p[key]) for p in plains]
        if len(set(values)) > 1 and values != [repr(i) for i in range(first, first + len(layers))]:
            return False
    return True


def identical_modules(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Two modules built alike (as two layers of a stack are): ``_identical``'s test."""
    return a is not b and type(a) is type(b) and _identical([a, b])


def _owned_only(model: torch.nn.Module, stack: torch.nn.ModuleList) -> bool:
    """No tensor of the stack is shared with another layer or outside it (tied weights)."""
    inside = {id(t) for _, t in list(stack.named_parameters(remove_duplicate=False))
              + list(stack.named_buffers(remove_duplicate=False))}
    everywhere = [id(t) for _, t in list(model.named_parameters(remove_duplicate=False))
                  + list(model.named_buffers(remove_duplicate=False)) if id(t) in inside]
    return len(everywhere) == len(set(everywhere))


@contextlib.contextmanager
def traced_layers(stack: Stack):
    """The stack cut to the layers traced: those before the run, its first four and the last."""
    n, k = stack.depth, stack.start
    keep = [*range(k), k, k + 1, k + 2, k + 3, n - 1]
    short = torch.nn.ModuleList([stack.layers[i] for i in keep])
    setattr(stack.parent, stack.attr, short)
    try:
        yield keep
    finally:
        setattr(stack.parent, stack.attr, stack.layers)


def capture_repeated(model: torch.nn.Module, capture_fn) -> tuple[Captured, str]:
    """``capture_fn(model)`` traced on a few layers and grown to the full stack; the full trace
    when the model has no repeated stack or its layers do not repeat exactly. Also says which."""
    stack = None if getattr(model, "memsched_trace_all_layers", False) else find_stack(model)
    if stack is None:
        return capture_fn(model), ""
    try:
        with traced_layers(stack):
            short = capture_fn(model)
    except Exception as e:  # the model needs all its layers (a wrapper counting them): trace them
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return capture_fn(model), f"traced in full: the cut stack does not trace ({first[:120]})"
    try:
        grown = _Grower(short, stack).grow()
    except NotRepeatable as e:
        return capture_fn(model), f"traced in full: {e}"
    return grown, f"{TRACED + stack.start} of {stack.depth} layers traced, the rest repeated"


# -- growing the graph ---------------------------------------------------------------------------
def _key(t: torch.Tensor):
    return StorageWeakRef(t.untyped_storage())


class _Grower:
    """The traced graph (layers in slots 0..4) grown to the stack's depth."""

    def __init__(self, captured: Captured, stack: Stack):
        self.c, self.stack = captured, stack
        self.depth, self.start = stack.depth, stack.start
        self.graph = captured.gm.graph
        self.nodes = list(self.graph.nodes)
        boundary = getattr(captured, "boundary", "") or None
        self.boundary_at = next((i for i, n in enumerate(self.nodes) if n.name == boundary), len(self.nodes))
        self.boundary = boundary
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {ph.name: ph for ph in captured.placeholders}
        self.param_slot: dict[str, tuple[int, str]] = {}   # placeholder -> (slot, key in the layer)
        for ph in captured.placeholders:
            slot = self._slot_of_target(ph.target)
            if slot is not None:
                self.param_slot[ph.name] = slot
        k = self.start
        self.repeats = list(range(k + 3, self.depth - 2))
        self.slot_of_layer = {k: 0, k + 1: 1, k + 2: 2, self.depth - 2: 3, self.depth - 1: 4}

    def _slot_of_target(self, target: str | None):
        prefix = self.stack.prefix + "."
        if not target or not target.startswith(prefix):
            return None
        index, _, local = target[len(prefix):].partition(".")
        if not index.isdigit() or not 0 <= int(index) - self.start < TRACED:
            return None   # a layer before the run is traced as it is, like the embedding
        return int(index) - self.start, local   # the slot: the index in the cut list, after those before the run

    def _layer_of_slot(self, slot: int) -> int:
        k = self.start
        return {0: k, 1: k + 1, 2: k + 2, 3: self.depth - 2, 4: self.depth - 1}[slot]

    # tags: ("P" / direction, slot) per node, or None for a node every layer shares --------------
    def _tag(self) -> dict:
        tags: dict = {}
        for i, n in enumerate(self.nodes):
            if n.op == "placeholder":
                slot = self.param_slot.get(n.name)
                tags[n] = ("P", slot[0]) if slot else None
            elif n.op != "call_function" or i == self.boundary_at:
                tags[n] = None
            else:
                inputs = [tags.get(a) for a in n.all_input_nodes]
                slots = [t[1] for t in inputs if t is not None]
                backward = i > self.boundary_at
                if not backward and inputs and all(t is not None and t[0] in ("P", _WEIGHTS) for t in inputs) \
                        and len(set(slots)) == 1:
                    tags[n] = (_WEIGHTS, slots[0])   # a view of a layer's weights (detach, t)
                else:
                    tags[n] = None if not slots else (_BACKWARD, min(slots)) if backward else (_FORWARD, max(slots))
        # a node without a tag whose users are all of one layer (forward or backward) is that
        # layer's, in its own direction
        for i in range(len(self.nodes) - 1, -1, -1):
            n = self.nodes[i]
            if tags[n] is None and n.op == "call_function" and n.users and i != self.boundary_at:
                user_tags = [tags[u] for u in n.users]
                slots = {t[1] for t in user_tags if t is not None}
                if None not in user_tags and len(slots) == 1:
                    tags[n] = (_BACKWARD if i > self.boundary_at else _FORWARD, slots.pop())
        # weight views inside a layer's forward (a linear's transpose) run with that forward
        started: set = set()
        for n in self.nodes:
            t = tags[n]
            if t is not None and t[0] == _FORWARD:
                started.add(t[1])
            elif t is not None and t[0] == _WEIGHTS and t[1] in started:
                tags[n] = (_FORWARD, t[1])
        return self._carried_forward(tags)

    def _carried_forward(self, tags: dict) -> dict:
        """A forward node reading only the layer below's output, run after the next layer began
        and read by it alone (Mamba's ``residual.to(float32)`` of its input, after its norm), is
        the next layer's."""
        first: dict = {}
        for i, n in enumerate(self.nodes[:self.boundary_at]):
            t = tags[n]
            if t is not None and t[0] == _FORWARD:
                first.setdefault(t[1], i)
        for i in range(self.boundary_at - 1, -1, -1):
            n, t = self.nodes[i], tags[self.nodes[i]]
            if t is None or t[0] != _FORWARD or not n.users or i < first.get(t[1] + 1, len(self.nodes)):
                continue
            if all(tags.get(u) == (_FORWARD, t[1] + 1) for u in n.users):
                tags[n] = (_FORWARD, t[1] + 1)
        return tags

    def grow(self) -> Captured:
        tags = self.tags = self._tag()
        for n in self.nodes:
            if n.op in ("get_attr", "call_module") and any(tags.get(u) is not None for u in n.users):
                raise NotRepeatable("a layer calls a submodule of the graph")
        blocks: dict = {}
        for n in self.nodes:
            t = tags[n]
            if t is not None and t[0] != "P":
                blocks.setdefault(t, []).append(n)
        self.blocks = blocks
        self.pos = {n: i for blk in blocks.values() for i, n in enumerate(blk)}
        self.directions = sorted({d for d, _ in blocks})
        for d in self.directions:
            if not blocks.get((d, 2)):
                raise NotRepeatable("the middle layer has no nodes of its own")
            if len({len(blocks.get((d, k), [])) for k in (1, 2, 3)}) != 1 \
                    or self._roles(d, 1, -1) != self._roles(d, 2, -1) or self._roles(d, 2, 1) != self._roles(d, 3, 1):
                raise NotRepeatable("the middle layers trace differently")
            if d == _WEIGHTS:
                continue   # emitted after each run of layer 2's: they read weights only
            if d == _FORWARD and self.index[blocks[(d, 2)][-1]] > self.index[blocks[(d, 3)][0]]:
                raise NotRepeatable("the layers' nodes interleave")
        self.hoisted = self._late_backward() if (_BACKWARD, 2) in blocks else []
        for n in self.nodes:
            t = tags[n]
            for a in n.all_input_nodes if t is not None and t[0] != "P" else ():
                u = tags.get(a)
                if u is not None and abs(u[1] - t[1]) > 1 and {u[1], t[1]} != {0, TRACED - 1}:
                    raise NotRepeatable("a layer reads a layer two or more away")
        outputs = list(self.graph.output_node().args[0])
        for o in outputs[:getattr(self.c, "n_outputs", len(outputs))]:
            if isinstance(o, torch.fx.Node) and tags.get(o) is not None and tags[o][1] != TRACED - 1:
                raise NotRepeatable("the model returns a value of each layer")
        return self._emit()

    def _late_backward(self) -> list:
        """Nodes of backward block 3 that autograd placed after block 2 began (a bf16 norm's
        cast of its input, made where the layer below needs it). The repeats go between the two
        blocks, so these are emitted before them: allowed when they read only earlier nodes."""
        start = self.index[self.blocks[(_BACKWARD, 2)][0]]
        late = [n for n in self.blocks.get((_BACKWARD, 3), []) if self.index[n] > start]
        ready = set(late)
        for n in late:
            if any(self.index[a] > start and a not in ready for a in n.all_input_nodes):
                raise NotRepeatable("the layers' nodes interleave")
        return late

    def _roles(self, direction: str, slot: int, unseen: int) -> list:
        """Each node of a middle block with its inputs named by role, positions in the block
        ``unseen`` layers away left out. Blocks 1 and 2 are compared without their positions
        below (block 0 holds the first layer's extras), 2 and 3 without those above (block 4
        the last layer's); so each repeat's neighbours are checked where it reads them."""
        def role(a):
            t = self.tags.get(a)
            if t is None:
                return ("fixed", a.name)
            d = t[1] - slot
            if abs(d) > 1:
                raise NotRepeatable("a layer reads a layer two or more away")
            if t[0] == "P":
                return ("param", d, self.param_slot[a.name][1])
            return ("block", t[0], d, None if d == unseen else self.pos[a])

        return [(n.op, str(n.target), repr(torch.fx.map_arg((n.args, n.kwargs), role)), _val_structure(n))
                for n in self.blocks[(direction, slot)]]

    # emission ----------------------------------------------------------------------------------
    def _rename(self, name: str, target: str, slot: int, layer: int) -> tuple[str, str]:
        old, prefix = slot + self.start, self.stack.prefix   # the traced name: its index in the cut list
        us = prefix.replace(".", "_")
        return (name.replace(f"{us}_{old}_", f"{us}_{layer}_", 1),
                target.replace(f"{prefix}.{old}.", f"{prefix}.{layer}.", 1))

    def _emit(self) -> Captured:
        graph = torch.fx.Graph()
        graph._codegen = self.graph._codegen
        self.g, self.new_of, self.copy_of, self.placeholder_of = graph, {}, {}, {}
        self.roles: dict[str, tuple] = {}    # Captured.layer_roles
        self.sources: list[tuple] = []       # per new placeholder: (traced node, layer, slot)
        placeholders = self._emit_placeholders()
        first_bwd = self.blocks.get((_BACKWARD, 2), [None])[0]
        last_fwd = self.blocks.get((_FORWARD, 2), [None])[-1]
        weights_run: list = []
        for n in self.nodes:
            if n.op == "placeholder":
                continue
            if weights_run and self.tags[n] != (_WEIGHTS, 2):
                self._emit_weight_copies(weights_run)
            if n is first_bwd:
                for late in self.hoisted:
                    self.new_of[late] = self._emit_node(late, self.depth - 2, 3)
                for layer in reversed(self.repeats):
                    self._emit_copy(_BACKWARD, layer)
            if n in self.new_of:
                continue   # hoisted above
            if n.op == "output":
                graph.output(self._outputs(n))
                continue
            t = self.tags[n]
            self.new_of[n] = self._emit_node(n, None, None) if t is None else \
                self._emit_node(n, self._layer_of_slot(t[1]), t[1])
            if t == (_WEIGHTS, 2):
                weights_run.append(n)
            if n is last_fwd:
                for layer in self.repeats:
                    self._emit_copy(_FORWARD, layer)
        graph.lint()
        gm = lazy_graph_module(self.c.gm, graph, class_name=type(self.c.gm).__name__)
        grown = replace(self.c, gm=gm, placeholders=placeholders, layer_roles=self.roles)
        if hasattr(self.c, "grad_targets"):
            trained = set(self.c.grad_targets)
            grown.grad_targets = [ph.target for ph, (n, _, _) in zip(placeholders, self.sources)
                                  if self.by_name[n.name].target in trained]
            n_fwd = self.c.n_outputs
            for node, target in zip(list(graph.output_node().args[0])[n_fwd:], grown.grad_targets):
                if isinstance(node, torch.fx.Node):
                    annotate(node, grad_of=target)
        return grown

    def _emit_placeholders(self) -> list:
        """Placeholders in state order: each repeated layer's after the run of layer 2's."""
        out, run = [], []

        def add(n, layer, slot):
            ph = self.by_name[n.name]
            if slot is None:
                new_ph = ph
            else:
                name, target = self._rename(ph.name, ph.target, slot, layer)
                new_ph = replace(ph, name=name, target=target)
            node = self.g.placeholder(new_ph.name)
            node.meta = dict(n.meta)
            if slot is not None:
                self.placeholder_of[(layer, self.param_slot[n.name][1])] = node
                if slot == 2:
                    self.roles[node.name] = ("P", layer, self.param_slot[n.name][1])
                if layer in self.repeats:
                    node.meta["val"] = _fresh_like(n.meta.get("val"))
            self.sources.append((n, layer, slot))
            out.append(new_ph)
            return node

        def flush():
            for layer in self.repeats:
                for n in run:
                    add(n, layer, 2)
            run.clear()

        for n in self.nodes:
            if n.op != "placeholder":
                continue
            slot = self.param_slot.get(n.name, (None,))[0]
            if run and slot != 2:
                flush()
            self.new_of[n] = add(n, None if slot is None else self._layer_of_slot(slot), slot)
            if slot == 2:
                run.append(n)
        flush()
        return out

    def _resolve(self, a, layer: int | None, slot: int | None):
        """The grown graph's node for input ``a`` of a node of ``slot`` emitted for ``layer``."""
        t = self.tags.get(a)
        if t is None or slot is None:
            return self.new_of[a]
        # a layer's neighbours are relative; the first and last layers read each other as
        # such (a tied embedding's two gradients)
        target = layer + (t[1] - slot) if abs(t[1] - slot) <= 1 else self._layer_of_slot(t[1])
        if t[0] == "P":
            return self.placeholder_of[(target, self.param_slot[a.name][1])]
        if target in self.repeats:
            return self.copy_of[(t[0], target, self.pos[a])]
        return self.new_of[self.blocks[(t[0], self.slot_of_layer[target])][self.pos[a]]]

    def _emit_node(self, n, layer: int | None, slot: int | None):
        args, kwargs = torch.fx.map_arg((n.args, n.kwargs), lambda a: self._resolve(a, layer, slot))
        keep_name = n.name == self.boundary or n.name.startswith("tangent_")
        new = self.g.create_node(n.op, n.target, args, kwargs, name=n.name if keep_name else None)
        new.meta = {k: v for k, v in n.meta.items() if k not in ("val", "tensor_meta")}
        if "val" in n.meta:
            new.meta["val"] = remade_val(n, new)
        if slot == 2:
            self.roles[new.name] = (self.tags[n][0], layer, self.pos[n])
        return new

    def _emit_weight_copies(self, run: list) -> None:
        for layer in self.repeats:
            for n in run:
                self.copy_of[(_WEIGHTS, layer, self.pos[n])] = self._emit_node(n, layer, 2)
        run.clear()

    def _emit_copy(self, direction: str, layer: int) -> None:
        for i, n in enumerate(self.blocks.get((direction, 2), [])):
            self.copy_of[(direction, layer, i)] = self._emit_node(n, layer, 2)

    def _outputs(self, out):
        outputs = list(out.args[0])
        n_fwd = getattr(self.c, "n_outputs", len(outputs))
        fwd = [self._resolve(o, None, None) if isinstance(o, torch.fx.Node) else o for o in outputs[:n_fwd]]
        if not hasattr(self.c, "grad_targets"):
            return type(out.args[0])(fwd)
        grad_of = dict(zip(self.c.grad_targets, outputs[n_fwd:]))
        grads = []
        for n, layer, slot in self.sources:
            g = grad_of.get(self.by_name[n.name].target, "absent")
            if isinstance(g, str):
                continue
            if not isinstance(g, torch.fx.Node):
                grads.append(g)
            elif slot is None:
                grads.append(self._resolve(g, None, None))
            elif self.tags.get(g) is None:
                raise NotRepeatable("a layer's gradient is computed outside the layers")
            else:
                grads.append(self._resolve(g, layer, slot))
        for g in outputs[n_fwd + len(self.c.grad_targets):]:   # the inputs' gradients, where they are made
            t = self.tags.get(g) if isinstance(g, torch.fx.Node) else None
            grads.append(g if not isinstance(g, torch.fx.Node) else
                         self._resolve(g, None, None) if t is None else self._resolve(g, self._layer_of_slot(t[1]), t[1]))
        return type(out.args[0])(fwd + grads)


def _val_structure(n) -> tuple:
    """Shapes, strides, dtypes of a node's value, and which input each output aliases."""
    inputs = {}
    for i, a in enumerate(n.all_input_nodes):
        for j, t in enumerate(pytree.tree_leaves(a.meta.get("val"))):
            if isinstance(t, torch.Tensor):
                inputs.setdefault(_key(t), (i, j))
    out = []
    for t in pytree.tree_leaves(n.meta.get("val")):
        if isinstance(t, torch.Tensor):
            out.append((tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.dtype,
                        inputs.get(_key(t)), t.untyped_storage().nbytes()))
        else:
            out.append(repr(t))
    return tuple(out)


def _fresh_like(val):
    """A new traced tensor with ``val``'s layout and storage size (a storage of its own)."""
    if not isinstance(val, torch.Tensor):
        return val
    return on_storage(val, torch.UntypedStorage(val.untyped_storage().nbytes(), device="meta"))


def remade_val(old: torch.fx.Node, new: torch.fx.Node):
    """``old``'s traced value with the same layout, aliasing ``new``'s inputs where ``old``'s
    aliased the corresponding inputs, and fresh storage where it had its own."""
    val = old.meta.get("val")
    leaves, spec = pytree.tree_flatten(val)
    if not any(isinstance(t, torch.Tensor) for t in leaves):
        return val
    old_in = [t for a in old.all_input_nodes for t in pytree.tree_leaves(a.meta.get("val"))]
    new_in = [t for a in new.all_input_nodes for t in pytree.tree_leaves(a.meta.get("val"))]
    storage = {}
    for o, n in zip(old_in, new_in):
        if isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor):
            storage.setdefault(_key(o), n.untyped_storage())
    out = []
    for t in leaves:
        if not isinstance(t, torch.Tensor):
            out.append(t)
            continue
        k = _key(t)
        if k not in storage:
            storage[k] = torch.UntypedStorage(t.untyped_storage().nbytes(), device="meta")
        out.append(on_storage(t, storage[k]))
    return pytree.tree_unflatten(out, spec)


def realiased_val(val, old_inputs, new_inputs):
    """``val`` (a traced value that may view its inputs) moved onto new inputs: each leaf on the
    storage of a leaf of ``old_inputs`` goes onto the matching leaf's of ``new_inputs``; None
    when no leaf moves. An op whose input is swapped for a recomputed copy views the copy."""
    storage = {}
    for o, n in zip(pytree.tree_leaves(old_inputs), pytree.tree_leaves(new_inputs)):
        if isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor) and _key(o) != _key(n):
            storage.setdefault(_key(o), n.untyped_storage())
    leaves, spec = pytree.tree_flatten(val)
    if not storage or not any(isinstance(t, torch.Tensor) and _key(t) in storage for t in leaves):
        return None
    out = [on_storage(t, storage[_key(t)]) if isinstance(t, torch.Tensor) and _key(t) in storage else t
           for t in leaves]
    return pytree.tree_unflatten(out, spec)


__all__ = ["MIN_LAYERS", "NotRepeatable", "Stack", "capture_repeated", "find_stack", "identical_modules",
           "traced_layers"]
