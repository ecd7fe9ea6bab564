"""Block diffusion's blocks: `mmdlm.blocks.token_blocks` on the real templates, and the transformer's block-causal
attention: one target block is prefix attention exactly, one block per position is causal attention, and a
finished block's keys and values in the KV cache give the logits of a full recompute.

    python -m pytest -q tests/test_blocks.py
"""

from __future__ import annotations

import pytest
import torch

from mmdlm.blocks import token_blocks
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
