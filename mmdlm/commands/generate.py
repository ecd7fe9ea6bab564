"""Sample images from a model folder as PNG grids: text-to-image, image+caption pairs, inpainting, and
the denoising process frame by frame.

    python -m mmdlm.commands.generate --model runs/quickstart/model --prompt "a red circle at the top left" --num 8 \\
        --steps 12 --guidance 3 --out samples.png
    python -m mmdlm.commands.generate --model DIR --prompts prompts.txt --num 8 --out grid.png     # a row per prompt
    python -m mmdlm.commands.generate --model DIR --joint --num 8 --out joint.png                 # images + captions
    python -m mmdlm.commands.generate --model DIR --inpaint scene.png --box 0,0,16,16 --prompt "a blue square at the top left"
    python -m mmdlm.commands.generate --model DIR --edit scene.png --instruction "make the red circle blue" --num 4
    python -m mmdlm.commands.generate --model DIR --prompt "a green cross in the middle" --progress frames/   # + GIF
    python -m mmdlm.commands.generate --model DIR --device cpu --prompt "a small white square on the left" --num 4

Text-to-image writes `--num` samples per prompt, one row per prompt (a `--prompts` file has one prompt a
line; blank lines are skipped). `--joint` generates images and captions together from nothing, draws
each caption under its image and prints the captions. `--inpaint IMAGE --box x0,y0,x1,y1` regenerates
the image tokens under a pixel box (half-open, in the model's image-size coordinates, e.g. 0..32) and
writes one row: original | masked (regenerated token cells in grey) | `--num` results. `--edit IMAGE
--instruction TEXT` edits the image as the instruction says (a model trained on edits: configs/mdm-edits.yaml) and
writes one row: original | `--num` results; `--guidance` guides on the instruction, `--image-guidance` on the image.
`--progress DIR` (text-to-image) saves the canvas after each denoising step as DIR/step_000.png ...
(still-masked token cells grey) and the animation DIR/progress.gif.
Images are upscaled `--scale` times with nearest neighbour so 32x32 samples are visible.

Exit status: 0 written; 2 bad input (arguments, model folder missing or damaged, image, box, a prompt too
long or not valid UTF-8 text, a --prompts file that is not UTF-8), with a one-sentence error on stderr;
1 an unexpected failure (traceback).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image, ImageDraw, ImageFont

from mmdlm.inputs import (
    EXIT_OK,
    EXIT_USAGE,
    InputError,
    add_model_arguments,
    add_revision_arguments,
    check_text,
    load_image,
    load_pipeline,
    positive_int,
    revision_options,
)
from mmdlm.sampling.arguments import add_sampler_arguments, defaults_help, sampler_from_args

if TYPE_CHECKING:
    from mmdlm.pipeline import ImageOutput, MMDLMPipeline

GREY = 0.5  # the colour of a still-masked token cell
PADDING = 2  # pixels between grid tiles (torchvision's make_grid default)


# ---- pictures -------------------------------------------------------------------------------------------
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


# ---- tasks ----------------------------------------------------------------------------------------------
Box = tuple[int, int, int, int]


def parse_box(text: str) -> Box:
    """argparse type: 'x0,y0,x1,y1' -> four ints (checked against the image size once the model is loaded)."""
    try:
        x0, y0, x1, y1 = (int(p) for p in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected four integers x0,y0,x1,y1, got {text!r}") from err
    return x0, y0, x1, y1


def check_box(box: Box, size: int) -> Box:
    """`InputError` unless 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size (a half-open pixel box)."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise InputError(f"box {x0},{y0},{x1},{y1} is not a non-empty box inside the {size}x{size} image "
                         f"(need 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size})")
    return box


def box_mask(box: Box, size: int) -> torch.Tensor:
    """Bool[1, size, size], True inside the box."""
    x0, y0, x1, y1 = box
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[:, y0:y1, x0:x1] = True
    return mask


@dataclass
class Inpainting:
    original: torch.Tensor  # Float[1, 3, S, S] the input at the model's image size
    token_mask: torch.Tensor  # Bool[1, h, w] the token cells regenerated
    output: ImageOutput  # `num` results


