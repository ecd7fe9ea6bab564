"""What the training budget buys: `mmdlm evaluate` on every saved checkpoint of one or more runs.

    python -m benchmarks.learning_curve --run mdm=runs/curve/mdm --run ar=runs/curve/ar \\
        --shards 'data/shards/shapes-codes/val/*.tar' --out benchmarks/results/learning/curves --limit 200

A run is a Lightning `default_root_dir` (or any folder): its `*step=N.ckpt` checkpoints are found below it
(`ModelCheckpoint(every_n_train_steps=...)` in the configs writes one every 500 steps) and each is
exported with its EMA weights (`mmdlm.commands.export`) and evaluated on the same first `--limit` val records,
at the pipeline's default samplers. A checkpoint's metrics are cached as `<run>_step<N>.json` under
--out, so an interrupted sweep resumes where it stopped and new checkpoints can be added later.

Mind the schedule: a checkpoint at step k of an N-step run was trained with the learning rate of an
N-step cosine schedule, not decayed to its end as a k-step run's would be; the last point is the run.

A recipe in stages (a run started from another run's final model) is drawn along one axis: `--continues
mdm_s4=mdm_s3` counts mdm_s4's steps (and minutes) after mdm_s3's last checkpoint.

    python -m benchmarks.learning_curve --run mdm_s3=runs/mdm-edits-wc --run mdm_s4=runs/mdm-edits-pairs \
        --continues mdm_s4=mdm_s3 --shards 'data/shards/edits-codes/val/*.tar' --tasks edit,what_changed --out curve

Against wall-clock (`--x minutes`): a run folder holding `wallclock.json` (`{"started": <unix time>}`, written
by `benchmarks.gpu` just before it starts `train.py`) gives each checkpoint the minutes from that start
to the checkpoint file's modification time: process start, data loading, compilation and the checkpoints
written before it included, as a user waits for them.

    python -m benchmarks.learning_curve --run mdm=runs/gpu/mdm --run ar=runs/gpu/ar --x minutes \\
        --shards 'data/shards/shapes-codes/val/*.tar' --tasks vqa,caption,t2i --device cuda --out /tmp/curve

The project's targets are checked at every point (the GPU recipe's: VQA >= 97%, every caption attribute F1 >=
0.95, text-to-image all-correct >= 90%; the editing recipe's: edit all-correct >= 50%, what-changed accuracy >=
70%), those of the tasks evaluated: the first step (and minute) at which each held is reported per run, and
drawn as dashed lines.

Writes under --out: learning_curve.json (the headline numbers per run and step, the minutes where known, the
targets, the machine, the command), learning_curve.md (a table per run, and the targets) and
learning_curve.png (VQA, caption, text-to-image and NLL against training steps or minutes, one line per run).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from mmdlm.eval.curves import TARGETS, X_LABELS, headline, plot
from mmdlm.eval.report import command_line, md_table
from mmdlm.eval.timing import machine_info
from mmdlm.inputs import add_device_argument, positive_int

STEP_RE = re.compile(r"step=(\d+)\.ckpt$")
DEFAULT_TASKS = ("vqa", "caption", "t2i", "nll")
# (label, key of `headline`) of the markdown table and the plot panels
COLUMNS: tuple[tuple[str, str], ...] = (
    ("VQA", "vqa"), ("VQA colour", "vqa_color"), ("VQA position", "vqa_position"),
    ("caption colour F1", "caption_color_f1"), ("caption cell F1", "caption_cell_f1"),
    ("caption exact", "caption_exact_match"), ("t2i all-correct", "t2i_all_correct"),
    ("t2i colour", "t2i_color"), ("t2i shape", "t2i_shape"), ("t2i count", "t2i_count_correct"),
    ("NLL", "nll"), ("edit all-correct", "edit_all_correct"), ("what changed", "what_changed"),
)


def checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every `*step=N.ckpt` below `run_dir`, by step (one per step: the first found)."""
    found: dict[int, Path] = {}
    for path in sorted(Path(run_dir).rglob("*.ckpt")):
        match = STEP_RE.search(path.name)
        if match:
            found.setdefault(int(match.group(1)), path)
    return sorted(found.items())


