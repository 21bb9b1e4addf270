"""memsched's kernel ops chosen by patterns in the captured graph (frontend/kernel_patterns.py):
RMSNorm and rotary-embedding chains, found on architectures by their ops, never by class name.

On this CPU the ops run their PyTorch fallback, which is the chain's own arithmetic op for op
and autograd's gradient of it in autograd's order (kernels/ops.py): outputs, losses and every
gradient equal eager's bit for bit. The Triton side runs under the interpreter in
tests/test_kernels.py."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import memsched
from helpers import FIXED_CPU
from memsched.frontend.kernel_patterns import kernel_counts, select_kernels
from memsched.kernels import ops as kernel_ops
from zoo import quiet_transformers

V = 100
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, use_cache=False)
# architecture: (model class, config class, config, what the capture finds in inference)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=2), "5 rms_norm, 4 rope"),
    # per-head q/k norms: 4 more norms
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(num_key_value_heads=2, head_dim=8), "9 rms_norm, 4 rope"),
    # x_hat * (1 + weight), cast after the weight
    "gemma": ("GemmaForCausalLM", "GemmaConfig", dict(num_key_value_heads=2, head_dim=8), "5 rms_norm, 4 rope"),
    # partial rotary (a slice of each head), LayerNorm (one ATen op: nothing to replace)
    "neox": ("GPTNeoXForCausalLM", "GPTNeoXConfig", dict(rotary_pct=0.5), "4 rope"),
    # T5's norm scales the uncast x by the cast one's statistics; no rotary
    "t5": ("T5ForConditionalGeneration", "T5Config",
           dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, decoder_start_token_id=0,
                pad_token_id=0, dropout_rate=0.0), "12 rms_norm"),
    # the interleaved rotary convention is another pattern; LayerNorm
    "roformer": ("RoFormerForMaskedLM", "RoFormerConfig",
                 dict(embedding_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), ""),
}


def _build(name: str):
    import transformers as T

    cls, config_cls, extra, found = ARCHITECTURES[name]
    base = {"vocab_size": V, "use_cache": False} if name == "t5" else dict(SMALL)
    if name == "roformer":
        base.pop("use_cache")
    torch.manual_seed(0)
    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(T, cls)(getattr(T, config_cls)(**base, **extra))
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}, found


def _compile(model, **options):
    return memsched.compile(model, "1GB", device="cpu", hardware=FIXED_CPU, **options)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_found_by_their_ops_and_inference_equals_the_unreplaced_program(name):
    model, kwargs, found = _build(name)
    model.eval()
    plain = _compile(model, kernels=False)(**kwargs).logits
    compiled = _compile(model, kernels=True)
    out = compiled(**kwargs).logits
    assert kernel_counts(compiled.plan.graph) == found
    assert (f"kernels: {found}" in compiled.plan.passes[0].note) == bool(found)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    with torch.no_grad():   # (T5's eager logits themselves differ in the last bits with grad mode on)
        torch.testing.assert_close(out, model(**kwargs).logits, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma", "neox", "t5"])
def test_a_training_step_with_the_kernel_ops_equals_eager_bit_for_bit(name):
    model, kwargs, found = _build(name)
    model.train()
    ref = copy.deepcopy(model)
    ref_loss = ref(**kwargs).loss
    ref_loss.backward()
    compiled = memsched.compile(model, "1GB", train=True, device="cpu", hardware=FIXED_CPU, kernels=True)
    loss = compiled(**kwargs).loss
    loss.backward()
    counts = kernel_counts(compiled.plan.graph)
    assert counts and all(f" {op}" in counts for op in ("rms_norm", "rope") if op in found)
    assert any(n.target is torch.ops.memsched.rms_norm_backward.default for n in compiled.plan.graph.graph.nodes) \
        == ("rms_norm" in found)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    grads = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[pname].grad, rtol=0, atol=0, msg=pname)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_norm_saves_x_and_its_rms_not_its_normalized_values(dtype):
    """The joint program saves less for the backward: the planner's unconstrained peak falls
    (in bfloat16 more: the op saves x at 16 bits, not the model's float32 upcast of it)."""
    model, kwargs, _ = _build("llama")
    model.to(dtype).train()
    peaks = {k: memsched.plan(model, (), "1GB", hardware=FIXED_CPU, train=True, example_kwargs=kwargs,
                              kernels=k).unconstrained.peak_device_bytes for k in (False, True)}
    assert peaks[True] < peaks[False] * (0.92 if dtype == torch.bfloat16 else 1)


@pytest.mark.parametrize("name", ["qwen3", "t5"])
def test_a_bfloat16_training_step_equals_eager_bit_for_bit(name):
    """16-bit models: the upcast moves into the op (LLaMA-like norms) or stays (T5's, which
    scales the uncast x), and the gradients are still eager's to the last bit."""
    model, kwargs, found = _build(name)
    model.to(torch.bfloat16).train()
    ref = copy.deepcopy(model)
    ref(**kwargs).loss.backward()
    compiled = memsched.compile(model, "1GB", train=True, device="cpu", hardware=FIXED_CPU, kernels=True)
    compiled(**kwargs).loss.backward()
    assert kernel_counts(compiled.plan.graph).startswith(found.split(",")[0])
    grads = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[pname].grad, rtol=0, atol=0, msg=pname)


