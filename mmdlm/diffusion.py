"""Absorbing-state masked diffusion: noise schedules, forward masking, the ELBO loss; the AR loss beside it.

Follows MDLM (Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models") and LLaDA
(Nie et al. 2025): a sequence is noised by replacing each target token with `<mask>` with probability
1 - alpha_t, t ~ U(eps, 1) per sequence (stratified across the batch: MDLM's low-discrepancy sampler),
and the model (not conditioned on t) predicts the originals. The continuous-time ELBO is

    -log p(x) <= E_t [ w(t) * sum_{masked i} -log p(x_i | x_t) ],   w(t) = -alpha'_t / (1 - alpha_t)

which for the linear schedule alpha_t = 1 - t is the familiar `CE / t`. We normalise it per target
token, so `nll` compares with the AR baseline's exact NLL per target token (`ar_loss`).

Images may instead follow MaskGIT (Chang et al. 2022): a cosine mask ratio (more heavily masked
steps, as the sampler sees them) and an unweighted CE over the masked image tokens
(`ImageSchedule.MASKGIT`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

import torch
import torch.nn.functional as F

from mmdlm.model import attention_blocks
from mmdlm.sequence import Batch, Task
from mmdlm.vocab import Vocab


# ---- noise schedules ----------------------------------------------------------------------------------
class Schedule(Protocol):
    """A masking schedule: the probability that a token is masked at time t, and its ELBO weight."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        """1 - alpha_t: 0 at t = 0 (clean), 1 at t = 1 (all masked)."""
        ...

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'_t / (1 - alpha_t): the weight of a masked token's CE in the continuous-time ELBO."""
        ...

    def time_of(self, p: torch.Tensor) -> torch.Tensor:
        """The inverse of `mask_prob`: the t at which a token is masked with probability p."""
        ...


class LinearSchedule:
    """alpha_t = 1 - t (MDLM/LLaDA): mask with probability t, ELBO weight 1/t."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 / t

    def time_of(self, p: torch.Tensor) -> torch.Tensor:
        return p


class CosineSchedule:
    """MaskGIT's cosine mask ratio gamma(r) = cos(pi r / 2) with r = 1 - t: mask with probability
    sin(pi t / 2) (ratios near 1 are drawn more often); ELBO weight (pi/2) cot(pi t / 2)."""

    def mask_prob(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(0.5 * math.pi * t)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * math.pi / torch.tan(0.5 * math.pi * t)

    def time_of(self, p: torch.Tensor) -> torch.Tensor:
        return torch.asin(p.clamp(0.0, 1.0)) * (2.0 / math.pi)


LINEAR = LinearSchedule()
COSINE = CosineSchedule()


class ImageSchedule(StrEnum):
    """How image regions are noised and weighted."""

    ELBO = "elbo"  # like text: linear schedule, CE / t (a true bound, comparable across modalities)
    MASKGIT = "maskgit"  # cosine mask ratio, unweighted CE averaged over the masked image tokens


class Weighting(StrEnum):
    """What the training loss averages (the reported `nll` is always the ELBO bound)."""

    ELBO = "elbo"  # sum of CE / t over masked tokens per target token: the bound itself (MDLM, LLaDA)
    MASKED_MEAN = "masked_mean"  # mean CE over the masked tokens: no 1/t, so far lower variance; the same
    #   minimiser (the model predicts every masked token from the same context either way)


IMAGE_SCHEDULE: dict[ImageSchedule, Schedule] = {ImageSchedule.ELBO: LINEAR, ImageSchedule.MASKGIT: COSINE}


@dataclass
class LossOutput:
    loss: torch.Tensor  # the scalar to backpropagate
    nll: torch.Tensor  # detached NLL bound (diffusion) or exact NLL (AR) per target token
    per_task: dict[int, torch.Tensor]  # Task -> detached nll per target token of that task's sequences
    num_tokens: int  # target tokens in the batch (the normaliser)


# ---- sampling t and masking -----------------------------------------------------------------------------
def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None
          ) -> torch.Tensor:
    """U(0, 1) on `device`, drawn from `generator` (on its own device) when one is given."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def sample_t(batch_size: int, eps: float = 1e-3, generator: torch.Generator | None = None,
             device: torch.device | str | None = None) -> torch.Tensor:
    """t ~ U(eps, 1), Float[B], stratified: one draw in each of the B strata of width 1/B (MDLM's
    low-discrepancy sampler: lower-variance loss than i.i.d. t), in a random order so that t does not
    follow the batch order (collate keeps samples, hence tasks, in order)."""
    offset = _rand((1,), generator, device)  # (1,)
    u = (torch.arange(batch_size, device=offset.device) / batch_size + offset) % 1.0  # (B,)
    perm = torch.randperm(batch_size, generator=generator,
                          device=generator.device if generator is not None else "cpu").to(u.device)
    return eps + (1.0 - eps) * u[perm]  # (B,)


