"""Export a trained model as a self-contained folder that `MMDLMPipeline.from_pretrained` loads.

    python -m mmdlm.export --ckpt runs/quickstart/mdm-run/checkpoints/last.ckpt --out runs/my-model

Folder layout (diffusers/transformers style, no Lightning needed to load it), written by
`write_model_folder` alone (for this export, `MMDLMPipeline.save_pretrained` and the end of a training run):

    config.json          model config, vocab sizes, sequence layout, and the sha256 of model.safetensors
    model.safetensors    transformer weights (the EMA weights when the run kept them)
    text_tokenizer/      the text tokenizer (tokenizer.json)           } the `MMDLMProcessor`
    vq/                  the image tokenizer (a diffusers VQModel or   } (`mmdlm.processor`)
                         PatchTokenizer folder)

The checkpoint is read with `torch.load(..., weights_only=True)`: tensors and plain Python values only,
so a crafted `.ckpt` cannot run code; one that names any other Python object is refused. The sha256 of
model.safetensors recorded in config.json is checked by `from_pretrained`, so a damaged copy is refused.

Exit status: 0 exported; 2 a missing, unreadable, unsafe or non-mmdlm checkpoint, or an unusable
tokenizer path in it, with a one-sentence error on stderr.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from mmdlm.model import Transformer

if TYPE_CHECKING:
    from mmdlm.processor import MMDLMProcessor

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUM_KEY = "weights_sha256"  # config.json: the sha256 (hex) of model.safetensors
FORMAT = "mmdlm-1"


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported, said in one sentence."""


class CorruptModelError(ValueError):
    """A model folder whose model.safetensors does not match the checksum recorded at export."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_config(folder: str | Path) -> dict[str, Any]:
    """A model folder's config.json as a dict; `FileNotFoundError` / `ValueError` saying what is wrong with it."""
    config_file = Path(folder) / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not an mmdlm model folder (no {CONFIG_FILE})")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({err})") from err
    if not isinstance(config, dict) or "model" not in config or "vocab" not in config:
        raise ValueError(f"{str(config_file)!r} is not an mmdlm model config (no 'model'/'vocab' keys)")
    return config


def write_model_folder(model: Transformer, processor: MMDLMProcessor, out_dir: str | Path) -> Path:
    """The one writer of a model folder: the processor's `text_tokenizer/` and `vq/`, model.safetensors (the
    model's current weights), then config.json with the model config, vocab sizes, layout and the weights'
    sha256."""
    out = Path(out_dir)
    processor.save_pretrained(out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    config = {"model": asdict(model.config), "vocab": processor.vocab.to_dict(), "layout": asdict(processor.layout),
              "format": FORMAT, CHECKSUM_KEY: sha256_file(out / WEIGHTS_FILE)}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out


def verify_weights(folder: str | Path, config: dict) -> bool:
    """Check model.safetensors against the sha256 recorded in `config`; False when none is recorded
    (a folder exported before checksums), `CorruptModelError` when it differs."""
    expected = config.get(CHECKSUM_KEY)
    if expected is None:
        return False
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"model folder {str(folder)!r} has no {WEIGHTS_FILE}")
    if sha256_file(weights) != expected:
        raise CorruptModelError(f"{str(weights)!r} is damaged: its sha256 differs from the one recorded in "
                                f"{CONFIG_FILE} at export (copy or export the model again)")
    return True


def load_checkpoint(ckpt: str | Path) -> dict[str, Any]:
    """A checkpoint's contents, read with `weights_only=True`; `CheckpointError` if that is not possible."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {str(ckpt)!r} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols on the way to refusing a file
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL (\S+)", str(err))
        if named:
            raise CheckpointError(f"refusing to load {str(ckpt)!r}: it names the Python object {named[1]!r}, "
                                  f"which could run code when unpickled (an mmdlm checkpoint holds only tensors "
                                  f"and plain values)") from err
        raise CheckpointError(f"{str(ckpt)!r} is not a checkpoint that can be loaded safely (it is not a "
                              f"PyTorch file of tensors and plain values)") from err
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as err:  # not a torch file, or truncated
        raise CheckpointError(f"{str(ckpt)!r} is not a PyTorch checkpoint (or it is truncated)") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(ckpt)!r} is not a Lightning checkpoint (it holds a "
                              f"{type(state).__name__}, not a dict)")
    return state


def export_checkpoint(ckpt: str | Path, out_dir: str | Path, use_ema: bool = True) -> Path:
    """Export a Lightning checkpoint of `mmdlm.lightning.LitMDM` (EMA weights when present)."""
    from mmdlm.model import ModelConfig
    from mmdlm.processor import MMDLMProcessor
    from mmdlm.sequence import Layout
    from mmdlm.vocab import Vocab

    state = load_checkpoint(ckpt)
    meta = state.get("mmdlm")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{str(ckpt)!r} is not an mmdlm model checkpoint (no 'mmdlm' entry)")
    try:
        config = dict(meta["model_config"])
        if isinstance(config.get("image_grid"), list):
            config["image_grid"] = tuple(config["image_grid"])
        model = Transformer(ModelConfig(**config))
        weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
        if use_ema and "ema" in state:
            weights.update(state["ema"])
        model.load_state_dict(weights)
        vocab, layout = Vocab(**meta["vocab"]), Layout(**meta["layout"])
        text_tokenizer, vq = meta["text_tokenizer"], meta["vq"]
    except KeyError as err:
        raise CheckpointError(f"{str(ckpt)!r} is an incomplete mmdlm checkpoint (no {err.args[0]!r} entry)") from err
    except (TypeError, ValueError, RuntimeError, AttributeError) as err:  # wrong config fields, mismatched weights
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{str(ckpt)!r} holds a model that cannot be rebuilt: {first}") from err
    if not (Path(vq) / CONFIG_FILE).is_file():  # before loading: the message names the recorded folder
        raise FileNotFoundError(f"VQ tokenizer folder {str(vq)!r} has no {CONFIG_FILE}")
    processor = MMDLMProcessor.from_paths(text_tokenizer, vq, layout)
    if processor.vocab != vocab:
        raise CheckpointError(f"{str(ckpt)!r} was trained with {vocab.text_size} text ids and {vocab.codebook_size} "
                              f"image codes, but the tokenizers it names ({text_tokenizer}, {vq}) now have "
                              f"{processor.vocab.text_size} and {processor.vocab.codebook_size}")
    return write_model_folder(model, processor, out_dir)


def main(argv: list[str] | None = None, prog: str = "python -m mmdlm.export") -> None:
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
