"""The compiled module stands in for the model where code rebinds the name, as with
torch.compile: ``model = memsched.compile(model, ...)`` then ``model.parameters()`` for an
optimizer, ``model.config``, ``model.train()`` / ``model.eval()`` (which return the compiled
module, not the model) and ``model.forward`` runs the compiled module, while ``generate``,
which would run the model eagerly outside the budget, is refused naming what runs it inside."""
from __future__ import annotations

import copy
import inspect
import re
import warnings

import pytest
import torch
import transformers as T

import memsched
from helpers import FIXED_CPU

IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def _llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    return T.LlamaForCausalLM(cfg).train()


def _compile(model, budget, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return memsched.compile(model, budget, device="cpu", hardware=FIXED_CPU, **kw)


def test_a_rebound_model_trains_and_evaluates_as_eager():
    model = _llama()
    ref = copy.deepcopy(model)
    budget = memsched.plan(copy.deepcopy(model), (), budget=10**9, example_kwargs={"input_ids": IDS, "labels": IDS},
                           train=True, hardware=FIXED_CPU).min_budget_bytes
    model = _compile(model, budget, train=True)
    try:
        assert isinstance(model, memsched.CompiledModule)
        assert model.config.hidden_size == 64 and set(model.state_dict()) == set(ref.state_dict())
        opt, ref_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, ref))
        model = model.train()
        assert isinstance(model, memsched.CompiledModule) and model.training
        for _ in range(2):
            for m, o in ((model, opt), (ref, ref_opt)):
                o.zero_grad()
                m(input_ids=IDS, labels=IDS).loss.backward()
                o.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p, q)
        model = model.eval()
        ref.eval()
        assert isinstance(model, memsched.CompiledModule) and not model.training
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS).logits, ref(input_ids=IDS).logits)
            plans = model.plans_made
            assert torch.equal(model.forward(input_ids=IDS).logits, ref(input_ids=IDS).logits)
            assert model.plans_made == plans   # the compiled program ran, not the model
        assert inspect.signature(model.forward) == inspect.signature(ref.forward)
        assert model.stats.peak_device_bytes <= budget
    finally:
        model.close()


def test_generate_which_would_run_the_model_eagerly_is_refused():
    cm = _compile(_llama().eval(), "1MB")
    try:
        with pytest.raises(AttributeError, match="eagerly, outside the budget: memsched.generate"):
            cm.generate
        with pytest.raises(AttributeError, match="no attribute 'not_there'"):
            cm.not_there
    finally:
        cm.close()


