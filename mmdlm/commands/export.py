"""Export a training checkpoint or a model folder as a self-contained model folder, mmdlm's or transformers'.

    mmdlm export --ckpt runs/quickstart/mdm-run/checkpoints/last.ckpt --out runs/my-model
    mmdlm export --format transformers --model runs/quickstart/model --out runs/my-model-hf

`--format mmdlm` (the default) writes an mmdlm model folder (`mmdlm.folder`: config.json, model.safetensors,
text_tokenizer/, vq/) that `MMDLMPipeline.from_pretrained` loads without Lightning; from a checkpoint it holds the
EMA weights when the run kept them. `--format transformers` writes a transformers remote-code folder
(`mmdlm.hf_export`) that `AutoModel` / `AutoProcessor.from_pretrained(OUT, trust_remote_code=True)` load with
nothing of mmdlm installed; from a checkpoint it first writes the mmdlm folder (to a temporary folder) and converts
that, so the checkpoint export's treatment of the weights (EMA, merged adapters) applies to both formats.
The checkpoint is read with `torch.load(..., weights_only=True)`, so a crafted `.ckpt` that names any Python
object is refused.

Exit status: 0 exported; 2 a missing, unreadable, unsafe or non-mmdlm checkpoint or model folder, an unusable
tokenizer path in it, or not exactly one of --ckpt and --model, with a one-sentence error on stderr.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path


def copy_model_folder(model_dir: str | Path, out: str | Path) -> Path:
    """The mmdlm format from a model folder: loaded (its weights' sha256 checked) and written again."""
    from mmdlm.pipeline import MMDLMPipeline

    return MMDLMPipeline.from_pretrained(model_dir, device="cpu").save_pretrained(out)


def transformers_folder(model_dir: str | Path, out: str | Path) -> Path:
    """The transformers format from a model folder (`mmdlm.hf_export`)."""
    from mmdlm.hf_export import export_transformers

    return export_transformers(model_dir, out)


WRITERS: dict[str, Callable[[str | Path, str | Path], Path]] = {"mmdlm": copy_model_folder,
                                                                 "transformers": transformers_folder}


def export_model(ckpt: str | None, model: str | None, out: str, export_format: str, use_ema: bool = True) -> Path:
    """Write `out` in `export_format` (a key of `WRITERS`) from a checkpoint (`ckpt`) or a model folder (`model`)."""
    from mmdlm.training.checkpoint import export_checkpoint

    write = WRITERS[export_format]
    if ckpt is None:
        return write(model, out)
    if write is copy_model_folder:  # a checkpoint's own export is the mmdlm format
        return export_checkpoint(ckpt, out, use_ema=use_ema)
    with tempfile.TemporaryDirectory(prefix="mmdlm-export-") as tmp:
        return write(export_checkpoint(ckpt, Path(tmp) / "model", use_ema=use_ema), out)


def main(argv: list[str] | None = None, prog: str = "mmdlm export") -> None:
    """Export a training checkpoint or a model folder as a self-contained model folder."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="Lightning checkpoint (.ckpt) of a LitMDM run")
    parser.add_argument("--model", metavar="FOLDER", help="an mmdlm model folder (instead of --ckpt)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", choices=list(WRITERS), default="mmdlm",
                        help="mmdlm: an mmdlm model folder; transformers: a transformers remote-code folder")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA ones (--ckpt)")
    args = parser.parse_args(argv)
    if (args.ckpt is None) == (args.model is None):
        parser.exit(2, "error: give exactly one of --ckpt (a training checkpoint) and --model (a model folder)\n")
    if args.no_ema and args.model is not None:
        parser.exit(2, "error: --no-ema chooses a checkpoint's weights; a model folder holds one set (drop it)\n")
    try:
        out = export_model(args.ckpt, args.model, args.out, args.format, use_ema=not args.no_ema)
    except (OSError, ValueError) as err:  # UserError, CheckpointError, a missing file, a bad tokenizer folder
        parser.exit(2, f"error: {err}\n")
    print(f"exported {args.ckpt or args.model} -> {out} ({args.format} format)")


if __name__ == "__main__":
    main()
