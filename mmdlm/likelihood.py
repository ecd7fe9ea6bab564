"""Per-sequence log-likelihood of a batch's targets given the rest: what a policy gradient needs.

An autoregressive model has it exactly: the sum of teacher-forced log p(x_i | x_<i) over the target. A
masked-diffusion model has no tractable likelihood; the policy-gradient methods for it use the ELBO,
log p(x | prompt) >= -E_t E_{mask ~ t} [ (1/t) sum_{masked i} -log p(x_i | x_t) ] (MDLM, linear schedule), in
one of three estimates:
- diffu-GRPO (d1, Zhao et al. 2025): one forward with the whole completion masked: cheap, biased;
- coupled-GRPO (DiffuCoder, Gong et al. 2025): a mask and its complement, at t and 1 - t, so every target token
  is scored exactly once per pair (unbiased; whether it varies less than two independent draws depends on the
  model: on the test's random one it did not);
- wd1 / SPG: weighted forms of the same bound.
`elbo` here is the coupled estimate, `draws` pairs averaged; `exact_elbo` enumerates every mask of a short
target (tests: the estimate's mean is the exact bound). Both keep the autograd graph: the loss of a policy
update is built on them.

`trajectory_log_likelihood` is not a bound but the sampler's own choices (TraceRL, Wang et al. 2025; MaskGRPO): a
rollout's canvas after every step is kept, and each token is scored where and when the sampler committed it, as
log p(x_i | the canvas before that step) under the distribution it was drawn from (the guided, modality-restricted,
plausibility-masked logits over the temperature). Which positions a step commits (the confidence order) is left
out, as the environment's part. It costs one forward (two with guidance) per sampler step. When another sampler
drew the rollout (hotter, or unconstrained), `trajectory_token_log_probs` also gives each token's ratio of the two
samplers' probabilities, for a per-token importance weight (truncated importance sampling, as PPO's per-token ratio).

With the linear schedule the bound has a closed form over masks: a mask of k of the L targets has probability
t^k (1 - t)^(L - k) at time t, so its weight is the integral of t^(k-1) (1 - t)^(L - k) dt = B(k, L - k + 1).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import torch
import torch.nn.functional as F

from mmdlm.blocks import model_blocks
from mmdlm.sampling.config import SamplerConfig
from mmdlm.sampling.tokens import guided_logits, restrict
from mmdlm.sequence import Batch
from mmdlm.vocab import Vocab


def _masked_log_probs(model: torch.nn.Module, batch: Batch, masked: torch.Tensor, vocab: Vocab,
                      guidance: float = 0.0) -> torch.Tensor:
    """Float[B, T]: log p(x_i | the batch with `masked` (Bool[B, T]) set to `<mask>`) at the masked positions, 0
    elsewhere. `guidance` = w > 0: of the classifier-free-guided distribution the sampler draws from,
    softmax(cond + w (cond - uncond)), the condition dropped as `pad | cond` (both rows in one call)."""
    noisy = batch.ids.masked_fill(masked, vocab.mask)  # (B, T)
    block = model_blocks(model.config, batch)  # (B, T): a block-diffusion model's blocks, else None
    if guidance > 0:
        logits = model(noisy.repeat(2, 1), torch.cat([batch.pad, batch.pad | batch.cond]),
                       batch.image_index.repeat(2, 1), logits_at=masked.repeat(2, 1),
                       prefix=batch.prefix.repeat(2),
                       block=None if block is None else block.repeat(2, 1))  # (2M, V): cond rows, then uncond rows
        cond, uncond = logits.float().chunk(2)
        logits = cond + guidance * (cond - uncond)  # (M, V)
    else:
        logits = model(noisy, batch.pad, batch.image_index, logits_at=masked, prefix=batch.prefix,
                       block=block)  # (M, V)
    out = torch.zeros(masked.shape, dtype=logits.dtype, device=logits.device)
    out[masked] = -F.cross_entropy(logits.float(), batch.ids[masked], reduction="none").to(logits.dtype)  # (M,)
    return out


def ar_log_likelihood(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Float[B]: the exact log p(target | the rest before it) of a causal model, teacher-forced."""
    target = batch.target & ~batch.pad  # (B, T)
    at = target[:, 1:]  # (B, T-1): position i predicts i + 1
    logits = model(batch.ids, batch.pad, batch.image_index, logits_at=F.pad(at, (0, 1)))  # (M, V)
    lp = torch.zeros(at.shape, dtype=logits.dtype, device=logits.device)
    lp[at] = -F.cross_entropy(logits.float(), batch.ids[:, 1:][at], reduction="none").to(logits.dtype)
    return lp.sum(1)


