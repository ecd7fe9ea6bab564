"""The sampler's command-line flags, one set for every command that samples (`mmdlm vqa`, `mmdlm generate`,
`mmdlm evaluate`): each flag is a `SamplerConfig` field, absent = the task's default
(`mmdlm.pipeline.DEFAULT_SAMPLERS`), and the values are checked by `SamplerConfig` itself.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from mmdlm.sampling.config import DEFAULT_SAMPLERS, Confidence, SamplerConfig, SelfCorrection

NONE = "none"  # a flag's value that sets its field to None (e.g. `--threshold none`: the fixed schedule)


def _or_none(kind: type) -> Any:
    def parse(text: str) -> Any:
        return NONE if text.lower() == NONE else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


# flag -> (SamplerConfig field, argparse type, help); the value None (flag absent) keeps the task default
_FLAGS: dict[str, tuple[str, type, str]] = {
    "--steps": ("steps", int, "denoising steps (masked diffusion; the AR twin takes one per token; none = one "
                "text token per step)"),
    "--image-steps": ("image_steps", int, "steps for image regions, when they should differ from --steps"),
    "--temperature": ("temperature", float, "0 = argmax; > 0 Gumbel-max sampling"),
    "--text-temperature": ("text_temperature", float, "the text's own temperature (default: --temperature)"),
    "--top-k": ("top_k", int, "sample among the k most likely tokens"),
    "--guidance": ("guidance_scale", float, "classifier-free guidance scale (0 = none)"),
    "--guidance-steps": ("guidance_steps", int, "guide only the first N steps (none = every step)"),
    "--image-guidance": ("image_guidance_scale", float, "an edit: guidance on the source image apart from "
                         "--guidance on the instruction (InstructPix2Pix; none = one scale for both)"),
    "--plausibility": ("guidance_plausibility", float,
                       "guidance acts only on tokens with p_cond >= this * max p_cond, so it cannot paint the "
                       "prompt's objects into the background (0 = plain guidance)"),
    "--threshold": ("threshold", float, "Fast-dLLM parallel decoding: commit every prediction whose confidence "
                    "passes it, beyond the schedule (text: at least one token per step; none = the schedule only)"),
    "--block-length": ("block_length", int, "semi-autoregressive blocks of this many text tokens, left to right "
                       "(0 = one block)"),
    "--image-block-length": ("image_block_length", int, "semi-autoregressive blocks of this many image tokens in "
                             "raster order, top to bottom (8 = a row of an 8x8 grid; 0 = one block)"),
    "--confidence": ("confidence", Confidence, "which predictions are committed first"),
    "--prefix-cache": ("prefix_cache", int, "Fast-dLLM's approximate prefix cache: recompute the image / question / "
                       "caption before the generated region every K steps and reuse it in between (0 = off)"),
}


def defaults_help(*tasks: str) -> str:
    """The task defaults' settings for `--help`, from `DEFAULT_SAMPLERS` (so the text cannot go stale): the
    steps and every field that differs from a plain `SamplerConfig()`, e.g. 'steps=None, block_length=2'."""
    plain = SamplerConfig().to_dict()

    def one(task: str) -> str:
        d = DEFAULT_SAMPLERS[task].to_dict()
        shown = [f"steps={d['steps']}"] + [f"{k}={v}" for k, v in d.items() if k != "steps" and v != plain[k]]
        return ", ".join(shown)

    return "; ".join(f"{task}: {one(task)}" if len(tasks) > 1 else one(task) for task in tasks)


def add_sampler_arguments(parser: argparse.ArgumentParser, task_defaults: str = "",
                          guidance: bool = True) -> None:
    """Add the sampler flags as one argument group; `task_defaults` tells `--help` what absent means."""
    group = parser.add_argument_group(
        "sampler", "How the model decodes; each flag left out keeps the task's default"
        + (f" ({task_defaults})" if task_defaults else "") + ".")
    for flag, (name, kind, help_) in _FLAGS.items():
        if not guidance and "guidance" in name:
            continue
        choices = [str(c) for c in Confidence] if kind is Confidence else None
        nullable = name in ("steps", "threshold", "image_steps", "top_k", "guidance_steps",
                            "image_guidance_scale")  # fields that may be None
        group.add_argument(flag, dest=f"sampler_{name}", type=str if choices else _or_none(kind) if nullable else kind,
                           choices=choices,
                           default=None, help=help_, metavar=None if choices else flag[2:].upper().replace("-", "_"))
    group.add_argument("--self-correction", dest="sampler_self_correction", action="store_true",
                       help="ReMDM-style revision: re-mask committed tokens the model no longer believes in "
                            "(at most 8 extra steps)")
    group.add_argument("--left-to-right", dest="sampler_left_to_right", action=argparse.BooleanOptionalAction,
                       default=None, help="block diffusion: write each text block from its left (the default for "
                                          "text); --no-left-to-right commits by confidence")


def sampler_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The `SamplerConfig` fields the user gave on the command line."""
    out: dict[str, Any] = {}
    for name, _kind, _help in _FLAGS.values():
        value = getattr(args, f"sampler_{name}", None)
        if value is not None:
            one_block = name in ("block_length", "image_block_length") and value == 0
            out[name] = None if value == NONE or one_block else value
    if getattr(args, "sampler_self_correction", False):
        out["self_correction"] = SelfCorrection()
    if getattr(args, "sampler_left_to_right", None) is not None:
        out["left_to_right"] = args.sampler_left_to_right
    return out


def sampler_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      base: SamplerConfig) -> SamplerConfig:
    """`base` with the command line's overrides; `parser.error` (exit 2) names a bad value."""
    try:
        return replace(base, **sampler_overrides(args))
    except ValueError as err:
        parser.error(f"sampler: {err}")
        raise  # unreachable: parser.error exits
