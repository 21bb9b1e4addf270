"""The plan file's shape as a JSON Schema (draft 2020-12), checked by ``jsonschema``.

A saved plan is read in two stages. This module is the first: the document's structure —
which sections and fields exist, each field's type, every number's range, every list's length,
every string's length and alphabet, the enumerations (dtypes, tensor kinds, tiers, links, node
ops, decisions) and the tagged values of node arguments — is one declarative schema, validated
by a well-kept library before any of it is used. The second stage (memsched/io/serialize.py)
checks what a schema cannot say: that op targets resolve to registered torch.ops overloads or
memsched's ops, that a tensor fits its storage, that names are unique and every reference is
defined, that the output comes last.

The schema is built from memsched's own tables (so it cannot drift from what the reader
builds) and published: ``memsched schema`` prints it, for tools and notebooks that read plan
files without memsched.

Strings that end up in generated code (node names, keyword names, state keys, attribute
paths) are checked by formats this module registers, not by regular expressions: JSON
Schema's ``$`` lets a trailing newline through.
"""
from __future__ import annotations

import dataclasses
import keyword
import re
import reprlib

import jsonschema
import torch
import torch.fx as fx
from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import best_match

from ..cost_models.hardware import Hardware
from ..ir.kinds import LINKS, Kind, Tier
from ..passes.chunking import LOSS_HEAD, ROOT
from ..plan_records import SAVED_ACTIVATION_KEYS

__all__ = ["SCHEMA", "FORMAT", "VERSION", "LIMITS", "schema_errors", "first_error",
           "is_identifier", "is_state_key", "is_attr_path", "NAME_RULES", "show", "DTYPES", "LAYOUTS", "MEMORY_FORMATS"]

FORMAT = "memsched-plan"
VERSION = 1

# What a plan file may hold: far above any real plan, low enough that a hostile file cannot
# make the reader allocate or recurse without bound.
LIMITS = dict(
    file_bytes=256 << 20,
    depth=64,                  # JSON nesting (a real plan nests about 8 levels)
    nodes=1_000_000,
    storages=4_000_000,
    items=4_000_000,           # any other list: timeline, spans, a node's arguments
    rank=64,
    elements=1 << 48,          # elements of one tensor, and any stride or offset
    bytes=1 << 50,             # bytes of one storage, a budget, a device
    text=1 << 16,              # characters of a string
    value_text=1 << 24,        # characters of a value read off the inputs (a list of integers)
    name=1024,                 # characters of a name
    chunks=1 << 16,
)
INT64 = (-(1 << 63), (1 << 63) - 1)


def _named(kind) -> dict:
    """name -> value of every ``torch.<name>`` of that type, named as ``str()`` spells it."""
    return {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, kind)}


DTYPES = _named(torch.dtype)
LAYOUTS = _named(torch.layout)
MEMORY_FORMATS = _named(torch.memory_format)
NODE_OPS = ("placeholder", "call_function", "get_attr", "output")
DEVICE_PATTERN = r"^(cpu|cuda|meta)(:(0|[1-9][0-9]{0,3}))?$"
DEVICE_TYPES = ("cpu", "cuda", "meta")
FLOAT_WORDS = ("inf", "-inf", "nan")
DECISIONS = ("keep", "refetch", "recompute", "host", "disk")
# C0/C1 controls except tab and newline, and the bidi overrides: text a terminal would obey
CONTROL = "\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069"

# ----------------------------------------------------------------------------- names

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INDEX = re.compile(r"0|[1-9][0-9]{0,17}")
# attributes of the GraphModule a loaded program's stand-in subgraphs must not replace
_RESERVED_ATTRS = frozenset(dir(fx.GraphModule)) | frozenset(vars(torch.nn.Module()))


