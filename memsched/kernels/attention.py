"""Attention that saves no probabilities for its backward: ``memsched::scaled_dot_product_attention``.

A training step traced on the CPU for a GPU cannot keep ATen's composite attention (its backward
is lowered while tracing: the math path, whose [batch, heads, q, k] probabilities every layer
saves) nor name a GPU kernel the CPU cannot run. This operator runs PyTorch's own
``scaled_dot_product_attention`` wherever it is, with the kernel eager's SDPA picks there (flash or
memory-efficient on a GPU), and saves only its inputs: its backward,
``memsched::scaled_dot_product_attention_backward``, runs the forward again under autograd and
differentiates it, as FlashAttention's backward recomputes its blocks. Outputs equal eager's;
the cost is one more attention forward per backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("memsched::scaled_dot_product_attention", mutates_args=())
def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool,
                                 scale: float | None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` without a mask or dropout (keys and values with the
    queries' heads)."""
    return F.scaled_dot_product_attention(query, key, value, is_causal=is_causal, scale=scale)


@scaled_dot_product_attention.register_fake
def _(query, key, value, is_causal, scale):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@torch.library.custom_op("memsched::scaled_dot_product_attention_backward", mutates_args=())
def scaled_dot_product_attention_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                          value: torch.Tensor, is_causal: bool,
                                          scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of query, key and value: the forward run again and differentiated (on
    copies of inputs made under inference mode, which autograd cannot record)."""
    with torch.inference_mode(False), torch.enable_grad():
        q, k, v = ((t.clone() if t.is_inference() else t).detach().requires_grad_(True) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
        return torch.autograd.grad(out, (q, k, v), grad_out)


@scaled_dot_product_attention_backward.register_fake
def _(grad_out, query, key, value, is_causal, scale):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


def _setup_context(ctx, inputs, output):
    query, key, value, is_causal, scale = inputs
    ctx.save_for_backward(query, key, value)
    ctx.is_causal, ctx.scale = is_causal, scale


def _backward(ctx, grad):
    query, key, value = ctx.saved_tensors
    grads = torch.ops.memsched.scaled_dot_product_attention_backward(grad, query, key, value, ctx.is_causal, ctx.scale)
    return (*grads, None, None)


scaled_dot_product_attention.register_autograd(_backward, setup_context=_setup_context)
