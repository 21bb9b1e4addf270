"""Training inside a budget: loss, gradients, batch-norm statistics and optimizer steps equal
eager PyTorch at 100%, 60%, 40% of the unconstrained training peak and at the minimum."""
from __future__ import annotations

import collections
import copy
import functools
import warnings

import pytest
import torch

import memsched
from memsched.ir.meta import info
from memsched.passes.placement import RECOMPUTE
from helpers import FIXED_CPU, assert_same_grads
from train_zoo import TRAIN_ZOO, build_train

FRACTIONS = (1.0, 0.4, "min")
HW = "local"  # this machine's calibrated profile (on CPU: no host tier, moves go to disk)


def _eager_step(model, args, kwargs, loss_fn, seed=0):
    torch.manual_seed(seed)
    loss = loss_fn(model(*args, **kwargs))
    loss.backward()
    return loss.detach()


def _compile(model, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.compile(model, budget, train=True, device="cpu", time_limit_s=3.0, **kw)


@functools.cache   # once per model and worker: the zoo builds each model alike every time
def _training_peak(name) -> tuple[int, int]:
    """The unconstrained training peak and the minimum budget of TRAIN_ZOO[name]."""
    model, args, kwargs, _ = build_train(name)
    p0 = memsched.plan(model, args, budget=10**13, example_kwargs=kwargs, train=True)
    return p0.program.peak_bytes, p0.min_budget_bytes


def _budget_or_min(model, args, kwargs, frac, peak, minimum):
    if frac == "min":
        return minimum
    budget = int(peak * frac)
    if budget < minimum:
        with pytest.raises(memsched.InfeasibleBudgetError) as err:
            memsched.plan(model, args, budget=budget, example_kwargs=kwargs, train=True)
        assert err.value.min_budget_bytes == minimum
        return None
    return budget


@pytest.mark.parametrize("frac", FRACTIONS, ids=str)
@pytest.mark.parametrize("name", list(TRAIN_ZOO))
def test_training_step_matches_eager(name, frac):
    model, args, kwargs, loss_fn = build_train(name)
    ref = copy.deepcopy(model)
    peak, minimum = _training_peak(name)
    budget = _budget_or_min(model, args, kwargs, frac, peak, minimum)
    if budget is None:
        return  # below the minimum: the error above was the check
    want = _eager_step(ref, args, kwargs, loss_fn)
    cm = _compile(model, budget)
    try:
        torch.manual_seed(0)
        loss = loss_fn(cm(*args, **kwargs))
        loss.backward()
        torch.testing.assert_close(loss.detach(), want, rtol=0, atol=0)
        assert_same_grads(ref, model)
        for (bname, b), (_, c) in zip(ref.named_buffers(), model.named_buffers()):
            torch.testing.assert_close(c, b, rtol=0, atol=0, msg=lambda m: f"buffer {bname}: {m}")
        plan = cm.plan
        assert plan.verify() <= budget
        assert plan.peak_device_bytes <= budget
        assert cm.stats.peak_device_bytes <= budget, cm.stats
        if frac == 1.0:
            assert not plan.bytes_moved
        if frac != 1.0 and budget < peak:
            assert plan.bytes_moved or RECOMPUTE in plan.placement.gap_choice.values()
    finally:
        cm.close()


@pytest.mark.parametrize("name,frac", [("gpt2_dropout", 0.6), ("cnn_bn", 0.6), ("mlp", "min")])
def test_adamw_steps_match_eager(name, frac):
    """A few AdamW steps: the optimizer updates the model's own parameters, memsched's copies
    (disk homes here) are renewed before the next step, and every parameter stays equal."""
    model, args, kwargs, loss_fn = build_train(name)
    ref = copy.deepcopy(model)
    peak, minimum = _training_peak(name)
    budget = _budget_or_min(model, args, kwargs, frac, peak, minimum) or minimum
    cm = _compile(model, budget)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    try:
        for step in range(3):
            for m, o in ((ref, opt_ref), (cm, opt)):
                o.zero_grad()
                torch.manual_seed(step)
                loss_fn(m(*args, **kwargs)).backward()
                o.step()
            for (pname, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
                torch.testing.assert_close(q, p, rtol=0, atol=0, msg=lambda m: f"step {step} {pname}: {m}")
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()


def test_recompute_is_chosen_and_exact():
    """With a slow disk (the fixed CPU profile, disk at 10 MB/s, no host tier) moving saved
    activations is dear: between the minimum and the peak some are recomputed (cheap
    elementwise ops), the listing names the pass, and gradients stay bit-identical."""
    hw = FIXED_CPU.replace(disk_read_bw=1e7, disk_write_bw=1e7)
    model, args, kwargs, loss_fn = build_train("gpt2_dropout")
    ref = copy.deepcopy(model)
    p0 = memsched.plan(model, args, budget=10**13, example_kwargs=kwargs, train=True, hardware=hw)
    budget = int(p0.program.peak_bytes * 0.6)
    cm = _compile(model, budget, hardware=hw, recompute_layers=False)   # the placement's own recompute
    torch.manual_seed(0)
    loss_fn(cm(*args, **kwargs)).backward()
    _eager_step(ref, args, kwargs, loss_fn)
    assert_same_grads(ref, model)
    plan = cm.plan
    assert RECOMPUTE in plan.placement.gap_choice.values()
    assert "[recompute]" in str(plan)
    assert plan.recompute_overhead_s() > 0
    assert "recompute" in {r["decision"] for r in plan.saved_activations()}
    assert cm.stats.peak_device_bytes <= budget
    cm.close()


class _Counting(torch.nn.Module):
    """A forward that updates a buffer of its own: the update must reach the model."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("running", torch.zeros(16))

    def forward(self, x):
        self.calls += 1
        y = self.lin(x)
        self.running.mul_(0.9).add_(y.detach().mean(0), alpha=0.1)
        return y.square().mean()


def test_forward_buffer_updates_reach_the_model():
    torch.manual_seed(0)
    model, x = _Counting(), torch.randn(4, 16)
    ref = copy.deepcopy(model)
    cm = _compile(model, "1GB")
    for _ in range(2):
        cm(x).backward()
        ref(x).backward()
    for (name, b), (_, c) in zip(ref.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    assert_same_grads(ref, model)
    cm.close()


class _Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)

    def forward(self, x, *, scale=1.0):
        h = self.a(x) * scale
        return {"h": h, "parts": [self.b(h), None, (h.square().mean(),)], "n": 3}


def test_nested_outputs_with_none_and_numbers_train():
    """A forward returning a dict whose lists hold None and a number beside tensors: they come
    back as returned, and the backward runs from the scalar."""
    torch.manual_seed(0)
    model, x = _Nested(), torch.randn(4, 16)
    ref = copy.deepcopy(model)
    cm = _compile(model, "1GB")
    out, want = cm(x, scale=0.5), ref(x, scale=0.5)
    assert out["n"] == 3 and out["parts"][1] is None
    assert torch.equal(out["parts"][0], want["parts"][0])
    out["parts"][2][0].backward()
    want["parts"][2][0].backward()
    assert_same_grads(ref, model)
    cm.close()


def test_no_grad_calls_use_an_inference_plan():
    model, args, kwargs, loss_fn = build_train("mlp")
    cm = _compile(model, "1GB")
    with torch.no_grad():
        out = cm(*args, **kwargs)
    assert not out.requires_grad
    assert "boundary" not in str(cm.plan)
    out = cm(*args, **kwargs)
    assert out.requires_grad and "boundary" in str(cm.plan)
    cm.close()


def test_gradient_for_an_unplanned_output_is_an_error():
    """With a loss output, the backward is planned from the loss; a loss built on the logits
    must not silently give wrong gradients. The error names both as the caller reaches them."""
    model, args, kwargs, _ = build_train("gpt2_dropout")
    cm = _compile(model, "1GB")
    out = cm(*args, **kwargs)
    with pytest.raises(RuntimeError, match=r"backward from output\['loss'\] \(the scalar loss when there is one\), "
                                           r"but output\['logits'\] received a gradient too.*grad_outputs='all'"):
        out.logits.sum().backward()
    cm.close()


def test_grad_outputs_all_trains_through_every_output():
    model, args, kwargs, _ = build_train("gpt2_dropout")
    ref = copy.deepcopy(model)
    cm = _compile(model, "1GB", grad_outputs="all")
    torch.manual_seed(0)
    out = cm(*args, **kwargs)
    (out.loss + out.logits.square().mean()).backward()
    torch.manual_seed(0)
    r = ref(*args, **kwargs)
    (r.loss + r.logits.square().mean()).backward()
    assert_same_grads(ref, model)
    cm.close()


def test_a_scalar_output_no_parameter_reaches_names_itself_and_the_way_out():
    """A forward returning a statistic of its input (a scalar) beside the outputs the weights
    make: 'auto' takes the scalar for the loss, so the error names it as the caller reaches it
    and points to grad_outputs='all', which trains through the others as eager does."""
    Out = collections.namedtuple("Out", "features input_sum")

    class Features(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, xs):
            return Out([self.lin(x) for x in xs], xs[0].sum())

    torch.manual_seed(0)
    model, xs = Features(), [torch.randn(4, 8), torch.randn(2, 8)]
    with pytest.raises(memsched.UnsupportedModelError,
                       match=r"returns output\.input_sum, a scalar taken for the loss .*grad_outputs='all'"):
        memsched.plan(model, (xs,), budget="1GB", train=True)
    ref = copy.deepcopy(model)
    cm = _compile(model, "1GB", grad_outputs="all")
    sum(f.square().sum() for f in cm(xs).features).backward()
    sum(f.square().sum() for f in ref(xs).features).backward()
    assert_same_grads(ref, model)
    cm.close()


def test_model_without_trainable_parameters_is_rejected():
    model, args, kwargs, _ = build_train("mlp")
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="requires grad"):
        memsched.plan(model, args, budget="1GB", example_kwargs=kwargs, train=True)


@pytest.mark.parametrize("unfreeze", [True, False], ids=["unfrozen", "frozen"])
def test_parameters_frozen_or_unfrozen_after_compiling_get_eager_gradients(unfreeze):
    """A step computes the gradients of the parameters that required grad when it was traced:
    a backbone unfrozen after compiling (staged fine-tuning) must get its gradients, not None,
    and one frozen must get none; each set is planned."""
    model, args, kwargs, _ = build_train("llama")
    backbone = list(model.model.layers.parameters())
    for p in backbone:
        p.requires_grad_(not unfreeze)
    ref = copy.deepcopy(model)
    cm = _compile(model, "1GB")
    try:
        for _ in range(2):   # the second step after the change
            for m in (cm, ref):
                m.zero_grad(set_to_none=True)
                m(*args, **kwargs).loss.backward()
            assert_same_grads(ref, model)
            for m in (model, ref):
                for p in m.model.layers.parameters():
                    p.requires_grad_(unfreeze)
        assert all((p.grad is not None) == unfreeze for p in backbone)
        assert cm.plans_made == 2
    finally:
        cm.close()


def test_meta_model_training_plan():
    """Planning a training step needs no memory: the model may live on the meta device."""
    from zoo import build_meta

    model, args, kwargs = build_meta("gpt2")
    model.train().requires_grad_(True)
    plan = memsched.plan(model, args, budget=10**13, example_kwargs=kwargs, train=True)
    tight = memsched.plan(model, args, budget=plan.min_budget_bytes, example_kwargs=kwargs, train=True)
    assert tight.peak_device_bytes <= plan.min_budget_bytes
    assert tight.verify() <= plan.min_budget_bytes


@pytest.mark.parametrize("name", ["llama", "gpt2_dropout", "bert_dropout"])
def test_a_step_planned_for_a_gpu_has_no_cpu_only_ops(name):
    """Traced on the CPU for a CUDA target, no ``*_for_cpu`` kernel is in the plan: attention
    with dropout is lowered with the math backend, attention without it is
    memsched::scaled_dot_product_attention (kernels/attention.py). Run here, that step's loss and
    gradients match eager's up to the math backend's different order of sums (a relative 1e-4)."""
    model, args, kwargs, loss_fn = build_train(name)
    ref = copy.deepcopy(model)
    gpu = memsched.get_hardware("a100-40gb")
    p = memsched.plan(model, args, budget=10**12, example_kwargs=kwargs, train=True, hardware=gpu)
    cpu_only = [n.name for n in p.graph.graph.nodes if n.op == "call_function" and "for_cpu" in str(n.target)]
    assert not cpu_only, cpu_only
    # dropout as a GPU's eager runs it (one native_dropout), not a CPU's bernoulli_ and multiply
    drawn = {str(n.target) for n in p.graph.graph.nodes if n.op == "call_function" and "bernoulli" in str(n.target)}
    assert not drawn, drawn
    if name.endswith("dropout"):
        assert any(n.target is torch.ops.aten.native_dropout.default for n in p.graph.graph.nodes)
    gpu_traced = copy.deepcopy(model)
    cm = _compile(gpu_traced, "1GB", hardware=gpu)  # run here, on the CPU
    torch.manual_seed(0)
    loss = loss_fn(cm(*args, **kwargs))
    loss.backward()
    ref_loss = _eager_step(ref, args, kwargs, loss_fn)
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-4, atol=1e-6)
    for (pname, a), (_, b) in zip(ref.named_parameters(), gpu_traced.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{pname}: {m}")


class _TanhGelu(torch.autograd.Function):
    """A GeLU with a hand-written backward, as BLOOM's and Megatron's are."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x))
        return g * (0.5 * x * ((1 - t * t) * (0.79788456 + 0.1070322243 * x * x)) + 0.5 * (1 + t))


class _CustomBackwardMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(_TanhGelu.apply(self.up(x))).square().mean()


def test_a_custom_autograd_backward_is_the_one_the_step_runs():
    """torch.export keeps a Function's forward ops only; the step applies the Function again
    (frontend/functions.py), so autograd runs its own backward: gradients bit for bit, at an
    unconstrained budget and at the minimum, with no warning."""
    from memsched.frontend.joint import CustomBackwardWarning

    torch.manual_seed(0)
    model = _CustomBackwardMLP().train()
    x = torch.randn(8, 16)
    free = memsched.plan(model, (x,), budget=10**12, train=True, hardware=FIXED_CPU)
    for budget in (free.program.peak_bytes, free.min_budget_bytes):
        trained, ref = copy.deepcopy(model), copy.deepcopy(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", CustomBackwardWarning)
            cm = memsched.compile(trained, budget, train=True, device="cpu", hardware=FIXED_CPU)
            loss = cm(x)
        loss.backward()
        want = ref(x)
        want.backward()
        assert torch.equal(loss, want)
        assert_same_grads(ref, trained)
        assert cm.stats.peak_device_bytes <= budget


class _MaskedSoftmax(torch.autograd.Function):
    """SEW-D's XSoftmax: its forward makes a tensor from a constant (``torch.tensor``), which
    torch.export lifts to a graph input made inside the Function's body."""

    @staticmethod
    def forward(ctx, x, mask):
        out = x.masked_fill(~mask, torch.tensor(torch.finfo(x.dtype).min)).softmax(-1)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return torch._softmax_backward_data(g, out, -1, out.dtype), None


class _MaskedAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.out = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x, keep):
        scores = self.q(x) @ x.transpose(-1, -2)
        return self.out(_MaskedSoftmax.apply(scores, keep[:, None, :]) @ x).square().mean()


def test_a_custom_backward_whose_forward_makes_a_constant_tensor_trains_as_eager():
    """The lifted constant is a graph input tagged as the Function's body: applying the
    Function again must still hand it its argument (the inputs after it were shifted by one,
    and the step failed on a 0-d tensor where the user's input belonged)."""
    from memsched.frontend.joint import CustomBackwardWarning

    torch.manual_seed(0)
    model = _MaskedAttention().train()
    x, keep = torch.randn(2, 6, 16), torch.rand(2, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    trained, ref = copy.deepcopy(model), copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CustomBackwardWarning)
        cm = memsched.compile(trained, "1GB", train=True, device="cpu", hardware=FIXED_CPU)
        loss = cm(x, keep)
    loss.backward()
    want = ref(x, keep)
    want.backward()
    assert torch.equal(loss, want)
    assert_same_grads(ref, trained)


class _ScaledByItsOwnWeight(torch.nn.Module):
    """A Function whose forward reads a parameter it is not handed (a closure): it cannot be
    applied again on the step's values."""

    def __init__(self):
        super().__init__()
        self.up, self.scale = torch.nn.Linear(16, 16), torch.nn.Parameter(torch.full((16,), 0.5))
        outer = self

        class Scaled(torch.autograd.Function):
            @staticmethod
            def forward(ctx, h):
                ctx.save_for_backward(h)
                return torch.tanh(h) * outer.scale.detach()

            @staticmethod
            def backward(ctx, g):
                (h,) = ctx.saved_tensors
                return g * outer.scale.detach() * (1 - torch.tanh(h) ** 2)

        self.fn = Scaled

    def forward(self, x):
        return self.fn.apply(self.up(x)).square().mean()


def _step_beside_eager(model, x):
    """One compiled training step of ``model`` and one eager step of a copy (returned), the
    losses checked equal; the gradients are left on each for the caller."""
    ref = copy.deepcopy(model)
    loss = memsched.compile(model, "1GB", train=True, device="cpu", hardware=FIXED_CPU)(x)
    loss.backward()
    want = ref(x)
    want.backward()
    assert torch.equal(loss, want)
    return ref


def test_a_custom_backward_that_cannot_be_applied_again_is_named_in_a_warning():
    from memsched.frontend.joint import CustomBackwardWarning

    torch.manual_seed(0)
    model = _ScaledByItsOwnWeight().train()
    with pytest.warns(CustomBackwardWarning, match="Scaled"):
        ref = _step_beside_eager(model, torch.randn(8, 16))
    for p, q in zip(model.up.parameters(), ref.up.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


class _Reversible(torch.nn.Module):
    """A reversible block as Reformer's: its Function computes the layer under ``no_grad`` (its
    backward recomputes it), reading the layer's weight from the module it closes over."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(16, 16)
        outer = self

        class Coupled(torch.autograd.Function):
            @staticmethod
            def forward(ctx, h):
                with torch.no_grad():
                    out = h + outer.layer(h)
                ctx.save_for_backward(out)
                return out

            @staticmethod
            def backward(ctx, g):
                return g

        self.fn = Coupled

    def forward(self, x):
        return self.fn.apply(x).square().mean()


def test_a_function_computing_without_autograd_is_named_when_nothing_is_left_to_differentiate():
    model = _Reversible().train()
    with pytest.raises(memsched.UnsupportedModelError, match="nothing to differentiate.*through .*Coupled: "):
        memsched.plan(model, (torch.randn(4, 16),), budget=10**12, train=True)


def test_a_model_without_custom_backwards_warns_nothing_of_them():
    from memsched.frontend.joint import CustomBackwardWarning

    model, args, kwargs, loss_fn = build_train("gpt2_dropout")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        memsched.plan(model, args, budget=10**12, example_kwargs=kwargs, train=True)
    assert not [w for w in seen if issubclass(w.category, CustomBackwardWarning)]


@torch.library.custom_op("memsched_tests::clipped_square", mutates_args=())
def _clipped_square(x: torch.Tensor) -> torch.Tensor:
    return x * x


@_clipped_square.register_fake
def _(x):
    return torch.empty_like(x)


def _clipped_square_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _clipped_square_backward(ctx, g):   # not the derivative of x * x: the registered formula shows
    (x,) = ctx.saved_tensors
    return g * (2 * x).clamp(-1, 1)


_clipped_square.register_autograd(_clipped_square_backward, setup_context=_clipped_square_setup)


class _CustomOpMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.down(_clipped_square(self.up(x))).square().mean()


def test_a_custom_operators_registered_backward_is_the_one_the_step_runs():
    """A torch.library operator with register_autograd (as transformers' MoE experts are) stays
    one op in the graph, and its autograd kernel runs its registered backward: gradients as
    eager's, and no warning that they may differ (there was one, naming its generated Function)."""
    from memsched.frontend.joint import CustomBackwardWarning

    torch.manual_seed(0)
    model = _CustomOpMLP().train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CustomBackwardWarning)
        ref = _step_beside_eager(model, torch.randn(8, 16))
    assert_same_grads(ref, model)


class TwoHeads(torch.nn.Module):
    """A trunk and two heads: a loss built on one head's output reaches the trunk and that head."""

    def __init__(self):
        super().__init__()
        self.trunk, self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.trunk(x))
        return self.a(h), self.b(h)


@pytest.mark.parametrize("used", [0, 1])
def test_parameters_the_backward_does_not_reach_keep_no_gradient(used):
    """Outputs without a gradient are fed zeros by the planned backward; the parameters only they
    reach get None, as eager autograd leaves them (an optimizer skips a None gradient, not a
    zero one: weight decay and momentum would still move the parameter)."""
    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(4, 8)
    ref = copy.deepcopy(model)
    ref(x)[used].sum().backward()
    cm = _compile(model, 10**9, hardware=FIXED_CPU)
    try:
        cm(x)[used].sum().backward()
    finally:
        cm.close()
    assert_same_grads(ref, model)
    idle = model.b if used == 0 else model.a
    assert idle.weight.grad is None and model.trunk.weight.grad is not None


def test_the_call_that_plans_draws_what_eager_draws():
    """Swin's drop-path draws with torch.rand: the first call, which plans the step, must leave
    the random state to the step itself (planning used to draw from it), so the loss and every
    gradient equal eager's from the same seed."""
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    model = SwinForImageClassification(SwinConfig(image_size=32, patch_size=4, embed_dim=32, depths=[2, 2],
                                                  num_heads=[2, 4], window_size=4, num_labels=3,
                                                  drop_path_rate=0.1)).train()
    ref = copy.deepcopy(model)
    kw = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.tensor([0, 2, 1, 0])}
    cm = _compile(model, "1GB")
    torch.manual_seed(1)
    loss = cm(**kw).loss
    loss.backward()
    want = _eager_step(ref, (), kw, lambda out: out.loss, seed=1)
    assert torch.equal(loss.detach(), want)
    assert_same_grads(ref, model)
    cm.close()


def test_a_grouped_query_decoder_without_a_mask_trains_as_eager_bit_for_bit():
    """Given no attention mask, transformers attends through SDPA's own grouped-query path
    (``enable_gqa``, no mask) in eager, but builds a mask and repeats the key/value heads under
    torch.export. The capture lets it decide as in eager, so the backward sums the key/value
    gradients over the groups in eager's order (it did not: Qwen3's layer-0 and embedding
    gradients were 2.5e-8 off)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                         vocab_size=512, attn_implementation="sdpa")).train()
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    kwargs = {"input_ids": ids, "labels": ids}
    ref = copy.deepcopy(model)
    cm = _compile(model, 10**10)
    loss = cm(**kwargs).loss
    loss.backward()
    want = ref(**kwargs).loss
    want.backward()
    assert not [n for n in cm.plan.graph.graph.nodes if n.target is torch.ops.aten.expand.default
                and len(n.args[1]) == 5], "key/value heads repeated: not eager's attention"
    assert torch.equal(loss, want)
    assert_same_grads(ref, model)


def test_a_bfloat16_grouped_query_step_without_a_cache_equals_eager_bit_for_bit():
    """With no cache and no mask transformers looks for packed sequences in the position ids, a
    check it cannot make on traced values, and built a mask under capture: the key/value
    gradients' sums over the groups then rounded differently from eager's SDPA path, one
    bfloat16 step apart. The caller passes no position ids, so the model makes them, one
    sequence per row, and the capture decides as eager does."""
    model, args, kwargs, loss_fn = build_train("llama")   # use_cache=False, 4 heads over 2
    model = model.to(torch.bfloat16)
    ref = copy.deepcopy(model)
    cm = _compile(model, 10**10)
    loss = loss_fn(cm(*args, **kwargs))
    loss.backward()
    assert torch.equal(loss, _eager_step(ref, args, kwargs, loss_fn))
    assert_same_grads(ref, model)


def test_the_capture_s_mask_answers_stay_on_its_thread():
    """The capture patches two of transformers' masking helpers while it traces: only its own
    thread gets the eager answers, another thread running the model meanwhile keeps the real
    ones, and both are put back after."""
    import threading

    from transformers import masking_utils

    from memsched.frontend.capture import eager_attention_masks

    packed = torch.tensor([[0, 1, 2, 0, 1]])
    before = (masking_utils.is_torchdynamo_exporting, masking_utils.find_packed_sequence_indices)
    seen = {}
    with eager_attention_masks((), {"input_ids": packed}):
        assert masking_utils.find_packed_sequence_indices(packed) is None
        other = threading.Thread(target=lambda: seen.update(packed=masking_utils.find_packed_sequence_indices(packed)))
        other.start()
        other.join()
    assert seen["packed"] is not None and seen["packed"].tolist() == [[0, 0, 0, 1, 1]]
    assert (masking_utils.is_torchdynamo_exporting, masking_utils.find_packed_sequence_indices) == before


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_a_model_with_activation_checkpointing_on_trains_as_eager(reentrant):
    """A transformers model with ``activation_checkpointing_enable()`` (the first thing a user whose
    model does not fit turns on): at memsched's minimum, loss and gradients equal eager's with the
    same checkpointing. Reentrant checkpointing (``use_reentrant=True``) computes its function
    without autograd; it runs as that function instead (before: refused, "no output depends on a
    trained parameter")."""
    import transformers as T

    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128)
    model = T.LlamaForCausalLM(config).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch's and transformers' notes on checkpointing
        floor = memsched.plan(model, (), "1GB", train=True, example_kwargs=dict(input_ids=ids, labels=ids))
        cm = memsched.compile(model, floor.min_budget_bytes, device="cpu", train=True)
        for _ in range(2):
            got, want = cm(input_ids=ids, labels=ids).loss, ref(input_ids=ids, labels=ids).loss
            got.backward()
            want.backward()
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert_same_grads(ref, model)
    cm.close()


def _attention_ops(plan) -> set[str]:
    ops = {line.split(" = ")[1].split("(")[0].split(".")[-1] for line in str(plan).splitlines()
           if " = aten." in line or " = memsched." in line}
    return {op for op in ops if "attention" in op or op in ("_safe_softmax", "_softmax")}


def test_a_step_planned_for_a_gpu_saves_no_attention_probabilities(monkeypatch):
    """Traced on the CPU for a GPU, an attention without a mask or dropout is PyTorch's attention
    saving only its inputs, its backward running it again (kernels/attention.py), not the math
    path, which saved the [batch, heads, q, k] probabilities of every layer for the backward: the
    step's minimum falls (grouped-query heads repeated for it). A padded batch's mask keeps the
    math path."""
    T = pytest.importorskip("transformers")
    from memsched.frontend import joint

    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, 128, (2, 256), generator=torch.Generator().manual_seed(1))

    def plan(**kw):
        return memsched.plan(model, (), budget="1GB", example_kwargs=dict(input_ids=ids, labels=ids, **kw),
                             train=True, hardware="h100")

    fused = plan()
    assert _attention_ops(fused) == {"scaled_dot_product_attention", "scaled_dot_product_attention_backward"}
    assert "memsched.scaled_dot_product_attention(" in str(fused)
    backwards = [n for n in fused.graph.graph.nodes if "attention_backward" in str(n.target)]
    held = 2 * 4 * 256 * (16 * 4 + 4)   # the recomputed [2, 4, 256, 16] output and its log-sum-exp
    assert len(backwards) == 2 and all(info(n).scratch == held for n in backwards), [info(n).scratch for n in backwards]
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    assert "_safe_softmax" in _attention_ops(plan(attention_mask=padded))
    monkeypatch.setattr(joint, "_saves_no_probabilities", lambda *a: False)   # the math path, as before
    math = plan()
    assert "_safe_softmax" in _attention_ops(math)
    probabilities = 2 * 4 * 256 * 256 * 4   # one layer's [batch, heads, q, k] in float32: 2 MiB
    least = fused.min_budget_bytes, math.min_budget_bytes   # (the device's workspace in both)
    assert least[0] + probabilities <= least[1], least
