"""The scheduler interface of mmdlm's samplers and the one decoding loop that drives every scheduler.

As in diffusers, a scheduler owns the decoding rule and the pipeline owns the model: `set_timesteps`
plans a run for a batch, then each step the loop calls the model on `model_inputs(state)` and hands the
logits to `step(logits, state)`, which updates the canvas. `sample` is that loop. Two schedulers exist:
`MaskedScheduler` (masked diffusion: LLaDA / MaskGIT / Fast-dLLM / ReMDM) and `ARScheduler` (left to right
with a KV cache); `mmdlm.sampling.scheduler_for` picks the one a model was trained for.

NFE convention: one forward *call* is one function evaluation. Classifier-free guidance puts the
unconditional rows and self-correction its check rows in the same call (concatenated along the batch), so
they cost no NFE; `SampleResult.forward_rows` reports the rows actually run, which is the compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from mmdlm.sampling.config import SamplerConfig

if TYPE_CHECKING:
    from mmdlm.sequence import Batch

StepCallback = Callable[[int, torch.Tensor], None]
"""(step index, canvas Long[B, T]) -> None: called after every step (diffusers' `callback_on_step_end`)."""


@dataclass
class SampleResult:
    ids: torch.Tensor  # Long[B, T]: the batch's ids with the target region filled
    nfe: int  # forward calls (the sampling cost in the diffusion literature's unit)
    history: list[torch.Tensor] | None = None  # Long[B, T] canvas after each step, when asked for
    forward_rows: int = 0  # sequences run through the model in all: guidance and check rows included
    remasked: int = 0  # committed tokens that self-correction re-masked
    row_nfe: torch.Tensor | None = None  # Long[B]: forward calls each row was in (rows that finish early leave
    #   the batch); None = every row was in all `nfe`


class State(Protocol):
    """What a scheduler carries from step to step."""

    canvas: torch.Tensor  # Long[B, T]: the batch's ids, target positions filled so far
    i: int  # steps taken

    @property
    def done(self) -> bool: ...

    def result(self) -> SampleResult: ...


class Scheduler:
    """Base of the schedulers: subclasses write `set_timesteps`, `model_inputs` and `step`."""

    autoregressive: bool = False  # True: decodes left to right (needs a causal model); no infilling

    def set_timesteps(self, batch: Batch, config: SamplerConfig, *, anchor: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> State:
        """Plan a run over the batch's target region (`anchor`: Bool[B, T] targets that must stay)."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, state: State) -> None:
        """Anything a run needs from the model before its first step (the AR scheduler's KV cache)."""

    def model_inputs(self, state: State) -> dict[str, Any]:
        """Keyword arguments of the model call of the next step (`Transformer.forward`)."""
        raise NotImplementedError

    def step(self, logits: torch.Tensor, state: State) -> None:
        """Update `state.canvas` (and the rest of the state) from the logits of `model_inputs(state)`."""
        raise NotImplementedError

    def sample(self, model: nn.Module, batch: Batch, config: SamplerConfig = SamplerConfig(), *,
               anchor: torch.Tensor | None = None, generator: torch.Generator | None = None,
               history: bool = False, callback: StepCallback | None = None) -> SampleResult:
        """Fill the batch's `<mask>` targets: the loop model -> `step` until the scheduler is done.

        The model should be in eval mode; with a fixed `generator` (on the batch's device) the result is
        deterministic. `history` keeps the canvas after every step; `callback(i, canvas)` sees it live.
        The loop runs in `torch.inference_mode` (no autograd bookkeeping: ~5% of a batch-1 CPU step); the
        returned tensors are ordinary ones.
        """
        with torch.inference_mode():
            state = self.set_timesteps(batch, config, anchor=anchor, generator=generator)
            self.prepare(model, state)
            frames: list[torch.Tensor] | None = [] if history else None
            while not state.done:
                self.step(model(**self.model_inputs(state)), state)
                if frames is not None:
                    frames.append(state.canvas.clone())
                if callback is not None:
                    callback(state.i, state.canvas)
            out = state.result()
        out.ids = out.ids.clone()  # outside inference mode: a tensor callers may write into
        out.history = None if frames is None else [f.clone() for f in frames]
        return out

    def sample_in_groups(self, model: nn.Module, batch: Batch, config: SamplerConfig,
                         generator: torch.Generator | None = None) -> SampleResult:
        """`sample` one group of rows at a time, the rows of a group sharing one target layout (for schedulers
        that need it: the AR and block schedulers, given training's mixed validation batches)."""
        ids = batch.ids.clone()
        nfe = rows = 0
        _, group = torch.unique(batch.target, dim=0, return_inverse=True)  # (B,)
        for g in range(int(group.max()) + 1):
            sel = (group == g).nonzero().squeeze(1)  # (b,)
            out = self.sample(model, batch.select(sel), config, generator=generator)
            ids[sel] = out.ids
            nfe, rows = nfe + out.nfe, rows + out.forward_rows
        return SampleResult(ids, nfe, None, rows)
