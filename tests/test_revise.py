"""Revision: a model's leave-one-out token scores, the corrective step that re-masks and refills only the
tokens it doubts, an AR model drafting for a masked-diffusion model (hybrid), and best-of-n by self-scoring."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmdlm.model import Transformer
from mmdlm.pipeline import HYBRID_REVISION, MMDLMPipeline
from mmdlm.processor import MMDLMProcessor
from mmdlm.sampling import SamplerConfig
from mmdlm.sampling.revise import Revision, content, doubtful, revise, token_scores
from mmdlm.sequence import caption_prompt, caption_sample, collate
from tests.test_prefix_cache import COLOURS, records, train_toy


def trained(pipe: MMDLMPipeline, steps: int, causal: bool = False, corrupt: float = 0.0) -> Transformer:
    """The tiny folder's model trained `steps` steps on captions of scenes whose codes say colour and shape."""
    return train_toy(pipe, replace(pipe.model.config, causal=causal), steps, "caption", corrupt)[0]


@pytest.fixture(scope="module")
def pipes(tiny_model_dir) -> tuple[MMDLMPipeline, MMDLMPipeline]:
    """(masked-diffusion pipeline trained with correction, AR twin) on the toy captions."""
    torch.set_num_threads(1)
    base = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    mdm = MMDLMPipeline(trained(base, 80, corrupt=0.1), base.processor)
    ar = MMDLMPipeline(trained(base, 80, causal=True), base.processor)  # its scheduler: left to right
    return mdm, ar


def caption_batch(pipe: MMDLMPipeline, captions: list[str], codes: torch.Tensor):
    given = [caption_sample(c, pipe.tokenizer.encode(t), pipe.vocab, pipe.layout) for c, t in zip(codes, captions)]
    return collate(given, pipe.vocab)


