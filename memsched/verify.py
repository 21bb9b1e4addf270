"""An independent checker for scheduled programs; it shares no code with the planner.

It walks the scheduled graph as written and checks: every value is defined before it is
read and not read after it is freed; nothing is freed twice; a wait consumes a prefetch, a
prefetch reads a home tensor or an offload handle; every move moves what it says it moves
(a prefetch restores the value its source holds, with the bytes that value's shape and dtype
take, recounted here rather than read from the plan); the device bytes held -- counted per
storage, a prefetch being a fresh storage -- stay within the budget at every node; and every
tensor is accounted for: when the program returns, the device holds only its outputs and the
resident model tensors, every fetch was waited on and every offload handle released; and no
value is recomputed by re-running its op after its storage was written in place.
Every message names the step (the node's index in the graph) and the node: ``step 12 (mm_3)``.
It reads the IR's vocabulary (ops, kinds, node facts) and nothing of the planner.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .ir.effects import written_args
from .ir.kinds import OFF_DEVICE, PERSISTENT, Tier
from .ir.meta import info, tier_of
from .ir.ops import Op, op_of, register
from .ir.tensors import tensor_leaves


class PlanError(AssertionError):
    """A scheduled program breaks a rule; the message names the node (the step)."""


def _storages(val) -> list[tuple[int, int]]:
    """(storage identity, bytes) of every tensor leaf; views share their base's identity."""
    return [(t.untyped_storage()._cdata, t.untyped_storage().nbytes()) for t in tensor_leaves(val)]


def _shape(val) -> tuple | None:
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None


def _elements_bytes(val) -> int:
    return val.numel() * val.element_size() if isinstance(val, torch.Tensor) else 0


