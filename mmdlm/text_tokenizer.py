"""Text tokenizers for mmdlm: one small interface, three back ends.

- `BPETokenizer`: a byte-level BPE trained here with HF `tokenizers` on captions/questions/answers
  (small vocab, default 1024, so tiny models are fast); saved as a standard `tokenizer.json` that
  `transformers.PreTrainedTokenizerFast(tokenizer_file=...)` also loads.
- `BPETokenizer.from_file`: any local HF `tokenizer.json` (or a folder holding one) works the same way.
- `CLIPTokenizer`: open_clip's bundled CLIP BPE (ships inside the pip package, no network).

The model's special tokens (`<mask>`, `<eos>`, ...) live in `mmdlm.vocab`, not here: text ids are
`[0, vocab_size)` and the tokenizer never adds specials of its own.

Text that is not valid Unicode (a lone surrogate such as JSON's `"\ud800"`) cannot be tokenized:
`encode` raises `InvalidText` (a `UserError`, so a `ValueError`) naming it, never a bare TypeError.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from mmdlm.errors import UserError

META_FILE = "text_tokenizer.json"  # which back end a saved folder holds


class InvalidText(UserError):
    """Text that no tokenizer can encode: it is not valid Unicode (a lone surrogate)."""


def check_text(text: str) -> str:
    """`text` itself if it is valid Unicode (encodable as UTF-8); else raise InvalidText naming where."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InvalidText(f"text {text!r:.60} is not valid Unicode ({err.reason} at character {err.start})") from None
    return text


@runtime_checkable
class TextTokenizer(Protocol):
    """What mmdlm needs from a text tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def save(self, directory: str | Path) -> Path: ...


class BPETokenizer:
    """A HF `tokenizers.Tokenizer` (byte-level BPE trained here, or any local `tokenizer.json`)."""

    kind = "hf"

    def __init__(self, tokenizer) -> None:  # tokenizers.Tokenizer
        self.tok = tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 1024, min_frequency: int = 1) -> BPETokenizer:
        """Train a byte-level BPE on an iterator of strings; `decode(encode(s)) == s` for any string."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """Load a `tokenizer.json` file, or a folder that holds one."""
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer found at {str(path)!r}: expected a tokenizer.json file "
                                    "or a folder containing one")
        try:
            return cls(Tokenizer.from_file(str(file)))
        except Exception as err:  # tokenizers raises a bare Exception on malformed json
            raise ValueError(f"{str(file)!r} is not a valid HF tokenizer.json: {err}") from err

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(check_text(text), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(directory / "tokenizer.json"))
        (directory / META_FILE).write_text(json.dumps({"kind": self.kind}))
        return directory


class CLIPTokenizer:
    """open_clip's CLIP BPE (49,408 ids), bundled with the `open_clip_torch` package."""

    kind = "open_clip"

    def __init__(self) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.tok = SimpleTokenizer()

    @property
    def vocab_size(self) -> int:
        return len(self.tok.encoder)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(check_text(text))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids)).strip()

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).write_text(json.dumps({"kind": self.kind}))
        return directory


def load_text_tokenizer(path: str | Path) -> TextTokenizer:
    """Load a text tokenizer from a local path.

    `path` is a folder saved by `save`, a HF tokenizer folder or `tokenizer.json` file, or the
    literal `open_clip` for CLIP's bundled BPE.
    """
    if str(path) == "open_clip":
        return CLIPTokenizer()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text tokenizer path {str(path)!r} does not exist")
    meta = path / META_FILE
    if path.is_dir() and meta.is_file() and json.loads(meta.read_text()).get("kind") == "open_clip":
        return CLIPTokenizer()
    return BPETokenizer.from_file(path)


def texts_of_record(record: dict) -> list[str]:
    """Every string a record holds that the model reads or writes: captions, questions, answers."""
    texts = list(record.get("captions", []))
    for qa in record.get("qa", []):
        texts += [qa["question"], qa["answer"]]
    return texts


def main(argv: list[str] | None = None) -> None:
    """Train a byte-level BPE on the captions and QA of webdataset shards and save it as a folder.

    python -m mmdlm.text_tokenizer --shards 'data/shards/shapes/train/*.tar' --out runs/tok --vocab-size 512
    """
    import argparse

    from mmdlm.data import expand_shards, record_pipeline

    parser = argparse.ArgumentParser(prog="python -m mmdlm.text_tokenizer", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="glob / brace pattern of the training shards")
    parser.add_argument("--out", required=True, help="folder to write tokenizer.json into")
    parser.add_argument("--vocab-size", type=int, default=1024,
                        help="BPE vocab size (small: fast tiny models)")
    parser.add_argument("--max-records", type=int, default=50_000, help="read at most this many records")
    args = parser.parse_args(argv)
    if args.vocab_size < 257:
        parser.error(f"--vocab-size must be at least 257 (256 byte symbols + merges), got {args.vocab_size}")
    try:
        urls = expand_shards(args.shards)
    except FileNotFoundError as err:
        parser.exit(2, f"error: {err}\n")

    def texts() -> Iterable[str]:
        for i, record in enumerate(record_pipeline(urls, load_images=False, load_codes=False)):
            if i >= args.max_records:
                break
            yield from texts_of_record(record)

    tok = BPETokenizer.train(texts(), vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"trained a byte-level BPE with {tok.vocab_size} ids on {args.shards} -> {args.out}/tokenizer.json")


if __name__ == "__main__":
    main()