def _mask(batch: Batch, t: torch.Tensor, vocab: Vocab, generator: torch.Generator | None,
          image_schedule: Schedule, text_schedule: Schedule
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """forward_mask, also returning `forced` Bool[B, T]: the positions masked only by the guarantee. `t` is
    Float[B] (one time per sequence) or Float[B, T] (per position: block diffusion's time per block)."""
    ids = batch.ids
    B, T = ids.shape
    is_image = batch.image_index >= 0  # (B, T)
    t = t[:, None] if t.dim() == 1 else t  # (B, 1) or (B, T)
    p_image, p_text = image_schedule.mask_prob(t), text_schedule.mask_prob(t)  # (B, 1) or (B, T)
    p = torch.where(is_image, p_image, p_text)  # (B, T)
    target = batch.target & ~batch.pad  # (B, T)
    u = _rand((B, T), generator, ids.device)  # (B, T)
    masked = (u < p) & target  # (B, T)
    # force one masked target where none was drawn: the target with the largest fresh uniform
    score = torch.where(target, _rand((B, T), generator, ids.device), -1.0)  # (B, T)
    pick = torch.zeros_like(masked).scatter_(1, score.argmax(dim=1, keepdim=True), True)  # (B, T)
    needs = target.any(dim=1) & ~masked.any(dim=1)  # (B,)
    forced = pick & needs[:, None]  # (B, T)
    masked = masked | forced
    noisy = torch.where(masked, torch.full_like(ids, vocab.mask), ids)  # (B, T)
    return noisy, masked, forced


def forward_mask(batch: Batch, t: torch.Tensor, vocab: Vocab, generator: torch.Generator | None = None,
                 image_schedule: Schedule = LINEAR, text_schedule: Schedule = LINEAR
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise a batch to time t (Float[B]): each target token becomes `<mask>` with probability
    `schedule.mask_prob(t)` (the image schedule at image positions); pads and non-targets never.

    Every sequence with a target gets at least one masked token: where the draw masked none, one
    random target position is masked anyway, so no sequence is wasted. (The loss gives such a forced
    token weight 1, not w(t): see `masked_diffusion_loss`.)

    Returns (noisy_ids Long[B, T], masked Bool[B, T]).
    """
    noisy, masked, _ = _mask(batch, t, vocab, generator, image_schedule, text_schedule)
    return noisy, masked


def cond_dropout(batch: Batch, p_uncond: float = 0.1, generator: torch.Generator | None = None,
                 p_uncond_text: float = 0.0) -> Batch:
    """Classifier-free guidance training: for a fraction p_uncond of the sequences, hide the condition
    (the caption of text-to-image) by `pad |= cond`: the empty prompt, same layout (INTERFACES.md). For a further
    fraction `p_uncond_text`, hide only the condition's text (an edit's instruction, its source image kept), the
    third distribution of InstructPix2Pix's two guidance scales (`SamplerConfig.image_guidance_scale`)."""
    u = _rand((len(batch),), generator, batch.ids.device)  # (B,)
    drop, drop_text = u < p_uncond, (u >= p_uncond) & (u < p_uncond + p_uncond_text)  # (B,) each
    hidden = batch.cond & (drop[:, None] | drop_text[:, None] & (batch.image_index < 0))  # (B, T)
    return replace(batch, pad=batch.pad | hidden)


# ---- losses -----------------------------------------------------------------------------------------------
def _per_task(contrib: torch.Tensor, target: torch.Tensor, task: torch.Tensor) -> dict[int, torch.Tensor]:
    """Task -> sum of `contrib` (Float[B, T]) over that task's sequences / their target tokens."""
    n = len(Task)
    sums = torch.zeros(n, device=contrib.device).index_add_(0, task, contrib.detach().float().sum(dim=1))
    counts = torch.zeros(n, device=contrib.device).index_add_(0, task, target.sum(dim=1).float())
    return {k: sums[k] / counts[k] for k in range(n) if counts[k] > 0}


def _pooled(values: torch.Tensor, count: torch.Tensor, task: torch.Tensor, balanced: bool,
            is_image: torch.Tensor | None = None) -> torch.Tensor:
    """sum(values) / sum(count) over the batch; with `balanced`, that ratio per task, then averaged over
    the tasks present. values Float[B, T] (differentiable), count Bool[B, T]. With `is_image` (Bool[B, T]:
    the token is an image token) a task's ratio is itself the mean of its image tokens' and its text tokens'
    ratios, so a document task whose samples generate either an image (64 tokens) or a short answer gives
    the answers half of its share, whatever their token count."""
    if not balanced:
        return values.sum() / count.sum().clamp_min(1)
    n = len(Task)
    modality = torch.zeros_like(count, dtype=torch.long) if is_image is None else is_image.long()  # (B, T)
    group = (task[:, None] * 2 + modality).flatten()  # (B*T,) task-major: group 2k + 1 is task k's images
    sums = torch.zeros(2 * n, device=values.device).index_add(0, group, values.flatten())  # (2n,)
    counts = torch.zeros(2 * n, device=values.device).index_add_(0, group, count.flatten().float())  # (2n,)
    present = (counts > 0).view(n, 2)  # (n, 2)
    ratio = (sums / counts.clamp_min(1)).view(n, 2)  # (n, 2) each task's text and image mean
    per_task = (ratio * present).sum(dim=1) / present.sum(dim=1).clamp_min(1)  # (n,)
    return per_task[present.any(dim=1)].mean()


def _zero_loss(logits: torch.Tensor) -> torch.Tensor:
    """A zero that is still connected to the graph (every rank must backpropagate under DDP)."""
    return logits.sum() * 0.0


def task_times(u: torch.Tensor, task: torch.Tensor, t_ranges: Mapping[int, tuple[float, float]]) -> torch.Tensor:
    """Float[B]: each sequence's t, `u` (Float[B] in (0, 1)) mapped onto its task's interval [lo, hi].

    Understanding targets (answers, captions) are decoded from a fully masked region, yet t ~ U(0, 1) spends
    most of their training on half-revealed answers whose words hint at each other; an interval shifted
    to high t trains the case the sampler starts from. Tasks without an entry keep U(0, 1).
    """
    lo = torch.zeros(len(Task), device=u.device)  # (n_tasks,)
    hi = torch.ones(len(Task), device=u.device)  # (n_tasks,)
    for k, (a, b) in t_ranges.items():
        if not 0.0 <= a < b <= 1.0:
            raise ValueError(f"t range of task {Task(k).name} must satisfy 0 <= lo < hi <= 1, got ({a}, {b})")
        lo[int(k)], hi[int(k)] = a, b
    return lo[task] + (hi[task] - lo[task]) * u  # (B,)


def masked_diffusion_loss(model: torch.nn.Module, batch: Batch, vocab: Vocab, *, eps: float = 1e-3,
                          image_schedule: ImageSchedule | str = ImageSchedule.ELBO,
                          generator: torch.Generator | None = None,
                          t: torch.Tensor | None = None, weighting: Weighting | str = Weighting.ELBO,
                          task_balanced: bool = False, paired: bool = False,
                          t_ranges: Mapping[int, tuple[float, float]] | None = None,
                          corrupt: float = 0.0, modality_balanced: bool = False,
                          block: torch.Tensor | None = None) -> LossOutput:
    """The masked-diffusion training loss of one batch.

    `loss` = sum over masked target tokens of w(t) * CE, divided by the number of target tokens (the
    ELBO per target token, MDLM/LLaDA). With `image_schedule="maskgit"`, image targets are masked with the
    cosine ratio and contribute the unweighted mean CE of the masked image tokens (times their share
    of target tokens). `nll` is the ELBO bound per target token (with `t_ranges`, an estimate under the
    shifted times, not the bound: validate without them). `t` (Float[B]) fixes the times (evaluation on
    a grid); default: stratified `sample_t`, mapped per task by `t_ranges` (see `task_times`).

    `weighting="masked_mean"` trains on the mean CE of the masked tokens instead of the 1/t-weighted sum
    (lower variance: at t = 0.01 one token would otherwise weigh 100x). `task_balanced=True` averages the
    per-task losses instead of pooling tokens, so a task with small target regions (VQA answers: a few
    tokens against 64 image tokens of text-to-image) gets an equal share of the gradient. `modality_balanced`
    also splits each task's share evenly between its image and its text target tokens (see `_pooled`): the
    document task holds both edits (an image generated) and "what changed?" (a word or two).

    `paired=True` adds each sequence's complementary view (LaViDa; DiffuCoder's coupled sampling): the
    same sequence with exactly the target tokens the first view left clean masked, at the complementary
    time. Every target token is then supervised once per pair, and a short answer that one view leaves
    unmasked is learned in the other. The forward runs on 2B rows; halve the batch size for equal compute.

    `corrupt` = c > 0 trains correction (LLaDA 2.1, RemeDi): each target token the mask left clean is
    replaced, with probability c, by a uniformly random token of its modality, and scored too: the model learns
    that a visible token may be wrong and what it should be, which a corrective sampler needs (a masked-diffusion
    model otherwise only ever sees `<mask>` or the truth). Their mean CE joins the loss as masked tokens' does
    (weight 1); `nll` stays the ELBO of the masked tokens. The first view only, with `paired`.

    `block` (Long[B, T] token blocks, `mmdlm.blocks.token_blocks`) trains block diffusion (BD3-LM): each block of
    a row is noised at its own time (stratified over rows x blocks, each mapped by `t_ranges` per task) and
    predicted given the clean blocks before it, all blocks in one forward over the noisy and the clean sequence
    (`Transformer.forward(block=, clean=)`; a batch of one block per row needs no clean copy). For a model whose
    head is shifted (`shift_logits`), a block's last token is also the next block's first context position: its
    input there stays clean and it is scored from the position before it, inside its own block. `nll` is the sum
    of the blocks' bounds per target token. Not with `paired`.

    Logits are computed only at the masked positions (`Transformer.forward(logits_at=...)`): the head
    would otherwise score every position of the batch for nothing.

    A token masked only by forward_mask's at-least-one guarantee gets weight 1 instead of w(t): the
    guarantee fires when t < ~1/#targets, where w(t) = 1/t reaches 1/eps = 1000 and a single token
    would dominate the batch (measured: a tiny model then failed to memorise 8 sequences). With weight
    1 the extra term is >= 0, so `nll` stays an upper bound, looser by about CE / (#targets + 1) per
    sequence in expectation (integral of (1 - t)^n dt): negligible next to the bound itself.
    """
    kind = ImageSchedule(image_schedule)
    schedule = IMAGE_SCHEDULE[kind]
    B = len(batch)
    if block is not None:
        if paired:
            raise ValueError("paired masks are not available with block diffusion (block=)")
        units = int(block.max()) if block.numel() else 0  # blocks per row at most (block 0 is the prompt)
        if t is None:
            u = sample_t(B * max(units, 1), eps, generator, batch.ids.device)  # (B * U,)
            if t_ranges:
                u = task_times(u, batch.task.repeat_interleave(max(units, 1)), t_ranges)
            t = u.view(B, max(units, 1))  # (B, U): each block's time
        t = t.gather(1, (block - 1).clamp(0, t.shape[1] - 1))  # (B, T): each position's block's time
    elif t is None:
        t = sample_t(B, eps, generator, batch.ids.device)
        if t_ranges:
            t = task_times(t, batch.task, t_ranges)
    noisy, masked, forced = _mask(batch, t, vocab, generator, schedule, LINEAR)
    if block is not None:  # a block's last token is the next block's context (shifted head): its input stays clean
        own = attention_blocks(block, bool(getattr(getattr(model, "config", None), "shift_logits", False))) == block
        noisy = torch.where(own, noisy, batch.ids)  # (B, T)
    is_image = batch.image_index >= 0  # (B, T)
    target = batch.target & ~batch.pad  # (B, T)
    corrupted = torch.zeros_like(masked)  # (B, T) clean targets replaced by a wrong token
    if corrupt > 0:
        shape = tuple(masked.shape)
        wrong = vocab.uniform_tokens(_rand(shape, generator, noisy.device), is_image)  # (B, T)
        corrupted = target & ~masked & (_rand(shape, generator, noisy.device) < corrupt) & (wrong != batch.ids)
        if block is not None:
            corrupted = corrupted & own
        noisy = torch.where(corrupted, wrong, noisy)  # (B, T)
    tt = t[:, None] if t.dim() == 1 else t  # (B, 1) or (B, T)
    w = torch.where(is_image, schedule.weight(tt), LINEAR.weight(tt))  # (B, T)
    w = torch.where(forced, 1.0, w)  # see the docstring: a forced token is not weighted by w(t)
    pad, image_index, task, ids, prefix = batch.pad, batch.image_index, batch.task, batch.ids, batch.prefix
    if paired:  # the complementary view: mask exactly what the first view kept, at the complementary time
        masked2 = target & ~masked  # (B, T)
        t_image = schedule.time_of(1.0 - schedule.mask_prob(t)).clamp_min(eps)  # (B,)
        t_text = (1.0 - t).clamp_min(eps)  # (B,)
        w2 = torch.where(is_image, schedule.weight(t_image)[:, None], LINEAR.weight(t_text)[:, None])  # (B, T)
        noisy = torch.cat([noisy, torch.where(masked2, torch.full_like(ids, vocab.mask), ids)])  # (2B, T)
        masked, w = torch.cat([masked, masked2]), torch.cat([w, w2])  # (2B, T)
        corrupted = torch.cat([corrupted, torch.zeros_like(corrupted)])  # (2B, T)
        pad, image_index, ids = pad.repeat(2, 1), image_index.repeat(2, 1), ids.repeat(2, 1)  # (2B, T)
        task, is_image, target, prefix = task.repeat(2), is_image.repeat(2, 1), target.repeat(2, 1), prefix.repeat(2)
    scored = masked | corrupted  # (B, T)
    if block is None:
        logits = model(noisy, pad, image_index, logits_at=scored, prefix=prefix)  # (M, V): scored positions only
    else:  # every block given the clean ones before it; one block per row needs no clean copy
        clean = ids if int(block.max()) > 1 else None
        logits = model(noisy, pad, image_index, logits_at=scored, block=block, clean=clean)  # (M, V)

    ce = torch.zeros(masked.shape, device=logits.device)  # (B, T), 0 where not scored
    ce[scored] = F.cross_entropy(logits.float(), ids[scored], reduction="none")  # (M,)
    elbo = ce * w * masked  # (B, T) each position's term of the bound
    fix = ce * corrupted  # (B, T) the corrected tokens' CE (weight 1)
    n_target = int(target.sum())  # over both views when paired: nll is then their mean
    if n_target == 0:
        zero = _zero_loss(logits)
        return LossOutput(zero, zero.detach(), {}, 0)
    nll = elbo.sum() / n_target
    by_modality = is_image if modality_balanced else None  # (B, T) or None
    if Weighting(weighting) == Weighting.MASKED_MEAN:
        loss = _pooled(ce, scored & target, task, task_balanced, by_modality)
    elif task_balanced:
        loss = _pooled(elbo + fix, target, task, True, by_modality)
    elif kind == ImageSchedule.ELBO:
        loss = nll + fix.sum() / n_target
    else:
        image_masked = masked & is_image  # (B, T)
        image_mean = (ce * image_masked).sum() / image_masked.sum().clamp_min(1)  # MaskGIT: mean CE
        text_sum = (elbo * ~is_image).sum()
        loss = (text_sum + (target & is_image).sum() * image_mean + fix.sum()) / n_target
    return LossOutput(loss, nll.detach(), _per_task(elbo, target, task), n_target // (2 if paired else 1))


def ar_loss(model: torch.nn.Module, batch: Batch, force_causal: bool = False,
            task_balanced: bool = False, modality_balanced: bool = False) -> LossOutput:
    """Next-token CE of the causal baseline on the same target regions: position i predicts token
    i + 1, counted only where i + 1 is a target. Exact NLL per target token (a target at position 0,
    which no template makes, would have nothing to be predicted from and is not counted).

    The loss is the mean CE over the batch's target tokens, or with `task_balanced` each task's mean CE
    averaged over the tasks present, as `masked_diffusion_loss` does: a VQA sample's few answer tokens then
    weigh as much as a text-to-image sample's 64 image tokens (in a token mean they are ~5% of the loss).
    The reported NLL is the token mean either way. `modality_balanced` splits each task's share between its
    image and text targets, as in `masked_diffusion_loss`.

    `force_causal` runs a bidirectional model causally for this call (`Transformer.forward(causal=True)`):
    the AR half of a model trained on both objectives (`ModelConfig.shift_logits`)."""
    config = getattr(model, "config", None)
    if not force_causal and config is not None and not getattr(config, "causal", True):
        raise ValueError("ar_loss needs a causal model (ModelConfig(causal=True)): a bidirectional one "
                         "sees the token it predicts")
    target = batch.target[:, 1:] & ~batch.pad[:, 1:]  # (B, T-1): token i+1 is a target
    at = F.pad(target, (0, 1))  # (B, T): the positions whose next token is a target, the only ones scored
    extra = {"causal": True} if force_causal else {}
    logits = model(batch.ids, batch.pad, batch.image_index, logits_at=at, **extra)  # (M, V)
    n_target = int(target.sum())
    if n_target == 0:
        zero = _zero_loss(logits)
        return LossOutput(zero, zero.detach(), {}, 0)
    ce = torch.zeros(target.shape, device=logits.device)  # (B, T-1)
    ce[target] = F.cross_entropy(logits.float(), batch.ids[:, 1:][target], reduction="none")  # (M,)
    nll = ce.sum() / n_target
    is_image = batch.image_index[:, 1:] >= 0 if modality_balanced else None  # (B, T-1): the predicted token's
    loss = _pooled(ce, target, batch.task, True, is_image) if task_balanced else nll
    return LossOutput(loss, nll.detach(), _per_task(ce, target, batch.task), n_target)
