"""Plans as versioned JSON: write a plan, read one back into a Plan's fields.

A saved plan is what the planner decided, not how it decided it: the model name, the budget,
the hardware profile, the inputs' signature, the scheduled program node by node, the
predicted numbers (simulated time, stall, peak, timeline, spans, bytes moved, and the same
for the unconstrained program) and the placement facts the summary prints (for a training
step also the saved activations, under ``placement.saved_activations``: files written before
that key existed still load, with none). The program is stored so that it prints, verifies
and runs again without the model's analysis:

* targets by qualified name: ATen ops as ``"aten::addmm.default"`` (resolved through
  ``torch.ops``), memsched's inserted ops as ``"memsched.prefetch"``, Python functions as
  ``"operator.getitem"``;
* arguments as JSON, with nodes and the constants JSON has no word for tagged:
  ``{"node": "mm_3"}``, ``{"tuple": [...]}``, ``{"float": "inf"}``, ``{"dtype": "float32"}``,
  ``{"device": "cpu"}``, ``{"layout": "strided"}``, ``{"memory_format": ...}``;
* every ``memsched.*`` meta key, and the tensor metadata of ``meta["val"]`` (shape, stride,
  dtype, storage offset, storage id) with a table of storage sizes, so that a loaded program's
  values are meta-device tensors whose views share their base's storage, as traced.

A plan file is data, never code. Reading one is checking it before anything is built from it
(``plan_fields``), in two stages; every file that is not a plan this memsched reads raises
PlanFileError naming the field and what is wrong with it:

* the text: at most ``MAX_FILE_BYTES``, UTF-8, strict JSON (no NaN, no repeated keys), nested at
  most ``MAX_DEPTH`` levels (``parse_document``);
* the structure, by the JSON Schema of memsched/io/plan_schema.py validated with ``jsonschema``:
  every section and field, its type, every number's range, every list's and string's length,
  the enumerations (dtypes, layouts, devices, kinds, tiers, links), the tagged values, names
  and state keys that are safe in generated code;
* then what a schema cannot say, here: op targets come from an allowlist (``resolve_target``:
  ATen/prims overloads, memsched's kernel ops (``memsched::rms_norm.default``) and the custom
  operators registered in this process (``transformers::grouped_mm_fallback.default``, which
  transformers' mixture-of-experts layers call), looked up as ``torch.ops.<ns>.<op>.<overload>``
  and checked to be one,
  the higher-order ops the capture leaves in a graph, memsched's inserted ops and
  ``operator.getitem``; nothing is imported and no attribute path of a module is walked);
  node names are unique and the output comes last; every reference is defined; a tensor has
  a stride per dimension, at most ``MAX_ELEMENTS`` elements, and fits its storage; a region
  holds no region. A placeholder's target (a state key) stays beside the graph
  (``SAVED_TARGET`` in the node's meta), never in the code fx generates for it.

This module does not know ``Plan`` (memsched/plans.py sits above it): ``plan_to_dict`` and
``save_plan`` read any object with a plan's attributes, and ``load_fields``/``plan_fields``
return the keyword arguments ``Plan(**fields)`` takes (``Plan.load`` and ``Plan.from_dict``).
Re-applying a saved plan to a fresh capture is memsched/io/reapply.py.
"""
from __future__ import annotations

import importlib.metadata
import json
import math
import operator
import re
from pathlib import Path

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from ..cost_models.hardware import Hardware
from ..cost_models.simulator import SimResult, Span
from ..errors import PlanFileError
from ..ir import ops
from ..ir.listing import target_name as target_name_of
from ..ir.meta import KEY, from_saved, info, to_saved
from ..ir.regions import KEY as REGION_KEY
from ..ir.regions import Region, region_of, structure_key
from ..kernels import ops as kernel_ops  # noqa: F401  (registers torch.ops.memsched.*)
from ..passes.chunking import Chunking
from ..plan_records import SAVED_ACTIVATION_KEYS, PassRecord, PlacementFacts
from . import plan_schema
from .reapply import SAVED_TARGET, PlanMismatchError, saved_target  # noqa: F401  (re-exported)

__all__ = ["FORMAT", "VERSION", "PlanFileError", "PlanMismatchError", "dumps", "plan_to_dict", "save_plan",
           "read_document", "parse_document", "check_header", "plan_fields", "load_fields",
           "resolve_target", "target_name", "graph_to_dict", "graph_from_dict"]

