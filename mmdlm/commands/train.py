"""Train a model with the Lightning CLI: the masked-diffusion model, its AR twin, the VQ tokenizer or GRPO.

    mmdlm train fit --config configs/mdm-shapes.yaml                          # = python train.py fit ...
    mmdlm train fit --config configs/mdm-shapes.yaml --config configs/ar.yaml # the AR twin
    mmdlm train fit --config configs/mdm-shapes.yaml --ckpt_path last         # resume a killed run

The config's `model.class_path` chooses what trains; `mmdlm.training.cli` describes the CLI and its recipes.
A problem with the user's input or files ends the run with one sentence and exit status 2.
"""

from __future__ import annotations

import sys

from mmdlm.training.cli import cli_main, user_error


def main(args: list[str] | None = None, prog: str | None = None) -> None:
    """Run the CLI; a problem with the user's input or files ends it with one sentence and exit status 2."""
    try:
        cli_main(args, prog=prog)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
