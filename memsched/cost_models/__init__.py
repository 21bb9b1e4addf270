"""Cost models: hardware profiles and per-op / per-transfer time estimates."""

from .hardware import LINKS, PRESETS, Hardware, get_hardware, list_hardware, local_hardware
from .op_cost import estimate_op_time, is_metadata_only, op_flops_bytes, transfer_time

__all__ = [
    "Hardware",
    "LINKS",
    "PRESETS",
    "get_hardware",
    "local_hardware",
    "list_hardware",
    "op_flops_bytes",
    "estimate_op_time",
    "transfer_time",
    "is_metadata_only",
]
