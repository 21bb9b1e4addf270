"""Values the call's inputs alone make are read off them at capture (frontend/input_values.py).
A selection by such a mask is traced at its count (frontend/counted_selections.py), a branch on
such a value goes the way it goes for them (frontend/value_checks.py): the model infers and
trains as eager does, bit for bit, inside the budget; a call whose value differs gets a program
of its own, one with the same value reuses it; a mask made from anything else stays refused by
name."""
from __future__ import annotations

import copy
import re

import pytest
import torch

import memsched
from memsched.io.reapply import PlanMismatchError

B, N, D = 2, 8, 6


class Patches(torch.nn.Module):
    """An MAE-style encoder: embeds every patch, keeps those the mask leaves visible
    (``select(h, mask)``), and runs on them shaped ``[batch, kept, dim]``."""

    def __init__(self, select):
        super().__init__()
        self.embed, self.mix = torch.nn.Linear(3, D), torch.nn.Linear(D, D)
        self.select = select

    def forward(self, patches, mask):
        h = self.embed(patches)
        kept = self.select(h, mask).reshape(B, -1, D)
        return torch.softmax(self.mix(kept) @ kept.transpose(1, 2), -1).sum(1)


def _mask_positions_select(h, m):
    rows, cols = torch.where(~m)
    return h[rows, cols]


SELECTIONS = {
    "index": lambda h, m: h[~m],
    "masked_select": lambda h, m: torch.masked_select(h, ~m[..., None]),
    "nonzero": lambda h, m: h[tuple((~m).nonzero().unbind(1))],
    "nonzero_as_tuple": lambda h, m: h[(~m).nonzero(as_tuple=True)],
    "argwhere": lambda h, m: h[tuple(torch.argwhere(~m).unbind(1))],
    "where": _mask_positions_select,
    "among_slices": lambda h, m: h[:, ~m[0]],
}


