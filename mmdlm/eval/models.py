"""The model folders a side-by-side measurement loads, each checked to be of the kind its flag names: "mdm"
(masked diffusion), "fast" (masked diffusion trained with prefix attention) and "ar" (the causal twin).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the model stack loads lazily: a command's `--help` answers at once
    from mmdlm.pipeline import MMDLMPipeline


def load_models(folders: dict[str, str], device: str | None) -> dict[str, MMDLMPipeline]:
    """Pipelines by kind: "mdm" and "fast" (masked diffusion; "fast" trained with prefix attention), "block" (block
    diffusion) and "ar" (the causal twin); raises ValueError naming the flag (--mdm, --fast, --block, --ar) of a
    folder of the wrong kind."""
    from mmdlm.pipeline import MMDLMPipeline

    pipes = {}
    for kind, folder in folders.items():
        pipe = MMDLMPipeline.from_pretrained(folder, device=device)
        if kind == "ar" and not pipe.is_autoregressive:
            raise ValueError(f"--ar {folder!r} is not a causal model (config model.causal is false)")
        if kind != "ar" and pipe.is_autoregressive:
            raise ValueError(f"--{kind} {folder!r} is a causal (AR) model")
        if kind == "fast" and not pipe.model.config.prefix_attention:
            raise ValueError(f"--fast {folder!r} was not trained with prefix attention")
        if (kind == "block") != pipe.model.config.block_diffusion:
            raise ValueError(f"--{kind} {folder!r} is {'not ' if kind == 'block' else ''}a block-diffusion model")
        pipes[kind] = pipe
    return pipes


def load_pair(mdm: str, ar: str, device: str | None) -> tuple[MMDLMPipeline, MMDLMPipeline]:
    """The two pipelines; raises ValueError when --mdm is causal or --ar is not."""
    pipes = load_models({"mdm": mdm, "ar": ar}, device)
    return pipes["mdm"], pipes["ar"]
