"""The model folder: the one format every mmdlm model is saved in and loaded from.

A folder in the diffusers/transformers style, loadable without Lightning (`MMDLMPipeline.from_pretrained`):

    config.json          model config, vocab sizes, sequence layout, and the sha256 of model.safetensors
    model.safetensors    transformer weights (the EMA weights when the run kept them)
    text_tokenizer/      the text tokenizer (tokenizer.json)           } the `MMDLMProcessor`
    vq/                  the image tokenizer (a diffusers VQModel or   } (`mmdlm.processor`)
                         PatchTokenizer folder)

`write_model_folder` is its only writer (training's export, `mmdlm export`, `MMDLMPipeline.save_pretrained`);
`read_config` and `verify_weights` read it back, checking the recorded sha256 so a damaged copy is refused.
(`mmdlm.training.checkpoint.export_checkpoint` writes one from a Lightning checkpoint.)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import save_file

from mmdlm.model import Transformer

if TYPE_CHECKING:
    from mmdlm.processor import MMDLMProcessor

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKSUM_KEY = "weights_sha256"  # config.json: the sha256 (hex) of model.safetensors
FORMAT = "mmdlm-1"


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