def _mask(hidden: int, seed: int = 0) -> torch.Tensor:
    """``hidden`` patches of each row hidden (True), at random places."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(N, generator=g) < hidden for _ in range(B)])


def _inputs(hidden: int = 3, seed: int = 0):
    return torch.randn(B, N, 3, generator=torch.Generator().manual_seed(seed + 10)), _mask(hidden, seed)


def _check(cm, ref, args, train: bool):
    with torch.enable_grad() if train else torch.no_grad():
        got, want = cm(*args), ref(*args)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    if train:
        got.sum().backward()
        want.sum().backward()
        for (name, p), q in zip(ref.named_parameters(), cm.model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
            p.grad = q.grad = None


def _loss_equals_eagers(cm, ref, model, kwargs):
    """A training step through ``cm`` and through ``ref``, from one seed: loss and gradients bit-equal."""
    torch.manual_seed(2)
    loss = cm(**kwargs).loss
    torch.manual_seed(2)
    want = ref(**kwargs).loss
    torch.testing.assert_close(loss, want, rtol=0, atol=0)
    loss.backward()
    want.backward()
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
        p.grad = q.grad = None


def _at_its_minimum(model, args, kwargs, train, compare):
    """Compile ``model`` at its minimum budget, ``compare(cm, ref)`` with an eager copy, and
    check the measured peak stayed inside that budget."""
    ref = copy.deepcopy(model)
    floor = memsched.plan(copy.deepcopy(model), args, "1GB", example_kwargs=kwargs, train=train).min_budget_bytes
    cm = memsched.compile(model, floor, device="cpu", train=train)
    try:
        compare(cm, ref)
        assert cm.stats.peak_device_bytes <= floor
    finally:
        cm.close()


def _trains_at_its_minimum(model, kwargs):
    _at_its_minimum(model, (), kwargs, True, lambda cm, ref: _loss_equals_eagers(cm, ref, model, kwargs))


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
@pytest.mark.parametrize("how", sorted(SELECTIONS))
def test_a_selection_by_an_input_mask_runs_as_eager_at_the_minimum(how, train):
    args = _inputs()
    if how == "among_slices":   # one mask for every row
        args = (args[0], args[1][:1].expand(B, N))
    _at_its_minimum(Patches(SELECTIONS[how]), args, {}, train, lambda cm, ref: _check(cm, ref, args, train))


def test_a_program_serves_the_count_it_was_traced_at_and_another_count_gets_its_own():
    model = Patches(SELECTIONS["index"])
    ref = copy.deepcopy(model)
    cm = memsched.compile(model, "64MB", device="cpu", train=True)
    try:
        _check(cm, ref, _inputs(3, seed=0), train=True)
        _check(cm, ref, _inputs(3, seed=1), train=True)   # other patches, as many
        assert cm.plans_made == 1
        _check(cm, ref, _inputs(5, seed=2), train=True)
        assert cm.plans_made == 2
        _check(cm, ref, _inputs(3, seed=3), train=True)   # the first program again
        assert cm.plans_made == 2
    finally:
        cm.close()


class ShuffledMask(torch.nn.Module):
    """Hiera's and ViTMAE's way: the mask is made inside the model from the call's noise, by
    writing ones into a buffer of zeros and unshuffling it."""

    def __init__(self, keep: int):
        super().__init__()
        self.embed, self.keep = torch.nn.Linear(3, D), keep

    def forward(self, patches, noise):
        restore = noise.argsort(1).argsort(1)
        keep = torch.zeros(noise.shape)
        keep[:, :self.keep] = 1
        keep = keep.gather(1, restore).bool()
        h = self.embed(patches)
        return h[keep].reshape(noise.shape[0], self.keep, D).relu().mean(1)


def test_a_mask_written_in_place_from_the_calls_noise_is_counted():
    model = ShuffledMask(keep=3)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    args = (torch.randn(B, N, 3, generator=g), torch.rand(B, N, generator=g))
    kept = args[1].clone()
    cm = memsched.compile(model, "64MB", device="cpu", train=True)
    try:
        _check(cm, ref, args, train=True)
        _check(cm, ref, (args[0], torch.rand(B, N, generator=g)), train=True)
        assert cm.plans_made == 1
        assert torch.equal(args[1], kept)   # the count's program wrote into its own copy
    finally:
        cm.close()


class DrawnMask(torch.nn.Module):
    def forward(self, x):
        return x[torch.rand(x.shape) > 0.5].cumsum(0).sum()


class ActivationMask(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        return h[h > 0].cumsum(0).sum()


@pytest.mark.parametrize("model", [DrawnMask(), ActivationMask()], ids=["drawn", "activation"])
def test_a_mask_the_inputs_alone_do_not_make_stays_refused(model):
    with pytest.raises(memsched.UnsupportedModelError, match="size depends on the data"):
        memsched.plan(model, (torch.randn(4, 3),), "1GB")


def test_a_masked_loss_keeps_no_count_and_serves_every_count():
    """A loss over the selection is taken on the whole tensors (masked_losses.py): the counted
    selection is left unused, so the program is for any count."""
    class Tagger(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 4)

        def forward(self, x, labels, mask):
            return torch.nn.functional.cross_entropy(self.head(x)[mask], labels[mask])

    model = Tagger()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    cm = memsched.compile(model, "64MB", device="cpu", train=True)
    try:
        for hidden in (3, 5):
            args = (torch.randn(B, N, 3, generator=g), torch.randint(0, 4, (B, N), generator=g), _mask(hidden))
            got, want = cm(*args), ref(*args)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert cm.plans_made == 1
    finally:
        cm.close()


def test_the_counted_op_refuses_a_mask_of_another_count():
    mask = torch.tensor([True, False, True])
    assert torch.equal(torch.ops.memsched.nonzero_counted(mask, 2, 0), mask.nonzero())
    with pytest.raises(RuntimeError, match="holds 2 set elements where the program was captured for 3"):
        torch.ops.memsched.nonzero_counted(mask, 3, 0)


def test_a_saved_plan_with_a_counted_selection_reapplies(tmp_path):
    model = Patches(SELECTIONS["index"])
    ref = copy.deepcopy(model)
    args = _inputs()
    memsched.plan(copy.deepcopy(model), args, "64MB", train=True).save(tmp_path / "step.json")
    cm = memsched.compile(model, plan=tmp_path / "step.json", device="cpu", train=True)
    try:
        _check(cm, ref, args, train=True)
    finally:
        cm.close()


def test_a_plan_says_the_values_it_was_made_for_and_applies_to_those_alone(tmp_path):
    """The printout, the summary and the file name the values read off the inputs; a saved plan
    applied to a call whose value differs is refused by name before anything runs."""
    model = Patches(SELECTIONS["index"])
    plan = memsched.plan(copy.deepcopy(model), _inputs(), "64MB", train=True)
    assert plan.input_values == (("count of mask", "10"),)
    assert "planned for values read off the inputs: count of mask = 10" in str(plan)
    assert re.search(r"planned for values +count of mask = 10\n", plan.summary())
    plan.save(tmp_path / "step.json")
    assert memsched.Plan.load(tmp_path / "step.json").input_values == plan.input_values
    cm = memsched.compile(model, plan=tmp_path / "step.json", device="cpu", train=True)
    try:
        with pytest.raises(PlanMismatchError, match="count of mask is 12, the plan was made for 10"):
            cm(*_inputs(hidden=2))
    finally:
        cm.close()


def test_a_value_of_inputs_given_on_meta_is_refused_by_name():
    """memsched.plan captures inputs given on meta as zeros of their shapes: a value read off them
    would plan for zeros, so it is refused, naming the value and the input."""
    x, mask = _inputs()
    with pytest.raises(memsched.UnsupportedModelError, match="count of mask.*mask was given on the meta device"):
        memsched.plan(Patches(SELECTIONS["index"]), (x.to("meta"), mask.to("meta")), "64MB")
    assert memsched.plan(Patches(SELECTIONS["index"]), (x.to("meta"), mask), "64MB").input_values == \
        (("count of mask", "10"),)


def test_videomae_pretraining_trains_as_eager_at_its_minimum():
    """transformers' VideoMAE keeps the visible tubelets with ``x[~bool_masked_pos].reshape(...)``."""
    from transformers import VideoMAEConfig, VideoMAEForPreTraining

    from memsched.cli.targets import quiet_transformers

    with quiet_transformers():
        torch.manual_seed(0)
        model = VideoMAEForPreTraining(VideoMAEConfig(
            image_size=32, patch_size=8, num_frames=4, tubelet_size=2, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=64, decoder_hidden_size=16, decoder_num_hidden_layers=1,
            decoder_num_attention_heads=2, decoder_intermediate_size=32))
    g = torch.Generator().manual_seed(1)
    masked = torch.stack([torch.randperm(32, generator=g) < 16 for _ in range(2)])
    kwargs = {"pixel_values": torch.randn(2, 4, 3, 32, 32, generator=g), "bool_masked_pos": masked}
    _trains_at_its_minimum(model, kwargs)


