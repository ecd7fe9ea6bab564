"""Reconstruction quality of a VQ tokenizer on shapes val images: the decode ceiling of text-to-image.

Measures, on the round trip decode(encode(x)):
- PSNR: mean over images of the per-image PSNR, and the PSNR of the mean squared error (stricter);
- colour survival: share of objects whose centre pixel, after decoding, is nearest (in RGB) to their true
  palette colour;
- codebook usage (share of codes used on the val set) and perplexity (effective number of codes);
- the oracle's all-correct rate on reconstructions (mmdlm/worlds/oracle.py): the best text-to-image can score.

    python -m benchmarks.vq_quality --vq runs/vq-shapes/vq --shards 'data/shards/shapes/val/*.tar'
    python -m benchmarks.vq_quality --vq runs/vq-shapes/vq --json runs/vq-shapes/quality.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vision.lightning import perplexity, psnr
from vision.load import load_image_tokenizer


def object_centre(obj: dict, image_size: int) -> tuple[int, int]:
    """(x, y) of an object's centre pixel (objects have odd sides, so the centre is exact)."""
    from mmdlm.worlds.shapes import object_box

    x0, y0, side = object_box(obj["cell"], obj["size"], image_size)
    return x0 + side // 2, y0 + side // 2


def colour_survival(recon: torch.Tensor, objects: list[list[dict]]) -> tuple[int, int]:
    """(objects whose decoded centre colour is nearest their true palette colour, objects): recon (B,3,H,W)."""
    from mmdlm.worlds.shapes import COLORS

    names = list(COLORS)
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # (8, 3)
    pixels = (recon.float().clamp(0, 1) * 255).cpu()  # (B, 3, H, W)
    right = total = 0
    for image, scene in zip(pixels, objects):
        for obj in scene:
            x, y = object_centre(obj, image.shape[-1])
            nearest = int((palette - image[:, y, x]).pow(2).sum(1).argmin())
            right += names[nearest] == obj["color"]
            total += 1
    return right, total


@torch.no_grad()
def evaluate(vq: torch.nn.Module, images: torch.Tensor, objects: list[list[dict]] | None = None,
             batch_size: int = 250) -> dict:
    """Round-trip metrics of `vq` on images (N, 3, H, W) in [0, 1], with their scene graphs if known."""
    try:
        from mmdlm.worlds.oracle import score_image
    except ImportError:  # the oracle is optional
        score_image = None
    psnrs, sse, counts = [], 0.0, torch.zeros(vq.codebook_size, dtype=torch.long)
    right = total = oracle_right = 0
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(vq.device)  # (b, 3, H, W)
        codes = vq.encode(x)  # (b, h, w)
        recon = vq.decode(codes)  # (b, 3, H, W)
        psnrs.append(psnr(recon, x).cpu())
        sse += float((recon - x).pow(2).sum())
        counts += torch.bincount(codes.flatten().cpu(), minlength=vq.codebook_size)
        if objects is not None:
            scenes = objects[i:i + batch_size]
            r, t = colour_survival(recon, scenes)
            right, total = right + r, total + t
            if score_image is not None:
                oracle_right += sum(bool(score_image(s, im)["all_correct"]) for s, im in zip(scenes, recon.cpu()))
    result = {
        "images": len(images),
        "psnr_mean": float(torch.cat(psnrs).mean()),
        "psnr_global": float(10 * np.log10(images.numel() / max(sse, 1e-12))),
        "usage": float((counts > 0).float().mean()),
        "live_codes": int((counts > 0).sum()),
        "codebook_size": vq.codebook_size,
        "perplexity": perplexity(counts),
        "seconds": round(time.perf_counter() - start, 2),
    }
    if objects is not None:
        result["colour_survival"] = right / max(total, 1)
        result["objects"] = total
        if score_image is not None:
            result["oracle_all_correct"] = oracle_right / len(images)
    return result


def load_val(shards: str, image_size: int, limit: int | None = None) -> tuple[torch.Tensor, list[list[dict]] | None]:
    """Images (N, 3, H, W) and, for shapes shards, their scene graphs (else None)."""
    from mmdlm.data import record_pipeline

    images, objects = [], []
    for record in record_pipeline(shards, image_size, load_codes=False, require_captions=False):
        images.append(record["image"])
        objects.append(record["meta"].get("objects"))
        if limit and len(images) >= limit:
            break
    if not images:
        raise FileNotFoundError(f"no readable images in {shards!r}")
    scenes = objects if all(o is not None for o in objects) else None
    return torch.stack(images), scenes


def main(argv: list[str] | None = None) -> None:
    """Print (and optionally write as json) the VQ round-trip quality on val shards."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vq_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vq", default="runs/vq-shapes/vq", help="VQ tokenizer folder")
    parser.add_argument("--shards", default="data/shards/shapes/val/*.tar", help="val shards (glob)")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images")
    parser.add_argument("--json", default=None, help="also write the metrics here")
    args = parser.parse_args(argv)
    vq = load_image_tokenizer(args.vq)
    images, objects = load_val(args.shards, vq.image_size, args.limit)
    result = {"vq": args.vq, "shards": args.shards, **evaluate(vq, images, objects)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
