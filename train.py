"""Train anything in mmdlm with the Lightning CLI: the masked-diffusion model, its autoregressive twin, the VQ
image tokenizer or GRPO; the config's `model.class_path` chooses which.

    python train.py fit --config configs/mdm-shapes.yaml                          # = mmdlm train fit --config ...
    python train.py fit --config configs/mdm-shapes.yaml --config configs/ar.yaml # the AR twin
    python train.py fit --config configs/mdm-shapes.yaml --ckpt_path last         # resume a killed run

The CLI is `mmdlm.training.cli` (its docstring lists the recipes); this script runs `mmdlm.commands.train`.
"""

from __future__ import annotations

from mmdlm.commands.train import main

if __name__ == "__main__":
    main()
