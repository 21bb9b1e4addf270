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

A plan file is data, never code. Reading one is checking it, field by field, before anything
is built from it (``plan_fields``); every file that is not a plan this memsched reads raises
PlanFileError naming the field and what is wrong with it:

* the file is at most ``MAX_FILE_BYTES``, UTF-8, strict JSON (no NaN, no repeated keys),
  nested at most ``MAX_DEPTH`` levels; every field has its type, and numbers their range;
* node names and keyword-argument names are ASCII Python identifiers, not keywords, not
  dunders; a placeholder's target (a state key) is a dotted identifier and stays beside the
  graph (``SAVED_TARGET`` in the node's meta), never in the code fx generates for it;
* op targets come from an allowlist (``resolve_target``): ATen/prims overloads looked up as
  ``torch.ops.<ns>.<op>.<overload>`` and checked to be one, the higher-order ops the capture
  leaves in a graph, memsched's inserted ops and ``operator.getitem``; nothing is imported and
  no attribute path of a module is walked;
* dtypes, layouts and memory formats come from tables of torch's own; devices are ``cpu``,
  ``cuda`` or ``meta`` with an optional index; tensors have at most ``MAX_RANK`` dimensions and
  ``MAX_ELEMENTS`` elements, non-negative strides and offsets, and fit their storage.

This module does not know ``Plan`` (memsched/plans.py sits above it): ``plan_to_dict`` and
``save_plan`` read any object with a plan's attributes, and ``load_fields``/``plan_fields``
return the keyword arguments ``Plan(**fields)`` takes (``Plan.load`` and ``Plan.from_dict``).
Re-applying a saved plan to a fresh capture is memsched/io/reapply.py.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import keyword
import math
import operator
import re
import reprlib
from pathlib import Path

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from ..cost_models.hardware import Hardware
from ..cost_models.simulator import SimResult, Span
from ..errors import PlanFileError
from ..ir import ops
from ..ir.kinds import LINKS, Kind, Tier
from ..ir.listing import target_name as target_name_of
from ..ir.meta import KEY, from_saved, info, to_saved
from ..ir.regions import KEY as REGION_KEY
from ..ir.regions import Region, region_of, structure_key
from ..passes.chunking import LOSS_HEAD, ROOT, Chunking
from ..plan_records import SAVED_ACTIVATION_KEYS, PassRecord, PlacementFacts
from .reapply import SAVED_TARGET, PlanMismatchError, saved_target  # noqa: F401  (re-exported)

__all__ = ["FORMAT", "VERSION", "PlanFileError", "PlanMismatchError", "dumps", "plan_to_dict", "save_plan",
           "read_document", "parse_document", "check_header", "plan_fields", "load_fields",
           "resolve_target", "target_name", "graph_to_dict", "graph_from_dict"]

FORMAT = "memsched-plan"
VERSION = 1

# What a plan file may hold: far above any real plan, low enough that a hostile file cannot
# make the reader allocate or recurse without bound.
MAX_FILE_BYTES = 256 << 20
MAX_DEPTH = 64                  # JSON nesting (a real plan nests about 8 levels)
MAX_NODES = 1_000_000
MAX_STORAGES = 4 * MAX_NODES
MAX_ITEMS = 4 * MAX_NODES       # any other list: timeline, spans, a node's arguments
MAX_RANK = 64
MAX_ELEMENTS = 1 << 48          # elements of one tensor, and any stride or offset
MAX_BYTES = 1 << 50             # bytes of one storage, a budget, a device
MAX_TEXT = 1 << 16              # characters of a string
MAX_NAME = 1024                 # characters of a name
INT64 = (-(1 << 63), (1 << 63) - 1)


def _named(kind) -> dict:
    """name -> value of every ``torch.<name>`` of that type, named as ``str()`` spells it."""
    return {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, kind)}