def test_fsmt_skips_its_padding_mask_as_eager_does_per_call():
    """FSMT's decoder takes ``if not padding_mask.any(): padding_mask = None`` on
    ``decoder_input_ids == pad``: a batch without padding and one with it each get their
    program, each equal to eager's."""
    from transformers import FSMTConfig, FSMTForConditionalGeneration

    from memsched.cli.targets import quiet_transformers

    with quiet_transformers():
        torch.manual_seed(0)
        model = FSMTForConditionalGeneration(FSMTConfig(
            src_vocab_size=64, tgt_vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
            langs=["en", "de"], pad_token_id=1))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(3, 64, (2, 10), generator=g), torch.randint(3, 64, (2, 6), generator=g)
    padded = labels.clone()
    padded[1, 4:] = 1
    cm = memsched.compile(model, "64MB", device="cpu", train=True)
    try:
        for n, targets in enumerate((labels, padded, labels), start=1):
            _loss_equals_eagers(cm, ref, model, {"input_ids": ids, "decoder_input_ids": targets, "labels": targets})
            assert cm.plans_made == min(n, 2)
    finally:
        cm.close()


class TrimsPadding(torch.nn.Module):
    """Keeps the positions up to the longest sequence of the batch: ``int(mask.sum(-1).max())``."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x, attention_mask):
        n = int(attention_mask.sum(-1).max())
        return (self.lin(x[:, :n]) * attention_mask[:, :n, None]).sum(1)


class PoolsBySegment(torch.nn.Module):
    """Means over the tokens of each segment id present (``unique`` with ``return_inverse`` and
    ``return_counts``)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 4)

    def forward(self, x, segments):
        ids, where, counts = segments.unique(return_inverse=True, return_counts=True)
        h = self.lin(x)
        sums = torch.zeros(len(ids), h.shape[-1]).index_add(0, where.flatten(), h.flatten(0, 1))
        return sums / counts[:, None] + ids[:, None]


