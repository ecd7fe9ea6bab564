"""`MMDLMPipeline`: processor (text + image tokenizer) + transformer + scheduler, with one method per task.

diffusers-style: the pipeline holds its components (the `MMDLMProcessor` turns inputs into ids and ids
back into text and images), `from_pretrained(DIR)` loads a folder written by `mmdlm.export` (or
`save_pretrained`: both through `mmdlm.export.write_model_folder`), and every task lays out a sequence with
a masked target region (`mmdlm.sequence`) and hands it to the scheduler the model was trained for
(`mmdlm.sampling`): masked diffusion, or left to right with a KV cache for the AR twin. Each task has a
default `SamplerConfig` (`DEFAULT_SAMPLERS`); a call passes another (`sampler=`) and/or overrides some of its
fields by name.

    pipe = MMDLMPipeline.from_pretrained("runs/quickstart/model")
    pipe.answer([image], ["what color is the circle?"]).texts      # ['red']
    pipe.text_to_image(["a large red circle at the top left"], guidance_scale=3.0).images
    pipe.infill(["a large [MASK] circle at the top left"]).texts
    pipe.caption([image], sampler=SamplerConfig(steps=8, threshold=0.9)).texts

All methods are batched, deterministic given `seed`, and return the number of forward passes (`nfe`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file

from mmdlm.export import CHECKSUM_KEY, CONFIG_FILE, WEIGHTS_FILE, read_config, verify_weights, write_model_folder
from mmdlm.model import ModelConfig, Transformer
from mmdlm.processor import MMDLMProcessor
from mmdlm.sampling import SamplerConfig, SampleResult, StepCallback, scheduler_for
from mmdlm.sampling.config import DEFAULT_SAMPLERS  # each task's sampler, re-exported here
from mmdlm.sequence import (
    Batch,
    Layout,
    Sample,
    caption_prompt,
    collate,
    joint_prompt,
    mask_target,
    t2i_prompt,
    t2i_sample,
    text_prompt,
    vqa_prompt,
)
from mmdlm.text_tokenizer import TextTokenizer
from mmdlm.vocab import Vocab

BLANK = "[MASK]"  # marks a span to fill in `infill`


@dataclass
class TextOutput:
    texts: list[str]
    nfe: int
    ids: torch.Tensor | None = field(default=None, repr=False)  # Long[B, T] the final canvas


@dataclass
class ImageOutput:
    images: torch.Tensor  # Float[B, 3, H, W] in [0, 1]
    codes: torch.Tensor  # Long[B, h, w]
    nfe: int
    history: list[torch.Tensor] | None = None  # Long[B, h, w] codes after each step (mask = -1)

    def pil(self) -> list[Image.Image]:
        """The images as RGB PIL images."""
        return to_pil_images(self.images)


@dataclass
class JointOutput:
    images: torch.Tensor  # Float[B, 3, H, W]
    codes: torch.Tensor  # Long[B, h, w]
    captions: list[str]
    nfe: int

    def pil(self) -> list[Image.Image]:
        """The images as RGB PIL images."""
        return to_pil_images(self.images)


def to_pil_images(images: torch.Tensor) -> list[Image.Image]:
    """Float[B, 3, H, W] in [0, 1] -> RGB PIL images."""
    from torchvision.transforms.functional import to_pil_image

    return [to_pil_image(im.clamp(0, 1)) for im in images.cpu()]




class MMDLMPipeline:
    """A trained mmdlm model with its processor (tokenizers, vocab, layout); see the module docstring."""

    def __init__(self, model: Transformer, processor: MMDLMProcessor, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor.to(self.device)
        self.scheduler = scheduler_for(model.config, processor.vocab)

    # the processor's parts, as many callers read them
    @property
    def tokenizer(self) -> TextTokenizer:
        return self.processor.tokenizer

    @property
    def vq(self) -> torch.nn.Module:  # a vision.load image tokenizer
        return self.processor.vq

    @property
    def vocab(self) -> Vocab:
        return self.processor.vocab

    @property
    def layout(self) -> Layout:
        return self.processor.layout

    # ---- loading / saving -------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> MMDLMPipeline:
        """Load a model folder written by `mmdlm.export` / `save_pretrained`.

        model.safetensors is checked against the sha256 that config.json records (`CorruptModelError`, a
        ValueError, when it differs); a folder exported before checksums loads with a warning.
        """
        path = Path(path)
        config = read_config(path)
        if not verify_weights(path, config):
            warnings.warn(f"{str(path / CONFIG_FILE)!r} records no {CHECKSUM_KEY} (exported by an older mmdlm): "
                          f"the weights are loaded unverified", stacklevel=2)
        mc = config["model"]
        if isinstance(mc.get("image_grid"), list):
            mc["image_grid"] = tuple(mc["image_grid"])
        model = Transformer(ModelConfig(**mc))
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(model, MMDLMProcessor.from_pretrained(path), device)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write the pipeline as a self-contained folder (config.json with the weights' sha256, safetensors,
        tokenizers), as `mmdlm.export` does."""
        return write_model_folder(self.model, self.processor, path)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> MMDLMPipeline:
        """Move the model and the image tokenizer to a device and/or the model to a dtype, in place, as
        diffusers' `pipe.to("cuda", torch.bfloat16)`; returns the pipeline. The image tokenizer keeps float32
        (its codebook lookup and decoder are small; the transformer is what a low precision speeds up)."""
        if device is not None:
            self.device = torch.device(device)
            self.processor.to(self.device)
        self.model.to(device=self.device, dtype=dtype)
        return self

    def __call__(self, prompts: str | list[str], sampler: SamplerConfig | None = None, seed: int = 0,
                 **overrides) -> ImageOutput:
        """Text-to-image, the pipeline's main generation (diffusers' `pipe(prompt)`); `.pil()` for PIL images."""
        return self.text_to_image([prompts] if isinstance(prompts, str) else prompts, sampler, seed, **overrides)

    @property
    def is_autoregressive(self) -> bool:
        """The AR twin: its scheduler decodes left to right (no infilling, inpainting or anchors)."""
        return self.scheduler.autoregressive

    def sampler(self, task: str, sampler: SamplerConfig | None = None, **overrides) -> SamplerConfig:
        """The `SamplerConfig` of a call: `sampler` (default: the task's `DEFAULT_SAMPLERS` entry) with
        `overrides` (field names of `SamplerConfig`) replaced."""
        return replace(sampler or DEFAULT_SAMPLERS[task], **overrides)

    # ---- inputs (the processor's) -------------------------------------------------------------------
    def image_tensor(self, images: Any) -> torch.Tensor:
        """PIL images / paths / Float[B,3,H,W] in [0,1] -> Float[B,3,S,S] at the VQ's image size."""
        return self.processor.image_tensor(images)

    def encode_images(self, images: Any) -> torch.Tensor:
        """Images -> VQ codes Long[B, h, w]."""
        return self.processor.encode_images(images)

    def token_mask(self, region_mask: torch.Tensor) -> torch.Tensor:
        """Pixel mask Bool[B, H, W] -> token mask Bool[B, h, w] (max-pool); token masks pass through."""
        return self.processor.token_mask(region_mask)

    def _encode_text(self, text: str, limit: int, what: str) -> list[int]:
        return self.processor.encode_text(text, limit, what)

    # ---- running a sampler ------------------------------------------------------------------------
    def _generate(self, samples: list[Sample], config: SamplerConfig, seed: int, history: bool = False,
                  callback: StepCallback | None = None) -> SampleResult:
        batch = collate(samples, self.vocab).to(self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        return self.scheduler.sample(self.model, batch, config, generator=generator, history=history,
                                     callback=callback)

    def _texts(self, ids: torch.Tensor, samples: list[Sample]) -> list[list[str]]:
        """The text target regions of each row, decoded (a row may hold several: VQA answers)."""
        out = []
        for row, s in zip(ids.cpu(), samples):
            out.append([self.processor.decode_text(row[region])
                        for region in target_regions(s.target & (s.image_index < 0))])
        return out

    def _codes(self, ids: torch.Tensor, samples: list[Sample]) -> torch.Tensor:
        h, w = self.vq.grid
        rows = []
        for row, s in zip(ids, samples):
            img = row[: len(s)][s.image_index.to(ids.device) >= 0]  # (N,)
            rows.append(self.vocab.token_to_image(img).view(h, w))
        return torch.stack(rows)

    # ---- tasks ------------------------------------------------------------------------------------
    def caption(self, images, sampler: SamplerConfig | None = None, seed: int = 0, **overrides) -> TextOutput:
        """Describe each image. Default sampler: one token per step, left to right in blocks of 4 tokens
        (`DEFAULT_SAMPLERS`); `block_length=None` decodes the caption as one block."""
        codes = self.encode_images(images).cpu()
        samples = [caption_prompt(c, self.vocab, self.layout) for c in codes]
        res = self._generate(samples, self.sampler("caption", sampler, **overrides), seed)
        return TextOutput([t[0] for t in self._texts(res.ids, samples)], res.nfe, res.ids)

    def answer(self, images, questions: list[str], sampler: SamplerConfig | None = None, seed: int = 0,
               **overrides) -> TextOutput:
        """Answer one question per image (`questions[i]` about `images[i]`)."""
        codes = self.encode_images(images).cpu()
        if len(questions) != len(codes):
            raise ValueError(f"got {len(codes)} images but {len(questions)} questions")
        samples = []
        for c, q in zip(codes, questions):
            if not q.strip():
                raise ValueError("empty question")
            ids = self._encode_text(q, self.layout.question_len, "question")
            samples.append(vqa_prompt(c, ids, self.vocab, self.layout))
        res = self._generate(samples, self.sampler("answer", sampler, **overrides), seed)
        return TextOutput([t[0] for t in self._texts(res.ids, samples)], res.nfe, res.ids)

    def text_to_image(self, prompts: list[str], sampler: SamplerConfig | None = None, seed: int = 0,
                      history: bool = False, callback: StepCallback | None = None, **overrides) -> ImageOutput:
        """Draw one image per prompt (`history`: the codes after every step; `callback(i, canvas)`: live)."""
        n = self.vq.tokens_per_image
        samples = [t2i_prompt(self._encode_text(p, self.layout.caption_len, "prompt"), self.vocab, self.layout, n)
                   for p in prompts]
        res = self._generate(samples, self.sampler("text_to_image", sampler, **overrides), seed, history, callback)
        return self._image_output(res, samples)

    def _image_output(self, res: SampleResult, samples: list[Sample]) -> ImageOutput:
        codes = self._codes(res.ids, samples)
        images = self.processor.decode_images(codes)
        frames = None
        if res.history is not None:
            frames = [self._canvas_codes(f, samples) for f in res.history]
        return ImageOutput(images.cpu(), codes.cpu(), res.nfe, frames)

    def _canvas_codes(self, ids: torch.Tensor, samples: list[Sample]) -> torch.Tensor:
        """A partly denoised canvas -> Long[B, h, w] codes with -1 where still masked."""
        h, w = self.vq.grid
        out = []
        for row, s in zip(ids, samples):
            img = row[: len(s)][s.image_index.to(ids.device) >= 0]
            out.append(torch.where(self.vocab.is_image(img), img - self.vocab.image_offset, -1).view(h, w))
        return torch.stack(out).cpu()

    def generate_joint(self, n: int, sampler: SamplerConfig | None = None, seed: int = 0,
                       **overrides) -> JointOutput:
        """Generate `n` images together with their captions, from nothing."""
        samples = [joint_prompt(self.vocab, self.layout, self.vq.tokens_per_image) for _ in range(n)]
        res = self._generate(samples, self.sampler("joint", sampler, **overrides), seed)
        codes = self._codes(res.ids, samples)
        images = self.processor.decode_images(codes)
        return JointOutput(images.cpu(), codes.cpu(), [t[0] for t in self._texts(res.ids, samples)], res.nfe)

    def inpaint(self, images, region_mask: torch.Tensor, prompt: list[str] | None = None,
                sampler: SamplerConfig | None = None, seed: int = 0, **overrides) -> ImageOutput:
        """Regenerate the image tokens under `region_mask` and keep the rest.

        `region_mask`: Bool[B, h, w] on the token grid, or Bool[B, H, W] in pixels (a token is
        regenerated when any of its pixels is masked). `prompt`: optional captions to guide it.
        """
        if self.is_autoregressive:
            raise ValueError("inpainting needs the masked-diffusion model; the AR baseline only continues")
        codes = self.encode_images(images).cpu()
        token_mask = self.token_mask(region_mask).cpu()
        if token_mask.shape != codes.shape:
            raise ValueError(f"region_mask covers {tuple(token_mask.shape)} tokens, images have {tuple(codes.shape)}")
        prompts = prompt or [""] * len(codes)
        samples = []
        for c, m, p in zip(codes, token_mask, prompts):
            s = t2i_sample(self._encode_text(p, self.layout.caption_len, "prompt"), c, self.vocab, self.layout)
            where = torch.zeros(len(s), dtype=torch.bool)
            where[s.image_index >= 0] = m.flatten()
            if not p:  # no prompt: the empty (unconditional) caption, as trained with p_uncond
                s = replace(s, pad=s.pad | s.cond)
            samples.append(mask_target(s, self.vocab, where))
        res = self._generate(samples, self.sampler("inpaint", sampler, **overrides), seed)
        return self._image_output(res, samples)

    def infill(self, texts: list[str], tokens_per_blank: int = 1, sampler: SamplerConfig | None = None,
               seed: int = 0, **overrides) -> TextOutput:
        """Fill every `[MASK]` in each text with `tokens_per_blank` tokens; returns the completed texts."""
        if self.is_autoregressive:
            raise ValueError("infilling needs the masked-diffusion model; the AR baseline only continues")
        samples = []
        for text in texts:
            if BLANK not in text:
                raise ValueError(f"no {BLANK} in {text!r}")
            parts = text.split(BLANK)
            ids: list[int] = []
            for i, part in enumerate(parts):
                part = part.rstrip() if i < len(parts) - 1 else part  # the blank brings its own space
                ids += self.processor.encode_text(part) if part else []
                if i < len(parts) - 1:
                    ids += [self.vocab.mask] * tokens_per_blank
            if len(ids) >= self.layout.text_len:
                raise ValueError(f"text is longer than the model's limit of {self.layout.text_len} tokens")
            samples.append(text_prompt(ids, self.vocab, self.layout))
        res = self._generate(samples, self.sampler("infill", sampler, **overrides), seed)
        out = []
        for row, s in zip(res.ids.cpu(), samples):
            region = row[: len(s)][(s.image_index < 0) & ~s.pad & (row[: len(s)] != self.vocab.text_task)]
            out.append(self.processor.decode_text(region))
        return TextOutput(out, res.nfe, res.ids)


def select_rows(batch: Batch, rows: slice) -> Batch:
    """A sub-batch of the given rows."""
    return Batch(**{f.name: getattr(batch, f.name)[rows] for f in fields(batch)})


def target_regions(target: torch.Tensor) -> list[torch.Tensor]:
    """Bool[T] -> index tensors of each maximal run of True (the separate target regions of a row)."""
    idx = target.nonzero().squeeze(1)
    if idx.numel() == 0:
        return []
    breaks = (idx[1:] != idx[:-1] + 1).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(idx, breaks.tolist()))


