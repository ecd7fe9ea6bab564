"""Evaluate a model folder on held-out shards: metrics.json, and optionally a Markdown report and a figure of samples.

    mmdlm evaluate --model runs/quickstart/model --shards 'data/shards/shapes/val/*.tar' \\
        --out metrics.json --report report.md --samples samples.png --limit 300
    mmdlm evaluate --model DIR --shards 'data/shards/digits/val/*.tar' --out m.json --device cpu \\
        --tasks vqa,t2i --steps 8 --guidance 3 --batch-size 32

`mmdlm evaluate ...` is the same command. The sampler flags (`mmdlm.sampling.arguments`)
change every task's default, except guidance, which only the tasks that draw an image from a condition have
(text-to-image, edit). What each metric is: `mmdlm.eval` (below).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mmdlm.eval
from mmdlm.eval.records import load_records
from mmdlm.eval.report import command_line, jsonable, render_report, write_samples
from mmdlm.eval.tasks import ALL_TASKS, GUIDED_TASKS, PIPELINE_TASK, TASKS, run_evaluation
from mmdlm.inputs import add_device_argument, add_model_argument, positive_int
from mmdlm.sampling.arguments import add_sampler_arguments, sampler_overrides
from mmdlm.worlds.scoring import world_for


def task_list(text: str) -> list[str]:
    """argparse type: a comma-separated subset of the evaluation tasks."""
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown or text!r}; choose from {','.join(TASKS)}")
    return tasks


def build_parser(prog: str = "mmdlm evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=f"{__doc__}\n{mmdlm.eval.__doc__}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--shards", required=True, help="val shards: glob, brace pattern, folder or comma list")
    parser.add_argument("--out", required=True, help="metrics.json to write")
    parser.add_argument("--report", help="markdown report to write")
    parser.add_argument("--samples", help="figure of samples (png) to write")
    parser.add_argument("--limit", type=positive_int,
                        help="val records to evaluate (and joint samples); all if absent")
    parser.add_argument("--tasks", type=task_list, default=list(ALL_TASKS),
                        help=f"comma-separated subset of {','.join(TASKS)} (default: {','.join(ALL_TASKS)})")
    add_sampler_arguments(parser, "mmdlm.pipeline.DEFAULT_SAMPLERS; --guidance and --plausibility apply to "
                                  "text-to-image and edit only")
    parser.add_argument("--scorer", metavar="MODULE:FUNCTION",
                        help="text-to-image scorer for data without a world of its own: a function (images "
                             "Float[B,3,H,W] in [0,1], records) -> one dict of rates with 'all_correct' per image")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="samples per model call")
    parser.add_argument("--nll-draws", type=positive_int, default=4, help="(t, mask) draws of the MDM's NLL bound")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samplers and the NLL sequences")
    add_device_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None, prog: str = "mmdlm evaluate") -> None:
    """Evaluate a model folder on val shards; write metrics.json and optionally report.md / samples.png."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.samples and not set(args.tasks) - {"nll"}:
        parser.error("--samples needs a generating task in --tasks (vqa, caption, t2i or joint)")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model!r} is not a model folder (no config.json)")
    from mmdlm.data import expand_shards
    from mmdlm.pipeline import MMDLMPipeline

    try:
        expand_shards(args.shards)
    except FileNotFoundError as err:
        parser.error(f"--shards: {err}")
    try:
        pipe = MMDLMPipeline.from_pretrained(args.model, device=args.device)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        parser.error(f"cannot load --model {args.model!r}: {err}")
    overrides = sampler_overrides(args)
    unguided = {k: v for k, v in overrides.items() if not k.startswith("guidance")}
    try:  # the guidance flags are for the tasks that draw an image from a condition
        samplers = {task: pipe.sampler(name, **(overrides if task in GUIDED_TASKS else unguided))
                    for task, name in PIPELINE_TASK.items()}
    except ValueError as err:
        parser.error(f"sampler: {err}")
    try:
        records = load_records(args.shards, pipe.vq.image_size, args.limit)
        world_for(records, pipe.vq.image_size, args.scorer)
    except ValueError as err:
        parser.error(str(err))
    result = run_evaluation(pipe, tasks=args.tasks, limit=args.limit, records=records, samplers=samplers,
                            batch_size=args.batch_size, seed=args.seed, nll_draws=args.nll_draws,
                            progress=not args.quiet, scorer=args.scorer)
    metrics = {"command": command_line("mmdlm.commands.evaluate", argv),
               "model": str(Path(args.model).resolve()), "shards": args.shards, **result.metrics}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(jsonable(metrics), indent=2) + "\n")
    written = [str(out)]
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(render_report(metrics))
        written.append(args.report)
    if args.samples:
        written.append(str(write_samples(result.examples, args.samples)))
    print(f"evaluated {metrics['records']} {metrics['source']} records ({', '.join(args.tasks)}) -> "
          f"{', '.join(written)}")


if __name__ == "__main__":
    main()
