"""A patch-dictionary image tokenizer: each p x p pixel patch becomes the id of its nearest dictionary patch.

The tokenizer of MaskGIT-style toy worlds and of the founding measurements' first experiment (BENCHMARKS.md),
done so that it does not collapse. The codebook is a dictionary of K patches in pixel space fitted to training
images: weighted k-means over the *distinct* patches (weight = how often each occurs), initialised with the K
most frequent ones. Counting distinct patches instead of clustering all of them is the fix for the collapse
the founding measurements found (BENCHMARKS.md: k-means on raw patches kept 80 live codes of 512, because 87%
of shapes patches are black): the black patch is one entry with a large weight, not 87% of the points.

Why it exists beside the diffusers `VQModel` tokenizer (vision/tokenizer.py): on the shapes world the
images are flat palette colours on black, and a 4x4 patch is one of ~1.7k distinct patterns
(224 masks x 8 colours, some with two colours). The dictionary is exact for every patch it holds: with
K = 1024 it reproduces 98.7% of val patches exactly, fitted in seconds on a CPU, whereas the conv VQ-VAE
reaches ~22-26 dB after minutes of CPU training (BENCHMARKS.md, "Image tokenizers"). Encoding is a
nearest-neighbour search, decoding a lookup; there is no neural network to train.

It is a diffusers model (`ModelMixin` + `ConfigMixin`): `save_pretrained` writes config.json +
diffusion_pytorch_model.safetensors with `_class_name: PatchTokenizer`, and `vision.load` picks the class
from that name, so a user's folder of either kind loads the same way.

    python -m vision.patch_tokenizer --shards 'data/shards/shapes/train/*.tar' --out runs/quickstart/vq
    tok = PatchTokenizer.from_pretrained("runs/quickstart/vq")
    codes = tok.encode(images)      # (B, 3, 32, 32) in [0, 1] -> (B, 8, 8) int64 in [0, K)
    images = tok.decode(codes)      # (B, 8, 8) -> (B, 3, 32, 32) in [0, 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from vision.images import shard_images
from vision.tokenizer import EXTRA_FILE, CodeGrid, check_codes

log = logging.getLogger(__name__)

LEVELS = 255  # patches are compared after rounding to 8-bit levels, so equal-looking patches are one entry


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p, W/p, C*p*p): the patches of a grid, raster order, channel-major inside."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)  # (B, C, h, p, w, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, H // patch, W // patch, C * patch * patch)  # (B, h, w, C*p*p)


def unpatchify(patches: torch.Tensor, channels: int, patch: int) -> torch.Tensor:
    """(B, h, w, C*p*p) -> (B, C, h*p, w*p): the inverse of `patchify`."""
    B, h, w, _ = patches.shape
    x = patches.reshape(B, h, w, channels, patch, patch)  # (B, h, w, C, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, channels, h * patch, w * patch)  # (B, C, H, W)


def nearest(points: torch.Tensor, codebook: torch.Tensor, chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook row of each point by squared L2: (N, d), (K, d) -> (ids (N,), squared distances (N,))."""
    ids, dists = [], []
    c2 = codebook.pow(2).sum(1)  # (K,)
    for part in points.split(chunk):
        d = part.pow(2).sum(1, keepdim=True) - 2 * part @ codebook.T + c2  # (n, K)
        value, index = d.min(1)
        ids.append(index)
        dists.append(value.clamp_min(0))
    return torch.cat(ids), torch.cat(dists)