DTYPES = _named(torch.dtype)
LAYOUTS = _named(torch.layout)
MEMORY_FORMATS = _named(torch.memory_format)
DEVICE_TYPES = ("cpu", "cuda", "meta")
_TABLES = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}
_DEVICE = re.compile(r"(cpu|cuda|meta)(:(0|[1-9][0-9]{0,3}))?")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX = re.compile(r"0|[1-9][0-9]{0,17}")
# C0/C1 controls except tab and newline, and the bidi overrides: text a terminal would obey
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_VERSION_TEXT = re.compile(r"[A-Za-z0-9_.+-]{1,64}")
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 80
_SHOW.maxlevel = 3


# ----------------------------------------------------------------------------- checks


def _show(v) -> str:
    """A value in a message: short, whatever it is."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**30:
        return f"{'-' if v < 0 else ''}a {v.bit_length()}-bit integer"
    return _SHOW.repr(v)


def _kind(v) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(v), f"a Python {type(v).__name__}")


def _bad(where: str, what: str):
    raise PlanFileError(f"{where}: {what}" if where else what)


def _fields(d, where: str, required=(), optional=()) -> dict:
    """``d`` as an object with every ``required`` field and no field outside ``optional``."""
    if not isinstance(d, dict):
        _bad(where, f"expected an object, got {_kind(d)}")
    for k in required:
        if k not in d:
            _bad(where, f"{k!r} is missing")
    for k in d:
        if k not in required and k not in optional:
            _bad(where, f"unknown field {_show(k)}")
    return d


def _object(v, where: str) -> dict:
    if not isinstance(v, dict):
        _bad(where, f"expected an object, got {_kind(v)}")
    return v


def _int(v, where: str, lo: int = 0, hi: int = MAX_BYTES) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        _bad(where, f"expected an integer, got {_kind(v)}")
    if not lo <= v <= hi:
        _bad(where, f"{_show(v)} is out of range ({lo} to {hi})")
    return int(v)


def _number(v, where: str) -> float:
    """A finite JSON number, or a tagged non-finite one (``{"float": "inf"}``)."""
    if isinstance(v, dict):
        x = _decode(v, where=where)
        if isinstance(x, float):
            return x
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _bad(where, f"expected a number, got {_kind(v)}")
    if isinstance(v, int) and abs(v) > 2**1000 or not math.isfinite(v):
        _bad(where, f"{_show(v)} is out of range (write inf and nan as {{\"float\": \"inf\"}})")
    return float(v)


def _text(v, where: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(v, str):
        _bad(where, f"expected a string, got {_kind(v)}")
    if len(v) > limit:
        _bad(where, f"a string of {len(v)} characters, more than {limit}")
    if _CONTROL.search(v):
        _bad(where, f"{_show(v)} holds control characters")
    return v


def _list(v, where: str, limit: int = MAX_ITEMS) -> list:
    if not isinstance(v, list):
        _bad(where, f"expected a list, got {_kind(v)}")
    if len(v) > limit:
        _bad(where, f"a list of {len(v)} items, more than {limit}")
    return v


def _choice(v, where: str, allowed) -> str:
    if not isinstance(v, str) or v not in allowed:
        _bad(where, f"{_show(v)} is not one of {', '.join(map(str, allowed))}")
    return v


def is_identifier(s) -> bool:
    """An ASCII Python identifier, not a keyword, not a dunder: a name safe in generated code."""
    return (isinstance(s, str) and len(s) <= MAX_NAME and _IDENT.fullmatch(s) is not None
            and not keyword.iskeyword(s) and not (s.startswith("__") and s.endswith("__")))


def is_state_key(s) -> bool:
    """A dotted name of identifiers and indices: ``layers.0.weight``."""
    return (isinstance(s, str) and 0 < len(s) <= MAX_NAME
            and all(is_identifier(p) or _INDEX.fullmatch(p) for p in s.split(".")))


# attributes of the GraphModule a loaded program's stand-in subgraphs must not replace
_RESERVED_ATTRS = frozenset(dir(fx.GraphModule)) | frozenset(vars(torch.nn.Module()))


def _is_attr_path(s) -> bool:
    """A get_attr target: a state key with no private part and not naming the module's own."""
    return (is_state_key(s) and not any(p.startswith("_") for p in s.split("."))
            and s.split(".")[0] not in _RESERVED_ATTRS)