FORMAT, VERSION = plan_schema.FORMAT, plan_schema.VERSION
LIMITS = plan_schema.LIMITS
MAX_FILE_BYTES = LIMITS["file_bytes"]
MAX_DEPTH = LIMITS["depth"]
MAX_ELEMENTS = LIMITS["elements"]
DTYPES, LAYOUTS, MEMORY_FORMATS = plan_schema.DTYPES, plan_schema.LAYOUTS, plan_schema.MEMORY_FORMATS
_TABLES = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_VERSION_TEXT = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_show = plan_schema.show


def _bad(where: str, what: str):
    raise PlanFileError(f"{where}: {what}" if where else what)


# ----------------------------------------------------------------------------- constants


def _encode(a, where: str, tensor=None, name=None):
    """A Python constant (or fx node reference) as JSON; ``tensor`` encodes tensor leaves,
    ``name`` names nodes (by default their own name)."""
    if isinstance(a, fx.Node):
        return {"node": name(a) if name is not None else a.name}
    if a is None or isinstance(a, (bool, int, str)):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, list):
        return [_encode(x, where, tensor, name) for x in a]
    if isinstance(a, tuple):
        return {"tuple": [_encode(x, where, tensor, name) for x in a]}
    if isinstance(a, dict) and all(isinstance(k, str) for k in a):
        return {"dict": {k: _encode(v, where, tensor, name) for k, v in a.items()}}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).removeprefix("torch.")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.layout):
        return {"layout": str(a).removeprefix("torch.")}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).removeprefix("torch.")}
    if isinstance(a, slice):
        return {"slice": [_encode(x, where, tensor, name) for x in (a.start, a.stop, a.step)]}
    if a is Ellipsis:
        return {"ellipsis": None}
    if isinstance(a, torch.Tensor) and tensor is not None:
        return {"tensor": tensor(a)}
    raise PlanFileError(f"{where}: cannot save a {type(a).__name__} ({a!r:.80})")


def _decode(a, node=None, tensor=None):
    """Inverse of ``_encode`` on a document the schema has checked: ``node(name)`` and
    ``tensor(spec)`` resolve those tags."""
    if isinstance(a, list):
        return [_decode(x, node, tensor) for x in a]
    if not isinstance(a, dict):
        return a
    (tag, v), = a.items()
    if tag == "node":
        return node(v)
    if tag == "tuple":
        return tuple(_decode(x, node, tensor) for x in v)
    if tag == "dict":
        return {k: _decode(x, node, tensor) for k, x in v.items()}
    if tag == "float":
        return float(v)
    if tag in _TABLES:
        return _TABLES[tag][v]
    if tag == "device":
        return torch.device(v)
    if tag == "slice":
        return slice(*(_decode(x, node) for x in v))
    if tag == "ellipsis":
        return Ellipsis
    return tensor(v)


# ----------------------------------------------------------------------------- targets

# each inserted op is saved under its name (the serializer's entry in the op registry)
_SAVED_OP_NAMES = ops.register("serializer", {op: f"memsched.{op.value}" for op in ops.Op})
_MEMSCHED_OPS = {name: ops.TARGETS[op] for op, name in _SAVED_OP_NAMES.items()}
# the Python functions an fx graph of torch.export (and memsched's own rewriting) calls
_PY_TARGETS = {"operator.getitem": operator.getitem}
# the higher-order ops the capture leaves in a graph (nested no_grad regions, autocast)
_HIGHER_ORDER = ("wrap_with_set_grad_enabled", "wrap_with_autocast")
# always there (memsched: the kernel ops, kernels/ops.py); any other namespace holds custom
# operators a library registers (torch.library), named alike, read once that library is imported
_OP_NAMESPACES = ("aten", "prims", "memsched")


def _qualified_name(t) -> str | None:
    if isinstance(t, torch._ops.OpOverload):
        return f"{t._schema.name}.{t._overloadname}"
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"higher_order::{t.name()}"
    for table in (_MEMSCHED_OPS, _PY_TARGETS):
        for name, fn in table.items():
            if t is fn:
                return name
    return None