def evaluate_checkpoint(ckpt: Path, records: dict[int, list[dict]], tasks: list[str],
                        args: argparse.Namespace) -> dict:
    """Export `ckpt` (EMA weights) to a scratch folder, evaluate it, return the metrics dict. `records`
    caches the val records by image size (read once, at the first checkpoint's image size)."""
    from mmdlm.eval.records import load_records
    from mmdlm.eval.tasks import evaluate
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.training.checkpoint import export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        folder = export_checkpoint(ckpt, Path(tmp) / "model")
        pipe = MMDLMPipeline.from_pretrained(folder, device=args.device)
        size = pipe.vq.image_size
        if size not in records:
            records[size] = load_records(args.shards, size, args.limit)
        started = time.perf_counter()
        metrics = evaluate(pipe, records=records[size], tasks=tasks, batch_size=args.batch_size, seed=args.seed,
                           progress=not args.quiet)
        metrics["seconds"] = time.perf_counter() - started
        metrics["model_kind"] = "ar" if pipe.is_autoregressive else "mdm"
    return metrics


def started_at(run_dir: str | Path) -> float | None:
    """The unix time a run started (`<run_dir>/wallclock.json`'s "started"), None without that file."""
    path = Path(run_dir) / "wallclock.json"
    return float(json.loads(path.read_text())["started"]) if path.is_file() else None


def minutes_at(ckpt: Path, started: float | None) -> float | None:
    """Minutes from the run's start to the checkpoint file's modification time (None when the start is unknown)."""
    return None if started is None else (ckpt.stat().st_mtime - started) / 60


def targets_met(points: list[dict]) -> list[dict[str, Any]]:
    """Per `TARGETS` entry: the first point (step, minutes) at which it held, and the best value reached."""
    out = []
    for what, key, least in TARGETS:
        values = [(p, p["headline"][key]) for p in points if key in p["headline"]]
        first = next((p for p, v in values if v >= least), None)
        out.append({"target": what, "key": key, "least": least,
                    "best": max((v for _, v in values), default=None),
                    "first_step": None if first is None else first["step"],
                    "first_minutes": None if first is None else first.get("minutes")})
    return out


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _reached(t: dict[str, Any]) -> str:
    if t["first_step"] is None:
        return "not met" + ("" if t["best"] is None else f" (best {t['best']:.3g})")
    return f"step {t['first_step']}" + ("" if t["first_minutes"] is None else f", {t['first_minutes']:.1f} min")


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    gpu = f", {m['gpu']}" if m.get("gpu") else ""
    lines = ["# Learning curves", "", f"`{result['command']}`", "",
             f"- shards `{result['shards']}`, {result['records']} val records, tasks {', '.join(result['tasks'])}; "
             f"machine: {m['cpu_count']} CPUs, torch {m['torch']}, device {m['device']}{gpu}", ""]
    measured = {key for curve in result["curves"].values() for p in curve for key, v in p["headline"].items()
                if v is not None}  # the headline keys of the tasks evaluated
    columns = [(label, key) for label, key in COLUMNS if key in measured]
    for name, curve in result["curves"].items():  # the columns of the tasks evaluated
        after = result["continues"].get(name)
        lines += [f"## {name} (`{result['runs'][name]}`)" + (f", continuing {after}" if after else ""), ""]
        lines += md_table(["step", "minutes", *(label for label, _ in columns)],
                          [[p["step"], _cell(p.get("minutes")), *(_cell(p["headline"].get(key)) for _, key in columns)]
                           for p in curve])
        lines.append("")
    lines += ["## Targets: where each was first met", ""]
    shown = [i for i, (_, key, _) in enumerate(TARGETS) if key in measured]
    lines += md_table(["run", *(TARGETS[i][0] for i in shown)],
                      [[name, *(_reached(result["targets"][name][i]) for i in shown)] for name in result["curves"]])
    return "\n".join(lines) + "\n"


def parse_run(text: str) -> tuple[str, str]:
    """NAME=DIR -> (NAME, DIR)."""
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"--run takes NAME=DIR, got {text!r}")
    return name, folder


