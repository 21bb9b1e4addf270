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

This module does not know ``Plan`` (memsched/plans.py sits above it): ``plan_to_dict`` and
``save_plan`` read any object with a plan's attributes, and ``load_fields``/``plan_fields``
return the keyword arguments ``Plan(**fields)`` takes (``Plan.load`` and ``Plan.from_dict``).
Re-applying a saved plan to a fresh capture is memsched/io/reapply.py.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import math
from pathlib import Path

import torch
import torch.fx as fx
from torch.multiprocessing.reductions import StorageWeakRef

from ..cost_models.hardware import Hardware
from ..cost_models.simulator import SimResult, Span
from ..ir import ops
from ..ir.meta import KEY, from_saved, info, to_saved
from ..plan_records import SAVED_ACTIVATION_KEYS, PassRecord, PlacementFacts
from .reapply import PlanMismatchError  # noqa: F401  (re-exported)

FORMAT = "memsched-plan"
VERSION = 1


class PlanFileError(ValueError):
    """Not a memsched plan, written by a newer memsched, or damaged; the message says which."""


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


def _torch_attr(kind: str, name, types) -> object:
    value = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(value, types):
        raise PlanFileError(f"unknown {kind} {name!r}")
    return value


def _decode(a, node=None, tensor=None):
    """Inverse of ``_encode``; ``node(name)`` and ``tensor(spec)`` resolve those tags."""
    if isinstance(a, list):
        return [_decode(x, node, tensor) for x in a]
    if not isinstance(a, dict):
        return a
    if len(a) != 1:
        raise PlanFileError(f"a tagged value has one key, got {sorted(a)}")
    (tag, v), = a.items()
    if tag == "node" and node is not None:
        return node(v)
    if tag == "tuple":
        return tuple(_decode(x, node, tensor) for x in v)
    if tag == "dict":
        return {k: _decode(x, node, tensor) for k, x in v.items()}
    if tag == "float":
        if v not in ("inf", "-inf", "nan"):
            raise PlanFileError(f"tagged float {v!r} is not inf, -inf or nan")
        return float(v)
    if tag == "dtype":
        return _torch_attr("dtype", v, torch.dtype)
    if tag == "device":
        return torch.device(v)
    if tag == "layout":
        return _torch_attr("layout", v, torch.layout)
    if tag == "memory_format":
        return _torch_attr("memory format", v, torch.memory_format)
    if tag == "slice":
        return slice(*(_decode(x, node, tensor) for x in v))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "tensor" and tensor is not None:
        return tensor(v)
    raise PlanFileError(f"unknown tag {tag!r}")


# ----------------------------------------------------------------------------- targets

# each inserted op is saved under its name (the serializer's entry in the op registry)
_SAVED_OP_NAMES = ops.register("serializer", {op: f"memsched.{op.value}" for op in ops.Op})
_MEMSCHED_OPS = {name: ops.TARGETS[op] for op, name in _SAVED_OP_NAMES.items()}
_PY_MODULES = ("operator", "math", "builtins")


def target_name(n: fx.Node) -> str:
    """The qualified name a node's target is saved under."""
    t = n.target
    if n.op in ("placeholder", "get_attr", "output"):
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        return f"{t._schema.name}.{t._overloadname}"
    if isinstance(t, torch._ops.HigherOrderOperator):
        return f"higher_order::{t.name()}"
    for name, op in _MEMSCHED_OPS.items():
        if t is op:
            return name
    module, qualname = getattr(t, "__module__", None), getattr(t, "__qualname__", None)
    module = {"_operator": "operator"}.get(module, module)
    if module and qualname:
        name = f"{module}.{qualname}"
        try:
            if resolve_target(name) is t:
                return name
        except PlanFileError:
            pass
    raise PlanFileError(f"{n.name}: cannot save its target {t!r} by name")


