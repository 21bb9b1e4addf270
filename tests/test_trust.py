"""Trust: a compiled module never serves stale weights, never drops gradients silently, and
stays right when called or planned from several threads at once.

Weights are changed after compile in every way PyTorch allows: in place through ``.data``
(no version bump: caught by the checksums of memsched's copies), replaced
(``p.data = ...``, ``load_state_dict(..., assign=True)``), copied in (``load_state_dict``) and
stepped by an optimizer; after each change the compiled outputs equal eager bit for bit, with
the weights homed on disk, on host, or read in place on the device.
"""
from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch

import memsched
from memsched.errors import CaptureError
from helpers import FIXED_CPU, assert_outputs_equal, eager
from train_zoo import build_train

CPU = FIXED_CPU
HOMES = {
    "disk": CPU.replace(host_bytes=0),         # at the minimum budget every weight lives on disk
    "host": CPU.replace(host_bytes=10**9),     # ... or in the host tier
    "device": CPU.replace(host_bytes=0),       # a roomy budget: the model's own tensors are read
}


def _tiny(seed=0, width=64):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width),
                               torch.nn.ReLU(), torch.nn.Linear(width, 8)).eval()


def _min_budget(model, x, hw):
    try:
        memsched.plan(model, (x,), budget=1, hardware=hw)
    except memsched.InfeasibleBudgetError as exc:
        return exc.min_budget_bytes
    raise AssertionError("a 1-byte budget was accepted")


def _compiled(home, model, x):
    hw = HOMES[home]
    budget = 10**9 if home == "device" else _min_budget(model, x, hw)
    cm = memsched.compile(model, budget, device="cpu", hardware=hw)
    with torch.no_grad():
        cm(x)
    tiers = cm.plan.tier_bytes()
    assert tiers[home] > 0 and sum(v for k, v in tiers.items() if k != home) == 0, tiers
    return cm


def _check(cm, model, x, what):
    with torch.no_grad():
        assert_outputs_equal(cm(x), eager(model, (x,), {})), what


def _changes(model):
    """Each change to the model's weights after compile, as (name, function)."""
    lin = model[0]

    def data_inplace():
        for p in model.parameters():
            p.data.mul_(0.5)                         # no version bump

    def data_copy_one_element():
        lin.weight.data[3, 5] = 7.0                  # one element, no version bump

    def data_assign():
        lin.weight.data = torch.randn_like(lin.weight)   # new storage, same Parameter

    def data_assign_strided():
        w = torch.randn(lin.weight.shape[::-1]).t()      # same shape, other strides
        lin.weight.data = w

    def assign_state_dict():
        new = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
        model.load_state_dict(new, assign=True)      # new Parameter objects

    def copy_state_dict():
        model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})

    def optimizer_steps():
        model.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(3, lin.in_features)).square().mean().backward()
            opt.step()
        model.requires_grad_(False)

    def no_grad_inplace():
        with torch.no_grad():
            model[2].bias.add_(1.0)                  # a version bump

    return [data_inplace, data_copy_one_element, data_assign, data_assign_strided, assign_state_dict,
            copy_state_dict, optimizer_steps, no_grad_inplace]


@pytest.mark.parametrize("home", list(HOMES))
def test_changed_weights_are_never_stale(home):
    model = _tiny()
    x = torch.randn(4, 64)
    cm = _compiled(home, model, x)
    try:
        for change in _changes(model):
            change()
            _check(cm, model, x, change.__name__)
            _check(cm, model, x, change.__name__ + " (again)")
    finally:
        cm.close()


@pytest.mark.parametrize("home", ["disk", "host"])
def test_changes_are_caught_when_the_checksums_run_on_threads(home, monkeypatch):
    """The weights' checksums of a call run on a few threads when there are many bytes: forced
    here for a small model, every change is still seen."""
    from memsched.runtime import stores

    monkeypatch.setattr(stores, "_PARALLEL_BYTES", 0)
    test_changed_weights_are_never_stale(home)


