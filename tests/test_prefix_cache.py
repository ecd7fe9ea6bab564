"""Exact prefix caching: a model trained with prefix attention (LaViDa's Prefix-DLM) decodes the same
tokens with its prompt's keys and values computed once as with every step recomputing the whole sequence, for
every pipeline task; its prompt does not see the generated region, a plain bidirectional model's does."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from mmdlm.diffusion import masked_diffusion_loss
from mmdlm.model import Transformer
from mmdlm.pipeline import Blank, MMDLMPipeline
from mmdlm.sequence import SequenceBuilder, collate

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")


def records(n: int, grid: tuple[int, int], codebook: int, seed: int) -> list[dict]:
    """Scenes whose image codes say what the caption says: code = colour * 3 + shape, everywhere."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        c, s = rng.randrange(len(COLOURS)), rng.randrange(len(SHAPES))
        codes = torch.full(grid, (c * len(SHAPES) + s) % codebook)
        codes[rng.randrange(grid[0]), rng.randrange(grid[1])] = rng.randrange(codebook)  # some noise
        out.append({"codes": codes, "captions": [f"a large {COLOURS[c]} {SHAPES[s]}"],
                    "qa": [{"question": f"what colour is the {SHAPES[s]}?", "answer": COLOURS[c]}]})
    return out


def train_toy(pipe: MMDLMPipeline, config, steps: int, task: str | None = None,
              corrupt: float = 0.0) -> tuple[Transformer, list[float]]:
    """The folder's weights in a model built with `config`, trained `steps` steps on the toy `records` (tasks drawn
    by the builder, or `task`); masked diffusion (with `corrupt`), or the AR loss for a causal config. Returns the
    model in eval mode and its losses."""
    from mmdlm.diffusion import ar_loss

    torch.manual_seed(0)
    model = Transformer(config)
    model.load_state_dict(pipe.model.state_dict())
    builder = SequenceBuilder(pipe.vocab, pipe.tokenizer, pipe.layout, seed=0)
    data = records(64, pipe.vq.grid, pipe.vocab.codebook_size, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for step in range(steps):
        batch = collate([builder.build(r, task) for r in data[(step * 16) % 64:][:16]], pipe.vocab)
        if config.causal:
            loss = ar_loss(model, batch).loss
        else:
            loss = masked_diffusion_loss(model, batch, pipe.vocab, generator=g, corrupt=corrupt).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


@pytest.fixture(scope="module")
def prefix_pipe(tiny_model_dir) -> MMDLMPipeline:
    """The tiny folder's model rebuilt with prefix attention (and the AR-adapted head), trained 40 steps on it."""
    torch.set_num_threads(1)
    pipe = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    config = replace(pipe.model.config, prefix_attention=True, shift_logits=True)
    model, losses = train_toy(pipe, config, 40)
    assert sum(losses[-5:]) < sum(losses[:5])  # it did learn something with the option on
    pipe.model = model
    return pipe


def test_the_prompt_does_not_see_the_generated_region_with_prefix_attention_only(prefix_pipe) -> None:
    pipe = prefix_pipe
    builder = SequenceBuilder(pipe.vocab, pipe.tokenizer, pipe.layout, seed=0)
    record = records(1, pipe.vq.grid, pipe.vocab.codebook_size, seed=1)[0]
    sample = collate([builder.build(record, "caption")], pipe.vocab)
    P = int(sample.prefix[0])
    assert 0 < P < sample.ids.shape[1] and bool(sample.target[0, P]) and not bool(sample.target[0, :P].any())
    changed = sample.ids.clone()
    changed[0, P + 1] = pipe.vocab.mask  # a token of the generated region
    plain = Transformer(replace(pipe.model.config, prefix_attention=False)).eval()
    plain.load_state_dict(pipe.model.state_dict())
    with torch.no_grad():
        for model, hidden in ((pipe.model, True), (plain, False)):
            a = model(sample.ids, sample.pad, sample.image_index, prefix=sample.prefix)[0, : P - 1]
            b = model(changed, sample.pad, sample.image_index, prefix=sample.prefix)[0, : P - 1]
            assert torch.allclose(a, b) == hidden  # logits at i read position i - 1 (shift_logits)


def cached_and_uncached(pipe: MMDLMPipeline, run) -> tuple[list[int], int]:
    """Run a task with and without the cache: equal tokens, and equal logits at every step (a stale prompt,
    as a model without prefix attention would give, changes the logits before it changes a greedy token)."""
    calls: list[int] = []
    logits: list[torch.Tensor] = []
    forward = pipe.model.forward

    def recording(ids, *args, **kwargs):
        calls.append(ids.shape[1])
        logits.append(forward(ids, *args, **kwargs))
        return logits[-1]

    pipe.model.forward = recording
    try:
        cached = run(use_cache=True)
        widths, cached_logits = list(calls), list(logits)
        calls.clear()
        logits.clear()
        plain = run(use_cache=False)
    finally:
        del pipe.model.forward
    assert torch.equal(cached, plain)
    assert all(w == calls[0] for w in calls) and len(widths) == len(calls)  # same steps; plain: full width
    for a, b in zip(cached_logits, logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    return widths, calls[0]


def test_cached_and_uncached_sampling_give_identical_tokens_for_every_task(prefix_pipe) -> None:
    pipe = prefix_pipe
    images = pipe.vq.decode(torch.randint(0, pipe.vocab.codebook_size, (2, *pipe.vq.grid),
                                          generator=torch.Generator().manual_seed(0)))  # (2, 3, H, W)
    region = torch.zeros(2, *pipe.vq.grid, dtype=torch.bool)
    region[:, :2] = True
    tasks = {
        "caption": lambda **o: pipe.caption(images, temperature=0.0, **o).ids,
        "answer": lambda **o: pipe.answer(images, ["what colour is the circle?"] * 2, eos_fill=False, **o).ids,
        "text_to_image": lambda **o: pipe.text_to_image(["a large red circle", "a small blue square"],
                                                        temperature=0.0, **o).codes,
        "joint": lambda **o: pipe.generate_joint(2, temperature=0.0, steps=4, **o).codes,
        "inpaint": lambda **o: pipe.inpaint(images, region, ["a large red circle"] * 2, temperature=0.0,
                                            guidance_scale=2.0, **o).codes,
        "document": lambda **o: pipe.complete_document([[images[i], "make the circle blue", Blank(image=True)]
                                                        for i in range(2)], temperature=0.0, steps=4,
                                                       guidance_scale=2.0, image_guidance_scale=1.0, **o).ids,
        "infill": lambda **o: pipe.infill(["a large [MASK] circle", "a [MASK] red [MASK]"], **o).ids,
    }
    saved = {}
    for task, run in tasks.items():
        widths, full = cached_and_uncached(pipe, run)
        saved[task] = (widths, full)
    # the prompt is computed once: every step after the first runs the sequence from the prompt's end on
    for task in ("caption", "answer", "text_to_image", "inpaint", "document"):
        widths, full = saved[task]
        assert widths[0] == full and len(widths) > 1 and all(w < full for w in widths[1:]), (task, widths)
