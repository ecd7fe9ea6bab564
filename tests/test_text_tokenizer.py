"""Text tokenizers: BPE training and exact round trips, reload, transformers interop, open_clip offline."""

import pytest

from mmdlm.text_tokenizer import BPETokenizer, CLIPTokenizer, load_text_tokenizer

CORPUS = [
    "a large red circle at the top left and a small blue square in the middle",
    "what color is the circle?", "red", "what shape is at the top left?", "circle",
    "how many shapes are there?", "two", "is there a green triangle?", "no",
    "a small yellow cross at the bottom right", "where is the red circle?", "top left",
    "a handwritten digit seven", "what digit is this?", "is this digit even?",
] * 5


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=300)


def test_bpe_round_trip_exact(bpe: BPETokenizer) -> None:
    assert bpe.vocab_size <= 300
    for s in CORPUS[:15] + ["An unseen Sentence, with CAPS & 123!", "  two  spaces ", ""]:
        ids = bpe.encode(s)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == s


def test_bpe_compresses_seen_text(bpe: BPETokenizer) -> None:
    s = "a large red circle at the top left"
    assert len(bpe.encode(s)) < len(s) / 2


def test_bpe_reload_identical_ids_and_transformers(bpe: BPETokenizer, tmp_path) -> None:
    from transformers import PreTrainedTokenizerFast

    bpe.save(tmp_path / "tok")
    again = load_text_tokenizer(tmp_path / "tok")
    hf = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tok" / "tokenizer.json"))
    for s in CORPUS[:15]:
        assert again.encode(s) == bpe.encode(s)
        assert hf.encode(s, add_special_tokens=False) == bpe.encode(s)
        assert hf.decode(bpe.encode(s)) == s
    assert again.vocab_size == bpe.vocab_size
    # a tokenizer.json file path works too
    assert load_text_tokenizer(tmp_path / "tok" / "tokenizer.json").encode("red") == bpe.encode("red")


def test_open_clip_backend_offline(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    clip = CLIPTokenizer()
    assert clip.vocab_size == 49408
    ids = clip.encode("a large red circle")
    assert len(ids) == 4
    assert clip.decode(ids) == "a large red circle"
    clip.save(tmp_path / "clip")
    assert load_text_tokenizer(tmp_path / "clip").encode("a large red circle") == ids
    assert load_text_tokenizer("open_clip").vocab_size == 49408


def test_bad_path_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_text_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_text_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        load_text_tokenizer(bad)
