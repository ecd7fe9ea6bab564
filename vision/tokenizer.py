"""The VQ image tokenizer of mmdlm: images <-> grids of discrete codes, on diffusers' `VQModel`.

A VQ-VAE (van den Oord et al. 2017) in the VQGAN layout (Esser et al. 2021) as implemented by diffusers'
`VQModel`, used the way aMUSEd (Patil et al. 2024) uses it: the ids come from the quantizer
(`VQModel.encode` returns latents, not ids) and decoding ids looks their vectors up in the codebook and runs
the decoder on them without quantizing again (`force_not_quantize`). Any diffusers `VQModel` folder loads
(config.json + diffusion_pytorch_model.safetensors, e.g. aMUSEd's `vqvae`); mmdlm's own extra (the image
size) sits beside it in `mmdlm_vq.json`. `VQTokenizer.new(...)` builds the small model that
`vision.lightning.VQLitModule` trains on CPU in minutes.

    tok = VQTokenizer.from_pretrained("runs/quickstart/vq")
    codes = tok.encode(images)      # (B, 3, 32, 32) in [0, 1] -> (B, 8, 8) int64 in [0, codebook_size)
    images = tok.decode(codes)      # (B, 8, 8) -> (B, 3, 32, 32) in [0, 1]
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers import VQModel
from torch import nn

EXTRA_FILE = "mmdlm_vq.json"  # mmdlm's info beside the diffusers folder (diffusers ignores unknown files)
CONFIG_FILE = "config.json"  # diffusers' config of the VQModel


def read_tokenizer_folder(path: str | Path) -> tuple[Path, str | None]:
    """(the folder holding a diffusers config.json, its `_class_name`), with errors that name the path.

    A pipeline folder with a `vqvae/` subfolder (aMUSEd's layout) resolves to that subfolder.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"image tokenizer folder {str(path)!r} does not exist")
    if not (folder / CONFIG_FILE).is_file() and (folder / "vqvae" / CONFIG_FILE).is_file():
        folder = folder / "vqvae"
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not an image tokenizer folder: it has no {CONFIG_FILE}")
    try:
        return folder, json.loads(config_path.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ValueError(f"{str(config_path)!r} is not a valid diffusers config: {e}") from e


def check_codes(codes: torch.Tensor, codebook_size: int) -> None:
    """Raise unless `codes` is an integer (B, h, w) grid of ids in [0, codebook_size)."""
    if codes.dim() != 3 or codes.dtype.is_floating_point:
        raise ValueError(f"decode takes integer codes of shape (B, h, w), got {tuple(codes.shape)} {codes.dtype}")
    lo, hi = int(codes.min()), int(codes.max())
    if lo < 0 or hi >= codebook_size:
        raise ValueError(f"codes must be in [0, {codebook_size}), got [{lo}, {hi}]")


class CodeGrid:
    """The code grid of a tokenizer of square `image_size` images with `downsample` pixels per code."""

    image_size: int
    downsample: int

    @property
    def grid(self) -> tuple[int, int]:
        """(h, w): the code grid of one image."""
        side = self.image_size // self.downsample
        return side, side

    @property
    def tokens_per_image(self) -> int:
        """h * w."""
        h, w = self.grid
        return h * w


@dataclass
class VQConfig:
    """The architecture of a new tokenizer (`VQTokenizer.new`); the defaults train on 2 CPU cores in minutes."""

    image_size: int = 32  # the shapes world renders 32x32 scenes
    codebook_size: int = 256  # shapes has ~1.5k distinct 4x4 patches, mostly edges of 8 colours; fewer codes =
    #   more sightings per code for the transformer (BENCHMARKS.md, founding measurements); the decoder's
    #   context resolves the rest
    downsample: int = 4  # 32 / 4 = 8x8 = 64 tokens per image; a power of two (one stage per halving)
    channels: int = 32  # width of the full-resolution stage: its convs dominate CPU time (64 is 3.5x slower)
    max_channels: int = 64  # width doubles per halving up to this: 32 -> (32, 64, 64)
    layers_per_block: int = 1  # resnet blocks per stage (the decoder has one more); enough for flat shapes
    embed_dim: int = 8  # code vector size: small codes keep the codebook alive (ViT-VQGAN, Yu et al. 2022)
    norm_groups: int = 8  # GroupNorm groups; must divide every stage's width
    attention: bool = False  # mid-block self-attention: +10% time at 8x8, no gain measured on shapes

    def block_channels(self) -> tuple[int, ...]:
        """Widths of the encoder stages, full resolution first."""
        stages = int(math.log2(self.downsample)) + 1
        if 2 ** (stages - 1) != self.downsample:
            raise ValueError(f"downsample must be a power of two, got {self.downsample}")
        return tuple(min(self.channels * 2**i, self.max_channels) for i in range(stages))

    def vqmodel_kwargs(self) -> dict:
        """The diffusers `VQModel` arguments for this architecture."""
        channels = self.block_channels()
        return dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=self.layers_per_block,
            latent_channels=self.embed_dim,
            vq_embed_dim=self.embed_dim,
            num_vq_embeddings=self.codebook_size,
            norm_num_groups=self.norm_groups,
            sample_size=self.image_size,
            mid_block_add_attention=self.attention,
            lookup_from_codebook=False,  # vision.tokenizer looks codes up itself; diffusers' decode(h) stays latents
        )


class VQOutput(NamedTuple):
    """What one training forward returns (`VQTokenizer.forward`)."""

    recon: torch.Tensor  # (B, 3, H, W) reconstruction in [0, 1] scale, not clamped (losses see the overshoot)
    latents: torch.Tensor  # (B, e, h, w) encoder output before quantization
    codes_vectors: torch.Tensor  # (B, e, h, w) the chosen codebook vectors (gradient flows to the codebook)
    codes: torch.Tensor  # (B, h, w) int64 code ids


class VQTokenizer(CodeGrid, nn.Module):
    """Images in [0, 1] <-> code grids, wrapping a diffusers `VQModel` (kept as `.model`).

    Args:
        model: the diffusers `VQModel`.
        image_size: the side of the square images it takes; defaults to the model's `sample_size`.
    """

    def __init__(self, model: VQModel, image_size: int | None = None) -> None:
        super().__init__()
        if not isinstance(model, VQModel):
            raise TypeError(f"VQTokenizer wraps a diffusers VQModel, got {type(model).__name__}")
        self.model = model
        self.image_size = int(image_size if image_size is not None else model.config.sample_size)
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the downsampling {self.downsample}")

    # ----------------------------------------------------------------------------------------- construction
    @classmethod
    def new(cls, config: VQConfig | None = None, **overrides) -> VQTokenizer:
        """A fresh, untrained tokenizer: `VQTokenizer.new(image_size=32, codebook_size=512, downsample=4)`."""
        config = VQConfig(**{**(asdict(config) if config else {}), **overrides})
        return cls(VQModel(**config.vqmodel_kwargs()), image_size=config.image_size)

    @classmethod
    def from_pretrained(cls, path: str | Path, image_size: int | None = None) -> VQTokenizer:
        """Load a diffusers `VQModel` folder (or a pipeline folder with a `vqvae/` one, as aMUSEd's).

        `image_size` overrides the one saved by mmdlm (or, for a foreign folder, the config's `sample_size`).
        """
        folder, class_name = read_tokenizer_folder(path)
        if class_name != VQModel.__name__:
            raise ValueError(f"{str(path)!r} holds a {class_name!r}, not a diffusers VQModel")
        try:
            model = VQModel.from_pretrained(folder, low_cpu_mem_usage=False)  # no `accelerate` nag
        except (OSError, ValueError, RuntimeError) as e:
            raise OSError(f"could not load the VQModel in {str(path)!r}: {e}") from e
        extra_path = folder / EXTRA_FILE
        extra = json.loads(extra_path.read_text()) if extra_path.is_file() else {}
        return cls(model.eval(), image_size=image_size if image_size is not None else extra.get("image_size"))

    def save_pretrained(self, path: str | Path) -> None:
        """Write a diffusers `VQModel` folder (config.json + safetensors) plus `mmdlm_vq.json`."""
        folder = Path(path)
        self.model.save_pretrained(folder, safe_serialization=True)
        extra = {"image_size": self.image_size, "grid": list(self.grid), "codebook_size": self.codebook_size}
        (folder / EXTRA_FILE).write_text(json.dumps(extra, indent=2) + "\n")

    # ------------------------------------------------------------------------------------------- properties
    @property
    def codebook_size(self) -> int:
        """Number of codes K; ids are in [0, K)."""
        return int(self.model.config.num_vq_embeddings)

    @property
    def downsample(self) -> int:
        """Pixels per code along each side (diffusers halves the resolution in every stage but the last)."""
        return 2 ** (len(self.model.config.block_out_channels) - 1)

    @property
    def embed_dim(self) -> int:
        """Size e of a code vector."""
        return int(self.model.quantize.vq_embed_dim)

    @property
    def device(self) -> torch.device:
        return self.model.quantize.embedding.weight.device

    def codebook_vectors(self) -> torch.Tensor:
        """The code vectors, (K, e), detached (to initialise the transformer's image-token embeddings)."""
        return self.model.quantize.embedding.weight.detach().clone()

    # ----------------------------------------------------------------------------- differentiable pieces
    def latents(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, e, h, w) encoder output before quantization."""
        self._check_images(images)
        x = images.to(self.device, self.model.dtype) * 2 - 1  # (B, 3, H, W) in [-1, 1], as diffusers VAEs
        return self.model.encode(x).latents  # (B, e, h, w)

    def quantize(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes of (B, e, h, w) latents -> (codes (B, h, w), code vectors (B, e, h, w)).

        The ids come from diffusers' own quantizer, so they are what any diffusers user gets; its loss is not
        used (its beta is fixed and applied the legacy way), `vision.lightning` computes its own.
        """
        B, _, h, w = latents.shape
        _, _, (_, _, indices) = self.model.quantize(latents)
        codes = indices.reshape(B, h, w)  # (B, h, w)
        return codes, self.lookup(codes)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) ids -> (B, e, h, w) codebook vectors (the channel-first layout the decoder takes)."""
        B, h, w = codes.shape
        flat = codes.reshape(-1).to(self.device)  # (B*h*w,)
        return self.model.quantize.get_codebook_entry(flat, (B, h, w, self.embed_dim))  # (B, e, h, w)

    def decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """(B, e, h, w) code vectors -> (B, 3, H, W) images in [0, 1] scale, not clamped.

        The steps of `VQModel.decode(h, force_not_quantize=True)` after its quantizer, done here so that one
        path serves every folder (diffusers reads `h` as ids instead when `lookup_from_codebook` is set).
        """
        quant = self.model.post_quant_conv(vectors)  # (B, latent_channels, h, w)
        spatial = vectors if self.model.config.norm_type == "spatial" else None  # MoVQ-style decoders
        return (self.model.decoder(quant, spatial) + 1) / 2  # (B, 3, H, W)

    def forward(self, images: torch.Tensor) -> VQOutput:
        """The training forward: encode, quantize with a straight-through gradient, decode."""
        z = self.latents(images)  # (B, e, h, w)
        codes, e = self.quantize(z)  # (B, h, w), (B, e, h, w)
        z_q = z + (e - z).detach()  # (B, e, h, w) straight-through: values of e, gradient to the encoder
        return VQOutput(self.decode_vectors(z_q), z, e, codes)

    # ---------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, h, w) int64 codes (on the tokenizer's device)."""
        codes, _ = self.quantize(self.latents(images))
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) integer codes -> (B, 3, H, W) float images in [0, 1] (on the tokenizer's device)."""
        check_codes(codes, self.codebook_size)
        return self.decode_vectors(self.lookup(codes.long())).float().clamp(0, 1)  # (B, 3, H, W)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {tuple(images.shape[-2:])}")
