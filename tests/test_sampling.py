"""Samplers on the real tiny Transformer: termination, anchors, modality restriction, schedules and NFE,
threshold decoding, guidance, semi-AR blocks, self-correction, determinism, AR with/without KV cache;
and one learning test (a tiny model trained with the project's masked-diffusion loss is solved by the
samplers)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mmdlm.model import ModelConfig, Transformer
from mmdlm.sampling import (
    ARScheduler,
    MaskedScheduler,
    SamplerConfig,
    SelfCorrection,
    cosine_schedule,
    guided_logits,
    linear_schedule,
    restrict,
)
from mmdlm.sequence import (
    Batch,
    Layout,
    Segment,
    Task,
    caption_prompt,
    collate,
    document_prompt,
    joint_prompt,
    t2i_prompt,
    vqa_prompt,
)
from mmdlm.vocab import Vocab

torch.set_num_threads(1)

VOCAB = Vocab(text_size=24, codebook_size=16)
GRID = 4  # 4x4 image tokens
N_IMG = GRID * GRID
LAYOUT = Layout(caption_len=8, question_len=4, answer_len=6, text_len=12, qa_per_sample=2)
MASKED, AR = MaskedScheduler(VOCAB), ARScheduler(VOCAB)


def tiny(causal: bool = False, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=VOCAB.size, n_layer=2, n_head=2, n_embd=32, max_seq_len=64, causal=causal,
                      image_tokens=N_IMG, codebook_size=VOCAB.codebook_size, image_offset=VOCAB.image_offset,
                      tie_head=True)  # the head these tests were written on
    return Transformer(cfg).eval()


class Counting(nn.Module):
    """The real model, counting forward calls and rows, recording each call's inputs."""

    def __init__(self, model: Transformer, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model, self.config = model, model.config
        self.bias = bias  # Float[V] added to every logit (to tempt the sampler into forbidden ids)
        self.calls = self.rows = 0
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, ids, pad=None, image_index=None, cache=None, logits_at=None, prefix=None):
        self.calls += 1
        self.rows += ids.shape[0]
        self.inputs.append((ids.clone(), pad.clone()))
        logits = self.model(ids, pad=pad, image_index=image_index, cache=cache, logits_at=logits_at, prefix=prefix)
        return logits if self.bias is None else logits + self.bias

    def new_cache(self, *args, **kwargs):
        return self.model.new_cache(*args, **kwargs)


def codes(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB.codebook_size, (GRID, GRID), generator=torch.Generator().manual_seed(seed))


def joint_batch(b: int = 3) -> Batch:
    return collate([joint_prompt(VOCAB, LAYOUT, N_IMG) for _ in range(b)], VOCAB)


def t2i_batch() -> Batch:
    return collate([t2i_prompt([1, 2, 3], VOCAB, LAYOUT, N_IMG), t2i_prompt([4, 5], VOCAB, LAYOUT, N_IMG)], VOCAB)


def caption_batch(b: int = 3) -> Batch:
    return collate([caption_prompt(codes(i), VOCAB, LAYOUT) for i in range(b)], VOCAB)


def check_filled(batch: Batch, ids: torch.Tensor) -> None:
    """No mask left, non-targets untouched, image targets hold image codes, text targets text/eos."""
    assert not bool((ids == VOCAB.mask).any())
    assert torch.equal(ids[~batch.target], batch.ids[~batch.target])
    img = batch.target & (batch.image_index >= 0)
    txt = batch.target & (batch.image_index < 0)
    assert bool(VOCAB.is_image(ids[img]).all())
    assert bool((VOCAB.is_text(ids[txt]) | (ids[txt] == VOCAB.eos)).all())


OPTION_SETS = {
    "default": SamplerConfig(steps=4, image_steps=5),
    "temperature-margin": SamplerConfig(steps=3, image_steps=3, temperature=1.0,
                                        confidence="margin"),
    "random": SamplerConfig(steps=8, image_steps=4, confidence="random"),
    "blocks": SamplerConfig(steps=4, image_steps=4, block_length=3),
    "threshold": SamplerConfig(threshold=0.05, block_length=4),
    "cfg": SamplerConfig(steps=4, image_steps=4, guidance_scale=2.0),
    "self-correction": SamplerConfig(steps=4, image_steps=4, temperature=2.0,
                                      self_correction=SelfCorrection(threshold=0.9, extra_steps=3)),
}


@pytest.mark.parametrize("name", list(OPTION_SETS))
def test_fills_every_mask_with_allowed_ids(name: str) -> None:
    options = OPTION_SETS[name]
    for batch in (joint_batch(), t2i_batch(), caption_batch()):
        # tempt it: mask, pad, a text id and an image code get a huge bonus at every position
        bias = torch.zeros(VOCAB.size)
        bias[[VOCAB.mask, VOCAB.pad, 3, VOCAB.image_offset + 2]] = 50.0
        model = Counting(tiny(), bias)
        out = MASKED.sample(model, batch, options, generator=torch.Generator().manual_seed(0))
        check_filled(batch, out.ids)
        assert out.nfe == model.calls and out.forward_rows == model.rows
        if options.temperature == 0:  # the bonus ids win wherever they are allowed
            img = batch.target & (batch.image_index >= 0)
            assert bool((out.ids[img] == VOCAB.image_offset + 2).all())