def is_identifier(s) -> bool:
    """An ASCII Python identifier, not a keyword, not a dunder: a name safe in generated code."""
    return (isinstance(s, str) and len(s) <= LIMITS["name"] and _IDENT.fullmatch(s) is not None
            and not keyword.iskeyword(s) and not (s.startswith("__") and s.endswith("__")))


def is_state_key(s) -> bool:
    """A dotted name of identifiers and indices: ``layers.0.weight``."""
    return (isinstance(s, str) and 0 < len(s) <= LIMITS["name"]
            and all(is_identifier(p) or _INDEX.fullmatch(p) for p in s.split(".")))


def is_attr_path(s) -> bool:
    """A get_attr target: a state key with no private part and not naming the module's own."""
    return (is_state_key(s) and not any(p.startswith("_") for p in s.split("."))
            and s.split(".")[0] not in _RESERVED_ATTRS)


_FORMATS = FormatChecker(formats=())
_FORMATS.checks("memsched-node-name")(lambda s: not isinstance(s, str) or (is_identifier(s) and s != "self"))
_FORMATS.checks("memsched-keyword")(lambda s: not isinstance(s, str) or is_identifier(s))
_FORMATS.checks("memsched-state-key")(lambda s: not isinstance(s, str) or is_state_key(s))
_FORMATS.checks("memsched-attribute")(lambda s: not isinstance(s, str) or is_attr_path(s))
NAME_RULES = {
    "memsched-node-name": "a node name (an ASCII Python identifier, not a keyword or dunder)",
    "memsched-keyword": "a keyword argument (an ASCII Python identifier, not a keyword or dunder)",
    "memsched-state-key": "a state key (Python identifiers and indices joined by dots)",
    "memsched-attribute": "a subgraph attribute (dotted identifiers, none private or the module's own)",
}

# ----------------------------------------------------------------------------- building blocks


def _int(lo: int = 0, hi: int = LIMITS["bytes"]) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def _text(limit: int = LIMITS["text"]) -> dict:
    return {"type": "string", "maxLength": limit, "pattern": f"^[^{CONTROL}]*$"}


def _list(items: dict, limit: int = LIMITS["items"], **more) -> dict:
    return {"type": "array", "items": items, "maxItems": limit, **more}


def _record(required: dict, optional: dict | None = None) -> dict:
    """An object with every ``required`` field, perhaps the ``optional`` ones, and no other."""
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required),
            "additionalProperties": False}


def _tagged(tags: dict) -> dict:
    """An object of one key, the tag, holding the tag's value."""
    return {"type": "object", "minProperties": 1, "maxProperties": 1, "propertyNames": {"enum": sorted(tags)},
            "properties": tags}


def _enum(values) -> dict:
    return {"enum": list(values)}


NAME = {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$", "format": "memsched-node-name",
        "description": NAME_RULES["memsched-node-name"]}
NUMBER = {"if": {"type": "object"}, "then": _tagged({"float": _enum(FLOAT_WORDS)}),   # finite, or tagged
          "else": {"type": "number"}}
SECONDS = {"if": {"type": "object"}, "then": _tagged({"float": _enum(["inf"])}), "else": {"type": "number",
                                                                                         "minimum": 0}}


def _values(name: str, extra: dict) -> dict:
    """``$defs`` entry for the JSON form of a Python constant, with ``extra`` tags (node
    references in arguments, tensors in values)."""
    ref = {"$ref": f"#/$defs/{name}"}
    tags = {
        "tuple": _list(ref),
        "dict": {"type": "object", "propertyNames": {"maxLength": LIMITS["text"]}, "additionalProperties": ref},
        "float": _enum(FLOAT_WORDS),
        "dtype": _enum(sorted(DTYPES)),
        "device": {"type": "string", "pattern": DEVICE_PATTERN,
                   "description": "a device (cpu, cuda or meta, with an optional :index)"},
        "layout": _enum(sorted(LAYOUTS)),
        "memory_format": _enum(sorted(MEMORY_FORMATS)),
        "ellipsis": {"type": "null"},
        **extra,
    }
    if "node" in extra:
        tags["slice"] = _list({"anyOf": [{"type": ["null", "integer"]}, _tagged({"node": NAME})]}, 3, minItems=3)
    else:
        tags["slice"] = _list({"type": ["null", "integer"]}, 3, minItems=3)
    return _by_type(tagged=_tagged(tags), array=_list(ref), scalar=SCALAR)


