"""A model called under ``torch.autocast``: the casts autocast makes are ops of the program,
counted by the plan, and a call under another autocast (or none) is planned again."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import memsched
from memsched.ir.meta import info
from test_real_memory import _allocator_peak, _run_at_the_minimum

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                                     torch.nn.Linear(1024, 256)) for _ in range(3)]).eval()


def _llama():
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=300, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=256)
    return T.LlamaForCausalLM(config)


def test_casts_under_autocast_are_values_the_plan_counts():
    """Under a bfloat16 autocast each linear reads bfloat16 copies of its weight and bias (and
    the first, of its input): they are ``_to_copy`` nodes of the program, and at memsched's minimum the allocator
    stays within it (before: the copies were made inside each call, 2.4x the budget); outputs
    are eager's under the same autocast, bit for bit."""
    model, x = _mlp(), torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    with torch.autocast(**BF16):
        with torch.no_grad():
            want = model(x)
        cm, floor, out, peak = _run_at_the_minimum(model, {"input": x})
    casts = [n for n in cm.plan.graph.graph.nodes if n.target is torch.ops.aten._to_copy.default]
    assert len(casts) == 1 + 2 * 6   # the input, then each linear's weight and bias
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert peak <= floor, (peak, floor)
    cm.close()


def test_a_call_under_another_autocast_is_planned_again():
    """The autocast a call runs under is part of its signature: outside, inside and outside
    again are two plans, each with eager's dtype and values."""
    model, x = _mlp(), torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    cm = memsched.compile(model, "50%", device="cpu")
    with torch.no_grad():
        plain = cm(x)
        with torch.autocast(**BF16):
            cast, want_cast = cm(x), model(x)
        again = cm(x)
        want = model(x)
    assert cm.plans_made == 2
    assert (plain.dtype, cast.dtype, again.dtype) == (torch.float32, torch.bfloat16, torch.float32)
    torch.testing.assert_close(cast, want_cast, rtol=0, atol=0)
    torch.testing.assert_close(plain, want, rtol=0, atol=0)
    torch.testing.assert_close(again, want, rtol=0, atol=0)
    cm.close()


def test_a_programs_casts_run_with_the_callers_autocast_off():
    """A program planned under autocast runs its own casts: under a float16 autocast at call
    time the bfloat16 plan is not run (another plan is made), and nothing is cast twice."""
    model, x = _mlp(), torch.randn(8, 256, generator=torch.Generator().manual_seed(1))
    cm = memsched.compile(model, "50%", device="cpu")
    with torch.no_grad():
        with torch.autocast(**BF16):
            cm(x)
        with torch.autocast("cpu", dtype=torch.float16):
            half, want = cm(x), model(x)
    assert cm.plans_made == 2 and half.dtype == torch.float16
    torch.testing.assert_close(half, want, rtol=0, atol=0)
    cm.close()


def _vision(name):
    import transformers as T

    torch.manual_seed(0)
    if name == "convnext":   # depthwise convolutions of a bfloat16 input with float32 weights
        config = T.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=3)
        return T.ConvNextForImageClassification(config).eval()
    config = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                          window_size=4, num_labels=3)
    return T.SwinForImageClassification(config).eval()


@pytest.mark.parametrize("name", ["convnext", "swin"])
def test_vision_models_under_autocast_at_their_minimum(name):
    """At memsched's minimum under a bfloat16 autocast, logits equal eager's bit for bit and the
    allocator stays within the minimum. ConvNeXt: a convolution that cannot run on its
    arguments without autocast's casts still has them written out (before: the program failed,
    bias float against input bfloat16). Swin: a small op's measured scratch (a bfloat16
    linear's float32 accumulator) is kept free of recycled fetch buffers (before: 1.04x)."""
    model = _vision(name)
    kwargs = {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}
    with torch.autocast(**BF16):
        with torch.no_grad():
            want = model(**kwargs).logits
        cm, floor, out, peak = _run_at_the_minimum(model, kwargs)
    torch.testing.assert_close(out.logits, want, rtol=0, atol=0)
    assert peak <= floor, (peak, floor)
    cm.close()