@pytest.mark.parametrize("train", [False, True], ids=["infer", "train"])
def test_unique_with_places_and_counts_is_read_off_the_inputs(train):
    """Each call's ids, places and counts are eager's; another set of ids gets its own program."""
    model = PoolsBySegment()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(8))
    calls = [torch.tensor([[7, 2, 2, 9, 7], [9, 9, 2, 7, 7]]), torch.tensor([[2, 9, 7, 7, 9], [2, 2, 2, 7, 9]]),
             torch.tensor([[4, 4, 4, 1, 1], [1, 1, 1, 1, 4]])]
    cm = memsched.compile(model, "64MB", device="cpu", train=train)
    try:
        for n, segments in enumerate(calls):
            _check(cm, ref, (x, segments), train)
            assert cm.plans_made == (1 if n < 2 else 2)
    finally:
        cm.close()


class WarmsUp(torch.nn.Module):
    """Branches on a buffer of its own (a step counter the caller advances)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)
        self.register_buffer("step", torch.tensor(0))

    def forward(self, x):
        y = self.lin(x)
        return y * 0.1 if self.step < 2 else y


def test_an_integer_read_off_the_inputs_sizes_the_program():
    model = TrimsPadding()
    ref = copy.deepcopy(model)
    x = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(6))
    masks = [torch.ones(B, N, dtype=torch.long) for _ in range(3)]
    masks[0][0, 5:] = masks[0][1, 4:] = 0          # longest 5
    masks[1][0, 3:] = masks[1][1, 5:] = 0          # longest 5 again
    cm = memsched.compile(model, "64MB", device="cpu", train=True)
    try:
        for n, mask in enumerate(masks):
            _check(cm, ref, (x, mask), train=True)
            assert cm.plans_made == (1 if n < 2 else 2)
    finally:
        cm.close()


def test_a_branch_on_a_buffer_reads_it_as_it_is_at_each_call():
    model = WarmsUp()
    ref = copy.deepcopy(model)
    x = torch.randn(B, 3, generator=torch.Generator().manual_seed(7))
    cm = memsched.compile(model, "64MB", device="cpu", train=True)
    try:
        for step in range(4):
            model.step.fill_(step)
            ref.step.fill_(step)
            _check(cm, ref, (x,), train=True)
        assert cm.plans_made == 2
    finally:
        cm.close()


class SplitsByGrid(torch.nn.Module):
    """Packs several images' patches in one sequence and attends within each, as Qwen2-VL's
    vision tower does: bounds by ``repeat_interleave`` and ``cumsum`` of the grid, split by
    ``lengths.tolist()``; per-image statistics gathered with ``torch.tensor`` of zero-dim tensors."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, patches, grid):
        bounds = torch.repeat_interleave(grid[:, 1] * grid[:, 2], grid[:, 0]).cumsum(0)
        bounds = torch.cat([bounds.new_zeros(1), bounds])
        lengths = bounds[1:] - bounds[:-1]
        h = self.lin(patches)
        parts = [p.softmax(0) * p for p in h.split(lengths.tolist())]
        peaks = torch.tensor([p.max() for p in parts])
        return torch.cat(parts).sum(0) + peaks.sum()


def test_packed_images_split_by_their_grid_run_as_eager():
    model = SplitsByGrid()
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(8)
    grids = [torch.tensor([[1, 2, 2], [2, 1, 3]]), torch.tensor([[1, 2, 2], [2, 1, 3]]), torch.tensor([[2, 2, 2], [1, 1, 2]])]
    cm = memsched.compile(model, "64MB", device="cpu", train=True)
    try:
        for n, grid in enumerate(grids):
            patches = torch.randn(int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum()), 3, generator=g)
            _check(cm, ref, (patches, grid), train=True)
            assert cm.plans_made == (1 if n < 2 else 2)
    finally:
        cm.close()


