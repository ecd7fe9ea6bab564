"""Text infilling from the command line: the model fills every `[MASK]` of a text, the words around it fixed.

    mmdlm infill --model runs/quickstart/model --text "a large [MASK] circle at the top left"
    mmdlm infill --model DIR --text "a [MASK] [MASK] square on the [MASK]" --tokens-per-blank 1 --temperature 1
    mmdlm infill --model DIR --text "a [MASK] circle on the left" --tokens-per-blank auto   # the model picks lengths

Something only a masked-diffusion model can do: the given words are anchors anywhere in the text, and the
blanks are decoded in parallel in any order (an AR model can only continue a prefix: the AR twin is refused).
Each blank is `--tokens-per-blank` BPE tokens, or as many as the model finds best (`auto`). Prints the completed
text. The sampler flags change the task's default (one token per step). Exit status: 0 written; 2 bad input
(arguments, no blank, a text longer than the model's text region, not valid UTF-8, an AR model folder), with a
one-sentence error on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time

from mmdlm.inputs import EXIT_OK, EXIT_USAGE, InputError, add_model_arguments, check_text, load_pipeline, positive_int
from mmdlm.sampling.arguments import add_sampler_arguments, defaults_help, sampler_from_args


def blank_length(text: str) -> int | None:
    """argparse type: an integer >= 1, or 'auto' (None: the model chooses)."""
    return None if text.strip().lower() == "auto" else positive_int(text)


def build_parser(prog: str = "mmdlm infill") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--text", required=True, help="the text, with [MASK] where words are to be filled in")
    parser.add_argument("--tokens-per-blank", type=blank_length, default=1,
                        help="BPE tokens per [MASK] (default 1), or 'auto': the model chooses each blank's length "
                             "among 1 to --max-blank tokens (every length is filled, the most likely text kept)")
    parser.add_argument("--max-blank", type=positive_int, default=4, help="longest blank with 'auto' (default 4)")
    add_sampler_arguments(parser, defaults_help("infill"), guidance=False)
    return parser


def main(argv: list[str] | None = None, prog: str = "mmdlm infill") -> int:
    """Fill the blanks of a text; returns the exit status documented above."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    from mmdlm.pipeline import BLANK, DEFAULT_SAMPLERS

    sampler = sampler_from_args(parser, args, DEFAULT_SAMPLERS["infill"])
    try:
        text = check_text(args.text, "--text")
        if BLANK not in text:
            raise InputError(f"the text has no blank: write {BLANK} where words should be filled in")
        pipe = load_pipeline(args.model, args.device)
        if pipe.is_autoregressive:
            raise InputError("infilling needs the masked-diffusion model; this folder is the autoregressive twin, "
                             "which only continues left to right")
        start = time.perf_counter()
        out = pipe.infill([text], tokens_per_blank=args.tokens_per_blank, sampler=sampler, seed=args.seed,
                          max_blank=args.max_blank)
    except (InputError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.verbose:
        print(f"NFE {out.nfe}, {time.perf_counter() - start:.2f}s", file=sys.stderr)
    print(out.texts[0])
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
