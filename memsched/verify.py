"""An independent checker for scheduled programs; it shares no code with the planner.

It walks the scheduled graph as written and checks: every value is defined before it is
read and not read after it is freed; nothing is freed twice; a wait consumes a prefetch, a
prefetch reads a home tensor or an offload handle; the device bytes held -- counted per
storage, a prefetch being a fresh storage -- stay within the budget at every node; and every
tensor is accounted for: when the program returns, the device holds only its outputs and the
resident model tensors, every fetch was waited on and every offload handle released.
Every message names the step (the node's index in the graph) and the node: ``step 12 (mm_3)``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree


class PlanError(AssertionError):
    """A scheduled program breaks a rule; the message names the node (the step)."""


_PREFETCH, _WAIT, _OFFLOAD, _FREE = "prefetch", "wait", "offload", "free"
# placeholder kinds (meta "memsched.kind") owned by the model: they stay on the device across calls
_MODEL_KINDS = ("weight", "buffer", "constant")


def _kind(node: fx.Node) -> str:
    return getattr(node.target, "__name__", "") if node.op == "call_function" and \
        getattr(node.target, "__module__", "").endswith("runtime.ops") else "compute"


def storages(val) -> list[tuple[int, int]]:
    """(storage identity, bytes) of every tensor leaf; views share their base's identity."""
    out = []
    for t in pytree.tree_leaves(val):
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            out.append((st._cdata, st.nbytes()))
    return out


def verify_schedule(gm: fx.GraphModule, budget: int) -> int:
    """Raise PlanError on the first broken rule; return the peak device bytes it counted."""
    defined, freed, kinds = set(), set(), {}
    handles: dict[str, int] = {}  # offload handles not yet released -> their step
    held: dict[object, list[int]] = {}
    of_value: dict[str, list[object]] = {}
    cur = peak = 0

    # a restored value takes over the storage identity of the one it restores, so views made
    # of it later (which share that identity in the traced metadata) cost nothing new
    restored_as: dict[object, object] = {}

    def add(name, entries):
        nonlocal cur, peak
        of_value[name] = []
        for key, nbytes in entries:
            key = restored_as.get(key, key)
            of_value[name].append(key)
            if key in held:
                held[key][1] += 1
            else:
                held[key] = [nbytes, 1]
                cur += nbytes
        peak = max(peak, cur)

    def remove(name):
        nonlocal cur
        for key in of_value.pop(name, []):
            held[key][1] -= 1
            if held[key][1] == 0:
                cur -= held.pop(key)[0]

    for step, n in enumerate(gm.graph.nodes):
        where = f"step {step} ({n.name})"
        try:
            for inp in n.all_input_nodes:
                if inp.name not in defined:
                    raise PlanError(f"{where} reads {inp.name} before it is defined")
                if inp.name in freed:
                    raise PlanError(f"{where} reads {inp.name} after it was freed")
            kind = _kind(n)
            kinds[n.name] = kind
            if kind not in (_PREFETCH, _WAIT, _FREE):
                # compute, offload and the output read device values only: not a home copy on
                # host/disk, not a fetch still in flight, not an offload handle
                for inp in n.all_input_nodes:
                    if inp.op == "placeholder" and inp.meta.get("memsched.tier", "device") != "device":
                        raise PlanError(f"{where} reads {inp.name}, which lives on "
                                        f"{inp.meta.get('memsched.tier')} and was never loaded")
                    if n.op == "output" and inp.meta.get("memsched.delivers"):
                        continue  # a gradient handed back as its host/disk copy
                    if kinds.get(inp.name) in (_PREFETCH, _OFFLOAD):
                        raise PlanError(f"{where} reads {inp.name}, a {kinds[inp.name]} handle, not a "
                                        f"device tensor (missing wait?)")
            if n.op == "placeholder":
                if n.meta.get("memsched.tier", "device") == "device":
                    add(n.name, storages(n.meta.get("val")))
            elif kind == _PREFETCH:
                src = n.args[0]
                if not (src.op == "placeholder" or kinds.get(src.name) == _OFFLOAD):
                    raise PlanError(f"{where} prefetches {src.name}, which is neither a home tensor nor an offload")
                if src.op == "placeholder" and src.meta.get("memsched.tier") not in ("host", "disk"):
                    raise PlanError(f"{where} prefetches {src.name}, whose home is not host or disk")
                if "memsched.nbytes" not in n.meta:
                    raise PlanError(f"{where} prefetches {src.name} but does not say how many bytes it moves")
                add(n.name, [(("fetched", n.name), int(n.meta["memsched.nbytes"]))])
            elif kind == _WAIT:
                p = n.args[0]
                if kinds.get(p.name) != _PREFETCH:
                    raise PlanError(f"{where} waits on {p.name}, which is not a prefetch")
                of_value[n.name] = of_value.pop(p.name, [])
                freed.add(p.name)  # consumed
                for key, _ in storages(n.meta.get("val")):
                    restored_as[key] = ("fetched", p.name)
            elif kind == _OFFLOAD:
                if n.args[1] not in ("host", "disk"):
                    raise PlanError(f"{where} offloads to unknown tier {n.args[1]!r}")
                handles[n.name] = step
            elif kind == _FREE:
                for x in n.args:
                    if x.name in freed:
                        raise PlanError(f"{where} frees {x.name} twice")
                    freed.add(x.name)
                    handles.pop(x.name, None)
                    remove(x.name)
            elif n.op == "call_function":
                add(n.name, storages(n.meta.get("val")))
            elif n.op == "output":
                _check_accounted(where, n, gm, of_value, handles)
            if cur > budget:
                raise PlanError(f"{where}: {cur} device bytes held, over the budget of {budget}")
            defined.add(n.name)
        except (IndexError, AttributeError, KeyError, TypeError) as e:  # a hand-edited program
            raise PlanError(f"{where}: malformed {_kind(n)} node ({type(e).__name__}: {e})") from None
    return peak


def _check_accounted(where: str, out: fx.Node, gm: fx.GraphModule, of_value: dict, handles: dict) -> None:
    """At the return: the device holds only outputs and resident model tensors; no fetch is
    still pending and no offload handle unreleased."""
    returned = {x.name for x in out.all_input_nodes}
    nodes = {n.name: n for n in gm.graph.nodes}

    def resident(name):
        n = nodes[name]
        return n.op == "placeholder" and n.meta.get("memsched.kind") in _MODEL_KINDS

    pending = [name for name, keys in of_value.items() if keys and _kind(nodes[name]) == _PREFETCH]
    if pending:
        raise PlanError(f"{where}: the program returns with {_names(pending)} never waited on")
    leaked = [name for name, keys in of_value.items() if keys and name not in returned and not resident(name)]
    if leaked:
        raise PlanError(f"{where}: the program returns with {_names(leaked)} still held on the device "
                        f"(not an output, not a resident model tensor: a missing free)")
    kept = [h for h in handles if h not in returned]  # a returned handle: a delivered gradient
    if kept:
        raise PlanError(f"{where}: the program returns with offload handle(s) {_names(kept)} never freed")


def _names(names) -> str:
    names = list(names)
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
