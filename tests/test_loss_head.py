"""The LM head with its cross-entropy run in slices of rows (frontend/loss_head.py, selected by
passes/chunking.py below the minimum): found by its ops, the loss alone replaced when the
logits are returned too (it reads them), the same maths as the exported graph,
and a training step that never holds the full logits -- or, returning them, none of the loss's
own -- plans below the unsplit minimum and matches eager; a fused step has its loss read the
returned logits wherever its whole program does not fit the budget."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.export.graph_signature import InputKind

import memsched
from memsched.frontend.capture import export_model
from memsched.frontend.joint import capture_joint
from memsched.frontend.loss_head import chunk_loss_heads, find_loss_heads
from memsched.passes.chunking import LOSS_HEAD
from helpers import FIXED_CPU, LossOnly, assert_step_close_to_eager

VOCAB = 1024


def _gpt2():   # tied LM head, no bias
    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=VOCAB, n_positions=64, use_cache=False,
                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return T.GPT2LMHeadModel(cfg)


def _qwen2():   # untied head, grouped-query attention
    cfg = T.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, use_cache=False)
    return T.Qwen2ForCausalLM(cfg)


def _batch(batch=2, seq=48):
    ids = torch.randint(0, VOCAB, (batch, seq))
    labels = ids.clone()
    labels[:, :5] = -100   # a prompt the loss ignores
    return ids, labels


def test_found_by_its_ops_and_shared_where_the_logits_are_returned():
    torch.manual_seed(0)
    lm, (ids, labels) = _gpt2(), _batch()
    heads = find_loss_heads(export_model(LossOnly(lm).train(), (ids, labels)).graph_module)
    assert [(h.rows, h.logits_bytes, h.shared) for h in heads] == [(ids.numel(), ids.numel() * VOCAB * 4, False)]
    # the full model returns its logits beside the loss: they exist whole anyway, the loss's
    # values need not
    returned = export_model(lm.train(), (), {"input_ids": ids, "labels": labels}).graph_module
    assert [(h.rows, h.shared) for h in find_loss_heads(returned)] == [(ids.numel(), True)]


def _largest_value(gm) -> int:
    return max(n.meta["val"].numel() for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor))


def test_the_chunked_step_never_makes_the_logits():
    torch.manual_seed(0)
    model, (ids, labels) = LossOnly(_qwen2()).train(), _batch()
    logits = ids.numel() * VOCAB
    assert _largest_value(capture_joint(model, (ids, labels)).gm) >= logits
    chunked = capture_joint(model, (ids, labels), loss_chunks=4).gm
    assert _largest_value(chunked) < logits   # the largest is a weight now
    quarters = [n for n in chunked.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
                and tuple(n.meta["val"].shape) == (ids.numel() // 4, VOCAB)]
    assert quarters   # the logits, a quarter of the rows at a time


class _Head(torch.nn.Module):
    def __init__(self, bias, upcast, reduction, ignore_index):
        super().__init__()
        self.proj = torch.nn.Linear(32, VOCAB, bias=bias)
        self.upcast, self.reduction, self.ignore_index = upcast, reduction, ignore_index

    def forward(self, h, target):
        logits = self.proj(h)
        if self.upcast:
            logits = logits.float()
        return F.cross_entropy(logits.view(-1, VOCAB), target.view(-1), reduction=self.reduction,
                               ignore_index=self.ignore_index)


def _flat_inputs(ep, model, args):
    state, user = dict(model.named_parameters()), iter(args)
    return [state[s.target].detach().requires_grad_(True) if s.kind == InputKind.PARAMETER else next(user)
            for s in ep.graph_signature.input_specs]


@pytest.mark.parametrize("bias,upcast,reduction,ignore_index,chunks,dtype", [
    (False, True, "mean", -100, 3, torch.float32), (True, False, "sum", 0, 4, torch.float32),
    (True, True, "none", -100, 7, torch.float32), (False, True, "mean", -100, 2, torch.bfloat16),
])
def test_the_rewrite_computes_what_the_exported_graph_does(bias, upcast, reduction, ignore_index, chunks, dtype):
    """bf16 logits upcast before the loss: the loss stays float32 (never rounded to bf16)."""
    torch.manual_seed(0)
    model = _Head(bias, upcast, reduction, ignore_index).to(dtype)
    h, target = torch.randn(3, 10, 32, dtype=dtype), torch.randint(0, VOCAB, (3, 10))
    target[0, :4] = ignore_index
    ep = export_model(model, (h, target))
    rewritten = chunk_loss_heads(ep.graph_module, chunks)
    assert not any(n.target is torch.ops.aten.cross_entropy_loss.default for n in rewritten.graph.nodes)
    results = []
    for gm in (ep.graph_module, rewritten):
        inputs = _flat_inputs(ep, model, (h, target))
        (loss,) = gm(*inputs)
        loss.sum().backward()
        results.append((loss.detach(), [i.grad for i in inputs if isinstance(i, torch.Tensor) and i.requires_grad]))
    (want, want_grads), (got, got_grads) = results
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, **({} if dtype == torch.float32 else {"rtol": 1e-4, "atol": 1e-4}))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


class _Shifted(torch.nn.Module):
    """The shift done on the logits (``logits[:, :-1]``), as older Hugging Face losses and many
    training loops do; ``vocab_slice`` slices the vocabulary instead (not a choice of rows)."""

    def __init__(self, vocab_slice=False):
        super().__init__()
        self.proj, self.vocab_slice = torch.nn.Linear(32, VOCAB), vocab_slice

    def forward(self, h, target):
        logits = self.proj(h)
        if self.vocab_slice:
            return F.cross_entropy(logits[..., : VOCAB // 2].reshape(-1, VOCAB // 2), target.reshape(-1))
        logits = logits[:, :-1, :].contiguous()
        return F.cross_entropy(logits.view(-1, VOCAB), target[:, 1:].reshape(-1))


def test_a_shift_of_the_logits_is_a_shift_of_the_hidden_state():
    torch.manual_seed(0)
    h, target = torch.randn(2, 9, 32), torch.randint(0, VOCAB // 2, (2, 9))
    assert find_loss_heads(export_model(_Shifted(vocab_slice=True), (h, target)).graph_module) == []
    model = _Shifted()
    ep = export_model(model, (h, target))
    (head,) = find_loss_heads(ep.graph_module)
    assert head.rows == 16 and [dim for dim, *_ in head.slices] == [1]   # the sequence dim
    rewritten = chunk_loss_heads(ep.graph_module, 3)
    results = []
    for gm in (ep.graph_module, rewritten):
        inputs = _flat_inputs(ep, model, (h, target))
        (loss,) = gm(*inputs)
        loss.backward()
        results.append([loss.detach()] + [i.grad for i in inputs if isinstance(i, torch.Tensor) and i.requires_grad])
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want)


def _plan(model, args, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.plan(model, args, budget, train=True, hardware=FIXED_CPU, **kw)


@pytest.mark.parametrize("build", [_gpt2, _qwen2], ids=["gpt2-tied", "qwen2-gqa"])
def test_a_step_below_the_unsplit_minimum_matches_eager(build, tmp_path):
    torch.manual_seed(0)
    model, (ids, labels) = LossOnly(build()).train(), _batch()
    unsplit = _plan(model, (ids, labels), 10**13, chunk_ops=False).min_budget_bytes
    plan = assert_step_close_to_eager(model, (ids, labels), int(0.8 * unsplit))
    assert LOSS_HEAD in {c.path for c in plan.chunking}
    assert "LM head + cross-entropy" in plan.summary()
    plan.save(tmp_path / "plan.json")
    assert memsched.Plan.load(tmp_path / "plan.json").chunking == plan.chunking


def test_a_model_returning_its_logits_replaces_the_loss_alone():
    """A Hugging Face model returns the logits beside the loss; the caller holds them through the
    backward. Below the unsplit minimum the loss reads them in slices of rows, the logits come
    back whole and equal eager's, loss and gradients close."""
    torch.manual_seed(0)
    model, (ids, labels) = _qwen2().train(), _batch()
    ref = copy.deepcopy(model)
    kwargs = {"input_ids": ids, "labels": labels}
    unsplit = _plan(model, (), 10**13, example_kwargs=kwargs, chunk_ops=False).min_budget_bytes
    budget = int(0.8 * unsplit)
    want = ref(**kwargs)
    want.loss.backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, budget, example_kwargs=kwargs, train=True, device="cpu", hardware=FIXED_CPU)
    try:
        got = cm(**kwargs)
        got.loss.backward()
        assert LOSS_HEAD in {c.path for c in cm.plan.chunking}
        assert cm.stats.peak_device_bytes <= budget and cm.plan.verify() <= budget
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)   # the kept linear: as eager
        torch.testing.assert_close(got.loss, want.loss)
        for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
    finally:
        cm.close()


_VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.slice.Tensor", "aten.select.int",
          "aten.detach.default", "aten.alias.default", "aten.t.default", "aten.transpose.int"}


def _whole_logit_ops(gm, whole: int) -> list[str]:
    """The ops of ``gm`` that make a value as large as the logits (views of one aside)."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"
            and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].numel() >= whole
            and str(n.target) not in _VIEWS]


def _note(plan, name: str) -> str:
    return next(r.note for r in plan.passes if r.name == name)


def test_a_fused_step_has_the_loss_read_the_returned_logits_where_the_whole_does_not_fit(tmp_path):
    """With fuse=True (sums reordered anyway) the loss reads the returned logits in blocks of
    rows once the whole program does not fit the budget: nothing else the size of the logits is
    made (no log-softmax, no gradient of either), no LM-head matmul is added; logits, loss and
    gradients close to eager's (gradients within 1e-5 of the largest: the slices sum in another
    order); saved, the plan re-applies to the same bits. Where the whole program fits, the loss stays whole: its slices' smaller matmuls
    would cost time and save nothing the budget asks for."""
    torch.manual_seed(0)
    model, (ids, labels) = _qwen2().train(), _batch()
    ref = copy.deepcopy(model)
    kwargs = {"input_ids": ids, "labels": labels}
    whole = ids.numel() * VOCAB
    assert "aten._log_softmax.default" in _whole_logit_ops(capture_joint(model, (), kwargs).gm, whole)
    joint = capture_joint(model, (), kwargs, shared_loss_heads=True).gm
    assert _whole_logit_ops(joint, whole) == ["aten.mm.default"]   # the kept linear, once
    want = ref(**kwargs)
    want.loss.backward()
    plain = _plan(model, (), 10**13, example_kwargs=kwargs).program.peak_bytes
    unlimited = _plan(model, (), 10**13, example_kwargs=kwargs, fuse=True)
    assert _note(unlimited, "loss_head") == ""   # fits whole: the loss stays whole
    tight = _plan(model, (), unlimited.program.peak_bytes - 1, example_kwargs=kwargs, fuse=True)
    assert "the loss reads the returned logits in slices" in _note(tight, "loss_head")
    budget = tight.program.peak_bytes
    assert budget < unlimited.program.peak_bytes <= plain
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, budget, example_kwargs=kwargs, train=True, device="cpu", hardware=FIXED_CPU,
                              fuse=True)
    try:
        got = cm(**kwargs)
        got.loss.backward()
        assert LOSS_HEAD not in {c.path for c in cm.plan.chunking}   # not the chunk pass's slices
        assert "the loss reads the returned logits in slices" in _note(cm.plan, "loss_head")
        assert cm.stats.peak_device_bytes <= budget and cm.plan.verify() <= budget
        torch.testing.assert_close(got.logits, want.logits)   # fused regions round differently
        torch.testing.assert_close(got.loss, want.loss)
        scale = max(p.grad.abs().max() for p in ref.parameters())
        for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-5 * scale, msg=name)
        # saved and re-applied: the file holds the program, not the choice; the re-capture that
        # pairs with it is the one whose loss reads the logits in slices
        grads = [q.grad.clone() for q in model.parameters()]
        model.zero_grad(set_to_none=True)
        cm.plan.save(tmp_path / "step.json")
        again = memsched.compile(model, plan=tmp_path / "step.json", train=True, device="cpu")
        try:
            out = again(**kwargs)
            out.loss.backward()
            assert torch.equal(out.loss, got.loss) and torch.equal(out.logits, got.logits)
            assert all(torch.equal(q.grad, g) for q, g in zip(model.parameters(), grads))
            assert again.stats.peak_device_bytes <= budget
        finally:
            again.close()
    finally:
        cm.close()


class _RandomHead(torch.nn.Module):
    """``returned``: the logits come back beside the loss (a shared head: the loss reads them)."""

    def __init__(self, hidden, vocab, bias, shift, reduction, ignore_index, returned=False):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, vocab, bias=bias)
        self.shift, self.reduction, self.ignore_index = shift, reduction, ignore_index
        self.returned = returned

    def forward(self, h, target):
        whole = logits = self.proj(h)
        if self.shift:
            logits, target = logits[:, :-1, :], target[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                               reduction=self.reduction, ignore_index=self.ignore_index)
        return (loss, whole) if self.returned else loss


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), seq=st.integers(2, 9), hidden=st.sampled_from([8, 16]),
       vocab=st.integers(3, 40), chunks=st.integers(2, 8), bias=st.booleans(), shift=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), ignored=st.floats(0, 0.9), returned=st.booleans())
def test_random_heads_rewrite_to_the_same_loss_and_gradients(batch, seq, hidden, vocab, chunks, bias, shift,
                                                             reduction, ignored, returned):
    """Any shape, chunk count (more chunks than rows too), reduction, bias, shift, share of
    ignored targets (at least one row kept: a mean over no rows is NaN both ways) and logits
    returned or not (read in blocks of rows of a shifted batch when returned)."""
    g = torch.Generator().manual_seed(batch * 1000 + seq * 10 + vocab)
    model = _RandomHead(hidden, vocab, bias, shift, reduction, -100, returned)
    h, target = torch.randn(batch, seq, hidden, generator=g), torch.randint(0, vocab, (batch, seq), generator=g)
    drop = torch.rand(batch, seq, generator=g) < ignored
    drop[:, -1] = False
    target[drop] = -100
    ep = export_model(model, (h, target))
    assert [h.shared for h in find_loss_heads(ep.graph_module)] == [returned]
    rewritten = chunk_loss_heads(ep.graph_module, chunks)
    results = []
    for gm in (ep.graph_module, rewritten):
        inputs = _flat_inputs(ep, model, (h, target))
        loss, *logits = gm(*inputs)
        loss.sum().backward()
        results.append([loss.detach(), *(x.detach() for x in logits)]
                       + [i.grad for i in inputs if isinstance(i, torch.Tensor) and i.requires_grad])
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want)