def fit_dictionary(patches: torch.Tensor, counts: torch.Tensor, codebook_size: int,
                   kmeans_iters: int = 0) -> torch.Tensor:
    """A (K, d) dictionary from distinct patches (N, d) and their counts (N,).

    Starts from the K most frequent patches (exact for each of them); `kmeans_iters` rounds of weighted
    Lloyd k-means then move each code to the count-weighted mean of the patches it wins, which lowers the
    total squared error when there are many more distinct patches than codes (natural images) but blurs
    exact codes when the images are flat colours (shapes: 0 rounds). With fewer distinct patches than K the
    remaining codes repeat the most frequent patch (never chosen by `encode`: ties go to the lower id).
    """
    order = counts.argsort(descending=True, stable=True)
    book = patches[order[:codebook_size]].float().clone()  # (min(N, K), d)
    if book.shape[0] < codebook_size:
        log.warning("only %d distinct patches for %d codes; the rest repeat the most frequent", book.shape[0],
                    codebook_size)
        book = torch.cat([book, book[:1].expand(codebook_size - book.shape[0], -1)])  # (K, d)
    weights = counts.float()  # (N,)
    for _ in range(kmeans_iters):
        ids, _ = nearest(patches.float(), book)  # (N,)
        total = torch.zeros(codebook_size, device=book.device).index_add_(0, ids, weights)  # (K,)
        sums = torch.zeros_like(book).index_add_(0, ids, patches.float() * weights[:, None])  # (K, d)
        won = total > 0
        book[won] = sums[won] / total[won, None]  # codes that won nothing stay where they are
    return book


