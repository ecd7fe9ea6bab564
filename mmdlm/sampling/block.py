"""`BlockScheduler`: block diffusion's decoder (BD3-LM, SDAR, Fast-dLLM v2), block by block with an exact KV cache.

The target is cut into the blocks the model was trained with (`mmdlm.blocks`). Blocks are decoded in order; inside
a block the masked scheduler's rule commits tokens (the most confident first, `steps` per block or one token per
step, a `threshold` committing every prediction above it, `<eos>` filling the rest of a text region). Each call
feeds the model the positions from the first block whose final tokens are not yet cached up to the end of the
current block: a block's keys and values are written once more with its final tokens, at the first call of the
next block, and never recomputed after that (exact: a block attends only to itself and the blocks before it). The
current block's entries are provisional and rewritten by every call. With a shifted head (`shift_logits`) a
block's last token is read at the position before it, so a call also feeds that last position: it belongs to the
next attention block, which the current block's queries cannot see.

The rows of a batch share one target layout and move from block to block together (a batch whose rows differ is
decoded in groups of rows that agree); a row that finishes a block early waits for the others. Not yet: guidance
rows, anchored tokens (inpainting), self-correction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmdlm.blocks import token_blocks
from mmdlm.model import attention_blocks
from mmdlm.sampling.config import SamplerConfig
from mmdlm.sampling.masked import eos_fill
from mmdlm.sampling.scheduler import SampleResult, Scheduler, StepCallback
from mmdlm.sampling.tokens import CONFIDENCE, predict, top_k_mask
from mmdlm.vocab import Vocab

if TYPE_CHECKING:
    from mmdlm.model import KVCache
    from mmdlm.sequence import Batch


@dataclass
class BlockState:
    """A block-diffusion run in progress: the current block `unit`, the steps taken in it, and the positions whose
    cache entries are final (`final`)."""

    canvas: torch.Tensor  # Long[B, T]
    config: SamplerConfig
    batch: Batch
    generator: torch.Generator | None
    block: torch.Tensor  # Long[B, T] token blocks
    bounds: list[tuple[int, int]]  # per block u: the positions [lo, hi) a call of it feeds
    modality: torch.Tensor  # Long[B, T]
    columns: list[torch.Tensor]  # Long[V_m] per modality: the ids a position may take
    text: torch.Tensor  # Bool[B, T]: text target positions
    units: int  # blocks holding targets
    mask_id: int  # the <mask> id
    unit: int = 1
    j: int = 0  # steps taken in the current block
    final: int = 0  # positions [0, final) hold final keys and values in the cache
    start: int = 0  # where the last call's positions began
    cache: KVCache | None = None
    i: int = 0
    nfe: int = 0

    @property
    def done(self) -> bool:
        return self.unit > self.units

    def result(self) -> SampleResult:
        B = self.canvas.shape[0]
        return SampleResult(self.canvas, self.nfe, None, self.nfe * B,
                            row_nfe=torch.full((B,), self.nfe, dtype=torch.long, device=self.canvas.device))

    def masked(self) -> torch.Tensor:
        """Bool[B, T]: the `<mask>` targets of the current block."""
        return (self.canvas == self.mask_id) & self.batch.target & (self.block == self.unit)


class BlockScheduler(Scheduler):
    """Block by block, the masked scheduler's commits inside a block (a model with `ModelConfig.block_diffusion`)."""

    def __init__(self, vocab: Vocab, block_size: int, image_block_rows: int, grid_width: int, shift: bool) -> None:
        self.vocab = vocab
        self.block_size, self.image_block_rows, self.grid_width, self.shift = (block_size, image_block_rows,
                                                                               grid_width, shift)

    def set_timesteps(self, batch: Batch, config: SamplerConfig, *, anchor: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> BlockState:
        if anchor is not None and bool(anchor.any()):
            raise ValueError("the block scheduler cannot keep anchored tokens yet (inpainting)")
        if config.guidance_scale or config.image_guidance_scale or config.self_correction is not None:
            raise ValueError("the block scheduler has no guidance rows or self-correction yet")
        if bool(batch.target.any()) and not bool((batch.target == batch.target[:1]).all()):
            raise ValueError("the block scheduler needs the same target layout in every row of the batch")
        block = token_blocks(batch.target, batch.pad, batch.image_index, batch.prefix, block_size=self.block_size,
                             image_block_rows=self.image_block_rows, grid_width=self.grid_width)  # (B, T)
        att = attention_blocks(block, self.shift)[0]  # (T,) the same in every row
        units = int(block[batch.target].max()) if bool(batch.target.any()) else 0
        bounds = [(0, 0)]
        for u in range(1, units + 1):  # a block's attention positions, and with a shifted head its last token too
            at = (att == u).nonzero().squeeze(1)
            last = int((batch.target[0] & (block[0] == u)).nonzero().max())
            bounds.append((int(at[0]), max(int(at[-1]) + 1, last + 1)))
        allowed = self.vocab.allowed_table(batch.ids.device)  # (2, V)
        state = BlockState(canvas=batch.ids.clone(), config=config, batch=batch, generator=generator, block=block,
                           bounds=bounds, modality=(batch.image_index >= 0).long(),
                           columns=[row.nonzero().squeeze(1) for row in allowed],
                           text=batch.target & (batch.image_index < 0), units=units, mask_id=self.vocab.mask)
        self._next_unit(state)
        return state

    def prepare(self, model: nn.Module, state: BlockState) -> None:
        """A KV cache over the whole row (`SamplerConfig.use_cache`)."""
        if state.config.use_cache and not state.done:
            state.cache = model.new_cache(state.canvas.shape[0], state.canvas.shape[1], device=state.canvas.device)

    def model_inputs(self, state: BlockState) -> dict[str, Any]:
        """The positions from the first block not yet final in the cache to the end of the current one (from 0
        without a cache)."""
        b = state.batch
        hi = state.bounds[state.unit][1]
        lo = state.final if state.cache is not None else 0
        state.start = lo
        kw = {"ids": state.canvas[:, lo:hi], "pad": b.pad[:, lo:hi], "image_index": b.image_index[:, lo:hi],
              "block": state.block}
        if state.cache is not None:
            state.cache.length = lo  # the provisional entries of the current block are rewritten
            kw["cache"] = state.cache
        return kw

    def unit_logits(self, logits: torch.Tensor, state: BlockState) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bool[B, T] the current block's `<mask>` targets, Float[N, V] their logits in row-major order) from the
        logits of `model_inputs`' positions."""
        masked = state.masked()  # (B, T)
        lo = state.start
        return masked, logits[masked[:, lo : lo + logits.shape[1]]]  # (N, V)

    def step(self, logits: torch.Tensor, state: BlockState) -> None:
        s, o = state, state.config
        s.nfe += 1
        if s.cache is not None:
            s.final = s.bounds[s.unit][0]  # everything before the current block was fed with its final tokens
        masked, lg = self.unit_logits(logits, s)  # (B, T), (N, V)
        where = masked.nonzero(as_tuple=True)
        chosen, _, c = predict(lg, s.modality[where], s.columns, o.temperature, s.generator, o.top_k,
                               CONFIDENCE[o.confidence])  # (N,) each
        B, T = s.canvas.shape
        conf = torch.full((B, T), float("-inf"), dtype=torch.float64, device=s.canvas.device)
        conf[where] = c
        proposal = s.canvas.clone()
        proposal[where] = chosen
        n_masked = masked.sum(1)  # (B,)
        if o.steps is None:  # one token per step
            k = n_masked.clamp(max=1)  # (B,)
        else:  # ceil: the block is done after `steps` steps
            k = -(-n_masked // max(o.steps - s.j, 1))  # (B,)
        commit = top_k_mask(conf, k)  # (B, T)
        if o.threshold is not None:
            commit |= masked & (conf > o.threshold)
        s.canvas = torch.where(commit, proposal, s.canvas)
        if o.eos_fill:
            s.canvas = s.canvas.masked_fill(eos_fill(s.canvas, s.text, self.vocab.eos, self.vocab.mask), self.vocab.eos)
        s.j, s.i = s.j + 1, s.i + 1
        self._next_unit(s)

    def _next_unit(self, s: BlockState) -> None:
        """Move to the first block at or after the current one that still holds a `<mask>`."""
        while s.unit <= s.units and not bool(s.masked().any()):
            s.unit, s.j = s.unit + 1, 0

    @torch.no_grad()
    def sample(self, model: nn.Module, batch: Batch, config: SamplerConfig = SamplerConfig(), *,
               anchor: torch.Tensor | None = None, generator: torch.Generator | None = None,
               history: bool = False, callback: StepCallback | None = None) -> SampleResult:
        target = batch.target
        if len(target) and not bool((target == target[:1]).all()):
            return self.sample_in_groups(model, batch, config, generator=generator)
        return super().sample(model, batch, config, anchor=anchor, generator=generator, history=history,
                              callback=callback)
