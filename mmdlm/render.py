"""Pictures of model outputs: image tensors as upscaled grids and PIL images, still-masked token cells in grey,
captions drawn under their images, and the denoising process as frames and a GIF. Shared by `mmdlm generate`
and the web demo (`mmdlm.demo`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from mmdlm.pipeline import MMDLMPipeline

GREY = 0.5  # the colour of a still-masked token cell
PADDING = 2  # pixels between grid tiles (torchvision's make_grid default)


def upscale(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Float[B, 3, H, W] -> Float[B, 3, H*scale, W*scale], nearest neighbour (keeps pixels crisp)."""
    return torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest") if scale > 1 else images


def make_grid(images: torch.Tensor, nrow: int, scale: int = 4) -> torch.Tensor:
    """Float[B, 3, H, W] in [0, 1] -> one Float[3, H', W'] grid with `nrow` images a row."""
    from torchvision.utils import make_grid as tv_make_grid

    return tv_make_grid(upscale(images.cpu().clamp(0, 1), scale), nrow=nrow, padding=PADDING, pad_value=1.0)


def to_pil(image: torch.Tensor) -> Image.Image:
    """Float[3, H, W] in [0, 1] -> an RGB PIL image."""
    from torchvision.transforms.functional import to_pil_image

    return to_pil_image(image.clamp(0, 1))


def save_grid(grid: torch.Tensor, path: Path) -> None:
    """A grid Float[3, H, W] as a PNG file (its folder created)."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)


def paint_masked(images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Grey out token cells: images Float[B, 3, H, W], masked Bool[B, h, w] -> Float[B, 3, H, W]."""
    f = images.shape[-1] // masked.shape[-1]  # pixels per token cell
    pixels = masked.repeat_interleave(f, dim=-2).repeat_interleave(f, dim=-1)[:, None]  # (B, 1, H, W)
    return torch.where(pixels.to(images.device), torch.full_like(images, GREY), images)


@torch.no_grad()
def decode_canvas(pipe: MMDLMPipeline, codes: torch.Tensor) -> torch.Tensor:
    """A partly denoised canvas Long[B, h, w] (-1 = masked) -> Float[B, 3, H, W], masked cells grey."""
    masked = codes < 0
    images = pipe.vq.decode(codes.clamp(min=0).to(pipe.device)).cpu()  # any code under the grey
    return paint_masked(images, masked)


def progress_frames(pipe: MMDLMPipeline, history: Sequence[torch.Tensor], nrow: int,
                    scale: int = 4) -> list[Image.Image]:
    """One grid picture per denoising step (the canvas after that step)."""
    return [to_pil(make_grid(decode_canvas(pipe, codes), nrow, scale)) for codes in history]


def save_gif(frames: Sequence[Image.Image], fp, frame_ms: int = 200, hold_ms: int = 1500) -> None:
    """An endlessly looping animation that holds the last frame; `fp` a path or a binary file."""
    durations = [frame_ms] * (len(frames) - 1) + [hold_ms]
    frames[0].save(fp, format="GIF", save_all=True, append_images=list(frames[1:]), duration=durations, loop=0)


def write_progress(pipe: MMDLMPipeline, history: Sequence[torch.Tensor], nrow: int, scale: int,
                   out_dir: Path) -> list[Path]:
    """DIR/step_000.png ... (one per step) and DIR/progress.gif; returns the frame paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = progress_frames(pipe, history, nrow, scale)
    paths = [out_dir / f"step_{i:03d}.png" for i in range(len(frames))]
    for frame, path in zip(frames, paths):
        frame.save(path)
    save_gif(frames, out_dir / "progress.gif")
    return paths


def printable(text: str) -> str:
    """Text safe to print or draw: control characters (an untrained model emits them) become '?'."""
    return "".join(c if c.isprintable() else "?" for c in text)


def wrap(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
         width: int, max_lines: int = 4) -> list[str]:
    """Greedy word wrap to `width` pixels (a word too long for a line is cut), at most `max_lines`."""
    lines: list[str] = []
    for word in text.split():
        if len(lines) > max_lines:
            break
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and draw.textlength(candidate, font=font) <= width:
            lines[-1] = candidate
            continue
        while len(word) > 1 and draw.textlength(word, font=font) > width:
            cut = 1
            while cut < len(word) - 1 and draw.textlength(word[: cut + 1], font=font) <= width:
                cut += 1
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines[:max_lines]


def captioned_grid(images: torch.Tensor, captions: Sequence[str], nrow: int, scale: int = 4) -> Image.Image:
    """Images Float[B, 3, H, W] with each caption written in a white band under its image."""
    font = ImageFont.load_default()
    tiles = [to_pil(t) for t in upscale(images.cpu().clamp(0, 1), scale)]
    side = tiles[0].width
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap(printable(c), probe, font, side - 4) for c in captions]
    line_h = int(font.getbbox("Ag")[3]) + 3
    band = line_h * max(1, max(len(w) for w in wrapped)) + 4
    rows = -(-len(tiles) // nrow)
    sheet = Image.new("RGB", (nrow * (side + PADDING) + PADDING, rows * (side + band + PADDING) + PADDING), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        x = PADDING + (i % nrow) * (side + PADDING)
        y = PADDING + (i // nrow) * (side + band + PADDING)
        sheet.paste(tile, (x, y))
        for k, line in enumerate(lines):
            draw.text((x + 2, y + side + 2 + k * line_h), line, fill="black", font=font)
    return sheet
