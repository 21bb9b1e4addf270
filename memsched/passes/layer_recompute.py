"""Layer recompute: a training step that saves only each layer's inputs and recomputes the rest
of the layer in the backward, as per-block checkpointing does (``torch.utils.checkpoint``
around every layer of a stack).

The placement drops a saved value only where it can be rebuilt from values on the device at
that moment (passes/recipes.py: a few ops, reading other saved values). It cannot drop a whole
layer and rebuild it from the layer's input: each value's recompute reads its neighbours, so
either all stay or each must be moved. Where moves are dear and arithmetic cheap (a GPU behind
PCIe), that leaves it far behind checkpointing. This pass writes the other program: in the
layer stack (the ``nn.ModuleList`` holding the most parameters), every value a layer's backward
reads that the layer's forward made is recomputed right before its first backward use, from
the layer's inputs and weights, by clones of the forward ops (passes/remat.py's rewrite, with
every pure deterministic op clonable, not only pointwise ones). Random ops (dropout) are never
cloned: their outputs stay saved. The planning pipeline plans this program beside the other
and keeps it only when it simulates faster at the budget (pipeline.layer_recompute_pass).

A forward op's layer comes from program order (``_layers``): from the first op reading one of
the layer's weights to the first reading the next layer's. Ops that read a layer's input before
its first weight fall in the layer before, which is harmless: they are rebuilt from that
layer's input instead.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from ..ir.graph_module import lazy_graph_module
from ..ir.meta import info
from ..ir.tensors import storages
from .fusion import fusible
from .remat import AGAIN, Remat, _Joint, _keys, _rewrite

MIN_LAYERS = 2


def layer_of_weights(model: torch.nn.Module, placeholders) -> dict[str, int]:
    """Graph placeholder name -> index of the layer of the stack holding that weight."""
    best, best_bytes = None, 0
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) >= MIN_LAYERS and path:
            nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
            if nbytes > best_bytes:
                best, best_bytes = path, nbytes
    if best is None:
        return {}
    pattern = re.compile(re.escape(best) + r"\.(\d+)\.")
    out = {}
    for ph in placeholders:
        m = pattern.match(ph.target or "")
        if m:
            out[ph.name] = int(m.group(1))
    return out


class _LayerJoint(_Joint):
    """Any pure deterministic forward op may be cloned (remat's: pointwise ones and views)."""

    def clonable(self, n: fx.Node) -> bool:
        return (n in self.fwd_set and fusible(n)
                and not (_keys(n) & self.written)
                and not any(_keys(x) & self.written for x in n.all_input_nodes))


def _layers(j: _Joint, weights: dict[str, int]) -> dict[fx.Node, int]:
    """Each forward op's layer, by program order: layer L runs from the first op reading one of
    its weights to the op before the first reading one of layer L+1's; the last layer ends at
    its last weight's last reader. Ops before the stack (embeddings) and after it (the final
    norm, the head, the loss) belong to none."""
    first: dict[int, int] = {}
    last = -1
    top = max(weights.values(), default=-1)
    made_of: dict[fx.Node, int] = {}   # weights, and values made of them alone (a detach, a view)
    for i, n in enumerate(j.forward):
        if n.op == "placeholder":
            if n.name in weights:
                made_of[n] = weights[n.name]
            continue
        inputs = n.all_input_nodes
        layers = [made_of[x] for x in inputs if x in made_of]
        if layers and len(layers) == len(inputs):
            made_of[n] = max(layers)
            continue
        for layer in layers:   # a weight meets the layer's values here
            first.setdefault(layer, i)
            if layer == top:
                last = i
    starts = sorted((i, layer) for layer, i in first.items())
    tag: dict[fx.Node, int] = {}
    for k, (start, layer) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else last + 1
        for n in j.forward[start:end]:
            if n.op != "placeholder" and n not in made_of:
                tag[n] = layer
    return tag


def _leaves(j: _Joint, v: fx.Node) -> list[fx.Node] | None:
    """The values rebuilding ``v`` reads that are neither available nor clonable (they must stay
    saved); None when ``v`` itself cannot be cloned."""
    if not j.clonable(v):
        return None
    out, seen, stack = [], {v}, [v]
    while stack:
        for x in stack.pop().all_input_nodes:
            if x in seen or j.available(x):
                continue
            seen.add(x)
            if j.clonable(x):
                stack.append(x)
            else:
                out.append(x)
    return out


def recomputed_ops(gm: fx.GraphModule) -> set[str]:
    """The forward ops a rewritten program runs again in its backward (its clones' originals)."""
    return {n.name[:-len(AGAIN)] for n in gm.graph.nodes
            if n.op == "call_function" and info(n).made_by == "remat" and n.name.endswith(AGAIN)}


def recompute_layers(gm: fx.GraphModule, weights: dict[str, int],
                     held=frozenset()) -> tuple[fx.GraphModule, Remat]:
    """``gm``'s joint graph with each layer's saved values recomputed in the backward from the
    layer's inputs (module docstring); ``gm`` itself when there is nothing to drop. ``weights``:
    placeholder -> layer (``layer_of_weights``); ``held``: the placeholders held through the step."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    j = _LayerJoint(graph, frozenset(held))
    tag = _layers(j, weights)
    if len(set(tag.values())) < MIN_LAYERS:
        return gm, Remat((), 0, 0)
    # a layer's inputs stay saved: the values from outside it (an earlier layer, the embedding)
    # that its ops read, whether autograd saved them or not (else a layer's recompute would
    # reach back through the layers before it)
    roots = {x for n in j.forward if n in tag for x in n.all_input_nodes
             if x.op != "placeholder" and tag.get(x, -1) < tag[n]}
    candidates = [v for v in j.forward if v in tag and v not in roots and v.op != "placeholder"
                  and _keys(v) and _keys(v) <= j.saved]
    for v in candidates:   # drop every candidate first: a chain reads only what stays
        j.saved -= _keys(v)
    for r in roots:
        j.saved |= _keys(r)
    dropped = []
    for v in candidates:
        leaves = _leaves(j, v)
        if leaves is None:     # random, or written in place: it stays saved
            j.saved |= _keys(v)
            continue
        for x in leaves:
            j.saved |= _keys(x)
        dropped.append(v)
    dropped = [v for v in dropped if not (_keys(v) <= j.saved)]   # kept as another's leaf after all
    if not dropped:
        return gm, Remat((), 0, 0)
    sizes = {}   # each storage once: views of one value share it
    for v in dropped:
        sizes.update(storages(v.meta.get("val")))
    nbytes = sum(sizes.values())
    ops = _rewrite(graph, j)
    for n in reversed(j.forward):   # forward values only the old backward read
        if not n.users and n.op == "call_function" and fusible(n):
            graph.erase_node(n)
    graph.lint()
    return lazy_graph_module(gm, graph, class_name="LayerRecompute"), \
        Remat(tuple(v.name for v in dropped), nbytes, ops)
