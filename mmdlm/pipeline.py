"""`MMDLMPipeline`: processor (text + image tokenizer) + transformer + scheduler, with one method per task.

diffusers-style: the pipeline holds its components (the `MMDLMProcessor` turns inputs into ids and ids
back into text and images), `from_pretrained(DIR)` loads a model folder (`mmdlm.folder`: written at the end of
training, by `mmdlm export` or by `save_pretrained`, all through `mmdlm.folder.write_model_folder`), and every task
lays out a sequence with a masked target region (`mmdlm.sequence`) and hands it to the scheduler the model was
trained for (`mmdlm.sampling`): masked diffusion, or left to right with a KV cache for the AR twin. Each task has a
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

import itertools
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file

from mmdlm.folder import CHECKSUM_KEY, CONFIG_FILE, WEIGHTS_FILE, read_config, verify_weights, write_model_folder
from mmdlm.model import ModelConfig, Transformer
from mmdlm.processor import MMDLMProcessor
from mmdlm.sampling import SamplerConfig, SampleResult, StepCallback, scheduler_for
from mmdlm.sampling.config import BLOCK_SAMPLERS, DEFAULT_SAMPLERS, default_sampler  # noqa: F401 (re-exported)
from mmdlm.sampling.revise import Revision, content, revise, token_scores
from mmdlm.sequence import (
    Layout,
    Sample,
    Segment,
    caption_prompt,
    caption_sample,
    collate,
    document_prompt,
    document_sample,
    generated_image,
    joint_prompt,
    mask_target,
    t2i_prompt,
    t2i_sample,
    target_regions,
    text_prompt,
    text_sample,
    vqa_prompt,
)
from mmdlm.text_tokenizer import TextTokenizer
from mmdlm.vocab import Vocab

BLANK = "[MASK]"  # marks a span to fill in `infill`
# Hybrid decoding's default revision, chosen on held-out val 500-699 (BENCHMARKS.md, "Revision"): the MDM judges only
# the tokens the AR drafter gave p < 0.6 (~3% of them), and rewrites those it finds below 0.2 and would replace.
HYBRID_REVISION = Revision(threshold=0.2, draft_confidence=0.6)
MAX_LENGTH_CANDIDATES = 256  # `infill(tokens_per_blank=None)`: length combinations tried per text


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


@dataclass(frozen=True)
class Blank:
    """A segment for `complete_document` to generate: a text of `length` tokens (default `Layout.segment_len`:
    content, then `<eos>` fill) or, with `image=True`, an image."""

    image: bool = False
    length: int | None = None


@dataclass
class DocumentOutput:
    documents: list[list[str | Image.Image]]  # each document with its blanks filled: texts and PIL images
    nfe: int
    ids: torch.Tensor | None = field(default=None, repr=False)  # Long[B, T] the final canvas


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
        """Load a model folder written by `mmdlm.commands.export` / `save_pretrained`.

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
        tokenizers), as `mmdlm.commands.export` does."""
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
        """The `SamplerConfig` of a call: `sampler` (default: the task's entry of `DEFAULT_SAMPLERS`, or of
        `BLOCK_SAMPLERS` for a block-diffusion model) with `overrides` (field names of `SamplerConfig`) replaced."""
        return replace(sampler or default_sampler(task, self.model.config.block_diffusion), **overrides)

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

    def _run(self, task: str, samples: list[Sample], config: SamplerConfig, seed: int,
             draft: MMDLMPipeline | None = None, revision: Revision | None = None, history: bool = False,
             callback: StepCallback | None = None) -> SampleResult:
        """Decode the samples' targets: with this model (`draft` None), or as drafted by another pipeline with its
        own default sampler for the task (the hybrid: an AR twin drafts, this model revises); then, when
        `draft` or `revision` is given, this model rewrites the tokens it doubts (`mmdlm.sampling.revise`).
        NFE and forward rows are the sums of both passes."""
        if draft is None and revision is None:
            return self._generate(samples, config, seed, history, callback)
        if draft is None:
            first = self._generate(samples, config, seed)
            out = self._revise(samples, first.ids, config, revision or Revision(), seed + 1)
        else:
            self._check_draft(draft)
            first = draft._generate(samples, draft.sampler(task), seed)
            out = self._revise(samples, first.ids, config, revision or HYBRID_REVISION, seed + 1, judge=draft.model)
        return replace(out, nfe=first.nfe + out.nfe, forward_rows=first.forward_rows + out.forward_rows)

    def _revise(self, samples: list[Sample], ids: torch.Tensor, config: SamplerConfig, revision: Revision,
                seed: int, judge: torch.nn.Module | None = None) -> SampleResult:
        """Revise the samples' targets as filled in `ids` (Long[B, T]); `judge`: the model that wrote them, whose own
        doubts (p < `revision.draft_confidence`) are the only tokens this model judges."""
        batch = collate(samples, self.vocab).to(self.device)
        ids = ids.to(self.device)
        filled = replace(batch, ids=ids)
        positions = content(ids, batch.target, self.vocab.eos)  # (B, T)
        nfe = rows = 0
        if judge is not None and revision.draft_confidence < 1:  # the draft's own doubts only
            judged = token_scores(judge, filled, positions, self.vocab)
            positions &= judged.p < revision.draft_confidence
            nfe, rows = judged.nfe, judged.rows
        generator = torch.Generator(device=self.device).manual_seed(seed)
        out = revise(self.model, self.scheduler, filled, positions, self.vocab, config, revision, generator)
        return SampleResult(out.ids, nfe + out.nfe, None, rows + out.forward_rows, remasked=int(out.remasked.sum()))

    def _check_draft(self, draft: MMDLMPipeline) -> None:
        if draft.vocab != self.vocab or draft.layout != self.layout:
            raise ValueError(f"the draft model's vocabulary or layout ({draft.vocab}, {draft.layout}) differs from "
                             f"this model's ({self.vocab}, {self.layout}): it cannot draft for it")
        if draft.device != self.device:
            raise ValueError(f"the draft model is on {draft.device}, this one on {self.device}")

    def caption_likelihood(self, images, captions: list[str]) -> torch.Tensor:
        """Float64[B]: how well each caption fits its image in this model's judgement: the pseudo-log-likelihood
        (sum over the caption's tokens and its `<eos>` of log p(token | image, the rest of the caption), each token
        masked in its own row: one forward call of ~caption-length rows per image; a causal model: its exact
        log-likelihood). Self-verification: `text_to_image(best_of=n)` keeps the image whose prompt scores best.
        `images`: anything `encode_images` takes, or codes Long[B, h, w]."""
        given_codes = isinstance(images, torch.Tensor) and images.dtype == torch.long
        codes = (images if given_codes else self.encode_images(images)).cpu()
        ids = [self._encode_text(c, self.layout.caption_len, "caption") for c in captions]
        if len(ids) != len(codes):
            raise ValueError(f"got {len(codes)} images but {len(ids)} captions")
        samples = [caption_sample(c, i, self.vocab, self.layout) for c, i in zip(codes, ids)]
        batch = collate(samples, self.vocab).to(self.device)
        positions = content(batch.ids, batch.target, self.vocab.eos)  # (B, T) the words and the first <eos>
        scores = token_scores(self.model, batch, positions, self.vocab)
        return scores.log_likelihood(positions).cpu()

    def _texts(self, ids: torch.Tensor, samples: list[Sample]) -> list[list[str]]:
        """The text target regions of each row, decoded (a row may hold several: VQA answers)."""
        out = []
        for row, s in zip(ids.cpu(), samples):
            out.append([self.processor.decode_text(row[region])
                        for region in target_regions(s.target & (s.image_index < 0))])
        return out

    def _codes(self, ids: torch.Tensor, samples: list[Sample]) -> torch.Tensor:
        return image_codes(ids, samples, self.vocab, self.vq.grid)

    # ---- tasks ------------------------------------------------------------------------------------
    def caption(self, images, sampler: SamplerConfig | None = None, seed: int = 0, *,
                draft: MMDLMPipeline | None = None, revision: Revision | None = None, **overrides) -> TextOutput:
        """Describe each image (default sampler: `DEFAULT_SAMPLERS["caption"]`). `draft`: another pipeline of the
        same vocabulary (the AR twin) writes the captions and this model revises them (hybrid decoding);
        `revision`: how the tokens to rewrite are chosen (`Revision`; given alone, this model revises its own
        captions)."""
        codes = self.encode_images(images).cpu()
        samples = [caption_prompt(c, self.vocab, self.layout) for c in codes]
        res = self._run("caption", samples, self.sampler("caption", sampler, **overrides), seed, draft, revision)
        return TextOutput([t[0] for t in self._texts(res.ids, samples)], res.nfe, res.ids)

    def revise_caption(self, images, captions: list[str], revision: Revision = Revision(),
                       sampler: SamplerConfig | None = None, seed: int = 0, **overrides) -> TextOutput:
        """Correct given captions of the images: the tokens this model doubts are rewritten, the rest is kept (a
        causal model keeps the caption up to its first doubtful token and writes the rest again)."""
        codes = self.encode_images(images).cpu()
        if len(captions) != len(codes):
            raise ValueError(f"got {len(codes)} images but {len(captions)} captions")
        ids = [self._encode_text(c, self.layout.caption_len, "caption") for c in captions]
        given = collate([caption_sample(c, i, self.vocab, self.layout) for c, i in zip(codes, ids)], self.vocab).ids
        samples = [caption_prompt(c, self.vocab, self.layout) for c in codes]
        out = self._revise(samples, given, self.sampler("caption", sampler, **overrides), revision, seed)
        return TextOutput([t[0] for t in self._texts(out.ids, samples)], out.nfe, out.ids)

    def answer(self, images, questions: list[str], sampler: SamplerConfig | None = None, seed: int = 0, *,
               draft: MMDLMPipeline | None = None, revision: Revision | None = None, **overrides) -> TextOutput:
        """Answer one question per image (`questions[i]` about `images[i]`); `draft` / `revision` as in
        `caption`."""
        codes = self.encode_images(images).cpu()
        if len(questions) != len(codes):
            raise ValueError(f"got {len(codes)} images but {len(questions)} questions")
        samples = []
        for c, q in zip(codes, questions):
            if not q.strip():
                raise ValueError("empty question")
            ids = self._encode_text(q, self.layout.question_len, "question")
            samples.append(vqa_prompt(c, ids, self.vocab, self.layout))
        res = self._run("answer", samples, self.sampler("answer", sampler, **overrides), seed, draft, revision)
        return TextOutput([t[0] for t in self._texts(res.ids, samples)], res.nfe, res.ids)

    def text_to_image(self, prompts: list[str], sampler: SamplerConfig | None = None, seed: int = 0,
                      history: bool = False, callback: StepCallback | None = None, *, best_of: int = 1,
                      draft: MMDLMPipeline | None = None, revision: Revision | None = None,
                      **overrides) -> ImageOutput:
        """Draw one image per prompt (`history`: the codes after every step; `callback(i, canvas)`: live).

        `best_of` = n > 1: draw n images per prompt and keep the one whose prompt this model finds most likely as
        its caption (`caption_likelihood`: self-verification; n times the drawing NFE plus one scoring call).
        `draft` / `revision` as in `caption`."""
        if best_of < 1:
            raise ValueError(f"best_of must be >= 1, got {best_of}")
        n = self.vq.tokens_per_image
        ids = [self._encode_text(p, self.layout.caption_len, "prompt") for p in prompts]
        samples = [t2i_prompt(i, self.vocab, self.layout, n) for i in ids for _ in range(best_of)]
        res = self._run("text_to_image", samples, self.sampler("text_to_image", sampler, **overrides), seed,
                        draft, revision, history, callback)
        out = self._image_output(res, samples)
        if best_of == 1:
            return out
        score = self.caption_likelihood(out.codes, [p for p in prompts for _ in range(best_of)])  # (B * n,)
        keep = score.view(len(prompts), best_of).argmax(1) + torch.arange(len(prompts)) * best_of  # (B,)
        frames = None if out.history is None else [f[keep] for f in out.history]
        return ImageOutput(out.images[keep], out.codes[keep], out.nfe + 1, frames)

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

    def edit(self, images, instructions: list[str], sampler: SamplerConfig | None = None, seed: int = 0, *,
             revision: Revision | None = None, **overrides) -> ImageOutput:
        """Edit each image as its instruction says ("make the red circle blue"): the document [image, instruction,
        edited image] with the edited image generated (`complete_document`). Default sampler `DEFAULT_SAMPLERS
        ["edit"]`; `guidance_scale` guides on the instruction, `image_guidance_scale` on the source image apart
        (InstructPix2Pix). `revision`: start the edited image as a copy of the source and rewrite only the tokens
        this model doubts given the instruction (`mmdlm.sampling.revise`), instead of drawing it from masks."""
        codes = self.encode_images(images).cpu()
        samples = self.edit_documents(codes, instructions)
        config = self.sampler("edit", sampler, **overrides)
        if revision is None:
            return self._image_output(self._generate(samples, config, seed), samples)
        if self.is_autoregressive:
            raise ValueError("editing by revision needs the masked-diffusion model")
        draft = collate(samples, self.vocab).ids  # (B, T): the edited image starts as the source
        for row, s, c in zip(draft, samples, codes):
            row[: len(s)][s.target] = self.vocab.image_to_token(c.flatten())
        return self._image_output(self._revise(samples, draft, config, revision, seed), samples)

    def edit_documents(self, codes: torch.Tensor, instructions: list[str],
                       edited: torch.Tensor | None = None) -> list[Sample]:
        """The edit documents [source image, instruction, edited image] (`sequence.document_sample`), the edited
        image the target: all `<mask>` (what `edit` samples), or `edited` (Long[B, h, w], the result's codes, as
        training lays it out: for scoring a model's predictions of it). `codes` Long[B, h, w]: the sources."""
        if len(instructions) != len(codes):
            raise ValueError(f"got {len(codes)} images but {len(instructions)} instructions")
        n = self.vq.tokens_per_image
        samples = []
        for i, (c, text) in enumerate(zip(codes, instructions)):
            if not text.strip():
                raise ValueError("empty instruction")
            ids = self._encode_text(text, self.layout.text_len, "instruction")
            result = Segment.of_image(None, True, n) if edited is None else Segment.of_image(edited[i], True)
            samples.append(document_sample([Segment.of_image(c), Segment.of_text(ids), result], self.vocab,
                                           self.layout))
        return samples

    def complete_document(self, documents: list[list[Any]], sampler: SamplerConfig | None = None, seed: int = 0,
                          **overrides) -> DocumentOutput:
        """Fill the blanks of interleaved documents: each document is a list of segments, a `str` (a given text),
        an image (PIL, `pathlib.Path` or Float[3, H, W] in [0, 1]: a given image) or a `Blank` (a text or an image
        to generate), in any order and number (`sequence.document_sample` lays them out). Every blank is
        generated together, seeing every given segment (the AR twin sees only the segments before it)."""
        n = self.vq.tokens_per_image
        samples = []
        for doc in documents:
            segments = []
            for part in doc:
                if isinstance(part, Blank):
                    segments.append(Segment.of_image(None, True, n) if part.image else
                                    Segment.of_text(None, True, part.length))
                elif isinstance(part, str):
                    segments.append(Segment.of_text(self._encode_text(part, self.layout.text_len, "text")))
                else:
                    image = part[None] if isinstance(part, torch.Tensor) else [part]  # (1, 3, H, W) or a list
                    segments.append(Segment.of_image(self.encode_images(image).cpu()[0]))
            if not any(s.target for s in segments):
                raise ValueError("a document needs at least one Blank to generate")
            samples.append(document_prompt(segments, self.vocab, self.layout))
        res = self._generate(samples, self.sampler("document", sampler, **overrides), seed)
        h, w = self.vq.grid
        filled = []
        for row, s, doc in zip(res.ids.cpu(), samples, documents):
            texts = iter(self._texts(row[None], [s])[0])
            codes = self.vocab.token_to_image(row[: len(s)][s.target & (s.image_index >= 0)]).view(-1, h, w)
            images = iter(to_pil_images(self.processor.decode_images(codes.to(self.device))) if len(codes) else [])
            filled.append([(next(images) if part.image else next(texts)) if isinstance(part, Blank) else part
                           for part in doc])
        return DocumentOutput(filled, res.nfe, res.ids)

    def infill(self, texts: list[str], tokens_per_blank: int | None = 1, sampler: SamplerConfig | None = None,
               seed: int = 0, *, max_blank: int = 4, **overrides) -> TextOutput:
        """Fill every `[MASK]` in each text with `tokens_per_blank` tokens; returns the completed texts.

        `tokens_per_blank=None`: the model chooses each blank's length, 1 to `max_blank` tokens. Every combination
        of lengths is filled (at most `MAX_LENGTH_CANDIDATES` per text) and the completed text this model finds most
        likely is kept: the highest pseudo-log-likelihood per token of the whole text (`mmdlm.sampling.revise`),
        so a one-word gap is not padded with filler words ("a large and a a small ...").
        The cost: the candidates' decoding (in one batch) and one scoring call."""
        if self.is_autoregressive:
            raise ValueError("infilling needs the masked-diffusion model; the AR baseline only continues")
        parts = []
        for text in texts:
            if BLANK not in text:
                raise ValueError(f"no {BLANK} in {text!r}")
            pieces = text.split(BLANK)
            # the blank brings its own space
            parts.append([self.processor.encode_text(p.rstrip() if i < len(pieces) - 1 else p) if p.strip() else []
                          for i, p in enumerate(pieces)])
        config = self.sampler("infill", sampler, **overrides)
        if tokens_per_blank is not None:
            return self._infill([self._with_blanks(p, [tokens_per_blank] * (len(p) - 1)) for p in parts], config, seed)
        if max_blank < 1:
            raise ValueError(f"max_blank must be >= 1, got {max_blank}")
        candidates, owner = [], []
        for i, p in enumerate(parts):
            lengths = list(itertools.product(range(1, max_blank + 1), repeat=len(p) - 1))
            if len(lengths) > MAX_LENGTH_CANDIDATES:
                raise ValueError(f"{len(p) - 1} blanks of 1-{max_blank} tokens make {len(lengths)} length combinations "
                                 f"(at most {MAX_LENGTH_CANDIDATES}): give tokens_per_blank or fewer blanks")
            fitting = [ids for ls in lengths if len(ids := self._with_blanks(p, list(ls))) < self.layout.text_len]
            if not fitting:
                raise ValueError(f"text is longer than the model's limit of {self.layout.text_len} tokens")
            candidates += fitting
            owner += [i] * len(fitting)
        out = self._infill(candidates, config, seed)
        region = [self.vocab.text_ids_only(row[1 : self.layout.text_len + 1]) for row in out.ids.cpu()]
        filled = collate([text_sample(ids, self.vocab, self.layout) for ids in region], self.vocab).to(self.device)
        positions = content(filled.ids, filled.target, self.vocab.eos)  # (N, T) the text and its first <eos>
        scores = token_scores(self.model, filled, positions, self.vocab)
        per_token = (scores.log_likelihood(positions) / positions.sum(1)).cpu()  # (N,)
        owner_t = torch.tensor(owner)
        best = [int((per_token.masked_fill(owner_t != i, float("-inf"))).argmax()) for i in range(len(texts))]
        return TextOutput([out.texts[b] for b in best], out.nfe + scores.nfe, out.ids[best])

    def _with_blanks(self, parts: list[list[int]], lengths: list[int]) -> list[int]:
        ids: list[int] = []
        for i, part in enumerate(parts):
            ids += part
            if i < len(lengths):
                ids += [self.vocab.mask] * lengths[i]
        return ids

    def _infill(self, texts_ids: list[list[int]], config: SamplerConfig, seed: int) -> TextOutput:
        if any(len(ids) >= self.layout.text_len for ids in texts_ids):
            raise ValueError(f"text is longer than the model's limit of {self.layout.text_len} tokens")
        samples = [text_prompt(ids, self.vocab, self.layout) for ids in texts_ids]
        res = self._generate(samples, config, seed)
        out = []
        for row, s in zip(res.ids.cpu(), samples):
            region = row[: len(s)][(s.image_index < 0) & ~s.pad & (row[: len(s)] != self.vocab.text_task)]
            out.append(self.processor.decode_text(region))
        return TextOutput(out, res.nfe, res.ids)


def image_codes(ids: torch.Tensor, samples: list[Sample], vocab: Vocab, grid: tuple[int, int]) -> torch.Tensor:
    """Long[B, h, w]: the image codes of each row of a decoded canvas (Long[B, T]) laid out as `samples`: the row's
    generated image (the first that holds a target: an edit's result, not its source), or its only one."""
    n = grid[0] * grid[1]
    rows = [vocab.token_to_image(row[generated_image(s.image_index, s.target, n).to(ids.device)]).view(*grid)
            for row, s in zip(ids, samples)]
    return torch.stack(rows)
