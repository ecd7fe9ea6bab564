"""Token blocks for block diffusion (BD3-LM, Arriola et al. 2025; SDAR; Fast-dLLM v2): which block each position
of a laid-out sequence belongs to.

Block 0 is the prompt (the positions before `Batch.prefix`). Each target region (a maximal run of target positions
of one modality) is cut into blocks: a text region into runs of `block_size` tokens, an image region into bands
of `image_block_rows` rows of its grid (its `image_index` restarts at 0 per image); 0 keeps the region whole.
Blocks are numbered 1, 2, ... in sequence order. A given position after the prompt (a question between two
answers, `<eoi>`, a `<sep>`) joins the block of the next target position, so it is read with the target it
precedes; the positions after the last target (pads) join the last block.

Attention is bidirectional inside a block and causal across blocks (`Transformer.forward(block=...)`). With
`one_block` every position after the prompt is block 1: that is prefix attention exactly.

    block = token_blocks(batch.target, batch.pad, batch.image_index, batch.prefix, block_size=4,
                         image_block_rows=2, grid_width=8)  # Long[B, T]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mmdlm.model import ModelConfig
    from mmdlm.sequence import Batch


def token_blocks(target: torch.Tensor, pad: torch.Tensor, image_index: torch.Tensor, prefix: torch.Tensor, *,
                 block_size: int = 0, image_block_rows: int = 0, grid_width: int = 1,
                 one_block: bool = False) -> torch.Tensor:
    """Long[B, T] block of each position (0 = the prompt) from a batch's Bool[B, T] `target`, `pad`, Long[B, T]
    `image_index` and Long[B] `prefix`; `one_block`: all of a row after its prompt is block 1."""
    if block_size < 0 or image_block_rows < 0 or grid_width < 1:
        raise ValueError(f"block_size and image_block_rows must be >= 0 and grid_width >= 1, got {block_size}, "
                         f"{image_block_rows}, {grid_width}")
    B, T = target.shape
    pos = torch.arange(T, device=target.device).expand(B, T)  # (B, T)
    after = pos >= prefix[:, None]  # (B, T) past the prompt
    if one_block:
        return after.long()  # (B, T)
    tgt = target & ~pad & after  # (B, T)
    img = image_index >= 0  # (B, T)

    def before(x: torch.Tensor) -> torch.Tensor:  # (B, T) the value at the position before (False at 0)
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)

    # a region starts after a gap, at a change of modality, or at a new image (its raster index restarts at 0)
    start = tgt & (~before(tgt) | (img != before(img)) | (img & (image_index == 0)))  # (B, T)
    run = pos - torch.where(start, pos, -1).cummax(1).values  # (B, T) position within the region
    whole = torch.zeros_like(run)  # (B, T) a size of 0 keeps the region one block
    text_part = run // block_size if block_size else whole  # (B, T)
    image_part = image_index.clamp(min=0) // (image_block_rows * grid_width) if image_block_rows else whole
    part = torch.where(img, image_part, text_part)  # (B, T)
    new = start | (tgt & (part != before(part)))  # (B, T) the first position of each block
    unit = new.long().cumsum(1)  # (B, T) blocks 1, 2, ... in sequence order
    last = unit[:, -1:]  # (B, 1) the row's last block
    big = T + 1
    nxt = torch.where(tgt, unit, big).flip(1).cummin(1).values.flip(1)  # (B, T) the block of the next target
    block = torch.where(tgt, unit, torch.where(nxt < big, nxt, last))  # (B, T)
    return block * after  # (B, T) the prompt is block 0


def model_blocks(config: ModelConfig, batch: Batch, *, one_block: bool = False) -> torch.Tensor | None:
    """Long[B, T] the token blocks a block-diffusion model (`ModelConfig.block_diffusion`) reads for `batch`, with
    the block sizes it was trained with; None for any other model (it needs none)."""
    if not config.block_diffusion:
        return None
    return token_blocks(batch.target, batch.pad, batch.image_index, batch.prefix, block_size=config.block_size,
                        image_block_rows=config.image_block_rows, grid_width=max(config.image_grid[1], 1),
                        one_block=one_block)
