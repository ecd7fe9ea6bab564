"""mmdlm's samplers, diffusers-style: a scheduler component per decoding rule, one `SamplerConfig` per call.

    from mmdlm.sampling import SamplerConfig, scheduler_for
    scheduler = scheduler_for(model.config, vocab)        # MaskedScheduler, or ARScheduler for a causal model
    out = scheduler.sample(model, batch, SamplerConfig(steps=8, threshold=0.9), generator=g)

- `config`: `SamplerConfig` (every option), `SelfCorrection`, `Confidence`; imports no torch, so the command
  lines' `--help` (`arguments`: the shared sampler flags) answers at once.
- `scheduler`: the `Scheduler` interface (`set_timesteps`, `model_inputs`, `step`) and its decoding loop.
- `masked`: `MaskedScheduler` (LLaDA, MaskGIT, Fast-dLLM, ReMDM).
- `autoregressive`: `ARScheduler` (left to right with a KV cache).
- `block`: `BlockScheduler` (block diffusion: block by block with an exact KV cache, masked decoding inside a block).
- `tokens`: schedules, confidence scores, modality restriction, Gumbel-max choice, guidance.
- `revise`: a model's leave-one-out scores of finished tokens, and `revise` (re-mask the doubtful ones, decode
  them again): self-revision, hybrid AR draft -> MDM refinement, best-of-n by self-scoring.

The names below load their module on first use (PEP 562), so `mmdlm.sampling.config` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ARScheduler": "autoregressive", "BlockScheduler": "block",
    "Confidence": "config", "SamplerConfig": "config", "SelfCorrection": "config",
    "MaskedScheduler": "masked",
    "SampleResult": "scheduler", "Scheduler": "scheduler", "StepCallback": "scheduler",
    "cosine_schedule": "tokens", "guided_logits": "tokens", "linear_schedule": "tokens",
    "margin_confidence": "tokens", "probability_confidence": "tokens", "random_confidence": "tokens",
    "restrict": "tokens", "sample_tokens": "tokens",
    "Revision": "revise", "revise": "revise", "token_scores": "revise",
}
__all__ = sorted([*_EXPORTS, "scheduler_for"])


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mmdlm.sampling' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mmdlm.sampling.{_EXPORTS[name]}"), name)


def scheduler_for(model_config: Any, vocab: Any) -> Any:
    """The scheduler a model was trained for: `ARScheduler` for a causal model, `BlockScheduler` for a block-diffusion
    one, else `MaskedScheduler`."""
    if getattr(model_config, "block_diffusion", False):
        from mmdlm.sampling.block import BlockScheduler

        return BlockScheduler(vocab, model_config.block_size, model_config.image_block_rows,
                              max(model_config.image_grid[1], 1), model_config.shift_logits)
    from mmdlm.sampling.autoregressive import ARScheduler
    from mmdlm.sampling.masked import MaskedScheduler

    return ARScheduler(vocab) if model_config.causal else MaskedScheduler(vocab)
