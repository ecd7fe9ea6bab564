"""`SamplerConfig`: every option of mmdlm's samplers in one place, for the pipeline, the CLIs, the evaluation
and the demo alike; `SelfCorrection`, the ReMDM-style revision option inside it.

Like diffusers' per-call pipeline arguments (num_inference_steps, guidance_scale, ...) but one frozen
dataclass, so a setting can be stored, compared, swept and written into metrics.json (`to_dict`). The
pipeline keeps one default per task (`DEFAULT_SAMPLERS`, here so the command lines' `--help` can show them
without importing torch); a call overrides fields of it.
Options that only one kind of scheduler reads say so; the other ignores them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class Confidence(StrEnum):
    """Which predictions a masked-diffusion step commits first (`mmdlm.sampling.tokens.CONFIDENCE`)."""

    PROBABILITY = "probability"  # LLaDA's low-confidence remasking: p(chosen)
    MARGIN = "margin"  # top-1 minus top-2
    RANDOM = "random"  # the ablation


@dataclass(frozen=True)
class SelfCorrection:
    """ReMDM-style revision (Wang et al. 2025): each step, the committed tokens the sampler is least sure of
    are checked with themselves masked (extra rows in the same forward call) and re-masked when the model no
    longer believes in them, to be predicted again with the newer context. Checking a token with itself
    masked, p(x_i | rest), is what the informed correctors of Zhao et al. (2024) do: a masked-diffusion model
    is only trained to predict masked positions, so its logits at a visible token say nothing about it."""

    threshold: float = 0.2  # re-mask when p(token | rest) falls below this (a clear change of mind)
    max_per_step: int = 4  # tokens checked per sequence and step, least confident first; they are
    # masked together in the check row, so a small number keeps each one's context nearly intact
    extra_steps: int = 8  # bound on steps beyond the schedule: NFE <= steps + extra_steps
    only_if_disagrees: bool = True  # re-mask only if the model would now pick another token: with
    # greedy decoding a re-masked argmax token comes straight back, which only spends steps

    def __post_init__(self) -> None:
        if self.threshold < 0:  # > 1 re-masks every checked token (a stress test)
            raise ValueError(f"self-correction threshold must be >= 0, got {self.threshold}")
        if self.max_per_step < 1 or self.extra_steps < 0:
            raise ValueError("self-correction needs max_per_step >= 1 and extra_steps >= 0")


@dataclass(frozen=True)
class SamplerConfig:
    """How one call decodes: the masked-diffusion scheduler's options and the AR scheduler's."""

    steps: int | None = 16  # denoising steps (MDM); None = one token per step (the largest masked
    #   text region's length: captions and infilling decode best so, BENCHMARKS.md). AR: one per token
    image_steps: int | None = None  # steps for image regions when they should differ (None = `steps`, or
    #   16 when `steps` is None); MaskGIT draws 16x16 grids in 8-12 cosine steps, ours are <= 8x8
    temperature: float = 0.0  # 0 = argmax (LLaDA's benchmark setting); > 0 Gumbel-max sampling
    text_temperature: float | None = None  # the text's own temperature where it should differ (MDM and block:
    #   joint generation samples the image and reads its caption greedily); None = `temperature`
    top_k: int | None = None  # sample among the k most likely allowed tokens; None = all
    guidance_scale: float = 0.0  # classifier-free guidance w (MDM); 0 = conditional only, no uncond rows
    guidance_steps: int | None = None  # guide only the first n steps (MDM), whose few commits lay out the image;
    #   the later steps run without the unconditional rows (None = every step)
    image_guidance_scale: float | None = None  # a condition of text and images (an edit: the source image and the
    #   instruction) guided on each apart, as InstructPix2Pix: cond + w (cond - no_text) + w_img (no_text - none),
    #   `no_text` dropping the condition's text only (3 rows per call); None = one scale for the whole condition
    guidance_plausibility: float = 0.1  # guide only tokens with p_cond >= this * max p_cond: unconstrained
    #   guidance pushes implausible tokens up and ruins images (BENCHMARKS.md, "Sampler settings")
    threshold: float | None = None  # Fast-dLLM (MDM): besides the schedule's tokens, commit every prediction
    #   above it (at least one token per row and step), so a row finishes in fewer steps when its predictions are
    #   sure; NFE stays <= steps (0: everything in one step)
    block_length: int | None = None  # LLaDA's semi-autoregressive blocks over the text target (MDM);
    #   None = one block. Blocks grow to ceil(region / steps) tokens when steps < blocks
    image_block_length: int | None = None  # the same blocks over the image target (MDM): this many tokens in
    #   raster order (8 = a row of an 8x8 grid), top to bottom, the image steps split over them; None = one block.
    #   An edit's changed cells are then drawn seeing the rows above them (it helps unguided argmax edits, not
    #   guided ones: BENCHMARKS.md, "Editing")
    confidence: Confidence = Confidence.PROBABILITY  # commit order (MDM); margin / random are ablations
    self_correction: SelfCorrection | None = None  # None = a committed token is final (LLaDA, MaskGIT)
    prefix_cache: int = 0  # MDM, Fast-dLLM's approximate prefix cache: the keys/values of the positions before
    #   the target region (image + question, caption) are computed in a full pass every `prefix_cache` steps and
    #   reused in between, so the other steps run only the target region; 0 = off (every step a full pass).
    #   Approximate for a bidirectional model (the prefix saw older masks); not with self-correction
    use_cache: bool = True  # the exact caches: AR's KV cache; a masked-diffusion model trained with prefix
    #   attention computes its prompt once (ignored with self-correction). False recomputes everything every
    #   step: the equality tests and the speed baselines
    eos_fill: bool = True  # after a row's <eos> its later text targets are <eos> (the template's fill); MDM: the
    #   masked ones of the same region, so a caption or answer ends in the step that chooses its <eos>
    left_to_right: bool = False  # block diffusion: a step's scheduled commits are a block's leftmost masked text
    #   tokens (its AR order) instead of its most confident ones; `threshold` still adds every prediction above it

    def __post_init__(self) -> None:
        if self.prefix_cache < 0:
            raise ValueError(f"prefix_cache must be >= 0 (0 = off), got {self.prefix_cache}")
        if self.prefix_cache and self.self_correction is not None:
            raise ValueError("prefix_cache and self_correction do not go together (check rows change the batch)")
        for name in ("steps", "image_steps", "block_length", "image_block_length", "top_k", "guidance_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None), got {value}")
        if self.temperature < 0 or (self.text_temperature or 0) < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}, text {self.text_temperature}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.image_guidance_scale is not None and self.image_guidance_scale < 0:
            raise ValueError(f"image_guidance_scale must be >= 0 (or None), got {self.image_guidance_scale}")
        if not 0 <= self.guidance_plausibility <= 1:
            raise ValueError(f"guidance_plausibility must be in [0, 1], got {self.guidance_plausibility}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1] (or None), got {self.threshold}")
        object.__setattr__(self, "confidence", Confidence(self.confidence))

    @property
    def temperatures(self) -> tuple[float, float]:
        """(text, image) temperature, in `Modality` order."""
        return (self.temperature if self.text_temperature is None else self.text_temperature, self.temperature)

    @property
    def guidance_rows(self) -> int:
        """Copies of each row a guided call runs: 1 unguided, 2 with one scale (cond, none), 3 with the image's
        apart (cond, no text, none)."""
        if self.image_guidance_scale is not None:
            return 3
        return 2 if self.guidance_scale > 0 else 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for metrics.json)."""
        d = asdict(self)
        d["confidence"] = str(self.confidence)
        return d


