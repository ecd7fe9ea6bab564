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

The rows of a batch share one target layout (a batch whose rows differ is decoded in groups of rows that agree) but
each row moves to its next block as soon as its current one is filled, so rows sit at different blocks: a call feeds
every row the positions from the earliest block not yet final in any row to the end of the furthest current block
(a row ahead re-feeds some final blocks, which writes the same keys and values; a row behind feeds later blocks
that its queries cannot see and that a later call rewrites). A row with no `<mask>` left (an `<eos>` filled the
rest of its text) leaves the calls and the cache. Classifier-free guidance runs the unconditional copies of the
rows in the same call (`pad | cond`): the condition lives in the prompt, so the copies differ only in their cached
prompt and share everything the sampler commits.

Target positions that hold a token are anchors (inpainting's kept cells, infilling's given words): never changed.
Blocks stay causal, so a blank sees the anchors before it and in its own block, not those in later blocks (a block
model is trained on that context only).

Self-correction (`SelfCorrection`, ReMDM as the masked scheduler does it) revises inside the current block: each call
also runs every row again with the committed tokens of its current block it is least sure of masked, and re-masks
those the model no longer believes in; a finished block is final. With it every call recomputes from the start (the
check rows change the batch), at most `extra_steps` calls re-mask.
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
from mmdlm.sampling.tokens import CONFIDENCE, doubted, guided_logits, least_sure, predict, restrict, top_k_mask
from mmdlm.vocab import Vocab

if TYPE_CHECKING:
    from mmdlm.model import KVCache
    from mmdlm.sequence import Batch