def _node_name(v, where: str, what: str = "a node name") -> str:
    if not is_identifier(v) or v == "self":
        _bad(where, f"{_show(v)} is not {what} (an ASCII Python identifier, not a keyword or dunder)")
    return v


def _state_key(v, where: str) -> str:
    if not is_state_key(v):
        _bad(where, f"{_show(v)} is not a state key (Python identifiers and indices joined by dots)")
    return v


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


def _decode(a, node=None, tensor=None, where: str = "value", depth: int = 0):
    """Inverse of ``_encode``, checking as it goes: ``node(name)`` and ``tensor(spec, where)``
    resolve those tags (refused where not given); PlanFileError names anything else."""
    if depth > MAX_DEPTH:
        _bad(where, f"nested deeper than {MAX_DEPTH} levels")
    if a is None or isinstance(a, bool):
        return a
    if isinstance(a, str):
        return a if len(a) <= MAX_TEXT else _bad(where, f"a string of {len(a)} characters, more than {MAX_TEXT}")
    if isinstance(a, int):
        return _int(a, where, *INT64)
    if isinstance(a, float):
        return a if math.isfinite(a) else _bad(where, "a non-finite number (write it {\"float\": \"inf\"})")
    if isinstance(a, list):
        return [_decode(x, node, tensor, f"{where}[{i}]", depth + 1) for i, x in enumerate(_list(a, where))]
    if not isinstance(a, dict):
        _bad(where, f"{_kind(a)} is not a JSON value")
    if len(a) != 1:
        _bad(where, f"a tagged value has one key, got {_show(sorted(map(str, a)))}")
    (tag, v), = a.items()
    return _decode_tagged(tag, v, node, tensor, where, depth)


def _decode_tagged(tag, v, node, tensor, where: str, depth: int):
    if tag == "node" and node is not None:
        return node(_node_name(v, f"{where} (a node reference)"))
    if tag == "tuple":
        return tuple(_decode(x, node, tensor, f"{where}[{i}]", depth + 1) for i, x in enumerate(_list(v, where)))
    if tag == "dict":
        out = {}
        for k, x in _object(v, where).items():
            if not isinstance(k, str) or len(k) > MAX_TEXT:
                _bad(where, f"key {_show(k)} is not a string of at most {MAX_TEXT} characters")
            out[k] = _decode(x, node, tensor, f"{where}[{k[:40]!r}]", depth + 1)
        return out
    if tag == "float":
        if v not in ("inf", "-inf", "nan"):
            _bad(where, f"tagged float {_show(v)} is not inf, -inf or nan")
        return float(v)
    if tag in _TABLES:
        if not isinstance(v, str) or v not in _TABLES[tag]:
            _bad(where, f"unknown {tag.replace('_', ' ')} {_show(v)}")
        return _TABLES[tag][v]
    if tag == "device":
        if not isinstance(v, str) or not _DEVICE.fullmatch(v):
            _bad(where, f"device {_show(v)} is not one of {', '.join(DEVICE_TYPES)} (with an optional :index)")
        return torch.device(v)
    if tag == "slice":
        parts = [_decode(x, node, None, f"{where}[{i}]", depth + 1) for i, x in enumerate(_list(v, where, 3))]
        if len(parts) != 3 or not all(p is None or isinstance(p, (int, fx.Node)) and not isinstance(p, bool)
                                      for p in parts):
            _bad(where, "a slice is [start, stop, step] of integers, nodes or null")
        return slice(*parts)
    if tag == "ellipsis":
        return Ellipsis if v is None else _bad(where, "a tagged ellipsis holds null")
    if tag == "tensor" and tensor is not None:
        return tensor(v, where)
    _bad(where, f"unknown tag {_show(tag)}")


