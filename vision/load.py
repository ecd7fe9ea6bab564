"""Load any image tokenizer folder: the diffusers class named in its config.json picks the tokenizer class.

    from vision.load import load_image_tokenizer
    tok = load_image_tokenizer("runs/quickstart/vq")    # a VQModel or a PatchTokenizer folder
    codes = tok.encode(images); images = tok.decode(codes)

Both classes share the interface the rest of mmdlm uses: `encode`, `decode`, `codebook_size`, `grid`,
`tokens_per_image`, `image_size`, `codebook_vectors()`, `save_pretrained`, `.to(device)`.
A pipeline folder with a `vqvae/` subfolder (aMUSEd's layout) loads its `vqvae`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from vision.patch_tokenizer import PatchTokenizer
from vision.tokenizer import VQTokenizer

CONFIG_FILE = "config.json"

# diffusers `_class_name` -> how to load a folder of it (image_size overrides the saved one when given)
LOADERS: dict[str, Callable[[Path, int | None], torch.nn.Module]] = {
    "VQModel": lambda folder, image_size: VQTokenizer.from_pretrained(folder, image_size=image_size),
    "PatchTokenizer": lambda folder, image_size: PatchTokenizer.from_pretrained(folder, low_cpu_mem_usage=False).eval(),
}


def tokenizer_folder(path: str | Path) -> tuple[Path, str]:
    """(the folder holding the tokenizer's config.json, its `_class_name`), with clear errors for bad paths."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"image tokenizer folder {str(path)!r} does not exist")
    if not (folder / CONFIG_FILE).is_file() and (folder / "vqvae" / CONFIG_FILE).is_file():
        folder = folder / "vqvae"
    config = folder / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not an image tokenizer folder: it has no {CONFIG_FILE}")
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{str(config)!r} is not a valid diffusers config: {e}") from e
    if class_name not in LOADERS:
        raise ValueError(f"{str(path)!r} holds a {class_name!r}; image tokenizers are one of {sorted(LOADERS)}")
    return folder, class_name


def load_image_tokenizer(path: str | Path, image_size: int | None = None) -> torch.nn.Module:
    """A `VQTokenizer` or `PatchTokenizer` from its folder, in eval mode."""
    folder, class_name = tokenizer_folder(path)
    try:
        return LOADERS[class_name](folder, image_size)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise OSError(f"could not load the {class_name} in {str(path)!r}: {e}") from e
