"""What training shows of a model at validation: a few targets decoded again next to the truth, as text lines
and as an image grid (TensorBoard's `val/samples` and `val/images`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from mmdlm.model import Transformer
from mmdlm.sampling import SamplerConfig, scheduler_for
from mmdlm.sequence import Batch, generated_image, target_regions
from mmdlm.text_tokenizer import TextTokenizer
from mmdlm.vocab import Vocab


@torch.no_grad()
def image_grid(batch: Batch, pred: torch.Tensor, vocab: Vocab, vq: Any) -> torch.Tensor | None:
    """Float[3, H', W']: the image targets of a batch, truth (top row) over prediction (bottom row), decoded
    by the image tokenizer (torchvision's `make_grid`); None when no row generates an image."""
    from torchvision.utils import make_grid

    rows = [i for i in range(len(batch)) if bool((batch.target[i] & (batch.image_index[i] >= 0)).any())]
    if not rows:
        return None
    h, w = vq.grid

    def codes(ids: torch.Tensor) -> torch.Tensor:
        out = []
        for i in rows:  # the row's generated image (a document may hold several)
            tok = ids[i][generated_image(batch.image_index[i], batch.target[i], h * w)]  # (h*w,)
            out.append(torch.where(vocab.is_image(tok), tok - vocab.image_offset, 0).view(h, w))
        return torch.stack(out).cpu()  # (R, h, w): the DataModule's tokenizer stays on the CPU

    truth, made = vq.decode(codes(batch.ids)), vq.decode(codes(pred))  # (R, 3, H, W) each
    return make_grid(torch.cat([truth, made]).float().clamp(0, 1).cpu(), nrow=len(rows))


@torch.no_grad()
def fill_targets(model: Transformer, batch: Batch, vocab: Vocab, steps: int = 8) -> torch.Tensor:
    """Mask a batch's targets and decode them again (greedy); used to show samples during training."""
    masked = replace(batch, ids=torch.where(batch.target, vocab.mask, batch.ids))
    was_training = model.training
    model.eval()
    try:
        return scheduler_for(model.config, vocab).sample(model, masked, SamplerConfig(steps=steps)).ids
    finally:
        model.train(was_training)


def decode_targets(batch: Batch, pred: torch.Tensor, vocab: Vocab, tokenizer: TextTokenizer) -> list[str]:
    """Human-readable 'truth -> prediction' lines for the text targets of a batch."""
    lines = []
    for i in range(len(batch)):
        text = batch.target[i] & (batch.image_index[i] < 0)
        for region in target_regions(text.cpu()):
            truth = tokenizer.decode(vocab.text_ids_only(batch.ids[i, region]))
            guess = tokenizer.decode(vocab.text_ids_only(pred[i, region]))
            lines.append(f"`{truth}` -> `{guess}`")
        if bool((batch.target[i] & (batch.image_index[i] >= 0)).any()):
            img = batch.target[i] & (batch.image_index[i] >= 0)
            acc = (pred[i][img] == batch.ids[i][img]).float().mean().item()
            lines.append(f"image tokens recovered: {acc:.0%}")
    return lines
