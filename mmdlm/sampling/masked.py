"""`MaskedScheduler`: masked-diffusion decoding of a batch's target region.

The target positions hold `<mask>`; every step predicts all of them in one forward call and commits some,
until none is left. It follows:
- LLaDA (Nie et al. 2025, `generate.py`): low-confidence remasking (commit the most confident predictions,
  the rest stays masked), tokens per step spread so that exactly all masked tokens are committed after
  `steps` steps, semi-autoregressive blocks over long text (and, as an option, over image rows in raster
  order), classifier-free guidance.
- MaskGIT (Chang et al. 2022): the cosine schedule for image tokens.
- Fast-dLLM (Wu et al. 2025): threshold parallel decoding, committing every prediction whose confidence
  passes a threshold on top of the schedule (and at least one token per step), so a text or an image takes at
  most its steps and fewer when its predictions are sure; a row's next text block opens as soon as the open
  ones are filled (how many tokens a step commits is decided by confidence).
- ReMDM (Wang et al. 2025): committed tokens may be re-masked and predicted again (`SelfCorrection`).
- LaViDa's exact prefix cache: a model trained with `ModelConfig.prefix_attention` keeps its prompt from
  attending to the generated region, so the prompt's keys/values are computed in the first step and reused
  unchanged by every later one, which runs the rest of the sequence only (`SamplerConfig.use_cache`).
- Fast-dLLM's approximate prefix cache (`SamplerConfig.prefix_cache`), for models trained without it: the
  keys/values of the positions before the target region come from a full pass every k steps; the steps in
  between run the rest only.
Every step's prediction is modality-restricted (`Vocab.allowed_table`): image positions
(`image_index >= 0`) may only become image codes, text positions only text ids or `<eos>`.
Target positions that already hold a token are anchors: never changed, nor re-masked ("word 3 must be
'red'", inpainting). With `eos_fill`, an `<eos>` committed in a text region fills the region's masked positions
after it with `<eos>` (the templates' fill, which the model was trained on), so an answer or caption ends in
the step its `<eos>` is chosen, as the AR twin stops at its `<eos>`.

Steps: scheduled decoding runs max(text steps, image steps) steps over the modalities present (each on its
own schedule), so NFE = steps unless every token is placed earlier (a region of n < steps tokens takes n
steps), and threshold decoding or the `<eos>` fill end it earlier when every mask is placed. Self-correction adds
at most `extra_steps`. The final step commits whatever is still masked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmdlm.sampling.config import SamplerConfig
from mmdlm.sampling.scheduler import SampleResult, Scheduler
from mmdlm.sampling.tokens import (
    CONFIDENCE,
    Schedule,
    cosine_schedule,
    doubted,
    guided_logits,
    least_sure,
    linear_schedule,
    predict,
    restrict,
    top_k_mask,
)
from mmdlm.vocab import Modality, Vocab

if TYPE_CHECKING:
    from torch import nn

    from mmdlm.model import KVCache
    from mmdlm.sequence import Batch

DEFAULT_IMAGE_STEPS = 16  # image steps when `steps` is None (one token per step is for text)


@dataclass
class _Plan:
    """The fixed part of a run: each modality's blocks and, for scheduled decoding, tokens left after each step."""

    block: torch.Tensor  # Long[B, T] block of each target position within its modality's target (0 elsewhere)
    n_blocks: list[int]  # per Modality
    remaining: torch.Tensor  # Long[2, B, S] per Modality: masked tokens left after step s (threshold
    #   decoding: the floor, at least one token per step and modality; it commits more when sure)
    open_block: torch.Tensor  # Long[2, S] per Modality: its blocks <= this one may be committed at step s (a row
    #   whose open blocks are filled early, by a threshold or the <eos> fill, opens its next block)
    steps: int  # steps of the schedule: NFE without self-correction is at most this