class _Checker:
    def __init__(self, budget: int, block: int = 1, workspace: int = 0):
        self.budget = budget
        self.block = block     # the allocator hands out whole blocks of this many bytes
        self.defined: set[str] = set()
        self.freed: set[str] = set()
        self.ops: dict[str, Op | None] = {}
        self.handles: dict[str, int] = {}          # offload handles not yet released -> step
        self.held: dict[object, list[int]] = {}
        self.of_value: dict[str, list[object]] = {}
        self.holds: dict[str, str] = {}            # node -> the captured value it holds
        self._offloaded: dict[str, object] = {}    # offload handle -> the value it copied
        self.cur = self.peak = workspace   # held by the device's libraries throughout
        # a restored value takes over the storage identity of the one it restores, so views
        # made of it later (which share that identity in the traced metadata) cost nothing new
        self.restored_as: dict[object, object] = {}
        self.made: dict[str, list[object]] = {}    # value made by its own op -> its storages
        self.written: dict[object, str] = {}      # storage -> the first step that wrote it in place

    # -- device bytes -----------------------------------------------------------------------
    def add(self, name, entries):
        self.of_value[name] = []
        for key, nbytes in entries:
            key = self.restored_as.get(key, key)
            self.of_value[name].append(key)
            if key in self.held:
                self.held[key][1] += 1
            else:
                nbytes = (nbytes + self.block - 1) // self.block * self.block
                self.held[key] = [nbytes, 1]
                self.cur += nbytes
        self.peak = max(self.peak, self.cur)

    def remove(self, name):
        for key in self.of_value.pop(name, []):
            self.held[key][1] -= 1
            if self.held[key][1] == 0:
                self.cur -= self.held.pop(key)[0]

    # -- reads ------------------------------------------------------------------------------
    def check_reads(self, where, n, op):
        for inp in n.all_input_nodes:
            if inp.name not in self.defined:
                raise PlanError(f"{where} reads {inp.name} before it is defined")
            if inp.name in self.freed:
                raise PlanError(f"{where} reads {inp.name} after it was freed")
        if op in (Op.PREFETCH, Op.WAIT, Op.FREE):
            return
        # compute, offload and the output read device values only: not a home copy on
        # host/disk, not a fetch still in flight, not an offload handle
        for inp in n.all_input_nodes:
            if inp.op == "placeholder" and tier_of(inp) != Tier.DEVICE:
                raise PlanError(f"{where} reads {inp.name}, which lives on {tier_of(inp)} and was never loaded")
            if n.op == "output" and info(inp).delivers:
                continue  # a gradient or host output handed back as its host/disk copy
            if self.ops.get(inp.name) in (Op.PREFETCH, Op.OFFLOAD):
                raise PlanError(f"{where} reads {inp.name}, a {self.ops[inp.name].value} handle, not a "
                                f"device tensor (missing wait?)")

    # -- one handler per node kind ------------------------------------------------------------
    def placeholder(self, where, step, n):
        self.holds[n.name] = n.name
        if tier_of(n) == Tier.DEVICE:
            self.add(n.name, _storages(n.meta.get("val")))

    def compute(self, where, step, n):
        restores = info(n).restores
        if restores is not None and _fresh(n):
            # re-running the op that made a value gives it back as it was made: not with the
            # writes in place its storage had since
            for key in self.made.get(restores, ()):
                if key in self.written:
                    raise PlanError(f"{where} recomputes {restores}, which {self.written[key]} wrote in place "
                                    f"after it was made: re-running its op does not replay that write")
        elif restores is None:
            self.made[n.name] = [key for key, _ in _storages(n.meta.get("val"))]
        for w in written_args(n):
            for key, _ in _storages(w.meta.get("val")):
                self.written.setdefault(key, where)
        self.holds[n.name] = restores or n.name  # a recomputation holds what it restores
        self.add(n.name, _storages(n.meta.get("val")))
        scratch = info(n).scratch or 0   # held inside the op while it runs
        if scratch and self.cur + scratch > self.budget:
            raise PlanError(f"{where}: {self.cur + scratch} device bytes held ({scratch} inside the op "
                            f"while it runs), over the budget of {self.budget}")
        self.peak = max(self.peak, self.cur + scratch)

    def prefetch(self, where, step, n):
        src = n.args[0]
        if not (src.op == "placeholder" or self.ops.get(src.name) is Op.OFFLOAD):
            raise PlanError(f"{where} prefetches {src.name}, which is neither a home tensor nor an offload")
        if src.op == "placeholder" and tier_of(src) not in OFF_DEVICE:
            raise PlanError(f"{where} prefetches {src.name}, whose home is not host or disk")
        source_value = self.holds.get(src.name)
        if info(n).restores != source_value:
            raise PlanError(f"{where} says it restores {info(n).restores}, but its source {src.name} "
                            f"holds {source_value}")
        moved = src.meta.get("val") if src.op == "placeholder" else self._offloaded[src.name]
        if _shape(n.meta.get("val")) != _shape(moved):
            raise PlanError(f"{where} restores a value of another shape or dtype than its source {src.name}")
        nbytes = _elements_bytes(moved)
        if info(n).nbytes is not None and int(info(n).nbytes) != nbytes:
            raise PlanError(f"{where} says it moves {info(n).nbytes} bytes; {source_value} takes {nbytes}")
        self.holds[n.name] = source_value
        self.add(n.name, [(("fetched", n.name), nbytes)])

    def wait(self, where, step, n):
        p = n.args[0]
        if self.ops.get(p.name) is not Op.PREFETCH:
            raise PlanError(f"{where} waits on {p.name}, which is not a prefetch")
        if info(n).restores is not None and info(n).restores != self.holds[p.name]:
            raise PlanError(f"{where} says it restores {info(n).restores}, but {p.name} fetches "
                            f"{self.holds[p.name]}")
        self.holds[n.name] = self.holds[p.name]
        self.of_value[n.name] = self.of_value.pop(p.name, [])
        self.freed.add(p.name)  # consumed
        for key, _ in _storages(n.meta.get("val")):
            self.restored_as[key] = ("fetched", p.name)

    def offload(self, where, step, n):
        x, tier = n.args
        if tier not in OFF_DEVICE:
            raise PlanError(f"{where} offloads to unknown tier {tier!r}")
        if info(n).saves is not None and info(n).saves != self.holds.get(x.name):
            raise PlanError(f"{where} says it saves {info(n).saves}, but {x.name} holds {self.holds.get(x.name)}")
        self.holds[n.name] = self.holds.get(x.name)
        self._offloaded[n.name] = x.meta.get("val")
        self.handles[n.name] = step

    def free(self, where, step, n):
        for x in n.args:
            if not isinstance(x, fx.Node):
                raise PlanError(f"{where} frees {x!r}, which is not a value")
            if x.name in self.freed:
                raise PlanError(f"{where} frees {x.name} twice")
            self.freed.add(x.name)
            self.handles.pop(x.name, None)
            self.remove(x.name)

    def region(self, where, step, n):
        """A fused region: its graph takes the node's arguments and runs ATen ops only, each
        getitem after it reads an output it has, and the bytes it declares cover every storage
        its ops make (recounted here), which the device must have room for while it runs."""
        reg = n.meta.get("region")
        if reg is None:
            raise PlanError(f"{where}: a region node without its region")
        sub = reg.graph.graph
        params = [x for x in sub.nodes if x.op == "placeholder"]
        if len(params) != len(n.args):
            raise PlanError(f"{where}: the region takes {len(params)} inputs but is called with {len(n.args)}")
        for x in sub.nodes:
            if x.op == "call_function" and not (isinstance(x.target, torch._ops.OpOverload)
                                                 or x.target is operator.getitem):
                raise PlanError(f"{where}: the region calls {x.target!r}, not an ATen op")
            if x.op in ("get_attr", "call_module", "call_method"):
                raise PlanError(f"{where}: the region's graph has a {x.op} node")
        n_out = len(next(x for x in reversed(sub.nodes) if x.op == "output").args[0])
        for u in n.users:
            if u.target is not operator.getitem or not (isinstance(u.args[1], int) and 0 <= u.args[1] < n_out):
                raise PlanError(f"{where}: {u.name} reads the region other than by one of its {n_out} outputs")
        read = {key for x in params for key, _ in _storages(x.meta.get("val"))}
        made = {key: nb for x in sub.nodes if x.op == "call_function"
                for key, nb in _storages(x.meta.get("val")) if key not in read}
        if reg.nbytes < sum(made.values()):
            raise PlanError(f"{where}: the region declares {reg.nbytes} bytes inside, but its ops make "
                            f"{sum(made.values())}")
        if self.cur + reg.nbytes > self.budget:
            raise PlanError(f"{where}: {self.cur} device bytes held and {reg.nbytes} made inside the region, "
                            f"over the budget of {self.budget}")
        self.holds[n.name] = n.name


