"""A higher-order op's subgraph copied into the graph in place of the call."""
from __future__ import annotations

import operator

import torch.fx as fx


def inline_call(gm: fx.GraphModule, node: fx.Node, getter: fx.Node, inputs) -> list[fx.Node]:
    """Copy the subgraph ``getter`` names (called by ``node`` on ``inputs``) before ``node``,
    point the getitems of ``node`` at the copies and erase the call; returns the copied nodes.
    A subgraph's own subgraphs (nested calls) move to ``gm``, their calls with the copies."""
    graph, sub = gm.graph, operator.attrgetter(getter.target)(gm)
    env = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], inputs))
    copied = []
    with graph.inserting_before(node):
        for sn in sub.graph.nodes:
            if sn.op == "get_attr":
                name = _free_name(gm, "submod")
                gm.add_submodule(name, operator.attrgetter(sn.target)(sub))
                env[sn] = graph.get_attr(name)
                env[sn].meta.update(sn.meta)
            elif sn.op not in ("placeholder", "output"):
                env[sn] = graph.node_copy(sn, lambda x: env[x])
            else:
                continue
            copied.append(env[sn])
    results = sub.graph.output_node().args[0]
    outs = [env[o] if isinstance(o, fx.Node) else o for o in results]
    for user in list(node.users):
        if user.target is operator.getitem:
            user.replace_all_uses_with(outs[user.args[1]])
            graph.erase_node(user)
    if not node.users:
        graph.erase_node(node)
        if not getter.users:
            graph.erase_node(getter)
    return copied


def drop_unused_subgraphs(gm: fx.GraphModule) -> None:
    """Delete ``gm``'s subgraphs its graph no longer calls. (``delete_all_unused_submodules``
    also deletes a subgraph's own subgraphs, which only that subgraph's graph names.)"""
    used = {n.target.split(".")[0] for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_children()):
        if name not in used:
            delattr(gm, name)


def _free_name(gm: fx.GraphModule, prefix: str) -> str:
    i = 0
    while hasattr(gm, f"{prefix}_{i}"):
        i += 1
    return f"{prefix}_{i}"