# ----------------------------------------------------------------------------- targets

# each inserted op is saved under its name (the serializer's entry in the op registry)
_SAVED_OP_NAMES = ops.register("serializer", {op: f"memsched.{op.value}" for op in ops.Op})
_MEMSCHED_OPS = {name: ops.TARGETS[op] for op, name in _SAVED_OP_NAMES.items()}
# the Python functions an fx graph of torch.export (and memsched's own rewriting) calls
_PY_TARGETS = {"operator.getitem": operator.getitem}
# the higher-order ops the capture leaves in a graph (nested no_grad regions, autocast)
_HIGHER_ORDER = ("wrap_with_set_grad_enabled", "wrap_with_autocast")
_OP_NAMESPACES = ("aten", "prims")


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
        if not is_state_key(key):
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
                        f"{'/'.join(_OP_NAMESPACES)} operators, memsched's ops and {', '.join(_PY_TARGETS)})")


def resolve_target(name: str):
    """The callable a saved target name stands for, from an allowlist: ``aten::<op>.<overload>``
    and ``prims::...`` (looked up in ``torch.ops`` and checked to be an OpOverload),
    ``higher_order::<op>`` for the wrappers the capture produces, memsched's inserted ops and
    ``operator.getitem``. Nothing is imported and no attribute path is walked."""
    if not isinstance(name, str) or len(name) > MAX_NAME:
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
    raise PlanFileError(f"unknown target {_show(name)}: a plan calls only {'/'.join(_OP_NAMESPACES)} "
                        f"operators, memsched's ops ({', '.join(_MEMSCHED_OPS)}) and {', '.join(_PY_TARGETS)}")


def _overload(ns: str, rest: str):
    """``torch.ops.<ns>.<op>.<overload>`` if that is an OpOverload, else None (op names may be
    dunders, ``aten::__and__.Tensor``: whatever the lookup returns is checked to be an op)."""
    packet_name, dot, overload = rest.partition(".")
    if not (dot and len(rest) <= MAX_NAME and _IDENT.fullmatch(packet_name) and _IDENT.fullmatch(overload)):
        return None
    try:
        packet = getattr(getattr(torch.ops, ns), packet_name)
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


_NODE_OPS = ("placeholder", "call_function", "get_attr", "output")
_NODE_FIELDS = (("name", "op", "target"), ("args", "kwargs", "meta", "val", "region"))


def _node_head(rec, i: int, seen: set, last: bool) -> tuple:
    """(name, op, fx target, state key) of node record ``i``, checked: the name, the kind, the
    target (from the allowlist), which fields the kind takes, the output last and alone."""
    where = f"program.nodes[{i}]"
    _fields(rec, where, *_NODE_FIELDS)
    name = _node_name(rec["name"], f"{where}.name")
    where = f"{where} ({name})"
    if name in seen:
        _bad(where, f"node name {name!r} is repeated")
    seen.add(name)
    op, target = _choice(rec["op"], f"{where}.op", _NODE_OPS), rec["target"]
    if (op == "output") != last:
        _bad(where, "the program ends with its one output node" if last else "an output node before the end")
    if op != "call_function" and "kwargs" in rec or op in ("placeholder", "get_attr") and "args" in rec:
        _bad(where, f"a {op} node takes no arguments")
    if op == "output":
        if name != "output" or target != "output" or "val" in rec:
            _bad(where, "the output node is named \"output\", has target \"output\" and no value")
        if len(_list(rec.get("args"), f"{where}.args")) != 1:
            _bad(where, "the output node has one argument")
        return name, op, None, None
    if op == "placeholder":
        return name, op, name, _state_key(target, f"{where}.target")
    if op == "get_attr":
        if not _is_attr_path(target):
            _bad(f"{where}.target", f"{_show(target)} is not a subgraph attribute (dotted identifiers, "
                                    f"none private or the module's own)")
        return name, op, target, None
    try:
        return name, op, resolve_target(target), None
    except PlanFileError as e:
        _bad(f"{where}.target", str(e))


