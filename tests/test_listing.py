"""Golden listing: the printed schedule of a small MLP at its minimum budget on a preset GPU.

The "passes:" header line holds wall times and is left out. Regenerate after an intended
change with MEMSCHED_UPDATE_GOLDEN=1, and read the diff.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

import memsched

GOLDEN = Path(__file__).parent / "golden" / "mlp_t4_min_budget.txt"


def _listing() -> str:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 128),
                                torch.nn.GELU(), torch.nn.Linear(128, 16)).eval()
    x = torch.randn(4, 64)
    minimum = memsched.plan(model, (x,), budget=10**9, hardware="t4").min_budget_bytes
    plan = memsched.plan(model, (x,), budget=minimum, hardware="t4")
    return "\n".join(line for line in str(plan).splitlines() if not line.startswith("# passes:")) + "\n"


def test_listing_matches_golden():
    text = _listing()
    if os.environ.get("MEMSCHED_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_listing_names_the_pass_of_every_inserted_node():
    for line in _listing().splitlines():
        if any(f"= {op}(" in line or line.strip().startswith(f"{op}(") for op in ("prefetch", "wait", "free", "offload")):
            assert "[placement]" in line, line
