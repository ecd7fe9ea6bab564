"""Samplers of mmdlm: masked-diffusion decoding of the target region, and the AR baseline's decoder.

Masked diffusion (`sample_masked`): the batch's target positions hold `<mask>`; every step predicts all
of them in one forward pass and commits some, until none is left. It follows:
- LLaDA (Nie et al. 2025, `generate.py`): low-confidence remasking (commit the most confident
  predictions, the rest stays masked), Gumbel-max sampling in float64 (low precision Gumbel noise
  hurts), tokens per step spread so that exactly all masked tokens are committed after `steps` steps,
  semi-autoregressive blocks over long text, classifier-free guidance as `cond + w * (cond - uncond)`.
- MaskGIT (Chang et al. 2022): the cosine schedule for image tokens (few commits early, when the model
  is least sure; many at the end).
- contrastive decoding's adaptive plausibility constraint (Li et al. 2023) on top of guidance: only
  tokens with p_cond >= alpha * max p_cond may be picked, so guidance re-ranks what the conditional
  model allows instead of painting the prompt's codes into the background (`guided_logits`).
- Fast-dLLM (Wu et al. 2025): threshold parallel decoding, committing every prediction whose
  confidence passes a threshold (at least one per sequence and step), so easy tokens finish early.
- ReMDM (Wang et al. 2025): committed tokens may be re-masked and predicted again. Which ones is
  decided by checking them with the token itself masked, p(x_i | rest), as the informed correctors of
  Zhao et al. (2024) do: a masked-diffusion model is only trained to predict masked positions, so the
  logits at a visible token say nothing about it.
Every step's prediction is modality-restricted (`Vocab.allowed_table`): image positions
(`image_index >= 0`) may only become image codes, text positions only text ids or `<eos>`.

AR baseline (`sample_ar`): left-to-right decoding of the target span with a KV cache (nanoGPT /
litgpt style), greedy, temperature or top-k, with the same modality restriction.

NFE convention: one forward *call* is one function evaluation. Classifier-free guidance puts the
unconditional rows (the same batch with `pad |= cond`) and self-correction puts its check rows in the
same call (concatenated along the batch), so they cost no NFE; `SampleResult.forward_rows` reports the
rows actually run, which is the compute.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mmdlm.vocab import Modality, Vocab

if TYPE_CHECKING:
    from mmdlm.sequence import Batch

Schedule = Callable[[torch.Tensor, int], torch.Tensor]
"""(n Long[B] tokens to commit, steps) -> Long[B, steps]: how many must still be masked after each
step. Non-increasing, last column 0, so every token is committed after `steps` steps."""

Confidence = Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], torch.Tensor]
"""(probs Float64[N, V], chosen Long[N], generator) -> Float64[N]: how sure the model is of `chosen`;
the most confident predictions are committed first."""


@dataclass
class SampleResult:
    ids: torch.Tensor  # Long[B, T]: the batch's ids with the target region filled
    nfe: int  # forward calls (the sampling cost in the diffusion literature's unit)
    history: list[torch.Tensor] | None = None  # Long[B, T] canvas after each step, when asked for
    forward_rows: int = 0  # sequences run through the model in all: guidance and check rows included
    remasked: int = 0  # committed tokens that self-correction re-masked


# ---- schedules: how many tokens stay masked after each step ---------------------------------------------
def linear_schedule(n: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's `get_num_transfer_tokens`: n // steps per step, the remainder one each on the first steps."""
    s = torch.arange(1, steps + 1, device=n.device)  # (S,)
    base, rem = n // steps, n % steps  # (B,)
    done = base[:, None] * s + torch.minimum(s[None, :], rem[:, None])  # (B, S) committed after step s
    return n[:, None] - done  # (B, S)


def cosine_schedule(n: torch.Tensor, steps: int) -> torch.Tensor:
    """MaskGIT: a fraction cos(pi/2 * (s+1)/steps) stays masked after step s; at least one token is
    committed per step while any is left (the floor alone would waste early steps on short regions)."""
    s = torch.arange(1, steps + 1, device=n.device)  # (S,)
    ratio = torch.cos(math.pi / 2 * s.double() / steps)  # (S,) from ~1 down to ~0
    left = torch.floor(n[:, None].double() * ratio).long()  # (B, S); cos(pi/2) ~ 6e-17 floors to 0
    return torch.minimum(left, (n[:, None] - s[None, :]).clamp(min=0))  # (B, S)