def _check_fact(key: str, v, where: str):
    if key == "memsched.pass":
        return _text(v, where, 64)
    if v is None:
        return None
    if key == "memsched.kind":
        return _choice(v, where, [k.value for k in Kind])
    if key == "memsched.tier":
        return _choice(v, where, [t.value for t in Tier])
    if key == "memsched.nbytes":
        return _int(v, where, 0, MAX_BYTES)
    if key in ("memsched.restores", "memsched.saves", "memsched.delivers"):
        return _node_name(v, where)
    if key == "memsched.grad_of":
        return _state_key(v, where)
    if key == "memsched.step":
        return _int(v, where, 0, MAX_ITEMS)
    if key == "memsched.buffers":
        return [_int(x, f"{where}[{i}]", 0, MAX_STORAGES) for i, x in enumerate(_list(v, where))]
    # a fact this table does not know yet: a JSON scalar; from_saved refuses unknown keys
    if isinstance(v, str):
        return _text(v, where)
    if isinstance(v, bool) or isinstance(v, int) and INT64[0] <= v <= INT64[1]:
        return v
    _bad(where, f"expected a string, integer or boolean, got {_kind(v)}")


def _node_facts(meta, where: str):
    """The node's ``memsched.*`` facts (a NodeInfo), each of its type."""
    if not isinstance(meta, dict):
        _bad(where, f"expected an object, got {_kind(meta)}")
    facts = {}
    for k, v in meta.items():
        if not isinstance(k, str) or not k.startswith(f"{KEY}.") or len(k) > 64:
            _bad(where, f"unknown node fact {_show(k)}")
        facts[k] = _check_fact(k, v, f"{where}[{k!r}]")
    try:
        return from_saved(facts)
    except (TypeError, ValueError) as e:
        _bad(where, str(e))


def _tensor(spec, where: str, sizes: list, bases: list) -> torch.Tensor:
    """A meta tensor on storage ``spec["storage"]``, its layout checked against the storage."""
    _fields(spec, where, ("shape", "stride", "dtype", "offset", "storage"))
    shape = [_int(s, f"{where}.shape[{i}]", 0, MAX_ELEMENTS)
             for i, s in enumerate(_list(spec["shape"], f"{where}.shape", MAX_RANK))]
    stride = [_int(s, f"{where}.stride[{i}]", 0, MAX_ELEMENTS)
              for i, s in enumerate(_list(spec["stride"], f"{where}.stride", MAX_RANK))]
    if len(stride) != len(shape):
        _bad(where, f"{len(stride)} strides for {len(shape)} dimensions")
    dtype = DTYPES[_choice(spec["dtype"], f"{where}.dtype", DTYPES)]
    offset = _int(spec["offset"], f"{where}.offset", 0, MAX_ELEMENTS)
    if not sizes:
        _bad(f"{where}.storage", "the program has no storages")
    sid = _int(spec["storage"], f"{where}.storage", 0, len(sizes) - 1)
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
    spec = _fields(rec["region"], f"{where}.region", ("nbytes", "names", "program"))
    try:
        gm = graph_from_dict(spec["program"], _inner=True)
    except PlanFileError as e:
        raise PlanFileError(f"{where}.region: {e}") from None
    names = tuple(target_name_of(n.target) for n in gm.graph.nodes
                  if n.op == "call_function" and n.target is not operator.getitem)
    n_ops = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    former = [_node_name(v, f"{where}.region.names[{i}]")
              for i, v in enumerate(_list(spec["names"], f"{where}.region.names", MAX_NODES))]
    if len(former) != n_ops or len(set(former)) != n_ops:
        _bad(f"{where}.region.names", f"one distinct name per op of the region ({n_ops})")
    return Region(gm, names, _int(spec["nbytes"], f"{where}.region.nbytes", 0, MAX_BYTES), structure_key(gm),
                  tuple(former))


