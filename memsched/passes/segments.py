"""Segments: the program cut into K consecutive chunks of steps, the planner's unit of time.

Placement decides residency per segment, not per step (lesson 1 of DESIGN.md: never an
all-nodes-by-all-steps model). A transfer issued at the start of segment j overlaps the
compute of segment j; prefetches are issued one segment ahead of their use. Cuts balance
compute time and the bytes of weights first read, so weight streaming gets even windows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segments:
    bounds: tuple[int, ...]     # step where each segment starts, plus n_steps at the end
    of_step: np.ndarray         # segment index of every step (and of the end step n_steps)

    @property
    def count(self) -> int:
        return len(self.bounds) - 1

    def steps(self, j: int) -> range:
        return range(self.bounds[j], self.bounds[j + 1])

    def seg(self, step: int) -> int:
        """Segment of a step; START (-1) maps to 0 and the program end to the last segment."""
        return int(self.of_step[min(max(step, 0), len(self.of_step) - 1)])


def make_segments(step_time: np.ndarray, step_weight_bytes: np.ndarray, max_segments: int) -> Segments:
    """Cut ``n`` steps into at most ``max_segments`` chunks of about equal combined cost."""
    n = len(step_time)
    if n == 0:
        return Segments((0, 0), np.zeros(1, dtype=np.int64))
    cost = np.zeros(n)
    if step_time.sum() > 0:
        cost += step_time / step_time.sum()
    if step_weight_bytes.sum() > 0:
        cost += step_weight_bytes / step_weight_bytes.sum()
    cost += 1e-3 / n  # every step counts a little, so cheap stretches still get cut
    k = max(1, min(max_segments, n))
    targets = np.cumsum(cost)
    targets = targets / targets[-1] * k
    bounds = [0]
    for j in range(1, k):
        cut = int(np.searchsorted(targets, j, side="left")) + 1
        if bounds[-1] < cut < n:
            bounds.append(cut)
    bounds.append(n)
    of_step = np.zeros(n + 1, dtype=np.int64)
    for j in range(len(bounds) - 1):
        of_step[bounds[j]:bounds[j + 1]] = j
    of_step[n] = len(bounds) - 2
    return Segments(tuple(bounds), of_step)
