"""What a training budget buys, across recipes: finished runs' metrics plotted against their total steps.

    python -m benchmarks.budget_plot --out benchmarks/results/learning/recipe/budget.png \\
        --point "AR warm start + MDM=1300=benchmarks/results/learning/recipe/adapt_650_650.json" \\
        --point "AR warm start + MDM=2600=benchmarks/results/learning/recipe/adapt_1800_800.json" \\
        --curve "MDM from scratch (4,000-step schedule)=benchmarks/results/learning/curves/mdm_step*.json" \\
        --curve "AR twin (4,000-step schedule)=benchmarks/results/learning/curves/ar_step*.json"

`benchmarks.learning_curve` scores the checkpoints of one run; a recipe in two stages (an AR warm start, then
masked diffusion) has no checkpoint that is the recipe at a smaller budget, so each budget is its own run.
A `--point LABEL=STEPS=metrics.json` is one such run's `mmdlm evaluate` output at its total training steps
(all stages; every step here costs the same, batch 32); points with the same label are joined. A
`--curve LABEL=GLOB` is a learning curve's cached checkpoint files. Panels and keys are the learning curve's.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from mmdlm.eval.curves import headline, plot


def parse_point(text: str) -> tuple[str, int, Path]:
    try:
        label, steps, path = text.rsplit("=", 2)
        return label, int(steps), Path(path)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--point must be LABEL=STEPS=metrics.json, got {text!r}") from err


def parse_curve(text: str) -> tuple[str, str]:
    label, sep, pattern = text.rpartition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"--curve must be LABEL=GLOB, got {text!r}")
    return label, pattern


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    """Plot finished runs (points) and learning curves (checkpoint files) against training steps."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.budget_plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--point", type=parse_point, action="append", default=[],
                        help="LABEL=STEPS=metrics.json of a finished run (repeatable)")
    parser.add_argument("--curve", type=parse_curve, action="append", default=[],
                        help="LABEL=GLOB of a learning curve's <run>_step<N>.json files (repeatable)")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    if not args.point and not args.curve:
        parser.error("give at least one --point or --curve")
    curves: dict[str, list[dict]] = {}
    for label, pattern in args.curve:
        files = sorted(glob.glob(pattern))
        if not files:
            parser.error(f"--curve {label!r}: {pattern!r} matches no file")
        points = [json.loads(Path(f).read_text()) for f in files]
        curves[label] = sorted(({"step": p["step"], "headline": p["headline"]} for p in points),
                               key=lambda p: p["step"])
    for label, steps, path in args.point:
        if not path.is_file():
            parser.error(f"--point {label!r}: {str(path)!r} does not exist")
        curves.setdefault(label, []).append({"step": steps, "headline": headline(json.loads(path.read_text()))})
        curves[label].sort(key=lambda p: p["step"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    plot(curves, Path(args.out))
    print(f"wrote {args.out}")
    return curves


if __name__ == "__main__":
    main()