def test_an_ops_own_cast_is_not_written_twice():
    """``x.float()`` under autocast is the op's own cast, not autocast's: one node, not two."""
    class Upcast(torch.nn.Module):
        def forward(self, x):
            return x.float() * 2

    x = torch.randn(4, 8).to(torch.bfloat16)
    with torch.autocast(**BF16):
        plan = memsched.plan(Upcast(), (x,), "1GB")
    targets = [n.target for n in plan.graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten._to_copy.default not in targets, targets


def test_a_pointwise_op_of_two_dtypes_holds_its_converted_operand():
    """A CPU pointwise op of a bfloat16 and a float32 tensor first converts the bfloat16 one
    to float32 in a buffer of its own: measured and held while it runs, so at memsched's
    minimum the allocator stays within it."""
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.randn(64, 256).to(torch.bfloat16))

        def forward(self, x):
            return (self.scale * x).sum(-1)

    model = Mixed().eval()
    x = torch.randn(16, 64, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    cm, floor, out, peak = _run_at_the_minimum(model, {"x": x})
    mul = [n for n in cm.plan.graph.graph.nodes if n.target is torch.ops.aten.mul.Tensor]
    assert mul and info(mul[0]).scratch >= 64 * 256 * 4
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert peak <= floor, (peak, floor)
    cm.close()


def _grads_held(model) -> int:
    return sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_a_llama_under_autocast_at_its_minimum(train):
    """A LLaMA under a bfloat16 autocast (its rotary embedding with autocast turned off inside)
    at memsched's minimum: loss, logits and gradients equal eager's under the same autocast,
    and the allocator stays within the minimum (gradients aside)."""
    model = _llama().train(train)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_ids=ids, labels=ids)
    with torch.autocast(**BF16), torch.set_grad_enabled(train):
        want = ref(**kwargs)
        floor = memsched.plan(model, (), "1GB", train=train, example_kwargs=kwargs).min_budget_bytes
        cm = memsched.compile(model, floor, device="cpu", train=train)
        out = cm(**kwargs)
        if train:
            want.loss.backward()
            out.loss.backward()
            grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad(set_to_none=True)
        peak = _allocator_peak(lambda: cm(**kwargs).loss.backward() if train else cm(**kwargs))
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    if train:
        for g, q in zip(grads, ref.parameters()):
            torch.testing.assert_close(g, q.grad, rtol=0, atol=0)
    assert peak - (_grads_held(model) if train else 0) <= floor, (peak, floor)
    cm.close()


def test_a_fused_training_steps_minimum_under_autocast_is_one_it_plans_at():
    """The minimum a fused training step reports at a large budget is a budget it plans at.
    At that budget the step is captured again with its loss reading the logits in slices
    (pipeline.loss_head_pass): that capture runs under the caller's autocast too (before: with
    it off, a float32 program whose minimum was higher than the one reported). A region's result
    taken out by a getitem holds nothing while the getitem runs: the op it was made by ran inside
    the region, whose bytes count what it held (before: the getitem kept the op's measured
    scratch, a mixed-dtype ``mul``'s 32 KiB, and a schedule putting it at the peak was over)."""
    import operator

    from memsched.ir.meta import info
    from memsched.ir.ops import Op, op_of

    model = _llama().train()
    ids = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(1))
    kwargs = dict(input_ids=ids, labels=ids)
    with torch.autocast(**BF16):
        floor = memsched.plan(model, (), "1GB", train=True, fuse=True, example_kwargs=kwargs).min_budget_bytes
        plan = memsched.plan(model, (), floor, train=True, fuse=True, example_kwargs=kwargs)
    assert plan.peak_device_bytes <= floor
    taken = [n for n in plan.graph.graph.nodes if n.target is operator.getitem and op_of(n.args[0]) is Op.REGION]
    assert taken and [n.name for n in taken if info(n).scratch] == []


def test_an_op_that_cannot_be_replayed_under_autocast_is_refused_by_name(monkeypatch):
    """Where an op cannot run again on its traced values under autocast, its casts cannot be
    written out: the capture is refused, naming the op, instead of a program whose casts are
    memory no plan counts."""
    from memsched.frontend import autocast

    def fails(node, values, leaves, fake_mode, casting):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(autocast, "_recorded_casts", fails)
    model, x = _mlp(), torch.randn(8, 256)
    with torch.autocast(**BF16), pytest.raises(memsched.UnsupportedModelError, match=r"aten\.linear.*autocast"):
        memsched.plan(model, (x,), "1GB")