def _by_type(*, tagged: dict, array: dict | None = None, scalar: dict) -> dict:
    """Dispatch on the value's JSON type (``if``/``then``: one branch is checked, where
    ``anyOf`` would try them all, and a failure names the branch's own rule)."""
    rest = scalar if array is None else {"if": {"type": "array"}, "then": array, "else": scalar}
    return {"if": {"type": "object"}, "then": tagged, "else": rest}


SCALAR = {"type": ["null", "boolean", "integer", "number", "string"], "maxLength": LIMITS["text"],
          "if": {"type": "integer"}, "then": {"minimum": INT64[0], "maximum": INT64[1]}}


TENSOR = _record({"shape": _list(_int(0, LIMITS["elements"]), LIMITS["rank"]),
                  "stride": _list(_int(0, LIMITS["elements"]), LIMITS["rank"]),
                  "dtype": _enum(sorted(DTYPES)), "offset": _int(0, LIMITS["elements"]),
                  "storage": _int(0, LIMITS["storages"])})

FACTS = {
    "type": "object",
    "propertyNames": {"maxLength": 64},
    "properties": {
        "memsched.pass": _text(64),
        "memsched.kind": {"enum": [None, *(k.value for k in Kind)]},
        "memsched.tier": {"enum": [None, *(t.value for t in Tier)]},
        "memsched.nbytes": {"anyOf": [{"type": "null"}, _int()]},
        "memsched.restores": {"anyOf": [{"type": "null"}, NAME]},
        "memsched.saves": {"anyOf": [{"type": "null"}, NAME]},
        "memsched.delivers": {"anyOf": [{"type": "null"}, NAME]},
        "memsched.grad_of": {"anyOf": [{"type": "null"}, {"type": "string", "format": "memsched-state-key"}]},
        "memsched.gathered_from": {"anyOf": [{"type": "null"}, {"type": "string", "format": "memsched-state-key"}]},
        "memsched.step": {"anyOf": [{"type": "null"}, _int(0, LIMITS["items"])]},
        "memsched.buffers": {"anyOf": [{"type": "null"}, _list(_int(0, LIMITS["storages"]))]},
        "memsched.scratch": {"anyOf": [{"type": "null"}, _int()]},
    },
    "additionalProperties": False,
}

NODE = _record({"name": NAME, "op": _enum(NODE_OPS), "target": _text(LIMITS["name"])},
               {"args": {"type": "array", "maxItems": LIMITS["items"], "items": {"$ref": "#/$defs/argument"}},
                "kwargs": {"type": "object", "propertyNames": {"type": "string", "format": "memsched-keyword"},
                           "additionalProperties": {"$ref": "#/$defs/argument"}},
                "meta": FACTS, "val": {"$ref": "#/$defs/value"},
                "region": _record({"nbytes": _int(), "names": _list(NAME, LIMITS["nodes"]),
                                   "program": {"$ref": "#/$defs/program"}})})

PROGRAM = _record({"storages": _list(_int(), LIMITS["storages"]),
                   "nodes": _list(NODE, LIMITS["nodes"], minItems=1)})

STREAMS = ["compute", *(link.value for link in LINKS)]
PREDICTION = _record(
    {"time_s": NUMBER, "compute_s": NUMBER, "stall_s": NUMBER, "peak_device_bytes": _int(),
     "bytes_moved": {"type": "object", "propertyNames": _enum(link.value for link in LINKS),
                     "additionalProperties": _int()},
     "timeline": _list({"type": "array", "prefixItems": [_text(LIMITS["name"]), _int()], "minItems": 2,
                        "maxItems": 2}),
     "spans": _list({"type": "array", "prefixItems": [_enum(STREAMS), _text(LIMITS["name"]), NUMBER, NUMBER],
                     "minItems": 4, "maxItems": 4})},
    {"contention_s": NUMBER})