def test_schedules_commit_everything_in_steps() -> None:
    n = torch.tensor([0, 1, 5, 16, 37])
    for schedule in (linear_schedule, cosine_schedule):
        for steps in (1, 4, 16):
            left = schedule(n, steps)  # (B, S)
            assert left.shape == (5, steps)
            assert bool((left[:, -1] == 0).all())
            prev = torch.cat([n[:, None], left], 1)
            per_step = prev[:, :-1] - prev[:, 1:]
            assert bool((per_step >= 0).all())
            # at least one per step while enough tokens are left
            assert bool((per_step[n >= steps] >= 1).all())
    assert linear_schedule(torch.tensor([10]), 4).tolist() == [[7, 4, 2, 0]]  # LLaDA: 3, 3, 2, 2
    cos = cosine_schedule(torch.tensor([64]), 8)[0]
    assert (64 - cos[0]) < (cos[-2] - cos[-1])  # MaskGIT: few commits first, many last


def test_nfe_equals_steps_and_forward_calls() -> None:
    cases = [
        (joint_batch(), SamplerConfig(steps=6, image_steps=4), 6),  # max over the modalities
        (joint_batch(), SamplerConfig(steps=3, image_steps=7), 7),
        (t2i_batch(), SamplerConfig(steps=20, image_steps=5), 5),  # no text target: image steps
        (caption_batch(), SamplerConfig(steps=4, image_steps=9, block_length=3), 4),
        (t2i_batch(), SamplerConfig(image_steps=5, guidance_scale=3.0), 5),
    ]
    for batch, options, steps in cases:
        model = Counting(tiny())
        out = MASKED.sample(model, batch, options)
        assert out.nfe == steps == model.calls
        rows = len(batch) * (2 if options.guidance_scale else 1)
        assert out.forward_rows == model.rows == steps * rows


def test_anchored_tokens_are_kept_and_never_remasked() -> None:
    batch = caption_batch(2)
    text_pos = batch.target[0].nonzero().squeeze(1)
    batch.ids[:, text_pos[2]] = 7  # "word 3 must be 'red'"
    batch.ids[1, text_pos[5]] = VOCAB.eos
    t2i = t2i_batch()
    img_pos = (t2i.image_index[0] >= 0).nonzero().squeeze(1)
    t2i.ids[:, img_pos[:4]] = VOCAB.image_to_token(torch.tensor([1, 2, 3, 4]))  # inpainting: top row given
    aggressive = SamplerConfig(steps=4, image_steps=4, temperature=3.0,
                                self_correction=SelfCorrection(threshold=1.1, only_if_disagrees=False,
                                                               extra_steps=4))
    for b in (batch, t2i):
        anchored = b.target & (b.ids != VOCAB.mask)
        assert bool(anchored.any())
        out = MASKED.sample(tiny(), b, aggressive, anchor=anchored, history=True,
                            generator=torch.Generator().manual_seed(1))
        check_filled(b, out.ids)
        assert out.remasked > 0  # threshold > 1: every checked token was re-masked ...
        for frame in out.history:  # ... but never an anchor
            assert torch.equal(frame[anchored], b.ids[anchored])
    with pytest.raises(ValueError):
        MASKED.sample(tiny(), batch, anchor=batch.target)  # anchors must hold tokens


def test_threshold_one_equals_one_token_per_step() -> None:
    batch = caption_batch(3)
    n = int(batch.target[0].sum())
    for temperature in (0.0, 1.0):
        for block_length in (None, 3):
            common = dict(temperature=temperature, block_length=block_length)
            steps = MASKED.sample(tiny(), batch, SamplerConfig(steps=n, **common),
                                  generator=torch.Generator().manual_seed(3), history=True)
            thresh = MASKED.sample(tiny(), batch, SamplerConfig(threshold=1.0, **common),
                                   generator=torch.Generator().manual_seed(3), history=True)
            assert torch.equal(steps.ids, thresh.ids)
            assert steps.nfe == thresh.nfe == n
            for a, b in zip(steps.history, thresh.history):
                assert int((a == VOCAB.mask).sum()) == int((b == VOCAB.mask).sum())
    # a low threshold commits many tokens per step: far fewer steps than tokens
    fast = MASKED.sample(tiny(), batch, SamplerConfig(threshold=0.0))
    assert fast.nfe == 1
    check_filled(batch, fast.ids)


def test_image_threshold_decoding_commits_at_least_the_schedule_and_more_when_sure() -> None:
    batch = t2i_batch()
    common = dict(image_steps=6, temperature=1.0)
    plain = MASKED.sample(tiny(), batch, SamplerConfig(**common), generator=torch.Generator().manual_seed(2),
                          history=True)
    never = MASKED.sample(tiny(), batch, SamplerConfig(threshold=1.0, **common),
                          generator=torch.Generator().manual_seed(2), history=True)
    assert never.nfe == plain.nfe == 6 and torch.equal(never.ids, plain.ids)  # nothing passes: the schedule
    some = MASKED.sample(tiny(), batch, SamplerConfig(threshold=0.05, **common),
                         generator=torch.Generator().manual_seed(2), history=True)
    left = [int((h == VOCAB.mask).sum()) for h in some.history]
    floor = [int((h == VOCAB.mask).sum()) for h in plain.history]
    assert all(a <= b for a, b in zip(left, floor)) and sum(left) < sum(floor)  # ahead of the schedule
    assert MASKED.sample(tiny(), batch, SamplerConfig(threshold=0.0, **common)).nfe == 1
    check_filled(batch, some.ids)


