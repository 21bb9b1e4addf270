"""Training cases: the zoo's models in training mode, with a loss, plus dropout and
batch-norm variants. ``build_train(name)`` returns ``(model, args, kwargs, loss_fn)`` where
``loss_fn(output) -> scalar``; weights and inputs are seeded, so two builds are identical."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from zoo import build


def _train(model):
    model.train()
    model.requires_grad_(True)
    return model


def _hf_loss(out):
    return out.loss


def _mlp():
    model, args, kwargs = build("mlp")
    return _train(model), args, kwargs, lambda out: out.square().mean()


def _cnn_bn():
    """Batch norm in training mode: batch statistics, running stats updated in place."""
    model, args, kwargs = build("cnn")
    target = torch.arange(args[0].shape[0]) % 3
    return _train(model), args, kwargs, lambda out: F.cross_entropy(out, target.to(out.device))


def _with_labels(name, **config):
    model, args, kwargs = build(name)
    for key, value in config.items():
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = value
    kwargs = dict(kwargs, labels=kwargs["input_ids"])
    return _train(model), args, kwargs, _hf_loss


def _gpt2_dropout():
    return _with_labels("gpt2", dropout=0.1)


def _llama():
    return _with_labels("llama")


def _bert_dropout():
    model, args, kwargs = build("bert")
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.1
    kwargs = dict(kwargs, labels=torch.tensor([0, 2]))
    return _train(model), args, kwargs, _hf_loss


TRAIN_ZOO = {
    "mlp": _mlp,
    "cnn_bn": _cnn_bn,
    "gpt2_dropout": _gpt2_dropout,
    "llama": _llama,
    "bert_dropout": _bert_dropout,
}


def build_train(name: str):
    return TRAIN_ZOO[name]()
