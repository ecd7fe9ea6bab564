"""Lightning checkpoints of `LitMDM`: read safely, turned into a model folder (`mmdlm.folder`).

A LoRA run's checkpoint (`LitMDM(lora_rank=...)`, `mmdlm.lora`) is exported with its adapters merged into the
base weights, so every model folder holds plain weights.

A checkpoint is read with `torch.load(..., weights_only=True)`: tensors and plain Python values only, so a
crafted `.ckpt` cannot run code; one that names any other Python object is refused with one sentence.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from mmdlm.folder import CONFIG_FILE, write_model_folder
from mmdlm.lora import add_lora, merge_lora
from mmdlm.model import ModelConfig, Transformer
from mmdlm.processor import MMDLMProcessor
from mmdlm.sequence import Layout
from mmdlm.vocab import Vocab


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported, said in one sentence."""



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
    """Export a Lightning checkpoint of `mmdlm.training.LitMDM` (EMA weights when present; a LoRA run's adapters
    merged into the base weights)."""
    state = load_checkpoint(ckpt)
    meta = state.get("mmdlm")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{str(ckpt)!r} is not an mmdlm model checkpoint (no 'mmdlm' entry)")
    try:
        config = dict(meta["model_config"])
        if isinstance(config.get("image_grid"), list):
            config["image_grid"] = tuple(config["image_grid"])
        model = Transformer(ModelConfig(**config))
        hp = state.get("hyper_parameters", {})
        lora_rank = hp.get("lora_rank", 0)  # checkpoints from before LoRA have none
        if lora_rank > 0:  # the adapters the run trained, so its keys load; merged below
            add_lora(model, lora_rank, hp["lora_alpha"], hp["lora_targets"])
        weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
        if use_ema and "ema" in state:
            weights.update(state["ema"])
        model.load_state_dict(weights)
        if lora_rank > 0:
            merge_lora(model)
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