def test_cfg_zero_is_the_conditional_pass_and_uncond_rows_drop_the_condition() -> None:
    batch = t2i_batch()
    assert bool(batch.cond.any())
    plain = Counting(tiny())
    ref = MASKED.sample(plain, batch, SamplerConfig(image_steps=4))
    zero = Counting(tiny())
    out = MASKED.sample(zero, batch, SamplerConfig(image_steps=4, guidance_scale=0.0))
    assert torch.equal(ref.ids, out.ids) and zero.rows == plain.rows == 4 * len(batch)

    guided = Counting(tiny())
    res = MASKED.sample(guided, batch, SamplerConfig(image_steps=4, guidance_scale=2.0))
    check_filled(batch, res.ids)
    assert guided.calls == res.nfe == 4 and guided.rows == 4 * 2 * len(batch)  # one call, 2B rows
    ids, pad = guided.inputs[0]
    B = len(batch)
    assert torch.equal(ids[:B], ids[B:])
    assert torch.equal(pad[:B], batch.pad) and torch.equal(pad[B:], batch.pad | batch.cond)

    # the formula on real logits of one batched cond/uncond call: w = 0 is exactly the conditional
    model = tiny()
    logits = model(torch.cat([batch.ids, batch.ids]), pad=torch.cat([batch.pad, batch.pad | batch.cond]),
                   image_index=torch.cat([batch.image_index, batch.image_index]))
    c, u = logits.chunk(2)
    assert not torch.allclose(c, u)
    assert torch.equal(guided_logits(c, u, 0.0), c)
    assert torch.allclose(guided_logits(c, u, 1.5), u + 2.5 * (c - u), atol=1e-5)


def edit_batch(b: int = 2) -> Batch:
    """Edit documents: a source image and an instruction given, the edited image the target."""
    return collate([document_prompt([Segment.of_image(codes(i)), Segment.of_text([5, 6, 7]),
                                     Segment.of_image(None, target=True, n_tokens=N_IMG)], VOCAB, LAYOUT)
                    for i in range(b)], VOCAB)


def test_image_guidance_guides_an_edits_source_image_and_instruction_apart() -> None:
    batch = edit_batch()
    B, text_cond = len(batch), batch.cond & (batch.image_index < 0)
    assert bool(text_cond.any()) and bool((batch.cond & ~text_cond).any())  # both the instruction and the source
    config = SamplerConfig(image_steps=3, guidance_scale=1.5, image_guidance_scale=0.5)
    model = Counting(tiny())
    res = MASKED.sample(model, batch, config)
    check_filled(batch, res.ids)
    assert model.calls == res.nfe == 3 and model.rows == res.forward_rows == 3 * 3 * B  # cond, no text, none
    ids, pad = model.inputs[0]
    assert torch.equal(ids[:B], ids[B:2 * B]) and torch.equal(ids[:B], ids[2 * B:])
    assert torch.equal(pad[:B], batch.pad) and torch.equal(pad[B:2 * B], batch.pad | text_cond)
    assert torch.equal(pad[2 * B:], batch.pad | batch.cond)

    # InstructPix2Pix's formula; one scale for both is plain guidance
    c, t, u = torch.randn(3, 5, VOCAB.size).unbind(0)
    torch.testing.assert_close(guided_logits(c, u, 1.5, text_uncond=t, image_scale=0.5),
                               c + 1.5 * (c - t) + 0.5 * (t - u))
    torch.testing.assert_close(guided_logits(c, u, 2.0, text_uncond=t, image_scale=2.0), guided_logits(c, u, 2.0))
    with pytest.raises(ValueError, match="image_guidance_scale"):
        SamplerConfig(image_guidance_scale=-1.0)


def test_guidance_plausibility_keeps_guidance_to_tokens_the_conditional_model_allows() -> None:
    """A background position: p_cond = (0.9 bg, 0.05, 0.05 prompt code). The prompt code is 500x likelier
    with the prompt than without, so plain guidance picks it (a spurious object); the constraint
    (p_cond >= 0.1 * 0.9) leaves it out, and ranks the plausible tokens as plain guidance does."""
    c = torch.tensor([0.9, 0.05, 0.05]).log()
    u = torch.tensor([0.5, 0.4999, 0.0001]).log()
    assert guided_logits(c, u, 2.0).argmax() == 2
    g = guided_logits(c, u, 2.0, plausibility=0.1)
    assert g.argmax() == 0 and torch.isinf(g[1:]).all()
    torch.testing.assert_close(g[0], guided_logits(c, u, 2.0)[0])
    assert torch.isfinite(guided_logits(c, u, 2.0, plausibility=0.05)).all()  # 0.05 >= 0.05 * 0.9: all kept
    # the reference max is over the allowed tokens only: token 0 disallowed, so 1 and 2 both stay
    allowed = torch.tensor([[False, True, True], [True, True, True]])  # (2 modalities, V)
    g = guided_logits(c, u, 2.0, plausibility=0.5, reference=restrict(c, torch.tensor(0), allowed))
    assert torch.isfinite(g[1:]).all() and torch.isinf(g[0])
    with pytest.raises(ValueError, match="guidance_plausibility"):
        SamplerConfig(guidance_plausibility=2.0)