@torch.no_grad()
def fill_targets(model: Transformer, batch: Batch, vocab: Vocab, steps: int = 8) -> torch.Tensor:
    """Mask a batch's targets and decode them again (greedy); used to show samples during training."""
    masked = replace(batch, ids=torch.where(batch.target, vocab.mask, batch.ids))
    was_training = model.training
    model.eval()
    try:
        return scheduler_for(model.config, vocab).sample(model, masked, SamplerConfig(steps=steps)).ids
    finally:
        model.train(was_training)


def decode_targets(batch: Batch, pred: torch.Tensor, vocab: Vocab, tokenizer: TextTokenizer) -> list[str]:
    """Human-readable 'truth -> prediction' lines for the text targets of a batch."""
    lines = []
    for i in range(len(batch)):
        text = batch.target[i] & (batch.image_index[i] < 0)
        for region in target_regions(text.cpu()):
            truth = tokenizer.decode(vocab.text_ids_only(batch.ids[i, region]))
            guess = tokenizer.decode(vocab.text_ids_only(pred[i, region]))
            lines.append(f"`{truth}` -> `{guess}`")
        if bool((batch.target[i] & (batch.image_index[i] >= 0)).any()):
            img = batch.target[i] & (batch.image_index[i] >= 0)
            acc = (pred[i][img] == batch.ids[i][img]).float().mean().item()
            lines.append(f"image tokens recovered: {acc:.0%}")
    return lines