class _AutocastInside(torch.nn.Module):
    """An MLP whose forward opens a bfloat16 autocast, and inside it turns autocast off around a
    layer norm (as Nemotron's norms do under an autocast)."""

    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(256, 1024), torch.nn.Linear(1024, 256)
        self.norm = torch.nn.LayerNorm(256)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = self.down(torch.nn.functional.gelu(self.up(x)))
            with torch.autocast("cpu", enabled=False):
                return self.norm(h.float())


def test_an_autocast_opened_inside_the_forward_is_inlined_with_its_casts():
    """torch.export keeps an autocast the model opens as one op around a subgraph, whose casts
    and temporaries no plan counted: it is inlined, its casts written out under its own autocast,
    and at memsched's minimum the allocator stays within it; outputs equal eager's."""
    torch.manual_seed(0)
    model = _AutocastInside().eval()
    x = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
    cm, floor, out, peak = _run_at_the_minimum(model, {"x": x})
    targets = {n.target for n in cm.plan.graph.graph.nodes if n.op == "call_function"}
    assert not any("autocast" in str(t) for t in targets), targets
    assert torch.ops.aten._to_copy.default in targets
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert peak <= floor, (peak, floor)
    cm.close()


class _EinsumOfExpanded(torch.nn.Module):
    """XLNet's relative-position projection: an einsum (whose bmm autocast casts inside it) of an
    expanded operand behind an eval-mode dropout."""

    def __init__(self):
        super().__init__()
        self.r = torch.nn.Parameter(torch.randn(32, 4, 8))
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, x):
        return torch.einsum("ibh,hnd->ibnd", self.drop(x[:, None, :].expand(-1, 2, -1)), self.r)