def resolve_target(name: str):
    """The callable a saved target name stands for (ATen/higher-order ops, memsched ops, and
    functions of ``operator``, ``math``, ``builtins`` and ``torch``)."""
    if name in _MEMSCHED_OPS:
        return _MEMSCHED_OPS[name]
    if "::" in name:
        ns, _, rest = name.partition("::")
        try:
            if ns == "higher_order":
                return getattr(torch.ops.higher_order, rest)
            op, _, overload = rest.rpartition(".")
            return getattr(getattr(getattr(torch.ops, ns), op), overload)
        except (AttributeError, RuntimeError) as e:
            raise PlanFileError(f"unknown operator {name!r} ({e})") from None
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:i])
        if module not in _PY_MODULES and module != "torch" and not module.startswith("torch."):
            continue
        try:
            obj = importlib.import_module(module)
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        if callable(obj):
            return obj
    raise PlanFileError(f"unknown target {name!r}")


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
        nodes.append(rec)
    return {"storages": storages, "nodes": nodes}


def graph_from_dict(d: dict, root: torch.nn.Module | None = None) -> fx.GraphModule:
    """Rebuild the program with meta-device values; views share their base's storage. Nodes
    are made first and wired second, so a program that reads a value before it is defined
    still loads, for the verifier to reject it by step."""
    bases = [torch.empty(int(nb), dtype=torch.uint8, device="meta").untyped_storage() for nb in d["storages"]]

    def tensor(spec: dict) -> torch.Tensor:
        dtype = _torch_attr("dtype", spec["dtype"], torch.dtype)
        try:
            return torch.empty(0, dtype=dtype, device="meta").set_(
                bases[spec["storage"]], spec["offset"], spec["shape"], spec["stride"])
        except (IndexError, RuntimeError, TypeError) as e:
            raise PlanFileError(f"tensor {spec} does not fit its storage: {e}") from None

    g = fx.Graph()
    made: dict[str, fx.Node] = {}
    records = d["nodes"]
    for rec in records:
        op, name = rec["op"], rec["name"]
        if op == "placeholder":
            n = g.create_node("placeholder", rec["target"], name=name)
        elif op == "output":
            n = g.output(None)
        elif op == "get_attr":
            n = g.create_node("get_attr", rec["target"], name=name)
        elif op == "call_function":
            n = g.create_node("call_function", resolve_target(rec["target"]), name=name)
        else:
            raise PlanFileError(f"{name}: unsupported node kind {op!r}")
        if op != "output" and n.name != name:
            raise PlanFileError(f"node name {name!r} is repeated or not a Python identifier")
        made[name] = n
        if rec.get("meta"):
            try:
                n.meta[KEY] = from_saved({k: _decode(v) for k, v in rec["meta"].items()})
            except (TypeError, ValueError) as e:
                raise PlanFileError(f"{name}: {e}") from None
        if "val" in rec:
            n.meta["val"] = _decode(rec["val"], tensor=tensor)

    def node(name):
        if name not in made:
            raise PlanFileError(f"a node reads {name!r}, which the program does not define")
        return made[name]

    for rec in records:
        n = made[rec["name"]]
        if "args" in rec:
            n.args = tuple(_decode(rec["args"], node))
        if "kwargs" in rec:
            n.kwargs = {k: _decode(v, node) for k, v in rec["kwargs"].items()}
    root = root if root is not None else torch.nn.Module()
    for n in g.nodes:  # a loaded program only prints and verifies: subgraphs are stand-ins
        if n.op == "get_attr" and not _has_attr(root, n.target):
            _set_attr(root, n.target, torch.nn.Module())
    return fx.GraphModule(root, g, class_name="ScheduledProgram")


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


# ----------------------------------------------------------------------------- plans


def _sim_to_dict(sim: SimResult) -> dict:
    enc = lambda x: _encode(float(x), "prediction")  # noqa: E731
    return {
        "time_s": enc(sim.time_s), "compute_s": enc(sim.compute_s), "stall_s": enc(sim.stall_s),
        "peak_device_bytes": int(sim.peak_device_bytes),
        "bytes_moved": {k: int(v) for k, v in sorted(sim.bytes_moved.items())},
        "timeline": [[name, int(b)] for name, b in sim.timeline],
        "spans": [[s.stream, s.name, enc(s.start), enc(s.end)] for s in sim.spans],
    }


