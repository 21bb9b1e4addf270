"""Saved training plans re-apply: ``compile(model, plan=path, train=True)`` captures the step
again (forward and backward, with the loss head and module slices the plan was made with),
rebuilds the saved schedule on it without calling the solver -- placement recomputes, the
remat pass's recomputed values, per-layer recompute, fused regions -- and trains as eager does
(bit for bit unfused; fused regions reorder sums, so within 1e-5 of the largest gradient)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers as T

import memsched
from memsched.io.serialize import PlanMismatchError
from memsched.ir.meta import info
from memsched.ir.ops import Op, op_of
from memsched.passes.chunking import LOSS_HEAD
from helpers import FIXED_CPU, LossOnly, assert_same_grads, forbid_solver
from train_zoo import build_train


def _plan(model, args, kwargs, budget, **kw):
    return memsched.plan(model, args, budget=budget, example_kwargs=kwargs, train=True, hardware=FIXED_CPU, **kw)


def _min_budget(model, args, kwargs, **kw) -> int:
    with pytest.raises(memsched.InfeasibleBudgetError) as err:
        _plan(model, args, kwargs, 1, **kw)
    return err.value.min_budget_bytes


def _step(m, args, kwargs, loss_fn):
    torch.manual_seed(0)   # dropout draws alike
    loss = loss_fn(m(*args, **kwargs))
    loss.backward()
    return loss.detach()


def _close_grads(ref, model):
    for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        scale = p.grad.abs().max().clamp_min(1e-12)
        assert ((q.grad - p.grad).abs().max() / scale).item() < 1e-5, name


def _small_gpt2():
    """GPT-2's tanh GELU is what the remat pass recomputes under fusion; small, for Inductor's sake."""
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=32, use_cache=False,
                       bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 128, (2, 16))
    return T.GPT2LMHeadModel(cfg).train(), (), {"input_ids": ids, "labels": ids}, lambda out: out.loss


@pytest.mark.parametrize("name,frac,fuse,layers", [("gpt2_dropout", "min", False, False),
                                                   ("cnn_bn", 0.6, False, False),
                                                   ("llama", 0.3, False, True),
                                                   ("small_gpt2", 0.5, True, True)])
def test_a_saved_training_plan_trains_as_eager_without_solving(name, frac, fuse, layers, tmp_path, monkeypatch):
    model, args, kwargs, loss_fn = _small_gpt2() if name == "small_gpt2" else build_train(name)
    ref = copy.deepcopy(model)
    # fused: the remat pass's recomputed values (one of them prefetched) and each layer recomputed
    options = {"fuse": fuse, "recompute_layers": layers}
    if frac == "min":
        budget = _min_budget(model, args, kwargs, **options)
    else:
        budget = int(_plan(model, args, kwargs, 10**13, fuse=fuse).program.peak_bytes * frac)
    plan = _plan(model, args, kwargs, budget, **options)
    assert plan.is_training and plan.bytes_moved
    if layers and not fuse:   # a value each layer recomputes that the placement drops and re-makes
        assert any(n.name.endswith("_again_again") for n in plan.graph.graph.nodes)
    if fuse:
        notes = {r.name: r.note for r in plan.passes}
        assert "recomputed in the backward" in notes["remat"] and notes["layers"].startswith("per-layer recompute kept")
        assert any(op_of(n) is Op.PREFETCH and info(n).restores.endswith("_again") for n in plan.graph.graph.nodes)
    plan.save(tmp_path / "step.json")
    want = _step(ref, args, kwargs, loss_fn)
    forbid_solver(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, plan=tmp_path / "step.json", train=True, device="cpu")
        try:
            got = _step(cm, args, kwargs, loss_fn)
            if fuse:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                _close_grads(ref, model)
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=0)
                assert_same_grads(ref, model)
            for (bname, b), (_, c) in zip(ref.named_buffers(), model.named_buffers()):
                torch.testing.assert_close(c, b, rtol=0, atol=0, msg=lambda m: f"buffer {bname}: {m}")
            assert cm.budget_bytes == budget
            assert cm.stats.peak_device_bytes <= budget
            assert cm.plan.verify() <= budget
            assert [p.name for p in cm.plan.passes][-2:] == ["capture", "apply"]
            if not fuse:   # the schedule run is the saved one (a fused one is fused again on the capture)
                assert str(cm.plan).splitlines()[2:] == str(plan).splitlines()[2:]
        finally:
            cm.close()


def test_a_plan_with_the_loss_head_in_slices_reapplies(tmp_path, monkeypatch):
    """Below the unsplit minimum the LM head and its cross-entropy run on slices of rows: the
    saved plan says so, and the re-capture makes the same slices."""
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=1024, n_positions=64, use_cache=False,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = LossOnly(T.GPT2LMHeadModel(cfg)).train()
    ids = torch.randint(0, 1024, (2, 48))
    labels = ids.clone()
    ref = copy.deepcopy(model)
    unsplit = _plan(model, (ids, labels), {}, 10**13, chunk_ops=False).min_budget_bytes
    plan = _plan(model, (ids, labels), {}, int(0.8 * unsplit))
    assert any(c.path == LOSS_HEAD for c in plan.chunking)
    plan.save(tmp_path / "step.json")
    ref(ids, labels).backward()
    forbid_solver(monkeypatch)
    cm = memsched.compile(model, plan=tmp_path / "step.json", train=True, device="cpu")
    try:
        loss = cm(ids, labels)
        loss.backward()
        # the chunked kernel sums the loss by slices: close to eager's, not bit for bit
        torch.testing.assert_close(loss.detach(), ref(ids, labels).detach(), rtol=1e-5, atol=1e-6)
        _close_grads(ref, model)
        assert cm.stats.peak_device_bytes <= plan.budget_bytes
    finally:
        cm.close()


def test_a_training_plan_and_an_inference_call_are_told_apart(tmp_path):
    model, args, kwargs, loss_fn = build_train("mlp")
    step = _plan(model, args, kwargs, 10**9)
    step.save(tmp_path / "step.json")
    memsched.plan(model, args, budget=10**9, example_kwargs=kwargs, hardware=FIXED_CPU).save(tmp_path / "infer.json")
    with pytest.raises(PlanMismatchError, match="training step: compile it with train=True"):
        memsched.compile(model, plan=tmp_path / "step.json", device="cpu")
    with pytest.raises(PlanMismatchError, match="inference plan: compile it with train=False"):
        memsched.compile(model, plan=tmp_path / "infer.json", train=True, device="cpu")
    cm = memsched.compile(model, plan=tmp_path / "step.json", train=True, device="cpu")
    try:
        with torch.no_grad(), pytest.raises(PlanMismatchError, match="call the module with autograd enabled"):
            cm(*args, **kwargs)
    finally:
        cm.close()


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_a_plan_made_on_meta_runs_on_the_model_with_weights(train, tmp_path, monkeypatch):
    """The README's flow: plan a model built on meta (no weights), save, compile the same model
    with weights from the file. The meta model captures as the real one does (on meta, attention
    traced another way, constants made another way, a no-op ``contiguous`` kept)."""
    cfg = T.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    with torch.device("meta"):
        meta = T.LlamaForCausalLM(cfg).train(train)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).train(train)
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 256, (2, 16))
    kwargs = {"input_ids": ids, "labels": ids.clone()} if train else {"input_ids": ids}
    meta_kwargs = {k: v.to("meta") for k, v in kwargs.items()}
    # at the least budget without module slices (sliced, the loss sums in another order than eager)
    budget = _min_budget(meta, (), meta_kwargs, chunk_ops=False) if train else 10**9
    plan = memsched.plan(meta, (), budget=budget, example_kwargs=meta_kwargs, train=train, hardware=FIXED_CPU,
                         chunk_ops=False)
    plan.save(tmp_path / "plan.json")
    forbid_solver(monkeypatch)
    cm = memsched.compile(model, plan=tmp_path / "plan.json", train=train, device="cpu")
    try:
        with torch.set_grad_enabled(train):
            got, want = cm(**kwargs), ref(**kwargs)
            if train:
                got.loss.backward()
                want.loss.backward()
                assert_same_grads(ref, model)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()
    assert all(t.device.type == "meta" for t in meta.state_dict().values())   # left as it was


class _DropPath(torch.nn.Module):
    """Stochastic depth as CvT and timm write it: a per-sample draw of ``torch.rand``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        h = self.a(x)
        h = h * (torch.rand(h.shape[0], 1) > 0.3) / 0.7
        return self.b(h).square().mean()


def test_re_applying_a_plan_leaves_the_random_state_as_it_was(tmp_path):
    """Capturing a training step draws from the global generator; compiling with a budget kept
    the caller's state, re-applying a saved plan did not, so the call that re-applied it drew
    other numbers than eager (a CvT step's loss 1.125 against 1.241)."""
    torch.manual_seed(0)
    model, x = _DropPath().train(), torch.randn(4, 8)
    path = tmp_path / "plan.json"
    memsched.plan(copy.deepcopy(model), (x,), budget=10**9, train=True, hardware=FIXED_CPU).save(path)
    ref = copy.deepcopy(model)
    cm = memsched.compile(model, plan=path, device="cpu", train=True, hardware=FIXED_CPU)
    try:
        torch.manual_seed(1)
        state = torch.get_rng_state()
        cm.prepare(x)
        assert torch.equal(torch.get_rng_state(), state)
        torch.manual_seed(1)
        got = cm(x)
        torch.manual_seed(1)
        assert torch.equal(got, ref(x))
    finally:
        cm.close()
