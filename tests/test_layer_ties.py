"""Layers made from one traced layer are decided once (passes/placement/ties.py): the model
tensors and gaps with the same role in each repeated layer form groups, the MIP ties every
member's decisions to the first's, and the plan -- checked on the whole program -- trains as
eager does."""
from __future__ import annotations

import warnings

import pytest
import torch
import transformers as T

from memsched import pipeline as P
from memsched.passes.placement import mip
from memsched.passes.placement.problem import FetchKey
from memsched.passes.placement.ties import tie_groups
from helpers import FIXED_CPU, assert_step_matches_eager

LAYERS = 8   # the fewest a stack is grown from (repeats.MIN_LAYERS): layers 2..5 repeat
VOCAB = 256


def _llama():
    torch.manual_seed(0)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=VOCAB, use_cache=False)
    model = T.LlamaForCausalLM(cfg).train()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids}


TIME_LIMIT_S = 3.0   # the tiny MIP would search its whole 10 s for the last 1e-7 of its gap


def _state(model, kwargs, budget, passes):
    s = P.PlanningState(budget, FIXED_CPU, P.DEFAULT_MAX_SEGMENTS, TIME_LIMIT_S, model=model, kwargs=kwargs,
                        args=(), train=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        P.plan_state(s, passes=passes)
    return s


def _through(name: str) -> list:
    """The pipeline's passes up to and including ``name``."""
    names = [p.name for p in P.PASSES]
    return P.PASSES[:names.index(name) + 1]


@pytest.fixture(scope="module")
def unconstrained():
    """The step captured, analysed and cut into segments at no budget."""
    model, kwargs = _llama()
    return _state(model, kwargs, 10**13, _through("segments"))


def test_each_role_of_the_repeated_layers_is_one_group(unconstrained):
    s = unconstrained
    assert "the rest repeated" in s.passes[0].note
    ties = tie_groups(s.placement_model, s.captured.layer_roles)
    repeated = LAYERS - 4          # layers 2 .. L-3 are made from the one traced layer
    per_layer = sum(1 for b in s.placement_model.persistent
                    if s.program.storages[b].name.startswith("p_model_layers_2_"))
    assert per_layer and len(ties.storages) == per_layer
    for group in ties.storages:
        names = [s.program.storages[b].name for b in group]
        assert len(group) == repeated
        assert len({n.replace(f"_{i + 2}_", "_#_", 1) for i, n in enumerate(names)}) == 1, names
    assert ties.gaps, "a training step's saved activations repeat with their layers"
    m = s.placement_model
    for group in ties.gaps:
        assert 2 <= len(group) <= repeated
        assert len({(m.size(m.gaps[g].buffer), m.gaps[g].persistent) for g in group}) == 1
    assert ties.tied == sum(len(g) - 1 for g in ties.storages + ties.gaps)


def test_no_roles_no_ties(unconstrained):
    assert not tie_groups(unconstrained.placement_model, {})


def test_a_tied_plan_decides_alike_and_trains_as_eager(monkeypatch, unconstrained):
    monkeypatch.setattr(mip, "TIE_FROM", 0)     # tie this small problem too (the default: 6000 variables)
    model, kwargs = _llama()
    s = _state(model, kwargs, int(0.45 * unconstrained.program.peak_bytes), P.PASSES)
    pl = s.placement
    assert pl.status in ("optimal", "feasible"), pl.notes
    assert any("decided once" in n for n in pl.notes), pl.notes
    ties = tie_groups(s.placement_model, s.captured.layer_roles)
    for group in ties.storages:
        first = group[0]
        for b in group[1:]:
            assert (b in pl.resident, pl.home.get(b)) == (first in pl.resident, pl.home.get(first))
            assert (FetchKey.init(b) in pl.early) == (FetchKey.init(first) in pl.early)
    for group in ties.gaps:
        assert len({pl.gap_choice[g] for g in group}) == 1
        assert len({FetchKey.gap(g) in pl.early for g in group}) == 1
    assert s.chosen.scheduled is not None
    plan = P.to_plan(s, "llama")
    assert plan.verify() <= plan.budget_bytes
    assert_step_matches_eager(model, (), kwargs, lambda out: out.loss, plan, time_limit_s=TIME_LIMIT_S)
