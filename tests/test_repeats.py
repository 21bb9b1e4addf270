"""A deep stack of identical layers is traced on five of them and the rest repeated
(frontend/repeats.py): the grown graph must be the graph a full trace gives, node for node —
ops, arguments, shapes, strides, dtypes, which values share a storage, placeholders and
gradients — and layers that do not repeat exactly must be traced in full."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.utils._pytree as pytree
import transformers as T
from torch.multiprocessing.reductions import StorageWeakRef

import memsched
from memsched.frontend.capture import capture
from memsched.frontend.joint import capture_joint
from memsched.frontend.repeats import MIN_LAYERS, capture_repeated, find_stack
from helpers import FIXED_CPU, assert_step_matches_eager

LAYERS = 9
VOCAB = 300


def _build(name: str, layers: int = LAYERS):
    torch.manual_seed(0)
    if name == "llama":
        model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                                 num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                                 use_cache=False))
    elif name == "qwen2":  # grouped-query attention
        model = T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                                 use_cache=False))
    elif name == "gpt2":  # tied embedding: the first and last layers' gradients meet
        model = T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=layers, n_head=4, vocab_size=VOCAB, use_cache=False,
                                               bos_token_id=0, eos_token_id=0))
    elif name == "bert":
        model = T.BertForMaskedLM(T.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                               intermediate_size=128, vocab_size=VOCAB))
    elif name == "mamba":  # each block casts its input (the residual) to float32 after its norm began
        model = T.MambaForCausalLM(T.MambaConfig(hidden_size=64, num_hidden_layers=layers, state_size=8, expand=2,
                                                 vocab_size=VOCAB, use_cache=False))
    elif name == "deepseek_v3":  # its first two layers dense, the rest mixture-of-experts
        model = T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
            hidden_size=64, intermediate_size=128, num_hidden_layers=layers + 2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=VOCAB, use_cache=False, n_routed_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, first_k_dense_replace=2, n_group=1, topk_group=1))
    else:
        raise ValueError(name)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    return model.eval(), ids


def _canonical(captured) -> tuple:
    """The graph with nodes named by position and storages by first appearance."""
    nodes = list(captured.gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    storages: dict = {}
    out = []
    for n in nodes:
        args = torch.fx.map_arg((n.args, n.kwargs), lambda a: ("node", index[a]))
        vals = []
        for t in pytree.tree_leaves(n.meta.get("val")):
            if isinstance(t, torch.Tensor):
                sid = storages.setdefault(StorageWeakRef(t.untyped_storage()), len(storages))
                vals.append((tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, str(t.device), sid,
                             t.untyped_storage().nbytes()))
            else:
                vals.append(repr(t))
        out.append((n.op, "" if n.op == "placeholder" else str(n.target), repr(args), tuple(vals)))
    return (out, [(p.name, p.kind, p.target) for p in captured.placeholders],
            getattr(captured, "grad_targets", None))


def _tracer(ids, train: bool):
    if train:
        return lambda m: capture_joint(m, (), {"input_ids": ids, "labels": ids})
    return lambda m: capture(m, (), {"input_ids": ids})


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "mamba"])
def test_the_grown_graph_is_the_full_trace(name, train):
    model, ids = _build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _tracer(ids, train)(model)
        grown, how = capture_repeated(model, _tracer(ids, train))
    assert how == f"5 of {LAYERS} layers traced, the rest repeated"
    assert len(model.get_submodule(find_stack(model).prefix)) == LAYERS  # the model is left whole
    assert _canonical(grown) == _canonical(full)


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_layers_before_the_run_are_traced_as_they_are(train):
    """DeepSeek's dense layers before its mixture-of-experts ones: the run after them repeats
    (it was traced in full: a 61-layer DeepSeek-V3 step did not capture in 5 minutes). Its
    step also has views of a gradient summed in place, which the grown graph must place on
    the storage that takes the sum, as the full trace does."""
    model, ids = _build("deepseek_v3")
    assert find_stack(model).start == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = _tracer(ids, train)(model)
        grown, how = capture_repeated(model, _tracer(ids, train))
    assert how == f"7 of {LAYERS + 2} layers traced, the rest repeated"
    assert _canonical(grown) == _canonical(full)


def test_layers_that_trace_differently_are_traced_in_full():
    """BERT's post-norm layers interleave where the grower cuts them: a full trace, said so."""
    model, ids = _build("bert")
    grown, how = capture_repeated(model, _tracer(ids, True))
    assert how.startswith("traced in full: ")
    assert _canonical(grown) == _canonical(_tracer(ids, True)(model))


