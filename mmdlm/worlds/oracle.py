"""The shapes oracle: reads a scene graph back from pixels, to score text-to-image generation.

Per cell of the 3x3 grid: the non-background pixels are the object (if there are enough of them);
its colour is the majority vote of each pixel's nearest palette colour (robust to the small colour
errors of a VQ decoder); its shape and size are those of the best-matching template (the 8 exact
renders of shape x size at that cell, tried at +-1 px offsets), by intersection over union. A best
IoU below `min_iou` reads as shape "unknown" (never scored correct): a blob is not a shape.

`validate()` measures the oracle on ground-truth renders (it must read >= 99% of objects exactly);
`score_image()` compares an image with the scene graph it was generated from.

    python -m mmdlm.worlds.oracle --validate              # accuracy on ground-truth renders, 32 and 64 px
    python -m mmdlm.worlds.oracle --read runs/sample.png  # the scene graph and caption an image shows
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image

from mmdlm.worlds.shapes import (
    COLORS,
    SHAPES,
    SIZES,
    caption,
    cell_bounds,
    make_object,
    render,
    sample_scene,
    scene_key,
)

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # (8, 3)
_COLOR_NAMES = list(COLORS)


@dataclass(frozen=True)
class OracleConfig:
    """Thresholds of the oracle."""

    # a pixel belongs to an object when its brightest channel exceeds this (every palette colour has a
    # 255 channel, the background is 0: the midpoint tolerates heavy decoder noise either way)
    background_threshold: int = 128
    # a cell holds an object when it has at least this share of the smallest template's pixels
    # (the small cross: 9 px at 32): a few stray decoder pixels are not an object
    min_fraction: float = 0.5
    # best template IoU below this reads as shape "unknown": blobs and fragments never score
    min_iou: float = 0.5
    # templates are tried at offsets up to this many pixels (a decoder may shift edges by one)
    max_shift: int = 1


DEFAULT = OracleConfig()


def to_array(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) from a PIL image, a FloatTensor[3,H,W] in [0,1] or a uint8 (H, W, 3) array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor (3, H, W), got {tuple(image.shape)}")
        return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return np.asarray(image, dtype=np.uint8)


@lru_cache(maxsize=8)
def _templates(image_size: int, max_shift: int) -> tuple[list[tuple[str, str]], list[np.ndarray]]:
    """Per cell: the (shape, size) labels and a bool stack (labels x shifts, h, w) of template masks."""
    labels = [(shape, size) for shape in SHAPES for size in SIZES]
    shifts = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)]
    stacks = []
    for cell in range(9):
        x0, y0, x1, y1 = cell_bounds(cell, image_size)
        masks = []
        for shape, size in labels:
            full = np.asarray(render([make_object("white", shape, size, cell)], image_size))[..., 0] > 0
            masks += [np.roll(full, (dy, dx), axis=(0, 1))[y0:y1, x0:x1] for dy, dx in shifts]
        stacks.append(np.stack(masks).reshape(len(labels), len(shifts), y1 - y0, x1 - x0))
    return labels, stacks


def _min_pixels(image_size: int, cfg: OracleConfig) -> float:
    labels, stacks = _templates(image_size, cfg.max_shift)
    smallest = min(int(stacks[4][i, 0].sum()) for i in range(len(labels)))  # unshifted, middle cell
    return max(2.0, cfg.min_fraction * smallest)


def read_scene(image: Image.Image | torch.Tensor | np.ndarray, image_size: int | None = None,
               config: OracleConfig = DEFAULT) -> list[dict]:
    """The objects an image shows: [{color, shape, size, cell, position}], sorted by cell.

    `image` is a PIL image or a FloatTensor[3,H,W] in [0,1]; a square image of any size (the grid
    scales). With `image_size`, the image is first resized to that side (nearest neighbour).
    """
    pixels = to_array(image)
    if image_size is not None and pixels.shape[:2] != (image_size, image_size):
        pixels = np.asarray(Image.fromarray(pixels).resize((image_size, image_size), Image.NEAREST))
    size = pixels.shape[0]
    if pixels.shape[:2] != (size, size):
        raise ValueError(f"the oracle reads square images, got {pixels.shape[1]}x{pixels.shape[0]}")
    labels, stacks = _templates(size, config.max_shift)
    min_pixels = _min_pixels(size, config)
    foreground = pixels.max(axis=2) > config.background_threshold  # (H, W)
    objects = []
    for cell in range(9):
        x0, y0, x1, y1 = cell_bounds(cell, size)
        mask = foreground[y0:y1, x0:x1]  # (h, w)
        if mask.sum() < min_pixels:
            continue
        colors = pixels[y0:y1, x0:x1][mask].astype(np.float32)  # (n, 3)
        nearest = ((colors[:, None, :] - _PALETTE[None]) ** 2).sum(-1).argmin(1)  # (n,)
        color = _COLOR_NAMES[np.bincount(nearest, minlength=len(_COLOR_NAMES)).argmax()]
        inter = (stacks[cell] & mask).sum(axis=(2, 3))  # (labels, shifts)
        union = (stacks[cell] | mask).sum(axis=(2, 3))
        iou = (inter / np.maximum(union, 1)).max(axis=1)  # (labels,)
        best = int(iou.argmax())
        shape, obj_size = labels[best]
        obj = make_object(color, shape if iou[best] >= config.min_iou else "unknown", obj_size, cell)
        objects.append(obj)
    return objects


def score_image(objects_true: list[dict], image: Image.Image | torch.Tensor | np.ndarray,
                config: OracleConfig = DEFAULT) -> dict:
    """How well an image shows a scene graph.

    Returns `all_correct` (exactly the described objects, each with the right colour, shape, size
    and cell, and nothing else), `count_correct`, per-attribute match rates over the described
    objects (`cell`: an object is read in that cell; `color`/`shape`/`size`: and it has that
    attribute; `object`: all of them), `extra` (objects read in cells the scene leaves empty) and
    `read` (the scene graph read from the image).
    """
    read = read_scene(image, config=config)
    by_cell = {o["cell"]: o for o in read}
    n = max(len(objects_true), 1)
    matches = {"cell": 0, "color": 0, "shape": 0, "size": 0, "object": 0}
    for obj in objects_true:
        got = by_cell.get(obj["cell"])
        if got is None:
            continue
        matches["cell"] += 1
        for field in ("color", "shape", "size"):
            matches[field] += got[field] == obj[field]
        matches["object"] += all(got[f] == obj[f] for f in ("color", "shape", "size"))
    true_cells = {o["cell"] for o in objects_true}
    return {
        "all_correct": scene_key(read) == scene_key(objects_true),
        "count_correct": len(read) == len(objects_true),
        **{field: count / n for field, count in matches.items()},
        "extra": sum(o["cell"] not in true_cells for o in read),
        "read": read,
    }


def validate(n: int = 500, seed: int = 0, image_size: int = 32, max_objects: int = 4,
             config: OracleConfig = DEFAULT) -> float:
    """Fraction of objects read exactly right on `n` ground-truth renders (spurious reads count as errors).

    Scenes have 1..max_objects objects (more than the default world's 2, to exercise neighbours).
    """
    rng = random.Random(f"oracle/{seed}")
    right = total = 0
    for _ in range(n):
        objects = sample_scene(rng, 1, max_objects)
        truth = {o["cell"]: scene_key([o]) for o in objects}
        read = {o["cell"]: scene_key([o]) for o in read_scene(render(objects, image_size), config=config)}
        right += sum(read.get(cell) == key for cell, key in truth.items())
        total += len(truth) + sum(cell not in truth for cell in read)
    return right / total


def main(argv: list[str] | None = None) -> None:
    """Validate the shapes oracle on ground-truth renders, or read the scene an image shows.

    python -m mmdlm.worlds.oracle --validate [--n 500] [--image-size 32 64]
    python -m mmdlm.worlds.oracle --read image.png
    """
    parser = argparse.ArgumentParser(prog="python -m mmdlm.worlds.oracle", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validate", action="store_true", help="print the accuracy on ground-truth renders")
    parser.add_argument("--n", type=int, default=500, help="scenes to validate on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, nargs="+", default=[32, 64], help="sizes to validate at")
    parser.add_argument("--read", metavar="IMAGE", help="print the scene graph read from an image file")
    args = parser.parse_args(argv)
    if not args.validate and not args.read:
        parser.error("nothing to do: pass --validate and/or --read IMAGE")
    if args.validate:
        for size in args.image_size:
            accuracy = validate(args.n, args.seed, size)
            print(f"oracle accuracy at {size} px: {accuracy:.4f} of objects read exactly right "
                  f"({args.n} ground-truth scenes of 1-4 objects)")
    if args.read:
        objects = read_scene(Image.open(args.read))
        for obj in objects:
            print(obj)
        known = [o for o in objects if o["shape"] in SHAPES]
        print(caption(known) if known else "(no objects)")


if __name__ == "__main__":
    main()
