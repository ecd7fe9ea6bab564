"""The pipeline's user-level API on the tiny model folder: diffusers-style `pipe(prompt)`, `.to(device, dtype)`,
PIL images out, one `SamplerConfig` per call with per-task defaults."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmdlm.pipeline import DEFAULT_SAMPLERS, MMDLMPipeline
from mmdlm.sampling import MaskedScheduler, SamplerConfig


@pytest.fixture(scope="module")
def pipe(tiny_model_dir) -> MMDLMPipeline:
    torch.set_num_threads(1)
    return MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")


def test_call_is_text_to_image_and_gives_pil_images(pipe):
    out = pipe("a large red circle at the top left", steps=2, seed=3)
    same = pipe.text_to_image(["a large red circle at the top left"], steps=2, seed=3)
    assert torch.equal(out.codes, same.codes) and out.nfe == 2
    images = out.pil()
    assert len(images) == 1 and images[0].size == (pipe.vq.image_size,) * 2 and images[0].mode == "RGB"


def test_the_pipeline_holds_the_scheduler_and_a_default_sampler_per_task(pipe):
    assert isinstance(pipe.scheduler, MaskedScheduler) and not pipe.is_autoregressive
    assert pipe.sampler("caption") == DEFAULT_SAMPLERS["caption"]
    assert pipe.sampler("text_to_image", steps=3) == dataclasses.replace(DEFAULT_SAMPLERS["text_to_image"], steps=3)
    mine = SamplerConfig(steps=2)
    assert pipe.sampler("text_to_image", mine) == mine  # a whole config replaces the default
    with pytest.raises(TypeError):
        pipe.sampler("answer", stepz=3)  # a misspelt option is an error, not ignored
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert pipe.caption(image, sampler=mine).nfe == 2
    assert pipe.caption(image, steps=3, block_length=None, threshold=None).nfe == 3


def test_to_moves_the_model_to_a_dtype_and_back(pipe):
    """`to` moves the model and the image tokenizer together (nothing is left behind on another device); a
    dtype is the model's only: the VQ stays float32 and still decodes."""

    def vq_devices_and_dtypes() -> set:
        return {(p.device, p.dtype) for p in pipe.vq.parameters()}

    codes = pipe.encode_images(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    before = pipe.processor.decode_images(codes)
    pipe.to(dtype=torch.bfloat16)
    try:
        assert next(pipe.model.parameters()).dtype == torch.bfloat16
        assert vq_devices_and_dtypes() == {(pipe.device, torch.float32)}
        out = pipe.text_to_image(["a small blue square"], steps=2)
        assert out.images.dtype == torch.float32 and out.codes.shape == (1, *pipe.vq.grid)
        assert torch.equal(pipe.processor.decode_images(codes), before)
    finally:
        pipe.to("cpu", torch.float32)
    assert next(pipe.model.parameters()).dtype == torch.float32 and pipe.device == torch.device("cpu")
    assert vq_devices_and_dtypes() == {(torch.device("cpu"), torch.float32)} and pipe.processor.device == pipe.device
    assert torch.equal(pipe.processor.decode_images(codes), before)


def test_to_a_device_leaves_no_tensor_behind(tiny_model_dir):
    """`pipe.to(device)` moves every parameter and buffer of the model and of the image tokenizer: checked on
    the meta device, the one other device a CPU has (a fresh pipeline: meta tensors hold no values)."""
    pipe = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu").to("meta", torch.bfloat16)
    tensors = [*pipe.model.parameters(), *pipe.model.buffers(), *pipe.vq.parameters(), *pipe.vq.buffers()]
    assert {t.device.type for t in tensors} == {"meta"}
    assert pipe.device == pipe.processor.device == torch.device("meta")
    assert {p.dtype for p in pipe.vq.parameters()} == {torch.float32}  # a dtype is the model's only