def test_threaded_fingerprints_equal_one_by_one():
    from memsched.runtime.stores import Layout, fingerprint, fingerprints

    torch.manual_seed(0)
    dense = [torch.randn(1 << 20) for _ in range(5)]
    strided = torch.randn(512, 2048).t()          # read in a dense layout of its own
    items = [(t, None) for t in dense] + [(strided, Layout.of(strided)), (strided, None)]
    assert fingerprints(items) == [fingerprint(t, layout) for t, layout in items]
    assert len(set(fingerprints(items[:5]))) == 5


def test_every_signature_sees_the_change():
    """Two signatures share one disk home per weight: a change reaches both."""
    model = _tiny()
    xs = [torch.randn(4, 64), torch.randn(7, 64)]
    hw = HOMES["disk"]
    cm = memsched.compile(model, _min_budget(model, xs[1], hw), device="cpu", hardware=hw)
    try:
        for x in xs:
            _check(cm, model, x, "first")
        disk = cm._stores._disk
        weight_bytes = sum(-(-p.numel() * 4 // 4096) * 4096 for p in model.parameters())
        assert disk.bytes_in_use == weight_bytes  # each weight written once, not once per signature
        for change in _changes(model)[:3]:
            change()
            for x in xs:
                _check(cm, model, x, change.__name__)
    finally:
        cm.close()


@pytest.mark.parametrize("home", ["disk", "device"])
def test_a_shape_change_plans_again(home):
    """A weight given another shape behind the compiled module's back is seen before the
    program runs anything: the next call plans again, saying so (here eager fails too, and so
    does the capture, naming the shapes); back to the planned shape, outputs are eager's."""
    model = _tiny()
    x = torch.randn(4, 64)
    cm = _compiled(home, model, x)
    model[2].weight.data = torch.randn(64, 32)
    with pytest.warns(UserWarning, match=r"'2\.weight' changed from \[64, 64\].* to \[64, 32\].*planning it again"):
        with pytest.raises(CaptureError, match=r"\[32, 64\]"):
            with torch.no_grad():
                cm(x)
    model[2].weight.data = torch.randn(64, 64)  # back to the planned shape: fine again
    _check(cm, model, x, "restored")
    cm.close()


def test_training_after_assigned_state_dict():
    """Gradients reach the Parameter objects the model has now, and the new values are used."""
    model, args, kwargs, loss_fn = build_train("mlp")
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p0 = memsched.plan(model, args, budget=10**13, example_kwargs=kwargs, train=True, hardware=HOMES["disk"])
        cm = memsched.compile(model, p0.min_budget_bytes, train=True, device="cpu", hardware=HOMES["disk"],
                              time_limit_s=3.0)
    try:
        for step in range(3):
            new = {k: torch.randn_like(v) for k, v in ref.state_dict().items()}
            ref.load_state_dict(new)
            model.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)
            for m in (ref, cm):
                for p in (ref if m is ref else model).parameters():
                    p.grad = None
                loss = loss_fn(m(*args, **kwargs))
                loss.backward()
            for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
                assert q.grad is not None, f"step {step}: {name} got no gradient"
                assert torch.equal(q.grad, p.grad), f"step {step}: {name}"
    finally:
        cm.close()


# -- gradients never dropped silently -----------------------------------------------------------
def test_inference_module_refuses_inputs_requiring_grad():
    model = _tiny()
    cm = memsched.compile(model, "1GB", device="cpu")
    x = torch.randn(4, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"args\[0\].*train=True.*no_grad"):
        cm(x)
    with torch.no_grad():
        assert_outputs_equal(cm(x), eager(model, (x,), {}))
    assert_outputs_equal(cm(x.detach()), eager(model, (x,), {}))
    with pytest.raises(RuntimeError, match=r"kwargs\['input'\]"):
        memsched.compile(_Kw(), "1GB", device="cpu")(input=x)
    cm.close()


class _Kw(torch.nn.Module):
    def forward(self, input):
        return input * 2


# -- threads ------------------------------------------------------------------------------------
def _run_threads(*targets):
    errors = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
        return run

    threads = [threading.Thread(target=guard(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_two_threads_call_one_module():
    model = _tiny()
    hw = HOMES["disk"]
    inputs = {4: [torch.randn(4, 64) for _ in range(10)], 6: [torch.randn(6, 64) for _ in range(10)]}
    refs = {b: [eager(model, (x,), {}) for x in xs] for b, xs in inputs.items()}
    cm = memsched.compile(model, _min_budget(model, inputs[6][0], hw), device="cpu", hardware=hw)
    results = {b: [] for b in inputs}
    barrier = threading.Barrier(2)

    def caller(batch):
        def run():
            barrier.wait()
            with torch.no_grad():
                for x in inputs[batch]:
                    results[batch].append(cm(x))
        return run

    _run_threads(caller(4), caller(6))
    for b in inputs:
        assert len(results[b]) == 10
        for out, ref in zip(results[b], refs[b]):
            assert_outputs_equal(out, ref)
    assert cm.stats.peak_device_bytes <= cm.budget_bytes
    cm.close()


def test_two_threads_plan_two_modules():
    models = [_tiny(seed=1), _tiny(seed=2, width=48)]
    xs = [torch.randn(5, 64), torch.randn(3, 48)]
    cms = [memsched.compile(m, "1GB", device="cpu") for m in models]
    outs = [None, None]
    barrier = threading.Barrier(2)

    def planner(i):
        def run():
            barrier.wait()
            with torch.no_grad():
                outs[i] = cms[i](xs[i])
            memsched.plan(models[i], (xs[i],), budget="1GB")
        return run

    _run_threads(planner(0), planner(1))
    for m, x, out, cm in zip(models, xs, outs, cms):
        assert_outputs_equal(out, eager(m, (x,), {}))
        cm.close()


@pytest.mark.parametrize("home", ["disk", "host"])
def test_inside_unchanged_weights_a_call_skips_the_checksums_and_sees_version_bumps(home, monkeypatch):
    """``cm.unchanged_weights()``: no checksum of any copy per call, yet a change PyTorch's
    version counter sees (an in-place op, an optimizer step) still reaches the output."""
    from memsched.runtime import executor, stores

    model = _tiny()
    x = torch.randn(4, 64)
    cm = _compiled(home, model, x)
    hashed = []
    for mod in (executor, stores):
        real = mod.fingerprints if hasattr(mod, "fingerprints") else None
        if real is not None:
            monkeypatch.setattr(mod, "fingerprints", lambda items, _r=real: (hashed.extend(items), _r(items))[1])
    try:
        with cm.unchanged_weights():
            _check(cm, model, x, "unchanged")
            assert not hashed
            with torch.no_grad():
                model[2].bias.add_(1.0)                  # a version bump
            _check(cm, model, x, "version bump")
            assert not hashed
        _check(cm, model, x, "after the block")
        # outside it, every copy is checksummed again (on a CPU a host-tier weight is the
        # model's own tensor, read in place: nothing to checksum)
        assert bool(hashed) == (home == "disk")
    finally:
        cm.close()


def test_threaded_fingerprints_work_in_a_forked_child():
    """A child forked after the checksum threads started has none of them: it starts its own
    instead of waiting forever on the parent's."""
    import multiprocessing

    from memsched.runtime.stores import fingerprint, fingerprints

    items = [(torch.full((1 << 21,), float(i)), None) for i in range(4)]   # 32 MiB: threaded
    want = fingerprints(items)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        got = pool.apply_async(fingerprints, (items,)).get(timeout=60)
    assert got == want == [fingerprint(t) for t, _ in items]


_INHERITED: dict = {}   # what a forked child finds in its copy of this module


def _call_in_child():
    try:
        with torch.no_grad():
            _INHERITED["cm"](_INHERITED["x"])
    except RuntimeError as exc:
        return str(exc)
    return "ran"


def test_a_forked_child_calling_the_parents_module_gets_a_clear_error():
    """A child forked after compile shares the parent's offload file and has none of its worker
    threads: a call there is refused at once instead of hanging or writing the parent's file."""
    import multiprocessing

    model = _tiny()
    x = torch.randn(4, 64)
    cm = _compiled("disk", model, x)
    _INHERITED.update(cm=cm, x=x)
    try:
        with multiprocessing.get_context("fork").Pool(1) as pool:
            said = pool.apply_async(_call_in_child).get(timeout=60)
        assert "compiled in another process" in said, said
        _check(cm, model, x, "the parent's module still runs")
    finally:
        _INHERITED.clear()
        cm.close()


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_one_tensor_passed_twice_and_two_tensors_get_their_own_programs(train):
    """``model(input_ids=ids, labels=ids)`` is one value to torch.export, so the program traced
    from it reads that value for both: a later call with two tensors of the same shapes gets its
    own program, as a call with one tensor twice after two did (the second read the labels as
    the input ids before, silently)."""
    import transformers as T

    cfg = T.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).train(train)
    ref = copy.deepcopy(model)
    ids, other, labels = (torch.randint(0, 64, (1, 8)) for _ in range(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = memsched.compile(model, 10**8, device="cpu", hardware=CPU, train=train)
    try:
        with torch.set_grad_enabled(train):
            for kwargs in ({"input_ids": ids, "labels": ids}, {"input_ids": other, "labels": labels},
                           {"input_ids": labels, "labels": labels}):
                got, want = cm(**kwargs), ref(**kwargs)
                torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
                torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
                if train:
                    got.loss.backward()
                    want.loss.backward()
        if train:
            for (name, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
        assert cm.plans_made == 2
    finally:
        cm.close()


def test_a_saved_plan_names_a_tensor_passed_twice(tmp_path):
    """The plan file keeps which inputs were one tensor; applied to inputs that differ in that
    (the usual slip: planned on two meta tensors, run with ``labels=ids``), it says so before
    anything is captured."""
    import transformers as T

    from memsched.io.reapply import PlanMismatchError

    cfg = T.LlamaConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    ids, labels = torch.randint(0, 64, (1, 8)), torch.randint(0, 64, (1, 8))
    twice = memsched.plan(model, (), budget=10**8, example_kwargs={"input_ids": ids, "labels": ids}, hardware=CPU)
    apart = memsched.plan(model, (), budget=10**8, example_kwargs={"input_ids": ids, "labels": labels}, hardware=CPU)
    twice.save(tmp_path / "twice.json")
    apart.save(tmp_path / "apart.json")
    assert memsched.Plan.load(tmp_path / "twice.json").signature == twice.signature != apart.signature
    with torch.device("meta"):
        on_meta = T.LlamaForCausalLM(cfg).eval()
    meta_ids = ids.to("meta")   # one meta tensor passed twice stays one tensor to the plan
    assert memsched.plan(on_meta, (), budget=10**8, example_kwargs={"input_ids": meta_ids, "labels": meta_ids},
                         hardware=CPU).signature == twice.signature
    with torch.no_grad():
        for path, kwargs, says in ((tmp_path / "twice.json", {"input_ids": ids, "labels": labels},
                                    r"the plan was made for int64\[1,8\] \(the tensor of input leaf 0 again\)"),
                                   (tmp_path / "apart.json", {"input_ids": ids, "labels": ids},
                                    r"is int64\[1,8\] \(the tensor of input leaf 0 again\), the plan was made for")):
            cm = memsched.compile(model, plan=path, device="cpu")
            try:
                with pytest.raises(PlanMismatchError, match=says):
                    cm(**kwargs)
            finally:
                cm.close()
        cm = memsched.compile(model, plan=tmp_path / "twice.json", device="cpu")
        try:
            torch.testing.assert_close(cm(input_ids=labels, labels=labels).logits,
                                       model(input_ids=labels, labels=labels).logits, rtol=0, atol=0)
        finally:
            cm.close()