def _sim_from_dict(d: dict) -> SimResult:
    f = lambda x: float(_decode(x))  # noqa: E731
    return SimResult(f(d["time_s"]), f(d["compute_s"]), f(d["stall_s"]), int(d["peak_device_bytes"]),
                     [(name, int(b)) for name, b in d["timeline"]],
                     {k: int(v) for k, v in d["bytes_moved"].items()},
                     [Span(stream, name, f(s), f(e)) for stream, name, s, e in d["spans"]])


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


def _signature_from_dict(d: dict) -> tuple:
    leaves = tuple(("T", tuple(x["shape"]), x["dtype"], x["device"]) if "shape" in x else ("V", x["value"])
                   for x in d["leaves"])
    return (d["spec"], leaves)


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
    return out


def _saved_activation(r: dict) -> dict:
    """One saved-activation row with the types it has (names and decisions text, the rest ints)."""
    return {k: str(r[k]) if k in ("value", "decision") else int(r[k]) for k in SAVED_ACTIVATION_KEYS}


def _facts_from_dict(pl: dict) -> PlacementFacts:
    saved = tuple(_saved_activation(r) for r in pl.get("saved_activations", ()))
    return PlacementFacts(
        status=pl["status"], mip_gap=None if pl["mip_gap"] is None else float(_decode(pl["mip_gap"])),
        solve_s=float(_decode(pl["solve_s"])), min_budget_bytes=int(pl["min_budget_bytes"]),
        movable_gaps=int(pl["movable_gaps"]),
        tier_bytes={k: int(v) for k, v in pl["tier_bytes"].items()},
        offloaded_activation_bytes={k: int(v) for k, v in pl["offloaded_activation_bytes"].items()},
        notes=tuple(pl.get("notes", ())), saved_activations=saved)


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


def check_header(d, source: str = "the plan") -> None:
    """PlanFileError unless ``d`` is a memsched plan of a version this memsched reads."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise PlanFileError(f"{source} is not a memsched plan (no \"format\": \"{FORMAT}\")")
    version = d.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise PlanFileError(f"{source}: plan format version {version!r} is not valid")
    if version > VERSION:
        raise PlanFileError(
            f"{source} was written by a newer memsched ({d.get('memsched_version', '?')}, plan format "
            f"version {version}); this memsched reads up to version {VERSION}: upgrade memsched")


def plan_fields(d: dict, source: str = "the plan") -> dict:
    """The keyword arguments of ``Plan`` for the JSON document (no ``program``/``placement``:
    a loaded plan prints, summarises and verifies without re-solving)."""
    check_header(d, source)
    try:
        pl = d["placement"]
        signature = d.get("input_signature")
        return dict(
            model_name=d["model"], budget_bytes=int(d["budget_bytes"]), hardware=Hardware.from_dict(d["hardware"]),
            graph=graph_from_dict(d["program"]), program=None, placement=None,
            sim=_sim_from_dict(d["predicted"]), unconstrained=_sim_from_dict(d["unconstrained"]),
            passes=[PassRecord(p["name"], float(_decode(p["seconds"])), p.get("note", "")) for p in d["passes"]],
            n_segments=int(pl["segments"]), facts=_facts_from_dict(pl),
            signature=None if signature is None else _signature_from_dict(signature))
    except KeyError as e:
        raise PlanFileError(f"{source} is damaged: {e.args[0]!r} is missing") from None
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, PlanFileError):
            raise PlanFileError(f"{source} is damaged: {e}") from None
        raise PlanFileError(f"{source} is damaged: {type(e).__name__}: {e}") from None


def read_document(path) -> dict:
    """The JSON document in ``path`` (PlanFileError when unreadable or not JSON)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PlanFileError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanFileError(f"{path} is not a memsched plan (not JSON: {e})") from None


def load_fields(path) -> dict:
    """The keyword arguments of ``Plan`` for the plan ``save_plan`` wrote to ``path``
    (PlanFileError for another file or a newer format)."""
    return plan_fields(read_document(path), str(Path(path)))
