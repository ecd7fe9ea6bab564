"""Block diffusion's blocks: `mmdlm.blocks.token_blocks` on the real templates; the transformer's block-causal
attention (one target block is prefix attention exactly, one block per position is causal attention, a finished
block's keys and values in the KV cache give the logits of a full recompute); the vectorised training loss (one
forward over the noisy and clean copies equals a forward per block; one block is the prefix-attention loss).

    python -m pytest -q tests/test_blocks.py
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmdlm.blocks import token_blocks
from mmdlm.diffusion import masked_diffusion_loss
from mmdlm.model import ModelConfig, Transformer, attention_blocks
from mmdlm.sequence import Batch, Layout, caption_prompt, collate, t2i_prompt, vqa_prompt
from mmdlm.vocab import Vocab

VOCAB = Vocab(text_size=24, codebook_size=16)
GRID = 4  # 4x4 image tokens
LAYOUT = Layout(caption_len=8, question_len=4, answer_len=3, text_len=12, qa_per_sample=2)


def codes(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB.codebook_size, (GRID, GRID), generator=torch.Generator().manual_seed(seed))


def blocks(batch: Batch, **kw) -> torch.Tensor:
    return token_blocks(batch.target, batch.pad, batch.image_index, batch.prefix, grid_width=GRID, **kw)


def test_a_caption_is_cut_into_blocks_after_the_prompt() -> None:
    batch = collate([caption_prompt(codes(0), VOCAB, LAYOUT)], VOCAB)
    block = blocks(batch, block_size=3)[0]  # (T,)
    p = int(batch.prefix[0])
    assert bool((block[:p] == 0).all())
    assert block[p:].tolist() == [1, 1, 1, 2, 2, 2, 3, 3]  # 8 caption tokens in blocks of 3
    assert blocks(batch)[0, p:].tolist() == [1] * 8  # block_size 0: the region whole


def test_an_image_is_cut_into_bands_of_rows_and_eoi_joins_the_last() -> None:
    batch = collate([t2i_prompt([1, 2, 3], VOCAB, LAYOUT, GRID * GRID)], VOCAB)
    block = blocks(batch, image_block_rows=2)[0]
    image = batch.image_index[0] >= 0
    assert block[image].tolist() == [1] * 8 + [2] * 8  # 4x4 grid, bands of 2 rows
    assert bool((block[: int(batch.prefix[0])] == 0).all())
    after = torch.arange(len(block)) > int(image.nonzero().max())
    assert bool((block[after & ~batch.pad[0]] == 2).all())  # <eoi> after the image joins the last band


def test_a_question_joins_the_answer_it_precedes() -> None:
    batch = collate([vqa_prompt(codes(1), [[1, 2, 3], [4, 5]], VOCAB, LAYOUT)], VOCAB)
    block, target = blocks(batch, block_size=2)[0], batch.target[0]
    cols = target.nonzero().squeeze(1)
    first, second = cols[: LAYOUT.answer_len], cols[LAYOUT.answer_len :]
    assert block[first].tolist() == [1, 1, 2] and block[second].tolist() == [3, 3, 4]
    between = torch.arange(int(first[-1]) + 1, int(second[0]))  # the second question and its <sep>
    assert bool((block[between] == 3).all())
    assert bool((blocks(batch, one_block=True)[0] == (torch.arange(len(block)) >= int(batch.prefix[0])).long()).all())


def test_bad_sizes_are_refused() -> None:
    batch = collate([caption_prompt(codes(0), VOCAB, LAYOUT)], VOCAB)
    with pytest.raises(ValueError, match="block_size"):
        blocks(batch, block_size=-1)


def tiny(shift: bool, prefix_attention: bool = False) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=VOCAB.size, n_layer=2, n_head=2, n_embd=32, max_seq_len=64,
                         image_tokens=GRID * GRID, codebook_size=VOCAB.codebook_size, image_offset=VOCAB.image_offset,
                         shift_logits=shift, prefix_attention=prefix_attention)
    return Transformer(config).eval()


def batch_of_tasks() -> Batch:
    return collate([caption_prompt(codes(2), VOCAB, LAYOUT), t2i_prompt([4, 5], VOCAB, LAYOUT, GRID * GRID),
                    vqa_prompt(codes(3), [[1, 2], [3]], VOCAB, LAYOUT)], VOCAB)


@pytest.mark.parametrize("shift", [False, True])
def test_one_target_block_is_prefix_attention_exactly(shift: bool) -> None:
    model, batch = tiny(shift, prefix_attention=True), batch_of_tasks()
    kw = {"pad": batch.pad, "image_index": batch.image_index}
    with torch.no_grad():
        prefix = model(batch.ids, prefix=batch.prefix, **kw)
        block = model(batch.ids, block=blocks(batch, one_block=True), **kw)
        full = model(batch.ids, **kw)
    assert torch.equal(block, prefix)
    assert not torch.allclose(block, full, atol=1e-4)  # the blocks do hide something


def test_one_block_per_position_is_causal_attention() -> None:
    model, batch = tiny(shift=False), batch_of_tasks()
    T = batch.ids.shape[1]
    kw = {"pad": batch.pad, "image_index": batch.image_index}
    with torch.no_grad():
        torch.testing.assert_close(model(batch.ids, block=torch.arange(T).expand(len(batch), T), **kw),
                                   model(batch.ids, causal=True, **kw), rtol=0, atol=1e-6)


def test_attention_blocks_move_one_position_left_for_a_shifted_head() -> None:
    block = torch.tensor([[0, 0, 1, 1, 2, 2]])
    assert attention_blocks(block, shift=False).tolist() == block.tolist()
    assert attention_blocks(block, shift=True).tolist() == [[0, 1, 1, 2, 2, 2]]


@pytest.mark.parametrize("shift", [False, True])
def test_finished_blocks_in_the_kv_cache_give_the_full_recompute(shift: bool) -> None:
    """Feed a sequence block by block (attention blocks, so each chunk's keys are final once it is fed): the
    logits of every chunk equal those of one forward over the whole sequence."""
    model, batch = tiny(shift), batch_of_tasks()
    block = blocks(batch, block_size=3, image_block_rows=2)  # (B, T)
    kw = {"pad": batch.pad, "image_index": batch.image_index}
    with torch.no_grad():
        full = model(batch.ids, block=block, **kw)  # (B, T, V)
        for b in range(len(batch)):  # one row at a time: the chunks are the row's own blocks
            att = attention_blocks(block[b : b + 1], shift)[0]  # (T,)
            cache = model.new_cache(1, batch.ids.shape[1])
            for unit in att.unique().tolist():
                at = (att == unit).nonzero().squeeze(1)
                lo, hi = int(at[0]), int(at[-1]) + 1
                assert cache.length == lo and hi - lo == len(at)  # a block is one contiguous chunk
                got = model(batch.ids[b : b + 1, lo:hi], pad=batch.pad[b : b + 1, lo:hi],
                            image_index=batch.image_index[b : b + 1, lo:hi], cache=cache, block=block[b : b + 1])
                if not shift:  # a shifted head reads position i's logits at i - 1: the chunk's first needs the last
                    torch.testing.assert_close(got[0], full[b, lo:hi], rtol=0, atol=1e-5)
                else:
                    torch.testing.assert_close(got[0, 1:], full[b, lo + 1 : hi], rtol=0, atol=1e-5)


class Recording(torch.nn.Module):
    """The real model, keeping the inputs of its last call and returning the logits of every position too."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def forward(self, ids, pad=None, image_index=None, *, logits_at=None, block=None, clean=None, prefix=None):
        self.ids, self.block, self.clean = ids.clone(), block, clean
        self.logits = self.model(ids, pad, image_index, block=block, clean=clean, prefix=prefix)  # (B, T, V)
        return self.logits[logits_at] if logits_at is not None else self.logits


def train_batch() -> Batch:
    """Training rows: the targets hold the truth (a caption, a text-to-image image, two VQA answers)."""
    batch = batch_of_tasks()
    truth = torch.randint(0, VOCAB.text_size, batch.ids.shape, generator=torch.Generator().manual_seed(5))
    image = torch.randint(0, VOCAB.codebook_size, batch.ids.shape, generator=torch.Generator().manual_seed(6))
    truth = torch.where(batch.image_index >= 0, image + VOCAB.image_offset, truth)  # (B, T)
    return dataclasses.replace(batch, ids=torch.where(batch.target, truth, batch.ids))


@pytest.mark.parametrize("shift", [False, True])
def test_the_vectorised_block_loss_equals_a_loop_over_blocks(shift: bool) -> None:
    """One forward over [noisy | clean] scores every block as a forward of its own would, given the clean blocks
    before it and its own noisy tokens (the later blocks hidden by the block-causal mask)."""
    model, batch = Recording(tiny(shift)), train_batch()
    block = blocks(batch, block_size=3, image_block_rows=2)  # (B, T)
    out = masked_diffusion_loss(model, batch, VOCAB, generator=torch.Generator().manual_seed(0), block=block)
    assert out.num_tokens > 0 and torch.isfinite(out.loss)
    noisy, logits = model.ids, model.logits  # (B, T), (B, T, V) of the two-stream forward
    assert model.clean is not None and torch.equal(model.clean, batch.ids)
    att = attention_blocks(block, shift)  # (B, T)
    assert bool((noisy[att != block] == batch.ids[att != block]).all())  # a block's context position is clean
    kw = {"pad": batch.pad, "image_index": batch.image_index}
    with torch.no_grad():
        for unit in range(1, int(block.max()) + 1):
            own = torch.where(att < unit, batch.ids, noisy)  # clean before the block, its own noisy tokens
            alone = model.model(own, block=block, **kw)  # (B, T, V), one stream
            at = (block == unit) & batch.target  # the tokens of this block, scored where the head reads them
            torch.testing.assert_close(logits[at], alone[at], rtol=0, atol=1e-5)


def test_one_target_block_trains_as_prefix_attention_exactly() -> None:
    """With every target in one block the block loss is today's prefix-attention loss, bit for bit."""
    model, batch = tiny(shift=True, prefix_attention=True), train_batch()
    one = blocks(batch, one_block=True)
    a = masked_diffusion_loss(model, batch, VOCAB, generator=torch.Generator().manual_seed(3), block=one)
    b = masked_diffusion_loss(model, batch, VOCAB, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.loss, b.loss) and torch.equal(a.nll, b.nll)


def test_blocks_are_noised_at_their_own_times() -> None:
    batch = train_batch()
    block = blocks(batch, block_size=3, image_block_rows=2)
    units = int(block.max())
    t = torch.linspace(0.05, 0.95, units).repeat(len(batch), 1)  # (B, U): early blocks barely masked
    model = Recording(tiny(shift=False))
    masked_diffusion_loss(model, batch, VOCAB, generator=torch.Generator().manual_seed(1), t=t, block=block)
    masked = (model.ids == VOCAB.mask) & batch.target  # (B, T)
    early, late = masked[(block == 1) & batch.target], masked[(block >= units - 1) & batch.target]
    assert early.float().mean() < late.float().mean()
    with pytest.raises(ValueError, match="paired"):
        masked_diffusion_loss(model, batch, VOCAB, block=block, paired=True)


def reference_blocks(target, image_index, prefix: int, block_size: int, rows: int, width: int) -> list[int]:
    """One row's blocks, position by position (what `token_blocks` computes at once)."""
    T = len(target)
    block = [0] * T
    unit, key, region, run, prev_target, prev_image, last_target = 0, None, -1, 0, False, False, -1
    for i in range(prefix, T):
        if not target[i]:
            prev_target = False
            continue
        is_image = image_index[i] >= 0
        if not prev_target or is_image != prev_image or (is_image and image_index[i] == 0):
            region, run = i, 0
        else:
            run += 1
        part = (image_index[i] // (rows * width) if rows else 0) if is_image else (run // block_size if block_size
                                                                                    else 0)
        if (region, part) != key:
            unit, key = unit + 1, (region, part)
        block[i], prev_target, prev_image, last_target = unit, True, is_image, i
    nxt = unit
    for i in range(T - 1, prefix - 1, -1):
        if target[i]:
            nxt = block[i]
        else:
            block[i] = unit if i > last_target else nxt
    return block


@pytest.mark.parametrize("sizes", [(0, 0), (1, 1), (2, 1), (3, 2), (5, 4)])
def test_token_blocks_equal_a_position_by_position_reference_on_random_layouts(sizes: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(sum(sizes))
    B, T = 16, 40
    target = torch.rand(B, T, generator=g) < 0.6
    pad = torch.rand(B, T, generator=g) < 0.1
    image = torch.rand(B, T, generator=g) < 0.4
    image_index = torch.where(image, torch.randint(0, GRID * GRID, (B, T), generator=g), -1)
    image_index[:, 20:36] = torch.arange(16)  # one whole image per row too
    prefix = torch.randint(0, 10, (B,), generator=g)
    got = token_blocks(target, pad, image_index, prefix, block_size=sizes[0], image_block_rows=sizes[1],
                       grid_width=GRID)
    for b in range(B):
        want = reference_blocks((target[b] & ~pad[b]).tolist(), image_index[b].tolist(), int(prefix[b]), *sizes,
                                GRID)
        assert got[b].tolist() == want, b
