"""Hypothesis strategies for random DAG models (for memsched property tests).

``random_dags()`` draws a ``DagCase``: an ``nn.Module`` whose forward interprets a drawn
list of ops over a few ``nn.Parameter`` matrices, the example inputs, and a description of
the program for failure reports.  Everything is deterministic given the draw: the spec is
drawn by hypothesis and weights/inputs come from ``torch.manual_seed(seed)`` with a drawn
``seed``.

Values are 2-d float32 tensors whose dims come from a small set of widths, so that the DAG
can mix:

* ``matmul`` of a value with a weight (weights are reused at several points, so a planner
  streaming weights sees refetch gaps),
* ``mm`` of two earlier values (``a @ b``, or ``a @ b.T`` through a transpose view),
* ``add``/``sub``/``mul`` of two earlier values of the same shape, often a far earlier one
  (long skip connections, so offloading activations matters),
* ``bias`` add of a 1-d parameter (broadcast),
* ``relu``/``tanh``/``gelu``/``sigmoid``, ``softmax``, ``layer_norm`` without params,
  ``center`` (``x - x.mean(-1, keepdim=True)``), scalar ``scale``,
* ``cat_slice``: ``cat`` of two values then a column slice (a view of a fresh storage),
* ``rows``: a row slice (a view with a storage offset), ``t``: a transpose view,
* ``wval``: a weight (or its transpose view) used as a plain value.

The forward returns a tuple of 1-3 drawn values (the last one always among them; rarely an
input or a weight itself -- ``bare_weight_outputs=False`` leaves out the latter).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

WIDTHS = (8, 16, 24, 32, 48, 64, 96)

UNARY = ("relu", "tanh", "gelu", "sigmoid", "softmax", "layer_norm", "center", "scale")
BINARY = ("add", "sub", "mul")


@dataclass
class DagSpec:
    seed: int
    inputs: list                      # shapes of the 1-2 inputs
    weights: list                     # shapes of the parameters (2-d matrices or 1-d biases)
    ops: list                         # (kind, *args); args are value / weight indices or ints
    outputs: list                     # value indices returned (as a tuple)
    shapes: list = field(default_factory=list)  # shape of every value (inputs first)

    def describe(self) -> str:
        lines = [f"seed={self.seed}"]
        for i, s in enumerate(self.inputs):
            lines.append(f"v{i} = input{tuple(s)}")
        for i, s in enumerate(self.weights):
            lines.append(f"w{i} = param{tuple(s)}")
        k = len(self.inputs)
        for j, op in enumerate(self.ops):
            args = ", ".join(str(a) for a in op[1:])
            lines.append(f"v{k + j} = {op[0]}({args})  # {tuple(self.shapes[k + j])}")
        lines.append("return " + ", ".join(f"v{i}" for i in self.outputs))
        return "\n".join(lines)


class RandomDag(nn.Module):
    """A module that interprets a ``DagSpec``; weights are seeded from ``spec.seed``."""

    def __init__(self, spec: DagSpec):
        super().__init__()
        self.spec = spec
        torch.manual_seed(spec.seed)
        ws = []
        for shape in spec.weights:
            fan_in = shape[0]
            ws.append(nn.Parameter(torch.randn(*shape) / math.sqrt(fan_in), requires_grad=False))
        self.w = nn.ParameterList(ws)
        self.eval()

    def forward(self, *inputs):
        vals = list(inputs)
        w = self.w
        for op in self.spec.ops:
            kind = op[0]
            if kind == "matmul":
                vals.append(vals[op[1]] @ w[op[2]])
            elif kind == "mm":
                vals.append(vals[op[1]] @ vals[op[2]])
            elif kind == "mm_t":
                vals.append(vals[op[1]] @ vals[op[2]].t())
            elif kind == "add":
                vals.append(vals[op[1]] + vals[op[2]])
            elif kind == "sub":
                vals.append(vals[op[1]] - vals[op[2]])
            elif kind == "mul":
                vals.append(vals[op[1]] * vals[op[2]])
            elif kind == "bias":
                vals.append(vals[op[1]] + w[op[2]])
            elif kind == "relu":
                vals.append(torch.relu(vals[op[1]]))
            elif kind == "tanh":
                vals.append(torch.tanh(vals[op[1]]))
            elif kind == "gelu":
                vals.append(F.gelu(vals[op[1]]))
            elif kind == "sigmoid":
                vals.append(torch.sigmoid(vals[op[1]]))
            elif kind == "softmax":
                vals.append(torch.softmax(vals[op[1]], dim=-1))
            elif kind == "layer_norm":
                x = vals[op[1]]
                vals.append(F.layer_norm(x, (x.shape[-1],)))
            elif kind == "center":
                x = vals[op[1]]
                vals.append(x - x.mean(-1, keepdim=True))
            elif kind == "scale":
                vals.append(vals[op[1]] * 0.5)
            elif kind == "cat_slice":
                _, a, b, lo, width = op
                vals.append(torch.cat([vals[a], vals[b]], dim=1)[:, lo:lo + width])
            elif kind == "rows":
                _, a, lo, n = op
                vals.append(vals[a][lo:lo + n])
            elif kind == "t":
                vals.append(vals[op[1]].t())
            elif kind == "wval":
                vals.append(w[op[1]].t() if op[2] else w[op[1]])
            else:  # pragma: no cover - a strategy bug
                raise AssertionError(f"unknown op {kind}")
        return tuple(vals[i] for i in self.spec.outputs)


@dataclass
class DagCase:
    spec: DagSpec
    model: RandomDag
    args: tuple

    def __repr__(self) -> str:
        return f"DagCase(\n{self.spec.describe()}\n)"


def make_case(spec: DagSpec) -> DagCase:
    model = RandomDag(spec)
    g = torch.Generator().manual_seed(spec.seed + 1)
    args = tuple(torch.randn(*s, generator=g) for s in spec.inputs)
    return DagCase(spec, model, args)


@st.composite
def dag_specs(draw, min_ops: int = 3, max_ops: int = 24, bare_weight_outputs: bool = True) -> DagSpec:
    """``bare_weight_outputs=False`` never returns a weight itself (a ``wval`` without
    transpose) as an output."""
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    widths = draw(st.lists(st.sampled_from(WIDTHS), min_size=1, max_size=3, unique=True), label="widths")
    rows = draw(st.sampled_from(WIDTHS), label="rows")
    dims = sorted(set(widths) | {rows})
    n_inputs = draw(st.integers(1, 2), label="n_inputs")
    inputs = [(rows, draw(st.sampled_from(widths))) for _ in range(n_inputs)]
    shapes: list = list(inputs)
    weights: list = []
    ops: list = []

    def pick_value(pred=lambda s: True, far: bool = False):
        """Index of an earlier value satisfying pred; recent ones are likelier unless far."""
        cands = [i for i, s in enumerate(shapes) if pred(s)]
        if not cands:
            return None
        if far or len(cands) == 1 or draw(st.booleans()):
            return draw(st.sampled_from(cands))
        return cands[-1 - draw(st.integers(0, min(2, len(cands) - 1)))]

    def weight_for(shape_pred, make_shape):
        """Reuse a fitting weight (usually) or add a new one."""
        cands = [i for i, s in enumerate(weights) if shape_pred(s)]
        if cands and draw(st.integers(0, 3)) > 0:
            return draw(st.sampled_from(cands))
        weights.append(make_shape())
        return len(weights) - 1

    n_ops = draw(st.integers(min_ops, max_ops), label="n_ops")
    for _ in range(n_ops):
        kind = draw(st.sampled_from(
            ("matmul", "matmul", "matmul", "unary", "unary", "binary", "binary", "bias", "mm",
             "cat_slice", "rows", "t", "wval")), label="kind")
        last = len(shapes) - 1
        if kind == "matmul":
            a = pick_value()
            k = shapes[a][1]
            wi = weight_for(lambda s: len(s) == 2 and s[0] == k,
                            lambda: (k, draw(st.sampled_from(dims))))
            ops.append(("matmul", a, wi))
            shapes.append((shapes[a][0], weights[wi][1]))
        elif kind == "unary":
            a = pick_value()
            ops.append((draw(st.sampled_from(UNARY)), a))
            shapes.append(shapes[a])
        elif kind == "binary":
            a = last if draw(st.booleans()) else pick_value()
            b = pick_value(lambda s: s == shapes[a], far=True)
            ops.append((draw(st.sampled_from(BINARY)), a, b))
            shapes.append(shapes[a])
        elif kind == "bias":
            a = pick_value()
            n = shapes[a][1]
            wi = weight_for(lambda s: len(s) == 1 and s[0] == n, lambda: (n,))
            ops.append(("bias", a, wi))
            shapes.append(shapes[a])
        elif kind == "mm":
            a = pick_value()
            m, k = shapes[a]
            b = pick_value(lambda s: s[0] == k)
            if b is not None and draw(st.booleans()):
                ops.append(("mm", a, b))
                shapes.append((m, shapes[b][1]))
            else:
                b = pick_value(lambda s: s[1] == k)  # always exists: a itself
                ops.append(("mm_t", a, b))
                shapes.append((m, shapes[b][0]))
        elif kind == "cat_slice":
            a = pick_value()
            b = pick_value(lambda s: s[0] == shapes[a][0], far=True)
            total = shapes[a][1] + shapes[b][1]
            fits = [w for w in dims if w <= total]
            width = draw(st.sampled_from(fits))
            lo = draw(st.integers(0, total - width))
            ops.append(("cat_slice", a, b, lo, width))
            shapes.append((shapes[a][0], width))
        elif kind == "rows":
            a = pick_value()
            r = shapes[a][0]
            fits = [w for w in dims if w <= r]
            n = draw(st.sampled_from(fits))
            lo = draw(st.integers(0, r - n))
            ops.append(("rows", a, lo, n))
            shapes.append((n, shapes[a][1]))
        elif kind == "wval":
            mats = [i for i, s in enumerate(weights) if len(s) == 2]
            if not mats:
                weights.append((draw(st.sampled_from(dims)), draw(st.sampled_from(dims))))
                mats = [len(weights) - 1]
            wi = draw(st.sampled_from(mats))
            transpose = draw(st.booleans())
            ops.append(("wval", wi, transpose))
            shapes.append(tuple(reversed(weights[wi])) if transpose else weights[wi])
        else:  # "t"
            a = pick_value()
            ops.append(("t", a))
            shapes.append((shapes[a][1], shapes[a][0]))

    k = len(inputs)
    n_values = len(shapes)

    def allowed(i):
        return bare_weight_outputs or i < k or ops[i - k][0] != "wval" or ops[i - k][2]

    last = max(i for i in range(n_values) if allowed(i))
    lo = 0 if draw(st.integers(0, 9)) == 0 else k  # rarely, an input may be returned as is
    extra = draw(st.lists(st.integers(lo, n_values - 1), max_size=2, unique=True), label="outputs")
    outputs = [last] + [i for i in extra if i != last and allowed(i)]
    return DagSpec(seed, inputs, weights, ops, outputs, shapes)


def random_dags(min_ops: int = 3, max_ops: int = 24, bare_weight_outputs: bool = True):
    """Strategy of ``DagCase`` (model, example args, spec)."""
    return dag_specs(min_ops, max_ops, bare_weight_outputs).map(make_case)