def target_name(n: fx.Node) -> str:
    """The qualified name a node's target is saved under (PlanFileError for one a plan file
    cannot name, so that a saved file always loads)."""
    t = n.target
    if n.op == "placeholder":
        key = saved_target(n)
        if not plan_schema.is_state_key(key):
            raise PlanFileError(f"{n.name}: cannot save placeholder target {_show(key)} (not a state key)")
        return key
    if n.op in ("get_attr", "output"):
        return str(t)
    name = _qualified_name(t)
    if name is not None:
        try:
            if resolve_target(name) is t:
                return name
        except PlanFileError:
            pass
    raise PlanFileError(f"{n.name}: cannot save its target {t!r} by name (a plan file calls only "
                        f"torch.ops operators, memsched's ops and {', '.join(_PY_TARGETS)})")


def resolve_target(name: str):
    """The callable a saved target name stands for, from an allowlist: ``<namespace>::<op>.<overload>``
    (ATen, prims, memsched's kernels, or a custom operator registered in this process: looked
    up in ``torch.ops`` and checked to be an OpOverload), ``higher_order::<op>`` for the
    wrappers the capture produces, memsched's inserted ops and ``operator.getitem``. Nothing
    is imported and no attribute path is walked. Resolving calls nothing, and a plan only runs
    paired node by node with a fresh capture of the model (io/reapply.py): an operator the
    model does not call is a mismatch, never run."""
    if not isinstance(name, str) or len(name) > LIMITS["name"]:
        raise PlanFileError(f"target {_show(name)} is not an operator name")
    if name in _MEMSCHED_OPS:
        return _MEMSCHED_OPS[name]
    if name in _PY_TARGETS:
        return _PY_TARGETS[name]
    ns, sep, rest = name.partition("::")
    if sep and ns == "higher_order" and rest in _HIGHER_ORDER:
        op = getattr(torch.ops.higher_order, rest, None)
        if isinstance(op, torch._ops.HigherOrderOperator):
            return op
    elif sep and ns in _OP_NAMESPACES:
        op = _overload(ns, rest)
        if op is None:
            raise PlanFileError(f"unknown operator {name!r} (no such overload in torch.ops.{ns} of "
                                f"torch {torch.__version__})")
        return op
    elif sep and ns != "higher_order" and _IDENT.fullmatch(ns) and not ns.startswith("__"):
        op = _overload(ns, rest)
        if op is None:
            raise UnregisteredOperatorError(
                f"calls {_show(name)}, a custom operator not registered in this process: import the module "
                f"that registers torch.ops.{ns} before reading the plan (memsched show/verify: --import MODULE)")
        return op
    raise PlanFileError(f"unknown target {_show(name)}: a plan calls only torch.ops operators "
                        f"(namespace::op.overload), memsched's ops ({', '.join(_MEMSCHED_OPS)}) and "
                        f"{', '.join(_PY_TARGETS)}")


class UnregisteredOperatorError(PlanFileError):
    """A plan that names a custom operator this process has not registered: the file may be
    sound, the library that defines the operator is not imported."""


def _overload(ns: str, rest: str):
    """``torch.ops.<ns>.<op>.<overload>`` if that is an OpOverload, else None (op names may be
    dunders, ``aten::__and__.Tensor``: whatever the lookup returns is checked to be an op)."""
    packet_name, dot, overload = rest.partition(".")
    if not (dot and len(rest) <= LIMITS["name"] and _IDENT.fullmatch(packet_name) and _IDENT.fullmatch(overload)):
        return None
    try:
        namespace = getattr(torch.ops, ns)
        if not isinstance(namespace, torch._ops._OpNamespace):   # torch.ops' own methods and attributes
            return None
        packet = getattr(namespace, packet_name)
    except (AttributeError, RuntimeError):
        return None
    if not isinstance(packet, torch._ops.OpOverloadPacket) or overload not in packet.overloads():
        return None
    op = getattr(packet, overload, None)
    return op if isinstance(op, torch._ops.OpOverload) else None


# ----------------------------------------------------------------------------- graphs


