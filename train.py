"""Train anything in mmdlm with the Lightning CLI: the VQ image tokenizer, the masked-diffusion model,
or its autoregressive baseline. The config's `model.class_path` chooses which.

    python train.py fit --config configs/vq-shapes.yaml                 # VQ tokenizer (CPU, minutes)
    python train.py fit --config configs/mdm-shapes.yaml                # tiny MDM on CPU
    python train.py fit --config configs/mdm-shapes.yaml --trainer.max_steps 200
    python train.py fit --config configs/mdm-shapes.yaml --ckpt_path last     # resume a killed run
    python train.py fit --config configs/mdm-shapes.yaml --model.init_from runs/quickstart/model \\
        --data.train_shards 'my-shards/*.tar'                           # fine-tune a model folder's weights
    python train.py fit --config configs/mdm-shapes.yaml --trainer.strategy ddp \\
        --trainer.devices 2 --trainer.accelerator cpu                   # DDP on 2 CPU processes (gloo)
    python train.py fit --config configs/mdm-shapes.yaml --print_config

`mmdlm train fit --config ...` runs the same CLI. It lives in `mmdlm/train_cli.py` (so the installed `mmdlm`
command has it); this script re-exports it, so `from train import cli_main, main` keeps working.

Checkpoints go to `<trainer.default_root_dir>/checkpoints/` (one folder for every run of that root, unlike the
logger's `version_N/` folders), so `--ckpt_path last` finds the `last.ckpt` of the run before; and `last.ckpt`
is rewritten at the end of fit, so it always holds the final step.
"""

from __future__ import annotations

from mmdlm.train_cli import (  # noqa: F401  (re-exported: tests and users import them from train)
    CHECKPOINT_DIR,
    MMDLMCLI,
    FinalCheckpoint,
    check_ckpt_path,
    cli_main,
    main,
    stable_checkpoints,
    user_error,
)

if __name__ == "__main__":
    main()