def _hardware() -> dict:
    """One field per ``Hardware`` field, typed as the dataclass declares it."""
    required, optional = {}, {}
    for f in dataclasses.fields(Hardware):
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind in ("int", "int | None"):   # None: the device type's default, never written
            spec = _int()
        elif kind == "float":
            spec = {"type": "number", "minimum": 0}
        else:
            spec = _text(LIMITS["text"] if f.name == "source" else LIMITS["name"])
        (required if f.default is dataclasses.MISSING else optional)[f.name] = spec
    required["device_type"] = _enum(["cuda", "cpu"])
    return _record(required, optional)


PLACEMENT = _record(
    {"status": _text(LIMITS["name"]), "mip_gap": {"anyOf": [{"type": "null"}, NUMBER]}, "solve_s": NUMBER,
     "min_budget_bytes": _int(), "segments": _int(0, LIMITS["items"]), "movable_gaps": _int(0, LIMITS["items"]),
     "tier_bytes": _record({t: _int() for t in ("device", "host", "disk")}),
     "offloaded_activation_bytes": _record({t: _int() for t in ("host", "disk")})},
    {"notes": _list(_text()),
     "saved_activations": _list(_record({k: NAME if k == "value" else _enum(DECISIONS) if k == "decision"
                                         else _int() for k in SAVED_ACTIVATION_KEYS})),
     "floor": {"anyOf": [{"type": "null"}, _record({"bytes": _int(), "at": _text(), "binds_at": _text()})]}})

SIGNATURE = {"anyOf": [{"type": "null"}, _record(
    {"spec": _text(), "leaves": _list({"anyOf": [
        _record({"value": _text()}),
        _record({"shape": _list(_int(0, LIMITS["elements"]), LIMITS["rank"]),
                 "dtype": _enum(f"torch.{d}" for d in sorted(DTYPES)), "device": _enum(DEVICE_TYPES)},
                {"same_as": _int(0, LIMITS["items"])})]})})]}   # a tensor passed again: the leaf it repeats

CHUNKING = _list(_record({"path": {"anyOf": [_enum([LOSS_HEAD, ROOT]),
                                             {"type": "string", "format": "memsched-attribute"}]},
                          "dim": _int(0, LIMITS["rank"] - 1), "chunks": _int(2, LIMITS["chunks"])}))

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "urn:memsched:plan:1",
    "title": "memsched plan, format version 1",
    "description": "A schedule memsched.plan() made, as Plan.save() writes it. Data only: no field is code.",
    "type": "object",
    "$defs": {"argument": _values("argument", {"node": NAME}), "value": _values("value", {"tensor": TENSOR}),
              "program": PROGRAM},
    **_record(
        {"format": {"const": FORMAT}, "version": {"const": VERSION}, "model": _text(),
         "budget_bytes": _int(1), "hardware": _hardware(), "placement": PLACEMENT,
         "passes": _list(_record({"name": _text(LIMITS["name"]), "seconds": SECONDS}, {"note": _text()}),
                         LIMITS["name"]),
         "predicted": PREDICTION, "unconstrained": PREDICTION, "program": {"$ref": "#/$defs/program"}},
        {"memsched_version": _text(LIMITS["name"]), "torch_version": _text(LIMITS["name"]),
         "input_signature": SIGNATURE, "chunking": CHUNKING,
         "input_values": _list(_record({"read": _text(), "value": _text(LIMITS["value_text"])}))}),
}