class _Adapter(torch.nn.Module):
    """A LoRA-style adapter wrapped around a projection after the model was compiled."""

    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base = base
        self.down = torch.nn.Linear(base.in_features, 4, bias=False)
        self.up = torch.nn.Linear(4, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def _wrap_q(model):
    attn = model.model.layers[1].self_attn
    attn.q_proj = _Adapter(attn.q_proj)


CHANGES = {   # what a user may do to the model after compiling it -> what the warning names
    "an adapter wrapped in": (_wrap_q,
                              r"module 'model.layers.1.self_attn.q_proj' was replaced \(Linear then, _Adapter"),
    "an activation swapped": (lambda m: setattr(m.model.layers[0].mlp, "act_fn", torch.nn.ReLU()),
                              r"'model.layers.0.mlp.act_fn' was replaced \(SiLUActivation then, ReLU now\)"),
    "a forward hook": (lambda m: m.model.norm.register_forward_hook(lambda mod, i, o: o * 2),
                       r"a forward hook was registered on module 'model.norm'"),
    "a pre-hook": (lambda m: m.lm_head.register_forward_pre_hook(lambda mod, a: (a[0] * 2,)),
                   r"a forward pre hook was registered on module 'lm_head'"),
    "a library's pre-hook": (lambda m: torch.nn.utils.spectral_norm(m.lm_head),
                             r"a forward pre hook was registered on module 'lm_head'"),
    "a layer deleted": (lambda m: m.model.layers.__delitem__(1),
                        r"module 'model.layers.1' \(LlamaDecoderLayer\) was removed"),
    "a submodule put in eval": (lambda m: m.model.layers[0].eval(), None),   # (no dropout: same outputs)
}


@pytest.mark.parametrize("change", CHANGES)
def test_a_model_changed_after_compiling_is_planned_again(change):
    """A program is the model as it was traced: a submodule replaced, a hook registered or a
    layer deleted since must not leave the compiled module running the old model. The next call
    plans again (as torch.compile recompiles), saying what changed, and its outputs are eager's."""
    edit, said = CHANGES[change]
    model = _llama()   # in training mode, so that one submodule in eval differs
    cm = _compile(model, "2MB")
    try:
        with torch.no_grad():
            before = cm(input_ids=IDS).logits
            edit(model)
            ref = copy.deepcopy(model)   # (spectral norm's power iteration writes its buffers at each call)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                after = cm(input_ids=IDS).logits
            assert torch.equal(after, ref(input_ids=IDS).logits)
        assert torch.equal(after, before) == (change == "a submodule put in eval")
        assert cm.plans_made == 2
        replanned = [str(w.message) for w in caught if "planning it again" in str(w.message)]
        if said is None:   # not a change of the tree: another signature, planned as a new shape is
            assert not replanned, replanned
        else:
            assert len(replanned) == 1 and re.search(said, replanned[0]), replanned
    finally:
        cm.close()


def test_a_hook_removed_after_compiling_is_no_longer_run():
    model = _llama().eval()
    handle = model.model.norm.register_forward_hook(lambda mod, i, o: o * 2)
    cm = _compile(model, "2MB")
    try:
        with torch.no_grad():
            cm(input_ids=IDS)
            handle.remove()
            with pytest.warns(UserWarning, match="a forward hook was removed from module 'model.norm'"):
                assert torch.equal(cm(input_ids=IDS).logits, model(input_ids=IDS).logits)
            assert cm(input_ids=IDS) is not None and cm.plans_made == 2   # and not again
    finally:
        cm.close()


def test_a_config_setting_changed_after_compiling_is_planned_again():
    """A transformers forward reads its config as it runs: a setting changed since the trace
    (hidden states asked for, another attention implementation) plans again, naming it."""
    model = _llama().eval()
    cm = _compile(model, "2MB")
    try:
        with torch.no_grad():
            assert cm(input_ids=IDS).hidden_states is None
            model.config.output_hidden_states = True
            with pytest.warns(UserWarning, match=r"config.output_hidden_states changed \(False then, True now\)"):
                out = cm(input_ids=IDS)
            ref = model(input_ids=IDS)
            assert len(out.hidden_states) == len(ref.hidden_states) == 3
            for a, b in zip(out.hidden_states, ref.hidden_states):
                assert torch.equal(a, b)
            model.set_attn_implementation("eager")
            changed = r"config._attn_implementation\w* changed \('sdpa' then, 'eager' now\)"
            with pytest.warns(UserWarning, match=changed):
                torch.testing.assert_close(cm(input_ids=IDS).logits, model(input_ids=IDS).logits)
            assert cm.plans_made == 3
    finally:
        cm.close()


def test_converting_the_model_through_the_compiled_module_plans_again():
    """``cm = cm.to(torch.bfloat16)`` gives the model's tensors another dtype: the next call
    plans for the new ones, saying so (a conversion that changes nothing, ``cm.cpu()`` on the
    CPU, keeps the plans)."""
    model = _llama().eval()
    cm = _compile(model, "2MB")
    try:
        with torch.no_grad():
            cm(input_ids=IDS)
            cm = cm.cpu()
            cm(input_ids=IDS)
            assert cm.plans_made == 1
            cm = cm.to(torch.bfloat16)
            assert isinstance(cm, memsched.CompiledModule) and model.lm_head.weight.dtype == torch.bfloat16
            said = r"torch.float32 on cpu to .* torch.bfloat16 on cpu .*planning it again"
            with pytest.warns(UserWarning, match=said):
                out = cm(input_ids=IDS).logits
            assert out.dtype == torch.bfloat16 and torch.equal(out, model(input_ids=IDS).logits)
            assert cm.plans_made == 2
    finally:
        cm.close()


def test_converting_the_model_itself_plans_again():
    """A conversion done on the model, behind the compiled module's back (``model.to(bf16)``,
    a Parameter swapped for a larger one), is seen by the executor before the program runs
    anything: the call plans again, naming the tensor, and its outputs are eager's."""
    model = _llama().eval()
    cm = _compile(model, "2MB")
    try:
        with torch.no_grad():
            cm(input_ids=IDS)
            model.to(torch.bfloat16)
            with pytest.warns(UserWarning, match=r"model tensor '[\w.]+' changed from \[.*\] torch.float32 on cpu to "
                                                 r"\[.*\] torch.bfloat16 on cpu since the model was last planned"):
                out = cm(input_ids=IDS).logits
            assert out.dtype == torch.bfloat16 and torch.equal(out, model(input_ids=IDS).logits)
            # (a weight of one element, which the norm's product broadcasts)
            model.model.norm.weight = torch.nn.Parameter(torch.full((1,), 2.0, dtype=torch.bfloat16))
            said = r"'model.norm.weight' changed from \[64\] torch.bfloat16 on cpu to \[1\]"
            with pytest.warns(UserWarning, match=said):
                assert torch.equal(cm(input_ids=IDS).logits, model(input_ids=IDS).logits)
            assert cm.plans_made == 3
    finally:
        cm.close()


def test_a_parameter_swapped_for_training_plans_again():
    """The same for a training step: its gradients reach the Parameter the model has now."""
    model = _llama()
    cm = _compile(model, "4MB", train=True)
    try:
        cm(input_ids=IDS, labels=IDS).loss.backward()
        model.model.norm.weight = torch.nn.Parameter(torch.full((1,), 2.0))
        model.zero_grad()
        ref = copy.deepcopy(model)
        with pytest.warns(UserWarning, match=r"'model.norm.weight' changed from \[64\] torch.float32 on cpu to \[1\]"):
            cm(input_ids=IDS, labels=IDS).loss.backward()
        ref(input_ids=IDS, labels=IDS).loss.backward()
        assert model.model.norm.weight.grad.shape == (1,)
        for (name, p), q in zip(ref.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, msg=name)
        assert cm.plans_made == 2
    finally:
        cm.close()


def test_torch_compile_around_the_compiled_module_runs_it_as_one_call(capfd):
    """``torch.compile(cm)`` (or a compiled model calling it) leaves memsched's call opaque:
    tracing into it would trace memsched's runtime, not the model (and spilled torch's
    'Exception ignored' messages from the accounting's weak references)."""
    model = _llama().eval()
    cm = _compile(model, "2MB")
    try:
        with torch.no_grad():
            out = torch.compile(cm)(input_ids=IDS).logits
            assert torch.equal(out, model(input_ids=IDS).logits)
        assert cm.plans_made == 1
        assert "Exception ignored" not in capfd.readouterr().err
    finally:
        cm.close()


def test_many_input_shapes_are_said_once_at_the_callers_line():
    """A program is planned per input shape: sizes that change call after call plan at nearly
    every call. The eighth shape warns once, at the user's line (not inside memsched or the
    torch.compiler.disable wrapper its call passes through), saying to bucket the sizes."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16)).eval()
    cm = _compile(model, "64KB")
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            for rows in [*range(1, 11), 3]:
                assert torch.equal(cm(torch.ones(rows, 16)), model(torch.ones(rows, 16)))
        said = [w for w in caught if "input shapes planned" in str(w.message)]
        assert len(said) == 1 and said[0].filename == __file__, [(w.filename, str(w.message)) for w in caught]
        assert "8 input shapes planned so far" in str(said[0].message) and "bucket" in str(said[0].message)
        assert cm.plans_made == 10
    finally:
        cm.close()


def test_a_compiled_module_prints_what_it_runs():
    """``cm`` in a notebook says the model, budget, device, what it runs and its plans, not an
    object address."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    cm = memsched.compile(model, "1GiB", device="cpu", hardware=FIXED_CPU)
    assert repr(cm) == "CompiledModule(Sequential, budget 1.0 GiB, device cpu, inference, plans: 0 held, 0 made)"
    with torch.no_grad():
        cm(torch.randn(2, 16))
        cm(torch.randn(3, 16))
    assert str(cm).endswith("inference, plans: 2 held, 2 made)")
    cm.close()
    assert repr(memsched.compile(model, "1GiB", device="cpu", hardware=FIXED_CPU, train=True)).endswith(
        "training step, plans: 0 held, 0 made)")
