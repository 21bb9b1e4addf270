"""The device bytes a scheduled program holds after each node: one walk, per storage.

The simulator prices time on top of this walk and the notebook's memory view reads its
split by kind, so the two always agree. (The verifier keeps its own count on purpose: it
must share no code with what it checks.) Rules: a storage is held while any value referencing
it is alive; a placeholder on the device holds its storages from the start; a prefetch holds
a fresh buffer of the bytes it moves, which its wait hands on, and later views of the
restored value share that buffer; a free drops its values; compute holds what it makes.
"""
from __future__ import annotations

import torch.fx as fx

from .kinds import Kind, Tier
from .meta import info, tier_of
from .ops import Op, op_of, register
from .regions import region_of
from .tensors import allocated, storages

CATEGORIES = ("weights", "kv cache", "activations", "grads", "other", "workspace")
_CATEGORY = {Kind.WEIGHT: "weights", Kind.BUFFER: "weights", Kind.CONSTANT: "weights",
             Kind.KV_CACHE: "kv cache", Kind.ACTIVATION: "activations", Kind.GRAD: "grads"}


def category(kind) -> str:
    """The plotted category of a data kind; inputs, tangents and unknown kinds are "other"."""
    return _CATEGORY.get(kind, "other")


class DeviceMemory:
    """Walk a scheduled program node by node (``visit``); ``current``, ``peak`` and
    ``by_category`` are the device bytes held after the last node visited, counted as the
    device's allocator counts them: each storage in whole ``block``-byte blocks, and the
    ``workspace`` its libraries keep (cuBLAS's) held throughout (``Hardware``'s
    ``alloc_block_bytes`` and ``workspace_bytes``)."""

    def __init__(self, block: int = 1, workspace: int = 0):
        self._held: dict[object, list] = {}          # storage key -> [bytes, refs, kind]
        self._of_value: dict[str, list[object]] = {}
        self._restored_as: dict[object, object] = {}  # storage of a restored value -> its fetch buffer
        self.kind_of: dict[str, str] = {}            # value -> kind of data it holds
        self.block = block
        self.current = self.peak = workspace
        self.by_category = dict.fromkeys(CATEGORIES, 0)
        self.by_category["workspace"] = workspace

    def visit(self, n: fx.Node) -> str | None:
        """Apply node ``n``; returns the kind of data it produces, restores or saves."""
        op = op_of(n)
        if op is None:
            kind = self._placeholder(n) if n.op == "placeholder" else (
                self._compute(n) if n.op == "call_function" else None)
        else:
            kind = _VISIT[op](self, n)
        if kind is not None:
            self.kind_of[n.name] = kind
        return kind

    # -- handlers ---------------------------------------------------------------------------
    def _placeholder(self, n):
        kind = info(n).kind or Kind.INPUT
        if tier_of(n) == Tier.DEVICE:
            self._add(n.name, storages(n.meta.get("val")), kind)
        return kind

    def _compute(self, n):
        entries = storages(n.meta.get("val"))
        kind = info(n).kind or self._existing_kind(entries) or Kind.ACTIVATION
        self._add(n.name, entries, kind)
        # what the op holds inside itself while it runs, beside its outputs
        self.peak = max(self.peak, self.current + allocated(info(n).scratch or 0, self.block))
        return kind

    def _prefetch(self, n):
        kind = info(n).kind or self.kind_of.get(n.args[0].name, "other")
        self._add(n.name, [(("fetch", n.name), int(info(n).nbytes or 0))], kind)
        return kind

    def _wait(self, n):
        p = n.args[0]
        self._of_value[n.name] = self._of_value.pop(p.name, [])
        for key, _ in storages(n.meta.get("val")):
            self._restored_as[key] = ("fetch", p.name)
        return info(n).kind or self.kind_of.get(p.name, "other")

    def _offload(self, n):
        return info(n).kind or self.kind_of.get(n.args[0].name, "other")

    def _free(self, n):
        for x in n.args:
            if isinstance(x, fx.Node):
                self.drop(x.name)
        return None

    def _region(self, n):
        # the call holds up to the bytes its ops make while it runs; what it returns is held
        # by the getitems after it
        self.peak = max(self.peak, self.current + region_of(n).nbytes)
        return None

    # -- bookkeeping ------------------------------------------------------------------------
    def _add(self, name, entries, kind):
        keys = self._of_value[name] = []
        for key, nbytes in entries:
            key = self._restored_as.get(key, key)
            keys.append(key)
            entry = self._held.get(key)
            if entry is not None:
                entry[1] += 1
                continue
            nbytes = allocated(nbytes, self.block)
            self._held[key] = [nbytes, 1, kind]
            self.current += nbytes
            self.by_category[category(kind)] += nbytes
        self.peak = max(self.peak, self.current)

    def drop(self, name: str) -> None:
        for key in self._of_value.pop(name, []):
            entry = self._held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self._held[key]
                self.current -= entry[0]
                self.by_category[category(entry[2])] -= entry[0]

    def _existing_kind(self, entries):
        """The kind of the storage a value shares, when it allocates nothing new (a view)."""
        keys = [self._restored_as.get(k, k) for k, _ in entries]
        if keys and all(k in self._held for k in keys):
            return self._held[keys[0]][2]
        return None


_VISIT = register("memory", {
    Op.PREFETCH: DeviceMemory._prefetch,
    Op.WAIT: DeviceMemory._wait,
    Op.OFFLOAD: DeviceMemory._offload,
    Op.FREE: DeviceMemory._free,
    Op.BOUNDARY: DeviceMemory._compute,   # yields the tangents: fresh device values
    Op.REGION: DeviceMemory._region,
})
