"""Export a trained model as a self-contained folder that `MMDLMPipeline.from_pretrained` loads.

    python -m mmdlm.export --ckpt runs/quickstart/mdm-run/checkpoints/last.ckpt --out runs/my-model

Folder layout (diffusers/transformers style, no Lightning needed to load it):

    config.json          model config, vocab sizes, sequence layout
    model.safetensors    transformer weights (the EMA weights when the run kept them)
    text_tokenizer/      the text tokenizer (tokenizer.json)
    vq/                  the VQ image tokenizer (diffusers VQModel folder)
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from mmdlm.model import Transformer
from mmdlm.sequence import Layout
from mmdlm.text_tokenizer import load_text_tokenizer
from mmdlm.vocab import Vocab

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def export_model(model: Transformer, vocab: Vocab, layout: Layout, text_tokenizer: str | Path,
                 vq: str | Path, out_dir: str | Path) -> Path:
    """Write `model` (its current weights), its tokenizers and layout into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_text_tokenizer(text_tokenizer).save(out / "text_tokenizer")
    vq = Path(vq)
    if not (vq / "config.json").is_file():
        raise FileNotFoundError(f"VQ tokenizer folder {str(vq)!r} has no config.json")
    if vq.resolve() != (out / "vq").resolve():
        shutil.copytree(vq, out / "vq", dirs_exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    config = {"model": asdict(model.config), "vocab": vocab.to_dict(), "layout": asdict(layout),
              "format": "mmdlm-1"}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, use_ema: bool = True) -> Path:
    """Export a Lightning checkpoint of `mmdlm.lightning.LitMDM` (EMA weights when present)."""
    from mmdlm.model import ModelConfig

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    meta = state.get("mmdlm")
    if meta is None:
        raise ValueError(f"{str(ckpt)!r} is not an mmdlm model checkpoint (no 'mmdlm' entry)")
    model = Transformer(ModelConfig(**meta["model_config"]))
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    if use_ema and "ema" in state:
        weights.update(state["ema"])
    model.load_state_dict(weights)
    return export_model(model, Vocab(**meta["vocab"]), Layout(**meta["layout"]), meta["text_tokenizer"],
                        meta["vq"], out_dir)


def main(argv: list[str] | None = None) -> None:
    """Export a training checkpoint as a self-contained model folder."""
    parser = argparse.ArgumentParser(prog="python -m mmdlm.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="Lightning checkpoint (.ckpt) of a LitMDM run")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--no-ema", action="store_true", help="export the raw weights, not the EMA ones")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt, args.out, use_ema=not args.no_ema)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"exported {args.ckpt} -> {out}")


if __name__ == "__main__":
    main()
