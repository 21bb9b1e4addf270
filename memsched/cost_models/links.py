"""Which link directions a move occupies: the shared vocabulary of planner and simulator."""
from __future__ import annotations

HOST, DISK = "host", "disk"


def fetch_links(tier: str, device_type: str) -> tuple[str, ...]:
    """Links a fetch from ``tier`` to the device occupies, in order (disk goes via host on a GPU)."""
    if tier == HOST:
        return ("h2d",)
    return ("disk_read", "h2d") if device_type == "cuda" else ("disk_read",)


def offload_links(tier: str, device_type: str) -> tuple[str, ...]:
    """Links an offload from the device to ``tier`` occupies, in order."""
    if tier == HOST:
        return ("d2h",)
    return ("d2h", "disk_write") if device_type == "cuda" else ("disk_write",)
