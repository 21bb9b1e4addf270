"""A zoo of small, deterministic models for parametrized tests.

Every case builds ``(model, args, kwargs)`` with the model in eval mode, fp32,
random (seeded) weights and real CPU inputs.  Hugging Face models are built from
configs only (no hub access).  ``build_meta`` constructs the same module on the
meta device (inputs moved to meta too by default), which is what memsched plans.

Usage::

    from zoo import ZOO, build, build_meta
    model, args, kwargs = build("gpt2")
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from memsched.cli.targets import quiet_transformers

__all__ = ["ZooCase", "ZOO", "build", "build_meta", "names", "param_bytes"]


@dataclass(frozen=True)
class ZooCase:
    name: str
    # () -> (model in eval mode, args, kwargs)
    build: Callable[[], tuple[nn.Module, tuple, dict]]
    recomputes: bool = False  # reserved; False for all cases now


# --------------------------------------------------------------------------
# helpers


def _inputs_generator() -> torch.Generator:
    # Inputs come from their own generator so that they are the same on a
    # meta build (where weight init consumes no / different global RNG).
    g = torch.Generator(device="cpu")
    g.manual_seed(1234)
    return g


def _randint(high: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=_inputs_generator(), device="cpu")


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_inputs_generator(), device="cpu")


def _finish(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------
# plain torch models


class MLP(nn.Module):
    def __init__(self, dims=(128, 256, 256, 256, 256, 256, 256, 64)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


def _build_mlp():
    model = _finish(MLP())
    return model, (_randn(8, 128),), {}


class _ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(x + y)


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.block1 = _ResBlock(32)
        self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False)
        self.bn_down = nn.BatchNorm2d(64)
        self.block2 = _ResBlock(64)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.bn0(self.stem(x))))  # 16x16
        x = self.block1(x)
        x = F.relu(self.bn_down(self.down(x)))  # 8x8
        x = self.block2(x)
        x = torch.flatten(self.avg(x), 1)
        return self.head(x)


def _randomize_bn_stats(model: nn.Module) -> None:
    # Non-trivial running stats so BatchNorm is not an identity in eval mode.
    g = torch.Generator(device="cpu")
    g.manual_seed(7)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and m.running_mean.device.type != "meta":
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)


def _build_cnn():
    model = SmallCNN()
    _randomize_bn_stats(model)
    model = _finish(model)
    return model, (_randn(2, 3, 32, 32),), {}


# --------------------------------------------------------------------------
# transformers models (built from configs, random weights)

_ATTN = "sdpa"


_quiet = quiet_transformers  # transformers' advice-level warnings off while building


def _hf(model_cls, config):
    with _quiet():
        config._attn_implementation = _ATTN
        model = model_cls(config)
    return _finish(model)


def _build_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = 1000
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=64,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
        pad_token_id=0,
        use_cache=False,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=_ATTN,
    )
    model = _hf(GPT2LMHeadModel, cfg)
    return model, (), {"input_ids": _randint(vocab, (2, 16))}


def _build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = 1000
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        use_cache=False,
        tie_word_embeddings=False,
        attn_implementation=_ATTN,
    )
    model = _hf(LlamaForCausalLM, cfg)
    return model, (), {"input_ids": _randint(vocab, (2, 16))}


def _build_bert():
    from transformers import BertConfig, BertForSequenceClassification

    vocab = 1000
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        num_labels=3,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=_ATTN,
    )
    model = _hf(BertForSequenceClassification, cfg)
    input_ids = _randint(vocab, (2, 16))
    attention_mask = torch.ones(2, 16, dtype=torch.long, device="cpu")
    attention_mask[1, 12:] = 0  # some padding in the second row
    return model, (), {"input_ids": input_ids, "attention_mask": attention_mask}


def _build_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=3,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=_ATTN,
    )
    model = _hf(ViTForImageClassification, cfg)
    return model, (), {"pixel_values": _randn(2, 3, 32, 32)}


def _build_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    vocab = 1000
    cfg = T5Config(
        vocab_size=vocab,
        d_model=64,
        d_kv=16,
        d_ff=256,
        num_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        relative_attention_num_buckets=32,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        use_cache=False,
        attn_implementation=_ATTN,
    )
    model = _hf(T5ForConditionalGeneration, cfg)
    return model, (), {
        "input_ids": _randint(vocab, (2, 16)),
        "decoder_input_ids": _randint(vocab, (2, 8)),
    }


# --------------------------------------------------------------------------
# registry

ZOO: dict[str, ZooCase] = {
    c.name: c
    for c in [
        ZooCase("mlp", _build_mlp),
        ZooCase("cnn", _build_cnn),
        ZooCase("gpt2", _build_gpt2),
        ZooCase("llama", _build_llama),
        ZooCase("bert", _build_bert),
        ZooCase("vit", _build_vit),
        ZooCase("t5", _build_t5),
    ]
}


def tiny_mixtral(layers: int = 2) -> nn.Module:
    """A seeded Mixtral (4 experts, 2 per token) in eval mode: transformers runs its experts by
    its own custom operator (``transformers::grouped_mm_fallback``) on a CPU."""
    from transformers import MixtralConfig, MixtralForCausalLM

    with quiet_transformers():
        torch.manual_seed(0)
        return MixtralForCausalLM(MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=layers, num_attention_heads=4,
                                                num_key_value_heads=2, num_local_experts=4,
                                                num_experts_per_tok=2)).eval()


def param_bytes(model: nn.Module) -> int:
    """Bytes of parameters (shared parameters counted once)."""
    seen = {}
    for p in model.parameters():
        seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


def names() -> list[str]:
    return list(ZOO)


@contextlib.contextmanager
def _attn_impl(attn_implementation: str | None):
    global _ATTN
    prev = _ATTN
    if attn_implementation is not None:
        _ATTN = attn_implementation
    try:
        yield
    finally:
        _ATTN = prev


def build(name: str, *, attn_implementation: str | None = None) -> tuple[nn.Module, tuple, dict]:
    """Build case ``name`` with seeded weights; repeated builds are identical.

    ``attn_implementation`` ("sdpa" by default, or "eager") only affects the
    transformers cases.
    """
    case = ZOO[name]
    torch.manual_seed(0)
    with _attn_impl(attn_implementation):
        return case.build()


def _to_meta(x):
    return x.to("meta") if isinstance(x, torch.Tensor) else x


def build_meta(
    name: str, *, meta_inputs: bool = True, attn_implementation: str | None = None
) -> tuple[nn.Module, tuple, dict]:
    """Build case ``name`` with all parameters and buffers on the meta device.

    Same config (and same input shapes/dtypes) as :func:`build`.  With
    ``meta_inputs=True`` (default) the example inputs are moved to meta too,
    which exports for every case.  With ``meta_inputs=False`` they stay real
    CPU tensors; that only exports for cases whose inputs are integer ids
    (gpt2, llama, bert, t5) -- float inputs (mlp, cnn, vit) then meet meta
    weights in the first op and export fails with a device mismatch.

    Note: with "sdpa" attention the exported meta graph may contain extra
    ``aten.contiguous`` nodes that the CPU-exported graph lacks (the meta
    kernel of SDPA returns a different output layout than the CPU kernel).
    With ``attn_implementation="eager"`` both graphs are identical.
    """
    case = ZOO[name]
    torch.manual_seed(0)
    with _attn_impl(attn_implementation), torch.device("meta"):
        model, args, kwargs = case.build()
    if meta_inputs:
        args = tuple(_to_meta(a) for a in args)
        kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
    return model, args, kwargs