def _graph_of(module, *args):
    return torch.export.export(module, args, strict=False).graph_module


class Norms(nn.Module):
    """RMSNorm three ways: as LLaMA writes it, with its 1/rms read outside the chain, and
    reduced over a dim that is not the last."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))

    def forward(self, x):
        plain = self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        shared = x * r
        across = x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-6)
        return plain, shared + r, across


def test_a_chain_whose_values_are_read_elsewhere_or_that_reduces_another_dim_stays():
    gm = _graph_of(Norms(), torch.randn(4, 8))
    assert select_kernels(gm) == {"rms_norm": 1}
    outs = gm(torch.ones(8), x := torch.randn(4, 8))
    ref = Norms()(x)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class LearnedRotary(nn.Module):
    """rotate_half with tables of its own: parameters, so a training step differentiates them."""

    def __init__(self):
        super().__init__()
        self.cos, self.sin = nn.Parameter(torch.randn(1, 1, 6, 8)), nn.Parameter(torch.randn(1, 1, 6, 8))

    def forward(self, q):
        return q * self.cos + torch.cat((-q[..., 4:], q[..., :4]), dim=-1) * self.sin


class RotaryAndResidual(nn.Module):
    """rotate_half on q, and q read again after it."""

    def forward(self, q, cos, sin):
        return q * cos + torch.cat((-q[..., 4:], q[..., :4]), dim=-1) * sin + q


def test_a_rotary_whose_input_is_read_elsewhere_stays():
    """(The op's gradient sums its two parts at once; autograd would add them to the other
    reader's one after the other, in other roundings.)"""
    q, cos, sin = torch.randn(2, 3, 6, 8), torch.randn(1, 1, 6, 8), torch.randn(1, 1, 6, 8)
    assert select_kernels(_graph_of(RotaryAndResidual(), q, cos, sin)) == {}


def test_rotary_tables_that_depend_on_a_parameter_stay_in_a_training_step():
    module, q = LearnedRotary(), torch.randn(2, 3, 6, 8)
    params = {"p_cos", "p_sin"}
    assert {n.name for n in _graph_of(module, q).graph.nodes if n.op == "placeholder"} >= params
    assert select_kernels(_graph_of(module, q), params) == {}
    assert select_kernels(_graph_of(module, q)) == {"rope": 1}   # inference: no gradient wanted
    ref = copy.deepcopy(module)
    ref(q).sum().backward()
    compiled = memsched.compile(module, "1GB", train=True, device="cpu", hardware=FIXED_CPU, kernels=True)
    compiled(q).sum().backward()
    assert kernel_counts(compiled.plan.graph) == ""
    torch.testing.assert_close(module.cos.grad, ref.cos.grad, rtol=0, atol=0)


def test_the_option_is_checked_and_auto_follows_where_the_kernels_run_triton():
    model, kwargs, _ = _build("llama")
    model.eval()
    with pytest.raises(ValueError, match="kernels must be True, False or 'auto'"):
        memsched.plan(model, (), "1GB", hardware=FIXED_CPU, example_kwargs=kwargs, kernels="yes")
    on_cpu = memsched.plan(model, (), "1GB", hardware=FIXED_CPU, example_kwargs=kwargs)
    assert kernel_counts(on_cpu.graph) == ""   # the fallback is the chain itself: nothing to gain
    pytest.importorskip("triton")
    for_cuda = memsched.plan(model, (), "8GB", hardware="h100", example_kwargs=kwargs)
    assert kernel_counts(for_cuda.graph) == "5 rms_norm, 4 rope"
    fused = memsched.plan(model, (), "8GB", hardware="h100", example_kwargs=kwargs, fuse=True)
    assert kernel_counts(fused.graph) == ""   # Inductor fuses the chains with their neighbours


def test_a_saved_plan_with_kernel_ops_loads_and_runs_again(tmp_path):
    model, kwargs, _ = _build("llama")
    model.eval()
    compiled = _compile(model, kernels=True)
    out = compiled(**kwargs).logits
    path = tmp_path / "plan.json"
    compiled.plan.save(path)
    assert "memsched::rms_norm.default" in path.read_text()
    again = memsched.compile(model, plan=path, device="cpu")
    torch.testing.assert_close(again(**kwargs).logits, out, rtol=0, atol=0)
    assert kernel_counts(again.plan.graph) == "5 rms_norm, 4 rope"


def test_a_module_run_on_slices_keeps_its_kernel_ops():
    """Below the minimum the planner splits modules by rows: the ops keep rows apart."""
    model, kwargs, _ = _build("llama")
    model.eval()
    ids = torch.randint(3, V, (4, 64), generator=torch.Generator().manual_seed(2))
    plain = memsched.plan(model, (ids,), "1GB", hardware=FIXED_CPU, kernels=True)
    floor = memsched.plan(model, (ids,), plain.min_budget_bytes, hardware=FIXED_CPU, kernels=True,
                          chunk_ops=False).min_budget_bytes
    compiled = memsched.compile(model, floor * 9 // 10, device="cpu", hardware=FIXED_CPU, kernels=True)
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert compiled.plan.chunking and kernel_counts(compiled.plan.graph) == "5 rms_norm, 4 rope"


def test_the_fallback_on_blocks_of_rows_gives_the_same_values(monkeypatch):
    """Past FALLBACK_BLOCK elements the fallback works on blocks of rows (its temporaries a
    block's): outputs and x's gradient are the composite's bit for bit; the weight's gradient,
    summed per block then over blocks, to float32 rounding."""
    monkeypatch.setattr(kernel_ops, "FALLBACK_BLOCK", 64)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 7, 16, generator=gen), torch.randn(16, generator=gen)
    g = torch.randn(5, 7, 16, generator=gen)

    def run(fn):
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fn(xx, ww)
        y.backward(g)
        return y, xx.grad, ww.grad

    composite = run(lambda x, w: w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))
    blocked = run(lambda x, w: torch.ops.memsched.rms_norm(x, x, w, 1e-6, None)[0])
    torch.testing.assert_close(blocked[0], composite[0], rtol=0, atol=0)
    torch.testing.assert_close(blocked[1], composite[1], rtol=0, atol=0)
    torch.testing.assert_close(blocked[2], composite[2], rtol=1e-6, atol=1e-6)


def test_generation_with_the_kernel_ops_gives_transformers_tokens():
    """Prefill and one-token decode steps (rotary over a sequence of 1) through the ops."""
    model, kwargs, _ = _build("llama")
    model.eval()
    ids = kwargs["input_ids"][:, :9]
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    out = memsched.generate(model, ids, budget="1GB", max_new_tokens=6, hardware=FIXED_CPU, kernels=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
