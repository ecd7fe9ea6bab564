"""The block scheduler on a block-diffusion model: the KV cache is exact (the same tokens and logits as a full
block-masked recompute at every step), a finished block is fed once more with its final tokens and never again,
and every template it serves fills its targets with legal ids.

    python -m pytest -q tests/test_block_sampling.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmdlm.model import ModelConfig, Transformer
from mmdlm.sampling import BlockScheduler, SamplerConfig, SelfCorrection, scheduler_for
from mmdlm.sequence import Batch, Layout, caption_prompt, collate, joint_prompt, t2i_prompt, vqa_prompt
from mmdlm.vocab import Vocab

VOCAB = Vocab(text_size=24, codebook_size=16)
GRID = 4
LAYOUT = Layout(caption_len=8, question_len=4, answer_len=3, text_len=12, qa_per_sample=2)


def tiny(shift: bool) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB.size, n_layer=2, n_head=2, n_embd=32, max_seq_len=64,
                         image_tokens=GRID * GRID, codebook_size=VOCAB.codebook_size, image_offset=VOCAB.image_offset,
                         shift_logits=shift, block_diffusion=True, block_size=3, image_block_rows=2)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger weights: predictions that depend on the context
        for weight in model.parameters():
            weight.mul_(4.0)
    return model


def codes(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB.codebook_size, (GRID, GRID), generator=torch.Generator().manual_seed(seed))


BATCHES = {
    "caption": lambda: collate([caption_prompt(codes(i), VOCAB, LAYOUT) for i in range(3)], VOCAB),
    "vqa": lambda: collate([vqa_prompt(codes(i), [[1, 2], [3]], VOCAB, LAYOUT) for i in range(2)], VOCAB),
    "t2i": lambda: collate([t2i_prompt([4, 5], VOCAB, LAYOUT, GRID * GRID), t2i_prompt([6], VOCAB, LAYOUT,
                                                                                       GRID * GRID)], VOCAB),
    "joint": lambda: collate([joint_prompt(VOCAB, LAYOUT, GRID * GRID) for _ in range(2)], VOCAB),
}


class Recording(BlockScheduler):
    """The block scheduler, keeping the logits of every step's masked positions and each call's positions."""

    def sample(self, *args, **kwargs):
        self.logits, self.fed = [], []
        return super().sample(*args, **kwargs)

    def model_inputs(self, state):
        kw = super().model_inputs(state)
        self.fed.append((state.start, state.start + kw["ids"].shape[1], int(state.unit.max())))
        return kw

    def unit_logits(self, logits, state):
        masked, lg = super().unit_logits(logits, state)
        self.logits.append(lg.clone())
        return masked, lg


def recording(model: Transformer) -> Recording:
    c = model.config
    return Recording(VOCAB, c.block_size, c.image_block_rows, GRID, c.shift_logits)


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("task", sorted(BATCHES))
@pytest.mark.parametrize("options", [SamplerConfig(steps=2), SamplerConfig(steps=None, threshold=0.5),
                                     SamplerConfig(steps=2, temperature=1.0),
                                     SamplerConfig(steps=2, temperature=1.0, guidance_scale=2.0, guidance_steps=3),
                                     SamplerConfig(steps=2, guidance_scale=1.0, image_guidance_scale=1.5),
                                     SamplerConfig(steps=None, threshold=0.3, left_to_right=True)])
def test_the_cache_gives_the_recompute_s_tokens_and_logits(shift: bool, task: str, options: SamplerConfig) -> None:
    model, batch = tiny(shift), BATCHES[task]()
    runs = []
    for use_cache in (True, False):
        scheduler = recording(model)
        out = scheduler.sample(model, batch, dataclasses.replace(options, use_cache=use_cache),
                               generator=torch.Generator().manual_seed(1))
        runs.append((out, scheduler.logits))
    (cached, logits_c), (full, logits_f) = runs
    assert torch.equal(cached.ids, full.ids) and cached.nfe == full.nfe == len(logits_c)
    for a, b in zip(logits_c, logits_f, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    filled = cached.ids[batch.target]
    assert not bool((filled == VOCAB.mask).any())
    image = (batch.image_index >= 0)[batch.target]
    assert bool(VOCAB.is_image(filled[image]).all()) and not bool(VOCAB.is_image(filled[~image]).any())


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("task", ["caption", "t2i", "vqa"])
def test_a_finished_block_is_fed_once_more_and_never_again(shift: bool, task: str) -> None:
    """Calls of a block feed from its first position; the first call of the next block starts at the finished
    block's first position (its final tokens), and no later call goes back before that: the prompt is fed once."""
    model, batch = tiny(shift), BATCHES[task]()
    scheduler = recording(model)
    out = scheduler.sample(model, batch, SamplerConfig(steps=2, eos_fill=False))
    fed = scheduler.fed  # (start, end, block) of every call
    assert out.nfe == len(fed) > len({u for *_, u in fed}) and fed[0][0] == 0
    first = {u: lo for lo, _, u in fed[1:]}  # where the calls of each block begin, but its first
    for (lo, _, u), (_, _, before) in zip(fed[1:], fed[:-1], strict=True):
        if u == before:
            assert lo == first[u]  # inside a block: from its own first position
        else:
            assert lo == first.get(before, lo) and lo <= first[u]  # the block just finished, fed again
    starts = [lo for lo, *_ in fed]
    assert starts == sorted(starts) and starts.count(0) == 1  # never back: the prompt once


