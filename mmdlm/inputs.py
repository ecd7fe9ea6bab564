"""The inputs every mmdlm command checks before it loads a model: exit statuses, `InputError` (a bad input in one
sentence), and the readers of a model folder, an image and user text, shared by `mmdlm vqa`, `caption`,
`generate`, `infill` and the demo, so each input is refused with the same sentence everywhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

if TYPE_CHECKING:  # torch and the pipeline load lazily so `--help` and argument errors answer at once
    from mmdlm.pipeline import MMDLMPipeline

EXIT_OK, EXIT_USAGE, EXIT_SKIPPED, EXIT_NO_ANSWER = 0, 2, 3, 4


class InputError(ValueError):
    """A bad input, reported in one sentence (never with a traceback)."""


MODEL_HELP = "model folder (written by mmdlm.commands.export)"
DEVICE_HELP = "cpu, cuda, ... (default: cuda if available)"


def add_model_argument(parser: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    """--model: the model folder to load (required)."""
    parser.add_argument("--model", required=True, help=help)


def add_device_argument(parser: argparse.ArgumentParser, default: str | None = None, help: str = DEVICE_HELP
                        ) -> None:
    """--device: the torch device to run on (None: cuda if available)."""
    parser.add_argument("--device", default=default, help=help)


def add_model_arguments(parser: argparse.ArgumentParser, verbose: bool = True) -> None:
    """The flags every sampling command takes: --model, --seed, --device (and -v/--verbose)."""
    add_model_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    add_device_argument(parser)
    if verbose:
        parser.add_argument("-v", "--verbose", action="store_true", help="print NFE and time on stderr")


def add_revision_arguments(parser: argparse.ArgumentParser, best_of: bool = False) -> None:
    """Revision flags: --draft AR_MODEL (hybrid decoding), --revise; --best-of N for images."""
    group = parser.add_argument_group("revision")
    group.add_argument("--draft", metavar="AR_MODEL", help="hybrid decoding: this model folder (the AR twin, same "
                       "vocabulary) drafts with its KV cache; --model judges the tokens the drafter was unsure of "
                       "and rewrites those it doubts (mmdlm.pipeline.HYBRID_REVISION)")
    group.add_argument("--revise", action="store_true", help="--model checks its own output: each token with itself "
                       "masked; those below p 0.5 that it would now replace (at most 4) are decoded again")
    if best_of:
        group.add_argument("--best-of", type=positive_int, default=1, metavar="N", help="draw N images per prompt and "
                           "keep the one whose prompt --model finds most likely as its caption (N times the cost)")


def revision_options(args: argparse.Namespace) -> dict:
    """The pipeline call's `draft` / `revision` / `best_of` arguments from those flags (loads the draft model)."""
    from mmdlm.sampling.revise import Revision

    options: dict = {}
    if args.draft is not None:
        options["draft"] = load_pipeline(args.draft, args.device)
    if args.revise and args.draft is None:  # with a draft the pipeline's hybrid default applies
        options["revision"] = Revision()
    if getattr(args, "best_of", 1) > 1:
        options["best_of"] = args.best_of
    return options


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: '1,2,4' -> [1, 2, 4] (each >= 1)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def load_pipeline(model: str, device: str | None = None) -> MMDLMPipeline:
    """`MMDLMPipeline.from_pretrained`, with any failure turned into one `InputError` sentence."""
    from mmdlm.pipeline import MMDLMPipeline

    if not Path(model).is_dir():
        raise InputError(f"model folder {model!r} does not exist")
    try:
        return MMDLMPipeline.from_pretrained(model, device=device)
    except Exception as err:  # a loading boundary: missing files, bad config, mismatched weights, ...
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"cannot load the model from {model!r}: {first_line}") from err


def load_image(path: str | Path) -> Image.Image:
    """An RGB image from a file, or an `InputError` saying why not."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise InputError(f"cannot read image {str(path)!r}: {err}") from err


def check_text(text: object, what: str, allow_empty: bool = True) -> str:
    """`text` unchanged, or an `InputError` if it is not a string, not valid UTF-8 text, or (unless
    `allow_empty`) blank. A lone surrogate (a JSON "\\ud800") or a byte that is not UTF-8 (which Python hands
    over from argv or a file as a surrogate escape, U+DC80..U+DCFF) cannot be tokenized."""
    if not isinstance(text, str):
        raise InputError(f"the {what} must be text, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        bad = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"the lone surrogate U+{code:04X}"
        raise InputError(f"the {what} is not valid UTF-8 text (character {err.start + 1} is {bad})") from None
    if not allow_empty and not text.strip():
        raise InputError(f"the {what} is empty")
    return text


def check_question(question: object, what: str = "question") -> str:
    """A non-empty question of valid text, or an `InputError` saying what is wrong with it."""
    if not isinstance(question, str):
        raise InputError(f"the {what} must be a string, got {type(question).__name__}")
    return check_text(question, what, allow_empty=False)
