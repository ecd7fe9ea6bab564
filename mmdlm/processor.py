"""`MMDLMProcessor`: the text tokenizer, the image tokenizer, the joint `Vocab` and the sequence `Layout` in one object.

Hugging Face's processors (`transformers.ProcessorMixin`: a tokenizer and an image processor with one
`save_pretrained` / `from_pretrained`) are the model for it: everything that turns user input into ids and
ids back into text and images, saved and loaded as one. The DataModule builds one from its `--data.*` paths
(`from_paths`), the pipeline loads one from a model folder (`from_pretrained`), and
`mmdlm.folder.write_model_folder` writes it into a model folder (`save_pretrained`: `text_tokenizer/` and `vq/`;
config.json and the weights are the folder writer's). The model reads what it needs at build time from it: the
vocabulary, the longest sequence (`max_seq_len`), the image grid and the codebook features (`code_features`).

    processor = MMDLMProcessor.from_pretrained("runs/quickstart/model")
    codes = processor.encode_images([image])                     # Long[1, h, w]
    ids = processor.encode_text("what color?", limit=processor.layout.question_len, what="question")
    processor.decode_text(ids)                                   # 'what color?'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mmdlm.folder import CONFIG_FILE, read_config
from mmdlm.sequence import Layout, caption_prompt, joint_prompt, t2i_prompt, text_prompt, vqa_prompt
from mmdlm.text_tokenizer import TextTokenizer, load_text_tokenizer
from mmdlm.vocab import Vocab

TEXT_TOKENIZER_DIR = "text_tokenizer"  # a model folder's text tokenizer (`TextTokenizer.save`)
VQ_DIR = "vq"  # a model folder's image tokenizer (a diffusers VQModel or PatchTokenizer folder)


class MMDLMProcessor:
    """Text tokenizer + image tokenizer + `Vocab` + `Layout`; see the module docstring.

    Args:
        tokenizer: the text tokenizer (`mmdlm.text_tokenizer`).
        vq: the image tokenizer (`vision.load.load_image_tokenizer`: a `PatchTokenizer` or a `VQTokenizer`).
        layout: the fixed text-region lengths of the sequences; default `Layout()`.
        tokenizer_path, vq_path: where the tokenizers were loaded from, when they were: checkpoints record
            them (absolute) and `save_pretrained` copies the image tokenizer's folder as it is.
    """

    def __init__(self, tokenizer: TextTokenizer, vq: torch.nn.Module, layout: Layout | None = None,
                 tokenizer_path: str | Path | None = None, vq_path: str | Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.vq = vq.eval()
        self.vocab = Vocab(tokenizer.vocab_size, vq.codebook_size)  # the ids follow from the two sizes
        self.layout = layout or Layout()
        self.tokenizer_path, self.vq_path = tokenizer_path, vq_path
        self.device = next(vq.parameters()).device

    # ---- loading / saving -------------------------------------------------------------------------
    @classmethod
    def from_paths(cls, text_tokenizer: str | Path, vq: str | Path, layout: Layout | None = None) -> MMDLMProcessor:
        """Load the tokenizers a training run names (`--data.text_tokenizer`, `--data.vq`): a text tokenizer
        folder, `tokenizer.json` or `open_clip`, and an image tokenizer folder (`vision.load`)."""
        from vision.load import load_image_tokenizer

        tokenizer = load_text_tokenizer(text_tokenizer)  # first: its error names a missing path
        return cls(tokenizer, load_image_tokenizer(vq), layout, tokenizer_path=text_tokenizer, vq_path=vq)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> MMDLMProcessor:
        """The processor of a model folder (`mmdlm export`, `save_pretrained`): its `text_tokenizer/` and `vq/`,
        and the layout recorded in its config.json, whose vocabulary must be the tokenizers' one."""
        folder = Path(folder)
        config = read_config(folder)
        for sub in (TEXT_TOKENIZER_DIR, VQ_DIR):
            if not (folder / sub).exists():
                raise FileNotFoundError(f"model folder {str(folder)!r} has no {sub}/ (a model folder holds its "
                                        f"tokenizers beside {CONFIG_FILE}: {TEXT_TOKENIZER_DIR}/ and {VQ_DIR}/)")
        if not isinstance(config.get("layout"), dict):
            raise ValueError(f"{str(folder / CONFIG_FILE)!r} records no sequence layout ('layout')")
        processor = cls.from_paths(folder / TEXT_TOKENIZER_DIR, folder / VQ_DIR, Layout(**config["layout"]))
        recorded = config.get("vocab")
        if isinstance(recorded, dict) and recorded != processor.vocab.to_dict():
            ours = processor.vocab
            raise ValueError(f"{str(folder / CONFIG_FILE)!r} records a vocabulary of {recorded.get('text_size')} text "
                             f"ids and {recorded.get('codebook_size')} image codes, but the folder's tokenizers "
                             f"have {ours.text_size} and {ours.codebook_size}")
        return processor

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write `text_tokenizer/` and `vq/` into `folder` (created if needed). An image tokenizer loaded from
        a folder is copied from it file by file; one built in memory saves itself (`save_pretrained`)."""
        import shutil

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(folder / TEXT_TOKENIZER_DIR)
        if self.vq_path is None:
            self.vq.save_pretrained(folder / VQ_DIR)
        elif Path(self.vq_path).resolve() != (folder / VQ_DIR).resolve():
            shutil.copytree(self.vq_path, folder / VQ_DIR, dirs_exist_ok=True)
        return folder

    def sources(self) -> dict[str, str]:
        """The tokenizers' paths as a checkpoint records them (`text_tokenizer`, `vq`), made absolute so
        `mmdlm.commands.export --ckpt` works from any directory; empty for tokenizers built in memory."""
        paths = {"text_tokenizer": self.tokenizer_path, "vq": self.vq_path}
        return {key: absolute_path(path) for key, path in paths.items() if path is not None}

    def to(self, device: str | torch.device) -> MMDLMProcessor:
        """Move the image tokenizer to `device` (images are encoded and decoded there); returns self."""
        self.device = torch.device(device)
        self.vq.to(self.device)
        return self

    # ---- what the model is built from -------------------------------------------------------------
    @property
    def image_grid(self) -> tuple[int, int]:
        """(h, w): the code grid of one image."""
        return tuple(self.vq.grid)

    @property
    def max_seq_len(self) -> int:
        """The longest sequence under this layout (VQA with `qa_per_sample` pairs, usually)."""
        return longest_sequence(self.vocab, self.layout, self.image_grid)

    def code_features(self) -> torch.Tensor:
        """Float[K, e + 3*f*f]: what the image tokenizer knows about each code, for the image-token embeddings.

        The code vector alone (e = 8 dims here) encodes colour only through the decoder's nonlinearity;
        the f x f RGB patch a code decodes to (on a canvas of itself) states it outright, so the transformer
        sees a code's colour and edge shape from step 1 instead of learning them from ~1k sightings.
        """
        return code_features(self.vq)

    # ---- inputs -----------------------------------------------------------------------------------
    def image_tensor(self, images: Any) -> torch.Tensor:
        """PIL images / paths / Float[B,3,H,W] in [0,1] -> Float[B,3,S,S] at the image tokenizer's size, on
        its device."""
        from torchvision.transforms import InterpolationMode, v2

        from vision.images import image_to_tensor

        size = self.vq.image_size
        if isinstance(images, torch.Tensor):
            x = images if images.dim() == 4 else images[None]
        else:
            tensors = []
            for im in images:
                if isinstance(im, str | Path):
                    try:
                        im = Image.open(im)
                        im.load()
                    except (OSError, ValueError) as err:
                        raise ValueError(f"cannot read image {str(im)!r}: {err}") from err
                tensors.append(image_to_tensor(im, size))  # the data path's decoding: alpha onto black, bicubic
            x = torch.stack(tensors)  # (B, 3, S, S)
        if x.shape[-1] != size or x.shape[-2] != size:
            resize = v2.Resize(size, interpolation=InterpolationMode.BICUBIC, antialias=True)
            x = v2.Compose([resize, v2.CenterCrop(size)])(x).clamp(0, 1)  # (B, 3, S, S)
        return x.to(self.device)

    @torch.no_grad()
    def encode_images(self, images: Any) -> torch.Tensor:
        """Images (as `image_tensor` takes them) -> codes Long[B, h, w]."""
        return self.vq.encode(self.image_tensor(images))

    def token_mask(self, region_mask: torch.Tensor) -> torch.Tensor:
        """Pixel mask Bool[B, H, W] -> token mask Bool[B, h, w] (max-pool); token masks pass through."""
        h, w = self.image_grid
        m = region_mask.bool()
        if m.dim() == 2:
            m = m[None]
        if m.shape[-2:] == (h, w):
            return m
        f = m.shape[-1] // w
        return torch.nn.functional.max_pool2d(m.float()[:, None], f)[:, 0].bool()  # (B, h, w)

    def encode_text(self, text: str, limit: int | None = None, what: str = "text") -> list[int]:
        """Text ids of `text`; a `ValueError` naming `what` when there are more than `limit` of them."""
        ids = self.tokenizer.encode(text)
        if limit is not None and len(ids) > limit:
            raise ValueError(f"{what} is {len(ids)} tokens, longer than the model's limit of {limit}: {text!r}")
        return ids

    # ---- outputs ----------------------------------------------------------------------------------
    def decode_text(self, ids: list[int] | torch.Tensor) -> str:
        """The text of a region of joint-vocabulary ids (image ids and specials dropped)."""
        return self.tokenizer.decode(self.vocab.text_ids_only(ids))

    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes Long[B, h, w] -> images Float[B, 3, H, W] in [0, 1]."""
        with torch.no_grad():
            return self.vq.decode(codes)

    def __repr__(self) -> str:
        return (f"MMDLMProcessor(tokenizer={type(self.tokenizer).__name__}, vq={type(self.vq).__name__}, "
                f"vocab={self.vocab}, layout={self.layout})")


