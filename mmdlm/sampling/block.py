"""`BlockScheduler`: block diffusion's decoder (BD3-LM, SDAR, Fast-dLLM v2), block by block with an exact KV cache.

The target is cut into the blocks the model was trained with (`mmdlm.blocks`). Blocks are decoded in order; inside a
block the masked scheduler's rule commits tokens (the most confident first, `steps` per block, `image_steps` per
image band when they differ, or one token per step, a `threshold` committing every prediction above it, `<eos>`
filling the rest of a text region). Each call feeds the model the positions from the first block whose final tokens
are not yet cached up to the end of the current block: a block's keys and values are written once more with its
final tokens, at the first call of the next block, and never recomputed after that (exact: a block attends only to
itself and the blocks before it). The current block's entries are provisional and rewritten by every call. With a
shifted head (`shift_logits`) a block's last token is read at the position before it, so a call also feeds that last
position: it belongs to the next attention block, which the current block's queries cannot see.

The rows of a batch share one target layout and move from block to block together (a batch whose rows differ is
decoded in groups of rows that agree); a row that finishes a block early waits for the others, and a row with no
`<mask>` left (an `<eos>` filled the rest of its text) leaves the calls and the cache. Classifier-free guidance runs
the unconditional copies of the rows in the same call (`pad | cond`): the condition lives in the prompt, so the
copies differ only in their cached prompt and share everything the sampler commits.

Target positions that hold a token are anchors (inpainting's kept cells, infilling's given words): never changed.
Blocks stay causal, so a blank sees the anchors before it and in its own block, not those in later blocks (a block
model is trained on that context only). Not yet: self-correction.
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
from mmdlm.sampling.tokens import CONFIDENCE, guided_logits, predict, restrict, top_k_mask
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
    allowed: torch.Tensor  # Bool[2, V] per modality: the ids a position may take
    columns: list[torch.Tensor]  # Long[V_m] per modality: the same as index lists
    text: torch.Tensor  # Bool[B, T]: text target positions
    units: int  # blocks holding targets
    mask_id: int  # the <mask> id
    unit: int = 1
    j: int = 0  # steps taken in the current block
    final: int = 0  # positions [0, final) hold final keys and values in the cache
    start: int = 0  # where the last call's positions began
    cache: KVCache | None = None
    live: torch.Tensor | None = None  # Long[L]: the rows in the calls and the cache (None = all)
    guided: bool = False  # the last call had the unconditional rows
    i: int = 0
    nfe: int = 0
    rows: int = 0  # sequences run in all (guidance rows included)
    row_nfe: torch.Tensor | None = None  # Long[B] calls each row was in

    @property
    def done(self) -> bool:
        return self.unit > self.units

    def result(self) -> SampleResult:
        row_nfe = self.row_nfe if self.row_nfe is not None else torch.zeros_like(self.canvas[:, 0])
        return SampleResult(self.canvas, self.nfe, None, self.rows, row_nfe=row_nfe)

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
        if anchor is not None and bool((anchor & (batch.ids == self.vocab.mask)).any()):
            raise ValueError("an anchored position holds <mask>: write the anchored token into batch.ids")
        if config.self_correction is not None:
            raise ValueError("the block scheduler has no self-correction yet")
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
                           bounds=bounds, modality=(batch.image_index >= 0).long(), allowed=allowed,
                           columns=[row.nonzero().squeeze(1) for row in allowed],
                           text=batch.target & (batch.image_index < 0), units=units, mask_id=self.vocab.mask)
        self._next_unit(state)
        return state

    def prepare(self, model: nn.Module, state: BlockState) -> None:
        """A KV cache over the whole row for every row of the calls, guidance copies included
        (`SamplerConfig.use_cache`)."""
        if state.config.use_cache and not state.done:
            B, T = state.canvas.shape
            state.cache = model.new_cache(B * state.config.guidance_rows, T, device=state.canvas.device)

    def model_inputs(self, state: BlockState) -> dict[str, Any]:
        """The positions from the first block not yet final in the cache to the end of the current one (from 0
        without a cache), for the rows with a `<mask>` left; with guidance, the same rows again with the condition
        dropped. Only the current block's `<mask>` positions are scored (`logits_at`)."""
        s, o, b = state, state.config, state.batch
        hi = s.bounds[s.unit][1]
        lo = s.final if s.cache is not None else 0
        s.start = lo
        copies = o.guidance_rows
        guided = copies > 1 and (o.guidance_steps is None or s.i < o.guidance_steps)
        if s.cache is not None and s.guided and not guided:  # guidance has just ended: its rows leave the cache
            s.cache.keep_rows(slice(0, len(s.cache.pad) // copies))
        s.guided = guided
        self._leave(s, copies if guided else 1)
        rows = s.live if s.live is not None else slice(None)
        pad = b.pad[rows, lo:hi]  # (L, W)
        kw = {"ids": s.canvas[rows, lo:hi], "pad": pad, "image_index": b.image_index[rows, lo:hi],
              "block": s.block[rows], "logits_at": s.masked()[rows, lo:hi]}
        if guided:
            cond = b.cond[rows, lo:hi]  # (L, W)
            dropped = [pad | cond & (kw["image_index"] < 0), pad | cond] if copies == 3 else [pad | cond]
            kw = {k: v.repeat(copies, 1) for k, v in kw.items()} | {"pad": torch.cat([pad, *dropped])}
        s.rows += kw["ids"].shape[0]
        if s.cache is not None:
            s.cache.length = lo  # the provisional entries of the current block are rewritten
            kw["cache"] = s.cache
        return kw

    @staticmethod
    def _leave(s: BlockState, copies: int) -> None:
        """Rows with no `<mask>` left leave the calls, and their rows (with their guidance copies) the cache."""
        B = s.canvas.shape[0]
        left = ((s.canvas == s.mask_id) & s.batch.target).any(1)  # (B,)
        rows = left.nonzero().squeeze(1)  # (L,)
        held = s.live if s.live is not None else torch.arange(B, device=left.device)
        if len(rows) == len(held):
            return
        if s.cache is not None:
            keep = torch.isin(held, rows).nonzero().squeeze(1)  # (L,) among the cached rows of each copy
            s.cache.keep_rows(torch.cat([keep + j * len(held) for j in range(copies)]))
        s.live = rows

    def unit_logits(self, logits: torch.Tensor, state: BlockState) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bool[B, T] the current block's `<mask>` targets, Float[N, V] their logits in row-major order, guidance
        combined) from the scored logits of `model_inputs`."""
        s, o = state, state.config
        masked = s.masked()  # (B, T)
        if not s.guided:
            return masked, logits
        c, *text_uncond, u = logits.float().chunk(o.guidance_rows)  # (N, V) each: the same positions
        reference = restrict(c, s.modality[masked], s.allowed) if o.guidance_plausibility > 0 else None
        return masked, guided_logits(c, u, o.guidance_scale, o.guidance_plausibility, reference,
                                     text_uncond[0] if text_uncond else None, o.image_guidance_scale or 0.0)

    def step(self, logits: torch.Tensor, state: BlockState) -> None:
        s, o = state, state.config
        s.nfe += 1
        in_call = torch.zeros_like(s.canvas[:, 0])  # (B,)
        in_call[s.live if s.live is not None else slice(None)] = 1
        s.row_nfe = in_call if s.row_nfe is None else s.row_nfe + in_call
        if s.cache is not None:
            s.final = s.bounds[s.unit][0]  # everything before the current block was fed with its final tokens
        masked, lg = self.unit_logits(logits, s)  # (B, T), (N, V)
        where = masked.nonzero(as_tuple=True)
        chosen, _, c = predict(lg, s.modality[where], s.columns, o.temperatures, s.generator, o.top_k,
                               CONFIDENCE[o.confidence])  # (N,) each
        B, T = s.canvas.shape
        conf = torch.full((B, T), float("-inf"), dtype=torch.float64, device=s.canvas.device)
        conf[where] = c
        proposal = s.canvas.clone()
        proposal[where] = chosen
        n_masked = masked.sum(1)  # (B,)
        image = bool((masked & (s.modality == 1)).any())  # an image band (a block holds one modality's targets)
        steps = o.image_steps if image and o.image_steps is not None else o.steps
        if steps is None:  # one token per step
            k = n_masked.clamp(max=1)  # (B,)
        else:  # ceil: the block is done after `steps` steps
            k = -(-n_masked // max(steps - s.j, 1))  # (B,)
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
