"""Sample images from a model folder as PNG grids: text-to-image, image+caption pairs, inpainting, and
the denoising process frame by frame.

    mmdlm generate --model runs/quickstart/model --prompt "a red circle at the top left" --num 8 \\
        --steps 12 --guidance 3 --out samples.png
    mmdlm generate --model DIR --prompts prompts.txt --num 8 --out grid.png     # a row per prompt
    mmdlm generate --model DIR --joint --num 8 --out joint.png                 # images + captions
    mmdlm generate --model DIR --inpaint scene.png --box 0,0,16,16 \\
        --prompt "a blue square at the top left"
    mmdlm generate --model DIR --edit scene.png --instruction "make the red circle blue" --num 4
    mmdlm generate --model DIR --prompt "a green cross in the middle" --progress frames/   # + GIF
    mmdlm generate --model DIR --device cpu --prompt "a small white square on the left" --num 4

Text-to-image writes `--num` samples per prompt, one row per prompt (a `--prompts` file has one prompt a
line; blank lines are skipped). `--joint` generates images and captions together from nothing, draws
each caption under its image and prints the captions. `--inpaint IMAGE --box x0,y0,x1,y1` regenerates
the image tokens under a pixel box (half-open, in the model's image-size coordinates, e.g. 0..32) and
writes one row: original | masked (regenerated token cells in grey) | `--num` results. `--edit IMAGE
--instruction TEXT` edits the image as the instruction says (a model trained on edits: configs/edits.yaml) and
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

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
from mmdlm.render import captioned_grid, make_grid, paint_masked, printable, save_grid, write_progress
from mmdlm.sampling.arguments import add_sampler_arguments, defaults_help, sampler_from_args

if TYPE_CHECKING:
    from mmdlm.pipeline import ImageOutput, MMDLMPipeline

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


# ---- command line ---------------------------------------------------------------------------------------
def build_parser(prog: str = "mmdlm generate") -> argparse.ArgumentParser:
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


def main(argv: list[str] | None = None, prog: str = "mmdlm generate") -> int:
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
