"""The scheduled program as rows: one plain dict per node, ready for ``pandas.DataFrame``.

Times come from the simulator's spans. A compute node or a transfer has its own span; a
wait lasts from where compute stood until its fetch landed, and a free of a value an offload
reads lasts until that copy has left the device (the end of the offload's first link), which
is how the simulator stalls. The stalls of the rows add up to ``plan.sim.stall_s``.
"""
from __future__ import annotations

import torch.fx as fx

from ..ir.listing import op_label
from ..ir.meta import info
from ..ir.tensors import value_nbytes
from .memory import inserted_op, memory_by_kind

COLUMNS = ("index", "name", "op", "pass", "kind", "tier", "move", "stream", "value", "nbytes",
           "out_bytes", "live_bytes", "start_s", "end_s", "stall_s")


def plan_steps(plan) -> list[dict]:
    """One dict per node of ``plan.graph`` with only str/int/float/None values (see COLUMNS).

    ``nbytes`` is what a prefetch or offload copies (0 for other nodes), ``out_bytes`` what a
    compute node produces (or a placeholder holds), ``live_bytes`` the predicted device bytes
    after the node, ``stream`` "compute" or the links a move occupies ("disk_read+h2d").
    """
    spans: dict[str, list] = {}
    for s in plan.sim.spans:
        spans.setdefault(s.name, []).append(s)
    memory = memory_by_kind(plan)
    rows = []
    now = 0.0                                   # where compute stands, as in the simulator
    offload_of: dict[str, fx.Node] = {}         # value name -> the latest offload reading it
    for n, mem in zip(plan.graph.graph.nodes, memory):
        op = inserted_op(n)
        tier = info(n).tier
        own = spans.get(n.name, [])
        move = stream = None
        nbytes = 0
        start = end = now
        if op in ("prefetch", "offload"):
            move = f"{tier}->device" if op == "prefetch" else f"device->{tier}"
            nbytes = int(info(n).nbytes or 0)
            stream = "+".join(s.stream for s in own) or None
            if own:
                start, end = own[0].start, own[-1].end
            if op == "offload":
                offload_of[n.args[0].name] = n
        elif op == "wait":
            landed = spans.get(n.args[0].name)
            end = max(now, landed[-1].end) if landed else now
            now = end
        elif op == "free":
            for x in n.args:
                o = offload_of.pop(getattr(x, "name", None), None)
                if o is not None and spans.get(o.name):
                    end = max(end, spans[o.name][0].end)
            now = end
        elif own:                               # compute, including ops added after this file
            compute = [s for s in own if s.stream == "compute"]
            if compute:
                start, end = compute[0].start, compute[-1].end
                stream = "compute"
                now = end
        rows.append({
            "index": mem.index,
            "name": n.name,
            "op": op or op_label(n),
            "pass": info(n).made_by,
            "kind": mem.kind,
            "tier": None if tier is None else str(tier),
            "move": move,
            "stream": stream,
            "value": info(n).restores or info(n).saves,
            "nbytes": nbytes,
            "out_bytes": value_nbytes(n.meta.get("val")) if op is None and n.op in ("call_function", "placeholder") else 0,
            "live_bytes": mem.total,
            "start_s": float(start),
            "end_s": float(end),
            "stall_s": float(end - start) if op in ("wait", "free") else 0.0,
        })
    return rows