def _fresh(n: fx.Node) -> bool:
    """Whether ``n``'s op returns new storage (not a view of an argument); an item of a tuple
    is as fresh as the op that made the tuple."""
    if n.target is operator.getitem and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    schema = getattr(n.target, "_schema", None)
    return schema is not None and all(r.alias_info is None for r in schema.returns)


# what each inserted op is called with: (number of positional arguments, or None for any
# number of values) -- a hand-edited file with another call would run something else
_ARITY = {Op.PREFETCH: 1, Op.WAIT: 1, Op.OFFLOAD: 2, Op.FREE: None, Op.BOUNDARY: None, Op.REGION: None}


def _check_arity(where: str, n: fx.Node, op: Op) -> None:
    want = _ARITY[op]
    if n.kwargs or (want is not None and len(n.args) != want):
        raise PlanError(f"{where}: malformed {op.value} node (called with {len(n.args)} argument(s) and "
                        f"{len(n.kwargs)} keyword(s); it takes {want if want is not None else 'any number of'} "
                        f"and no keywords)")
    nodes = n.args[:1] if op is Op.OFFLOAD else n.args
    if op is not Op.BOUNDARY and not all(isinstance(a, fx.Node) for a in nodes):
        raise PlanError(f"{where}: malformed {op.value} node (an argument is not a value)")


_CHECKS = register("verifier", {
    Op.PREFETCH: _Checker.prefetch,
    Op.WAIT: _Checker.wait,
    Op.OFFLOAD: _Checker.offload,
    Op.FREE: _Checker.free,
    Op.BOUNDARY: _Checker.compute,   # yields the tangents: fresh device values
    Op.REGION: _Checker.region,
})


def verify_schedule(gm: fx.GraphModule, budget: int, hardware=None) -> int:
    """Raise PlanError on the first broken rule; return the peak device bytes it counted.
    ``hardware`` (its ``alloc_block_bytes`` and ``workspace_bytes``): count as the device's
    allocator does, each storage in whole blocks beside a workspace held throughout; None:
    exact bytes."""
    c = _Checker(budget, getattr(hardware, "alloc_block_bytes", 1), getattr(hardware, "workspace_bytes", 0))
    for step, n in enumerate(gm.graph.nodes):
        where = f"step {step} ({n.name})"
        op = op_of(n)
        try:
            c.check_reads(where, n, op)
            c.ops[n.name] = op
            if op is not None:
                _check_arity(where, n, op)
                _CHECKS[op](c, where, step, n)
            elif n.op == "placeholder":
                c.placeholder(where, step, n)
            elif n.op == "call_function":
                c.compute(where, step, n)
            elif n.op == "output":
                _check_accounted(where, n, gm, c.of_value, c.handles, c.ops)
            if c.cur > budget:
                raise PlanError(f"{where}: {c.cur} device bytes held, over the budget of {budget}")
            c.defined.add(n.name)
        except (IndexError, AttributeError, KeyError, TypeError, ValueError) as e:  # a hand-edited program
            if isinstance(e, PlanError):
                raise
            raise PlanError(f"{where}: malformed {op.value if op else n.op} node ({type(e).__name__}: {e})") from None
    return c.peak


def _check_accounted(where: str, out: fx.Node, gm: fx.GraphModule, of_value: dict, handles: dict, ops) -> None:
    """At the return: the device holds only outputs and resident model tensors; no fetch is
    still pending and no offload handle unreleased."""
    returned = {x.name for x in out.all_input_nodes}
    nodes = {n.name: n for n in gm.graph.nodes}

    def resident(name):
        n = nodes[name]
        return n.op == "placeholder" and info(n).kind in PERSISTENT

    pending = [name for name, keys in of_value.items() if keys and ops.get(name) is Op.PREFETCH]
    if pending:
        raise PlanError(f"{where}: the program returns with {_names(pending)} never waited on")
    leaked = [name for name, keys in of_value.items() if keys and name not in returned and not resident(name)]
    if leaked:
        raise PlanError(f"{where}: the program returns with {_names(leaked)} still held on the device "
                        f"(not an output, not a resident model tensor: a missing free)")
    kept = [h for h in handles if h not in returned]  # a returned handle: a delivered gradient or output
    if kept:
        raise PlanError(f"{where}: the program returns with offload handle(s) {_names(kept)} never freed")


def _names(names) -> str:
    names = list(names)
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
