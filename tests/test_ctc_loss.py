"""CTC's loss is traced with sizes its inputs' shapes give (frontend/ctc_targets.py): each way a
model hands ``ctc_loss`` its targets trains as eager, bit for bit, at memsched's minimum budget."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memsched
from helpers import assert_same_grads

CLASSES, STEPS, BATCH = 7, 12, 3


class CTCHead(torch.nn.Module):
    def __init__(self, targets_from):
        super().__init__()
        self.proj = torch.nn.Linear(5, CLASSES)
        self.targets_from = targets_from

    def forward(self, x, labels, lengths):
        log_probs = self.proj(x).log_softmax(-1).transpose(0, 1)
        return self.targets_from(log_probs, labels, lengths)


def _padded(log_probs, labels, lengths):
    return F.ctc_loss(log_probs, labels.clamp_min(1), lengths, (labels > 0).sum(-1))


def _selected(log_probs, labels, lengths):
    """transformers' way: the kept labels of each row (not all at its front), one row infeasible
    (more labels than its input steps), zeroed by zero_infinity."""
    mask = labels > 0
    return F.ctc_loss(log_probs, labels.masked_select(mask), lengths - 3, mask.sum(-1), reduction="sum",
                      zero_infinity=True)


def _int_lengths(log_probs, labels, lengths):
    return F.ctc_loss(log_probs, labels.flatten()[:6].clamp_min(1), [STEPS, 9, 10], [1, 0, 5], reduction="none").sum()


def _aten_call(log_probs, labels, lengths):
    """The ATen function, the count taken of the mask as integers and cast again."""
    mask = labels > 0
    return torch.ctc_loss(log_probs, labels.masked_select(mask), lengths, mask.long().sum(dim=1).int(), 0, 1, False)


CASES = {"padded": _padded, "masked_select": _selected, "int_lengths": _int_lengths, "torch.ctc_loss": _aten_call}


def _inputs():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([[2, 0, 3, 3, 0], [0, 4, 5, 6, 1], [6, 6, 6, 6, 6]])   # 0: padding
    return torch.randn(BATCH, STEPS, 5, generator=g), labels, torch.tensor([STEPS, 9, 10])


@pytest.mark.parametrize("case", list(CASES))
def test_a_ctc_loss_trains_as_eager_at_the_minimum(case):
    torch.manual_seed(0)
    model = CTCHead(CASES[case])
    ref = copy.deepcopy(model)
    args = _inputs()
    want = ref(*args)
    want.backward()
    floor = memsched.plan(model, args, "1GB", train=True).min_budget_bytes
    cm = memsched.compile(model, floor, device="cpu", train=True)
    try:
        loss = cm(*args)
        loss.backward()
        torch.testing.assert_close(loss.detach(), want.detach(), rtol=0, atol=0)
        assert_same_grads(ref, model)
        assert cm.stats.peak_device_bytes <= floor
        assert any(n.target is torch.ops.memsched.ctc_loss.default for n in cm.plan.history[0].graph.graph.nodes)
    finally:
        cm.close()


def test_the_infeasible_row_is_what_zero_infinity_zeroes():
    """The masked_select case really has an infinite row: without zero_infinity the loss is inf."""
    log_probs = CTCHead(_selected).proj(_inputs()[0]).log_softmax(-1).transpose(0, 1)
    labels, lengths = _inputs()[1:]
    mask = labels > 0
    per_row = F.ctc_loss(log_probs, labels.masked_select(mask), lengths - 3, mask.sum(-1), reduction="none")
    assert torch.isinf(per_row).tolist() == [False, False, True]


def test_targets_in_one_row_from_elsewhere_are_refused_by_name():
    """One row of targets the model did not make from a mask, lengths as tensors: its size is
    data, and the error says so."""
    def given(log_probs, labels, lengths):
        return F.ctc_loss(log_probs, labels.flatten(), lengths, torch.tensor([2, 2, 1]))

    with pytest.raises(memsched.CaptureError, match=r"_ctc_loss.*size made from its inputs' values"):
        memsched.plan(CTCHead(given), _inputs(), budget="1GB")


def test_wav2vec2_fine_tuning_with_specaugment_masks_passed_in():
    """Wav2Vec2's SpecAugment draws its time masks with NumPy, which a trace would freeze (refused,
    the error naming the way out): drawn per step and passed as ``mask_time_indices``, one
    compiled CTC step takes a new mask at every call and equals eager's each time."""
    import numpy as np
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

    from memsched.cli.targets import quiet_transformers

    cfg = Wav2Vec2Config(vocab_size=12, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
                         num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, layerdrop=0.0,
                         mask_time_prob=0.3, mask_time_length=2)
    torch.manual_seed(0)
    with quiet_transformers():
        model = Wav2Vec2ForCTC(cfg).train()
    ref = copy.deepcopy(model)
    values = torch.randn(2, 800, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[3, 4, 5, -100, -100], [6, 1, 7, 8, -100]])
    with pytest.raises(memsched.UnsupportedModelError, match="draws from NumPy.*mask_time_indices="):
        memsched.plan(model, (values,), "1GB", example_kwargs={"labels": labels}, train=True)
    frames = int(model._get_feat_extract_output_lengths(800))
    cm = memsched.compile(model, "1GB", device="cpu", train=True)
    try:
        for seed in range(2):
            np.random.seed(seed)
            masks = torch.from_numpy(_compute_mask_indices((2, frames), 0.3, 2, min_masks=2))
            torch.manual_seed(seed)   # dropout draws as eager's
            got = cm(values, labels=labels, mask_time_indices=masks).loss
            torch.manual_seed(seed)
            want = ref(values, labels=labels, mask_time_indices=masks).loss
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            got.backward()
            want.backward()
            assert_same_grads(ref, model)
            assert masks.any()
    finally:
        cm.close()