def test_layers_that_differ_are_no_stack():
    """Sliding-window attention on every other layer is an attribute that differs by more than
    the layer's index; a stack under MIN_LAYERS is traced in full without trying."""
    model, _ = _build("qwen2")
    assert find_stack(model) is not None
    model.model.layers[3].self_attn.sliding_window = 8
    assert find_stack(model) is None
    short, _ = _build("llama", layers=MIN_LAYERS - 1)
    assert find_stack(short) is None


def test_a_hook_on_a_layer_is_no_stack():
    model, _ = _build("llama")
    model.model.layers[4].register_forward_hook(lambda m, i, o: o)
    assert find_stack(model) is None


def test_a_plan_on_the_grown_graph_trains_as_eager():
    """End to end: a budget that moves and recomputes, loss and gradients bit-equal to eager."""
    model, ids = _build("llama")
    model.train()
    kwargs = {"input_ids": ids, "labels": ids}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p0 = memsched.plan(model, (), 10**13, example_kwargs=kwargs, train=True, hardware=FIXED_CPU)
        plan = memsched.plan(model, (), int(0.4 * p0.program.peak_bytes), example_kwargs=kwargs, train=True,
                             hardware=FIXED_CPU)
    assert "layers traced, the rest repeated" in plan.passes[0].note
    assert_step_matches_eager(model, (), kwargs, lambda out: out.loss, plan)


class _CountsItsLayers(torch.nn.Module):
    """A stack whose forward needs every layer (as a per-layer cache would)."""

    def __init__(self, n: int = LAYERS):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(8, 8) for _ in range(n))
        self.n = n

    def forward(self, x):
        if len(self.layers) != self.n:
            raise RuntimeError(f"expected {self.n} layers, got {len(self.layers)}")
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


def test_a_stack_that_cannot_be_cut_is_traced_in_full():
    model = _CountsItsLayers()
    x = torch.randn(2, 8)
    grown, how = capture_repeated(model, lambda m: capture(m, (x,)))
    assert how.startswith("traced in full: the cut stack does not trace (")
    assert _canonical(grown) == _canonical(capture(model, (x,)))
    assert len(model.layers) == LAYERS
    model.memsched_trace_all_layers = True       # the generation wrapper says so up front
    assert capture_repeated(model, lambda m: capture(m, (x,)))[1] == ""


def test_bf16_backward_casts_placed_late_are_hoisted_and_train_as_the_full_trace():
    """In bf16 autograd computes a norm's input cast for the layer below after that layer's
    backward began; the grower emits it before the repeats. The grown step's loss and
    gradients equal the fully traced step's, bit for bit. (Against eager a bf16 step differs
    even when traced in full, in the embedding's gradient: a known gap, not the grower's.)"""
    import copy

    model, ids = _build("llama")
    model = model.to(torch.bfloat16).train()
    kwargs = {"input_ids": ids, "labels": ids}

    class _TracedInFull(type(model)):
        memsched_trace_all_layers = True

    def step(m):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm = memsched.compile(m, budget, train=True, device="cpu", hardware=FIXED_CPU)
        try:
            torch.manual_seed(0)
            loss = cm(**kwargs).loss
            loss.backward()
            return cm.plan.passes[0].note, loss.detach(), {n: p.grad for n, p in m.named_parameters()}
        finally:
            cm.close()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p0 = memsched.plan(model, (), 10**13, example_kwargs=kwargs, train=True, hardware=FIXED_CPU)
    budget = int(0.4 * p0.program.peak_bytes)
    grown_model, full_model = copy.deepcopy(model), copy.deepcopy(model)
    full_model.__class__ = _TracedInFull
    how, loss, grads = step(grown_model)
    how_full, loss_full, grads_full = step(full_model)
    assert "5 of 9 layers traced" in how and "layers traced" not in how_full
    assert torch.equal(loss, loss_full)
    for name, g in grads.items():
        assert torch.equal(g, grads_full[name]), name