def graph_from_dict(d: dict, root: torch.nn.Module | None = None, *, _inner: bool = False) -> fx.GraphModule:
    """Rebuild the program with meta-device values; views share their base's storage. Nodes
    are made first and wired second, so a program that reads a value before it is defined
    still loads, for the verifier to reject it by step. Every record is checked first: names,
    targets, arguments and values (PlanFileError)."""
    _fields(d, "program", ("storages", "nodes"))
    sizes = [_int(nb, f"program.storages[{i}]", 0, MAX_BYTES)
             for i, nb in enumerate(_list(d["storages"], "program.storages", MAX_STORAGES))]
    records = _list(d["nodes"], "program.nodes", MAX_NODES)
    if not records:
        _bad("program.nodes", "a program has at least its output node")
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
        if "meta" in rec and _object(rec["meta"], f"{where}.meta"):
            n.meta[KEY] = _node_facts(rec["meta"], f"{where}.meta")
        if "val" in rec:
            n.meta["val"] = _decode(rec["val"], tensor=lambda spec, at: _tensor(spec, at, sizes, bases),
                                    where=f"{where}.val")
        reg = _region(rec, target, where, _inner)
        if reg is not None:
            n.meta[REGION_KEY] = reg
    _wire(made, records)
    root = root if root is not None else torch.nn.Module()
    for n in g.nodes:  # a loaded program only prints and verifies: subgraphs are stand-ins
        if n.op == "get_attr" and not _has_attr(root, n.target):
            _set_attr(root, n.target, torch.nn.Module())
    try:
        return fx.GraphModule(root, g, class_name="ScheduledProgram")
    except Exception as e:  # every name and target was checked: this is not expected
        _bad("program", f"cannot be rebuilt ({type(e).__name__}: {e})")


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
        where = f"program.nodes[{i}] ({n.name})"
        try:
            if "args" in rec:
                n.args = tuple(_decode(_list(rec["args"], f"{where}.args"), node, where=f"{where}.args"))
            if "kwargs" in rec:
                kwargs = _object(rec["kwargs"], f"{where}.kwargs")
                n.kwargs = {_node_name(k, f"{where}.kwargs", "a keyword argument"):
                            _decode(v, node, where=f"{where}.kwargs.{k}") for k, v in kwargs.items()}
        except PlanFileError as e:
            raise PlanFileError(str(e) if str(e).startswith("program.") else f"{where}: {e}") from None


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
    dtype and device type, or a non-tensor's repr."""
    spec, leaves = sig
    out = []
    for leaf in leaves:
        if leaf[0] == "T":
            out.append({"shape": list(leaf[1]), "dtype": leaf[2], "device": leaf[3]})
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


def _sim_from_dict(d, where: str) -> SimResult:
    _fields(d, where, ("time_s", "compute_s", "stall_s", "peak_device_bytes", "bytes_moved", "timeline", "spans"),
            ("contention_s",))
    moved = _fields(d["bytes_moved"], f"{where}.bytes_moved", (), [link.value for link in LINKS])
    timeline = []
    for i, row in enumerate(_list(d["timeline"], f"{where}.timeline")):
        at = f"{where}.timeline[{i}]"
        if len(_list(row, at)) != 2:
            _bad(at, "a timeline row is [node, device bytes]")
        timeline.append((_text(row[0], f"{at}[0]", MAX_NAME), _int(row[1], f"{at}[1]")))
    spans = []
    streams = ["compute", *(link.value for link in LINKS)]
    for i, row in enumerate(_list(d["spans"], f"{where}.spans")):
        at = f"{where}.spans[{i}]"
        if len(_list(row, at)) != 4:
            _bad(at, "a span is [stream, node, start, end]")
        spans.append(Span(_choice(row[0], f"{at}[0]", streams), _text(row[1], f"{at}[1]", MAX_NAME),
                          _number(row[2], f"{at}[2]"), _number(row[3], f"{at}[3]")))
    return SimResult(_number(d["time_s"], f"{where}.time_s"), _number(d["compute_s"], f"{where}.compute_s"),
                     _number(d["stall_s"], f"{where}.stall_s"),
                     _int(d["peak_device_bytes"], f"{where}.peak_device_bytes"), timeline,
                     {k: _int(v, f"{where}.bytes_moved.{k}") for k, v in moved.items()}, spans,
                     _number(d.get("contention_s", 0.0), f"{where}.contention_s"))


