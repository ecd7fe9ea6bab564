"""The Lightning DataModules: webdataset shards (`mmdlm.data`) -> task sequences or images -> batches.

- `ShardDataModule`: the shared part: shard patterns checked, records decoded, bad samples skipped and
  counted (`SkippedSamplesMonitor` logs the counts), validation shared out evenly between DDP ranks.
- `ImageDataModule`: images only, for the VQ tokenizer (`configs/vq-shapes.yaml`).
- `MDMDataModule`: mixed-task sequences for the transformer. It builds the `MMDLMProcessor` (tokenizers, vocab,
  layout) from its paths and exposes it as `dm.processor`: the model reads the values known only at run time
  (vocab size, sequence length, image grid, VQ codebook) from it in `configure_model`, so they are never typed
  twice.
- `ResumableLoader`: a DataLoader that Lightning checkpoints, so a resumed run sees the batches an
  uninterrupted one would have.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from mmdlm.data import (
    MAX_BAD_IN_A_ROW,
    BadSampleCounter,
    LengthBuckets,
    ShardLoader,
    collate_records,
    distributed_world_size,
    expand_shards,
    record_pipeline,
)
from mmdlm.errors import UserError
from mmdlm.processor import MMDLMProcessor
from mmdlm.sequence import DEFAULT_TASK_WEIGHTS, Batch, Layout, SequenceBuilder, Task, collate
from mmdlm.training.callbacks import SkippedSamplesMonitor

log = logging.getLogger(__name__)

class ShardDataModule(L.LightningDataModule):
    """Webdataset shards -> Records -> `transform` -> batches by `collate`.

    Subclasses override `transform(record)` (runs in the DataLoader workers; raise
    `BadSample("transform", ...)` to skip a record) and `collate(samples)`.

    Under DDP, validation samples (not shards) are shared out between the ranks in equal numbers
    (`ShareSamples`), so any number of val shards works, one included. `setup` checks the shard
    patterns (`ShardsNotFound`) and adds a `SkippedSamplesMonitor` to the trainer.

    Args:
        train_shards: glob / brace pattern / comma list of training shards (see `expand_shards`).
        val_shards: the same for validation; None = no validation.
        image_size: images are resized / centre-cropped to this side.
        batch_size: samples per batch (per rank).
        num_workers: DataLoader worker processes; shards are split between them (and between ranks),
            so keep shards >= ranks x workers.
        shuffle_buffer: training shuffle buffer in samples (0 = shard order).
        resampled: draw training shards with replacement (multi-GPU: every rank gets the same number
            of batches); set `epoch_length` with it.
        epoch_length: training records per epoch per rank (None = one pass over the shards).
        seed: shard order, shuffle buffer and resampling seed.
        load_images: decode images (False: only `codes` from pre-tokenized shards, images only where
            those are missing).
        load_codes: read pre-computed VQ codes (`npy`) when the shards have them.
        max_bad_in_a_row: this many bad samples in a row (per reader process) stop the run with a
            `NoUsableSamples` error instead of reading on; data with nothing usable cannot spin for ever.
    """

    require_captions = True  # records promise >= 1 caption; ImageDataModule reads image-only shards

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        image_size: int = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        seed: int = 0,
        load_images: bool = True,
        load_codes: bool = True,
        max_bad_in_a_row: int = MAX_BAD_IN_A_ROW,
    ) -> None:
        super().__init__()
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.epoch_length = epoch_length
        self.seed = seed
        self.load_images = load_images
        self.load_codes = load_codes
        self.max_bad_in_a_row = max_bad_in_a_row
        self._bad_samples = BadSampleCounter(max_bad_in_a_row=None, source="all shards")
        self.skipped: dict[str, BadSampleCounter] = {  # per split; both also count into `bad_samples`
            "train": BadSampleCounter(max_bad_in_a_row=max_bad_in_a_row, source=f"training shards {train_shards!r}",
                                      parent=self._bad_samples),
            "val": BadSampleCounter(max_bad_in_a_row=max_bad_in_a_row, source=f"validation shards {val_shards!r}",
                                    parent=self._bad_samples),
        }

    @property
    def bad_samples(self) -> BadSampleCounter:
        """Skipped samples of this process (all its workers, training and validation), by reason:
        `.counts`, `.total`, `.good`; per split in `.skipped["train"]`, `.skipped["val"]`."""
        return self._bad_samples

    def skip_summary(self) -> str:
        """One line: samples used and skipped (by reason) per split, in this process."""
        parts = [f"{name}: {c.good} samples used, {c.describe()}" for name, c in self.skipped.items()
                 if name == "train" or (self.val_shards and c.good + c.total)]
        return "; ".join(parts)

    def setup(self, stage: str) -> None:
        """Check the shard patterns now (one sentence naming a pattern that matches nothing, before any
        model is built) and give the trainer a `SkippedSamplesMonitor` if it has none."""
        if stage == "fit":
            expand_shards(self.train_shards)
        if self.val_shards and stage in ("fit", "validate"):
            expand_shards(self.val_shards)
        trainer = self.trainer
        if trainer is not None and not any(isinstance(c, SkippedSamplesMonitor) for c in trainer.callbacks):
            trainer.callbacks.append(SkippedSamplesMonitor())

    def transform(self, record: dict) -> Any:
        """Record -> model sample (identity here)."""
        return record

    def collate(self, samples: list) -> Any:
        """Model samples -> batch (`collate_records` here)."""
        return collate_records(samples)

    def dataset(self, shards: str, train: bool) -> wds.DataPipeline:
        """The pipeline of transformed samples over `shards` (training: shuffled, maybe resampled;
        validation under DDP: split by sample, in equal numbers per rank)."""
        urls = expand_shards(shards)
        share_samples = not train and distributed_world_size() > 1
        if not self.resampled and not share_samples and self.num_workers > len(urls):
            log.warning("%d shards for %d workers: %d workers will idle (write smaller shards)",
                        len(urls), self.num_workers, self.num_workers - len(urls))
        return record_pipeline(
            urls, self.image_size,
            shuffle=self.shuffle_buffer if train else 0,
            resampled=self.resampled and train,
            epoch_length=self.epoch_length if train else None,
            load_images=self.load_images, load_codes=self.load_codes, seed=self.seed,
            require_captions=self.require_captions, transform=self.transform,
            counter=self.skipped["train" if train else "val"], split="samples" if share_samples else "shards")

    def _loader(self, shards: str, train: bool) -> DataLoader:
        return ShardLoader(self.dataset(shards, train), batch_size=self.batch_size,
                           num_workers=self.num_workers, collate_fn=self.collate,
                           persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_shards, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_shards, train=False) if self.val_shards else []


class ImageDataModule(ShardDataModule):
    """Batches of images only, FloatTensor[B,3,H,W] in [0,1]: for training the VQ tokenizer.

    Captions are not needed (image-only shards are fine); pre-computed codes are not read.
    Arguments as `ShardDataModule`.
    """

    require_captions = False

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        image_size: int = 32,
        batch_size: int = 64,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        seed: int = 0,
        max_bad_in_a_row: int = MAX_BAD_IN_A_ROW,
    ) -> None:
        super().__init__(train_shards=train_shards, val_shards=val_shards, image_size=image_size,
                         batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                         resampled=resampled, epoch_length=epoch_length, seed=seed,
                         load_images=True, load_codes=False, max_bad_in_a_row=max_bad_in_a_row)

    def transform(self, record: dict) -> torch.Tensor:
        return record["image"]  # (3, H, W)

    def collate(self, samples: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(samples)  # (B, 3, H, W)


class MDMDataModule(ShardDataModule):
    """Webdataset shards of (image or VQ codes, captions, QA) laid out as mixed-task sequences.

    Args:
        train_shards: glob / brace pattern of the training shards (pre-tokenized `npy` codes or images).
        val_shards: the same for validation.
        text_tokenizer: a saved text tokenizer folder, a HF `tokenizer.json` (or a folder holding one), or
            `open_clip`; null: the `--model.init_from` folder's own (the training CLI fills it in: an mmdlm model
            folder's `text_tokenizer/`, a transformers folder's `tokenizer.json`).
        vq: a VQ tokenizer folder (diffusers `VQModel` format) from `train.py fit --config vq-*.yaml`.
        task_weights: how often each task is drawn, by `Task` name (lower case); default `DEFAULT_TASK_WEIGHTS`.
        layout: fixed lengths of the text regions.
        max_bad_in_a_row: bad samples in a row that stop the run with a one-sentence error (`mmdlm.data`).
        bucket_pool: training batches are cut from a pool of this many batches' samples sorted by length
            (`LengthBuckets`), so a batch pads to about its own length instead of the longest template's;
            1 = plain batching. Validation batches are never bucketed.

    Attributes:
        processor: the `MMDLMProcessor` of `text_tokenizer`, `vq` and `layout`: the sequences are built with
            it, and `LitMDM` builds the model from it, records it in checkpoints and exports it.
    """

    def __init__(
        self,
        train_shards: str,
        val_shards: str | None = None,
        text_tokenizer: str | None = "runs/quickstart/text_tokenizer",
        vq: str = "runs/quickstart/vq",
        task_weights: dict[str, float] | None = None,
        layout: Layout | None = None,
        image_size: int = 32,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        seed: int = 0,
        max_bad_in_a_row: int = MAX_BAD_IN_A_ROW,
        bucket_pool: int = 1,
    ) -> None:
        if bucket_pool < 1:
            raise ValueError(f"bucket_pool must be >= 1, got {bucket_pool}")
        super().__init__(train_shards=train_shards, val_shards=val_shards, image_size=image_size,
                         batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                         resampled=resampled, epoch_length=epoch_length, seed=seed,
                         load_images=False, load_codes=True,  # images are decoded only where codes are missing
                         max_bad_in_a_row=max_bad_in_a_row)
        if text_tokenizer is None:
            raise UserError("--data.text_tokenizer is null and there is no --model.init_from folder to take one "
                            "from: name a text tokenizer")
        self.processor = MMDLMProcessor.from_paths(text_tokenizer, vq, layout)  # what the model is built from
        self.task_weights = (dict(DEFAULT_TASK_WEIGHTS) if task_weights is None
                             else {Task[name.upper()]: w for name, w in task_weights.items()})
        p = self.processor
        self.builder = SequenceBuilder(p.vocab, p.tokenizer, p.layout, self.task_weights, seed=seed)
        self.bucket_pool = bucket_pool

    def transform(self, record: dict) -> Any:
        for item in [record, *record.get("segments", ())]:  # a document's images are its segments
            if "image" in item and "codes" not in item:  # raw images: run the VQ encoder here (pre-tokenize)
                with torch.no_grad():
                    item["codes"] = self.processor.vq.encode(item["image"][None])[0]  # (h, w)
        return self.builder.build(record)

    def collate(self, samples: list) -> Batch:
        return collate(samples, self.processor.vocab)

    def train_dataloader(self) -> ResumableLoader:
        dataset = self.dataset(self.train_shards, train=True)
        batch_size: int | None = self.batch_size
        if self.bucket_pool > 1:  # the pipeline batches (by length); the loader only collates
            dataset.append(LengthBuckets(self.batch_size, self.bucket_pool, seed=self.seed))
            batch_size = None
        return ResumableLoader(dataset, batch_size=batch_size, num_workers=self.num_workers,
                               collate_fn=self.collate, persistent_workers=self.num_workers > 0)


class ResumableLoader(ShardLoader):
    """A DataLoader that Lightning checkpoints: it records how many batches it has yielded and, restored,
    skips that many on its next pass. Over a seeded stream (`resampled=True`, one endless epoch) a resumed
    run therefore sees exactly the batches an uninterrupted one would have."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self):  # noqa: ANN204
        it = super().__iter__()
        self._yielded = 0
        for _ in range(self._skip):  # fast-forward: decoding is cheap next to a training step
            next(it, None)
            self._yielded += 1
        self._skip = 0
        for batch in it:
            self._yielded += 1
            yield batch

    ahead = 1  # Lightning's data fetcher holds one batch beyond the step being trained (prefetch_batches=1)

    def state_dict(self) -> dict[str, int]:
        return {"batches": max(0, self._yielded - self.ahead)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches", 0))
