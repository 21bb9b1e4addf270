"""A loss over what a boolean mask picks (``loss(x[mask], y[mask])``) is traced on the whole
tensors (frontend/masked_losses.py): a training step equals eager's to the last bits (the same
values summed, and scaled by the mean, in another order), inside the budget."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memsched

B, S, D, C = 3, 6, 4, 5


class Masked(torch.nn.Module):
    def __init__(self, loss, out: int = C):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(20, D), torch.nn.Linear(D, out)
        self.loss = loss

    def forward(self, ids, target, mask):
        return self.loss(self.head(self.emb(ids)), target, mask)


def _tokens():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 20, (B, S), generator=g)
    mask = torch.rand(B, S, generator=g) > 0.4
    mask[0, 0] = True
    return g, ids, mask


def _classes(labels_outside: int):
    """Class labels where the mask is; ``labels_outside`` elsewhere (out of range: never read)."""
    g, ids, mask = _tokens()
    labels = torch.randint(0, C, (B, S), generator=g)
    labels[1, :2] = -100   # ignored inside the mask too
    mask[1, :2] = True
    return ids, labels.masked_fill(~mask, labels_outside), mask


def _values(missing=float("nan"), width: int = C):
    """Regression targets, ``missing`` (NaN: no label) where the mask is false."""
    g, ids, mask = _tokens()
    return ids, torch.randn(B, S, width, generator=g).masked_fill(~mask[..., None], missing), mask


CASES = {
    "cross_entropy": (lambda y, t, m: F.cross_entropy(y[m], t[m]), lambda: _classes(-1)),
    "cross_entropy_module_sum": (lambda y, t, m: torch.nn.CrossEntropyLoss(reduction="sum")(y[m], t[m]),
                                 lambda: _classes(C + 3)),
    "cross_entropy_weighted": (lambda y, t, m: F.cross_entropy(y[m], t[m], weight=torch.arange(1.0, C + 1)),
                               lambda: _classes(-1)),
    "cross_entropy_probabilities": (lambda y, t, m: F.cross_entropy(y[m], t.softmax(-1)[m]), lambda: _values(0.0)),
    "nll_loss": (lambda y, t, m: F.nll_loss(y.log_softmax(-1)[m], t[m]), lambda: _classes(-1)),
    "mse_missing_targets": (lambda y, t, m: F.mse_loss(y[m], t[m]), _values),
    "l1_sum": (lambda y, t, m: F.l1_loss(y[m], t[m], reduction="sum"), _values),
    "huber": (lambda y, t, m: F.huber_loss(y[m], t[m], delta=0.5), _values),
    "smooth_l1": (lambda y, t, m: F.smooth_l1_loss(y[m], t[m], beta=0.3), _values),
    "bce_with_logits": (lambda y, t, m: F.binary_cross_entropy_with_logits(y[m], t[m], pos_weight=torch.full((C,), 2.0)),
                        lambda: _values(5.0)),
    "bce": (lambda y, t, m: F.binary_cross_entropy(y.sigmoid()[m], t[m]), lambda: _values(7.0)),
    # ELECTRA's discriminator: labels picked, then cast
    "bce_with_logits_cast_labels": (lambda y, t, m: F.binary_cross_entropy_with_logits(y[..., 0][m],
                                                                                       (t[..., 0] > 0.5)[m].float()),
                                    lambda: _values(5.0)),
    "masked_select_l1": (lambda y, t, m: _l1_of_selected(y, t, m[..., None].expand_as(y)), _values),
    "flattened_mask_written_twice": (lambda y, t, m: F.cross_entropy(y.view(-1, C)[m.view(-1)], t.view(-1)[m.view(-1)]),
                                     lambda: _classes(-1)),
    "positions_from_where": (lambda y, t, m: _ce_at(y, t, torch.where(m)), lambda: _classes(-1)),
    "positions_from_nonzero": (lambda y, t, m: _ce_at(y, t, m.nonzero(as_tuple=True)), lambda: _classes(-1)),
    # pointwise ops between the selection and the loss; NaN targets outside the mask reach nothing
    "pointwise_after_selection": (lambda y, t, m: ((torch.sigmoid(y[m]) - t[m]) ** 2).mean()
                                  + F.mse_loss(y[m] * 0.5 + 1.0, t[m].tanh()) + (y[m] - t[m]).abs().sum() / 7,
                                  _values),
    # per-sample losses, weighted by a selection of weights: a weighted mean over the mask
    "weighted_per_sample": (lambda y, t, m: (F.cross_entropy(y[m], t[m], reduction="none") * _w(t)[m]).sum()
                            / _w(t)[m].sum(), lambda: _classes(-1)),
    # the mask written out at each selection, flattened: two masks made alike
    "mask_written_at_each_selection": (lambda y, t, m: F.cross_entropy(y.view(-1, C)[(t != -1).view(-1)],
                                                                       t.view(-1)[(t != -1).view(-1)]),
                                       lambda: _classes(-1)),
    # an MAE's normalised pixel loss (Hiera's): each picked row normalised by its own statistics
    "rows_normalised_by_their_statistics": (lambda y, t, m: _normalised_pixel_loss(y, t, m), _values),
    "mean_of_a_selection": (lambda y, t, m: (y - t).square()[m].mean() + y[m].sum() * 1e-3, lambda: _values(0.0)),
}


def _normalised_pixel_loss(y, t, m):
    label = t[m]
    mean, var = label.mean(dim=-1, keepdim=True), label.var(dim=-1, keepdim=True)
    label = (label - mean) / (var + 1.0e-6) ** 0.5
    return ((y[m] - label) ** 2).mean() + torch.log(var + 1).sum() * 1e-3


def _w(t):
    return (t.clamp_min(0) + 1).float()


def _ce_at(y, t, positions):
    """The positions a mask holds, taken once and indexing both."""
    return F.cross_entropy(y[positions], t[positions])


def _l1_of_selected(y, t, mask):
    """SpeechT5's way: one mask of the outputs' shape, both flattened by masked_select."""
    return F.l1_loss(y.masked_select(mask), t.masked_select(mask))


def _binary(case):
    ids, t, mask = CASES[case][1]()
    return (ids, t.sigmoid() if case.startswith("bce") else t, mask)


@pytest.mark.parametrize("frac", (1.0, "min"), ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_a_loss_over_a_masked_selection_trains_as_eager(case, frac):
    torch.manual_seed(0)
    model = Masked(CASES[case][0])
    ref = copy.deepcopy(model)
    args = _binary(case)
    want = ref(*args)
    want.backward()
    assert torch.isfinite(want)
    plan = memsched.plan(model, args, "1GB", train=True)
    budget = plan.min_budget_bytes if frac == "min" else plan.program.peak_bytes
    cm = memsched.compile(model, budget, device="cpu", train=True)
    try:
        loss = cm(*args)
        loss.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-6, atol=0)
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=2e-6, atol=1e-9, msg=name)
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()


def test_a_masked_selection_of_three_dimensions_keeps_its_trailing_one():
    """The mask over [batch, seq] of a [batch, seq, features] output: elements, not rows, are
    what the mean divides by."""
    model = Masked(lambda y, t, m: F.mse_loss(y[m], t[m]))
    ref = copy.deepcopy(model)
    args = _values(width=C)
    cm = memsched.compile(model, "1GB", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(cm(*args), ref(*args), rtol=1e-6, atol=0)
    cm.close()


def test_per_element_losses_of_a_selection_kept_as_they_are_are_refused_with_a_way_out():
    """``reduction='none'`` returns the mask's count of losses: a size made from data, unless
    pointwise ops and a sum or mean of them follow (a running sum along them does not), or the
    mask is made from the inputs alone (traced at its count: tests/test_counted_selections.py)."""
    def running(y, t, m):
        m = y.argmax(-1) != t   # made from an activation
        return F.cross_entropy(y[m], t[m], reduction="none").cumsum(0).mean()

    model = Masked(running)
    with pytest.raises(memsched.UnsupportedModelError, match=r"aten.index.Tensor.*ignore_index"):
        memsched.plan(model, _classes(-1), "1GB", train=True)


def test_electras_discriminator_loss_over_real_tokens_trains_as_eager():
    """transformers' ELECTRA picks its logits and labels where the attention mask is 1, casts the
    labels, and takes BCEWithLogitsLoss: a pretraining step of a padded batch, at its minimum."""
    from transformers import ElectraConfig, ElectraForPreTraining

    from memsched.cli.targets import quiet_transformers

    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 90, (2, 12), generator=g), torch.randint(0, 2, (2, 12), generator=g)
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 8:] = 0
    kwargs = {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}
    torch.manual_seed(0)
    with quiet_transformers():
        model = ElectraForPreTraining(ElectraConfig(vocab_size=90, embedding_size=16, hidden_size=32,
                                                    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ref = copy.deepcopy(model)
    want = ref(**kwargs).loss
    want.backward()
    floor = memsched.plan(model, (), "1GB", example_kwargs=kwargs, train=True).min_budget_bytes
    cm = memsched.compile(model, floor, device="cpu", train=True)
    try:
        loss = cm(**kwargs).loss
        loss.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-6, atol=0)
        scale = max(float(p.grad.abs().max()) for p in ref.parameters())
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6 * scale, msg=name)
        assert cm.stats.peak_device_bytes <= floor
    finally:
        cm.close()


def test_a_mask_made_again_after_its_input_was_written_is_another_mask():
    """``u > 0`` before and after ``u.add_(1)`` are two masks: the loss over the two selections
    would pair different elements, so it is not taken on the wholes (a plain remake of a mask
    is). Made from the inputs, each selection is traced at its own count, and the loss fails on
    the two counts as eager's does."""
    def two_masks(y, t, m):
        u = t.clone()
        before = u > 0
        u.add_(1)
        return F.cross_entropy(y[before], u[u > 0])

    args = _classes(-1)
    with pytest.raises(ValueError, match="batch_size"):
        Masked(two_masks)(*args)
    with pytest.raises(memsched.CaptureError, match="batch_size"):
        memsched.plan(Masked(two_masks), args, "1GB", train=True)