def stage_offsets(continues: dict[str, str], last: dict[str, tuple[int, float | None]]) -> dict[str, tuple[int, float]]:
    """Run -> (steps, minutes) to add to its points: the totals at the last checkpoint of the run it continues,
    itself offset when that run continues another. `last`: run -> (its last step, its minutes there)."""
    offsets: dict[str, tuple[int, float]] = {}

    def offset(name: str, seen: tuple[str, ...] = ()) -> tuple[int, float]:
        if name in seen:
            raise ValueError(f"--continues makes a cycle: {' -> '.join((*seen, name))}")
        if name not in offsets:
            prev = continues.get(name)
            if prev is None:
                offsets[name] = (0, 0.0)
            else:
                steps, minutes = offset(prev, (*seen, name))
                offsets[name] = (steps + last[prev][0], minutes + (last[prev][1] or 0.0))
        return offsets[name]

    for name in last:
        offset(name)
    return offsets


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning_curve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=parse_run, action="append", required=True,
                        help="NAME=DIR: a training run's folder (its *step=N.ckpt files); repeat for more runs")
    parser.add_argument("--continues", type=parse_run, action="append", default=[], metavar="NAME=PREV",
                        help="run NAME started from run PREV's final model: count its steps after PREV's")
    parser.add_argument("--shards", required=True, help="val shards: glob, brace pattern, folder or comma list")
    parser.add_argument("--out", required=True, help="folder for the per-checkpoint cache and the outputs")
    parser.add_argument("--limit", type=positive_int, default=200, help="val records (the first, in shard order)")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated subset of vqa,caption,t2i,joint,nll")
    parser.add_argument("--steps", default=None, help="only these checkpoint steps, comma-separated (default: all)")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="samples per model call")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser, default="cpu", help="cpu, cuda ...")
    parser.add_argument("--x", choices=sorted(X_LABELS), default="step",
                        help="the plot's x axis: training steps, or wall-clock minutes (each run needs wallclock.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Evaluate every checkpoint of every run (cached), then write the json, markdown and plot."""
    from mmdlm.eval.tasks import TASKS as ALL_TASKS  # every task evaluate knows

    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks or any(t not in ALL_TASKS for t in tasks):
        parser.error(f"--tasks must be a subset of {','.join(ALL_TASKS)}, got {args.tasks!r}")
    try:
        wanted = None if args.steps is None else {int(s) for s in args.steps.split(",") if s.strip()}
    except ValueError:
        parser.error(f"--steps takes comma-separated integers, got {args.steps!r}")
    runs = dict(args.run)
    saved = {name: checkpoints(folder) for name, folder in runs.items()}  # every checkpoint: a stage ends at its last
    found = {name: [(s, p) for s, p in ckpts if wanted is None or s in wanted] for name, ckpts in saved.items()}
    for name, ckpts in found.items():
        if not ckpts:
            parser.error(f"run {name!r}: no '*step=N.ckpt' checkpoints below {runs[name]!r}")
    continues = dict(args.continues)
    for name, prev in continues.items():
        if name not in runs or prev not in runs or name == prev:
            parser.error(f"--continues {name}={prev}: both must be distinct --run names")
    started = {name: started_at(folder) for name, folder in runs.items()}
    if args.x == "minutes":
        for name, when in started.items():
            if when is None:
                parser.error(f"--x minutes: run {name!r} has no {Path(runs[name]) / 'wallclock.json'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records: dict[int, list[dict]] = {}
    curves: dict[str, list[dict]] = {}
    for name, ckpts in found.items():
        curves[name] = []
        for step, ckpt in ckpts:
            cache = out / f"{name}_step{step}.json"
            entry = json.loads(cache.read_text()) if cache.is_file() else None
            if entry is None or entry.get("tasks") != tasks:
                if not args.quiet:
                    print(f"[learning_curve] {name} step {step}: {ckpt}", flush=True)
                metrics = evaluate_checkpoint(ckpt, records, tasks, args)
                entry = {"run": name, "step": step, "checkpoint": str(ckpt), "tasks": tasks,
                         "records": args.limit, "headline": headline(metrics), "metrics": metrics}
                cache.write_text(json.dumps(entry, indent=2, default=str) + "\n")
            curves[name].append({**{k: entry[k] for k in ("step", "checkpoint")},
                                 "minutes": minutes_at(ckpt, started[name]), "headline": headline(entry["metrics"])})
    try:
        offsets = stage_offsets(continues, {name: (ckpts[-1][0], minutes_at(ckpts[-1][1], started[name]))
                                            for name, ckpts in saved.items()})
    except ValueError as err:
        parser.error(str(err))
    for name, (steps, minutes) in offsets.items():
        for p in curves[name]:
            p["run_step"], p["step"] = p["step"], p["step"] + steps  # the run's own step, and the recipe's
            if p["minutes"] is not None:
                p["minutes"] += minutes
    result = {"command": command_line("benchmarks.learning_curve", argv), "runs": runs, "continues": continues,
              "shards": args.shards,
              "records": args.limit, "tasks": tasks, "machine": machine_info(args.device), "x": args.x,
              "curves": curves, "targets": {name: targets_met(points) for name, points in curves.items()}}
    (out / "learning_curve.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "learning_curve.md").write_text(render_markdown(result))
    plot(curves, out / "learning_curve.png", x=args.x)
    if not args.quiet:
        print(f"[learning_curve] wrote {out}/learning_curve.json, .md, .png")
    return result


if __name__ == "__main__":
    main()
