"""Real data that ships offline: scikit-learn's handwritten digits as webdataset shards.

`sklearn.datasets.load_digits` holds 1,797 real 8x8 scans (16 grey levels, from the UCI optical
recognition of handwritten digits set). They are upscaled to `image_size` (nearest neighbour keeps
the scanned pixels as blocks; bilinear smooths them), white digit on black, RGB, and written with a
caption ("a handwritten digit seven") and two questions (which digit; is it even).

    python -m mmdlm.worlds.digits --out data/shards/digits --image-size 32

From the repository root, `python -m data.digits ...` is the same command (data/digits.py, the recipe's
wrapper beside its shards). The k-NN scorer of generated digits is `mmdlm/worlds/digits_scorer.py`.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from mmdlm.worlds.shapes import NUMBERS

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR}


def digit_image(pixels: np.ndarray, image_size: int = 32, interpolation: str = "nearest") -> Image.Image:
    """RGB image of one 8x8 digit scan (values 0..16, 16 = ink): white digit on black."""
    grey = np.round(np.asarray(pixels, dtype=np.float64).reshape(8, 8) * 255 / 16).astype(np.uint8)  # (8, 8)
    image = Image.fromarray(grey, mode="L").resize((image_size, image_size), INTERPOLATIONS[interpolation])
    return image.convert("RGB")


def digit_meta(label: int) -> dict:
    """The json of one digit sample: source, label, captions and QA (docs/INTERFACES.md)."""
    word = NUMBERS[label]
    return {
        "source": "digits",
        "label": int(label),
        "captions": [f"a handwritten digit {word}", f"the digit {word}, handwritten"],
        "qa": [
            {"question": "what digit is this?", "answer": word, "type": "digit"},
            {"question": "is this digit even?", "answer": "yes" if label % 2 == 0 else "no",
             "type": "parity"},
        ],
    }


def write_digits(out: str | Path, image_size: int = 32, val_fraction: float = 0.1, seed: int = 0,
                 interpolation: str = "nearest", shard_size: int = 500) -> dict:
    """Write DIR/train and DIR/val shards (keys `digits-<index in load_digits>`) and stats.json."""
    import webdataset as wds
    from sklearn.datasets import load_digits
    from tqdm import tqdm

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(f"digits/{seed}").shuffle(order)
    n_val = round(val_fraction * len(order))
    splits = {"val": sorted(order[:n_val]), "train": sorted(order[n_val:])}
    out = Path(out)
    stats: dict = {"image_size": image_size, "interpolation": interpolation, "seed": seed}
    for split, indices in splits.items():
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"digits-{split}-*.tar"):
            stale.unlink()
        with wds.ShardWriter(str(folder / f"digits-{split}-%06d.tar"), maxcount=shard_size, verbose=0,
                             mtime=0) as sink:
            for index in tqdm(indices, desc=f"digits {split}", unit="sample"):
                buffer = io.BytesIO()
                digit_image(digits.data[index], image_size, interpolation).save(buffer, format="PNG")
                meta = digit_meta(int(digits.target[index]))
                sink.write({"__key__": f"digits-{index:04d}", "png": buffer.getvalue(),
                            "json": json.dumps(meta).encode()})
        labels = Counter(int(digits.target[i]) for i in indices)
        stats[split] = {"samples": len(indices), "labels": dict(sorted(labels.items()))}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def main(argv: list[str] | None = None) -> None:
    """Write scikit-learn's handwritten digits (real 8x8 scans) as webdataset shards in DIR/train, DIR/val.

    python -m mmdlm.worlds.digits --out data/shards/digits [--image-size 32] [--val-fraction 0.1] [--seed 0]
    """
    parser = argparse.ArgumentParser(prog="python -m mmdlm.worlds.digits", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=32, help="side in pixels of the upscaled digit")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share of the 1,797 scans held out")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    parser.add_argument("--interpolation", choices=sorted(INTERPOLATIONS), default="nearest",
                        help="upscaling filter")
    parser.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    args = parser.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    stats = write_digits(args.out, args.image_size, args.val_fraction, args.seed, args.interpolation,
                         args.shard_size)
    print(f"wrote {stats['train']['samples']} train / {stats['val']['samples']} val digits to {args.out}")


if __name__ == "__main__":
    main()