@dataclass
class BlockState:
    """A block-diffusion run in progress: each row's current block `unit`, the steps it took in it, and the
    positions whose cache entries are final (`final`)."""

    canvas: torch.Tensor  # Long[B, T]
    config: SamplerConfig
    batch: Batch
    generator: torch.Generator | None
    block: torch.Tensor  # Long[B, T] token blocks
    lo: torch.Tensor  # Long[U + 2] per block u: the first position a call of it feeds (T past the last block)
    hi: torch.Tensor  # Long[U + 2] per block u: the end of the positions a call of it feeds
    modality: torch.Tensor  # Long[B, T]
    allowed: torch.Tensor  # Bool[2, V] per modality: the ids a position may take
    columns: list[torch.Tensor]  # Long[V_m] per modality: the same as index lists
    text: torch.Tensor  # Bool[B, T]: text target positions
    units: int  # blocks holding targets
    mask_id: int  # the <mask> id
    unit: torch.Tensor  # Long[B] each row's current block (units + 1: none left)
    j: torch.Tensor  # Long[B] steps each row took in its current block
    final: torch.Tensor  # Long[B] positions [0, final) of each row hold final keys and values in the cache
    fill: torch.Tensor | None = None  # Bool[B, T]: the positions the sampler owns (masked targets, not anchors)
    p_commit: torch.Tensor | None = None  # Float64[B, T]: p(token) when last judged (self-correction)
    scored: torch.Tensor | None = None  # Bool[B, T]: the current blocks' <mask> targets the last call scored
    check: torch.Tensor | None = None  # Bool[B, T]: the committed tokens the next call checks (self-correction)
    revisions: int = 0  # calls that re-masked a token (at most `SelfCorrection.extra_steps`)
    remasked: int = 0
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
        return bool((self.unit > self.units).all())

    def result(self) -> SampleResult:
        row_nfe = self.row_nfe if self.row_nfe is not None else torch.zeros_like(self.canvas[:, 0])
        return SampleResult(self.canvas, self.nfe, None, self.rows, self.remasked, row_nfe)

    def masked(self) -> torch.Tensor:
        """Bool[B, T]: the `<mask>` targets of each row's current block."""
        return (self.canvas == self.mask_id) & self.batch.target & (self.block == self.unit[:, None])


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
        if bool(batch.target.any()) and not bool((batch.target == batch.target[:1]).all()):
            raise ValueError("the block scheduler needs the same target layout in every row of the batch")
        block = token_blocks(batch.target, batch.pad, batch.image_index, batch.prefix, block_size=self.block_size,
                             image_block_rows=self.image_block_rows, grid_width=self.grid_width)  # (B, T)
        att = attention_blocks(block, self.shift)[0]  # (T,) the same in every row
        units = int(block[batch.target].max()) if bool(batch.target.any()) else 0
        B, T = batch.ids.shape
        lo, hi = [0], [0]
        for u in range(1, units + 1):  # a block's attention positions, and with a shifted head its last token too
            at = (att == u).nonzero().squeeze(1)
            last = int((batch.target[0] & (block[0] == u)).nonzero().max())
            lo.append(int(at[0]))
            hi.append(max(int(at[-1]) + 1, last + 1))
        device = batch.ids.device
        allowed = self.vocab.allowed_table(device)  # (2, V)
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        state = BlockState(canvas=batch.ids.clone(), config=config, batch=batch, generator=generator, block=block,
                           lo=torch.tensor(lo + [T], device=device), hi=torch.tensor(hi + [T], device=device),
                           modality=(batch.image_index >= 0).long(), allowed=allowed,
                           columns=[row.nonzero().squeeze(1) for row in allowed],
                           text=batch.target & (batch.image_index < 0), units=units, mask_id=self.vocab.mask,
                           unit=zeros + 1, j=zeros.clone(), final=zeros.clone(),
                           fill=batch.target & (batch.ids == self.vocab.mask),
                           p_commit=torch.zeros(B, T, dtype=torch.float64, device=device))
        self._next_unit(state)
        return state

    def prepare(self, model: nn.Module, state: BlockState) -> None:
        """A KV cache over the whole row for every row of the calls, guidance copies included
        (`SamplerConfig.use_cache`; not with self-correction, whose check rows change the batch every call)."""
        if state.config.use_cache and state.config.self_correction is None and not state.done:
            B, T = state.canvas.shape
            state.cache = model.new_cache(B * state.config.guidance_rows, T, device=state.canvas.device)

    def model_inputs(self, state: BlockState) -> dict[str, Any]:
        """The positions from the first block not yet final in the cache in any row to the end of the furthest current
        block (from 0 without a cache), for the rows with a `<mask>` left; with guidance, the same rows again with the
        condition dropped. Only each row's current block's `<mask>` positions are scored (`logits_at`)."""
        s, o, b = state, state.config, state.batch
        copies = o.guidance_rows
        guided = copies > 1 and (o.guidance_steps is None or s.i < o.guidance_steps)
        if s.cache is not None and s.guided and not guided:  # guidance has just ended: its rows leave the cache
            s.cache.keep_rows(slice(0, len(s.cache.pad) // copies))
        s.guided = guided
        self._leave(s, copies if guided else 1)
        rows = s.live if s.live is not None else slice(None)
        hi = int(s.hi[s.unit[rows]].max())
        lo = int(s.final[rows].min()) if s.cache is not None else 0
        s.start = lo
        pad = b.pad[rows, lo:hi]  # (L, W)
        s.scored = s.masked()  # (B, T)
        kw = {"ids": s.canvas[rows, lo:hi], "pad": pad, "image_index": b.image_index[rows, lo:hi],
              "block": s.block[rows], "logits_at": s.scored[rows, lo:hi]}
        s.check = self._check(s)
        if s.check is not None:  # check rows: each row again with its least sure tokens masked, after the rows
            check = s.check[rows, lo:hi]  # (L, W)
            kw = {k: torch.cat([v, v]) for k, v in kw.items()} | {
                "ids": torch.cat([kw["ids"], kw["ids"].masked_fill(check, s.mask_id)]),
                "logits_at": torch.cat([kw["logits_at"], check])}
            pad = kw["pad"]
        if guided:
            cond = b.cond[rows, lo:hi].repeat(len(pad) // len(b.cond[rows]), 1)  # (L or 2L, W)
            dropped = [pad | cond & (kw["image_index"] < 0), pad | cond] if copies == 3 else [pad | cond]
            kw = {k: v.repeat(copies, 1) for k, v in kw.items()} | {"pad": torch.cat([pad, *dropped])}
        s.rows += kw["ids"].shape[0]
        if s.cache is not None:
            s.cache.length = lo  # the provisional entries of the current block are rewritten
            kw["cache"] = s.cache
        return kw

    @staticmethod
    def _check(s: BlockState) -> torch.Tensor | None:
        """Bool[B, T]: with self-correction, the committed tokens of each row's current block it is least sure of
        (`SelfCorrection.max_per_step`), while its budget of re-masking calls lasts; None when there are none."""
        sc = s.config.self_correction
        if sc is None or s.revisions >= sc.extra_steps:
            return None
        committed = s.fill & (s.canvas != s.mask_id) & (s.block == s.unit[:, None])  # (B, T)
        check = least_sure(s.p_commit, committed, sc.max_per_step)  # (B, T)
        return check if bool(check.any()) else None

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
            s.cache.keep_rows(torch.isin(held, rows).nonzero().squeeze(1), copies)  # among the cached rows
        s.live = rows

    def unit_logits(self, logits: torch.Tensor, state: BlockState) -> tuple[torch.Tensor, torch.Tensor]:
        """(Bool[B, T] the current block's `<mask>` targets, Float[N, V] their logits in row-major order, guidance
        combined) from the scored logits of `model_inputs`."""
        s, o = state, state.config
        masked = s.scored  # (B, T)
        if not s.guided:
            return masked, logits
        c, *text_uncond, u = logits.float().chunk(o.guidance_rows)  # (N, V) each: the same positions
        modality = s.modality[masked] if s.check is None else torch.cat([s.modality[masked], s.modality[s.check]])
        reference = restrict(c, modality, s.allowed) if o.guidance_plausibility > 0 else None
        return masked, guided_logits(c, u, o.guidance_scale, o.guidance_plausibility, reference,
                                     text_uncond[0] if text_uncond else None, o.image_guidance_scale or 0.0)

    def step(self, logits: torch.Tensor, state: BlockState) -> None:
        s, o = state, state.config
        s.nfe += 1
        in_call = torch.zeros_like(s.canvas[:, 0])  # (B,)
        in_call[s.live if s.live is not None else slice(None)] = 1
        s.row_nfe = in_call if s.row_nfe is None else s.row_nfe + in_call
        if s.cache is not None:  # each row's blocks before its current one were fed with their final tokens
            s.final = torch.where(in_call.bool(), s.lo[s.unit], s.final)  # (B,)
        masked, lg = self.unit_logits(logits, s)  # (B, T), (N + C, V): the masks, then the checked tokens
        where = masked.nonzero(as_tuple=True)
        n = len(where[0])
        chosen, p, c = predict(lg[:n], s.modality[where], s.columns, o.temperatures, s.generator, o.top_k,
                               CONFIDENCE[o.confidence])  # (N,) each
        B, T = s.canvas.shape
        conf = torch.full((B, T), float("-inf"), dtype=torch.float64, device=s.canvas.device)
        conf[where] = c
        proposal = s.canvas.clone()
        proposal[where] = chosen
        n_masked = masked.sum(1)  # (B,)
        image = (masked & (s.modality == 1)).any(1)  # (B,) rows in an image band (a block holds one modality)
        k = n_masked.clamp(max=1)  # (B,) one token per step
        for steps, rows in ((o.steps, ~image), (o.image_steps if o.image_steps is not None else o.steps, image)):
            if steps is not None:  # ceil: the block is done after `steps` steps
                k = torch.where(rows, -(-n_masked // (steps - s.j).clamp(min=1)), k)  # (B,)
        text = masked & (s.modality == 0)  # (B, T)
        ordered = text if o.left_to_right else torch.zeros_like(text)  # (B, T): committed in AR order
        leftmost = -torch.arange(T, device=conf.device, dtype=conf.dtype).expand(B, T)  # (B, T)
        commit = top_k_mask(torch.where(ordered, leftmost, conf), k)  # (B, T)
        if o.threshold is not None:
            sure = masked & (conf > o.threshold)  # (B, T)
            # AR order: only the run of sure tokens right after the scheduled ones (a parallel draft accepted up
            # to its first doubtful token), so no token is committed before the ones to its left
            run = (~ordered | sure | commit).long().cumprod(1).bool()  # (B, T)
            commit |= sure & (run | ~ordered)
        s.canvas = torch.where(commit, proposal, s.canvas)
        p_chosen = torch.zeros_like(s.p_commit)
        p_chosen[where] = p
        s.p_commit = torch.where(commit, p_chosen, s.p_commit)
        if s.check is not None:
            self._revise(s, lg[n:])
        if o.eos_fill:
            filled = eos_fill(s.canvas, s.text, self.vocab.eos, self.vocab.mask)  # (B, T)
            s.canvas = s.canvas.masked_fill(filled, self.vocab.eos)
            s.p_commit = s.p_commit.masked_fill(filled, 1.0)
        s.j, s.i = s.j + in_call, s.i + 1
        self._next_unit(s)

    @staticmethod
    def _revise(s: BlockState, logits: torch.Tensor) -> None:
        """Re-mask the checked tokens the model no longer believes in (`SelfCorrection`, as the masked scheduler):
        p(token | the rest) below the threshold, and, by default, another token now preferred."""
        cw = s.check.nonzero(as_tuple=True)
        drop, p_now = doubted(logits, s.canvas[cw], s.modality[cw], s.allowed, s.config.self_correction)  # (C,) each
        s.p_commit[cw] = p_now
        again = torch.zeros_like(s.check)
        again[cw] = drop
        s.canvas = s.canvas.masked_fill(again, s.mask_id)
        if bool(drop.any()):
            s.remasked += int(drop.sum())
            s.revisions += 1

    @staticmethod
    def _next_unit(s: BlockState) -> None:
        """Move each row to its first block at or after its current one that still holds a `<mask>`."""
        B, U = s.canvas.shape[0], s.units + 2
        left = torch.zeros(B, U, dtype=torch.bool, device=s.canvas.device)  # (B, U) blocks with a <mask> left
        at = (s.canvas == s.mask_id) & s.batch.target  # (B, T)
        left.scatter_(1, torch.where(at, s.block, 0), at)  # block 0 (the prompt) never holds a target
        u = torch.arange(U, device=s.canvas.device)  # (U,)
        nxt = torch.where(left & (u >= s.unit[:, None]), u, U - 1).amin(1)  # (B,) units + 1 when none is left
        s.j = torch.where(nxt == s.unit, s.j, 0)
        s.unit = nxt

    @torch.no_grad()
    def sample(self, model: nn.Module, batch: Batch, config: SamplerConfig = SamplerConfig(), *,
               anchor: torch.Tensor | None = None, generator: torch.Generator | None = None,
               history: bool = False, callback: StepCallback | None = None) -> SampleResult:
        target = batch.target
        if len(target) and not bool((target == target[:1]).all()):
            return self.sample_in_groups(model, batch, config, generator=generator)
        return super().sample(model, batch, config, anchor=anchor, generator=generator, history=history,
                              callback=callback)