def test_scheduler_for_a_block_model() -> None:
    assert isinstance(scheduler_for(tiny(shift=True).config, VOCAB), BlockScheduler)


@pytest.mark.parametrize("task", ["caption", "t2i"])
def test_self_correction_re_masks_inside_the_current_block_within_its_budget(task: str) -> None:
    model, batch = tiny(shift=True), BATCHES[task]()
    plain = SamplerConfig(steps=2, guidance_scale=1.0 if task == "t2i" else 0.0)
    every = SelfCorrection(threshold=1.5, only_if_disagrees=False, extra_steps=3)  # re-mask whatever is checked
    out = scheduler_for(model.config, VOCAB).sample(model, batch, dataclasses.replace(plain, self_correction=every))
    base = scheduler_for(model.config, VOCAB).sample(model, batch, plain)
    assert out.remasked > 0 and base.nfe < out.nfe <= base.nfe + 3 * 2  # each re-masking call: a step more
    filled = out.ids[batch.target]
    assert not bool((filled == VOCAB.mask).any())
    never = SelfCorrection(threshold=0.0)  # checks, never re-masks: the plain decode, check rows and all
    quiet = scheduler_for(model.config, VOCAB).sample(model, batch, dataclasses.replace(plain, self_correction=never))
    assert quiet.remasked == 0 and torch.equal(quiet.ids, base.ids) and quiet.nfe == base.nfe


def test_guidance_changes_the_image_and_uses_the_unconditional_rows() -> None:
    model, batch = tiny(shift=True), BATCHES["t2i"]()
    plain = scheduler_for(model.config, VOCAB).sample(model, batch, SamplerConfig(steps=2))
    guided = scheduler_for(model.config, VOCAB).sample(model, batch, SamplerConfig(steps=2, guidance_scale=3.0))
    assert plain.nfe == guided.nfe and guided.forward_rows == 2 * plain.forward_rows
    assert not torch.equal(plain.ids, guided.ids)


def test_a_row_with_nothing_to_fill_leaves_and_the_others_decode_as_alone() -> None:
    model, batch = tiny(shift=True), BATCHES["caption"]()
    ids = batch.ids.clone()
    ids[1, batch.target[1]] = 3  # row 1's caption is given: nothing to decode
    batch = dataclasses.replace(batch, ids=ids)
    for options in (SamplerConfig(steps=2), SamplerConfig(steps=2, guidance_scale=1.0)):
        out = scheduler_for(model.config, VOCAB).sample(model, batch, options)
        assert out.row_nfe.tolist() == [out.nfe, 0, out.nfe] and torch.equal(out.ids[1], ids[1])
        for r in (0, 2):
            alone = scheduler_for(model.config, VOCAB).sample(model, batch.select([r]), options)
            torch.testing.assert_close(out.ids[r], alone.ids[0])


