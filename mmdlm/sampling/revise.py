"""Revision: a model scores the tokens of a finished (or drafted) target and rewrites the ones it doubts.

What a masked-diffusion model can do and a left-to-right one cannot: read a whole sequence, find the tokens
that do not fit the rest, and re-decode only those, with everything else as context. It follows:
- the informed correctors of Zhao et al. (2024) and ReMDM (Wang et al. 2025): a token is judged by
  p(x_i | everything else) with x_i itself masked, since a masked-diffusion model is trained to predict masked
  positions only; leave-one-out over a region is the pseudo-log-likelihood of masked LMs (Salazar et al.
  2020), which `token_scores` computes in one forward call of one row per scored token;
- WINO / LLaDA 2.1's draft-and-edit: the doubtful tokens are re-masked and filled again by the masked
  scheduler, the others staying as context (`revise`);
- the hybrid pipelines the project was founded on: an autoregressive model drafts with its KV cache and the
  diffusion model refines (`MMDLMPipeline.caption(..., draft=ar_pipe)`).

For a causal (AR) model `token_scores` is the teacher-forced p(x_i | x_<i) of one forward call, and `revise`
can only do what left-to-right decoding allows: keep the text up to the first doubtful token and decode the
rest again.

NFE: one forward call per chunk of scoring rows (`RevisionResult.forward_rows` counts the rows) plus the
refill's calls.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mmdlm.blocks import model_blocks
from mmdlm.sampling.config import SamplerConfig
from mmdlm.sampling.tokens import restrict, top_k_mask

if TYPE_CHECKING:
    from mmdlm.sampling.scheduler import Scheduler
    from mmdlm.sequence import Batch
    from mmdlm.vocab import Vocab


@dataclass(frozen=True)
class Revision:
    """How `revise` decides what to rewrite."""

    threshold: float = 0.5  # re-mask a token when p(token | rest) is below this ...
    only_if_disagrees: bool = True  # ... and the model would put another token there (else a confident
    #   argmax comes straight back and the refill only spends steps)
    max_tokens: int = 4  # at most this many per row and round, least likely first: the rest stays context
    rounds: int = 1  # score -> re-mask -> refill cycles (a round that finds nothing ends the revision)
    draft_confidence: float = 1.0  # revising another model's draft: only the tokens the drafting model itself gave
    #   p below this are judged (1.0: every token). The quickstart's MDM reads images worse than its AR twin, and
    #   judging every token of the AR's captions replaced more right words than wrong ones (BENCHMARKS.md, "Revision")

    def __post_init__(self) -> None:
        if not 0 <= self.threshold <= 1 or not 0 < self.draft_confidence <= 1:
            raise ValueError(f"revision threshold must be in [0, 1] and draft_confidence in (0, 1], got "
                             f"{self.threshold} and {self.draft_confidence}")
        if self.max_tokens < 1 or self.rounds < 1:
            raise ValueError("revision needs max_tokens >= 1 and rounds >= 1")


@dataclass
class TokenScores:
    """The model's judgement of the scored positions: Float[B, T] / Long[B, T], 0 elsewhere."""

    p: torch.Tensor  # Float64[B, T] p(x_i | context) of the token there
    best: torch.Tensor  # Long[B, T] the token the model would put there
    nfe: int  # forward calls
    rows: int  # sequences run

    def log_likelihood(self, positions: torch.Tensor) -> torch.Tensor:
        """Float64[B]: sum of log p over `positions` (Bool[B, T]): the pseudo-log-likelihood of a region."""
        return (self.p.clamp_min(1e-30).log() * positions).sum(1)


@dataclass
class RevisionResult:
    ids: torch.Tensor  # Long[B, T] the revised canvas
    nfe: int  # forward calls: scoring and refilling
    forward_rows: int  # sequences run in those calls
    remasked: torch.Tensor  # Long[B] tokens rewritten per row (re-masked and decoded again)