def graph_to_dict(gm: fx.GraphModule) -> dict:
    """The scheduled program: a table of storage sizes and one record per node."""
    storages: list[int] = []
    storage_id: dict[StorageWeakRef, int] = {}

    def tensor(t: torch.Tensor) -> dict:
        st = t.untyped_storage()
        key = StorageWeakRef(st)
        sid = storage_id.get(key)
        if sid is None:
            sid = storage_id[key] = len(storages)
            storages.append(int(st.nbytes()))
        return {"shape": list(t.shape), "stride": list(t.stride()), "dtype": str(t.dtype).removeprefix("torch."),
                "offset": int(t.storage_offset()), "storage": sid}

    nodes = []
    for n in gm.graph.nodes:
        where = n.name
        rec = {"name": n.name, "op": n.op, "target": target_name(n)}
        if n.args:
            rec["args"] = _encode(list(n.args), where)
        if n.kwargs:
            rec["kwargs"] = {k: _encode(v, where) for k, v in n.kwargs.items()}
        meta = {k: _encode(v, f"{where} meta {k}") for k, v in to_saved(info(n)).items()} if KEY in n.meta else {}
        if meta:
            rec["meta"] = meta
        if "val" in n.meta and n.op != "output":
            rec["val"] = _encode(n.meta["val"], f"{where} val", tensor)
        reg = region_of(n)
        if reg is not None:   # its ops, as a program of their own (never compiled code)
            rec["region"] = {"nbytes": int(reg.nbytes), "names": list(reg.names), "program": graph_to_dict(reg.graph)}
        nodes.append(rec)
    return {"storages": storages, "nodes": nodes}


def _node_head(rec, i: int, seen: set, last: bool) -> tuple:
    """(name, op, fx target, state key) of node record ``i``: the name not repeated, the target
    from the allowlist, the fields its kind takes, the output last and alone."""
    name, op, target = rec["name"], rec["op"], rec["target"]
    where = f"program.nodes[{i}] ({name})"
    if name in seen:
        _bad(where, f"node name {name!r} is repeated")
    seen.add(name)
    if (op == "output") != last:
        _bad(where, "the program ends with its one output node" if last else "an output node before the end")
    if op != "call_function" and "kwargs" in rec or op in ("placeholder", "get_attr") and "args" in rec:
        _bad(where, f"a {op} node takes no arguments")
    if op == "output":
        if name != "output" or target != "output" or "val" in rec:
            _bad(where, "the output node is named \"output\", has target \"output\" and no value")
        if len(rec.get("args", ())) != 1:
            _bad(where, "the output node has one argument")
        return name, op, None, None
    if op == "placeholder":
        if not plan_schema.is_state_key(target):
            _bad(f"{where}.target", f"{_show(target)} is not {plan_schema.NAME_RULES['memsched-state-key']}")
        return name, op, name, target
    if op == "get_attr":
        if not plan_schema.is_attr_path(target):
            _bad(f"{where}.target", f"{_show(target)} is not {plan_schema.NAME_RULES['memsched-attribute']}")
        return name, op, target, None
    try:
        return name, op, resolve_target(target), None
    except UnregisteredOperatorError:   # the file is sound: the operator is named, not where
        raise
    except PlanFileError as e:
        _bad(f"{where}.target", str(e))


def _node_facts(meta, where: str):
    """The node's ``memsched.*`` facts (a NodeInfo)."""
    try:
        return from_saved(meta)
    except (TypeError, ValueError) as e:
        _bad(where, str(e))


