"""Curves of GRPO runs (`mmdlm.training.grpo`): the reward of the rollouts and the KL to the start per step, read from
each run's TensorBoard events, and, with `--eval-shards`, the held-out score of the run's checkpoints (text-to-image
all-correct under the task's default sampler, or VQA accuracy) against the step and the wall-clock minute.

    python -m benchmarks.rl_curves --run MDM=runs/grpo-mdm --run AR=runs/grpo-ar \\
        --eval-shards 'data/shards/shapes-codes/val/*.tar' --limit 400 --every 100 \\
        --out benchmarks/results/rl/curves

Writes OUT.png (reward, KL and held-out panels) and OUT.json (every number plotted). The reward curve is smoothed
over `--window` steps: one step's mean is 4 prompts' groups and swings with their difficulty. A checkpoint is
scored by loading it into `LitGRPO` (its `init_from` must still exist) and exporting the policy, so what is scored
is exactly what `--model.export_dir` would hold at that step; step 0 is the `init_from` model itself.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import tempfile
from pathlib import Path
from typing import Any

from mmdlm.errors import UserError


def parse_run(text: str) -> tuple[str, Path]:
    label, sep, path = text.partition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"--run must be LABEL=RUN_DIR, got {text!r}")
    return label, Path(path)


def scalars(run: Path, tags: tuple[str, ...] = ("reward/mean", "reward/std", "kl")) -> dict[str, list[list[float]]]:
    """tag -> [[step, wall seconds since the first event, value], ...] from the run's newest TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(str(run / "tb" / "*" / "events*")), key=lambda f: Path(f).stat().st_mtime)
    if not files:
        raise UserError(f"no TensorBoard events under {run}/tb: is {run} a GRPO run's default_root_dir?")
    acc = EventAccumulator(files[-1])
    acc.Reload()
    found = {tag: acc.Scalars(tag) for tag in tags if tag in acc.Tags()["scalars"]}
    if not found:
        raise UserError(f"{files[-1]} holds none of {', '.join(tags)}")
    start = min(events[0].wall_time for events in found.values())
    return {tag: [[e.step, e.wall_time - start, e.value] for e in events] for tag, events in found.items()}


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over `window` values."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def checkpoints(run: Path, every: int) -> list[tuple[int, Path]]:
    """(step, path) of the run's step checkpoints whose step is a multiple of `every`."""
    found = []
    for path in (run / "checkpoints").glob("*step=*.ckpt"):
        step = int(re.search(r"step=(\d+)", path.name).group(1))
        if step % every == 0:
            found.append((step, path))
    return sorted(found)


def held_out(model_dir: str, task: str, records: list[dict]) -> float:
    """Text-to-image all-correct or VQA accuracy of a model folder under the task's default sampler."""
    from mmdlm.eval.tasks import eval_t2i, eval_vqa
    from mmdlm.pipeline import MMDLMPipeline

    pipe = MMDLMPipeline.from_pretrained(model_dir)
    if task == "t2i":
        return eval_t2i(pipe, records, progress=False, scorer_ceiling=False).metrics["all_correct"]
    return eval_vqa(pipe, records, progress=False).metrics["accuracy"]


def score_run(run: Path, every: int, records: list[dict], wall: dict[int, float]) -> list[dict[str, Any]]:
    """Held-out score at step 0 (the `init_from` model) and at every `every`-th checkpoint."""
    from mmdlm.folder import write_model_folder
    from mmdlm.training.checkpoint import load_checkpoint
    from mmdlm.training.grpo import LitGRPO

    found = checkpoints(run, every)
    if not found:
        raise UserError(f"{run}/checkpoints holds no step checkpoint that is a multiple of {every}")
    hparams = load_checkpoint(found[0][1])["hyper_parameters"]  # tensors and plain values only
    points = []
    for step, path in [(0, None), *found]:
        with tempfile.TemporaryDirectory() as tmp:
            if path is None:
                model_dir = hparams["init_from"]
            else:
                lit = LitGRPO.load_from_checkpoint(path, map_location="cpu")
                model_dir = str(write_model_folder(lit.model, lit.processor, tmp))
            value = held_out(model_dir, hparams["task"], records)
        minutes = wall.get(step, wall.get(step - 1, 0.0)) / 60  # the checkpoint of step k follows logged step k - 1
        points.append({"step": step, "minutes": round(minutes, 2), "held_out": round(value, 4)})
        print(json.dumps({"run": str(run), **points[-1]}), flush=True)
    return points


def plot(curves: dict[str, dict[str, Any]], path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = any(c.get("held_out") for c in curves.values())
    fig, axes = plt.subplots(1, 3 if scored else 2, figsize=(15 if scored else 10, 3.6))
    for label, c in curves.items():
        steps = [s for s, _, _ in c["reward/mean"]]
        axes[0].plot(steps, smooth([v for _, _, v in c["reward/mean"]], window), label=label)
        if "kl" in c:
            axes[1].plot([s for s, _, _ in c["kl"]], [v for _, _, v in c["kl"]], label=label)
        if c.get("held_out"):
            axes[2].plot([p["minutes"] for p in c["held_out"]], [100 * p["held_out"] for p in c["held_out"]],
                         marker="o", label=label)
    axes[0].set(title=f"rollout reward (mean over {window} steps)", xlabel="step")
    axes[1].set(title="KL to the starting model (k3)", xlabel="step")
    if scored:
        axes[2].set(title="held-out score (%)", xlabel="wall-clock minutes of RL")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    """Plot the reward, KL and held-out curves of GRPO runs."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rl_curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=parse_run, action="append", required=True,
                        help="LABEL=RUN_DIR (a GRPO run's --trainer.default_root_dir); repeat to compare")
    parser.add_argument("--out", required=True, help="output path without extension (.png and .json written)")
    parser.add_argument("--window", type=int, default=25, help="steps the reward curve is averaged over")
    parser.add_argument("--eval-shards", help="val shards: also score the runs' checkpoints held out")
    parser.add_argument("--limit", type=int, default=400, help="val records scored")
    parser.add_argument("--every", type=int, default=100, help="score the checkpoints of every N-th step")
    args = parser.parse_args(argv)
    try:
        curves = {label: scalars(run) for label, run in args.run}
        if args.eval_shards:
            from mmdlm.eval.records import load_records

            records = load_records(args.eval_shards, 32, limit=args.limit)
            for label, run in args.run:
                wall = {int(s): t for s, t, _ in curves[label]["reward/mean"]}
                curves[label]["held_out"] = score_run(run, args.every, records, wall)
    except UserError as err:
        parser.exit(2, f"error: {err}\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, out.with_suffix(".png"), args.window)
    out.with_suffix(".json").write_text(json.dumps(curves) + "\n")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
