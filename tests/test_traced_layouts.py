"""Every value a scheduled program makes has, when it runs, the strides it was traced with.

The plan and the program's views are decided on FakeTensors (memsched/frontend/fake.py): a
value whose traced layout differs from the run's can make a later ``view`` fail, or hand an op
another layout than it was traced with. Here the generated program checks each value it makes
against its node's traced strides (size-1 dimensions aside), for inference and a training step
of the zoo and of models whose normalisations see permuted layouts (batch norm over a
transposed sequence, a transposed layer norm output, a transposed output's gradient)."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn

import memsched
import memsched.runtime.executor as executor
from helpers import FIXED_CPU
from zoo import build, names


class NormsOverPermutedLayouts(nn.Module):
    """Batch norm over the channels of a transposed sequence, and a layer norm whose output is
    transposed before the convolution reading it (Wav2Vec2-Conformer's, GLPN's pattern)."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.proj, self.bn, self.ln = nn.Linear(d, d), nn.BatchNorm1d(d), nn.LayerNorm(d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)

    def forward(self, x):
        h = self.bn(self.proj(x).transpose(1, 2)).transpose(1, 2)
        h = self.conv(self.ln(h.reshape(-1, h.shape[-1]).view_as(h)).transpose(1, 2))
        return h.transpose(1, 2)


def _permuted():
    torch.manual_seed(0)
    return NormsOverPermutedLayouts(), (torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1)),), {}


CASES = {**{name: (lambda name=name: build(name)) for name in names()}, "norms_over_permuted": _permuted}


@pytest.fixture
def checked(monkeypatch):
    """The values every program generated from here on made, and those whose strides were not
    their traced ones."""
    seen, wrong = [], []
    generate = executor.generate_source

    def generate_checked(gm, device, room_for=None):
        src, glb = generate(gm, device, room_for=room_for)
        nodes = {f"v_{n.name}": n for n in gm.graph.nodes}

        def check(name, value):
            traced = nodes[name].meta.get("val")
            if not isinstance(value, torch.Tensor) or not isinstance(traced, torch.Tensor):
                return
            seen.append(name)
            if not all(a == b or n == 1 for a, b, n in zip(traced.stride(), value.stride(), value.shape)):
                wrong.append(f"{nodes[name].format_node()}: traced {tuple(traced.stride())}, ran {value.stride()}")
        glb["_check_layout"] = check
        src = re.sub(r"\b(_track|rt\.track)\((v_\w+)\)", r'_check_layout("\2", \2); \1(\2)', src)
        return src, glb
    monkeypatch.setattr(executor, "generate_source", generate_checked)
    return seen, wrong


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "loss", None) is not None:
        return out.loss
    values = out.values() if hasattr(out, "values") else out
    return next(v for v in values if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("name", list(CASES))
def test_every_value_runs_in_its_traced_layout(name, train, checked):
    seen, wrong = checked
    model, args, kwargs = CASES[name]()
    model.train(train).requires_grad_(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, "1GB", device="cpu", train=train, hardware=FIXED_CPU)
    try:
        with torch.enable_grad() if train else torch.no_grad():
            out = _first_tensor(cm(*args, **kwargs))
            if train:   # a gradient laid out otherwise than the output (a transposed one's is row-major)
                (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2))).sum().backward()
    finally:
        cm.close()
    assert len(seen) >= 5, "the program's values were not checked"
    assert not wrong, "\n".join(wrong[:10])