def inpaint(pipe: MMDLMPipeline, image: Image.Image, box: Box, prompt: str | None = None, num: int = 1,
            **options) -> Inpainting:
    """Regenerate the tokens under a pixel box of `image`, `num` times (variations of the same input)."""
    size = pipe.vq.image_size
    mask = box_mask(check_box(box, size), size)
    original = pipe.image_tensor([image]).cpu()
    output = pipe.inpaint(original.repeat(num, 1, 1, 1), mask.repeat(num, 1, 1),
                          [prompt] * num if prompt else None, **options)
    return Inpainting(original, pipe.token_mask(mask).cpu(), output)


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The --prompt, or the lines of the --prompts file; `InputError` for a missing, empty or non-UTF-8 file."""
    if args.prompts is None:
        return [args.prompt]
    if not args.prompts.is_file():
        raise InputError(f"prompts file '{args.prompts}' does not exist")
    try:
        text = args.prompts.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"prompts file '{args.prompts}' is not UTF-8 text "
                         f"(byte 0x{err.object[err.start]:02x} at offset {err.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise InputError(f"prompts file '{args.prompts}' has no prompts")
    return prompts


def run_text_to_image(pipe: MMDLMPipeline, args: argparse.Namespace) -> None:
    prompts = read_prompts(args)
    n = len(prompts) * args.num
    start = time.perf_counter()
    out = pipe.text_to_image([p for p in prompts for _ in range(args.num)], args.sampler, seed=args.seed,
                             history=args.progress is not None, **args.revision)
    ms = (time.perf_counter() - start) * 1e3 / n  # sampling and VQ decoding, per image
    save_grid(make_grid(out.images, args.num, args.scale), args.out)
    print(f"wrote {args.out}: {len(prompts)} prompt(s) x {args.num} image(s), NFE {out.nfe}, {ms:.1f} ms per image")
    if args.progress is not None:
        frames = write_progress(pipe, out.history, args.num, args.scale, args.progress)
        print(f"wrote {len(frames)} frames and {args.progress / 'progress.gif'}")


def run_joint(pipe: MMDLMPipeline, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    out = pipe.generate_joint(args.num, args.sampler, seed=args.seed)
    ms = (time.perf_counter() - start) * 1e3 / args.num
    args.out.parent.mkdir(parents=True, exist_ok=True)
    captioned_grid(out.images, out.captions, min(args.num, 8), args.scale).save(args.out)
    for i, caption in enumerate(out.captions):
        print(f"{i}: {printable(caption)}")
    print(f"wrote {args.out}: {args.num} image+caption pair(s), NFE {out.nfe}, {ms:.1f} ms per pair")


def run_inpaint(pipe: MMDLMPipeline, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    result = inpaint(pipe, load_image(args.inpaint), args.box, args.prompt, args.num, sampler=args.sampler,
                     seed=args.seed)
    ms = (time.perf_counter() - start) * 1e3 / args.num
    masked = paint_masked(result.original, result.token_mask)
    row = torch.cat([result.original, masked, result.output.images])
    save_grid(make_grid(row, len(row), args.scale), args.out)
    print(f"wrote {args.out}: original | masked | {args.num} result(s), "
          f"{int(result.token_mask.sum())} token(s) regenerated, NFE {result.output.nfe}, {ms:.1f} ms per image")


def run_edit(pipe: MMDLMPipeline, args: argparse.Namespace) -> None:
    original = pipe.image_tensor([load_image(args.edit)]).cpu()  # (1, 3, S, S)
    start = time.perf_counter()
    out = pipe.edit(original.repeat(args.num, 1, 1, 1), [args.instruction] * args.num, args.sampler, seed=args.seed)
    ms = (time.perf_counter() - start) * 1e3 / args.num
    row = torch.cat([original, out.images])
    save_grid(make_grid(row, len(row), args.scale), args.out)
    print(f"wrote {args.out}: original | {args.num} edit(s), NFE {out.nfe}, {ms:.1f} ms per image")


def save_grid(grid: torch.Tensor, path: Path) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)


# ---- command line ---------------------------------------------------------------------------------------
def build_parser(prog: str = "python -m mmdlm.commands.generate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, verbose=False)
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--prompt", help="the caption to draw (text-to-image), or to guide --inpaint")
    text.add_argument("--prompts", type=Path, help="a file of prompts, one a line: one grid row each")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--joint", action="store_true", help="generate images and their captions from nothing")
    mode.add_argument("--inpaint", metavar="IMAGE", help="the image to inpaint (with --box)")
    mode.add_argument("--edit", metavar="IMAGE", help="the image to edit (with --instruction)")
    parser.add_argument("--instruction", help="what --edit changes, e.g. \"make the red circle blue\"")
    parser.add_argument("--box", type=parse_box, help="x0,y0,x1,y1: the pixel box --inpaint regenerates")
    parser.add_argument("--num", type=positive_int, default=4, help="samples per prompt (default 4)")
    add_sampler_arguments(parser, defaults_help("text_to_image", "joint", "inpaint", "edit"))
    add_revision_arguments(parser, best_of=True)
    parser.add_argument("--scale", type=positive_int, default=4, help="nearest-neighbour upscaling (default 4)")
    parser.add_argument("--out", type=Path, default=Path("samples.png"), help="output PNG (default samples.png)")
    parser.add_argument("--progress", type=Path, metavar="DIR",
                        help="text-to-image: save a frame per step and progress.gif into DIR")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; `parser.error` (exit 2) on the first one that is wrong."""
    text_to_image = not args.joint and args.inpaint is None and args.edit is None
    rules = [
        (args.edit is not None and args.instruction is None, "--edit needs --instruction \"...\""),
        (args.instruction is not None and args.edit is None, "--instruction goes with --edit IMAGE"),
        (args.edit is not None and (args.prompt is not None or args.prompts is not None),
         "--edit follows its --instruction: drop --prompt/--prompts"),
        (args.inpaint is not None and args.box is None, "--inpaint needs --box x0,y0,x1,y1"),
        (args.box is not None and args.inpaint is None, "--box goes with --inpaint IMAGE"),
        (args.joint and (args.prompt is not None or args.prompts is not None),
         "--joint generates from nothing: drop --prompt/--prompts"),
        (args.inpaint is not None and args.prompts is not None, "--inpaint takes one --prompt, not --prompts"),
        (text_to_image and args.prompt is None and args.prompts is None, "text-to-image needs --prompt or --prompts"),
        (args.progress is not None and not text_to_image, "--progress records text-to-image sampling only"),
        ((args.draft is not None or args.revise or args.best_of > 1) and not text_to_image,
         "--draft, --revise and --best-of go with text-to-image"),
    ]
    for wrong, message in rules:
        if wrong:
            parser.error(message)