def full_mask_log_likelihood(model: torch.nn.Module, batch: Batch, vocab: Vocab, guidance: float = 0.0) -> torch.Tensor:
    """Float[B]: sum over the targets of log p(x_i | the rest, every target masked): diffu-GRPO's one-step estimate
    (d1). One forward; biased (it scores each token as the first step sees it), with none of the ELBO's 1/t
    variance."""
    target = batch.target & ~batch.pad  # (B, T)
    return _masked_log_probs(model, batch, target, vocab, guidance).sum(1)


def elbo(model: torch.nn.Module, batch: Batch, vocab: Vocab, draws: int = 1, eps: float = 1e-3,
         generator: torch.Generator | None = None, guidance: float = 0.0) -> torch.Tensor:
    """Float[B]: a coupled Monte-Carlo estimate of each sequence's ELBO, a lower bound on log p(target | rest).

    Per draw: t ~ U(eps, 1 - eps) per row, a mask with each target token masked with probability t (weight 1/t)
    and its complement (weight 1/(1 - t)), averaged: two forwards in one call of 2B rows. Unbiased (up to the
    eps cut): the complement of a time-t mask is a time-(1 - t) mask, and 1 - t is uniform too."""
    target = batch.target & ~batch.pad  # (B, T)
    B = target.shape[0]
    total = torch.zeros(B, device=batch.ids.device)
    pair = replace(batch, ids=batch.ids.repeat(2, 1), target=batch.target.repeat(2, 1), pad=batch.pad.repeat(2, 1),
                   image_index=batch.image_index.repeat(2, 1), cond=batch.cond.repeat(2, 1), task=batch.task.repeat(2),
                   prefix=batch.prefix.repeat(2))
    for _ in range(draws):
        t = torch.rand(B, generator=generator, device=batch.ids.device) * (1 - 2 * eps) + eps  # (B,)
        u = torch.rand(target.shape, generator=generator, device=batch.ids.device)  # (B, T)
        masked = target & (u < t[:, None])  # (B, T)
        both = torch.cat([masked, target & ~masked])  # (2B, T)
        lp = _masked_log_probs(model, pair, both, vocab, guidance).sum(1)  # (2B,)
        total = total + (lp[:B] / t + lp[B:] / (1 - t)) / 2  # each view alone estimates the bound
    return total / draws


def exact_elbo(model: torch.nn.Module, batch: Batch, vocab: Vocab, max_targets: int = 10) -> torch.Tensor:
    """Float[B]: the ELBO itself, enumerating every non-empty mask of each row's targets with its weight
    B(k, L - k + 1) (module docstring). For short targets only (2^L forwards per row)."""
    target = batch.target & ~batch.pad  # (B, T)
    out = []
    for b in range(target.shape[0]):
        cols = target[b].nonzero().squeeze(1).tolist()  # (L,)
        L = len(cols)
        if L > max_targets:
            raise ValueError(f"exact_elbo enumerates 2^{L} masks; give rows with at most {max_targets} targets")
        row = batch.select([b])
        value = torch.zeros((), device=batch.ids.device)
        for k in range(1, L + 1):
            weight = math.gamma(k) * math.gamma(L - k + 1) / math.gamma(L + 1)  # B(k, L - k + 1)
            for subset in itertools.combinations(cols, k):
                masked = torch.zeros_like(target[b : b + 1])
                masked[0, list(subset)] = True
                value = value + weight * _masked_log_probs(model, row, masked, vocab).sum()
        out.append(value)
    return torch.stack(out)