# Each task's sampler, chosen on held-out val scenes 500-699 (not the evaluation's 0-199) of the quickstart model:
# the fastest settings that keep its quality (BENCHMARKS.md, "Sampler settings"). Captions one token per step left
# to right in blocks of 2, with every token above 0.8 confidence committed at once (Fast-dLLM); answers (1-3 tokens)
# one token per step left to right; a text ends in the step that picks its <eos> (`SamplerConfig.eos_fill`); images
# in 7 MaskGIT cosine steps, sampled (temperature 1), guidance 2 under the plausibility constraint (a model trained
# without prefix attention needs more image steps: pass steps=16 to it); infilling one token per step.
DEFAULT_SAMPLERS: dict[str, SamplerConfig] = {
    "caption": SamplerConfig(steps=None, block_length=2, threshold=0.8),
    "answer": SamplerConfig(steps=None, block_length=1),
    "text_to_image": SamplerConfig(steps=7, temperature=1.0, guidance_scale=2.0),
    "joint": SamplerConfig(steps=16, temperature=1.0),
    "inpaint": SamplerConfig(steps=16, temperature=1.0),
    "infill": SamplerConfig(steps=None),
    "document": SamplerConfig(steps=16, temperature=1.0),  # joint generation's: any mix of text and image blanks
    "edit": SamplerConfig(steps=7, temperature=1.0, guidance_scale=2.0),  # text-to-image's settings
}

# A block-diffusion model's samplers (`ModelConfig.block_diffusion`, `BlockScheduler`): `steps`, `image_steps` and
# `threshold` act inside each block (the quickstart's: 8 text tokens, an image band of 4 rows), chosen on held-out
# val scenes (BENCHMARKS.md, "Block-diffusion samplers"). Joint generation writes its caption one token per step at
# temperature 0.7, then draws the image (a greedy caption is the same caption every time).
BLOCK_SAMPLERS: dict[str, SamplerConfig] = {
    "caption": SamplerConfig(steps=None, threshold=0.8, left_to_right=True),
    "answer": SamplerConfig(steps=None, threshold=0.8, left_to_right=True),
    "text_to_image": SamplerConfig(steps=4, temperature=1.0, guidance_scale=2.0),
    "joint": SamplerConfig(steps=None, image_steps=3, temperature=1.0, text_temperature=0.7, threshold=0.8,
                          left_to_right=True),
    "inpaint": SamplerConfig(steps=3, temperature=1.0),
    "infill": SamplerConfig(steps=None),
    "document": SamplerConfig(steps=None, image_steps=3, temperature=1.0, text_temperature=0.7, threshold=0.8,
                          left_to_right=True),
    "edit": SamplerConfig(steps=3, temperature=1.0, guidance_scale=2.0),
}


def default_sampler(task: str, block_diffusion: bool = False) -> SamplerConfig:
    """A task's default sampler for a model of this kind (`BLOCK_SAMPLERS` for block diffusion, else
    `DEFAULT_SAMPLERS`; the AR scheduler reads only the options it has)."""
    return (BLOCK_SAMPLERS if block_diffusion else DEFAULT_SAMPLERS)[task]
