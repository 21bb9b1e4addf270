"""Architectures the rest of the suite does not name (encoder-decoders, speech, vision
encoders, masked LMs), each a tiny transformers config with random weights: inference and a
training step at the model's minimum budget equal eager PyTorch bit for bit (outputs, and the
loss and every gradient), and the measured device peak stays within that budget."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import memsched
from helpers import FIXED_CPU
from zoo import quiet_transformers

V = 100


def _text(cls_name: str, config_name: str, labels: str = "ids", **cfg):
    def build():
        import transformers as T

        model = getattr(T, cls_name)(getattr(T, config_name)(**cfg))
        ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
        y = {"ids": ids, "class": torch.tensor([0, 1]), "tokens": torch.randint(0, 2, (2, 12))}[labels]
        return model, {"input_ids": ids, "labels": y}
    return build


def _input(cls_name: str, config_name: str, key: str, shape: tuple, labels=None, **cfg):
    def build():
        import transformers as T

        model = getattr(T, cls_name)(getattr(T, config_name)(**cfg))
        kw = {key: torch.randn(*shape, generator=torch.Generator().manual_seed(1))}
        if labels is not None:
            kw["labels"] = labels
        return model, kw
    return build


NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CASES = {
    "bart": _text("BartForConditionalGeneration", "BartConfig", vocab_size=V, d_model=32, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                  decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, use_cache=False),
    "albert": _text("AlbertForMaskedLM", "AlbertConfig", vocab_size=V, embedding_size=16, hidden_size=32,
                    num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, **NO_DROPOUT),
    "distilbert": _text("DistilBertForSequenceClassification", "DistilBertConfig", labels="class", vocab_size=V,
                        dim=32, n_layers=2, n_heads=4, hidden_dim=64, dropout=0.0, attention_dropout=0.0),
    "electra": _text("ElectraForPreTraining", "ElectraConfig", labels="tokens", vocab_size=V, embedding_size=16,
                     hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     **NO_DROPOUT),
    "mpnet": _text("MPNetForMaskedLM", "MPNetConfig", vocab_size=V, hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=64, **NO_DROPOUT),
    "roformer": _text("RoFormerForMaskedLM", "RoFormerConfig", vocab_size=V, embedding_size=32, hidden_size=32,
                      num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, **NO_DROPOUT),
    # asserts on its input's data (`lengths.max().item() <= slen`): export keeps them, as an `item`
    # a training step's trace on FakeTensors could not run
    "xlm": _text("XLMWithLMHeadModel", "XLMConfig", vocab_size=V, emb_dim=32, n_layers=2, n_heads=4, dropout=0.0,
                 attention_dropout=0.0, max_position_embeddings=64),
    "whisper": _input("WhisperForConditionalGeneration", "WhisperConfig", "input_features", (2, 16, 40),
                      labels=torch.randint(3, V, (2, 8), generator=torch.Generator().manual_seed(2)),
                      vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16,
                      max_source_positions=20, max_target_positions=32, dropout=0.0, use_cache=False,
                      pad_token_id=0, decoder_start_token_id=1),
    "wav2vec2": _input("Wav2Vec2ForCTC", "Wav2Vec2Config", "input_values", (2, 800), vocab_size=V, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, conv_dim=(16, 16),
                       conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                       num_conv_pos_embedding_groups=4, hidden_dropout=0.0, attention_dropout=0.0,
                       activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0,
                       do_stable_layer_norm=True),
    "segformer": _input("SegformerForSemanticSegmentation", "SegformerConfig", "pixel_values", (2, 3, 32, 32),
                        labels=torch.randint(0, 3, (2, 32, 32), generator=torch.Generator().manual_seed(2)),
                        num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                        num_attention_heads=[1, 2], decoder_hidden_size=32, num_labels=3, drop_path_rate=0.0,
                        classifier_dropout_prob=0.0, patch_sizes=[7, 3], strides=[4, 2], mlp_ratios=[2, 2],
                        **NO_DROPOUT),
    "clip_vision": _input("CLIPVisionModel", "CLIPVisionConfig", "pixel_values", (2, 3, 32, 32), hidden_size=32,
                          intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                          patch_size=8),
}


def _first_tensor(out) -> torch.Tensor:
    """The loss where the model computes one, else its first output tensor."""
    if getattr(out, "loss", None) is not None:
        return out.loss
    return next(v for v in out.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_step_at_the_minimum_budget_equals_eager(name, train):
    torch.manual_seed(0)
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, kw = CASES[name]()
        model.train(train)
        ref = copy.deepcopy(model)
        budget = memsched.plan(copy.deepcopy(model), (), budget=10**12, example_kwargs=kw, train=train,
                               hardware=FIXED_CPU).min_budget_bytes
        cm = memsched.compile(model, budget, device="cpu", train=train, hardware=FIXED_CPU)
    try:
        with torch.enable_grad() if train else torch.no_grad():
            torch.manual_seed(1)   # the same draws for dropout layers the configs leave on
            got = _first_tensor(cm(**kw))
            torch.manual_seed(1)
            want = _first_tensor(ref(**kw))
            assert torch.equal(got, want), float((got - want).abs().max())
            if train:
                got.float().sum().backward()
                want.float().sum().backward()
                for (pname, p), q in zip(model.named_parameters(), ref.parameters()):
                    assert (p.grad is None) == (q.grad is None), pname
                    assert p.grad is None or torch.equal(p.grad, q.grad), pname
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()
