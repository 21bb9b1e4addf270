"""The plain records a Plan carries: how long each pass took, the program after each pass, and
the placement facts the summary reads.

They sit below everything that makes or reads plans (the pipeline records passes, the
serializer writes and reads facts, the views print them), so none of those needs ``Plan``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .ir.listing import listing

# the keys of one saved-activation row (``Plan.saved_activations``), in the order they print
SAVED_ACTIVATION_KEYS = ("value", "bytes", "defined", "last_use", "decision")


@dataclass
class PassRecord:
    name: str
    seconds: float
    note: str = ""


class PassSnapshot:
    """The program as one pass left it (``Plan.history``), for step-by-step inspection.

    ``copy``: a function making that program's copy when ``graph`` is first read (a 7B
    training step's graphs take seconds to copy, and most plans' history is never read)."""

    def __init__(self, name: str, graph: fx.GraphModule | None = None, *, copy=None):
        if (graph is None) == (copy is None):
            raise ValueError("a snapshot takes a graph or a function copying one")
        self.name, self._graph, self._copy = name, graph, copy

    @property
    def graph(self) -> fx.GraphModule:
        if self._graph is None:
            self._graph, self._copy = self._copy(), None
        return self._graph

    def __repr__(self) -> str:
        return f"PassSnapshot({self.name!r})"

    def __str__(self) -> str:
        return listing(self.graph, [f"after pass {self.name}"])


@dataclass(frozen=True)
class PlacementFacts:
    """What the header and the summary read from the placement and the analysis: computed once
    when a plan is made, saved with it, and read back when it is loaded (a loaded plan is not
    re-solved and has neither).

    ``tier_bytes``: bytes of the model's tensors homed per tier (device, host, disk);
    ``offloaded_activation_bytes``: bytes of activations offloaded per tier (host, disk);
    ``saved_activations``: for a training step, one dict per activation the forward saves for
    the backward (keys ``SAVED_ACTIVATION_KEYS``; empty for inference)."""

    status: str
    mip_gap: float | None
    solve_s: float
    min_budget_bytes: int
    movable_gaps: int
    tier_bytes: dict
    offloaded_activation_bytes: dict
    notes: tuple = ()
    saved_activations: tuple = ()
    floor_bytes: int = 0       # the largest single op's working set (0: not known)
    floor_at: str = ""         # that op and its largest tensors
    binds_at: str = ""         # where the minimum budget binds and what is held there
