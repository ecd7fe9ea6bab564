"""The joint token layout: disjoint ranges, round trips, modality masks."""

import pytest
import torch

from mmdlm.vocab import SPECIALS, Modality, Vocab


@pytest.fixture
def vocab() -> Vocab:
    return Vocab(text_size=100, codebook_size=32)


def test_ranges_disjoint_and_cover_every_id_once(vocab: Vocab) -> None:
    ids = torch.arange(vocab.size)
    kinds = vocab.is_text(ids).long() + vocab.is_image(ids).long() + vocab.is_special(ids).long()
    assert torch.equal(kinds, torch.ones_like(kinds))  # each id in exactly one range
    assert int(vocab.is_text(ids).sum()) == 100
    assert int(vocab.is_image(ids).sum()) == 32
    assert int(vocab.is_special(ids).sum()) == len(SPECIALS)
    specials = [vocab.special(s) for s in SPECIALS]
    assert len(set(specials)) == len(SPECIALS)
    assert vocab.size == 100 + 32 + len(SPECIALS)


def test_mask_never_in_codebook_or_text(vocab: Vocab) -> None:
    m = torch.tensor([vocab.mask])
    assert not vocab.is_image(m).item() and not vocab.is_text(m).item()


def test_image_code_round_trip(vocab: Vocab) -> None:
    codes = torch.randint(0, 32, (4, 8, 8))
    ids = vocab.image_to_token(codes)
    assert bool(vocab.is_image(ids).all())
    assert torch.equal(vocab.token_to_image(ids), codes)


def test_image_code_out_of_range_is_an_error(vocab: Vocab) -> None:
    with pytest.raises(ValueError, match="image codes"):
        vocab.image_to_token(torch.tensor([32]))
    with pytest.raises(ValueError, match="outside the image-code range"):
        vocab.token_to_image(torch.tensor([5]))


def test_allowed_masks(vocab: Vocab) -> None:
    img = vocab.allowed(Modality.IMAGE)
    txt = vocab.allowed(Modality.TEXT)
    ids = torch.arange(vocab.size)
    assert torch.equal(img, vocab.is_image(ids))
    assert torch.equal(txt, vocab.is_text(ids) | (ids == vocab.eos))
    assert not bool(txt[vocab.mask]) and not bool(img[vocab.mask])
    table = vocab.allowed_table()
    assert torch.equal(table[int(Modality.IMAGE)], img)


def test_text_ids_only_stops_at_eos(vocab: Vocab) -> None:
    assert vocab.text_ids_only([5, 7, vocab.pad, 9, vocab.eos, 3]) == [5, 7, 9]


def test_bad_sizes_and_unknown_special() -> None:
    with pytest.raises(ValueError):
        Vocab(0, 10)
    with pytest.raises(KeyError, match="unknown special"):
        Vocab(10, 10).special("<nope>")
