"""Chunked ops (passes/chunking.py, pipeline.chunk_pass): below the minimum a plan can reach,
the modules that keep their input's rows apart and make wider values inside are run on slices
of their input, which lowers the floor; the outputs and gradients match eager."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
import transformers as T

import memsched
from memsched.errors import PlanFileError
from memsched.io.reapply import PlanMismatchError
from memsched.frontend.capture import capture
from memsched.passes.chunking import LOSS_HEAD, Chunking, chunked, splittable_modules
from helpers import FIXED_CPU


def _llama(intermediate=1024, layers=2):
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    return T.LlamaForCausalLM(cfg), torch.randint(0, 128, (2, 64))


def _gpt2(dropout, seq=32, inner=None):
    torch.manual_seed(0)
    cfg = T.GPT2Config(n_layer=2, n_embd=64, n_inner=inner, n_head=4, vocab_size=128, n_positions=seq,
                       use_cache=False, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    return T.GPT2LMHeadModel(cfg), torch.randint(0, 128, (2, seq))


def _plan(model, kwargs, budget, train=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.plan(model, (), budget, example_kwargs=kwargs, train=train, hardware=FIXED_CPU)


def _minimum(model, kwargs, train=False) -> int:
    return _plan(model, kwargs, 10**13, train).min_budget_bytes


# -- which modules split ------------------------------------------------------------------------
def test_the_mlps_split_and_nothing_that_mixes_rows():
    model, ids = _llama()
    found = splittable_modules(model, capture(model.eval(), (ids,)))
    assert [r.path for r in found] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    r = found[0]
    assert r.dims == (2, 64)
    assert r.dim_for(2) == 0 and r.dim_for(4) == 1    # the batch while it has the rows, then the sequence
    assert r.inner_bytes == 2 * 64 * 1024 * 4 and r.edge_bytes == 2 * 64 * 64 * 4


def test_a_layer_stack_captured_by_repeats_splits_every_layer():
    model, ids = _llama(intermediate=512, layers=9)
    from memsched.frontend.repeats import capture_repeated

    captured, how = capture_repeated(model.eval(), lambda m: capture(m, (ids,)))
    assert "repeated" in how
    assert [r.path for r in splittable_modules(model, captured)] == [f"model.layers.{i}.mlp" for i in range(9)]


class _Wide(torch.nn.Module):
    """Up to 128 features and back: wider inside than at its edges. ``mix`` is what it does
    in between."""

    def __init__(self, mix):
        super().__init__()
        self.up, self.down, self.mix = torch.nn.Linear(16, 128), torch.nn.Linear(128, 16), mix

    def forward(self, x):
        return self.down(self.mix(self.up(x)))


_BLOCKS = {  # what the middle does -> the input's row dims (batch 2, sequence 8) it keeps apart
    "running sum over the sequence": (lambda h: torch.cumsum(h, dim=1), (2,)),
    "normalised over the sequence": (lambda h: h - h.mean(dim=1, keepdim=True), (2,)),
    "softmax and norm over features": (lambda h: torch.softmax(h, -1) * h.pow(2).mean(-1, keepdim=True).rsqrt(), (2, 8)),
    "scaled by its own first feature": (lambda h: h * h[..., :1], (2, 8)),
    "scaled by the fourth token": (lambda h: h * h[:, 3:4], (2,)),
    "scaled by the first sequence's tokens": (lambda h: h * h[:1], None),
    "minus the max over everything": (lambda h: h - h.amax(), None),
    "shifted along the sequence": (lambda h: torch.cat([h[:, :1], h[:, :-1]], 1), (2,)),
    "shifted along the batch": (lambda h: torch.cat([h[:1], h[:-1]], 0), None),
    "sequence and batch swapped": (lambda h: h.transpose(0, 1).contiguous().transpose(0, 1), None),
    "plus a learned per-token bias": (lambda h: h + torch.ones(8, 1), (2,)),
    "plus a learned per-feature bias": (lambda h: h + torch.ones(1, 1, 128), (2, 8)),
    "written into a fresh buffer": (lambda h: torch.zeros(2, 8, 128).add_(h) * 2, None),
    # each batch row's tokens merged into dim 0 after the sequence is mixed: a block per row
    "tokens merged into the batch": (lambda h: torch.cumsum(h, 1).reshape(16, 128).softmax(-1).reshape(2, 8, 128),
                                     (2,)),
    "rolled along the sequence": (lambda h: torch.roll(h, 3, 1), (2,)),
    "normalised per token (a norm, expanded back)": (lambda h: torch.nn.functional.normalize(h, dim=-1), (2, 8)),
    "normalised over the sequence": (lambda h: torch.nn.functional.normalize(h, dim=1), (2,)),
    # a per-token table expanded over the batch and merged into it repeats within each row's
    # block (a Swin window mask); one that differs from block to block does not
    "merged, plus a table repeated per row": (
        lambda h: (torch.cumsum(h, 1).reshape(16, 128)
                   + torch.arange(1024.0).view(1, 8, 128).expand(2, 8, 128).reshape(16, 128)).view(2, 8, 128), (2,)),
    "merged, plus a table over every row": (
        lambda h: (torch.cumsum(h, 1).reshape(16, 128) + torch.arange(2048.0).view(16, 128)).view(2, 8, 128), None),
}


class _Holder(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x) + 1


@pytest.mark.parametrize("what", list(_BLOCKS))
def test_row_mixing_is_found_by_its_ops(what):
    """An op that mixes some row dims narrows the split to the dims before them (a running sum
    over the sequence can still run batch row by batch row); one that mixes them all, or
    reads one row from another, leaves the module whole."""
    mix, dims = _BLOCKS[what]
    model = _Holder(_Wide(mix)).eval()
    found = splittable_modules(model, capture(model, (torch.randn(2, 8, 16),)))
    assert (found[0].dims if found else None) == dims


def test_dropout_is_never_split_in_training():
    """Random ops would draw their numbers in another order on slices: such a module stays whole.
    (GPT-2's blocks keep their rows apart: with no mask given, attention is SDPA's causal path,
    and the position ids they are handed are one row for all.)"""
    model, ids = _gpt2(dropout=0.1)
    assert splittable_modules(model.train(), capture(model.train(), (ids,))) == []
    assert [r.path for r in splittable_modules(model.eval(), capture(model.eval(), (ids,)))] == \
        ["transformer.h.0", "transformer.h.1"]
    model, ids = _gpt2(dropout=0.0)   # dropout with p = 0 draws nothing that matters: it splits
    assert [r.path for r in splittable_modules(model.train(), capture(model.train(), (ids,)))] == \
        ["transformer.h.0", "transformer.h.1"]


def test_the_model_is_given_back_unpatched_even_on_error():
    model, ids = _llama()
    plan = [Chunking("model.layers.0.mlp", 1, 4)]
    with pytest.raises(RuntimeError):
        with chunked(model, plan):
            assert "forward" in vars(model.model.layers[0].mlp)
            raise RuntimeError("boom")
    assert "forward" not in vars(model.model.layers[0].mlp)


# -- planning and running -----------------------------------------------------------------------
def test_no_split_when_the_budget_fits_without():
    model, ids = _llama()
    plan = _plan(model, {"input_ids": ids}, 10**13)
    assert plan.chunking == ()
    assert next(r.note for r in plan.passes if r.name == "chunk") == ""
    # the minimum it reports is with every module whole, and the summary says a split goes lower
    assert "every module whole; below it, modules are split" in plan.summary()


def test_inference_below_the_unsplit_minimum_equals_eager():
    model, ids = _llama()
    ref = copy.deepcopy(model)
    unsplit = _minimum(model, {"input_ids": ids})
    budget = int(0.6 * unsplit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU)
    try:
        out = cm(input_ids=ids).logits
        assert cm.plan.chunking and all(c.chunks >= 2 for c in cm.plan.chunking)
        assert "split" in next(r.note for r in cm.plan.passes if r.name == "chunk")
        assert "(with the modules split as below)" in cm.plan.summary()
        # slicing the rows changes no sum in a forward: bit-equal on this CPU's matmul
        torch.testing.assert_close(out, ref(input_ids=ids).logits, rtol=0, atol=0)
        assert cm.stats.peak_device_bytes <= budget
        assert cm.plan.verify() <= budget
    finally:
        cm.close()
    assert "forward" not in vars(model.model.layers[0].mlp)


# (the GPT-2 with activations wider than its weights: a weight's gradient is summed over the
# slices, so where the weights are as large as the activations a split gains nothing)
@pytest.mark.parametrize("build", [_llama, lambda: _gpt2(dropout=0.0, seq=128, inner=512)], ids=["llama", "gpt2"])
def test_training_below_the_unsplit_minimum_matches_eager(build):
    model, ids = build()
    model.train()
    kwargs = {"input_ids": ids, "labels": ids}
    ref = copy.deepcopy(model)
    budget = int(0.6 * _minimum(model, kwargs, train=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, budget, train=True, device="cpu", hardware=FIXED_CPU)
    try:
        got = cm(**kwargs)
        got.loss.backward()
        expected = ref(**kwargs)
        expected.loss.backward()
        loss, want = got.loss, expected.loss
        assert cm.plan.chunking
        assert cm.stats.peak_device_bytes <= budget
        # the logits come from the whole LM head as in eager; the loss, where it runs in slices
        # of rows (the logits are returned, so only the loss is split), sums them in another order
        torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=0)
        exact = {} if LOSS_HEAD in {c.path for c in cm.plan.chunking} else {"rtol": 0, "atol": 0}
        torch.testing.assert_close(loss, want, **exact)
        # a weight's gradient sums the slices' partial products in another order: close, not equal
        for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
    finally:
        cm.close()


def test_the_minimum_reported_counts_the_split():
    model, ids = _llama(layers=1)
    unsplit = _minimum(model, {"input_ids": ids})
    with pytest.raises(memsched.InfeasibleBudgetError) as err:
        _plan(model, {"input_ids": ids}, 1000)
    assert err.value.min_budget_bytes < 0.5 * unsplit
    plan = _plan(model, {"input_ids": ids}, err.value.min_budget_bytes)   # and that minimum plans
    assert plan.peak_device_bytes <= err.value.min_budget_bytes


@pytest.mark.parametrize("build", [lambda: (lambda m, ids: (m, {"input_ids": ids}))(*_llama()),
                                   lambda: (lambda m, x: (m, {"pixel_values": x}))(*_vit())], ids=["llama", "vit"])
def test_a_saved_split_plan_reapplies(tmp_path, build):
    model, kwargs = build()
    model.eval()
    budget = int(0.6 * _minimum(model, kwargs))
    plan = _plan(model, kwargs, budget)
    assert plan.chunking
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = memsched.Plan.load(path)
    assert loaded.chunking == plan.chunking
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU, plan=loaded)
    try:
        torch.testing.assert_close(cm(**kwargs).logits, model(**kwargs).logits, rtol=0, atol=0)
    finally:
        cm.close()


def test_a_plan_file_splitting_a_missing_module_is_refused(tmp_path):
    import json

    model, ids = _llama()
    plan = _plan(model, {"input_ids": ids}, int(0.6 * _minimum(model, {"input_ids": ids})))
    path = tmp_path / "plan.json"
    plan.save(path)
    doc = json.loads(path.read_text())
    doc["chunking"][0]["path"] = "model.layers.7.mlp"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanMismatchError, match="no such module"):
        memsched.compile(model, plan.budget_bytes, device="cpu", hardware=FIXED_CPU, plan=memsched.Plan.load(path))(
            input_ids=ids)
    doc["chunking"][0]["path"] = "_modules"
    path.write_text(json.dumps(doc))
    with pytest.raises(PlanFileError, match="chunking"):
        memsched.Plan.load(path)


# -- random feed-forward stacks, random budgets ---------------------------------------------------
class _FeedForward(torch.nn.Module):
    def __init__(self, hidden, wide, act):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.up, self.down, self.act = torch.nn.Linear(hidden, wide), torch.nn.Linear(wide, hidden), act

    def forward(self, x):
        return self.down(self.act(self.up(self.norm(x))))


class _Stack(torch.nn.Module):
    def __init__(self, hidden, wide, act, depth):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_FeedForward(hidden, wide, act) for _ in range(depth))
        self.head = torch.nn.Linear(hidden, 4)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


_ACTS = {"gelu": torch.nn.GELU(), "silu": torch.nn.SiLU(), "relu": torch.nn.ReLU(), "tanh-gelu": torch.nn.GELU("tanh")}


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 3), seq=st.integers(8, 40), wide=st.sampled_from([64, 128, 256]),
       act=st.sampled_from(sorted(_ACTS)), depth=st.integers(1, 3), train=st.booleans(),
       frac=st.floats(0.2, 0.95))
def test_random_stacks_split_to_any_budget_they_can(batch, seq, wide, act, depth, train, frac):
    """Below the unsplit minimum, a plan either splits the feed-forward blocks and matches eager
    within the budget, or says the least budget that works -- and that budget plans."""
    torch.manual_seed(0)
    model = _Stack(16, wide, _ACTS[act], depth).train(train)
    x = torch.randn(batch, seq, 16)
    plan_kw = dict(example_inputs=(x,), train=train, hardware=FIXED_CPU)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unsplit = memsched.plan(model, budget=10**13, **plan_kw).min_budget_bytes
        budget = max(int(frac * unsplit), 1)
        try:
            memsched.plan(model, budget=budget, **plan_kw)
        except memsched.InfeasibleBudgetError as e:
            assert budget < e.min_budget_bytes <= unsplit
            budget = e.min_budget_bytes
        ref = copy.deepcopy(model)
        cm = memsched.compile(model, budget, train=train, device="cpu", hardware=FIXED_CPU)
    try:
        if train:
            cm(x).square().mean().backward()
            ref(x).square().mean().backward()
            for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
                torch.testing.assert_close(q.grad, p.grad, msg=name)
        else:
            with torch.no_grad():
                torch.testing.assert_close(cm(x), ref(x))
        assert cm.stats.peak_device_bytes <= budget
        assert cm.plan.verify() <= budget
        if budget < unsplit:
            assert cm.plan.chunking, "a budget below the unsplit minimum planned without a split"
        event(f"split in {max(c.chunks for c in cm.plan.chunking)}" if cm.plan.chunking else "whole")
    finally:
        cm.close()
    assert all("forward" not in vars(b) for b in model.blocks)


def test_no_split_is_tried_when_the_minimum_binds_outside_the_modules():
    """A wide vocabulary and a narrow MLP: the LM head sets the minimum, which no split of the
    MLPs can lower, so none is captured (the pass says why)."""
    from memsched import pipeline as P

    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             use_cache=False)).eval()
    s = P.PlanningState(1, FIXED_CPU, P.DEFAULT_MAX_SEGMENTS, 2.0, model=model,
                        kwargs={"input_ids": torch.randint(0, 4096, (2, 64))})
    for run in (P.capture_pass, P.analysis_pass, P.segments_pass):
        run(s)
    captured = s.captured
    note = P.chunk_pass(s)
    assert "binds outside" in note and "linear" in note
    assert s.captured is captured and s.chunking == []


# -- the whole model on micro-batches: convolutions, pooling, attention keep the batch apart --------
def _resnet():
    torch.manual_seed(0)
    cfg = T.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64], depths=[1, 1], layer_type="bottleneck")
    return T.ResNetForImageClassification(cfg), torch.randn(8, 3, 64, 64)


def _convnext():
    torch.manual_seed(0)
    cfg = T.ConvNextConfig(hidden_sizes=[32, 64], depths=[1, 1], num_stages=2, image_size=64)
    return T.ConvNextForImageClassification(cfg), torch.randn(8, 3, 64, 64)


def _swin():
    torch.manual_seed(0)
    cfg = T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2], num_heads=[2], window_size=4,
                       drop_path_rate=0.0)
    return T.SwinForImageClassification(cfg), torch.randn(4, 3, 32, 32)


def _vit(dropout=0.0):
    torch.manual_seed(0)
    cfg = T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                      image_size=32, patch_size=4, attention_probs_dropout_prob=dropout)
    return T.ViTForImageClassification(cfg), torch.randn(8, 3, 32, 32)


def test_a_cnn_in_eval_splits_as_a_whole_and_in_training_not():
    """Batch norm with running statistics is per channel; with batch statistics it mixes the
    batch, so a CNN in training mode keeps its batch whole."""
    model, x = _resnet()
    found = splittable_modules(model.eval(), capture(model.eval(), (x,)))
    assert [(r.path, r.dims) for r in found] == [("", (8,))]
    from memsched.frontend.joint import capture_joint

    assert splittable_modules(model.train(), capture_joint(model.train(), (x,))) == []


def test_attention_with_dropout_is_not_split():
    model, x = _vit(dropout=0.1)
    from memsched.frontend.joint import capture_joint

    found = splittable_modules(model.train(), capture_joint(model.train(), (x,)))
    assert found and all(r.path != "" for r in found)   # its MLPs still split


def test_windowed_attention_keeps_the_batch_apart():
    """Swin merges each image's windows into the batch and adds a per-window mask expanded over
    the images: every image still owns a block of windows, and the mask repeats per block, so
    the model and each of its (shifted) window blocks split along the batch."""
    model, x = _swin()
    found = {r.path: r.dims for r in splittable_modules(model.eval(), capture(model.eval(), (x,)))}
    assert found[""] == (4,)
    assert model.swin.encoder.layers[0].blocks[1].shift_size > 0
    from memsched.passes.chunking import _module_groups, forward_graph, row_local

    gm, state = forward_graph(capture(model, (x,)))
    groups = _module_groups(gm)
    for block in ("swin.encoder.layers.0.blocks.0", "swin.encoder.layers.0.blocks.1"):   # plain, shifted
        assert row_local(block, groups[block], state).dims == (4,)


@pytest.mark.parametrize("build", [_resnet, _convnext, _vit, _swin], ids=["resnet", "convnext", "vit", "swin"])
def test_a_vision_model_below_its_unsplit_minimum_runs_on_micro_batches(build):
    """Below the minimum without a split, the model runs on slices of its batch: its output
    object is put back together. No sum crosses the batch, yet a convolution on a slice may
    pick another kernel blocking (oneDNN chooses by shape): close, and bit-equal for the ViT."""
    model, x = build()
    model.eval()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unsplit = memsched.plan(model, (x,), 10**13, hardware=FIXED_CPU, chunk_ops=False).min_budget_bytes
        budget = int(0.6 * unsplit)
        cm = memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU)
    try:
        out = cm(x)
        assert type(out) is type(ref(x))
        assert any(c.path == "" and c.chunks >= 2 for c in cm.plan.chunking)
        exact = {"rtol": 0, "atol": 0} if build is _vit else {}
        torch.testing.assert_close(out.logits, ref(x).logits, **exact)
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()
    assert "forward" not in vars(model)


def test_a_model_called_with_its_input_by_name_splits_too():
    model, x = _vit()
    model.eval()
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = memsched.plan(model, (), 10**13, hardware=FIXED_CPU, example_kwargs={"pixel_values": x})
        budget = int(0.6 * plan.min_budget_bytes)
        cm = memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU)
    try:
        out = cm(pixel_values=x).logits
        assert any(c.path == "" for c in cm.plan.chunking)
        torch.testing.assert_close(out, ref(pixel_values=x).logits, rtol=0, atol=0)
    finally:
        cm.close()


def test_a_model_returning_two_values_splits_and_returns_both():
    """A base model returns its last hidden state and a pooled output: both carry the batch,
    both are put back together from the slices (close to eager: its MLPs are split too, and a
    matmul of fewer rows may sum in another order)."""
    torch.manual_seed(0)
    cfg = T.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                         patch_size=4, mlp_ratio=4)
    model, x = T.Dinov2Model(cfg).eval(), torch.randn(4, 3, 32, 32)
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unsplit = memsched.plan(model, (x,), 10**13, hardware=FIXED_CPU).min_budget_bytes
        budget = int(0.5 * unsplit)
        cm = memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU)
    try:
        out, want = cm(x), ref(x)
        assert any(c.path == "" for c in cm.plan.chunking)
        torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state)
        torch.testing.assert_close(out.pooler_output, want.pooler_output)
        assert cm.stats.peak_device_bytes <= budget
    finally:
        cm.close()


def test_below_the_split_minimum_the_error_says_it_already_splits():
    """The minimum an infeasible budget reports is the split program's, below what a plan with
    every module whole reports: the message says which modules it already runs on slices."""
    model, x = _resnet()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = memsched.plan(model, (x,), 10**13, hardware=FIXED_CPU).min_budget_bytes
        with pytest.raises(memsched.InfeasibleBudgetError) as err:
            memsched.plan(model, (x,), 1, hardware=FIXED_CPU)
    assert err.value.min_budget_bytes < whole
    assert "already runs 1 module(s) on slices of their input (the whole model x" in str(err.value)


def test_inside_a_split_model_a_module_splits_along_the_rows_past_the_model():
    """A ViT split into micro-batches of one image: its MLPs, whose rows are (batch, tokens),
    split along the tokens, never into empty slices of the batch."""
    from memsched.passes.chunking import chunkings

    model, x = _vit()
    model.eval()
    found = splittable_modules(model, capture(model, (x,)))
    assert found[0].path == "" and found[0].dims == (8,)
    plan = chunkings(found, 8)
    assert plan[0] == Chunking("", 0, 8)
    assert all(c.dim == 1 for c in plan[1:]) and len(plan) == 3