def _signature_from_dict(d, where: str = "input_signature") -> tuple | None:
    if d is None:
        return None
    _fields(d, where, ("spec", "leaves"))
    leaves = []
    for i, leaf in enumerate(_list(d["leaves"], f"{where}.leaves")):
        at = f"{where}.leaves[{i}]"
        if isinstance(leaf, dict) and "value" in leaf:
            leaves.append(("V", _text(_fields(leaf, at, ("value",))["value"], f"{at}.value")))
            continue
        _fields(leaf, at, ("shape", "dtype", "device"))
        shape = tuple(_int(s, f"{at}.shape[{j}]", 0, MAX_ELEMENTS)
                      for j, s in enumerate(_list(leaf["shape"], f"{at}.shape", MAX_RANK)))
        dtype = _choice(leaf["dtype"], f"{at}.dtype", [f"torch.{k}" for k in DTYPES])
        leaves.append(("T", shape, dtype, _choice(leaf["device"], f"{at}.device", DEVICE_TYPES)))
    return (_text(d["spec"], f"{where}.spec"), tuple(leaves))


def _hardware_from_dict(d, where: str = "hardware") -> Hardware:
    fields = dataclasses.fields(Hardware)
    required = [f.name for f in fields if f.default is dataclasses.MISSING]
    _fields(d, where, required, [f.name for f in fields])
    values = {}
    for f in fields:
        if f.name not in d:
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        at, v = f"{where}.{f.name}", d[f.name]
        if kind in ("int", "int | None"):   # None: the device type's default, never written
            values[f.name] = _int(v, at)
        elif kind == "float":
            values[f.name] = _number(v, at)
            if not values[f.name] >= 0:
                _bad(at, f"{_show(v)} is negative")
        else:
            values[f.name] = _text(v, at, MAX_NAME if f.name != "source" else MAX_TEXT)
    _choice(values["device_type"], f"{where}.device_type", ("cuda", "cpu"))
    try:
        return Hardware(**values)
    except ValueError as e:   # a value in range for its type, not for the profile
        _bad(where, str(e))


def _floor_from_dict(d, where: str) -> dict:
    """The optional floor record: its bytes, the op, and where the minimum binds."""
    if d is None:
        return {}
    _fields(d, where, ("bytes", "at", "binds_at"))
    return {"floor_bytes": _int(d["bytes"], f"{where}.bytes", 0, MAX_BYTES),
            "floor_at": _text(d["at"], f"{where}.at", MAX_TEXT),
            "binds_at": _text(d["binds_at"], f"{where}.binds_at", MAX_TEXT)}