def _tensor(spec, where: str, sizes: list, bases: list) -> torch.Tensor:
    """A meta tensor on storage ``spec["storage"]``, its layout checked against the storage."""
    shape, stride, offset, sid = spec["shape"], spec["stride"], spec["offset"], spec["storage"]
    dtype = DTYPES[spec["dtype"]]
    if len(stride) != len(shape):
        _bad(where, f"{len(stride)} strides for {len(shape)} dimensions")
    if sid >= len(sizes):
        _bad(f"{where}.storage", f"{_show(sid)} is out of range (the program has {len(sizes)} storages)")
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        _bad(f"{where}.shape", f"{numel} elements, more than {MAX_ELEMENTS}")
    end = (offset + sum((d - 1) * s for d, s in zip(shape, stride)) + 1) * dtype.itemsize if numel else 0
    if end > sizes[sid]:
        _bad(where, f"a {dtype} tensor of shape {shape} with strides {stride} at offset {offset} reaches "
                    f"byte {end} of storage {sid}, which holds {sizes[sid]}")
    try:
        return torch.empty(0, dtype=dtype, device="meta").set_(bases[sid], offset, shape, stride)
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:
        _bad(where, f"does not fit storage {sid}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def _region(rec, target, where: str, inner: bool) -> Region | None:
    """The fused region a ``memsched.region`` node runs: its ops' program (ATen ops only, checked
    by the verifier; no region inside), rebuilt and keyed again; the bytes it declares, which
    the verifier recounts."""
    if (target is ops.region) != ("region" in rec):
        _bad(where, "a region node carries its region, and only a region node does")
    if "region" not in rec:
        return None
    if inner:
        _bad(f"{where}.region", "a region inside a region")
    spec = rec["region"]
    try:
        gm = graph_from_dict(spec["program"], _inner=True)
    except UnregisteredOperatorError:
        raise
    except PlanFileError as e:
        raise PlanFileError(f"{where}.region: {e}") from None
    defined: set = set()
    for n in gm.graph.nodes:   # a region runs its ops in order, never checked by step
        late = next((x for x in n.all_input_nodes if x not in defined), None)
        if late is not None:
            _bad(f"{where}.region.program", f"{n.name} reads {late.name} before it is defined")
        defined.add(n)
    names = tuple(target_name_of(n.target) for n in gm.graph.nodes
                  if n.op == "call_function" and n.target is not operator.getitem)
    n_ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    former = spec["names"]
    if len(former) != n_ops or len(set(former)) != n_ops:
        _bad(f"{where}.region.names", f"one distinct name per op of the region ({n_ops})")
    return Region(gm, names, spec["nbytes"], structure_key(gm), tuple(former))


def graph_from_dict(d: dict, root: torch.nn.Module | None = None, *, _inner: bool = False) -> fx.GraphModule:
    """Rebuild the program (of a document the schema has checked) with meta-device values;
    views share their base's storage. Nodes are made first and wired second, so a program that
    reads a value before it is defined still loads, for the verifier to reject it by step."""
    sizes, records = d["storages"], d["nodes"]
    bases = [torch.empty(nb, dtype=torch.uint8, device="meta").untyped_storage() for nb in sizes]
    g = fx.Graph()
    made: dict[str, fx.Node] = {}
    seen: set[str] = set()
    for i, rec in enumerate(records):
        name, op, target, key = _node_head(rec, i, seen, i == len(records) - 1)
        where = f"program.nodes[{i}] ({name})"
        n = g.output(None) if op == "output" else g.create_node(op, target, name=name)
        if n.name != name:
            _bad(where, f"node name {name!r} cannot be kept (fx calls it {n.name!r}): it is a Python builtin "
                        f"or clashes with another name")
        made[name] = n
        if key is not None:  # the state key stays beside the graph, out of its generated code
            n.meta[SAVED_TARGET] = key
        if rec.get("meta"):
            n.meta[KEY] = _node_facts(rec["meta"], f"{where}.meta")
        if "val" in rec:
            n.meta["val"] = _decode(rec["val"], tensor=lambda spec, at=f"{where}.val": _tensor(spec, at, sizes, bases))
        reg = _region(rec, target, where, _inner)
        if reg is not None:
            n.meta[REGION_KEY] = reg
    _wire(made, records)
    _check_region_names(made)
    root = root if root is not None else torch.nn.Module()
    for n in g.nodes:  # a loaded program only prints and verifies: subgraphs are stand-ins
        if n.op == "get_attr" and not _has_attr(root, n.target):
            _set_attr(root, n.target, torch.nn.Module())
    try:
        return fx.GraphModule(root, g, class_name="ScheduledProgram")
    except Exception as e:  # every name and target was checked: this is not expected
        _bad("program", f"cannot be rebuilt ({type(e).__name__}: {e})")


def _check_region_names(made: dict) -> None:
    """A region's ops take their former names back when it is taken apart (to pair a saved plan
    with a capture): each name must be free then -- no other node's and no other region's op's
    -- but for the getitems of the region's own outputs, which carry them while it is whole."""
    owner: dict[str, str] = {}
    for n in made.values():
        reg = n.meta.get(REGION_KEY)
        if reg is None:
            continue
        own = {u.name for u in n.users if u.target is operator.getitem}
        for name in reg.names:
            if name in owner:
                _bad(f"program: region {n.name}", f"op name {name!r} is also an op name of region {owner[name]}")
            owner[name] = n.name
            if name in made and name not in own:
                _bad(f"program: region {n.name}", f"op name {name!r} is the name of another node")


def _wire(made: dict, records: list) -> None:
    """Set each node's arguments, every reference resolved to a node of the program."""
    def node(name):
        if name not in made:
            raise PlanFileError(f"a node reads {name!r}, which the program does not define")
        if made[name].op == "output":
            raise PlanFileError("a node reads the output node")
        return made[name]

    for i, rec in enumerate(records):
        n = made[rec["name"]]
        try:
            if "args" in rec:
                n.args = tuple(_decode(rec["args"], node))
            if "kwargs" in rec:
                n.kwargs = {k: _decode(v, node) for k, v in rec["kwargs"].items()}
        except PlanFileError as e:
            raise PlanFileError(f"program.nodes[{i}] ({n.name}): {e}") from None


def _has_attr(obj, dotted: str) -> bool:
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


def _set_attr(obj, dotted: str, value) -> None:
    *path, last = dotted.split(".")
    for part in path:
        if not hasattr(obj, part):
            setattr(obj, part, torch.nn.Module())
        obj = getattr(obj, part)
    setattr(obj, last, value)


# ----------------------------------------------------------------------------- writing plans


def _sim_to_dict(sim: SimResult) -> dict:
    enc = lambda x: _encode(float(x), "prediction")  # noqa: E731
    d = {
        "time_s": enc(sim.time_s), "compute_s": enc(sim.compute_s), "stall_s": enc(sim.stall_s),
        "peak_device_bytes": int(sim.peak_device_bytes),
        "bytes_moved": {k: int(v) for k, v in sorted(sim.bytes_moved.items())},
        "timeline": [[name, int(b)] for name, b in sim.timeline],
        "spans": [[s.stream, s.name, enc(s.start), enc(s.end)] for s in sim.spans],
    }
    if sim.contention_s:  # (only measured CPU profiles price it)
        d["contention_s"] = enc(sim.contention_s)
    return d


def _signature_to_dict(sig: tuple) -> dict:
    """``input_signature``'s key: the inputs' tree structure and per leaf a tensor's shape,
    dtype and device type (and the leaf it repeats, for a tensor passed twice), or a
    non-tensor's repr."""
    spec, leaves = sig
    out = []
    for leaf in leaves:
        if leaf[0] == "T":
            out.append({"shape": list(leaf[1]), "dtype": leaf[2], "device": leaf[3]}
                       | ({"same_as": leaf[4]} if len(leaf) > 4 else {}))
        else:
            out.append({"value": leaf[1]})
    return {"spec": spec, "leaves": out}


def _memsched_version() -> str:
    try:
        return importlib.metadata.version("memsched")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree, not installed
        return "unknown"


def _facts_to_dict(facts: PlacementFacts, n_segments: int) -> dict:
    num = lambda x: None if x is None else _encode(float(x), "placement")  # noqa: E731
    out = {
        "status": facts.status, "mip_gap": num(facts.mip_gap), "solve_s": num(facts.solve_s),
        "min_budget_bytes": int(facts.min_budget_bytes), "segments": int(n_segments),
        "movable_gaps": int(facts.movable_gaps),
        "tier_bytes": {k: int(v) for k, v in facts.tier_bytes.items()},
        "offloaded_activation_bytes": {k: int(v) for k, v in facts.offloaded_activation_bytes.items()},
        "notes": list(facts.notes),
    }
    if facts.saved_activations:  # training steps only: inference files stay as they were
        out["saved_activations"] = [_saved_activation(r) for r in facts.saved_activations]
    if facts.floor_bytes:  # optional: files written before memsched knew the floor lack it
        out["floor"] = {"bytes": int(facts.floor_bytes), "at": facts.floor_at, "binds_at": facts.binds_at}
    return out


def _saved_activation(r: dict) -> dict:
    """One saved-activation row with the types it has (names and decisions text, the rest ints)."""
    return {k: str(r[k]) if k in ("value", "decision") else int(r[k]) for k in SAVED_ACTIVATION_KEYS}


def plan_to_dict(plan) -> dict:
    """The plan (a ``Plan``, or anything with its attributes) as the JSON document
    ``save_plan`` writes (format ``memsched-plan``)."""
    num = lambda x: None if x is None else _encode(float(x), "passes")  # noqa: E731
    return {
        "format": FORMAT,
        "version": VERSION,
        "memsched_version": _memsched_version(),
        "torch_version": torch.__version__,
        "model": plan.model_name,
        "budget_bytes": int(plan.budget_bytes),
        "hardware": plan.hardware.to_dict(),
        "input_signature": None if plan.signature is None else _signature_to_dict(plan.signature),
        "chunking": [{"path": c.path, "dim": c.dim, "chunks": c.chunks} for c in plan.chunking],
        "input_values": [{"read": what, "value": value} for what, value in plan.input_values],
        "placement": _facts_to_dict(plan.facts, plan.n_segments),
        "passes": [{"name": p.name, "seconds": num(p.seconds), "note": p.note} for p in plan.passes],
        "predicted": _sim_to_dict(plan.sim),
        "unconstrained": _sim_to_dict(plan.unconstrained),
        "program": graph_to_dict(plan.graph),
    }


def dumps(plan) -> str:
    """The saved-plan JSON text: strict JSON (non-finite floats are tagged, never NaN), the
    top level and its sections one key per line, long lists (nodes, timeline, spans) one
    element per line, each element on one line."""
    return _layout(plan_to_dict(plan), 0) + "\n"


def _layout(v, depth: int) -> str:
    pad, inner = " " * depth, " " * (depth + 1)
    if isinstance(v, dict) and depth <= 1 and v:
        items = [f"{inner}{json.dumps(k)}: {_layout(x, depth + 1)}" for k, x in v.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(v, list) and depth >= 1 and len(v) > 4 and all(isinstance(x, (list, dict)) for x in v):
        return "[\n" + ",\n".join(inner + _compact(x) for x in v) + "\n" + pad + "]"
    return _compact(v)


def _compact(v) -> str:
    return json.dumps(v, separators=(", ", ": "), allow_nan=False)


def save_plan(plan, path) -> None:
    """Write ``plan`` to ``path`` as versioned JSON (``Plan.load`` reads it back)."""
    text = dumps(plan)  # encode fully before touching the file
    Path(path).write_text(text)


# ----------------------------------------------------------------------------- reading plans


def _number(v) -> float:
    return float(_decode(v))


def _sim_from_dict(d) -> SimResult:
    return SimResult(_number(d["time_s"]), _number(d["compute_s"]), _number(d["stall_s"]), d["peak_device_bytes"],
                     [tuple(row) for row in d["timeline"]], dict(d["bytes_moved"]),
                     [Span(stream, name, _number(a), _number(b)) for stream, name, a, b in d["spans"]],
                     _number(d.get("contention_s", 0.0)))


def _signature_from_dict(d) -> tuple | None:
    if d is None:
        return None
    leaves = tuple(("V", leaf["value"]) if "value" in leaf else
                   ("T", tuple(leaf["shape"]), leaf["dtype"], leaf["device"])
                   + ((leaf["same_as"],) if "same_as" in leaf else ()) for leaf in d["leaves"])
    return (d["spec"], leaves)


def _hardware_from_dict(d) -> Hardware:
    try:
        return Hardware(**d)
    except ValueError as e:   # a value in range for its type, not for the profile
        _bad("hardware", str(e))


def _facts_from_dict(pl) -> tuple[PlacementFacts, int]:
    """The placement facts and the number of segments."""
    floor = pl.get("floor") or {}
    facts = PlacementFacts(
        status=pl["status"], mip_gap=None if pl["mip_gap"] is None else _number(pl["mip_gap"]),
        solve_s=_number(pl["solve_s"]), min_budget_bytes=pl["min_budget_bytes"], movable_gaps=pl["movable_gaps"],
        tier_bytes=dict(pl["tier_bytes"]), offloaded_activation_bytes=dict(pl["offloaded_activation_bytes"]),
        notes=tuple(pl.get("notes", ())), saved_activations=tuple(pl.get("saved_activations", ())),
        **({"floor_bytes": floor["bytes"], "floor_at": floor["at"], "binds_at": floor["binds_at"]} if floor else {}))
    return facts, pl["segments"]


def check_header(d, source: str = "the plan") -> None:
    """PlanFileError unless ``d`` is a memsched plan of a version this memsched reads."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise PlanFileError(f"{source} is not a memsched plan (no \"format\": \"{FORMAT}\")")
    version = d.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PlanFileError(f"{source}: plan format version {_show(version)} is not valid")
    if version > VERSION:
        written_by = d.get("memsched_version")
        written_by = written_by if isinstance(written_by, str) and _VERSION_TEXT.fullmatch(written_by) else "?"
        raise PlanFileError(
            f"{source} was written by a newer memsched ({written_by}, plan format "
            f"version {_show(version)}); this memsched reads up to version {VERSION}: upgrade memsched")


def check_depth(doc, source: str = "the plan") -> None:
    """PlanFileError if ``doc`` nests lists and objects deeper than ``MAX_DEPTH`` (no recursion)."""
    stack = [(doc, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise PlanFileError(f"{source} is not a memsched plan: its JSON nests deeper than {MAX_DEPTH} levels")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))


def plan_fields(d: dict, source: str = "the plan") -> dict:
    """The keyword arguments of ``Plan`` for the JSON document (no ``program``/``placement``:
    a loaded plan prints, summarises and verifies without re-solving). Every field is checked
    before it is used: PlanFileError names the first that is wrong."""
    check_depth(d, source)
    check_header(d, source)
    wrong = plan_schema.first_error(d)
    if wrong is not None:
        raise PlanFileError(f"{source} is damaged: {wrong}")
    try:
        facts, n_segments = _facts_from_dict(d["placement"])
        return dict(
            model_name=d["model"], budget_bytes=d["budget_bytes"], hardware=_hardware_from_dict(d["hardware"]),
            graph=graph_from_dict(d["program"]), program=None, placement=None, sim=_sim_from_dict(d["predicted"]),
            unconstrained=_sim_from_dict(d["unconstrained"]),
            passes=[PassRecord(p["name"], _number(p["seconds"]), p.get("note", "")) for p in d["passes"]],
            n_segments=n_segments, facts=facts, signature=_signature_from_dict(d.get("input_signature")),
            chunking=tuple(Chunking(c["path"], c["dim"], c["chunks"]) for c in d.get("chunking", ())),
            input_values=tuple((v["read"], v["value"]) for v in d.get("input_values", ())))
    except UnregisteredOperatorError as e:
        raise PlanFileError(f"{source} {e}") from None
    except PlanFileError as e:
        raise PlanFileError(f"{source} is damaged: {e}") from None
    except Exception as e:  # a check this reader lacks: still a damaged file, the cause kept for --debug
        raise PlanFileError(f"{source} is damaged: {type(e).__name__}: {e}") from e


def _unique_keys(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        repeated = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise PlanFileError(f"key {_show(repeated)} appears twice in one object")
    return d


def _strict_constant(name: str):
    raise PlanFileError(f"{name} is not JSON (write inf and nan as {{\"float\": \"inf\"}})")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise PlanFileError(f"number {text[:40]} is out of range")
    return x


def parse_document(data: bytes | str, source: str = "the plan") -> dict:
    """The JSON document in ``data`` (the bytes or text of a plan file), parsed strictly: UTF-8,
    no NaN or Infinity, no repeated keys, finite numbers, at most ``MAX_DEPTH`` levels deep."""
    if len(data) > MAX_FILE_BYTES:
        raise PlanFileError(f"{source} is larger than {MAX_FILE_BYTES >> 20} MiB: not a plan this memsched reads")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PlanFileError(f"{source} is not a memsched plan (not UTF-8 text: {e.reason} at byte "
                                f"{e.start})") from None
    try:
        doc = json.loads(data, object_pairs_hook=_unique_keys, parse_constant=_strict_constant,
                         parse_float=_finite_float)
    except RecursionError:
        raise PlanFileError(f"{source} is not a memsched plan: its JSON nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # JSONDecodeError, the checks above, an integer of more than 4300 digits
        raise PlanFileError(f"{source} is not a memsched plan (not JSON: {e})") from None
    check_depth(doc, source)
    return doc


def read_document(path) -> dict:
    """The JSON document in ``path`` (PlanFileError when unreadable, too large or not JSON)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise PlanFileError(f"cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # e.g. a NUL character in the path
        raise PlanFileError(f"cannot read {path!s:.200}: {e}") from None
    return parse_document(data, str(path))


def load_fields(path) -> dict:
    """The keyword arguments of ``Plan`` for the plan ``save_plan`` wrote to ``path``
    (PlanFileError for another file or a newer format)."""
    return plan_fields(read_document(path), str(Path(path)))
