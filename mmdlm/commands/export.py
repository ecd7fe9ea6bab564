"""Export a training checkpoint as a self-contained model folder (`mmdlm.folder`).

    mmdlm export --ckpt runs/quickstart/mdm-run/checkpoints/last.ckpt --out runs/my-model

The folder holds config.json, model.safetensors (the EMA weights when the run kept them), text_tokenizer/ and
vq/; `MMDLMPipeline.from_pretrained` loads it without Lightning. The checkpoint is read with
`torch.load(..., weights_only=True)`, so a crafted `.ckpt` that names any Python object is refused.

Exit status: 0 exported; 2 a missing, unreadable, unsafe or non-mmdlm checkpoint, or an unusable
tokenizer path in it, with a one-sentence error on stderr.
"""

from __future__ import annotations

import argparse

from mmdlm.training.checkpoint import export_checkpoint


def main(argv: list[str] | None = None, prog: str = "mmdlm export") -> None:
    """Export a training checkpoint as a self-contained model folder."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) of a LitMDM run")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA ones")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, use_ema=not args.no_ema)
    except (OSError, ValueError) as err:  # CheckpointError, a missing file, a bad tokenizer folder
        parser.exit(2, f"error: {err}\n")
    print(f"exported {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