def test_token_scores_are_each_position_predicted_with_itself_masked(pipes) -> None:
    mdm, ar = pipes
    data = records(2, mdm.vq.grid, mdm.vocab.codebook_size, seed=3)
    batch = caption_batch(mdm, [r["captions"][0] for r in data], torch.stack([r["codes"] for r in data]))
    positions = batch.target.clone()
    positions[:, -3:] = False
    scores = token_scores(mdm.model, batch, positions, mdm.vocab, chunk=5)  # several calls
    assert scores.nfe == -(-int(positions.sum()) // 5) and scores.rows == int(positions.sum())
    allowed = mdm.vocab.allowed_table()
    with torch.no_grad():
        for b, i in positions.nonzero().tolist():
            x = batch.ids[b : b + 1].clone()
            x[0, i] = mdm.vocab.mask
            logits = mdm.model(x, batch.pad[b : b + 1], batch.image_index[b : b + 1], prefix=batch.prefix[b : b + 1])
            p = logits[0, i].double().masked_fill(~allowed[0], float("-inf")).softmax(-1)
            assert scores.p[b, i].item() == pytest.approx(p[batch.ids[b, i]].item(), rel=1e-6)
            assert int(scores.best[b, i]) == int(p.argmax())
    assert bool((scores.p[~positions] == 0).all())
    # a causal model: teacher-forced p(x_i | x_<i), one call
    causal = token_scores(ar.model, batch, positions, ar.vocab)
    assert causal.nfe == 1
    with torch.no_grad():
        b, i = positions.nonzero()[3].tolist()
        logits = ar.model(batch.ids[b : b + 1, :i], batch.pad[b : b + 1, :i], batch.image_index[b : b + 1, :i])
        p = logits[0, -1].double().masked_fill(~allowed[0], float("-inf")).softmax(-1)
    assert causal.p[b, i].item() == pytest.approx(p[batch.ids[b, i]].item(), rel=1e-6)


def test_the_corrective_step_rewrites_only_the_doubtful_tokens(pipes) -> None:
    mdm, _ = pipes
    data = records(16, mdm.vq.grid, mdm.vocab.codebook_size, seed=7)
    wrong = []
    for r in data:  # one wrong colour word per caption
        colour = r["captions"][0].split()[2]
        wrong.append(r["captions"][0].replace(colour, COLOURS[(COLOURS.index(colour) + 1) % len(COLOURS)]))
    codes = torch.stack([r["codes"] for r in data])
    batch = caption_batch(mdm, wrong, codes)
    prompt = collate([caption_prompt(c, mdm.vocab, mdm.layout) for c in codes], mdm.vocab)
    revision = Revision(threshold=0.5, max_tokens=2)
    scores = token_scores(mdm.model, batch, prompt.target, mdm.vocab)
    again = doubtful(scores, prompt.target, batch.ids, revision)
    assert int(again.sum(1).max()) <= 2
    out = revise(mdm.model, mdm.scheduler, replace(prompt, ids=batch.ids), prompt.target, mdm.vocab,
                 SamplerConfig(steps=None), revision)
    assert torch.equal(out.ids[~again], batch.ids[~again])  # the rest is kept as it was
    assert torch.equal(out.remasked, again.sum(1))
    assert out.nfe == 1 + int(again.sum(1).max())  # one scoring call, then one token per step
    # revise_caption is the same step on captions given as text (images through the image tokenizer)
    images = mdm.vq.decode(codes)
    by_text = mdm.revise_caption(images, wrong, revision, steps=None)
    seen = mdm.encode_images(images)
    given = collate([caption_prompt(c, mdm.vocab, mdm.layout) for c in seen], mdm.vocab)
    canvas = caption_batch(mdm, wrong, seen).ids
    positions = content(canvas, given.target, mdm.vocab.eos)
    expected = revise(mdm.model, mdm.scheduler, replace(given, ids=canvas), positions,
                      mdm.vocab, SamplerConfig(steps=None), revision, torch.Generator().manual_seed(0))
    assert torch.equal(by_text.ids, expected.ids) and by_text.nfe == expected.nfe
    # (that a trained model finds and fixes a wrong colour word: tests/test_learning.py)


def test_an_ar_model_can_only_rewrite_from_its_first_doubt_on(pipes) -> None:
    mdm, ar = pipes
    data = records(4, mdm.vq.grid, mdm.vocab.codebook_size, seed=9)
    codes = torch.stack([r["codes"] for r in data])
    batch = caption_batch(ar, ["a large red circle and a small blue square"] * 4, codes)
    prompt = collate([caption_prompt(c, ar.vocab, ar.layout) for c in codes], ar.vocab)
    revision = Revision(threshold=1.0, only_if_disagrees=False, max_tokens=1)  # doubt the least likely token
    scores = token_scores(ar.model, batch, prompt.target, ar.vocab)
    first = doubtful(scores, prompt.target, batch.ids, revision).float().argmax(1)  # (B,)
    out = revise(ar.model, ar.scheduler, replace(prompt, ids=batch.ids), prompt.target, ar.vocab,
                 SamplerConfig(steps=None), revision)
    for b in range(4):
        f = int(first[b])
        assert torch.equal(out.ids[b, :f], batch.ids[b, :f])  # kept up to the first doubt
        assert int(out.remasked[b]) == int(prompt.target[b, f:].sum())  # everything after it written again


def test_hybrid_the_ar_twin_drafts_and_the_mdm_revises(pipes) -> None:
    mdm, ar = pipes
    data = records(6, mdm.vq.grid, mdm.vocab.codebook_size, seed=11)
    images = mdm.vq.decode(torch.stack([r["codes"] for r in data]))
    draft = ar.caption(images)
    revision = Revision(max_tokens=3)
    hybrid = mdm.caption(images, draft=ar, revision=revision)
    region = collate([caption_prompt(c, mdm.vocab, mdm.layout) for c in mdm.encode_images(images)], mdm.vocab).target
    changed = (hybrid.ids != draft.ids) & region
    assert bool((changed == (hybrid.ids != draft.ids)).all())  # only the caption region is touched
    assert int(changed.sum(1).max()) <= 3  # at most max_tokens per row in one round
    assert hybrid.nfe > draft.nfe  # the draft's forwards, the scoring call and the refill
    # the default: only the tokens the drafter itself gave p < draft_confidence are judged
    gated = mdm.caption(images, draft=ar)
    prompt = collate([caption_prompt(c, mdm.vocab, mdm.layout) for c in mdm.encode_images(images)], mdm.vocab)
    unsure = token_scores(ar.model, replace(prompt, ids=draft.ids), region, ar.vocab).p
    unsure = unsure < HYBRID_REVISION.draft_confidence
    assert bool((gated.ids != draft.ids)[~unsure].logical_not().all())
    other = MMDLMPipeline(ar.model, MMDLMProcessor(ar.tokenizer, ar.vq, replace(ar.layout, caption_len=8)))
    with pytest.raises(ValueError, match="cannot draft"):
        mdm.caption(images, draft=other)


def test_best_of_n_keeps_the_image_whose_prompt_the_model_finds_most_likely(pipes) -> None:
    mdm, _ = pipes
    prompts = ["a large red circle", "a small blue square"]
    sampler = SamplerConfig(steps=3, temperature=1.0)
    best = mdm.text_to_image(prompts, sampler, seed=4, best_of=3)
    every = mdm.text_to_image([p for p in prompts for _ in range(3)], sampler, seed=4)  # the same 6 candidates
    score = mdm.caption_likelihood(every.codes, [p for p in prompts for _ in range(3)]).view(2, 3)
    keep = score.argmax(1) + torch.arange(2) * 3
    assert torch.equal(best.codes, every.codes[keep])
    assert best.nfe == every.nfe + 1
    assert len(set(map(tuple, every.codes.flatten(1).tolist()))) > 1  # the candidates differ
    with pytest.raises(ValueError, match="best_of"):
        mdm.text_to_image(prompts, best_of=0)
