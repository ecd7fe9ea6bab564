"""Lightning callbacks of mmdlm's trainers: checkpoints kept in one folder per run root, the last step always
saved, skipped samples made visible."""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

CHECKPOINT_DIR = "checkpoints"  # under trainer.default_root_dir


class FinalCheckpoint(Callback):
    """Rewrites a `ModelCheckpoint`'s `last.ckpt` when fit ends on a step that callback did not save.

    `ModelCheckpoint(every_n_train_steps=500, save_last=True)` alone leaves `last.ckpt` at step 1,000 after a
    1,300-step run, so an export of it would miss the last 300 steps.
    """

    def __init__(self, checkpoint: ModelCheckpoint) -> None:
        self.checkpoint = checkpoint

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        cb = self.checkpoint
        if cb.save_last and cb._last_global_step_saved != trainer.global_step:
            cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))  # what ModelCheckpoint itself does


def stable_checkpoints(trainer: Trainer) -> None:
    """Point every `ModelCheckpoint` without a `dirpath` at `<default_root_dir>/checkpoints` and make the
    ones with `save_last` also write `last.ckpt` at the end of fit.

    Lightning's default is the logger's folder, `.../version_N/checkpoints`: a new, empty one for every run,
    so `--ckpt_path last` found nothing to resume from.
    """
    for cb in trainer.checkpoint_callbacks:
        if not isinstance(cb, ModelCheckpoint):
            continue
        if cb.dirpath is None:
            cb.dirpath = os.path.realpath(os.path.join(os.path.expanduser(trainer.default_root_dir),
                                                       CHECKPOINT_DIR))
        if cb.save_last:
            trainer.callbacks.append(FinalCheckpoint(cb))


class SkippedSamplesMonitor(Callback):
    """Makes skipped samples visible: logs the training skip counts of this process as
    `data/skipped` and `data/skipped_<reason>` (reasons seen so far) with the other training metrics,
    and prints a one-line summary per split at the end of fit.

    `ShardDataModule.setup` adds one to the trainer when it has none, so every shard-based fit has it.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        counter = getattr(trainer.datamodule, "skipped", {}).get("train")  # a ShardDataModule's counters
        if counter is None:
            return
        metrics = {"data/skipped": float(counter.total)}
        metrics.update({f"data/skipped_{reason}": float(n) for reason, n in counter.counts.items() if n})
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if hasattr(dm, "skip_summary"):  # a ShardDataModule
            prefix = f"[data, rank {trainer.global_rank}]" if trainer.world_size > 1 else "[data]"
            sys.stdout.write(f"{prefix} {dm.skip_summary()}\n")  # one write: ranks share the terminal
            sys.stdout.flush()