def test_an_op_whose_casts_are_inside_it_is_written_out_as_its_ops():
    """``einsum`` is no op autocast lists, but the ``bmm`` it makes is: the casts are of values
    the einsum makes, so it is replaced by its ops traced under autocast, casts included
    (before: it ran with autocast off and failed on float against bfloat16), traced on the
    layouts the run gives its operands (the dropout is its input in eval mode)."""
    torch.manual_seed(0)
    model = _EinsumOfExpanded().eval()
    x = torch.randn(24, 32, generator=torch.Generator().manual_seed(1))
    with torch.autocast(**BF16):
        with torch.no_grad():
            want = model(x)
        cm, floor, out, peak = _run_at_the_minimum(model, {"x": x})
    targets = {n.target for n in cm.plan.graph.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.einsum.default not in targets and torch.ops.aten.bmm.default in targets
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert peak <= floor, (peak, floor)
    cm.close()


class _Norms(torch.nn.Module):
    """Norms of a linear's bfloat16 output with float32 weights, as autocast runs them on a CPU."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 64), torch.nn.Linear(64, 8)
        self.ln, self.gn = torch.nn.LayerNorm(64), torch.nn.GroupNorm(4, 64)

    def forward(self, x):
        return self.b(self.gn(self.ln(self.a(x)).unsqueeze(-1)).squeeze(-1))


def test_norm_statistics_are_traced_in_the_dtype_the_cpu_kernel_gives():
    """A layer or group norm of a bfloat16 input with float32 weights keeps its mean and rstd
    in float32 on a CPU, while PyTorch's fake kernels say bfloat16. Traced as the kernel gives
    them (frontend/fake.py), the plan counts their bytes, the norms' backwards are measured
    on zeros of those dtypes (before: a warning that they could not be, and no scratch
    counted), and gradients equal eager's."""
    torch.manual_seed(0)
    model = _Norms().train()
    ref = copy.deepcopy(model)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    with torch.autocast(**BF16):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            cm = memsched.compile(model, "1GB", device="cpu", train=True)
            cm(x).float().sum().backward()
        ref(x).float().sum().backward()
        eager = [o.dtype for o in torch.ops.aten.native_layer_norm(ref.a(x), [64], ref.ln.weight, ref.ln.bias, 1e-5)]
    norms = [n for n in cm.plan.graph.graph.nodes
             if n.target in (torch.ops.aten.native_layer_norm.default, torch.ops.aten.native_group_norm.default)]
    assert len(norms) == 2
    for n in norms:
        assert [v.dtype for v in n.meta["val"]] == eager == [torch.bfloat16, torch.float32, torch.float32]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    cm.close()


def test_a_mask_the_model_makes_of_ones_is_skipped_as_in_eager():
    """ConvBERT makes an all-ones attention mask when given none; eager transformers reads its
    values and skips it. The capture reads off the trace that it is made of ones and skips it
    too: under autocast the training step's loss and gradients equal eager's bit for bit
    (before: float32 zeros added to bfloat16 scores ran softmax in float32, a bfloat16 step
    off). A mask the caller passes that pads is kept (float32 softmaxes, as in eager)."""
    import transformers as T

    torch.manual_seed(0)
    config = T.ConvBertConfig(vocab_size=100, hidden_size=32, embedding_size=32, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=64, hidden_dropout_prob=0.0,
                              attention_probs_dropout_prob=0.0)
    model = T.ConvBertForMaskedLM(config).train()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.autocast(**BF16):
        cm = memsched.compile(model, "1GB", device="cpu", train=True)
        got, want = cm(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
        got.backward()
        want.backward()
        softmaxes = [n for n in cm.plan.graph.graph.nodes if n.target is torch.ops.aten._softmax.default]
        assert softmaxes and all(n.meta["val"].dtype == torch.bfloat16 for n in softmaxes)
        padded = torch.ones_like(ids)
        padded[0, :2] = 0
        passed = memsched.plan(model, (), "1GB", train=True,
                               example_kwargs=dict(input_ids=ids, attention_mask=padded, labels=ids))
        assert any(n.target is torch.ops.aten._softmax.default and n.meta["val"].dtype == torch.float32
                   for n in passed.graph.graph.nodes)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
    cm.close()


def test_only_masks_made_of_ones_alone_count_as_ones():
    """What constant_masks.made_of_ones says of tensors traced from factories, casts and views
    (ones), and of anything else: a filled value other than one, arithmetic, an input."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from memsched.frontend.constant_masks import made_of_ones

    seen = {}

    def f(x):
        ones = torch.ones(2, 6)
        cases = {"ones": ones, "cast view": ones.to(torch.bool)[:, None, :].expand(2, 3, 6),
                 "full 1": torch.full((2, 6), 1), "ones_like": torch.ones_like(x),
                 "full 0": torch.full((2, 6), 0), "doubled": ones * 2, "input": x, "input cast": x.bool()}
        seen.update({k: made_of_ones(v) for k, v in cases.items()})
        return x

    make_fx(f)(torch.ones(2, 6))
    assert seen == {"ones": True, "cast view": True, "full 1": True, "ones_like": True,
                    "full 0": False, "doubled": False, "input": False, "input cast": False}
    assert not made_of_ones(torch.ones(2))   # not traced: the values are there to read


def test_a_given_mask_is_skipped_or_kept_by_its_values_as_in_eager():
    """A tokenizer's attention mask with no padding: eager transformers reads it and skips it
    (SDPA runs causal); the capture decides it by its values too, and makes the mask a guard of
    the program. A LLaMA's training step under autocast then equals eager's bit for bit (before:
    kept, SDPA's masked path gave gradients 8e-4 away); a call whose mask pads is planned again
    with the mask kept, and one without padding reuses the first program."""
    model = _llama().train()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    with torch.autocast(**BF16):
        cm = memsched.compile(model, "1GB", device="cpu", train=True)
        for mask, plans in ((torch.ones_like(ids), 1), (padded, 2), (torch.ones_like(ids), 2)):
            kwargs = dict(input_ids=ids, attention_mask=mask, labels=ids)
            got, want = cm(**kwargs).loss, ref(**kwargs).loss
            got.backward()
            want.backward()
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            for p, q in zip(model.parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
            assert cm.plans_made == plans
    cm.close()