def test_semi_ar_blocks_commit_the_left_block_first() -> None:
    batch = caption_batch(2)
    pos = batch.target[0].nonzero().squeeze(1)  # 8 caption positions -> blocks of 3: [0:3] [3:6] [6:8]
    blocks = [pos[0:3], pos[3:6], pos[6:8]]
    for options in (SamplerConfig(steps=6, block_length=3), SamplerConfig(threshold=0.3, block_length=3)):
        out = MASKED.sample(tiny(), batch, options, history=True)
        check_filled(batch, out.ids)
        for frame in out.history:
            done = [(frame[:, blk] != VOCAB.mask).all(1) for blk in blocks]  # (B,) per block
            started = [(frame[:, blk] != VOCAB.mask).any(1) for blk in blocks]
            for j in range(1, len(blocks)):
                assert bool((~started[j] | done[j - 1]).all()), "a later block started before the left one"
        if options.threshold is None:  # steps split evenly: 2 per block
            assert out.nfe == 6
            assert bool((out.history[1][:, blocks[0]] != VOCAB.mask).all())
            assert bool((out.history[1][:, pos[3:]] == VOCAB.mask).all())


def test_image_blocks_draw_the_image_in_raster_blocks_top_to_bottom() -> None:
    """`image_block_length`: an image's tokens in blocks of raster order, each started only when the one above is
    done; the image steps split evenly over them; a joint batch's text keeps its own (one) block meanwhile."""
    batch = joint_batch(2)
    image = batch.target & (batch.image_index >= 0)  # (B, T)
    pos = image[0].nonzero().squeeze(1)
    n = len(pos)
    blocks = [pos[j : j + n // 4] for j in range(0, n, n // 4)]  # 4 blocks
    for options in (SamplerConfig(steps=8, image_block_length=n // 4, temperature=1.0),
                    SamplerConfig(steps=8, image_block_length=n // 4, threshold=0.2)):
        out = MASKED.sample(tiny(), batch, options, history=True, generator=torch.Generator().manual_seed(0))
        check_filled(batch, out.ids)
        for frame in out.history:
            done = [(frame[:, blk] != VOCAB.mask).all(1) for blk in blocks]  # (B,) per block
            started = [(frame[:, blk] != VOCAB.mask).any(1) for blk in blocks]
            for j in range(1, len(blocks)):
                assert bool((~started[j] | done[j - 1]).all()), "a lower block started before the one above"
        if options.threshold is None:  # 8 steps over 4 blocks: the first block is done after 2
            assert out.nfe == 8
            assert bool((out.history[1][:, blocks[0]] != VOCAB.mask).all())
            assert bool((out.history[1][:, pos[n // 4 :]] == VOCAB.mask).all())
            text = batch.target & (batch.image_index < 0)
            assert bool((out.history[0][text] != VOCAB.mask).any())  # text is not held back by the image blocks
    plain = SamplerConfig(steps=8, temperature=1.0)
    one_block = dataclasses.replace(plain, image_block_length=n)  # one block of the whole image: the plain sampler
    g = torch.Generator
    assert torch.equal(MASKED.sample(tiny(), batch, plain, generator=g().manual_seed(3)).ids,
                       MASKED.sample(tiny(), batch, one_block, generator=g().manual_seed(3)).ids)


def test_deterministic_given_a_generator() -> None:
    batch = joint_batch(2)
    options = SamplerConfig(steps=4, image_steps=4, temperature=1.0)
    a = MASKED.sample(tiny(), batch, options, generator=torch.Generator().manual_seed(5))
    b = MASKED.sample(tiny(), batch, options, generator=torch.Generator().manual_seed(5))
    c = MASKED.sample(tiny(), batch, options, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.ids, b.ids)
    assert not torch.equal(a.ids, c.ids)
    ar = SamplerConfig(temperature=1.0, top_k=5)
    x = AR.sample(tiny(causal=True), t2i_batch(), ar, generator=torch.Generator().manual_seed(5))
    y = AR.sample(tiny(causal=True), t2i_batch(), ar, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x.ids, y.ids)


def test_self_correction_remasks_and_terminates_within_bound() -> None:
    batch = joint_batch(2)
    # sampling at a high temperature commits unlikely tokens; the check with them masked disowns them
    sc = SelfCorrection(threshold=0.5, max_per_step=3, extra_steps=5)
    options = SamplerConfig(steps=4, image_steps=4, temperature=5.0, self_correction=sc)
    model = Counting(tiny())
    out = MASKED.sample(model, batch, options, history=True, generator=torch.Generator().manual_seed(0))
    check_filled(batch, out.ids)
    assert out.remasked > 0
    assert out.nfe == model.calls <= 4 + sc.extra_steps
    # a committed (non-mask) token was turned back into a mask in some step
    reverted = any(bool(((a != VOCAB.mask) & (b == VOCAB.mask)).any())
                   for a, b in zip(out.history, out.history[1:]))
    assert reverted
    # the check rows ride in the same call: a copy of the canvas with committed tokens masked
    B = len(batch)
    checks = [ids for ids, _ in model.inputs if ids.shape[0] == 2 * B]
    assert checks and model.rows == model.calls * B + len(checks) * B
    for ids in checks:
        canvas, check = ids[:B], ids[B:]
        differ = canvas != check
        assert bool(differ.any())
        assert bool((check[differ] == VOCAB.mask).all()) and bool((canvas[differ] != VOCAB.mask).all())
        assert bool(batch.target[differ].all())  # only sampler-committed target tokens are checked
        assert int(differ.sum(1).max()) <= sc.max_per_step
    # re-masking on every check forever still stops: at steps + extra_steps, with no mask left
    always = dataclasses.replace(options, self_correction=SelfCorrection(threshold=1.1, only_if_disagrees=False,
                                                                         extra_steps=3))
    out = MASKED.sample(tiny(), batch, always, generator=torch.Generator().manual_seed(0))
    check_filled(batch, out.ids)
    assert out.nfe == 4 + 3


def vqa_batch() -> Batch:
    return collate([vqa_prompt(codes(i), [[1, 2, 3], [4, 5]], VOCAB, LAYOUT) for i in range(3)], VOCAB)


def test_ar_kv_cache_equals_recompute() -> None:
    model = tiny(causal=True)
    for batch in (t2i_batch(), caption_batch(), vqa_batch()):
        n_target = int(batch.target[0].sum())
        for options in (SamplerConfig(), SamplerConfig(temperature=0.8, top_k=4)):
            runs = []
            for use_cache in (True, False):
                counting = Counting(model)
                out = AR.sample(counting, batch, dataclasses.replace(options, use_cache=use_cache, eos_fill=False),
                                generator=torch.Generator().manual_seed(2))
                assert out.nfe == counting.calls == n_target  # without eos_fill every target position is decoded
                fed = sum(ids.shape[1] for ids, _ in counting.inputs)  # positions run through the model
                span_end = int(batch.target[0].nonzero().max()) + 1
                if use_cache:  # every position once (the last target is predicted, never fed)
                    assert fed == span_end - 1
                else:
                    assert fed > span_end * (n_target - 1) // 2
                check_filled(batch, out.ids)
                runs.append(out.ids)
            assert torch.equal(*runs)


def test_ar_restricts_modality_and_fills_after_eos() -> None:
    bias = torch.zeros(VOCAB.size)
    bias[[VOCAB.mask, VOCAB.pad, VOCAB.image_offset + 1]] = 50.0
    out = AR.sample(Counting(tiny(causal=True), bias), caption_batch())
    check_filled(caption_batch(), out.ids)
    bias[VOCAB.eos] = 100.0  # eos everywhere: the regions are eos-filled
    batch = vqa_batch()
    out = AR.sample(Counting(tiny(causal=True), bias), batch)
    assert bool((out.ids[batch.target] == VOCAB.eos).all())
    with pytest.raises(ValueError):
        AR.sample(tiny(causal=False), batch)


def reference_ar(model: Transformer, batch: Batch) -> torch.Tensor:
    """Greedy AR decoding written out plainly: one row at a time, the whole prefix recomputed for every target
    position, a text region `<eos>` from its first `<eos>` on."""
    allowed = VOCAB.allowed_table(batch.ids.device)
    out = batch.ids.clone()
    for b in range(len(batch)):
        ended = False
        for p in range(batch.ids.shape[1]):
            text = bool(batch.target[b, p]) and int(batch.image_index[b, p]) < 0
            ended &= text
            if not bool(batch.target[b, p]):
                continue
            if ended:
                out[b, p] = VOCAB.eos
                continue
            logits = model(out[b : b + 1, :p], pad=batch.pad[b : b + 1, :p],
                           image_index=batch.image_index[b : b + 1, :p])[0, -1]  # (V,)
            modality = (batch.image_index[b, p : p + 1] >= 0).long()
            out[b, p] = restrict(logits[None].double(), modality, allowed).argmax(-1)[0]
            ended = text and int(out[b, p]) == VOCAB.eos
    return out


@pytest.mark.parametrize("make", [caption_batch, vqa_batch])
def test_ar_stops_at_eos_as_generate_does(make) -> None:
    """A row leaves once its last text region has emitted `<eos>`, a region every row has ended is skipped, and
    the call ends when every row is done: the same tokens as plain one-row decoding, in fewer calls and rows."""
    model = tiny(causal=True)
    with torch.no_grad():  # larger weights: logits that depend on the context, so rows end at different places
        for weight in model.parameters():
            weight.mul_(5.0)
    batch = make()
    cols = batch.target[0].nonzero().squeeze(1)  # (n,)
    breaks = (cols[1:] != cols[:-1] + 1).nonzero().squeeze(1)  # where a target region ends
    last_region = int(cols[breaks[-1] + 1]) if len(breaks) else int(cols[0])  # the last region's first position
    bias = torch.zeros(VOCAB.size)
    for boost in torch.arange(0.0, 4.0, 0.25).tolist():  # an <eos> boost that ends every row early, not alike
        bias[VOCAB.eos] = boost
        expected = reference_ar(Counting(model, bias), batch)
        is_eos = (expected == VOCAB.eos) & batch.target  # (B, T)
        ends = [int(row[last_region:].nonzero()[0]) + last_region if bool(row[last_region:].any()) else -1
                for row in is_eos]  # each row's first <eos> in the last region
        if min(ends) >= 0 and max(ends) < int(cols[-1]) and len({tuple(row.tolist()) for row in is_eos}) > 1:
            break
    else:
        raise AssertionError("no <eos> boost ended the rows early at different places")
    counting = Counting(model, bias)
    out = AR.sample(counting, batch, SamplerConfig())
    assert torch.equal(out.ids, expected)
    n_target = int(batch.target[0].sum())
    assert out.nfe == counting.calls < n_target  # the positions after every row's <eos> are never decoded
    assert out.forward_rows == counting.rows == int(out.row_nfe.sum()) < out.nfe * len(batch)  # rows left early
    if not len(breaks):  # one region: each row left at its <eos>
        assert out.row_nfe.tolist() == [out.nfe - (max(ends) - end) for end in ends]
    full = AR.sample(Counting(model, bias), batch, SamplerConfig(eos_fill=False))
    assert full.nfe == n_target  # without eos_fill every target position is decoded


# ---- learning: a tiny model trained with the project's loss is solved by the samplers ------------------
def toy_batch(n: int, g: torch.Generator) -> Batch:
    """`<joint> a1..a4 <sep> r1..r4 <soi> c1..c4 <eoi>`: r = a (text), c_j = code (a_j + j) mod K (image),
    built directly as a `Batch` (collating per-sample tensors would cost more than the training step)."""
    V = VOCAB
    a = torch.randint(0, 10, (n, 4), generator=g)  # (n, 4)
    c = V.image_to_token((a + torch.arange(4)) % V.codebook_size)  # (n, 4)
    col = torch.full((n, 1), 0)
    ids = torch.cat([col + V.joint, a, col + V.sep, a, col + V.soi, c, col + V.eoi], 1)  # (n, 16)
    target = torch.tensor([False] * 6 + [True] * 4 + [False] + [True] * 4 + [False]).expand(n, -1)
    image_index = torch.tensor([-1] * 11 + [0, 1, 2, 3] + [-1]).expand(n, -1)
    no = torch.zeros(n, 16, dtype=torch.bool)
    return Batch(ids, target.clone(), no, image_index.clone(), no.clone(), torch.full((n,), int(Task.JOINT)))


def train_toy(causal: bool, steps: int) -> Transformer:
    from mmdlm.diffusion import ar_loss, masked_diffusion_loss

    torch.manual_seed(0)
    # one layer of d=64 learns the toy in ~120 steps for every seed tried (2 layers stall for some seeds)
    cfg = ModelConfig(vocab_size=VOCAB.size, n_layer=1, n_head=4, n_embd=64, max_seq_len=32,
                      causal=causal, image_tokens=4, codebook_size=VOCAB.codebook_size, image_offset=VOCAB.image_offset,
                      tie_head=True)  # tied: the learning bars below were set on this head
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = toy_batch(64, g)
        out = ar_loss(model, batch) if causal else masked_diffusion_loss(model, batch, VOCAB, generator=g)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_tiny_model_learns_toy_task_and_samplers_solve_it() -> None:
    g = torch.Generator().manual_seed(123)
    clean = toy_batch(128, g)
    prompt = dataclasses.replace(clean, ids=clean.ids.masked_fill(clean.target, VOCAB.mask))

    def accuracy(ids: torch.Tensor) -> float:
        return float((ids[clean.target] == clean.ids[clean.target]).float().mean())

    mdm = train_toy(causal=False, steps=240)  # measured: 1.0 from step 120 (seeds 0-2)
    for options in (
        SamplerConfig(steps=4, image_steps=4),
        SamplerConfig(steps=4, image_steps=4, block_length=2),
        SamplerConfig(threshold=0.9),
        SamplerConfig(steps=4, image_steps=4, self_correction=SelfCorrection()),
    ):
        out = MASKED.sample(mdm, prompt, options)
        assert accuracy(out.ids) >= 0.9, (options, accuracy(out.ids))
    fast = MASKED.sample(mdm, prompt, SamplerConfig(threshold=0.9))
    assert fast.nfe < 8  # confident predictions commit together: fewer steps than the 8 tokens

    ar = train_toy(causal=True, steps=160)  # measured: 1.0 from step 120 (seeds 0-2)
    out = AR.sample(ar, prompt)
    assert accuracy(out.ids) >= 0.9


# ---- the scheduler component and its config ------------------------------------------------------------
def test_scheduler_step_by_step_equals_sample_and_callback_sees_every_step() -> None:
    """The diffusers loop written out (set_timesteps, model_inputs, step) gives `sample`'s result."""
    batch, model = joint_batch(2), tiny()
    config = SamplerConfig(steps=4, temperature=1.0, guidance_scale=1.0,
                           self_correction=SelfCorrection(threshold=0.5, extra_steps=2))
    seen: list[int] = []
    ref = MASKED.sample(model, batch, config, generator=torch.Generator().manual_seed(4),
                        callback=lambda i, canvas: seen.append(i))
    state = MASKED.set_timesteps(batch, config, generator=torch.Generator().manual_seed(4))
    while not state.done:
        MASKED.step(model(**MASKED.model_inputs(state)), state)
    assert torch.equal(state.canvas, ref.ids) and state.nfe == ref.nfe
    assert seen == list(range(1, ref.nfe + 1))


def test_ar_scheduler_decodes_rows_with_different_layouts_in_groups() -> None:
    """Training's validation batches mix tasks: each layout is decoded on its own, as if alone."""
    model = tiny(causal=True)
    samples = [caption_prompt(codes(0), VOCAB, LAYOUT), t2i_prompt([1, 2], VOCAB, LAYOUT, N_IMG),
               caption_prompt(codes(1), VOCAB, LAYOUT)]
    mixed = AR.sample(model, collate(samples, VOCAB))
    for i, s in enumerate(samples):
        alone = AR.sample(model, collate([s], VOCAB))
        assert torch.equal(mixed.ids[i, : len(s)], alone.ids[0, : len(s)])
    with pytest.raises(ValueError, match="anchored"):
        AR.sample(model, caption_batch(1), anchor=caption_batch(1).target)


def test_sampler_config_checks_its_values_and_the_cli_flags_map_onto_it() -> None:
    import argparse

    from mmdlm.sampling.arguments import add_sampler_arguments, sampler_from_args

    for bad in (dict(steps=0), dict(temperature=-1.0), dict(threshold=1.5), dict(guidance_scale=-2.0),
                dict(block_length=0), dict(confidence="loudest")):
        with pytest.raises(ValueError):
            SamplerConfig(**bad)
    parser = argparse.ArgumentParser()
    add_sampler_arguments(parser)
    base = SamplerConfig(steps=None, block_length=4, temperature=0.5)
    args = parser.parse_args(["--steps", "6", "--block-length", "0", "--threshold", "0.9", "--self-correction",
                              "--confidence", "margin"])
    config = sampler_from_args(parser, args, base)
    assert config == SamplerConfig(steps=6, block_length=None, temperature=0.5, threshold=0.9,
                                   self_correction=SelfCorrection(), confidence="margin")
    assert sampler_from_args(parser, parser.parse_args([]), base) == base  # absent flags keep the defaults
    assert sampler_from_args(parser, parser.parse_args(["--no-left-to-right"]), SamplerConfig(left_to_right=True)) \
        == SamplerConfig(left_to_right=False)
    assert sampler_from_args(parser, parser.parse_args(["--left-to-right"]), base).left_to_right
    with pytest.raises(SystemExit):  # a bad value is a usage error naming it
        sampler_from_args(parser, parser.parse_args(["--steps", "0"]), base)


def test_prefix_cache_refreshed_every_step_equals_no_cache_and_runs_only_the_targets_in_between() -> None:
    model = tiny()
    for batch, config in ((vqa_batch(), SamplerConfig(steps=4)),
                          (t2i_batch(), SamplerConfig(steps=4, temperature=1.0, guidance_scale=2.0))):
        plain = MASKED.sample(model, batch, config, generator=torch.Generator().manual_seed(1))
        every = MASKED.sample(model, batch, dataclasses.replace(config, prefix_cache=1),
                              generator=torch.Generator().manual_seed(1))
        assert torch.equal(plain.ids, every.ids) and plain.nfe == every.nfe
        counting = Counting(model)
        once = MASKED.sample(counting, batch, dataclasses.replace(config, prefix_cache=100),
                             generator=torch.Generator().manual_seed(1))
        check_filled(batch, once.ids)
        first = int(batch.target.float().argmax(1).min())  # a model without shift_logits caches all before it
        widths = [ids.shape[1] for ids, _ in counting.inputs]
        assert widths == [batch.ids.shape[1]] + [batch.ids.shape[1] - first] * (len(widths) - 1)
    with pytest.raises(ValueError, match="self_correction"):
        SamplerConfig(prefix_cache=2, self_correction=SelfCorrection())


def test_finished_rows_leave_the_batch_and_change_no_token() -> None:
    """Rows with fewer masks finish earlier; a finished row is not run again (nor kept in the prefix cache), and
    every row decodes as it would alone."""

    def anchored(batch: Batch, per_row: int) -> Batch:  # row i: its first i * per_row targets given
        ids = batch.ids.clone()
        for i in range(len(batch)):
            at = batch.target[i].nonzero().squeeze(1)[: i * per_row]
            is_image = batch.image_index[i, at] >= 0
            ids[i, at] = torch.where(is_image, VOCAB.image_offset + 1, 5)
        return dataclasses.replace(batch, ids=ids)

    prefixed = Transformer(dataclasses.replace(tiny().config, prefix_attention=True)).eval()
    prefixed.load_state_dict(tiny(seed=3).state_dict())
    cases = [(tiny(seed=3), anchored(caption_batch(4), 2), SamplerConfig(steps=None, threshold=0.5)),
             (prefixed, anchored(caption_batch(4), 2), SamplerConfig(steps=None, threshold=0.5)),
             (prefixed, anchored(t2i_batch(), 12), SamplerConfig(image_steps=8, threshold=0.9, guidance_scale=2.0))]
    for model, batch, config in cases:
        counting = Counting(model)
        together = MASKED.sample(counting, batch, config)
        rows = [ids.shape[0] for ids, _ in counting.inputs]
        copies = 2 if config.guidance_scale else 1
        assert rows[0] == copies * len(batch) and rows[-1] < rows[0], rows  # some rows left before the end
        for i in range(len(batch)):
            alone = MASKED.sample(model, batch.select(slice(i, i + 1)), config)
            assert torch.equal(together.ids[i], alone.ids[0])
        check_filled(batch, together.ids)


def test_eos_fill_marks_the_masks_after_a_regions_eos_and_nothing_else() -> None:
    from mmdlm.sampling.masked import eos_fill

    E, M = VOCAB.eos, VOCAB.mask
    canvas = torch.tensor([[1, 5, E, M, M, 0, 5, M, E, M, M],  # two regions: each fills after its <eos>
                           [1, 5, M, E, 6, M, 0, M, M, M, M],  # content after the <eos>: not a fill
                           [1, M, M, 5, E, E, 0, M, E, 7, M]])  # a mask before the <eos>; content after it
    text = torch.tensor([[0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1],
                         [0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1],
                         [0, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1]], dtype=torch.bool)
    expected = torch.zeros_like(text)
    expected[0, [3, 4, 9, 10]] = True
    assert torch.equal(eos_fill(canvas, text, E, M), expected)


def test_an_mdm_answer_ends_in_the_step_that_chooses_its_eos() -> None:
    model = tiny(seed=1)
    batch = vqa_batch()
    eos = torch.zeros(VOCAB.size)
    eos[VOCAB.eos] = 30.0  # <eos> everywhere: an answer's first step ends it
    biased = Counting(model, bias=eos)
    config = SamplerConfig(steps=None, block_length=1)
    filled = MASKED.sample(biased, batch, config)
    assert filled.nfe == 2 and bool((filled.ids[batch.target] == VOCAB.eos).all())  # a step per answer
    plain = MASKED.sample(Counting(model, bias=eos), batch, dataclasses.replace(config, eos_fill=False))
    assert plain.nfe == int(batch.target[0].sum()) and torch.equal(plain.ids, filled.ids)  # a step per token


def test_guidance_on_the_first_steps_only_drops_the_unconditional_rows_after_them() -> None:
    batch = t2i_batch()
    B = len(batch)
    prefixed = Transformer(dataclasses.replace(tiny().config, prefix_attention=True)).eval()
    prefixed.load_state_dict(tiny(seed=2).state_dict())
    for model in (tiny(seed=2), prefixed):
        config = SamplerConfig(image_steps=6, temperature=1.0, guidance_scale=2.0)
        every = MASKED.sample(model, batch, config, generator=torch.Generator().manual_seed(4))
        same = MASKED.sample(model, batch, dataclasses.replace(config, guidance_steps=6),
                             generator=torch.Generator().manual_seed(4))
        assert torch.equal(every.ids, same.ids)
        counting = Counting(model)
        some = MASKED.sample(counting, batch, dataclasses.replace(config, guidance_steps=2),
                             generator=torch.Generator().manual_seed(4))
        assert [ids.shape[0] for ids, _ in counting.inputs] == [2 * B] * 2 + [B] * 4
        check_filled(batch, some.ids)
        plain = MASKED.sample(model, batch, dataclasses.replace(config, guidance_steps=2, use_cache=False),
                              generator=torch.Generator().manual_seed(4))
        assert torch.equal(plain.ids, some.ids)  # the cache, halved when guidance ends, is still exact


def test_predict_over_a_modalitys_ids_equals_restricting_all_ids() -> None:
    from mmdlm.sampling.tokens import CONFIDENCE, predict, sample_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, VOCAB.size, generator=g)
    modality = torch.tensor([0, 1] * 5)
    allowed = VOCAB.allowed_table()
    columns = [row.nonzero().squeeze(1) for row in allowed]
    chosen, p, conf = predict(logits, modality, columns, 0.0, None, None, CONFIDENCE["margin"])
    full = restrict(logits.double(), modality, allowed)
    probs = full.softmax(-1)
    assert torch.equal(chosen, sample_tokens(full, 0.0))
    torch.testing.assert_close(p, probs.gather(1, chosen[:, None]).squeeze(1))
    torch.testing.assert_close(conf, CONFIDENCE["margin"](probs, chosen))
    sampled, _, _ = predict(logits, modality, columns, 1.0, g, None, CONFIDENCE["probability"])
    assert bool(allowed[modality, sampled].all())  # a sample stays in its modality


def test_a_text_temperature_of_its_own_reads_text_greedily_and_samples_images() -> None:
    from mmdlm.sampling.tokens import CONFIDENCE, predict, sample_tokens

    logits = torch.randn(400, VOCAB.size, generator=torch.Generator().manual_seed(1))
    modality = torch.tensor([0, 1] * 200)
    allowed = VOCAB.allowed_table()
    columns = [row.nonzero().squeeze(1) for row in allowed]
    config = SamplerConfig(temperature=1.0, text_temperature=0.0)
    assert config.temperatures == (0.0, 1.0) and SamplerConfig(temperature=0.5).temperatures == (0.5, 0.5)
    chosen, _, _ = predict(logits, modality, columns, config.temperatures, torch.Generator().manual_seed(2), None,
                           CONFIDENCE["probability"])
    greedy = sample_tokens(restrict(logits.double(), modality, allowed), 0.0)
    text = modality == 0
    assert torch.equal(chosen[text], greedy[text]) and not torch.equal(chosen[~text], greedy[~text])
    with pytest.raises(ValueError, match="temperature"):
        SamplerConfig(text_temperature=-1.0)