def test_qwen2_vl_trains_as_eager_on_images_of_two_grids():
    """transformers' Qwen2-VL: its vision tower splits its packed images by the grid's values
    (``repeat_interleave``, ``tolist``) and its multimodal rope reads the token types and the
    grid in Python; each grid gets its program."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from memsched.cli.targets import quiet_transformers

    image, start, end = 150, 152, 153
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=1, embed_dim=16, num_heads=2, hidden_size=32, patch_size=2, temporal_patch_size=2,
                           spatial_merge_size=2, in_channels=3, mlp_ratio=2),
        image_token_id=image, video_token_id=151, vision_start_token_id=start, vision_end_token_id=end)
    with quiet_transformers():
        torch.manual_seed(0)
        model = Qwen2VLForConditionalGeneration(cfg)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)

    def batch(widths):
        grid = torch.tensor([[1, 4, w] for w in widths])
        ids = torch.randint(3, 140, (2, 16), generator=g)
        for row, w in enumerate(widths):   # the image's tokens: its patches merged 2 x 2
            ids[row, 1], ids[row, 2:2 + w], ids[row, 2 + w] = start, image, end
        pixels = torch.randn(int(grid.prod(-1).sum()), 24, generator=g)
        return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid, "labels": ids,
                "mm_token_type_ids": (ids == image).long(), "attention_mask": torch.ones_like(ids)}

    cm = memsched.compile(model, "256MB", device="cpu", train=True)
    try:
        for n, widths in enumerate(((4, 8), (4, 8), (8, 4))):
            _loss_equals_eagers(cm, ref, model, batch(widths))
            assert cm.plans_made == (1 if n < 2 else 2)
    finally:
        cm.close()


def test_vilt_with_a_padded_image_trains_as_eager():
    """transformers' ViLT sizes each image's position embeddings by its pixel mask's row and
    column counts (``interpolate(size=(h, w))``), picks patches per row with ``nonzero``,
    ``unique`` and ``multinomial`` draws of a count read off the mask: its program is for that
    mask, and draws as eager draws."""
    from transformers import ViltConfig, ViltForQuestionAnswering

    from memsched.cli.targets import quiet_transformers

    with quiet_transformers():
        torch.manual_seed(0)
        model = ViltForQuestionAnswering(ViltConfig(
            vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, image_size=32, patch_size=8, max_image_length=-1, num_labels=3))
    g = torch.Generator().manual_seed(1)
    pixel_mask = torch.ones(2, 32, 32, dtype=torch.long)
    pixel_mask[1, :, 24:] = 0   # the second image is narrower
    kwargs = {"input_ids": torch.randint(0, 64, (2, 8), generator=g), "pixel_values": torch.randn(2, 3, 32, 32, generator=g),
              "pixel_mask": pixel_mask, "labels": torch.rand(2, 3, generator=g)}
    _trains_at_its_minimum(model, kwargs)


def test_many_values_for_one_shape_are_said_once():
    """Each new longest length plans again: at the fourth program for one shape, a warning says
    which values vary and how to keep them steady."""
    model = TrimsPadding()
    x = torch.randn(B, N, 3, generator=torch.Generator().manual_seed(9))
    cm = memsched.compile(model, "64MB", device="cpu")
    try:
        with torch.no_grad():
            for longest in (3, 4, 5):
                cm(x, (torch.arange(N) < longest).long().expand(B, N))
            with pytest.warns(UserWarning, match=r"4 programs planned for inputs of one shape.*integer of attention_mask"):
                cm(x, (torch.arange(N) < 6).long().expand(B, N))
        assert cm.plans_made == 4
    finally:
        cm.close()


class ReadsAndWrites(ShuffledMask):
    """A mask written into zeros from the noise (a guard writing in place) beside integers read
    off the same noise (guards that share its ops)."""

    def forward(self, patches, noise):
        order = noise.argsort(1)
        first, second = int(order[0, 0]), int(order[0, 1])
        return super().forward(patches, noise) + patches[:, min(first, second):max(first, second) + 1].sum()


def test_a_signatures_guards_run_as_one_program_with_the_values_of_each():
    from memsched.frontend.input_values import GuardSet

    model = ReadsAndWrites(keep=3)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(10)
    args = (torch.randn(B, N, 3, generator=g), torch.rand(B, N, generator=g))
    cm = memsched.compile(model, "64MB", device="cpu", train=True)
    try:
        _check(cm, ref, args, train=True)
        (merged,) = cm._value_guards.values()
        assert len(merged.guards) >= 3 and {g.reads for g in merged.guards} == {"count", "integer"}
        separate = sum(len(g.program.graph.nodes) for g in merged.guards)
        assert len(merged.program.graph.nodes) < separate
        for noise in (args[1], torch.rand(B, N, generator=g)):
            kept = noise.clone()
            want = tuple(guard.held((args[0], noise), {}, model.get_buffer) for guard in merged.guards)
            assert merged.values(model, (args[0], noise), {}) == want
            assert torch.equal(noise, kept)   # the writing guard wrote into copies
        assert isinstance(GuardSet(()).values(model, args, {}), tuple)
    finally:
        cm.close()