def token_scores(model: nn.Module, batch: Batch, positions: torch.Tensor, vocab: Vocab,
                 chunk: int = 512) -> TokenScores:
    """p(x_i | rest) of every position in `positions` (Bool[B, T], text or image tokens of `batch.ids`).

    Masked-diffusion model: one row per scored position, that position masked (leave-one-out), in calls of up
    to `chunk` rows; a block-diffusion model reads the rest of the position's block and the blocks before it.
    Causal model: one call, p(x_i | x_<i) teacher-forced."""
    ids = batch.ids
    B, T = ids.shape
    allowed = vocab.allowed_table(ids.device)  # (2, V)
    modality = (batch.image_index >= 0).long()  # (B, T)
    p = torch.zeros(B, T, dtype=torch.float64, device=ids.device)
    best = torch.zeros_like(ids)
    with torch.inference_mode():
        if getattr(model.config, "causal", False):
            logits = model(ids, batch.pad, batch.image_index)  # (B, T, V): position i - 1 predicts i
            lg = torch.cat([logits[:, :1], logits[:, :-1]], 1)[positions]  # (N, V)
            _fill(p, best, positions, ids, restrict(lg.double(), modality[positions], allowed))
            return TokenScores(p, best, 1, B)
        row, col = positions.nonzero(as_tuple=True)  # (N,) each
        block = model_blocks(model.config, batch)  # (B, T) or None
        nfe = 0
        for lo in range(0, len(row), chunk):
            r, c = row[lo : lo + chunk], col[lo : lo + chunk]  # (n,)
            n = len(r)
            x = ids[r].clone()  # (n, T) the rows, each with its own position masked
            x[torch.arange(n, device=ids.device), c] = vocab.mask
            at = torch.zeros(n, T, dtype=torch.bool, device=ids.device)
            at[torch.arange(n, device=ids.device), c] = True
            logits = model(x, batch.pad[r], batch.image_index[r], logits_at=at, prefix=batch.prefix[r],
                           block=None if block is None else block[r])  # (n, V)
            sel = torch.zeros_like(positions)
            sel[r, c] = True
            lg = restrict(logits.double(), modality[r, c], allowed)  # (n, V)
            # `_fill` writes in row-major order; this chunk's (r, c) are already row-major
            _fill(p, best, sel, ids, lg)
            nfe += 1
    return TokenScores(p, best, nfe, len(row))


def _fill(p: torch.Tensor, best: torch.Tensor, where: torch.Tensor, ids: torch.Tensor, logits: torch.Tensor) -> None:
    probs = logits.softmax(-1)  # (N, V)
    p[where] = probs.gather(1, ids[where][:, None]).squeeze(1)
    best[where] = probs.argmax(-1)


def content(ids: torch.Tensor, target: torch.Tensor, eos: int) -> torch.Tensor:
    """Bool[B, T]: the target positions that say something: all but the `<eos>` fill after a text region's first
    `<eos>` (an `<eos>` that follows an `<eos>` of the same region). Scoring those only is ~2x cheaper for a caption
    and loses nothing: the fill follows from the first `<eos>`."""
    is_eos = (ids == eos) & target  # (B, T)
    fill = is_eos & F.pad(is_eos[:, :-1], (1, 0))  # (B, T)
    return target & ~fill


def doubtful(scores: TokenScores, positions: torch.Tensor, ids: torch.Tensor, revision: Revision) -> torch.Tensor:
    """Bool[B, T]: the positions `revise` rewrites: below the threshold (and disagreeing), least likely first."""
    doubt = positions & (scores.p < revision.threshold)  # (B, T)
    if revision.only_if_disagrees:
        doubt &= scores.best != ids
    score = (-scores.p).masked_fill(~doubt, float("-inf"))  # (B, T) least likely = highest
    k = torch.full((ids.shape[0],), revision.max_tokens, device=ids.device)
    return top_k_mask(score, k)


def revise(model: nn.Module, scheduler: Scheduler, batch: Batch, positions: torch.Tensor, vocab: Vocab,
           config: SamplerConfig, revision: Revision = Revision(),
           generator: torch.Generator | None = None) -> RevisionResult:
    """Score `positions` (Bool[B, T]) of `batch.ids`, re-mask the doubtful ones and decode them again with the
    scheduler (`config`), the rest of the sequence as context; `revision.rounds` times at most.

    A masked-diffusion model rewrites exactly the doubtful tokens. A causal model keeps each row up to its
    first doubtful token and decodes the rest of the target after it again (the new text may be longer than the
    old): what left-to-right decoding allows."""
    ids = batch.ids.clone()
    nfe = rows = 0
    # a refill holds at most max_tokens masks per row: more image steps than that would commit nothing
    image_steps = min(config.image_steps or config.steps or revision.max_tokens, revision.max_tokens)
    config = replace(config, image_steps=image_steps)
    rewritten = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    causal = bool(getattr(model.config, "causal", False))
    for _ in range(revision.rounds):
        current = replace(batch, ids=ids)
        scores = token_scores(model, current, positions, vocab)
        nfe, rows = nfe + scores.nfe, rows + scores.rows
        again = doubtful(scores, positions, ids, revision)  # (B, T)
        if causal:  # from the first doubtful token on, the whole rest of the target (a new text may be longer)
            after = again.long().cummax(1).values.bool()  # (B, T)
            again = batch.target & after
        if not bool(again.any()):
            break
        rewritten += again.sum(1)
        masked = replace(current, ids=ids.masked_fill(again, vocab.mask), target=again)
        out = scheduler.sample(model, masked, config, generator=generator)  # AR: rows grouped by their span
        ids = out.ids
        nfe, rows = nfe + out.nfe, rows + out.forward_rows
    return RevisionResult(ids, nfe, rows, rewritten)