class PatchTokenizer(CodeGrid, ModelMixin, ConfigMixin):
    """Images in [0, 1] <-> code grids through a dictionary of pixel patches (see the module docstring).

    Args:
        image_size: side of the square images it takes.
        patch_size: pixels per code along each side (32 / 4 = 8x8 = 64 codes per image).
        codebook_size: number of dictionary patches K.
        channels: image channels (3: the pipeline's images are RGB).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, image_size: int = 32, patch_size: int = 4, codebook_size: int = 1024,
                 channels: int = 3) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        # (K, C*p*p) patch values in [0, 1]; a parameter (not trained) so diffusers saves it in safetensors
        self.codebook = nn.Parameter(torch.zeros(codebook_size, channels * patch_size**2), requires_grad=False)

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def fit(cls, images: Iterable[torch.Tensor], codebook_size: int = 1024, patch_size: int = 4,
            kmeans_iters: int = 0) -> PatchTokenizer:
        """Fit the dictionary to batches of images (B, C, H, W) in [0, 1] (all of one size)."""
        distinct: dict[bytes, int] = {}
        shape = None
        for batch in images:
            if shape is None:
                shape = tuple(batch.shape[1:])
            elif tuple(batch.shape[1:]) != shape:
                raise ValueError(f"images must all be {shape}, got {tuple(batch.shape[1:])}")
            levels = (batch.float().clamp(0, 1) * LEVELS).round().to(torch.uint8)  # (B, C, H, W)
            flat = patchify(levels, patch_size).reshape(-1, shape[0] * patch_size**2)  # (B*h*w, d)
            uniq, count = flat.unique(dim=0, return_counts=True)
            for row, n in zip(uniq.numpy(), count.tolist()):
                key = row.tobytes()
                distinct[key] = distinct.get(key, 0) + n
        if shape is None:
            raise ValueError("no images to fit the patch dictionary on")
        if shape[1] != shape[2]:
            raise ValueError(f"images must be square, got {shape[1]}x{shape[2]}")
        patches = torch.frombuffer(bytearray(b"".join(distinct)), dtype=torch.uint8).reshape(len(distinct), -1)
        counts = torch.tensor(list(distinct.values()), dtype=torch.long)  # (N,)
        book = fit_dictionary(patches.float() / LEVELS, counts, codebook_size, kmeans_iters)  # (K, d)
        tok = cls(image_size=shape[1], patch_size=patch_size, codebook_size=codebook_size, channels=shape[0])
        tok.codebook.data.copy_(book)
        held = counts.sort(descending=True).values[:codebook_size].sum()  # occurrences of dictionary patches
        tok.fit_stats = {"patches": int(counts.sum()), "distinct_patches": len(distinct),
                         "kept_exactly": float(held / counts.sum())}
        return tok

    def save_pretrained(self, path: str | Path, **kwargs) -> None:  # type: ignore[override]
        """Write the diffusers folder (config.json + safetensors) plus `mmdlm_vq.json`."""
        super().save_pretrained(path, safe_serialization=True, **kwargs)
        extra = {"image_size": self.image_size, "grid": list(self.grid), "codebook_size": self.codebook_size}
        (Path(path) / EXTRA_FILE).write_text(json.dumps(extra, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------- properties
    @property
    def image_size(self) -> int:
        return int(self.config.image_size)

    @property
    def codebook_size(self) -> int:
        """Number of codes K; ids are in [0, K)."""
        return int(self.config.codebook_size)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side."""
        return int(self.config.patch_size)

    @property
    def embed_dim(self) -> int:
        """Size of a code vector: the patch's C*p*p pixel values."""
        return int(self.codebook.shape[1])

    def codebook_vectors(self) -> torch.Tensor:
        """The code vectors, (K, C*p*p) pixel values, detached."""
        return self.codebook.detach().clone()

    # ---------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float in [0, 1] -> (B, h, w) int64 codes: the nearest dictionary patch of each patch."""
        C, size = self.config.channels, self.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (C, size, size):
            raise ValueError(f"images must be (B, {C}, {size}, {size}), got {tuple(images.shape)}")
        patches = patchify(images.to(self.codebook.device, torch.float32), self.downsample)  # (B, h, w, d)
        B, h, w, d = patches.shape
        ids, _ = nearest(patches.reshape(-1, d), self.codebook)  # (B*h*w,)
        return ids.reshape(B, h, w)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) integer codes -> (B, C, H, W) float images in [0, 1]."""
        check_codes(codes, self.codebook_size)
        patches = self.codebook[codes.long().to(self.codebook.device)]  # (B, h, w, d)
        return unpatchify(patches, self.config.channels, self.downsample).clamp(0, 1)  # (B, C, H, W)


def main(argv: list[str] | None = None) -> None:
    """Fit a patch-dictionary tokenizer on the images of webdataset shards and save it as a folder."""
    parser = argparse.ArgumentParser(prog="python -m vision.patch_tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="training shards (glob or brace pattern)")
    parser.add_argument("--out", required=True, help="folder to write the tokenizer to")
    parser.add_argument("--image-size", type=int, default=32, help="images are resized/cropped to this side")
    parser.add_argument("--patch-size", type=int, default=4, help="pixels per code along each side")
    parser.add_argument("--codebook-size", type=int, default=1024, help="dictionary patches K")
    parser.add_argument("--kmeans-iters", type=int, default=0,
                        help="weighted k-means rounds after the most-frequent init (0 for flat-colour worlds)")
    parser.add_argument("--limit", type=int, default=None, help="fit on at most this many images")
    args = parser.parse_args(argv)
    if args.codebook_size < 2 or args.patch_size < 1 or args.image_size % args.patch_size:
        parser.error(f"need codebook-size >= 2 and a patch-size dividing image-size {args.image_size}")

    def batches() -> Iterable[torch.Tensor]:
        buffer, seen = [], 0
        for image in shard_images(args.shards, args.image_size):
            buffer.append(image)
            seen += 1
            if len(buffer) == 1024 or (args.limit and seen >= args.limit):
                yield torch.stack(buffer)
                buffer = []
            if args.limit and seen >= args.limit:
                return
        if buffer:
            yield torch.stack(buffer)

    start = time.perf_counter()
    try:
        tok = PatchTokenizer.fit(batches(), args.codebook_size, args.patch_size, args.kmeans_iters)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"error: {e} (shards {args.shards!r})\n")
    tok.save_pretrained(args.out)
    stats = tok.fit_stats
    print(f"fitted {args.codebook_size} codes on {stats['patches']:,} patches ({stats['distinct_patches']:,} distinct; "
          f"the dictionary holds {100 * stats['kept_exactly']:.1f}% of them exactly) in "
          f"{time.perf_counter() - start:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