def longest_sequence(vocab: Vocab, layout: Layout, grid: tuple[int, int]) -> int:
    """The length of the longest task template under `layout` with images of `grid` codes."""
    n = grid[0] * grid[1]
    codes = torch.zeros(grid, dtype=torch.long, device="cpu")  # (h, w); not a trainer's device context
    templates = [t2i_prompt([], vocab, layout, n), caption_prompt(codes, vocab, layout), joint_prompt(vocab, layout, n),
                 vqa_prompt(codes, [[0]] * layout.qa_per_sample, vocab, layout), text_prompt([], vocab, layout)]
    return max(len(t) for t in templates)


@torch.no_grad()
def code_features(vq: torch.nn.Module) -> torch.Tensor:
    """Float[K, e + 3*f*f]: each VQ code's vector and the centre f x f patch of an image of only that code."""
    K, (h, w) = vq.codebook_size, vq.grid
    images = torch.cat([vq.decode(torch.full((n, h, w), 0, dtype=torch.long) + torch.arange(i, i + n)[:, None, None])
                        for i in range(0, K, 64) for n in [min(64, K - i)]])  # (K, 3, H, W)
    f = images.shape[-1] // w
    r, c = (h // 2) * f, (w // 2) * f
    patches = images[:, :, r : r + f, c : c + f].reshape(K, -1)  # (K, 3*f*f)
    return torch.cat([vq.codebook_vectors().float().cpu(), patches.float().cpu()], dim=1)


def absolute_path(path: str | Path) -> str:
    """An existing local path made absolute; anything else (`open_clip`, a path gone since) as given."""
    local = Path(path).expanduser()
    return str(local.resolve()) if str(path) != "open_clip" and local.exists() else str(path)

