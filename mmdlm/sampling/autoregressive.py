"""`ARScheduler`: the autoregressive twin's decoder, left to right over the target span with a KV cache.

nanoGPT / litgpt style: a prefill call over the prefix, then one call per target position that feeds the
newest tokens and appends to the cache; greedy, temperature or top-k, with the same modality restriction as
the masked scheduler (image positions take image codes, text positions text or `<eos>`).

It stops as `generate` does (with `SamplerConfig.eos_fill`, the default): a text region ends at a row's `<eos>`
(the rest of the region is `<eos>`, never decoded); a row whose last region has ended leaves the batch (the
cache drops its row), and the call ends when every row has; a region that every row has ended is skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmdlm.sampling.config import SamplerConfig
from mmdlm.sampling.scheduler import SampleResult, Scheduler, StepCallback
from mmdlm.sampling.tokens import restrict, sample_tokens
from mmdlm.sequence import target_regions
from mmdlm.vocab import Vocab

if TYPE_CHECKING:
    from mmdlm.model import KVCache
    from mmdlm.sequence import Batch


@dataclass
class ARState:
    """An AR run in progress: the next target position `p`, the cache up to `cache.length`."""

    canvas: torch.Tensor  # Long[B, T]
    config: SamplerConfig
    batch: Batch
    generator: torch.Generator | None
    allowed: torch.Tensor  # Bool[2, V]
    modality: torch.Tensor  # Long[B, T]
    is_text_target: torch.Tensor  # Bool[B, T]
    ended: torch.Tensor  # Bool[B]: the row has emitted <eos> in the current text region
    cache: KVCache | None
    p: int  # the position predicted next
    end: int  # one past the last target position
    region_end: torch.Tensor  # Long[T]: one past the last position of the target region holding each position
    last_region: int  # the first position of the span's last target region
    live: torch.Tensor  # Long[L]: the rows still decoding (and in the cache)
    row_nfe: torch.Tensor  # Long[B]: forward calls each row was in
    eos: int  # the <eos> id
    i: int = 0
    nfe: int = 0
    forward_rows: int = 0

    @property
    def done(self) -> bool:
        return self.p >= self.end or len(self.live) == 0

    def result(self) -> SampleResult:
        return SampleResult(self.canvas, self.nfe, None, self.forward_rows, row_nfe=self.row_nfe)

    def advance(self) -> None:
        """Move `p` to the next target position; a text region ends at its first <eos>, the next starts
        afresh. Given tokens inside the span (a question between two VQA answers, `<eoi>`) are fed with
        the next call. With `eos_fill`, a text region every live row has ended is filled with `<eos>` and
        skipped, and in the last region a row that has ended leaves."""
        target = self.batch.target[0]
        fill = self.config.eos_fill
        while self.p < self.end:
            self.ended &= self.is_text_target[:, self.p]
            if fill and self.p >= self.last_region:  # the rows that are done leave
                keep = ~self.ended[self.live]  # (L,)
                if not bool(keep.all()):
                    self.leave(keep)
                if len(self.live) == 0:
                    self.p = self.end
                    return
            if fill and bool(self.is_text_target[0, self.p]) and bool(self.ended[self.live].all()):
                stop = int(self.region_end[self.p])  # every live row has ended this region: skip its rest
                self.canvas[self.live, self.p:stop] = self.eos
                self.p = stop
                continue
            if bool(target[self.p]):
                return
            self.p += 1

    def leave(self, keep: torch.Tensor) -> None:
        """Drop the live rows where Bool[L] `keep` is False; their cache rows go with them and the rest of
        their last region is `<eos>`."""
        gone = self.live[~keep]  # (G,)
        self.canvas[gone, self.p:self.end] = torch.where(self.is_text_target[gone, self.p:self.end], self.eos,
                                                        self.canvas[gone, self.p:self.end])
        self.live = self.live[keep]
        if self.cache is not None:
            self.cache.keep_rows(keep.nonzero().squeeze(1))


class ARScheduler(Scheduler):
    """Left-to-right decoding of the target span (`ModelConfig.causal=True`).

    The span runs from the first to the last target position and must be the same in every row (the AR
    templates put the target at the tail: the image of text-to-image, the answer of understanding); a batch
    whose rows differ is decoded in groups of rows that agree. NFE = forward calls = target positions (the
    first call is the prefill of the prefix).
    """

    autoregressive = True

    def __init__(self, vocab: Vocab) -> None:
        self.vocab = vocab

    def set_timesteps(self, batch: Batch, config: SamplerConfig, *, anchor: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> ARState:
        ids, target = batch.ids.clone(), batch.target  # (B, T)
        B = ids.shape[0]
        if anchor is not None and bool(anchor.any()):
            raise ValueError("the AR scheduler decodes left to right and cannot keep anchored tokens")
        if bool(target.any()) and not bool((target == target[:1]).all()):
            raise ValueError("the AR scheduler needs the same target layout in every row of the batch")
        cols = target[0].nonzero().squeeze(1)  # (n,)
        start, end = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 0)
        if len(cols) and start == 0:
            raise ValueError("the target span needs a prefix to condition on (the task token at least)")
        regions = target_regions(target[0])  # index tensors of each target region
        region_end = torch.zeros(ids.shape[1], dtype=torch.long, device=ids.device)  # (T,)
        for r, region in enumerate(regions):  # one past each region's last position, up to the next region
            hi = int(regions[r + 1][0]) if r + 1 < len(regions) else end
            region_end[int(region[0]) : hi] = int(region[-1]) + 1
        state = ARState(canvas=ids, config=config, batch=batch, generator=generator,
                        allowed=self.vocab.allowed_table(ids.device), modality=(batch.image_index >= 0).long(),
                        is_text_target=target & (batch.image_index < 0),
                        ended=torch.zeros(B, dtype=torch.bool, device=ids.device), cache=None,  # `prepare` adds it
                        p=start, end=end, region_end=region_end,
                        last_region=int(regions[-1][0]) if regions else 0,
                        live=torch.arange(B, device=ids.device),
                        row_nfe=torch.zeros(B, dtype=torch.long, device=ids.device), eos=self.vocab.eos)
        state.advance()
        return state

    def model_inputs(self, state: ARState) -> dict[str, Any]:
        """The positions not yet in the cache, up to (not including) `p` (all of them without a cache)."""
        b, p, rows = state.batch, state.p, state.live
        lo = state.cache.length if state.cache is not None else 0
        kw = {"ids": state.canvas[rows, lo:p], "pad": b.pad[rows, lo:p], "image_index": b.image_index[rows, lo:p]}
        return kw | ({"cache": state.cache} if state.cache is not None else {})

    def step(self, logits: torch.Tensor, state: ARState) -> None:
        s, o, p, rows = state, state.config, state.p, state.live
        s.nfe += 1
        s.forward_rows += len(rows)
        s.row_nfe[rows] += 1
        lg = restrict(logits[:, -1].double(), s.modality[rows, p], s.allowed)  # (L, V)
        temperature = o.temperatures[int(s.modality[rows[0], p])]  # the rows share a layout: one modality at p
        tok = sample_tokens(lg, temperature, s.generator, o.top_k)  # (L,)
        if o.eos_fill:
            text = s.is_text_target[rows, p]
            tok = torch.where(s.ended[rows] & text, self.vocab.eos, tok)
            s.ended[rows] |= (tok == self.vocab.eos) & text
        s.canvas[rows, p] = tok
        s.p, s.i = p + 1, s.i + 1
        s.advance()

    @torch.no_grad()
    def sample(self, model: nn.Module, batch: Batch, config: SamplerConfig = SamplerConfig(), *,
               anchor: torch.Tensor | None = None, generator: torch.Generator | None = None,
               history: bool = False, callback: StepCallback | None = None) -> SampleResult:
        model_cfg = getattr(model, "config", None)
        if model_cfg is not None and not getattr(model_cfg, "causal", True):
            raise ValueError("the AR scheduler needs a causal model (ModelConfig.causal=True)")
        target = batch.target
        if len(target) and not bool((target == target[:1]).all()):
            return self.sample_in_groups(model, batch, config, generator=generator)
        return super().sample(model, batch, config, anchor=anchor, generator=generator, history=history,
                              callback=callback)

    def prepare(self, model: nn.Module, state: ARState) -> None:
        """Give the run a KV cache for the span (`SamplerConfig.use_cache`)."""
        if state.config.use_cache and state.end > 0:
            state.cache = model.new_cache(state.canvas.shape[0], state.end, device=state.canvas.device)
