"""Pre-tokenize webdataset shards: add each image's VQ codes as an `npy` member beside the original ones.

A document's images (an interleaved sample: json `images`, e.g. "0.png", "1.png") each get theirs ("0.npy").

Glue between the model's data path (`mmdlm.data`: shard patterns, the image decoding, `UserError`) and an
image tokenizer (`vision.load`); it lives in mmdlm so that `vision` imports nothing of mmdlm. Images are
decoded by the data path's `load_image`, so a sample's stored codes are exactly the ones the DataModule would
encode on the fly (transparency onto black, non-square images resized and centre-cropped alike).

Model training then reads the codes instead of running the VQ encoder at every step (as aMUSEd / MaskGIT
pipelines pre-extract tokens). One output shard per input shard, with the same name and the same keys; the
folder structure under the shards' common parent is kept, so one call can cover both splits
(`--shards 'data/shards/shapes/*/*.tar' --out X` writes X/train/*.tar and X/val/*.tar), but the simplest is
one call per split. A sample whose image cannot be read is skipped and counted by reason (as the readers
skip them), never fatal, and a summary of the counts is printed at the end; only shards with no usable
sample at all are an error (one sentence, exit status 2, as is a pattern that matches nothing). A `DONE`
file (with the counts) is written last, so a finished run can be recognised.

    mmdlm pretokenize --vq runs/quickstart/vq --shards 'data/shards/shapes/train/*.tar' \\
        --out data/shards/shapes-codes/train
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from mmdlm.data import IMAGE_EXTENSIONS, expand_shards, load_image
from mmdlm.errors import UserError
from vision.load import load_image_tokenizer


def expand(pattern: str) -> list[str]:
    """Shard paths of a glob and/or brace pattern (`a/{000..009}.tar`), sorted; ShardsNotFound (a UserError
    and a FileNotFoundError) naming the pattern if it matches nothing."""
    return sorted(str(p) for p in expand_shards(pattern))


def npy_bytes(codes: np.ndarray) -> bytes:
    """An array as the bytes of an `.npy` file (what webdataset's `npy` decoder reads back)."""
    buf = io.BytesIO()
    np.save(buf, codes, allow_pickle=False)
    return buf.getvalue()


def raw_samples(shard: str, counts: dict[str, int]) -> Iterator[dict]:
    """The samples of one shard as {member: bytes} plus `__key__`; unreadable tar entries are counted."""

    def handler(exn: Exception) -> bool:
        counts["unreadable"] += 1
        counts["skipped_tar"] = counts.get("skipped_tar", 0) + 1
        print(f"[pretokenize] skipped in {shard}: {exn!r}", file=sys.stderr)
        return True

    dataset = wds.WebDataset(shard, shardshuffle=False, handler=handler, empty_check=False)
    for sample in dataset:
        yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def image_members(sample: dict) -> dict[str, str]:
    """{image member: its codes member} of a raw sample: a document's images (its json `images`, MMC4 / OBELICS,
    e.g. "0.png" -> "0.npy") or a single-image sample's image ("png" -> "npy"). ValueError if there is none."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        meta = {}  # the readers judge the json; here only the image matters
    names = meta.get("images") if isinstance(meta, dict) else None
    if isinstance(names, list):
        key = sample["__key__"].rpartition("/")[2] + "."
        members = [str(n).removeprefix(key).lower() for n in names if n is not None]
        missing = [m for m in members if m not in sample]
        if missing or not members:
            raise ValueError(f"document images {missing or names} not among the members {sorted(sample)}")
        return {m: m.rpartition(".")[0] + ".npy" for m in members}
    ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image member among {sorted(sample)}")
    return {ext: "npy"}


class ShardTokenizer:
    """Encodes the images of shards in batches and writes them back with their codes."""

    def __init__(self, vq: torch.nn.Module, batch_size: int = 256) -> None:
        self.vq = vq.eval()
        self.batch_size = batch_size
        self.dtype = np.int16 if vq.codebook_size <= np.iinfo(np.int16).max + 1 else np.int32

    def _flush(self, writer: wds.TarWriter, samples: list[tuple[dict, list[str]]], images: list[torch.Tensor]) -> None:
        if not samples:
            return
        codes = iter(self.vq.encode(torch.stack(images)).cpu().numpy().astype(self.dtype))  # (B, h, w)
        for sample, outputs in samples:
            writer.write({**sample, **{name: npy_bytes(next(codes)) for name in outputs}})
        samples.clear()
        images.clear()

    def shard(self, src: str, dst: Path, counts: dict[str, int], progress: tqdm) -> None:
        """Write `dst` with every readable sample of `src` plus its codes; `counts` gets written/skipped."""
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        samples: list[tuple[dict, list[str]]] = []
        images: list[torch.Tensor] = []
        with wds.TarWriter(str(tmp)) as writer:
            for sample in raw_samples(src, counts):
                reason = "skipped_no_image"
                try:
                    members = image_members(sample)
                    reason = "skipped_image"
                    decoded = [load_image(sample[m], self.vq.image_size) for m in members]
                except Exception as e:  # a broken image never kills the run: skip and count it
                    counts["skipped"] += 1
                    counts[reason] = counts.get(reason, 0) + 1
                    print(f"[pretokenize] skipped {sample.get('__key__')} in {src}: {e!r}", file=sys.stderr)
                    continue
                samples.append((sample, list(members.values())))
                images += decoded
                counts["written"] += 1
                progress.update(1)
                if len(images) >= self.batch_size:
                    self._flush(writer, samples, images)
            self._flush(writer, samples, images)
        os.replace(tmp, dst)  # a shard appears only when complete


def skip_summary(counts: dict[str, int]) -> str:
    """'3 skipped: image 2, tar 1' from the counts (reasons: `no_image`, `image` undecodable, `tar` unreadable)."""
    reasons = {k.removeprefix("skipped_"): v for k, v in counts.items() if k.startswith("skipped_") and v}
    total = counts.get("skipped", 0) + counts.get("unreadable", 0)
    return f"{total} skipped" + (": " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) if reasons else "")


def pretokenize(vq: str, shards: str, out: str, batch_size: int = 256, device: str = "cpu") -> dict[str, int]:
    """Pre-tokenize the shards matching `shards` into `out`; returns {"written", "skipped", "unreadable", ...}
    (`skipped_<reason>` per reason). Raises UserError when no sample at all could be written."""
    paths = expand(shards)
    tokenizer = load_image_tokenizer(vq).to(device)
    worker = ShardTokenizer(tokenizer, batch_size=batch_size)
    root = Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))
    out_dir = Path(out)
    counts = {"written": 0, "skipped": 0, "unreadable": 0}
    with torch.inference_mode(), tqdm(desc="pretokenize", unit="img", file=sys.stderr) as progress:
        for path in paths:
            worker.shard(path, out_dir / Path(path).resolve().relative_to(root), counts, progress)
    if counts["written"] == 0:
        raise UserError(f"no sample of {shards!r} could be pre-tokenized ({skip_summary(counts)}), so no DONE "
                        f"file was written to {out!r}")
    summary = {**counts, "shards": len(paths), "grid": list(tokenizer.grid), "codebook_size": tokenizer.codebook_size,
               "dtype": np.dtype(worker.dtype).name, "vq": str(vq), "source": shards}
    (out_dir / "DONE").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
