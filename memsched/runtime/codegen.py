"""Lowering: a scheduled fx graph becomes one straight-line Python function.

No per-node interpreter loop: compute nodes call their ATen ops directly and the inserted ops
call the runtime (``rt.prefetch``/``rt.wait``/``rt.offload``/``rt.free``; the boundary is a
``yield``). Arguments are written by the IR's one renderer (``ir/listing.format_args``)."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..ir.listing import format_arg, format_args
from ..ir.meta import info
from ..ir.ops import Op, is_inserted, op_of, register
from ..ir.regions import reads_region, region_of
from ..ir.tensors import distinct_storage_bytes
from .regions import RegionKernel


def _surely_tensor(node: fx.Node) -> bool:
    """The value is a tensor at run time too: an empty one may come back as None (an undefined
    optional output, e.g. the workspace of ``mkldnn_rnn_layer``), which ``rt`` handles."""
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.numel() != 0


def _plain_tensor(node: fx.Node) -> bool:
    """A compute value holding one tensor that no offload reads."""
    return (node.op == "call_function" and not is_inserted(node) and _surely_tensor(node)
            and not any(op_of(u) is Op.OFFLOAD for u in node.users))


def allocates(n: fx.Node) -> int:
    """Bytes a compute node's outputs take, each storage once (fetches make their own room)."""
    if n.op != "call_function" or is_inserted(n):
        return 0
    return distinct_storage_bytes(n.meta.get("val"))


def room_needed(n: fx.Node) -> int:
    """Bytes the device must have free when ``n`` runs: its outputs and what it was measured to
    hold inside itself (a bfloat16 matmul's float32 accumulator), or a fused region's bytes."""
    if op_of(n) is Op.REGION:
        return region_of(n).nbytes
    return allocates(n) + (info(n).scratch or 0)


# -- one line per inserted op: (node, its arguments as source, the renderer) -> source ----------
def _free(n, args, r):
    # plain tensors go straight to the accountant; handles, tuples and tensors an offload is
    # still reading go through the runtime
    fast = [a for a in n.args if _plain_tensor(a)]
    slow = [a for a in n.args if not _plain_tensor(a)]
    calls = [f"_release({r.arg(a)})" for a in fast]
    if slow:
        calls.append(f"rt.free({', '.join(r.arg(a) for a in slow)})")
    return "; ".join(calls) + f"; del {args}"


def _region(n, args, r):
    # the call returns the region's outputs as a tuple, unpacked at once into the getitem
    # values after it (which emit nothing of their own): no tuple outlives the call
    reg = region_of(n)
    by_index = {g.args[1]: g for g in n.users}
    names = ", ".join(f"v_{by_index[i].name}" if i in by_index else "_" for i in range(reg.n_outputs))
    tracks = "; ".join(f"{'_track' if _surely_tensor(g) else 'rt.track'}(v_{g.name})" for g in by_index.values())
    room = f"rt.make_room({reg.nbytes}); " if r.room_for is not None and reg.nbytes > r.room_for else ""
    kernel = r.const(RegionKernel(reg))
    unread = "; _ = None" if len(by_index) < reg.n_outputs else ""
    call = f"{room}{names}, = rt.region({kernel}, {reg.nbytes}, ({args}{',' if n.args else ''}))"
    return "; ".join(x for x in (call, tracks) if x) + unread


_EMIT = register("executor", {
    Op.PREFETCH: lambda n, args, r: f"v_{n.name} = rt.prefetch({args})",
    # the pending handle holds the fetched tensor too: drop it, so the tensor dies when the
    # program frees the waited value (as the accountant counts)
    Op.WAIT: lambda n, args, r: f"v_{n.name} = rt.wait({args}); del {args}",
    Op.OFFLOAD: lambda n, args, r: f"v_{n.name} = rt.offload({args})",
    Op.FREE: _free,
    # a training step: hand the forward outputs over, resume with their gradients
    Op.BOUNDARY: lambda n, args, r: (f"v_{n.name} = yield ({args}{',' if len(n.args) == 1 else ''}); "
                                     f"rt.track(v_{n.name})"),
    Op.REGION: _region,
})


class _Renderer:
    """Names values ``v_<node>`` (never a name of the runtime's own: ``rt``, ``inputs``,
    ``_track``, ``_release``, constants ``_c<i>``, functions ``_f<i>``) and keeps constants
    Python has no literal for as globals."""

    def __init__(self, device: torch.device | None, room_for: int | None = None):
        self.device, self.room_for = device, room_for
        self.glb: dict = {}
        self._fn: dict[int, str] = {}

    def const(self, v) -> str:
        name = f"_c{len(self.glb)}"
        self.glb[name] = v
        return name

    def constant(self, a) -> str:
        if a is None or isinstance(a, (bool, int, str)):
            return repr(a)
        if isinstance(a, float) and math.isfinite(a):
            return repr(a)
        # devices baked into the trace (``arange(..., device=cpu)``) are retargeted
        if isinstance(a, torch.device) and self.device is not None and a.type in ("cpu", "meta"):
            return self.const(self.device)
        return self.const(a)

    def arg(self, a) -> str:
        return format_arg(a, lambda n: "v_" + n.name, self.constant)

    def args(self, n: fx.Node) -> str:
        return format_args(n, lambda x: "v_" + x.name, self.constant)

    def fn(self, target) -> str:
        key = id(target)
        if key not in self._fn:
            self._fn[key] = f"_f{len(self._fn)}"
            # an OpOverload's own __call__ only forwards to its C++ op: call that directly
            self.glb[self._fn[key]] = target._op if isinstance(target, torch._ops.OpOverload) else target
        return self._fn[key]


def generate_source(gm: fx.GraphModule, device: torch.device | None = None,
                    room_for: int | None = None) -> tuple[str, dict]:
    """Python source of the scheduled program and the globals it needs. Ops allocating more
    than ``room_for`` bytes are preceded by ``rt.make_room(n)`` (recycled buffers let go)."""
    r = _Renderer(device, room_for)
    body = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, n in enumerate(placeholders):
        body.append(f"v_{n.name} = inputs[{i}]")
    # the list lets go of what it holds: an input the program frees is freed (rows gathered for it)
    body.append("inputs.clear()")
    for n in gm.graph.nodes:
        op = op_of(n)
        if op is not None:
            body.append(_EMIT[op](n, r.args(n), r))
        elif reads_region(n):
            continue   # unpacked by the region's own line
        elif n.op == "call_function":
            track = "_track" if _surely_tensor(n) else "rt.track"
            scratch = info(n).scratch or 0   # held inside the op while it runs, beside its outputs
            size = room_needed(n)
            room = f"rt.make_room({size}); " if room_for is not None and size > room_for else ""
            inside = f"; rt.held_inside({scratch})" if scratch else ""
            body.append(f"{room}v_{n.name} = {r.fn(n.target)}({r.args(n)}); {track}(v_{n.name}){inside}")
        elif n.op == "get_attr":  # submodules of higher-order ops
            body.append(f"v_{n.name} = {r.const(getattr(gm, n.target))}")
        elif n.op == "output":
            body.append(f"return {r.arg(n.args[0])}")
    src = "def program(rt, inputs, _track, _release):\n" + "\n".join("    " + line for line in body) + "\n"
    return src, r.glb
