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

import torch


def token_blocks(target: torch.Tensor, pad: torch.Tensor, image_index: torch.Tensor, prefix: torch.Tensor, *,
                 block_size: int = 0, image_block_rows: int = 0, grid_width: int = 1,
                 one_block: bool = False) -> torch.Tensor:
    """Long[B, T] block of each position (0 = the prompt) from a batch's Bool[B, T] `target`, `pad`, Long[B, T]
    `image_index` and Long[B] `prefix`; `one_block`: all of a row after its prompt is block 1."""
    if block_size < 0 or image_block_rows < 0 or grid_width < 1:
        raise ValueError(f"block_size and image_block_rows must be >= 0 and grid_width >= 1, got {block_size}, "
                         f"{image_block_rows}, {grid_width}")
    B, T = target.shape
    if one_block:
        return (torch.arange(T, device=target.device)[None] >= prefix[:, None]).long()  # (B, T)
    out = torch.zeros(B, T, dtype=torch.long, device=target.device)  # (B, T)
    for b in range(B):
        out[b] = _row_blocks(target[b] & ~pad[b], image_index[b], int(prefix[b]), block_size, image_block_rows,
                             grid_width)
    return out


def _row_blocks(target: torch.Tensor, image_index: torch.Tensor, prefix: int, block_size: int, rows: int,
                width: int) -> torch.Tensor:
    """Long[T] blocks of one row (see `token_blocks`)."""
    T = target.shape[0]
    block = torch.zeros(T, dtype=torch.long)
    unit, key = 0, None  # the current block and its (region start, part of the region)
    region, run = -1, 0  # the current target region's first position, and the position within it
    prev_target, prev_image, last_target = False, False, -1
    for i in range(prefix, T):
        if not bool(target[i]):
            prev_target = False
            continue
        is_image = int(image_index[i]) >= 0
        if not prev_target or is_image != prev_image or (is_image and int(image_index[i]) == 0):
            region, run = i, 0  # a new region: after a gap, at a change of modality, or a new image
        else:
            run += 1
        if is_image:
            part = int(image_index[i]) // (rows * width) if rows else 0
        else:
            part = run // block_size if block_size else 0
        if (region, part) != key:
            unit, key = unit + 1, (region, part)
        block[i] = unit
        prev_target, prev_image, last_target = True, is_image, i
    # the given positions after the prompt join the block of the next target; those after the last, the last block
    nxt = unit
    for i in range(T - 1, prefix - 1, -1):
        if bool(target[i]):
            nxt = int(block[i])
        elif i > last_target:
            block[i] = unit
        else:
            block[i] = nxt
    return block.to(target.device)
