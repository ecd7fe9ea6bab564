"""Every pipeline task on a block-diffusion model: each fills its blanks with legal ids, keeps what it was given
(inpainting's cells, infilling's words), decodes the same tokens with the KV cache as recomputing every block each
call (a tiny model trained with the block loss), and the likelihood-based ones (caption scoring, revision, infill
length) read the model's blocks.

    python -m pytest -q tests/test_block_pipeline.py
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from mmdlm.blocks import model_blocks
from mmdlm.diffusion import masked_diffusion_loss
from mmdlm.model import Transformer
from mmdlm.pipeline import BLANK, Blank, MMDLMPipeline
from mmdlm.sampling import BlockScheduler, scheduler_for
from mmdlm.sequence import SequenceBuilder, collate

COLOURS, SHAPES = ("red", "green", "blue"), ("circle", "square")


def records(pipe: MMDLMPipeline, n: int) -> list[dict]:
    """Scenes whose codes say what the caption says."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        c, s = rng.randrange(len(COLOURS)), rng.randrange(len(SHAPES))
        codes = torch.full(pipe.vq.grid, (c * len(SHAPES) + s) % pipe.vocab.codebook_size)
        out.append({"codes": codes, "captions": [f"a large {COLOURS[c]} {SHAPES[s]}"],
                    "qa": [{"question": f"what colour is the {SHAPES[s]}?", "answer": COLOURS[c]}]})
    return out


@pytest.fixture(scope="module")
def block_pipe(tiny_model_dir) -> MMDLMPipeline:
    """The tiny folder's weights as a block-diffusion model (text blocks of 4, image bands of 2 rows), trained 30
    steps with the block loss."""
    torch.set_num_threads(1)
    pipe = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    config = replace(pipe.model.config, shift_logits=True, block_diffusion=True, block_size=4, image_block_rows=2)
    torch.manual_seed(0)
    model = Transformer(config)
    model.load_state_dict(pipe.model.state_dict())
    builder = SequenceBuilder(pipe.vocab, pipe.tokenizer, pipe.layout, seed=0)
    data = records(pipe, 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g, losses = torch.Generator().manual_seed(0), []
    for step in range(30):
        batch = collate([builder.build(r) for r in data[(step * 16) % 64 :][:16]], pipe.vocab)
        loss = masked_diffusion_loss(model, batch, pipe.vocab, generator=g, block=model_blocks(config, batch)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < sum(losses[:5])  # it learned something
    pipe.model = model.eval()
    pipe.scheduler = scheduler_for(config, pipe.vocab)
    assert isinstance(pipe.scheduler, BlockScheduler)
    return pipe


def images(pipe: MMDLMPipeline, n: int) -> torch.Tensor:
    size = pipe.vq.image_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n))  # Float[n, 3, H, W]


def test_text_tasks(block_pipe) -> None:
    codes = images(block_pipe, 2)
    captions = block_pipe.caption(codes, eos_fill=False)  # every block decoded (a 30-step model may say <eos> first)
    answers = block_pipe.answer(codes, ["what colour is the circle?", "how many shapes are there?"])
    assert len(captions.texts) == 2 and len(answers.texts) == 2 and captions.nfe > 1
    scores = block_pipe.caption_likelihood(codes, ["a red circle", "a blue square"])
    assert scores.shape == (2,) and bool(torch.isfinite(scores).all()) and bool((scores < 0).all())
    revised = block_pipe.revise_caption(codes, ["a red circle", "a blue square"])
    assert len(revised.texts) == 2


def test_image_tasks_keep_what_they_were_given(block_pipe) -> None:
    drawn = block_pipe.text_to_image(["a red circle", "a small blue square"])
    assert drawn.codes.shape == (2, *block_pipe.vq.grid)
    joint = block_pipe.generate_joint(2)
    assert joint.codes.shape == (2, *block_pipe.vq.grid) and len(joint.captions) == 2
    pictures = images(block_pipe, 2)
    codes = block_pipe.encode_images(pictures).cpu()  # (2, h, w)
    h, w = block_pipe.vq.grid
    region = torch.zeros(2, h, w, dtype=torch.bool)
    region[:, 1:3, 1:3] = True  # a square in the middle: given cells before and after it
    out = block_pipe.inpaint(pictures, region)
    assert torch.equal(out.codes[~region], codes[~region])
    edited = block_pipe.edit(pictures, ["make the circle red", "make it blue"])
    assert edited.codes.shape == codes.shape


def test_infilling_keeps_the_given_words_and_chooses_a_length(block_pipe) -> None:
    text = f"a large {BLANK} circle"
    fixed = block_pipe.infill([text], tokens_per_blank=2)
    chosen = block_pipe.infill([text], tokens_per_blank=None, max_blank=2)
    circle = block_pipe.processor.encode_text(" circle")
    for out in (fixed, chosen):
        assert out.texts[0].startswith("a large")
        row = out.ids[0].tolist()
        assert any(row[i : i + len(circle)] == circle for i in range(len(row)))  # the given word after the blank


def test_a_document_with_text_and_image_blanks(block_pipe) -> None:
    out = block_pipe.complete_document([[images(block_pipe, 1)[0], Blank(), Blank(image=True)]])
    assert len(out.documents) == 1 and len(out.documents[0]) == 3


TASKS = {
    "caption": lambda pipe, **kw: pipe.caption(images(pipe, 2), **kw).texts,
    "answer": lambda pipe, **kw: pipe.answer(images(pipe, 2), ["what colour is the circle?"] * 2, **kw).texts,
    "text_to_image": lambda pipe, **kw: pipe.text_to_image(["a red circle", "a blue square"], **kw).codes,
    "joint": lambda pipe, **kw: pipe.generate_joint(2, **kw).codes,
    "inpaint": lambda pipe, **kw: pipe.inpaint(images(pipe, 2), torch.ones(2, *pipe.vq.grid, dtype=torch.bool).tril(),
                                               **kw).codes,
    "infill": lambda pipe, **kw: pipe.infill([f"a large {BLANK} circle"], tokens_per_blank=2, **kw).texts,
    "edit": lambda pipe, **kw: pipe.edit(images(pipe, 2), ["make the circle red"] * 2, **kw).codes,
}


@pytest.mark.parametrize("task", sorted(TASKS))
def test_the_kv_cache_decodes_what_recomputing_every_block_decodes(block_pipe, task: str) -> None:
    cached = TASKS[task](block_pipe, seed=3)
    recomputed = TASKS[task](block_pipe, seed=3, use_cache=False)
    if isinstance(cached, torch.Tensor):
        assert torch.equal(cached, recomputed)
    else:
        assert cached == recomputed
