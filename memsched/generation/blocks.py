"""The block size: how many sequences decode together.

Every decode step streams each weight the plan does not keep once, whatever the number of
rows it serves, so weight traffic per generated token falls as the block grows, while the KV
cache and activations grow with it and compete for the budget. Candidate blocks (the batch,
its half, quarter, ... that divide it) are planned, each priced by its two plans' predicted
times, and the best for the goal kept:

  throughput  most generated tokens per second over the whole batch;
  latency     least time from a block's start until its sequences are done.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InfeasibleBudgetError

GOALS = ("throughput", "latency")
MAX_CANDIDATES = 6


@dataclass
class BlockChoice:
    """A candidate block, as its plans predict it (``None`` times: it does not fit)."""

    rows: int
    prefill_s: float | None = None   # the block's prompt, every micro-batch of it
    step_s: float | None = None      # one decode step of the block
    why_not: str = ""

    def block_s(self, new_tokens: int) -> float:
        return self.prefill_s + max(new_tokens - 1, 0) * self.step_s

    def tokens_per_s(self, new_tokens: int) -> float:
        return self.rows * new_tokens / self.block_s(new_tokens)

    def describe(self, new_tokens: int) -> str:
        if self.prefill_s is None:
            return f"block {self.rows}: does not fit ({self.why_not})"
        return (f"block {self.rows}: prompt {self.prefill_s * 1e3:.1f} ms, step {self.step_s * 1e3:.2f} ms, "
                f"{self.tokens_per_s(new_tokens):.1f} tokens/s predicted")


def candidates(batch: int) -> list[int]:
    """The batch, then its halves while they divide it (at most MAX_CANDIDATES), and 1."""
    rows, out = batch, []
    while rows >= 1 and len(out) < MAX_CANDIDATES - 1:
        out.append(rows)
        if rows % 2:
            break
        rows //= 2
    return sorted(set(out) | {1}, reverse=True)


def _score(choice: BlockChoice, goal: str, new_tokens: int) -> float:
    """Higher is better: tokens/s for throughput, minus the block's time for latency."""
    if goal == "throughput":
        return choice.tokens_per_s(new_tokens)
    return -choice.block_s(new_tokens)


def choose_block(make, batch: int, new_tokens: int, goal: str):
    """Plan candidate blocks with ``make(rows)`` (a Generator) and keep the best for ``goal``;
    scanning stops at the first candidate worse than the best so far. Returns the chosen
    generator and every candidate tried."""
    if goal not in GOALS:
        raise ValueError(f"goal must be one of {GOALS}, got {goal!r}")
    order = candidates(batch)
    if goal == "latency":
        order = order[::-1]
    tried, best, best_gen, failed = [], None, None, {}
    for rows in order:
        try:
            gen = make(rows)
        except InfeasibleBudgetError as exc:
            tried.append(BlockChoice(rows, why_not=f"needs {exc.min_budget_bytes} bytes"))
            failed[rows] = exc
            continue
        prefill, decode = gen.plans
        choice = BlockChoice(rows, prefill.predicted_time_s * (rows // gen.prefill_batch), decode.predicted_time_s)
        tried.append(choice)
        if best is None or _score(choice, goal, new_tokens) > _score(best, goal, new_tokens):
            if best_gen is not None:
                best_gen.close()
            best, best_gen = choice, gen
        else:
            gen.close()
            break
    if best_gen is None:  # not even the smallest block fits: its error names the minimum
        raise failed[min(failed)]
    return best_gen, tried