def main(argv: list[str] | None = None, prog: str = "python -m mmdlm.commands.generate") -> int:
    """Run the generation command; returns the exit status documented above."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    check_args(parser, args)
    from mmdlm.pipeline import DEFAULT_SAMPLERS

    task = ("joint" if args.joint else "inpaint" if args.inpaint is not None else "edit" if args.edit is not None
            else "text_to_image")
    args.sampler = sampler_from_args(parser, args, DEFAULT_SAMPLERS[task])
    run = {"joint": run_joint, "inpaint": run_inpaint, "edit": run_edit, "text_to_image": run_text_to_image}[task]
    try:
        if args.prompt is not None:
            check_text(args.prompt, "--prompt")  # bytes that are not UTF-8 reach us as surrogate escapes
        if args.prompts is not None:
            read_prompts(args)  # a missing, empty or non-UTF-8 prompts file fails before the model loads
        if args.instruction is not None:
            check_text(args.instruction, "--instruction")
        for image in (args.inpaint, args.edit):
            if image is not None:
                load_image(image)  # fail on a bad image before the model loads
        pipe = load_pipeline(args.model, args.device)
        args.revision = revision_options(args)
        run(pipe, args)
    except (InputError, ValueError, OSError) as err:  # ValueError: the pipeline's (a prompt too long, ...)
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