@dataclass
class MaskedState:
    """A masked-diffusion run in progress."""

    canvas: torch.Tensor  # Long[B, T]
    config: SamplerConfig
    batch: Batch
    fill: torch.Tensor  # Bool[B, T]: the positions the sampler owns (masked targets, not anchors)
    is_image: torch.Tensor  # Bool[B, T]
    has_text: bool  # some text target is to be filled (the <eos> fill has work)
    modality: torch.Tensor  # Long[B, T]: a Modality per position
    allowed: torch.Tensor  # Bool[2, V]
    columns: list[torch.Tensor]  # Long[V_m] per Modality: the ids a position of that modality may take
    mask_id: int
    plan: _Plan
    p_commit: torch.Tensor  # Float64[B, T]: p(token) when last judged
    max_steps: int
    generator: torch.Generator | None
    i: int = 0
    nfe: int = 0
    rows: int = 0
    remasked: int = 0
    cache: KVCache | None = None  # the prefix cache (exact, or `SamplerConfig.prefix_cache`)
    split: int = 0  # positions [0, split) are cached; a cached step runs [split, T)
    refresh: int = 0  # a full pass every `refresh` steps (the approximate cache); 0 = only the first
    live: torch.Tensor | None = None  # Long[L]: the rows in the model calls (and the cache); None = all. A row
    #   with nothing left to decode leaves the batch (threshold decoding finishes rows at different steps)
    call_rows: int = 0  # sequences in the last model call (guidance and check rows included)
    row_nfe: torch.Tensor | None = None  # Long[B] model calls each row has been in
    guided: bool = False  # the last model call had the unconditional rows (guidance at this step)
    # set by model_inputs for the step that follows
    masked: torch.Tensor | None = field(default=None, repr=False)  # Bool[B, T]
    eligible: torch.Tensor | None = field(default=None, repr=False)  # Bool[B, T]
    check: torch.Tensor | None = field(default=None, repr=False)  # Bool[B, T] self-correction check rows

    @property
    def done(self) -> bool:
        return self.i >= self.max_steps or not bool(((self.canvas == self.mask_id) & self.fill).any())

    def result(self) -> SampleResult:
        return SampleResult(self.canvas, self.nfe, None, self.rows, self.remasked, self.row_nfe)


def eos_fill(canvas: torch.Tensor, text: torch.Tensor, eos: int, mask: int) -> torch.Tensor:
    """Bool[B, T]: the `<mask>` positions of a text region (a run of `text`, Bool[B, T]) that follow an `<eos>` of
    the same region with no content token (neither `<eos>` nor `<mask>`) after that `<eos>` in it: the fill."""
    B, T = canvas.shape
    pos = torch.arange(T, device=canvas.device).expand(B, T)  # (B, T)
    start = text & ~F.pad(text[:, :-1], (1, 0))  # (B, T) first position of each run
    region = start.long().cumsum(1) * text  # (B, T) 1, 2, ... per run; 0 outside
    last_eos = torch.where(text & (canvas == eos), pos, -1).cummax(1).values  # (B, T) latest <eos> at or before
    eos_here = (last_eos >= 0) & (region.gather(1, last_eos.clamp(min=0)) == region)  # (B, T)
    content = text & (canvas != eos) & (canvas != mask)  # (B, T)
    last_content = torch.where(content, pos, -1).cummax(1).values  # (B, T) latest content at or before
    next_content = torch.where(content, pos, T).flip(1).cummin(1).values.flip(1)  # (B, T) first at or after
    content_after = (next_content < T) & (region.gather(1, next_content.clamp(max=T - 1)) == region)  # (B, T)
    return text & (canvas == mask) & eos_here & (last_content < last_eos) & ~content_after


