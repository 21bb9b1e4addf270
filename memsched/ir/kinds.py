"""The words of the IR: where a tensor lives (Tier), what it holds (Kind), and the link
directions a move occupies (Link). Enums whose members are their own string values, so they
compare equal to the words saved plans and listings use ("host", "weight", "h2d")."""
from __future__ import annotations

from enum import Enum


class Word(str, Enum):
    """A string-valued enum that prints, formats and reprs as its plain value, so programs
    that carry one as an argument print and lower to valid Python ("disk")."""

    __str__ = str.__str__
    __repr__ = str.__repr__
    __format__ = str.__format__


class Tier(Word):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"
    UNUSED = "unused"   # a model tensor the program never reads: it stays with the model


OFF_DEVICE = (Tier.HOST, Tier.DISK)   # tiers a tensor can be offloaded to or homed on


class Kind(Word):
    """What a value holds. The model's own tensors are WEIGHT, BUFFER and CONSTANT."""

    WEIGHT = "weight"
    BUFFER = "buffer"           # a model buffer (nn.Module.register_buffer), not a storage
    CONSTANT = "constant"
    KV_CACHE = "kv_cache"       # a decoder's key/value cache: model state that generation updates
    INPUT = "input"
    ACTIVATION = "activation"
    TANGENT = "tangent"         # the gradient of a forward output, given at the boundary
    GRAD = "grad"               # the gradient of a trained parameter


# owned by the model and alive across calls: read-only inputs with a home tier (a KV cache is
# written between calls, never inside one)
PERSISTENT = frozenset({Kind.WEIGHT, Kind.BUFFER, Kind.CONSTANT, Kind.KV_CACHE})


class Link(Word):
    H2D = "h2d"
    D2H = "d2h"
    DISK_READ = "disk_read"
    DISK_WRITE = "disk_write"


LINKS = tuple(Link)


def fetch_links(tier: str, device_type: str) -> tuple[Link, ...]:
    """Links a fetch from ``tier`` to the device occupies, in order (disk goes via host on a GPU)."""
    if tier == Tier.HOST:
        return (Link.H2D,)
    return (Link.DISK_READ, Link.H2D) if device_type == "cuda" else (Link.DISK_READ,)


def offload_links(tier: str, device_type: str) -> tuple[Link, ...]:
    """Links an offload from the device to ``tier`` occupies, in order."""
    if tier == Tier.HOST:
        return (Link.D2H,)
    return (Link.D2H, Link.DISK_WRITE) if device_type == "cuda" else (Link.DISK_WRITE,)