def _drawn_log_prob(cond: torch.Tensor, uncond: torch.Tensor | None, tokens: torch.Tensor, config: SamplerConfig,
                    keep_drawn: bool = True) -> torch.Tensor:
    """Float[M]: log p(tokens (Long[M, 1])) under the distribution `config`'s sampler draws from, given the restricted
    conditional logits `cond` (Float[M, V]) and the unconditional ones (needed when `config` guides). With guidance
    the plausibility constraint applies; `keep_drawn` keeps the drawn token even where recomputing the logits moved
    it a rounding error across the boundary (else a drawn token could score -inf); without it, a token the
    constraint excludes scores -inf (the sampler could not have drawn it)."""
    c = cond
    if config.guidance_scale > 0:
        keep = c >= c.amax(-1, keepdim=True) + math.log(max(config.guidance_plausibility, 1e-30))  # (M, V)
        if keep_drawn:
            keep.scatter_(1, tokens, True)
        c = guided_logits(c, uncond, config.guidance_scale).masked_fill(~keep, float("-inf"))
    return torch.log_softmax(c / max(config.temperature, 1e-6), dim=-1).gather(1, tokens).squeeze(1)  # (M,)


def trajectory_token_log_probs(model: torch.nn.Module, batch: Batch, history: list[torch.Tensor], vocab: Vocab,
                               config: SamplerConfig, behaviour: SamplerConfig | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each committed token's log p where and when the masked sampler committed it (module docstring), under
    `config`'s distribution: (log_p Float[M], row Long[M], log_ratio Float[M] or None) over the M tokens of every
    step, `row` the batch row of each. `behaviour`: the sampler that drew the rollout, if another (hotter, or without
    the plausibility constraint): `log_ratio` is then log p_config(token) - log p_behaviour(token), detached, the
    per-token importance ratio of the two samplers (-inf where `config` could not have drawn the token). `batch`: the
    prompts (the targets `<mask>`); `history`: the canvas Long[B, T] after each step, the last one the completion.
    Needs a sampler that never re-masks (no self-correction)."""
    if config.self_correction is not None:
        raise ValueError("trajectory_log_likelihood needs a sampler without self-correction (tokens stay committed)")
    final = history[-1]  # (B, T)
    allowed = vocab.allowed_table(final.device)  # (2, V)
    modality = (batch.image_index >= 0).long()  # (B, T) Modality: 0 text, 1 image
    guided = max(config.guidance_scale, behaviour.guidance_scale if behaviour else 0.0) > 0
    log_p, rows, log_ratio = [], [], []
    before = batch.ids
    for after in history:
        open_ = before == vocab.mask  # (B, T) the canvas's masks before this step
        chosen = open_ & (after != vocab.mask)  # (B, T) committed in this step
        before = after
        if not bool(chosen.any()):
            continue
        noisy = final.masked_fill(open_, vocab.mask)  # (B, T) = the canvas before the step
        n = 2 if guided else 1
        logits = model(noisy.repeat(n, 1), torch.cat([batch.pad, batch.pad | batch.cond][:n]),
                       batch.image_index.repeat(n, 1), logits_at=chosen.repeat(n, 1),
                       prefix=batch.prefix.repeat(n)).float()  # (n * M, V)
        tokens = final[chosen][:, None]  # (M, 1)
        m = len(tokens)
        cond = restrict(logits[:m], modality[chosen], allowed)  # (M, V)
        uncond = logits[m:] if guided else None  # (M, V)
        log_p.append(_drawn_log_prob(cond, uncond, tokens, config))
        rows.append(chosen.nonzero()[:, 0])
        if behaviour is not None:
            with torch.no_grad():
                target = _drawn_log_prob(cond, uncond, tokens, config, keep_drawn=False)  # (M,)
                log_ratio.append(target - _drawn_log_prob(cond, uncond, tokens, behaviour))  # (M,)
    if not log_p:
        empty = torch.zeros(0, device=final.device)
        return empty, empty.long(), (empty if behaviour is not None else None)
    return torch.cat(log_p), torch.cat(rows), (torch.cat(log_ratio) if behaviour is not None else None)


def trajectory_log_likelihood(model: torch.nn.Module, batch: Batch, history: list[torch.Tensor], vocab: Vocab,
                              config: SamplerConfig) -> torch.Tensor:
    """Float[B]: sum over a rollout's steps of log p(tokens committed at that step | the canvas before it), under
    the distribution the masked sampler drew them from with `config` (module docstring, `trajectory_token_log_probs`).
    """
    log_p, row, _ = trajectory_token_log_probs(model, batch, history, vocab, config)
    return torch.zeros(history[-1].shape[0], device=history[-1].device).index_add(0, row, log_p)
