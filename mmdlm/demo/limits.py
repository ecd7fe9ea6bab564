"""The web demo's limits on user inputs and the checks that apply them, each failing with one `InputError`
sentence before anything decodes an image or tokenizes text: text length and Unicode, slider numbers, and
uploaded images (format and size read from the header).
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from mmdlm import inputs
from mmdlm.inputs import InputError

MAX_TEXT_CHARS = 1000  # a prompt or question; the model reads a few dozen tokens, so none that fits is longer
MAX_SIDE = 4096
MAX_PIXELS = MAX_SIDE * MAX_SIDE  # an image's width * height (16.8 Mpx: 50 MB as RGB), checked before decoding
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # what PIL may open; no EPS (Ghostscript) or the like


class TooLarge(InputError):
    """An image over the demo's pixel limit."""


def check_text(value: object, what: str, allow_empty: bool = False) -> str:
    """`value` as text of at most MAX_TEXT_CHARS characters, then `mmdlm.inputs.check_text` (the commands'
    own check: a string of valid Unicode, not blank unless `allow_empty`); None (an empty text box) is ""."""
    if value is None:
        value = ""
    if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
        raise InputError(f"the {what} is {len(value)} characters long; the demo accepts at most {MAX_TEXT_CHARS}")
    return inputs.check_text(value, what, allow_empty=allow_empty)


def check_number(value: object, what: str, low: float, high: float, integer: bool = False) -> Any:
    """`value` as a number in [low, high] (an int when `integer`)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"{what} must be a number, got {value[:20]!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        raise InputError(f"{what} must be a number, got {type(value).__name__}")
    if integer:
        if value != int(value):
            raise InputError(f"{what} must be a whole number, got {value}")
        value = int(value)
    if not low <= value <= high:
        raise InputError(f"{what} must be between {low} and {high}, got {value}")
    return value


def image_path(value: object) -> str | None:
    """The file behind an image input: a path, or Gradio's file payload ({"path": ...}) when the event
    skips preprocessing."""
    if isinstance(value, dict):
        value = value.get("path")
    if isinstance(value, str | Path):
        return str(value)
    return None


def open_image(value: object, what: str = "image", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An uploaded image as RGB: its format and size are read from the header and checked before decoding."""
    if value is None or value == {}:
        raise InputError(f"there is no {what}: upload one first")
    if isinstance(value, Image.Image):
        im: Image.Image = value
    else:
        path = image_path(value)
        if path is None:
            raise InputError(f"the {what} must be an uploaded file, got {type(value).__name__}")
        try:
            with warnings.catch_warnings():  # PIL warns above its own limit; the check below decides instead
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(path, formats=IMAGE_FORMATS)  # lazy: reads the header only
        except Image.DecompressionBombError as err:  # PIL's hard limit (2x its own) is reached at open
            count = re.search(r"\((\d+) pixels\)", str(err))  # "Image size (N pixels) exceeds limit of ..."
            raise TooLarge(f"the {what} has {count.group(1) + ' pixels' if count else 'too many pixels'}; "
                           f"the demo accepts at most {max_pixels} ({MAX_SIDE} x {MAX_SIDE})") from err
        except (OSError, ValueError) as err:
            raise InputError(f"the {what} is not a readable image (the demo reads {', '.join(IMAGE_FORMATS)})"
                             ) from err
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise TooLarge(f"the {what} is {width} x {height} = {width * height} pixels; "
                           f"the demo accepts at most {max_pixels} ({MAX_SIDE} x {MAX_SIDE})")
        try:
            return im.convert("RGB")
        except (OSError, ValueError, SyntaxError) as err:  # a truncated or corrupt body behind a valid header
            raise InputError(f"the {what} is not a readable image: {str(err).splitlines()[0] if str(err) else err}"
                             ) from err
