"""Every pipeline task on a block-diffusion model: each fills its blanks with legal ids, keeps what it was given
(inpainting's cells, infilling's words), and the likelihood-based ones (caption scoring, revision, infill length)
read the model's blocks.

    python -m pytest -q tests/test_block_pipeline.py
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmdlm.model import Transformer
from mmdlm.pipeline import BLANK, Blank, MMDLMPipeline
from mmdlm.sampling import BlockScheduler, scheduler_for


@pytest.fixture(scope="module")
def block_pipe(tiny_model_dir) -> MMDLMPipeline:
    """The tiny folder's (random) weights as a block-diffusion model: text blocks of 4, image bands of 2 rows."""
    torch.set_num_threads(1)
    pipe = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    config = replace(pipe.model.config, shift_logits=True, block_diffusion=True, block_size=4, image_block_rows=2)
    model = Transformer(config)
    model.load_state_dict(pipe.model.state_dict())
    pipe.model = model.eval()
    pipe.scheduler = scheduler_for(config, pipe.vocab)
    assert isinstance(pipe.scheduler, BlockScheduler)
    return pipe


def images(pipe: MMDLMPipeline, n: int) -> torch.Tensor:
    size = pipe.vq.image_size
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(n))  # Float[n, 3, H, W]


def test_text_tasks(block_pipe) -> None:
    codes = images(block_pipe, 2)
    captions = block_pipe.caption(codes)
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
    for out in (fixed, chosen):
        assert out.texts[0].startswith("a large") and out.texts[0].endswith("circle")


def test_a_document_with_text_and_image_blanks(block_pipe) -> None:
    out = block_pipe.complete_document([[images(block_pipe, 1)[0], Blank(), Blank(image=True)]])
    assert len(out.documents) == 1 and len(out.documents[0]) == 3
