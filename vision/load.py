"""Load any image tokenizer folder: the diffusers class named in its config.json picks the tokenizer class.

    from vision.load import load_image_tokenizer
    tok = load_image_tokenizer("runs/quickstart/vq")    # a VQModel or a PatchTokenizer folder
    codes = tok.encode(images); images = tok.decode(codes)

Both classes share the interface the rest of mmdlm uses: `encode`, `decode`, `codebook_size`, `grid`,
`tokens_per_image`, `image_size`, `codebook_vectors()`, `save_pretrained`, `.to(device)`.
A pipeline folder with a `vqvae/` subfolder (aMUSEd's layout) loads its `vqvae`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from vision.patch_tokenizer import PatchTokenizer
from vision.tokenizer import VQTokenizer, read_tokenizer_folder

# diffusers `_class_name` -> how to load a folder of it (image_size overrides the saved one when given)
LOADERS: dict[str, Callable[[Path, int | None], torch.nn.Module]] = {
    "VQModel": lambda folder, image_size: VQTokenizer.from_pretrained(folder, image_size=image_size),
    "PatchTokenizer": lambda folder, image_size: PatchTokenizer.from_pretrained(folder, low_cpu_mem_usage=False).eval(),
}


def load_image_tokenizer(path: str | Path, image_size: int | None = None) -> torch.nn.Module:
    """A `VQTokenizer` or `PatchTokenizer` from its folder, in eval mode."""
    folder, class_name = read_tokenizer_folder(path)
    if class_name not in LOADERS:
        raise ValueError(f"{str(path)!r} holds a {class_name!r}; image tokenizers are one of {sorted(LOADERS)}")
    try:
        return LOADERS[class_name](folder, image_size)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise OSError(f"could not load the {class_name} in {str(path)!r}: {e}") from e
