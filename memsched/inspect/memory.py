"""Device bytes after every node of a scheduled program, split by what the bytes hold.

The simulator predicts one total per node (``plan.sim.timeline``). This walk recounts it
independently, per storage (the way ``memsched/verify.py`` does: a storage is held while any
value referencing it is alive; a prefetch is a fresh storage that its wait hands on; a free
drops its values), and remembers for every storage the kind of data in it, so a plot can
stack weights, activations, grads and the rest. Any difference from the simulator's total
(none for the programs the planner builds today) is reported as ``residual`` and folded in,
so the stack always tops out at the simulator's number.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..runtime import ops
from ..verify import storages  # the verifier's per-storage reading of a value

CATEGORIES = ("weights", "activations", "grads", "other")
# fine kinds (node.meta["memsched.kind"] and this walk's own) -> plotted category
_CATEGORY = {"weight": "weights", "buffer": "weights", "constant": "weights",
             "activation": "activations", "grad": "grads"}


def category(kind: str | None) -> str:
    """The plotted category of a data kind; inputs, tangents and unknown kinds are "other"."""
    return _CATEGORY.get(kind or "", "other")


def inserted_op(node: fx.Node) -> str | None:
    """"prefetch", "wait", "offload" or "free" for a node the rewriting pass inserted, else None."""
    if node.op == "call_function" and node.target in ops.INSERTED_OPS:
        return node.target.__name__
    return None


@dataclass
class MemoryRow:
    index: int
    name: str
    kind: str | None           # kind of data the node produces, restores or saves (None: free, output)
    total: int                 # device bytes after the node, as the simulator predicts
    by_category: dict          # category -> bytes; sums to ``total``
    residual: int              # simulator total minus this walk's own count (0 when they agree)


def _walk(gm: fx.GraphModule) -> list[tuple[str, str | None, dict]]:
    held: dict[object, list] = {}               # storage key -> [bytes, refs, kind]
    of_value: dict[str, list[object]] = {}
    kind_of: dict[str, str] = {}                # value name -> kind of data it holds
    restored_as: dict[object, object] = {}     # storage of a restored value -> its fetch buffer
    cur = dict.fromkeys(CATEGORIES, 0)

    def add(name, entries, kind):
        of_value[name] = []
        for key, nbytes in entries:
            key = restored_as.get(key, key)
            of_value[name].append(key)
            if key in held:
                held[key][1] += 1
            else:
                held[key] = [nbytes, 1, kind]
                cur[category(kind)] += nbytes

    def remove(name):
        for key in of_value.pop(name, []):
            e = held[key]
            e[1] -= 1
            if e[1] == 0:
                del held[key]
                cur[category(e[2])] -= e[0]

    def existing_kind(entries):
        """The kind of the storage a value shares, when it allocates nothing new (a view)."""
        keys = [restored_as.get(k, k) for k, _ in entries]
        if keys and all(k in held for k in keys):
            return held[keys[0]][2]
        return None

    rows = []
    for n in gm.graph.nodes:
        declared = n.meta.get("memsched.kind")
        op = inserted_op(n)
        kind = None
        if n.op == "placeholder":
            kind = declared or "input"
            if n.meta.get("memsched.tier", "device") == "device":
                add(n.name, storages(n.meta.get("val")), kind)
        elif op == "prefetch":
            src = n.args[0]
            kind = declared or kind_of.get(src.name, "other")
            add(n.name, [(("fetched", n.name), int(n.meta["memsched.nbytes"]))], kind)
        elif op == "wait":
            p = n.args[0]
            kind = declared or kind_of.get(p.name, "other")
            of_value[n.name] = of_value.pop(p.name, [])
            for key, _ in storages(n.meta.get("val")):
                restored_as[key] = ("fetched", p.name)
        elif op == "offload":
            kind = declared or kind_of.get(n.args[0].name, "other")
        elif op == "free":
            for x in n.args:
                if isinstance(x, fx.Node):
                    remove(x.name)
        elif n.op == "call_function":  # compute of any kind, including ops this file never heard of
            entries = storages(n.meta.get("val"))
            kind = declared or existing_kind(entries) or "activation"
            add(n.name, entries, kind)
        if kind is not None:
            kind_of[n.name] = kind
        rows.append((n.name, kind, dict(cur)))
    return rows


def _fold(split: dict, total: int) -> dict:
    """Make ``split`` sum to ``total``: a shortfall goes to "other"; an excess comes out of
    "other" first, then out of every category in proportion."""
    split = dict(split)
    diff = total - sum(split.values())
    if diff >= 0:
        split["other"] += diff
        return split
    take = min(split["other"], -diff)
    split["other"] -= take
    diff += take
    if diff:
        have = sum(split.values())
        scaled = {k: v * total // have for k, v in split.items()} if have else dict.fromkeys(split, 0)
        biggest = max(scaled, key=scaled.get)
        scaled[biggest] += total - sum(scaled.values())
        split = scaled
    return split


def memory_by_kind(plan) -> list[MemoryRow]:
    """One row per node of ``plan.graph``: predicted device bytes after it, per category."""
    walk = _walk(plan.graph)
    timeline = plan.sim.timeline
    if [name for name, _ in timeline] != [name for name, _, _ in walk]:
        raise ValueError("plan.sim.timeline does not follow plan.graph node for node: "
                         "was the graph changed after it was simulated?")
    rows = []
    for i, ((name, kind, split), (_, total)) in enumerate(zip(walk, timeline)):
        rows.append(MemoryRow(i, name, kind, int(total), _fold(split, int(total)),
                              int(total) - sum(split.values())))
    return rows
