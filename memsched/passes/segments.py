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
    return segments_from_bounds(bounds)


def segments_from_bounds(bounds) -> Segments:
    """The segments starting at ``bounds`` (ascending, from 0, ending with n_steps)."""
    bounds = tuple(int(b) for b in bounds)
    n = bounds[-1]
    of_step = np.zeros(n + 1, dtype=np.int64)
    for j in range(len(bounds) - 1):
        of_step[bounds[j]:bounds[j + 1]] = j
    of_step[n] = len(bounds) - 2
    return Segments(bounds, of_step)


def split_binding(segments: Segments, const: np.ndarray, limit: int) -> Segments | None:
    """``segments`` with every segment of several steps whose fixed bytes are the highest cut
    into single steps: a segment holds each tensor for all of its steps, so where the minimum
    binds it is counted per op. None when nothing is left to split or the count would pass
    ``limit``."""
    top = const.max() if len(const) else 0.0
    cuts = set(segments.bounds)
    for j in np.flatnonzero(const >= top - 0.5):
        lo, hi = segments.bounds[j], segments.bounds[j + 1]
        cuts.update(range(lo + 1, hi))
    if cuts == set(segments.bounds) or len(cuts) - 1 > limit:
        return None
    return segments_from_bounds(sorted(cuts))
