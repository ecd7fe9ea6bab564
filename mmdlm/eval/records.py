"""Evaluation inputs: the val records of webdataset shards (images decoded), their images as one tensor, the
documents of one kind among them, and any sequence cut into batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def load_records(shards: str | Sequence[str], image_size: int, limit: int | None = None) -> list[dict]:
    """The first `limit` Records of the shards (all if None), in shard order, with images decoded.

    Raises FileNotFoundError when the pattern matches nothing, ValueError when the shards hold no record.
    """
    from itertools import islice

    from mmdlm.data import expand_shards, record_pipeline

    urls = expand_shards(shards)
    records = list(islice(record_pipeline(urls, image_size, load_images=True, load_codes=False), limit))
    if not records:
        raise ValueError(f"the shards {shards!r} hold no readable record")
    return records


def stack_images(records: Sequence[dict]) -> torch.Tensor:
    """Float[B, 3, H, W]: the decoded images of `load_records` records."""
    return torch.stack([r["image"] for r in records])  # (B, 3, H, W)


def documents(records: Sequence[dict], kind: str) -> list[dict]:
    """The records that are documents (`segments`) of `meta["kind"] == kind` (the edits world's "edit",
    "what_changed")."""
    return [r for r in records if r.get("segments") and (r.get("meta") or {}).get("kind") == kind]


def batches(items: Sequence, size: int) -> Iterator[tuple[int, Sequence]]:
    """(batch index, items) in consecutive slices of `size` (the last one shorter)."""
    for b, start in enumerate(range(0, len(items), size)):
        yield b, items[start : start + size]