# Booleans are not integers, and 1.0 is not one either (JSON Schema says it is; a plan never
# writes it, and Python would carry it on as a float).
_TYPES = Draft202012Validator.TYPE_CHECKER.redefine(
    "integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool)).redefine(
    "number", lambda _, v: isinstance(v, (int, float)) and not isinstance(v, bool))
_Validator = jsonschema.validators.extend(Draft202012Validator, type_checker=_TYPES)
_VALIDATOR = _Validator(SCHEMA, format_checker=_FORMATS)


def _where(error) -> str:
    """``placement.tier_bytes.host``, ``program.nodes[3].args[0]``: the failing field's path."""
    out = ""
    for part in error.absolute_path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_ARTICLE = {"integer": "an integer", "number": "a number", "string": "a string", "array": "a list",
            "object": "an object", "boolean": "a boolean", "null": "null"}


def _kind(v) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(v), f"a Python {type(v).__name__}")


def _types(schema) -> list[str]:
    t = schema.get("type", [])
    return [t] if isinstance(t, str) else list(t)


def _message(error) -> str:
    """What is wrong, in the words of the rest of memsched's messages."""
    rule, value, schema, x = error.validator, error.validator_value, error.schema, error.instance
    if "description" in schema and rule in ("pattern", "format", "enum"):
        return f"{show(x)} is not {schema['description']}"
    if rule == "format":
        return f"{show(x)} is not {NAME_RULES.get(value, value)}"
    if rule == "type":
        return f"expected {' or '.join(_ARTICLE[t] for t in _types(schema))}, got {_kind(x)}"
    if rule == "pattern" and isinstance(x, str) and re.search(f"[{CONTROL}]", x):
        return f"{show(x)} holds control characters"
    if rule in ("maxLength", "maxItems"):
        return f"{len(x)} {'characters' if isinstance(x, str) else 'items'}, more than {value}"
    if rule == "minItems":
        return f"{len(x)} items, fewer than {value}"
    if rule == "required":
        missing = [k for k in value if k not in x]
        return f"{show(missing[0])} is missing" if missing else error.message
    if rule == "additionalProperties":
        unknown = sorted(set(x) - set(schema.get("properties", {})))
        return f"unknown field {show(unknown[0])}" if unknown else error.message
    if rule in ("minimum", "maximum"):
        lo, hi = schema.get("minimum"), schema.get("maximum")
        return f"{show(x)} is negative" if hi is None and lo == 0 else f"{show(x)} is out of range ({lo} to {hi})"
    if rule == "enum":
        key = "propertyNames" in error.schema_path
        listed = ", ".join(map(str, value[:12])) + (", …" if len(value) > 12 else "")
        return f"{'unknown key ' if key else ''}{show(x)}{':' if key else ' is not'} one of {listed}"
    return error.message if len(error.message) < 300 else error.message[:300] + "…"


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 80
_SHOW.maxlevel = 3


def show(v) -> str:
    """A value in a message: short, whatever it is."""
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 10**30:
        return f"{'-' if v < 0 else ''}a {v.bit_length()}-bit integer"
    return _SHOW.repr(v)


def schema_errors(doc):
    """Every way ``doc`` departs from the schema (``jsonschema.ValidationError``s)."""
    return _VALIDATOR.iter_errors(doc)


def first_error(doc) -> str | None:
    """``"<path>: <what is wrong>"`` for the most telling departure from the schema, or None."""
    error = best_match(schema_errors(doc))
    if error is None:
        return None
    while error.context:   # an anyOf: the branch whose type fits the value says the most
        fits = [e for e in error.context if e.validator != "type"]
        if not fits:       # no branch takes a value of this type: name them all
            wanted = dict.fromkeys(t for e in error.context for t in _types(e.schema))
            where = _where(error)
            what = f"expected {' or '.join(_ARTICLE[t] for t in wanted)}, got {_kind(error.instance)}"
            return f"{where}: {what}" if where else what
        error = best_match(fits)
    where = _where(error)
    return f"{where}: {_message(error)}" if where else _message(error)