# ---- confidence scores ---------------------------------------------------------------------------------
def probability_confidence(probs: torch.Tensor, chosen: torch.Tensor,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """LLaDA's "low_confidence" remasking: the probability of the chosen token."""
    return probs.gather(1, chosen[:, None]).squeeze(1)  # (N,)


def margin_confidence(probs: torch.Tensor, chosen: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """p(chosen) minus the best other token's probability (negative when sampling picked a runner-up)."""
    top2 = probs.topk(2, dim=-1)  # values, indices: (N, 2)
    other = torch.where(top2.indices[:, 0] == chosen, top2.values[:, 1], top2.values[:, 0])  # (N,)
    return probability_confidence(probs, chosen) - other


def random_confidence(probs: torch.Tensor, chosen: torch.Tensor,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """LLaDA's "random" remasking (the ablation): commit order is random."""
    return torch.rand(chosen.shape, dtype=torch.float64, device=chosen.device, generator=generator)


# ---- token choice ----------------------------------------------------------------------------------------
def restrict(logits: torch.Tensor, modality: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Float[N, V] logits with -inf where the position's modality (Long[N]) may not go (Bool[2, V])."""
    return logits.masked_fill(~allowed[modality], float("-inf"))


def sample_tokens(logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None,
                  top_k: int | None = None) -> torch.Tensor:
    """Long[N] tokens from Float[N, V] logits: argmax at temperature 0, else Gumbel-max in float64
    (LLaDA's `add_gumbel_noise`: argmax of l / tau + Gumbel noise is a sample of softmax(l / tau))."""
    logits = logits.double()  # (N, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)  # (N, V)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))  # (N, V)
    return (logits / temperature + gumbel).argmax(dim=-1)


def _top_k_mask(score: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool[B, T]: the k[b] highest scores of each row (ties by position); -inf is never picked."""
    B, T = score.shape
    order = score.argsort(dim=1, descending=True, stable=True)  # (B, T)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=score.device).expand(B, T))
    return (rank < k[:, None]) & (score > float("-inf"))  # (B, T)


# ---- guided forward -----------------------------------------------------------------------------------
def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float, plausibility: float = 0.0,
                  reference: torch.Tensor | None = None) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) as LLaDA/MMaDA write it:
    uncond + (1 + w) (cond - uncond) = cond + w (cond - uncond), so w = 0 is the conditional model.

    `plausibility` = alpha > 0 keeps only the tokens the conditional model itself finds plausible,
    p_cond(x) >= alpha * max p_cond (the adaptive plausibility constraint of contrastive decoding, Li et
    al. 2023); the others get -inf. Guidance then re-ranks plausible tokens instead of lifting every
    token whose cond/uncond ratio is high: unconstrained, a prompt's object codes win at background
    positions too, and the image fills with spurious objects (BENCHMARKS.md, "guidance").
    `reference`: the conditional logits plausibility is judged on (default `cond`); the sampler passes
    them `restrict`ed, so the max is over the tokens it may pick.
    """
    guided = cond + scale * (cond - uncond)
    if plausibility <= 0:
        return guided
    ref = cond if reference is None else reference
    keep = ref >= ref.amax(dim=-1, keepdim=True) + math.log(plausibility)  # (..., V)
    return guided.masked_fill(~keep, float("-inf"))


def _forward(model: nn.Module, ids: torch.Tensor, pad: torch.Tensor, image_index: torch.Tensor,
             cond: torch.Tensor, cfg_scale: float, plausibility: float = 0.0,
             modality: torch.Tensor | None = None, allowed: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, int]:
    """(logits Float[R, T, V], rows run): one forward call; with guidance the unconditional copy of
    the rows (`pad | cond`: the condition replaced by the empty prompt) rides in the same call.
    `modality` (Long[R, T]) and `allowed` (Bool[2, V]): what each position may take (`restrict`), so
    the plausibility constraint is judged on the tokens the sampler can pick."""
    if cfg_scale == 0:
        return model(ids, pad=pad, image_index=image_index), ids.shape[0]
    logits = model(torch.cat([ids, ids]), pad=torch.cat([pad, pad | cond]),
                   image_index=torch.cat([image_index, image_index]))  # (2R, T, V)
    c, u = logits.float().chunk(2)  # (R, T, V) each
    reference = restrict(c, modality, allowed) if plausibility > 0 and allowed is not None else None
    return guided_logits(c, u, cfg_scale, plausibility, reference), 2 * ids.shape[0]


# ---- masked diffusion ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class SelfCorrection:
    """ReMDM-style revision: each step, the committed tokens the sampler is least sure of are checked
    with themselves masked (extra rows in the same forward call) and re-masked when the model no
    longer believes in them, to be predicted again with the newer context."""

    threshold: float = 0.2  # re-mask when p(token | rest) falls below this (a clear change of mind)
    max_per_step: int = 4  # tokens checked per sequence and step, least confident first; they are
    # masked together in the check row, so a small number keeps each one's context nearly intact
    extra_steps: int = 8  # bound on steps beyond the schedule: NFE <= steps + extra_steps
    only_if_disagrees: bool = True  # re-mask only if the model would now pick another token: with
    # greedy decoding a re-masked argmax token comes straight back, which only spends steps


@dataclass(frozen=True)
class MaskedSampling:
    """Options of `sample_masked`."""

    text_steps: int = 32  # LLaDA uses ~1-2 tokens per step; text regions here are 8-48 tokens
    image_steps: int = 16  # MaskGIT: 8-12 cosine steps suffice for 16x16 grids; ours are <= 8x8
    text_schedule: Schedule = linear_schedule  # LLaDA
    image_schedule: Schedule = cosine_schedule  # MaskGIT
    temperature: float = 0.0  # 0 = argmax (LLaDA's setting for benchmarks); > 0 Gumbel-max sampling
    confidence: Confidence = probability_confidence  # margin_confidence / random_confidence: ablations
    block_length: int | None = None  # semi-AR blocks over the text target (LLaDA); None = one block
    threshold: float | None = None  # Fast-dLLM: commit all predictions above it; replaces the schedules
    cfg_scale: float = 0.0  # guidance w; 0 = conditional only (no unconditional rows are run)
    cfg_plausibility: float = 0.1  # guide only tokens with p_cond >= this * max p_cond (guided_logits): at
    #   guidance 2, text-to-image all-correct 0% -> 65.5% (4,000 steps), 3.5% -> 13% (1,300; BENCHMARKS.md)
    self_correction: SelfCorrection | None = None  # None = a committed token is final (LLaDA, MaskGIT)

    def __post_init__(self) -> None:
        if self.text_steps < 1 or self.image_steps < 1:
            raise ValueError("text_steps and image_steps must be >= 1")
        if self.block_length is not None and self.block_length < 1:
            raise ValueError("block_length must be >= 1 (or None for one block)")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 <= self.cfg_plausibility <= 1:
            raise ValueError("cfg_plausibility must be in [0, 1]")


@dataclass
class _Plan:
    """The fixed part of a run: text blocks and, for scheduled decoding, tokens left after each step."""

    block: torch.Tensor  # Long[B, T] block of each text target position (0 elsewhere)
    n_blocks: int
    remaining: torch.Tensor | None  # Long[2, B, S] per Modality: masked tokens left after step s
    open_block: torch.Tensor | None  # Long[S]: text blocks <= this one may be committed at step s
    steps: int  # steps of the schedule (threshold decoding: the worst case, one token per step)


def _plan(target: torch.Tensor, masked: torch.Tensor, is_image: torch.Tensor, o: MaskedSampling) -> _Plan:
    text_target, text_masked = target & ~is_image, masked & ~is_image  # (B, T)
    B = target.shape[0]
    if o.block_length is None:
        block, n_blocks = torch.zeros_like(target, dtype=torch.long), 1
    else:  # LLaDA: blocks of block_length consecutive target positions, left to right
        block = ((text_target.long().cumsum(1) - 1).clamp(min=0) // o.block_length) * text_target  # (B, T)
        n_blocks = max(1, math.ceil(int(text_target.sum(1).max()) / o.block_length))
    if o.threshold is not None:
        return _Plan(block, n_blocks, None, None, int(masked.sum(1).max()))

    per_block = torch.zeros(B, n_blocks, dtype=torch.long, device=target.device)
    per_block.scatter_add_(1, block, text_masked.long())  # (B, n_blocks) masked text tokens per block
    later = per_block.flip(1).cumsum(1).flip(1) - per_block  # (B, n_blocks) masked in the blocks after
    text_cols: list[torch.Tensor] = []
    open_block: list[int] = []
    if bool(text_masked.any()):
        if o.text_steps < n_blocks:
            raise ValueError(f"text_steps={o.text_steps} < {n_blocks} blocks: every block needs a step")
        for j in range(n_blocks):  # LLaDA splits the steps evenly over the blocks
            steps_j = o.text_steps // n_blocks + (j < o.text_steps % n_blocks)
            text_cols.append(o.text_schedule(per_block[:, j], steps_j) + later[:, j : j + 1])  # (B, steps_j)
            open_block += [j] * steps_j
    image_masked = (masked & is_image).sum(1)  # (B,)
    image_cols = [o.image_schedule(image_masked, o.image_steps)] if bool(image_masked.any()) else []
    text_left = torch.cat(text_cols, 1) if text_cols else per_block[:, :0]  # (B, S_text)
    image_left = torch.cat(image_cols, 1) if image_cols else per_block[:, :0]  # (B, S_image)
    steps = max(text_left.shape[1], image_left.shape[1])
    # a modality with fewer steps is done early: nothing of it is left in the later steps
    remaining = torch.stack([F.pad(x, (0, steps - x.shape[1])) for x in (text_left, image_left)])  # (2, B, S)
    open_ = torch.tensor(open_block + [n_blocks - 1] * (steps - len(open_block)), device=target.device)
    return _Plan(block, n_blocks, remaining, open_, steps)


@torch.no_grad()
def sample_masked(model: nn.Module, batch: Batch, vocab: Vocab, options: MaskedSampling = MaskedSampling(),
                  *, anchor: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  history: bool = False) -> SampleResult:
    """Fill the `<mask>` positions of the batch's target region by masked-diffusion decoding.

    Target positions that already hold a token are anchors: they are never changed (nor re-masked by
    self-correction), and the model fills around them ("word 3 must be 'red'", inpainting). `anchor`
    (Bool[B, T], optional) states them explicitly; an anchor holding `<mask>` is an error. The model
    should be in eval mode; with a fixed `generator` (on the batch's device) the result is deterministic.

    Steps: scheduled decoding runs max(text_steps, image_steps) steps over the modalities present
    (each modality on its own schedule), so NFE = steps unless every token is placed earlier (a region
    of n < steps tokens takes n steps: the schedules commit at least one token per step);
    threshold decoding runs until no mask is left (<= one step per masked token). Self-correction
    adds at most `extra_steps`. The final step commits whatever is still masked.
    """
    o, sc = options, options.self_correction
    canvas = batch.ids.clone()  # (B, T)
    pad, image_index, cond = batch.pad, batch.image_index, batch.cond
    B, T = canvas.shape
    fill = batch.target & (canvas == vocab.mask)  # (B, T) the positions the sampler owns
    if anchor is not None and bool((anchor & (canvas == vocab.mask)).any()):
        raise ValueError("an anchored position holds <mask>: write the anchored token into batch.ids")
    is_image = image_index >= 0  # (B, T)
    modality = is_image.long()  # (B, T) a Modality per position
    allowed = vocab.allowed_table(canvas.device)  # (2, V)
    plan = _plan(batch.target, fill, is_image, o)
    fresh = fill.clone()  # (B, T) never committed yet (threshold decoding opens blocks by these)
    p_commit = torch.zeros(B, T, dtype=torch.float64, device=canvas.device)  # p(token) when last judged
    max_steps = plan.steps + (sc.extra_steps if sc is not None else 0)
    nfe = rows = remasked = 0
    frames: list[torch.Tensor] | None = [] if history else None

    for step in range(max_steps):
        masked = canvas == vocab.mask  # (B, T); anchors and prompt never hold <mask>
        masked &= fill
        if not bool(masked.any()):
            break
        last = step == max_steps - 1  # the final step commits everything, whatever the rule

        # which masked positions may be committed now: image positions always, text by open block
        if last:
            eligible = masked
        elif plan.open_block is not None:
            open_ = plan.open_block[min(step, plan.steps - 1)]
            eligible = masked & (is_image | (plan.block <= open_))  # (B, T)
        else:  # threshold decoding: the first block with never-committed tokens is open, per row
            first = plan.block.masked_fill(~(fresh & masked & ~is_image), plan.n_blocks).amin(1)  # (B,)
            first = first.clamp(max=plan.n_blocks - 1)
            eligible = masked & (is_image | (plan.block <= first[:, None]))  # (B, T)

        # self-correction: the least sure committed tokens, masked in a check row of the same call
        check = torch.zeros_like(fill)
        if sc is not None and not last:
            committed = fill & ~masked  # (B, T)
            score = (-p_commit).masked_fill(~committed, float("-inf"))  # (B, T) least sure = highest
            check = _top_k_mask(score, torch.full((B,), sc.max_per_step, device=canvas.device))
        checking = bool(check.any())
        ids_in = torch.cat([canvas, canvas.masked_fill(check, vocab.mask)]) if checking else canvas
        rep = 2 if checking else 1
        logits, n_rows = _forward(model, ids_in, pad.repeat(rep, 1), image_index.repeat(rep, 1),
                                  cond.repeat(rep, 1), o.cfg_scale, o.cfg_plausibility,
                                  modality.repeat(rep, 1), allowed)  # (rep*B, T, V)
        nfe, rows = nfe + 1, rows + n_rows

        # predict the eligible positions
        where = eligible.nonzero(as_tuple=True)
        lg = restrict(logits[:B][where].double(), modality[where], allowed)  # (N, V)
        chosen = sample_tokens(lg, o.temperature, generator)  # (N,)
        probs = lg.softmax(dim=-1)  # (N, V)
        conf = torch.full((B, T), float("-inf"), dtype=torch.float64, device=canvas.device)
        conf[where] = o.confidence(probs, chosen, generator)
        proposal = canvas.clone()
        proposal[where] = chosen
        p_chosen = torch.zeros_like(p_commit)
        p_chosen[where] = probability_confidence(probs, chosen)

        # choose the commits
        if last:
            commit = eligible
        elif plan.remaining is not None:  # the schedule: commit down to the tokens left after this step
            commit = torch.zeros_like(eligible)
            for m in Modality:
                of_m = modality == m  # (B, T)
                left = plan.remaining[m, :, step] if step < plan.steps else 0  # (B,); past it: revisions
                k = ((masked & of_m).sum(1) - left).clamp(min=0)  # (B,)
                commit |= _top_k_mask(conf.masked_fill(~of_m, float("-inf")), k)  # (B, T)
        else:  # Fast-dLLM: all above the threshold, and at least the most confident one
            one = torch.ones(B, dtype=torch.long, device=canvas.device)
            commit = (eligible & (conf > o.threshold)) | _top_k_mask(conf, one)
        canvas = torch.where(commit, proposal, canvas)
        p_commit = torch.where(commit, p_chosen, p_commit)
        fresh &= ~commit

        # re-mask the checked tokens the model no longer believes in
        if checking:
            cw = check.nonzero(as_tuple=True)
            lc = restrict(logits[B:][cw].double(), modality[cw], allowed)  # (C, V)
            pc = lc.softmax(dim=-1)  # (C, V)
            p_now = pc.gather(1, canvas[cw][:, None]).squeeze(1)  # (C,)
            drop = p_now < sc.threshold
            if sc.only_if_disagrees:
                drop &= pc.argmax(dim=-1) != canvas[cw]
            p_commit[cw] = p_now
            again = torch.zeros_like(check)
            again[cw] = drop
            canvas = canvas.masked_fill(again, vocab.mask)
            remasked += int(drop.sum())
        if frames is not None:
            frames.append(canvas.clone())

    return SampleResult(canvas, nfe, frames, rows, remasked)


# ---- autoregressive baseline --------------------------------------------------------------------------
@dataclass(frozen=True)
class ARSampling:
    """Options of `sample_ar`."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None  # sample among the k most likely allowed tokens; None = all
    use_cache: bool = True  # False recomputes the whole prefix each step (equality test, speed baseline)
    eos_fill: bool = True  # after a row's <eos>, its later text targets are <eos> (the template's fill)

    def __post_init__(self) -> None:
        if self.temperature < 0 or (self.top_k is not None and self.top_k < 1):
            raise ValueError("temperature must be >= 0 and top_k >= 1")


@torch.no_grad()
def sample_ar(model: nn.Module, batch: Batch, vocab: Vocab, options: ARSampling = ARSampling(), *,
              generator: torch.Generator | None = None, history: bool = False) -> SampleResult:
    """Generate the target span left to right with the causal model (`ModelConfig.causal=True`).

    The span runs from the first to the last target position; it must be the same in every row (the
    AR templates put the target at the tail: the image of text-to-image, the answer of understanding).
    Non-target positions inside it (a question between two VQA answers, `<eoi>` between image and
    caption) are fed as given, together with the next call. NFE = forward calls = target positions
    (the first call is the prefill of the prefix).
    """
    model_cfg = getattr(model, "config", None)
    if model_cfg is not None and not getattr(model_cfg, "causal", True):
        raise ValueError("sample_ar needs a causal model (ModelConfig.causal=True)")
    o = options
    ids = batch.ids.clone()  # (B, T)
    pad, image_index, target = batch.pad, batch.image_index, batch.target
    B, T = ids.shape
    frames: list[torch.Tensor] | None = [] if history else None
    if not bool(target.any()):
        return SampleResult(ids, 0, frames, 0)
    if not bool((target == target[:1]).all()):
        raise ValueError("sample_ar needs the same target layout in every row of the batch")
    cols = target[0].nonzero().squeeze(1)  # (n,)
    start, end = int(cols[0]), int(cols[-1]) + 1
    if start == 0:
        raise ValueError("the target span needs a prefix to condition on (the task token at least)")
    allowed = vocab.allowed_table(ids.device)  # (2, V)
    modality = (image_index >= 0).long()  # (B, T)
    is_text_target = target & (image_index < 0)  # (B, T)
    ended = torch.zeros(B, dtype=torch.bool, device=ids.device)  # (B,) row has emitted <eos>
    cache = model.new_cache(B, end, device=ids.device) if o.use_cache else None

    def next_logits(p: int) -> torch.Tensor:
        """Float[B, V]: logits for position p given positions < p."""
        if cache is None:
            return model(ids[:, :p], pad=pad[:, :p], image_index=image_index[:, :p])[:, -1]
        lo = cache.length
        return model(ids[:, lo:p], pad=pad[:, lo:p], image_index=image_index[:, lo:p], cache=cache)[:, -1]

    nfe = 0
    for p in range(start, end):
        ended &= is_text_target[:, p]  # a text region ends at its first <eos>; the next starts afresh
        if not bool(target[0, p]):
            continue  # a given token inside the span: fed to the model with the next call
        logits = next_logits(p)  # (B, V)
        nfe += 1
        lg = restrict(logits.double(), modality[:, p], allowed)  # (B, V)
        tok = sample_tokens(lg, o.temperature, generator, o.top_k)  # (B,)
        if o.eos_fill:
            tok = torch.where(ended & is_text_target[:, p], vocab.eos, tok)
            ended |= (tok == vocab.eos) & is_text_target[:, p]
        ids[:, p] = tok
        if frames is not None:
            frames.append(ids.clone())
    return SampleResult(ids, nfe, frames, nfe * B)