class MaskedScheduler(Scheduler):
    """Masked-diffusion decoding; the text and image commit schedules are the component's configuration
    (LLaDA's linear for text, MaskGIT's cosine for images), the rest is per call (`SamplerConfig`)."""

    autoregressive = False

    def __init__(self, vocab: Vocab, text_schedule: Schedule = linear_schedule,
                 image_schedule: Schedule = cosine_schedule) -> None:
        self.vocab, self.text_schedule, self.image_schedule = vocab, text_schedule, image_schedule

    # ---- planning -------------------------------------------------------------------------------------
    def set_timesteps(self, batch: Batch, config: SamplerConfig, *, anchor: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> MaskedState:
        vocab = self.vocab
        canvas = batch.ids.clone()  # (B, T)
        B, T = canvas.shape
        fill = batch.target & (canvas == vocab.mask)  # (B, T)
        if anchor is not None and bool((anchor & (canvas == vocab.mask)).any()):
            raise ValueError("an anchored position holds <mask>: write the anchored token into batch.ids")
        is_image = batch.image_index >= 0  # (B, T)
        plan = self._plan(batch.target, fill, is_image, config)
        sc = config.self_correction
        return MaskedState(
            canvas=canvas, config=config, batch=batch, fill=fill, is_image=is_image,
            has_text=bool((fill & ~is_image).any()), modality=is_image.long(),
            allowed=(allowed := vocab.allowed_table(canvas.device)),
            columns=[row.nonzero().squeeze(1) for row in allowed], mask_id=vocab.mask, plan=plan,
            p_commit=torch.zeros(B, T, dtype=torch.float64, device=canvas.device),
            max_steps=plan.steps + (sc.extra_steps if sc is not None else 0), generator=generator)

    def prepare(self, model: nn.Module, state: MaskedState) -> None:
        """A KV cache for every row of the model calls, when the model was trained with prefix attention (exact:
        the prompt, up to every row's `Batch.prefix`, is computed once) or with `prefix_cache` (approximate: up
        to the first masked target, refreshed every `prefix_cache` steps). The split sits one position early
        for a model reading position i's logits at i - 1 (`shift_logits`), which recomputes that position."""
        o, config = state.config, model.config
        exact = config.prefix_attention and o.use_cache and o.self_correction is None
        if exact:
            split, state.refresh = int(state.batch.prefix.min()), 0
        elif o.prefix_cache:
            split, state.refresh = int(state.fill.float().argmax(1).min()), o.prefix_cache
        else:
            return
        split -= int(config.shift_logits)
        if split < 1:
            return  # nothing to cache before the targets
        rows, T = state.canvas.shape[0] * o.guidance_rows, state.canvas.shape[1]
        state.cache, state.split = model.new_cache(rows, T, device=state.canvas.device), split

    def _steps(self, config: SamplerConfig, text_masked: torch.Tensor) -> tuple[int, int]:
        """(text steps, image steps): `steps` None = one text token per step (the largest region)."""
        text = config.steps if config.steps is not None else max(1, int(text_masked.sum(1).max()))
        image = config.image_steps or config.steps or DEFAULT_IMAGE_STEPS
        return text, image

    @staticmethod
    def _blocks(target: torch.Tensor, masked: torch.Tensor, block_length: int | None, steps: int,
                schedule: Schedule) -> tuple[torch.Tensor, int, torch.Tensor, list[int]]:
        """LLaDA's semi-autoregressive blocks over one modality's target (Bool[B, T] each, in sequence order: text
        left to right, image tokens in raster order), its steps split evenly over the blocks: (block Long[B, T],
        number of blocks, masked tokens left after each step Long[B, S], the open block of each step)."""
        B = target.shape[0]
        longest = int(target.sum(1).max())
        if block_length is not None and steps < math.ceil(longest / block_length):
            block_length = math.ceil(longest / steps)  # every block needs a step: blocks grow
        if block_length is None:
            block, n_blocks = torch.zeros_like(target, dtype=torch.long), 1
        else:  # blocks of block_length consecutive target positions
            block = ((target.long().cumsum(1) - 1).clamp(min=0) // block_length) * target  # (B, T)
            n_blocks = max(1, math.ceil(longest / block_length))
        per_block = torch.zeros(B, n_blocks, dtype=torch.long, device=target.device)
        per_block.scatter_add_(1, block, masked.long())  # (B, n_blocks) masked tokens per block
        later = per_block.flip(1).cumsum(1).flip(1) - per_block  # (B, n_blocks) masked in the blocks after
        cols: list[torch.Tensor] = []
        open_block: list[int] = []
        if bool(masked.any()):
            for j in range(n_blocks):
                steps_j = steps // n_blocks + (j < steps % n_blocks)
                cols.append(schedule(per_block[:, j], steps_j) + later[:, j : j + 1])  # (B, steps_j)
                open_block += [j] * steps_j
        left = torch.cat(cols, 1) if cols else per_block[:, :0]  # (B, S_m)
        return block, n_blocks, left, open_block

    def _plan(self, target: torch.Tensor, masked: torch.Tensor, is_image: torch.Tensor,
              o: SamplerConfig) -> _Plan:
        text_steps, image_steps = self._steps(o, masked & ~is_image)
        text = self._blocks(target & ~is_image, masked & ~is_image, o.block_length, text_steps, self.text_schedule)
        image = self._blocks(target & is_image, masked & is_image, o.image_block_length, image_steps,
                             self.image_schedule)
        steps = max(text[2].shape[1], image[2].shape[1])
        # a modality with fewer steps is done early: nothing of it is left in the later steps
        remaining = torch.stack([F.pad(m[2], (0, steps - m[2].shape[1])) for m in (text, image)])  # (2, B, S)
        open_ = torch.tensor([m[3] + [m[1] - 1] * (steps - len(m[3])) for m in (text, image)],
                             dtype=torch.long, device=target.device).view(2, steps)  # (2, S)
        return _Plan(text[0] + image[0], [text[1], image[1]], remaining, open_, steps)

    # ---- one step -------------------------------------------------------------------------------------
    def model_inputs(self, state: MaskedState) -> dict[str, Any]:
        """The canvas rows, then self-correction's check rows (the least sure committed tokens masked), then,
        with guidance, the same rows again with the condition dropped (`pad | cond`): one call. Only the
        positions `step` reads are scored (`logits_at`: the eligible masks, the checked tokens): the output
        head is ~18% of a tiny model's per-position FLOPs and most positions are prompt."""
        s, o, plan = state, state.config, state.plan
        mask = self.vocab.mask
        masked = (s.canvas == mask) & s.fill  # (B, T); anchors and prompt never hold <mask>
        last = s.i == s.max_steps - 1  # the final step commits everything, whatever the rule
        if last:
            eligible = masked
        else:  # each modality's masks in its open block, or in its first block with masks left when a threshold
            # or the <eos> fill emptied the scheduled ones early
            eligible = torch.zeros_like(masked)
            for m in Modality:
                of_m = masked & (s.modality == m)  # (B, T)
                first = plan.block.masked_fill(~of_m, plan.n_blocks[m]).amin(1)  # (B,)
                open_ = plan.open_block[m, min(s.i, plan.steps - 1)].clamp(min=first)  # (B,)
                eligible |= of_m & (plan.block <= open_[:, None])  # (B, T)

        check = torch.zeros_like(s.fill)
        sc = o.self_correction
        if sc is not None and not last:
            check = least_sure(s.p_commit, s.fill & ~masked, sc.max_per_step)  # (B, T)
        s.masked, s.eligible, s.check = masked, eligible, check

        b = s.batch
        checking = bool(check.any())
        ids = torch.cat([s.canvas, s.canvas.masked_fill(check, mask)]) if checking else s.canvas  # (rep*B, T)
        rep = 2 if checking else 1
        pad, image_index = b.pad.repeat(rep, 1), b.image_index.repeat(rep, 1)  # (rep*B, T)
        at = torch.cat([eligible, check]) if checking else eligible  # (rep*B, T) the positions step() reads
        prefix = b.prefix.repeat(rep)  # (rep*B,)
        copies = o.guidance_rows
        s.guided = copies > 1 and (o.guidance_steps is None or s.i < o.guidance_steps)
        if not s.guided:
            inputs = {"ids": ids, "pad": pad, "image_index": image_index, "logits_at": at}
            if s.cache is not None and copies > 1 and s.i == o.guidance_steps:
                self._drop_uncond_rows(s.cache, copies)  # guidance has just ended: its rows leave the cache
        else:
            cond = b.cond.repeat(rep, 1)  # (rep*B, T)
            dropped = [pad | cond & (image_index < 0), pad | cond] if copies == 3 else [pad | cond]  # no text, none
            inputs = {"ids": ids.repeat(copies, 1), "pad": torch.cat([pad, *dropped]),
                      "image_index": image_index.repeat(copies, 1),
                      "logits_at": at.repeat(copies, 1)}  # (copies*rep*B, T)
            prefix = prefix.repeat(copies)  # (copies*rep*B,)
        inputs["prefix"] = prefix
        if not checking:  # rows with no mask left leave the batch: their logits are never read
            inputs = self._live_rows(s, masked.any(1), inputs)
        s.call_rows = inputs["ids"].shape[0]
        if s.cache is None:
            return inputs
        full = s.i == 0 or (s.refresh > 0 and s.i % s.refresh == 0)  # a full pass (re)computes the prefix
        start = 0 if full else s.split
        s.cache.length = start
        sliced = {k: v[:, start:] if v.dim() == 2 else v for k, v in inputs.items()}  # (R, T - start)
        return sliced | {"cache": s.cache}

    @staticmethod
    def _drop_uncond_rows(cache: KVCache, copies: int) -> None:
        """Keep the first of the cache's `copies` blocks of rows: the conditional ones (`model_inputs` puts them
        first)."""
        cache.keep_rows(slice(0, len(cache.pad) // copies))

    @staticmethod
    def _live_rows(s: MaskedState, live: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`inputs` for the rows that still hold masks (Bool[B] `live`); the cache keeps only their rows. The
        logits of `logits_at` are row-major over the scored positions, and a finished row has none: `step`
        reads the same order with or without it."""
        B = live.shape[0]
        rows = live.nonzero().squeeze(1)  # (L,)
        if s.live is None and len(rows) == B:
            return inputs
        if s.live is not None and torch.equal(rows, s.live):
            keep = None
        else:
            held = s.live if s.live is not None else torch.arange(B, device=live.device)  # rows in the cache
            keep = torch.isin(held, rows).nonzero().squeeze(1)  # (L,) positions of the live rows among them
            s.live = rows
        copies = inputs["ids"].shape[0] // B  # 2 or 3 with guidance: the uncond rows follow the cond rows
        index = torch.cat([rows + j * B for j in range(copies)])  # (copies * L,)
        if s.cache is not None and keep is not None:
            s.cache.keep_rows(keep, copies)
        return {k: v[index] for k, v in inputs.items()}

    def _guided(self, logits: torch.Tensor, state: MaskedState) -> torch.Tensor:
        """Logits Float[M, V] of `model_inputs`' scored positions -> Float[N, V] of the eligible positions (in
        row-major order), then the checked ones: the conditional half, guidance combined."""
        o = state.config
        if not state.guided:
            return logits
        c, *text_uncond, u = logits.float().chunk(o.guidance_rows)  # (N, V) each: the same positions
        modality = torch.cat([state.modality[state.eligible], state.modality[state.check]])  # (N,)
        reference = restrict(c, modality, state.allowed) if o.guidance_plausibility > 0 else None
        return guided_logits(c, u, o.guidance_scale, o.guidance_plausibility, reference,
                             text_uncond[0] if text_uncond else None, o.image_guidance_scale or 0.0)

    def step(self, logits: torch.Tensor, state: MaskedState) -> None:
        s, o, plan = state, state.config, state.plan
        masked, eligible, check = s.masked, s.eligible, s.check
        assert masked is not None and eligible is not None and check is not None, "model_inputs first"
        B, T = s.canvas.shape
        logits = self._guided(logits, s)  # (N + C, V): eligible, then checked positions
        n_eligible = int(eligible.sum())
        s.nfe, s.rows = s.nfe + 1, s.rows + s.call_rows
        in_call = masked.any(1) | check.any(1)  # (B,) the rows of this call (a finished row has left)
        s.row_nfe = in_call.long() if s.row_nfe is None else s.row_nfe + in_call.long()
        last = s.i == s.max_steps - 1

        # predict the eligible positions
        where = eligible.nonzero(as_tuple=True)
        chosen, p, c = predict(logits[:n_eligible], s.modality[where], s.columns, o.temperatures, s.generator,
                               o.top_k, CONFIDENCE[o.confidence])  # (N,) each
        conf = torch.full((B, T), float("-inf"), dtype=torch.float64, device=s.canvas.device)
        conf[where] = c
        proposal = s.canvas.clone()
        proposal[where] = chosen
        p_chosen = torch.zeros_like(s.p_commit)
        p_chosen[where] = p

        # choose the commits: each modality down to the schedule's tokens left after this step, then with a
        # threshold every prediction above it too (Fast-dLLM), and at least one token per step
        if last:
            commit = eligible
        else:
            commit = torch.zeros_like(eligible)
            S = plan.remaining.shape[2]
            for m in Modality:
                of_m = s.modality == m  # (B, T)
                n_masked = (masked & of_m).sum(1)  # (B,)
                left = plan.remaining[m, :, s.i] if s.i < S else 0  # (B,); past it: revisions
                k = (n_masked - left).clamp(min=0)  # (B,)
                if o.threshold is not None:  # ahead of the schedule: still one token, so no step is idle
                    k = torch.maximum(k, n_masked.clamp(max=1))  # (B,)
                commit |= top_k_mask(conf.masked_fill(~of_m, float("-inf")), k)  # (B, T)
            if o.threshold is not None:
                commit |= eligible & (conf > o.threshold)
        s.canvas = torch.where(commit, proposal, s.canvas)
        s.p_commit = torch.where(commit, p_chosen, s.p_commit)
        if o.eos_fill and s.has_text:
            fill = eos_fill(s.canvas, s.fill & ~s.is_image, self.vocab.eos, self.vocab.mask)  # (B, T)
            s.canvas = s.canvas.masked_fill(fill, self.vocab.eos)
            s.p_commit = s.p_commit.masked_fill(fill, 1.0)
            # the filled tokens count as the schedule's later commits: what is left shrinks by them
            left = plan.remaining[Modality.TEXT, :, s.i + 1 :]  # (B, S - i - 1), a view
            left.sub_(fill.sum(1, keepdim=True)).clamp_(min=0)

        # re-mask the checked tokens the model no longer believes in
        if bool(check.any()):
            cw = check.nonzero(as_tuple=True)
            drop, p_now = doubted(logits[n_eligible:], s.canvas[cw], s.modality[cw], s.allowed,
                                  o.self_correction)  # (C,) each
            s.p_commit[cw] = p_now
            again = torch.zeros_like(check)
            again[cw] = drop
            s.canvas = s.canvas.masked_fill(again, self.vocab.mask)
            s.remasked += int(drop.sum())
        s.i += 1
