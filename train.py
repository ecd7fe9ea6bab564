"""Train anything in mmdlm with the Lightning CLI: the VQ image tokenizer, the masked-diffusion model,
or its autoregressive baseline. The config's `model.class_path` chooses which.

    python train.py fit --config configs/vq-shapes.yaml                 # VQ tokenizer (CPU, minutes)
    python train.py fit --config configs/mdm-shapes.yaml                # tiny MDM on CPU
    python train.py fit --config configs/mdm-shapes.yaml --trainer.max_steps 200
    python train.py fit --config configs/mdm-shapes.yaml --ckpt_path last     # resume a killed run
    python train.py fit --config configs/mdm-shapes.yaml --trainer.strategy ddp \\
        --trainer.devices 2 --trainer.accelerator cpu                   # DDP on 2 CPU processes (gloo)
    python train.py fit --config configs/mdm-shapes.yaml --print_config
"""

from __future__ import annotations

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the CLI; `args` replaces `sys.argv[1:]` (used by the tests)."""
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    cli_main()
