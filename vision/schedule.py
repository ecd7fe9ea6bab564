"""The learning-rate schedule of every trainer here (the VQ tokenizer's and mmdlm's): linear warmup from
lr / warmup_steps, then cosine decay to lr * min_lr_ratio at total_steps, flat after. A factor of the peak
learning rate, for `torch.optim.lr_scheduler.LambdaLR`. (Not transformers' cosine-with-min-lr: its warmup
starts at lr 0.)
"""

from __future__ import annotations

import math


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """The learning rate at optimizer step `step` as a fraction of the peak."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
