"""Gradient sums in place (frontend/inplace.py): an add whose input dies at it writes the sum
into that input, only where nothing else can see the write; a training step stays equal to
eager and a tied LM head's minimum falls by one [vocab, hidden] buffer."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T
from torch.fx.experimental.proxy_tensor import make_fx

import memsched
from memsched.frontend.fake import share_storages_as_eager
from memsched.frontend.inplace import accumulate_in_place
from memsched.frontend.joint import capture_joint
from helpers import FIXED_CPU, LossOnly, assert_step_close_to_eager

aten = torch.ops.aten


def _traced(fn, *args):
    gm = make_fx(fn, tracing_mode="fake")(*args)
    share_storages_as_eager(gm.graph)
    return gm


def _adds(gm):
    return [n.target for n in gm.graph.nodes if n.target in (aten.add.Tensor, aten.add_.Tensor)]


@pytest.mark.parametrize("fn, in_place", [
    (lambda x, w: (x * 2) + w, True),                      # x * 2 dies at the add: the sum goes there
    (lambda x, w: w + (x * 2), True),                      # the second input takes it (alpha 1)
    (lambda x, w: torch.add(w, x * 2, alpha=3), False),    # alpha: only the first may, and w is an input
    (lambda x, w: ((x * 2) + w, (x * 2).sum()), True),     # two separate products: each dies once
    (lambda x, w: (lambda a: (a + w, a.view(-1)))(x * 2), False),   # a view shares the storage
    (lambda x, w: (lambda a: (a + w, a * 3))(x * 2), False),        # read after the add
    (lambda x, w: (x[:2] * 1) + w[:2], True),
    (lambda x, w: (x * 2).t() + w.t(), False),             # a view of the product: it shares the storage
], ids=["first", "second", "alpha", "twice", "view", "read-later", "slice", "transposed"])
def test_only_a_value_nothing_else_sees_takes_the_sum(fn, in_place):
    x, w = torch.randn(4, 4), torch.randn(4, 4)
    gm = _traced(fn, x, w)
    want = fn(x, w)
    n = accumulate_in_place(gm, next(iter(gm.graph.nodes)))   # all of it (a placeholder first)
    assert (n > 0) == in_place and (aten.add_.Tensor in _adds(gm)) == in_place
    got = gm(x, w)
    for g, e in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert torch.equal(g, e)


def test_the_views_of_a_sum_made_in_place_view_the_storage_that_takes_it():
    """The sum's views (and their views) were left on the out-of-place sum's storage, which no
    op makes any more: the planner counted it apart from the storage that takes the sum."""
    from memsched.ir.tensors import storage_key

    fn = lambda x, w: (lambda s: (s.view(-1) * 2, s.t()[1:]))((x * 2) + w)  # noqa: E731
    gm = _traced(fn, torch.randn(4, 4), torch.randn(4, 4))
    assert accumulate_in_place(gm, next(iter(gm.graph.nodes))) == 1
    add = next(n for n in gm.graph.nodes if n.target is aten.add_.Tensor)
    home = storage_key(add.meta["val"])
    assert home == storage_key(add.args[0].meta["val"])
    views = [n for n in gm.graph.nodes if n.target in (aten.view.default, aten.t.default, aten.slice.Tensor)]
    assert len(views) == 3 and all(storage_key(v.meta["val"]) == home for v in views)


def _minimum(model, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            memsched.plan(model, args, 1, train=True, hardware=FIXED_CPU)
        except memsched.InfeasibleBudgetError as e:
            return e.min_budget_bytes
    raise AssertionError("a 1-byte budget planned")


def test_a_tied_head_sums_its_gradients_in_place_and_trains_as_eager(monkeypatch):
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=2048, n_positions=64, use_cache=False,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = LossOnly(T.GPT2LMHeadModel(cfg)).train()
    ids = torch.randint(0, 2048, (2, 32))
    tied = 2048 * 64 * 4
    joint = capture_joint(model, (ids, ids))
    targets = [n.target for n in joint.gm.graph.nodes]
    split = [n.name for n in joint.gm.graph.nodes].index(joint.boundary)
    # the forward keeps its adds (its values stay recomputable); the backward sums in place
    assert aten.add_.Tensor not in targets[:split] and aten.add_.Tensor in targets[split:]
    with_sums = _minimum(model, (ids, ids))
    with monkeypatch.context() as m:   # the capture without the rewrite
        m.setattr("memsched.frontend.joint.accumulate_in_place", lambda gm, after: 0)
        without = _minimum(model, (ids, ids))
    assert without - with_sums >= tied * 0.9, (without, with_sums)
    assert_step_close_to_eager(model, (ids, ids), with_sums)
