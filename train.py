"""Train anything in mmdlm with the Lightning CLI: the VQ image tokenizer, the masked-diffusion model,
or its autoregressive baseline; the config's `model.class_path` chooses which.

    python train.py fit --config configs/mdm-shapes.yaml                # = mmdlm train fit --config ...
    python train.py fit --config configs/mdm-shapes.yaml --ckpt_path last     # resume a killed run

The CLI lives in `mmdlm/train_cli.py` (so the installed `mmdlm` command has it; its docstring lists the
recipes' commands); this script re-exports it, so `from train import cli_main, main` keeps working.
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
