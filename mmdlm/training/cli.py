"""Train anything in mmdlm with the Lightning CLI: the VQ image tokenizer, the masked-diffusion model,
or its autoregressive baseline. The config's `model.class_path` chooses which.

This module is that CLI; `train.py` at the repository root and `mmdlm train` both run it, with the same
arguments (`mmdlm train fit --config ...` = `python train.py fit --config ...`).

    python train.py fit --config configs/vq-shapes.yaml                 # VQ tokenizer (CPU, minutes)
    python train.py fit --config configs/mdm-shapes.yaml                # tiny MDM on CPU
    python train.py fit --config configs/mdm-shapes.yaml --trainer.max_steps 200
    python train.py fit --config configs/mdm-shapes.yaml --ckpt_path last     # resume a killed run
    python train.py fit --config configs/mdm-shapes.yaml --model.init_from runs/quickstart/model \\
        --data.train_shards 'my-shards/*.tar'                           # fine-tune a model folder's weights
    python train.py fit --config configs/mdm-shapes.yaml --trainer.strategy ddp \\
        --trainer.devices 2 --trainer.accelerator cpu                   # DDP on 2 CPU processes (gloo)
    python train.py fit --config configs/mdm-shapes.yaml --print_config

Checkpoints go to `<trainer.default_root_dir>/checkpoints/` (one folder for every run of that root, unlike the
logger's `version_N/` folders), so `--ckpt_path last` finds the `last.ckpt` of the run before; and `last.ckpt`
is rewritten at the end of fit, so it always holds the final step.
"""

from __future__ import annotations

import os
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

from mmdlm.errors import UserError
from mmdlm.processor import TEXT_TOKENIZER_DIR
from mmdlm.training.callbacks import stable_checkpoints


def check_ckpt_path(ckpt_path: str | None) -> None:
    """`UserError` for a `--ckpt_path` that cannot resume a run: a missing file, or a model folder's weights."""
    if ckpt_path is None or ckpt_path in ("last", "best", "hpc"):
        return
    path = Path(ckpt_path)
    folder = path if path.is_dir() else path.parent
    if path.suffix == ".safetensors" or (path.is_dir() and (path / "config.json").is_file()):
        raise UserError(f"--ckpt_path {ckpt_path!r} is a model folder's weights, not a training checkpoint: "
                        f"to start training from them, use --model.init_from {folder}")
    if "://" not in ckpt_path and not path.is_file():
        raise UserError(f"--ckpt_path {ckpt_path!r} does not exist (use --ckpt_path last to resume the run in "
                        f"--trainer.default_root_dir)")


def model_text_tokenizer(init_from: str | None) -> str | None:
    """The text tokenizer of a `--model.init_from` folder: an mmdlm model folder's `text_tokenizer/`, else the
    folder itself (a transformers folder's `tokenizer.json`); None without a folder."""
    if not init_from:
        return None
    folder = Path(init_from)
    return str(folder / TEXT_TOKENIZER_DIR) if (folder / TEXT_TOKENIZER_DIR).is_dir() else str(folder)


class MMDLMCLI(LightningCLI):
    """`LightningCLI` whose run folder is named once, by `trainer.default_root_dir`: checkpoints go to
    `<root>/checkpoints` (`stable_checkpoints`), TensorBoard logs to `<root>/tb` when the config names no logger,
    and a model's `export_dir` left unset is `<root>/model`."""

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        root = config.trainer.default_root_dir or os.getcwd()
        if config.trainer.logger in (None, True):
            config.trainer.logger = Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                                              init_args=Namespace(save_dir=root, name="tb"))
        init = config.model.get("init_args") if isinstance(config.model, Namespace) else None
        if init is not None and "export_dir" in init and init.export_dir is None:
            init.export_dir = os.path.join(root, "model")
        data = config.data.get("init_args") if isinstance(config.data, Namespace) else None
        if data is not None and "text_tokenizer" in data and data.text_tokenizer is None and init is not None:
            data.text_tokenizer = model_text_tokenizer(init.get("init_from"))

    def instantiate_trainer(self, **kwargs) -> Trainer:  # noqa: ANN003
        trainer = super().instantiate_trainer(**kwargs)
        stable_checkpoints(trainer)
        return trainer

    def before_fit(self) -> None:
        check_ckpt_path(self.config[self.subcommand].get("ckpt_path"))


def cli_main(args: list[str] | None = None, run: bool = True, prog: str | None = None) -> LightningCLI:
    """Build (and by default run) the CLI; `args` replaces `sys.argv[1:]` (used by the tests), `prog` the
    program name in its help and errors (default: the script's name, `train.py`)."""
    return MMDLMCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": prog} if prog is not None else None,
        args=args,
        run=run,
    )


def user_error(err: BaseException) -> BaseException | None:
    """The `UserError` or missing file behind `err`, if any. jsonargparse wraps what the data module or model
    raises while it builds them ("Does not validate against any of the Union subtypes ..."): the cause is in
    the exception's chain."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, UserError | FileNotFoundError):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