def test_rows_with_different_layouts_are_decoded_in_groups() -> None:
    model = tiny(shift=True)
    batch: Batch = collate([vqa_prompt(codes(0), [[1, 2], [3]], VOCAB, LAYOUT), vqa_prompt(codes(1), [[1]], VOCAB,
                                                                                           LAYOUT)], VOCAB)
    together = scheduler_for(model.config, VOCAB).sample(model, batch, SamplerConfig(steps=2))
    for r in range(2):
        alone = scheduler_for(model.config, VOCAB).sample(model, batch.select([r]), SamplerConfig(steps=2))
        assert torch.equal(together.ids[r], alone.ids[0])


def test_image_steps_count_per_band_and_steps_per_text_block() -> None:
    model = tiny(shift=True)
    scheduler = scheduler_for(model.config, VOCAB)
    t2i = scheduler.sample(model, BATCHES["t2i"](), SamplerConfig(steps=None, image_steps=2, eos_fill=False))
    assert t2i.nfe == 2 * 2  # two bands of two rows, two steps each
    caption = scheduler.sample(model, BATCHES["caption"](), SamplerConfig(steps=None, image_steps=1, eos_fill=False))
    assert caption.nfe == LAYOUT.caption_len  # text: one token per step whatever image_steps says


def test_rows_move_to_their_next_block_on_their_own_and_decode_as_alone() -> None:
    model, batch = tiny(shift=True), BATCHES["caption"]()
    options = SamplerConfig(steps=None, threshold=0.3, eos_fill=False)  # rows fill their blocks at their own pace
    units = []

    class Watching(BlockScheduler):
        def model_inputs(self, state):
            units.append(state.unit.tolist())
            return super().model_inputs(state)

    c = model.config
    together = Watching(VOCAB, c.block_size, c.image_block_rows, GRID, c.shift_logits).sample(model, batch, options)
    assert any(len(set(u)) > 1 for u in units)  # at some call the rows were at different blocks
    for r in range(len(together.ids)):
        alone = scheduler_for(model.config, VOCAB).sample(model, batch.select([r]), options)
        assert torch.equal(together.ids[r], alone.ids[0]) and int(together.row_nfe[r]) == alone.nfe


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_left_to_right_commits_text_in_ar_order_and_images_by_confidence(threshold: float | None) -> None:
    """With `left_to_right` a text block fills from its left: every step's new tokens are the leftmost masked ones
    (one scheduled, then the run of sure predictions after it, up to the first doubtful one), never a token with a
    mask to its left in the block; image bands keep the confidence order."""
    model = tiny(shift=True)
    options = SamplerConfig(steps=None, image_steps=2, threshold=threshold, left_to_right=True, eos_fill=False)
    for task in ("caption", "joint"):
        batch = BATCHES[task]()
        out = scheduler_for(model.config, VOCAB).sample(model, batch, options, history=True)
        text = batch.target & (batch.image_index < 0)  # (B, T)
        for before, after in zip(out.history[:-1], out.history[1:], strict=True):
            new = (before == VOCAB.mask) & (after != VOCAB.mask) & text  # (B, T)
            still = (after == VOCAB.mask) & text
            for r in range(len(batch.ids)):
                cols = new[r].nonzero().flatten()
                if len(cols):  # contiguous, and no mask left before them
                    assert torch.equal(cols, torch.arange(int(cols[0]), int(cols[-1]) + 1))
                    assert not bool(still[r, : int(cols[0])].any())
        if threshold is None and task == "caption":  # one token per call: a text region's width in calls
            assert out.nfe == LAYOUT.caption_len
    plain = scheduler_for(model.config, VOCAB).sample(model, BATCHES["t2i"](), dataclasses.replace(
        options, left_to_right=False))
    ordered = scheduler_for(model.config, VOCAB).sample(model, BATCHES["t2i"](), options)
    assert torch.equal(plain.ids, ordered.ids)  # images: the same decode