def _facts_from_dict(pl, where: str = "placement") -> tuple[PlacementFacts, int]:
    """The placement facts and the number of segments."""
    keys = ("status", "mip_gap", "solve_s", "min_budget_bytes", "segments", "movable_gaps", "tier_bytes",
            "offloaded_activation_bytes")
    _fields(pl, where, keys, (*keys, "notes", "saved_activations", "floor"))
    tiers = _fields(pl["tier_bytes"], f"{where}.tier_bytes", ("device", "host", "disk"))
    offloaded = _fields(pl["offloaded_activation_bytes"], f"{where}.offloaded_activation_bytes", ("host", "disk"))
    notes = _list(pl.get("notes", []), f"{where}.notes")
    saved = []
    for i, r in enumerate(_list(pl.get("saved_activations", []), f"{where}.saved_activations")):
        at = f"{where}.saved_activations[{i}]"
        _fields(r, at, SAVED_ACTIVATION_KEYS)
        saved.append({k: _node_name(r[k], f"{at}.{k}") if k == "value" else
                      _choice(r[k], f"{at}.{k}", ("keep", "refetch", "recompute", "host", "disk")) if k == "decision"
                      else _int(r[k], f"{at}.{k}", 0, MAX_BYTES) for k in SAVED_ACTIVATION_KEYS})
    facts = PlacementFacts(
        status=_text(pl["status"], f"{where}.status", MAX_NAME),
        mip_gap=None if pl["mip_gap"] is None else _number(pl["mip_gap"], f"{where}.mip_gap"),
        solve_s=_number(pl["solve_s"], f"{where}.solve_s"),
        min_budget_bytes=_int(pl["min_budget_bytes"], f"{where}.min_budget_bytes"),
        movable_gaps=_int(pl["movable_gaps"], f"{where}.movable_gaps", 0, MAX_ITEMS),
        tier_bytes={k: _int(v, f"{where}.tier_bytes.{k}") for k, v in tiers.items()},
        offloaded_activation_bytes={k: _int(v, f"{where}.offloaded_activation_bytes.{k}")
                                    for k, v in offloaded.items()},
        notes=tuple(_text(x, f"{where}.notes[{i}]") for i, x in enumerate(notes)), saved_activations=tuple(saved),
        **_floor_from_dict(pl.get("floor"), f"{where}.floor"))
    return facts, _int(pl["segments"], f"{where}.segments", 0, MAX_ITEMS)


def _passes_from_dict(v, where: str = "passes") -> list[PassRecord]:
    out = []
    for i, p in enumerate(_list(v, where, MAX_NAME)):
        at = f"{where}[{i}]"
        _fields(p, at, ("name", "seconds"), ("name", "seconds", "note"))
        out.append(PassRecord(_text(p["name"], f"{at}.name", MAX_NAME), _number(p["seconds"], f"{at}.seconds"),
                              _text(p.get("note", ""), f"{at}.note")))
    return out


MAX_CHUNKS = 1 << 16


def _chunking_from_dict(v, where: str = "chunking") -> tuple[Chunking, ...]:
    """The modules a plan runs on slices of their input: module paths (never private or the
    module's own attributes), ROOT (the model itself) or LOSS_HEAD, a row dim and a slice
    count, each in range."""
    out = []
    for i, c in enumerate(_list(v, where)):
        at = f"{where}[{i}]"
        _fields(c, at, ("path", "dim", "chunks"), ("path", "dim", "chunks"))
        if c["path"] not in (LOSS_HEAD, ROOT) and not _is_attr_path(c["path"]):
            _bad(f"{at}.path", f"{_show(c['path'])} is not a module path")
        out.append(Chunking(c["path"], _int(c["dim"], f"{at}.dim", 0, MAX_RANK - 1),
                            _int(c["chunks"], f"{at}.chunks", 2, MAX_CHUNKS)))
    return tuple(out)


_SECTIONS = ("format", "version", "model", "budget_bytes", "hardware", "placement", "passes", "predicted",
             "unconstrained", "program")


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
    try:
        _fields(d, "", _SECTIONS, (*_SECTIONS, "memsched_version", "torch_version", "input_signature", "chunking"))
        for key in ("memsched_version", "torch_version"):
            if key in d:
                _text(d[key], key, MAX_NAME)
        facts, n_segments = _facts_from_dict(d["placement"])
        return dict(
            model_name=_text(d["model"], "model"), budget_bytes=_int(d["budget_bytes"], "budget_bytes", 1),
            hardware=_hardware_from_dict(d["hardware"]), graph=graph_from_dict(d["program"]), program=None,
            placement=None, sim=_sim_from_dict(d["predicted"], "predicted"),
            unconstrained=_sim_from_dict(d["unconstrained"], "unconstrained"), passes=_passes_from_dict(d["passes"]),
            n_segments=n_segments, facts=facts, signature=_signature_from_dict(d.get("input_signature")),
            chunking=_chunking_from_dict(d.get("chunking", [])))
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
