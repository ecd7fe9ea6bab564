"""Reading images: encoded bytes -> FloatTensor[3, S, S] in [0, 1], and the images of webdataset shards.

`load_image` is the one decoding every image goes through before a tokenizer sees it: the model's data path
(`mmdlm.data`) and the patch tokenizer's fit (`python -m vision.patch_tokenizer --shards ...`) both call it,
so the dictionary is fitted on exactly the pixels the model later encodes. Any PIL mode becomes RGB
(transparency composited onto black, the background of the shapes and digits worlds); the shorter side is
resized to S (bicubic, antialiased, as torchvision's `Resize`) and the centre cropped; an image that already
has the size is left untouched, so palette colours stay exact.

`shard_images` reads shards with webdataset directly (no captions, QA or codes: only the image member), so
`vision` needs nothing of mmdlm. A sample whose image is missing or unreadable, or a tar entry that cannot be
read, is skipped with a warning and counted (webdataset's `handler=` style), never fatal.

    for image in shard_images("data/shards/shapes/train/*.tar", image_size=32):  # (3, 32, 32) each
        ...
"""

from __future__ import annotations

import glob
import io
import logging
import os
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache

import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp")  # a sample's image member: tried in this order
ALPHA_BACKGROUND = (0, 0, 0)  # transparent pixels become black: the shapes and digits worlds' background


@lru_cache(maxsize=8)
def _resize_crop(image_size: int):
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(image_size),
    ])


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited onto ALPHA_BACKGROUND."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(data: bytes, image_size: int) -> torch.Tensor:
    """Encoded image bytes -> FloatTensor[3, image_size, image_size] in [0,1].

    Shorter side resized to image_size (bicubic, antialiased), then centre-cropped; an image that
    already has the size is left untouched, so palette colours stay exact.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decode now: garbage or truncated bytes fail here, not later
        return image_to_tensor(image, image_size)


def image_to_tensor(image: Image.Image, image_size: int) -> torch.Tensor:
    """A PIL image -> FloatTensor[3, image_size, image_size] in [0,1], as `load_image` decodes (the pipeline's
    user images go through it too, so inference sees the pixels training saw)."""
    from torchvision.transforms.functional import pil_to_tensor

    rgb = to_rgb(image)
    if rgb.size != (image_size, image_size):
        rgb = _resize_crop(image_size)(rgb)
    return pil_to_tensor(rgb).float().div_(255)  # (3, H, W)


def shard_paths(pattern: str) -> list[str]:
    """Shard paths of a glob (`data/x/*.tar`), a brace pattern (`a-{000..009}.tar`) or a folder (its *.tar),
    in order; FileNotFoundError naming the pattern when a part of it matches nothing."""
    from braceexpand import braceexpand

    paths: list[str] = []
    for item in braceexpand(pattern):
        path = os.path.expanduser(item)
        if glob.has_magic(path):
            found = sorted(glob.glob(path))
        elif os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(path, "*.tar")))
        else:
            found = [path] if os.path.exists(path) else []
        if not found:
            what = "matches no files" if item == pattern else f"names a missing shard {item!r}"
            raise FileNotFoundError(f"shard pattern {pattern!r} {what}")
        paths += found
    return list(dict.fromkeys(paths))  # de-duplicated, order kept


def shard_images(pattern: str, image_size: int, skipped: Counter | None = None) -> Iterator[torch.Tensor]:
    """Each readable image of the shards matching `pattern`, in shard order: FloatTensor[3, S, S] in [0, 1].

    Skipped samples are counted in `skipped` by reason: `tar` (an unreadable entry), `no_image`, `image`.
    """
    import webdataset as wds

    skipped = skipped if skipped is not None else Counter()

    def handler(exn: Exception) -> bool:
        skipped["tar"] += 1
        log.warning("skipped an unreadable tar entry: %r", exn)
        return True

    dataset = wds.WebDataset(shard_paths(pattern), shardshuffle=False, handler=handler, empty_check=False)
    for sample in dataset:
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            skipped["no_image"] += 1
            log.warning("skipped %s: no image member (has %s)", sample.get("__key__"), sorted(sample))
            continue
        try:
            image = load_image(sample[ext], image_size)
        except Exception as err:  # noqa: BLE001 (PIL raises OSError, SyntaxError, ValueError, ...)
            skipped["image"] += 1
            log.warning("skipped %s: unreadable %s (%r)", sample.get("__key__"), ext, err)
            continue
        yield image
