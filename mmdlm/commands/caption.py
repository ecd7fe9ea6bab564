"""Captioning from the command line: describe one image or several, one caption a line.

    mmdlm caption --model runs/quickstart/model --image scene.png
    mmdlm caption --model runs/quickstart/model --image a.png --image b.png --threshold 0.9 -v
    mmdlm caption --model DIR --image scene.png --steps 8 --block-length 0     # 8 steps, one block
    mmdlm caption --model DIR --image scene.png --draft runs/quickstart/ar     # the AR drafts, DIR revises

Prints `PATH<TAB>caption` per image (only the caption with a single --image). The sampler flags change the
task's default (one token per step, left to right in blocks of 4: `mmdlm.pipeline.DEFAULT_SAMPLERS`).
Exit status: 0 written; 2 bad input (arguments, a model folder that is missing or damaged, an unreadable
image), with a one-sentence error on stderr; 4 when the model gave an empty caption for every image.
"""

from __future__ import annotations

import argparse
import sys
import time

from mmdlm.inputs import (
    EXIT_NO_ANSWER,
    EXIT_OK,
    EXIT_USAGE,
    InputError,
    add_model_arguments,
    add_revision_arguments,
    load_image,
    load_pipeline,
    revision_options,
)
from mmdlm.sampling.arguments import add_sampler_arguments, defaults_help, sampler_from_args


def build_parser(prog: str = "mmdlm caption") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image", action="append", required=True, help="an image to describe (repeatable)")
    add_sampler_arguments(parser, defaults_help("caption"), guidance=False)
    add_revision_arguments(parser)
    return parser


def main(argv: list[str] | None = None, prog: str = "mmdlm caption") -> int:
    """Caption images given on the command line; returns the exit status documented above."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from mmdlm.pipeline import DEFAULT_SAMPLERS

    sampler = sampler_from_args(parser, args, DEFAULT_SAMPLERS["caption"])
    try:
        images = [load_image(path) for path in args.image]  # bad images fail before the model loads
        pipe = load_pipeline(args.model, args.device)
        options = revision_options(args)
        start = time.perf_counter()
        out = pipe.caption(images, sampler, seed=args.seed, **options)
    except (InputError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.verbose:
        print(f"NFE {out.nfe}, {time.perf_counter() - start:.2f}s", file=sys.stderr)
    for path, text in zip(args.image, out.texts):
        print(text if len(args.image) == 1 else f"{path}\t{text}")
    return EXIT_OK if any(t.strip() for t in out.texts) else EXIT_NO_ANSWER


if __name__ == "__main__":
    sys.exit(main())
