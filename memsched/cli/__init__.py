"""The ``memsched`` command line (``main``), its tables (``render``) and how it turns a target
spec into a model (``targets``)."""
from .commands import main

__all__ = ["main"]
