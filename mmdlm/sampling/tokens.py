"""Token-level parts every mmdlm scheduler uses: commit schedules, confidence scores, modality restriction,
Gumbel-max token choice and classifier-free guidance with the plausibility constraint.

- LLaDA (Nie et al. 2025, `generate.py`): tokens per step spread evenly (`linear_schedule`), low-confidence
  remasking (`probability_confidence`), Gumbel-max sampling in float64 (low precision Gumbel noise hurts),
  guidance as `cond + w * (cond - uncond)`.
- MaskGIT (Chang et al. 2022): the cosine schedule for image tokens (few commits early, when the model is
  least sure; many at the end). Its mask ratio is `mmdlm.diffusion.COSINE`, the training schedule's.
- Contrastive decoding's adaptive plausibility constraint (Li et al. 2023) on top of guidance
  (`guided_logits`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mmdlm.diffusion import COSINE
from mmdlm.sampling.config import Confidence, SelfCorrection

Schedule = Callable[[torch.Tensor, int], torch.Tensor]
"""(n Long[B] tokens to commit, steps) -> Long[B, steps]: how many must still be masked after each
step. Non-increasing, last column 0, so every token is committed after `steps` steps."""

ConfidenceFn = Callable[[torch.Tensor, torch.Tensor, torch.Generator | None], torch.Tensor]
"""(probs Float64[N, V], chosen Long[N], generator) -> Float64[N]: how sure the model is of `chosen`;
the most confident predictions are committed first."""


# ---- schedules: how many tokens stay masked after each step ---------------------------------------------
def linear_schedule(n: torch.Tensor, steps: int) -> torch.Tensor:
    """LLaDA's `get_num_transfer_tokens`: n // steps per step, the remainder one each on the first steps."""
    s = torch.arange(1, steps + 1, device=n.device)  # (S,)
    base, rem = n // steps, n % steps  # (B,)
    done = base[:, None] * s + torch.minimum(s[None, :], rem[:, None])  # (B, S) committed after step s
    return n[:, None] - done  # (B, S)


def cosine_schedule(n: torch.Tensor, steps: int) -> torch.Tensor:
    """MaskGIT: the training schedule's mask ratio (`COSINE`, cos(pi/2 * s/steps) of the tokens) stays
    masked after step s; at least one token is committed per step while any is left (the floor alone
    would waste early steps on short regions)."""
    s = torch.arange(1, steps + 1, device=n.device)  # (S,)
    ratio = COSINE.mask_prob(1 - s.double() / steps)  # (S,) from ~1 down to ~0
    left = torch.floor(n[:, None].double() * ratio).long()  # (B, S); the last ratio ~ 6e-17 floors to 0
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


CONFIDENCE: dict[Confidence, ConfidenceFn] = {Confidence.PROBABILITY: probability_confidence,
                                              Confidence.MARGIN: margin_confidence,
                                              Confidence.RANDOM: random_confidence}


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


def predict(logits: torch.Tensor, modality: torch.Tensor, columns: list[torch.Tensor],
            temperature: float | tuple[float, ...], generator: torch.Generator | None, top_k: int | None,
            confidence: ConfidenceFn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen Long[N], p(chosen) Float64[N], confidence Float64[N]) for Float[N, V] logits, each position choosing
    among its modality's ids only (`columns[m]`, Long[V_m]): the same distribution as `restrict` then
    `sample_tokens` over all V ids, with a softmax and Gumbel noise over ~2/3 of the columns for image codes.
    `temperature`: one for every position, or one per modality."""
    temperatures = temperature if isinstance(temperature, tuple) else (temperature,) * len(columns)
    N = logits.shape[0]
    chosen = torch.empty(N, dtype=torch.long, device=logits.device)
    p = torch.empty(N, dtype=torch.float64, device=logits.device)
    conf = torch.empty(N, dtype=torch.float64, device=logits.device)
    for m, cols in enumerate(columns):
        rows = (modality == m).nonzero().squeeze(1)  # (N_m,)
        if rows.numel() == 0:
            continue
        lg = logits[rows][:, cols].double()  # (N_m, V_m)
        c = sample_tokens(lg, temperatures[m], generator, top_k)  # (N_m,) column index
        probs = lg.softmax(dim=-1)  # (N_m, V_m)
        chosen[rows] = cols[c]
        p[rows] = probability_confidence(probs, c)
        conf[rows] = confidence(probs, c, generator)
    return chosen, p, conf


def top_k_mask(score: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool[B, T]: the k[b] highest scores of each row (ties by position); -inf is never picked."""
    B, T = score.shape
    order = score.argsort(dim=1, descending=True, stable=True)  # (B, T)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T, device=score.device).expand(B, T))
    return (rank < k[:, None]) & (score > float("-inf"))  # (B, T)



# ---- self-correction (ReMDM) ------------------------------------------------------------------------------
def least_sure(p_commit: torch.Tensor, committed: torch.Tensor, k: int) -> torch.Tensor:
    """Bool[B, T]: the k `committed` tokens (Bool[B, T]) of each row whose probability when committed (Float64[B, T]
    `p_commit`) was lowest: the ones self-correction checks."""
    score = (-p_commit).masked_fill(~committed, float("-inf"))  # (B, T) least sure = highest
    return top_k_mask(score, torch.full((p_commit.shape[0],), k, device=p_commit.device))


def doubted(logits: torch.Tensor, tokens: torch.Tensor, modality: torch.Tensor, allowed: torch.Tensor,
            correction: SelfCorrection) -> tuple[torch.Tensor, torch.Tensor]:
    """(re-mask Bool[C], p(token | the rest) Float64[C]) of C checked tokens Long[C] from their logits Float[C, V]
    (each token masked in its own check row): the model no longer believes in a token below `correction.threshold`,
    and, with `only_if_disagrees`, only when it would now pick another."""
    probs = restrict(logits.double(), modality, allowed).softmax(dim=-1)  # (C, V)
    p_now = probs.gather(1, tokens[:, None]).squeeze(1)  # (C,)
    drop = p_now < correction.threshold
    if correction.only_if_disagrees:
        drop &= probs.argmax(dim=-1) != tokens
    return drop, p_now

# ---- guidance -------------------------------------------------------------------------------------------
def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float, plausibility: float = 0.0,
                  reference: torch.Tensor | None = None, text_uncond: torch.Tensor | None = None,
                  image_scale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022) as LLaDA/MMaDA write it:
    uncond + (1 + w) (cond - uncond) = cond + w (cond - uncond), so w = 0 is the conditional model.

    `plausibility` = alpha > 0 keeps only the tokens the conditional model itself finds plausible,
    p_cond(x) >= alpha * max p_cond (the adaptive plausibility constraint of contrastive decoding, Li et
    al. 2023); the others get -inf. Guidance then re-ranks plausible tokens instead of lifting every
    token whose cond/uncond ratio is high: unconstrained, a prompt's object codes win at background
    positions too, and the image fills with spurious objects (BENCHMARKS.md, "guidance").
    `reference`: the conditional logits plausibility is judged on (default `cond`); the sampler passes
    them `restrict`ed, so the max is over the tokens it may pick.

    `text_uncond`: the logits with only the condition's text dropped (an edit's instruction, its source image
    kept): then the text and the image are guided apart, InstructPix2Pix's two scales (Brooks et al. 2023),
    cond + w (cond - text_uncond) + w_img (text_uncond - uncond).
    """
    if text_uncond is None:
        guided = cond + scale * (cond - uncond)
    else:
        guided = cond + scale * (cond - text_uncond) + image_scale * (text_uncond - uncond)
    if plausibility <= 0:
        return guided
    ref = cond if reference is None else reference
    keep = ref >= ref.amax(dim=-1, keepdim=True) + math.log(plausibility)  # (..., V)
    return guided.masked_fill(~keep, float("-inf"))
