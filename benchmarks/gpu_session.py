"""One GPU lease, every measurement of issue 21 (GPU scale), stage by stage within a time budget; with --dry-run the
same stages at toy sizes on the CPU, the check that every one of them runs.

    bash benchmarks/gpu_wheels.sh            # first, where PyPI is reachable: what the GPU image lacks, into .whl/
    # on the GPU machine (carry .whl), two commands of <= 10 minutes, the second right after the first:
    bash benchmarks/gpu_session.sh --out "$OUT" --stages data,throughput --budget-minutes 5
    bash benchmarks/gpu_session.sh --out "$OUT" --stages data,train-mdm,train-ar,sampling,curve --budget-minutes 9.5
    # here, on 2 CPU cores: every stage at toy size, DDP on 2 processes included (~2 min)
    flock /tmp/mmdlm-cpu.lock bash benchmarks/gpu_session.sh --dry-run --out /tmp/gpu-session

`gpu_session.sh` finds the Python, installs the carried wheels where that Python lacks them and puts the checkout
on PYTHONPATH; `python -m benchmarks.gpu_session` is the same where mmdlm is installed. Nothing is downloaded.

Stages, in this order (--stages picks some; each runs in its own process, its output in session.log; a failed
stage is recorded and the later ones still run where they can). Minutes are estimates for an H100/H200:
- data: the quickstart's data steps whose outputs are missing (`mmdlm.quickstart`, the same commands): render
  the shapes world (20,000 / 1,000 scenes), train the text BPE, fit the patch tokenizer (1,024 codes), pre-tokenize
  both splits, into the paths the GPU recipes read (data/shards/shapes-codes, runs/quickstart). ~1.5 min; none
  when they exist (a second command on a machine still warm).
- throughput: `benchmarks.train_speed` on configs/mdm-shapes-gpu.yaml and configs/ar-shapes-gpu.yaml at d=768 L12
  and d=1024 L24, compiled, bf16, 30 steps (10 warm-up, 3 profiled): tokens/s, MFU, and a torch.profiler trace
  and operator table of every run (where the step goes). Synthetic batches: it runs beside the data stage when
  both are chosen (the data on CPU cores, this on the GPU). ~3.5 min.
- train-mdm, train-ar: `train.py fit` of each GPU recipe for the training budget (--train-minutes, else what the
  budget leaves after the later stages, shared equally), scaled to it: max_steps from the measured seconds per
  step (this work folder's throughput result, else a guess), a checkpoint every max_steps / 5 steps (the curve's
  points; weights only), warm-up at most a tenth of the run, an EMA averaging about its last tenth (the recipe's
  0.9999 averages 10,000 steps, more than a short run has), no validation (the curve evaluates), the budget as
  `max_time`. `<run>/wallclock.json` records the start: the curve's clock. ~1 min of each budget is start-up,
  compilation and export.
- sampling: `benchmarks.speed` on the two exported models: MDM with every fast-sampling trick (the exact prefix
  cache of a prefix-attention model) vs AR + KV cache, text-to-image and VQA, batch 1, 8 and 32, quality on 200
  val scenes. ~1.5 min.
- curve: `benchmarks.learning_curve --x minutes` on both runs: VQA, caption F1 per attribute and text-to-image
  all-correct (oracle) of every checkpoint's EMA weights on 200 val scenes, against wall-clock minutes, and where
  each of the issue's targets was first met. ~2 min.
- ddp: the MDM GPU recipe, tiny, 3 steps with `--trainer.strategy ddp --trainer.devices 2` on 2 CPU processes
  (gloo): the check of the multi-GPU command (docs/gpu.md), which needs no GPU (not in a lease's default stages).

Budget: --budget-minutes bounds the whole command: a stage whose expected minutes no longer fit is skipped, one
still running when the budget runs out is killed (each said so in session.md), and the training budget is what
is left after the later stages' expected minutes.

Writes to --out after every stage, so a command killed at its time limit still returns what it had: session.md
(what ran, how long, and every stage's tables), session.json, session.log, learning_curve.png and
results.tar.gz (the stages' json/md fragments, profiler traces and tables, training configs and TensorBoard logs).
Checkpoints and model folders stay in --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from benchmarks.speed import command_line, machine_info

STAGES = ("data", "throughput", "train-mdm", "train-ar", "sampling", "curve", "ddp")
RECIPES = {"mdm": "configs/mdm-shapes-gpu.yaml", "ar": "configs/ar-shapes-gpu.yaml"}
# what the quickstart's data gives a model's vocabulary: its BPE learns 406 ids on the shapes world (512 asked), the
# patch tokenizer an 8 x 8 grid of 4 x 4 x 3 pixel codes (48 numbers each); train_speed needs no folder with these
QUICKSTART_SIZES = {"text_vocab": 406, "grid": 8, "codebook_dim": 48}
DATA_STEPS = ("make the shapes shards", "train the text BPE", "fit the patch image tokenizer",
              "pre-tokenize the train shards", "pre-tokenize the val shards")  # mmdlm.quickstart's names
LOADER_EFFICIENCY = 0.9  # the real loader fed 93% of the synthetic-batch step rate on an H100 (BENCHMARKS.md)


@dataclass(frozen=True)
class Plan:
    """The sizes of every stage: a GPU lease's, or the toy ones of --dry-run (the CPU check)."""

    device: str  # where the models run: "cuda" or "cpu"
    scenes: tuple[int, int]  # (train, val) shapes scenes the data stage renders
    codebook_size: int  # patch-tokenizer codes (the quickstart's 1,024: 99.4% of patches exact)
    sizes: tuple[str, ...]  # throughput model sizes, LAYERSxWIDTH
    speed_args: tuple[str, ...]  # more benchmarks.train_speed arguments
    train_args: tuple[str, ...]  # more train.py arguments, both recipes
    s_per_step: float  # a training step's seconds until the throughput stage has measured one
    overhead_minutes: float  # around each run's training loop: process start, data setup, compile, export
    checkpoints: int  # per run: the points of the learning curve
    fixed_steps: int | None  # training steps regardless of the budget (the dry run), else None
    curve_args: tuple[str, ...]
    sampling_args: tuple[str, ...]
    expected: dict[str, float]  # minutes per stage (training aside): a stage that no longer fits is skipped
    default_stages: tuple[str, ...]
    budget_minutes: float | None  # the default --budget-minutes
    data_dir: str | None = None  # None: the recipes' own paths; else under --work
    ddp_args: tuple[str, ...] = field(default=())


LEASE = Plan(
    device="cuda", scenes=(20_000, 1_000), codebook_size=1024, sizes=("12x768", "24x1024"),
    speed_args=("--steps", "30", "--warmup", "10", "--profile-steps", "3", "--compile", "--device", "cuda",
                "--precision", "bf16-mixed"),
    train_args=(),  # the recipes as they are: bf16, compiled, batch 256, 8 loader workers
    s_per_step=0.075,  # H100, d=768 L12 batch 256 compiled: 0.070 s on synthetic batches (BENCHMARKS.md)
    overhead_minutes=1.0, checkpoints=5, fixed_steps=None,
    curve_args=("--limit", "200", "--device", "cuda"),
    sampling_args=("--batch-sizes", "1,8,32", "--limit", "200", "--repeats", "5", "--warmup", "1", "--device", "cuda"),
    expected={"data": 1.5, "throughput": 3.5, "curve": 2.0, "sampling": 1.5, "ddp": 1.0},
    default_stages=STAGES[:-1],  # ddp: checked on the CPU (tests, --dry-run); it needs no GPU
    budget_minutes=9.0,
)
DRY_RUN = Plan(
    device="cpu", scenes=(64, 48), codebook_size=64, sizes=("1x32", "2x64"),
    speed_args=("--steps", "4", "--warmup", "1", "--profile-steps", "2", "--no-compile", "--device", "cpu",
                "--precision", "32-true", "--batch-size", "4"),
    train_args=("--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--model.compile", "false",
                "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--data.batch_size", "4",
                "--data.num_workers", "0"),
    s_per_step=1.0, overhead_minutes=0.5, checkpoints=2, fixed_steps=4,
    curve_args=("--limit", "4", "--device", "cpu"),
    sampling_args=("--batch-sizes", "1,2", "--limit", "2", "--repeats", "1", "--warmup", "1", "--device", "cpu"),
    expected={"data": 0.5, "throughput": 0.5, "train": 0.3, "curve": 0.5, "sampling": 0.5, "ddp": 1.0},
    default_stages=STAGES, budget_minutes=None, data_dir="data",
)


# ---------------------------------------------------------------------------------------------
# paths and logging


@dataclass
class Session:
    """Where everything goes, the log, and what each stage did."""

    plan: Plan
    args: argparse.Namespace
    out: Path  # the small results (what comes back from a lease)
    work: Path  # checkpoints, model folders, data of the dry run
    log: TextIO
    started: float = field(default_factory=time.perf_counter)
    stages: list[dict[str, Any]] = field(default_factory=list)
    train_minutes: float | None = None
    notes: list[str] = field(default_factory=list)  # what differs from the plan, for session.md

    @property
    def results(self) -> Path:
        return self.work / "results"

    @property
    def shards(self) -> Path:  # the rendered shapes shards
        return self.work / self.plan.data_dir / "shapes" if self.plan.data_dir else Path("data/shards/shapes")

    @property
    def codes(self) -> Path:  # the pre-tokenized ones the recipes train on
        return Path(f"{self.shards}-codes")

    @property
    def tokenizers(self) -> Path:  # text_tokenizer/ and vq/ (the quickstart's folder)
        return self.work / self.plan.data_dir / "quickstart" if self.plan.data_dir else Path("runs/quickstart")

    def elapsed_minutes(self) -> float:
        return (time.perf_counter() - self.started) / 60

    def minutes_left(self) -> float | None:
        budget = self.args.budget_minutes
        return None if budget is None else budget - self.elapsed_minutes()

    def say(self, text: str) -> None:
        """A line to stdout and the log, prefixed by the stage of this thread (two stages may run at once)."""
        tag = getattr(_current, "stage", None)
        with _write_lock:
            for line in text.splitlines() or [""]:
                line = f"[{tag}] {line}" if tag and line else line
                print(line, flush=True)
                self.log.write(line + "\n")
            self.log.flush()

    def run(self, command: list[str]) -> int:
        """Run a command from the repository root, its output to stdout and the log; its exit status. It is
        killed when the budget runs out (StageError), so the stages after it still write their outputs."""
        from mmdlm.quickstart import step_env

        self.say("$ " + " ".join(command))
        env = step_env() | {"PYTHONUNBUFFERED": "1"}
        left = self.minutes_left()
        timer = None
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            if left is not None:
                timer = threading.Timer(max(0.0, left) * 60, proc.kill)
                timer.start()
            for line in proc.stdout:
                self.say(line.rstrip("\n"))
            rc = proc.wait()
        if timer is not None:
            timer.cancel()
            if rc < 0 and self.minutes_left() <= 0:
                raise StageError(f"killed when the {self.args.budget_minutes:g}-minute budget ran out")
        return rc


_write_lock = threading.Lock()  # the log's lines stay whole when two stages write at once
_current = threading.local()  # .stage: the stage this thread runs


# ---------------------------------------------------------------------------------------------
# stages: each returns a note for session.md, raises StageError when it fails


class StageError(RuntimeError):
    """A stage could not do its work (the message says why)."""


def check(session: Session, command: list[str]) -> None:
    rc = session.run(command)
    if rc != 0:
        raise StageError(f"`{' '.join(command[:4])} ...` exited {rc} (see session.log)")


def stage_data(session: Session) -> str:
    """The quickstart's data steps whose outputs are missing."""
    from mmdlm.quickstart import steps

    plan = session.plan
    quickstart = argparse.Namespace(
        out=str(session.tokenizers), world="shapes", data=str(session.shards), train=plan.scenes[0],
        val=plan.scenes[1], seed=0, text_vocab=512, tokenizer="patch", codebook_size=plan.codebook_size,
        vq_steps=0, ar_steps=0, mdm_steps=0, ar_rows=0.0, ar_args="", mdm_args="", eval_limit=0)
    chosen = [s for s in steps(quickstart) if s.name in DATA_STEPS]
    if len(chosen) != len(DATA_STEPS):
        raise StageError(f"mmdlm.quickstart no longer has the steps {DATA_STEPS}")
    done = []
    for step in chosen:
        if step.done_when.exists():
            continue
        check(session, step.command)
        done.append(step.name)
    return ("made: " + ", ".join(done) if done else "all there already") + f" ({session.codes}, {session.tokenizers})"


def stage_throughput(session: Session) -> str:
    """benchmarks.train_speed: MDM and AR at each size, with a profile of every run."""
    plan, out = session.plan, session.results / "throughput"
    sizes = [x for s in plan.sizes for x in ("--size", s)]
    vocab = ["--text-vocab", str(QUICKSTART_SIZES["text_vocab"]), "--codebook-size", str(plan.codebook_size),
             "--grid", str(QUICKSTART_SIZES["grid"]), "--codebook-dim", str(QUICKSTART_SIZES["codebook_dim"])]
    check(session, [sys.executable, "-m", "benchmarks.train_speed", "--config", RECIPES["mdm"], "--config",
                    RECIPES["ar"], *sizes, *plan.speed_args, *vocab, "--profile", str(out / "profile"),
                    "--out", str(out), "--quiet"])
    return f"{out / 'train_speed.md'}"


def measured_step_seconds(session: Session, kind: str) -> float | None:
    """A recipe's measured seconds per step at its own size and batch (a throughput result in this work folder)."""
    path = session.results / "throughput" / "train_speed.json"
    if not path.is_file():
        return None
    import yaml

    recipe = yaml.safe_load(Path(RECIPES[kind]).read_text())
    model, batch = recipe["model"]["init_args"], recipe["data"]["init_args"]["batch_size"]
    for run in json.loads(path.read_text())["runs"]:
        if (Path(run["config"]).name == Path(RECIPES[kind]).name and run["device"] == session.plan.device
                and (run["n_layer"], run["n_embd"], run["batch_size"]) == (model["n_layer"], model["n_embd"], batch)):
            return run["seconds_per_step"]["median"]
    return None


def schedule(minutes: float, s_per_step: float, plan: Plan) -> tuple[int, int]:
    """(max_steps, checkpoint every) for a training budget: the steps that fit after the overhead, a multiple of
    `plan.checkpoints` checkpoints."""
    if plan.fixed_steps is not None:
        return plan.fixed_steps, max(1, plan.fixed_steps // plan.checkpoints)
    steps = int(max(0.0, minutes - plan.overhead_minutes) * 60 * LOADER_EFFICIENCY / s_per_step)
    every = steps // plan.checkpoints  # 0: too short for a checkpoint each
    return every * plan.checkpoints, every


def training_minutes(session: Session, chosen: list[str], stage: str) -> float:
    """--train-minutes, else what the budget leaves after the stages still to come, shared by the runs."""
    if session.args.train_minutes is not None:
        return session.args.train_minutes
    if session.plan.fixed_steps is not None:  # the dry run: a few steps, whatever the budget
        return session.plan.expected["train"]
    if session.train_minutes is None:
        later = chosen[chosen.index(stage):]
        runs = sum(s.startswith("train-") for s in later)
        rest = sum(session.plan.expected.get(s, 0.0) for s in later)
        left = (session.args.budget_minutes or 30.0) - session.elapsed_minutes() - rest
        session.train_minutes = max(1.5, left / max(runs, 1))
    return session.train_minutes


def stage_train(session: Session, kind: str, minutes: float) -> str:
    """train.py fit of one GPU recipe, scaled to the training budget."""
    import yaml

    plan, run = session.plan, session.work / kind
    if run.exists():
        shutil.rmtree(run)  # a fresh run: its clock starts at zero
    run.mkdir(parents=True)
    measured = measured_step_seconds(session, kind)
    s_per_step = measured / LOADER_EFFICIENCY if measured else plan.s_per_step
    steps, every = schedule(minutes, s_per_step, plan)
    if steps == 0:
        raise StageError(f"{minutes:.1f} min leave no training steps after {plan.overhead_minutes} min of overhead")
    init = yaml.safe_load(Path(RECIPES[kind]).read_text())["model"]["init_args"]
    override = run / "session.yaml"  # merged into the recipe's ModelCheckpoint: the checkpoints of the curve
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": every, "save_top_k": -1, "save_weights_only": True,
                      "save_last": False}}]}}))  # max_steps is a multiple of every: the last one is the final step
    command = [sys.executable, "train.py", "fit", "--config", RECIPES[kind], "--config", str(override),
               "--data.train_shards", f"{session.codes}/train/*.tar", "--data.val_shards", f"{session.codes}/val/*.tar",
               "--data.text_tokenizer", str(session.tokenizers / "text_tokenizer"),
               "--data.vq", str(session.tokenizers / "vq"), "--model.export_dir", str(run / "model"),
               "--model.warmup_steps", str(max(1, min(int(init.get("warmup_steps", 100)), steps // 10))),
               "--model.ema_decay", f"{1 - 1 / max(20.0, steps / 10):.6g}", "--trainer.max_steps", str(steps),
               "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run)]
    if plan.fixed_steps is None:
        whole = int(minutes * 60)
        command += ["--trainer.max_time", f"00:{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"]
    command += list(plan.train_args)
    clock = {"started": time.time(), "minutes_budget": minutes, "max_steps": steps, "checkpoint_every": every,
             "s_per_step_assumed": s_per_step, "s_per_step_from": "throughput stage" if measured else "plan guess"}
    (run / "wallclock.json").write_text(json.dumps(clock, indent=2) + "\n")
    check(session, command)
    clock["finished"] = time.time()
    (run / "wallclock.json").write_text(json.dumps(clock, indent=2) + "\n")
    return (f"{steps} steps (checkpoint every {every}; {s_per_step:.3g} s/step assumed, {clock['s_per_step_from']}) "
            f"in {(clock['finished'] - clock['started']) / 60:.1f} min of a {minutes:.1f}-min budget; "
            f"model {run / 'model'}")


def stage_curve(session: Session) -> str:
    """benchmarks.learning_curve against wall-clock minutes, on the runs that have checkpoints."""
    runs = [f"{kind}={session.work / kind}" for kind in RECIPES if list((session.work / kind).rglob("*step=*.ckpt"))]
    if not runs:
        raise StageError("no training run with checkpoints in this work folder (run train-mdm / train-ar first)")
    out = session.results / "curve"
    check(session, [sys.executable, "-m", "benchmarks.learning_curve", *(x for r in runs for x in ("--run", r)),
                    "--x", "minutes", "--shards", f"{session.codes}/val/*.tar", "--tasks", "vqa,caption,t2i",
                    "--out", str(out), "--quiet", *session.plan.curve_args])
    return f"{out / 'learning_curve.md'}"


def stage_sampling(session: Session) -> str:
    """benchmarks.speed: the fastest MDM sampler vs AR + KV cache, text-to-image and VQA, at each batch size."""
    mdm, ar = session.work / "mdm" / "model", session.work / "ar" / "model"
    for folder in (mdm, ar):
        if not (folder / "config.json").is_file():
            raise StageError(f"no model folder {folder} (run train-mdm and train-ar first)")
    prefix = json.loads((mdm / "config.json").read_text())["model"].get("prefix_attention", False)
    # a prefix-attention model takes the exact prefix cache with the fast samplers; another, the fast samplers alone
    models = ["--fast", str(mdm), "--variants", "fast,ar-kv"] if prefix else ["--mdm", str(mdm), "--variants",
                                                                              "fast-decoding,ar-kv"]
    out = session.results / "sampling"
    check(session, [sys.executable, "-m", "benchmarks.speed", *models, "--ar", str(ar), "--tasks", "t2i,vqa",
                    "--shards", f"{session.codes}/val/*.tar", "--out", str(out), "--quiet",
                    *session.plan.sampling_args])
    return f"{out / 'sampling_speed.md'}"


def ddp_command(session: Session, run: Path) -> list[str]:
    """The MDM GPU recipe, tiny, for 3 steps of DDP on 2 CPU processes."""
    return [sys.executable, "train.py", "fit", "--config", RECIPES["mdm"],
            "--data.train_shards", f"{session.codes}/train/*.tar", "--data.val_shards", f"{session.codes}/val/*.tar",
            "--data.text_tokenizer", str(session.tokenizers / "text_tokenizer"),
            "--data.vq", str(session.tokenizers / "vq"), "--data.batch_size", "4", "--data.num_workers", "0",
            "--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--model.compile", "false",
            "--model.export_dir", str(run / "model"), "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.precision", "32-true", "--trainer.max_steps", "3",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run)]


def stage_ddp(session: Session) -> str:
    """The multi-GPU path checked on 2 CPU processes (DDP over gloo)."""
    run = session.work / "ddp"
    shutil.rmtree(run, ignore_errors=True)
    check(session, ddp_command(session, run))
    if not (run / "model" / "config.json").is_file():
        raise StageError(f"DDP fit ended without exporting {run / 'model'}")
    return f"3 DDP steps on 2 CPU processes, model exported to {run / 'model'}"


# ---------------------------------------------------------------------------------------------
# outputs


FRAGMENTS = ("curve/learning_curve.md", "sampling/sampling_speed.md", "throughput/train_speed.md")  # results/...


def write_outputs(session: Session) -> None:
    """session.json, session.md, learning_curve.png and results.tar.gz under --out (after every stage)."""
    from benchmarks.speed import md_table

    s = session
    summary = {"command": command_line("benchmarks.gpu_session", s.args.argv), "dry_run": s.args.dry_run,
               "machine": machine_info(s.plan.device), "budget_minutes": s.args.budget_minutes,
               "train_minutes": s.train_minutes or s.args.train_minutes, "elapsed_minutes": s.elapsed_minutes(),
               "work": str(s.work), "notes": s.notes, "stages": s.stages}
    (s.out / "session.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    m = summary["machine"]
    lines = ["# GPU session (issue 21)" + (": dry run, toy sizes on the CPU" if s.args.dry_run else ""), "",
             f"`{summary['command']}`", "",
             f"Machine: {m.get('gpu', 'no GPU')}, {m['cpu_count']} CPUs, torch {m['torch']}; "
             f"{summary['elapsed_minutes']:.1f} min so far"
             + (f" of a {s.args.budget_minutes:g}-min budget" if s.args.budget_minutes else "") + ".", ""]
    lines += [f"- {note}" for note in s.notes] + ([""] if s.notes else [])
    lines += md_table(["stage", "status", "minutes", "expected", "note"],
                      [[x["stage"], x["status"], f"{x['minutes']:.2f}", x["expected"], x["note"]] for x in s.stages])
    for rel in FRAGMENTS:
        path = s.results / rel
        if path.is_file():  # its headings one level down, under the session's
            lines += [""] + ["#" + line if line.startswith("#") else line for line in path.read_text().splitlines()]
    (s.out / "session.md").write_text("\n".join(lines) + "\n")
    png = s.results / "curve" / "learning_curve.png"
    if png.is_file():
        shutil.copy(png, s.out / "learning_curve.png")
    with tarfile.open(s.out / "results.tar.gz", "w:gz") as tar:
        if s.results.is_dir():
            tar.add(s.results, arcname="results")
        for kind in ("mdm", "ar"):
            run = s.work / kind
            for path in [run / "wallclock.json", run / "session.yaml", *run.glob("tb/**/*")]:
                if path.is_file():
                    tar.add(path, arcname=str(Path("runs") / path.relative_to(s.work)))


# ---------------------------------------------------------------------------------------------
# main


def stage_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = sorted(set(names) - set(STAGES))
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"--stages takes a comma-separated subset of {','.join(STAGES)}"
                                          + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the small results: session.md/.json/.log, the curve's png, "
                                                     "results.tar.gz (on the GPU machine: $OUT)")
    parser.add_argument("--work", help="checkpoints, model folders (and the dry run's data); default "
                                       "runs/gpu-session, or runs/gpu-session-dry with --dry-run")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage at toy size on the CPU, data made under --work: the check that it all runs")
    parser.add_argument("--stages", type=stage_list,
                        help=f"comma-separated subset of {','.join(STAGES)}, run in that order (default: all but ddp "
                             f"on a GPU; all with --dry-run)")
    parser.add_argument("--budget-minutes", type=float,
                        help="the whole call's minutes (default: 9 on a GPU, a 10-minute command; none for --dry-run)")
    parser.add_argument("--train-minutes", type=float,
                        help="each training run's wall-clock minutes (default: what the budget leaves, shared)")
    return parser


RUNNERS = {"data": stage_data, "throughput": stage_throughput, "curve": stage_curve, "sampling": stage_sampling,
           "ddp": stage_ddp}


def without_compile(plan: Plan) -> Plan:
    """The plan with every model eager."""
    return replace(plan, speed_args=tuple("--no-compile" if a == "--compile" else a for a in plan.speed_args),
                   train_args=(*plan.train_args, "--model.compile", "false"))


def run_stage(session: Session, stage: str, chosen: list[str]) -> dict[str, Any]:
    """Run one stage if it fits the budget; its record for session.json (status ok / failed / skipped)."""
    _current.stage = stage
    expected = (training_minutes(session, chosen, stage) if stage.startswith("train-")
                else session.plan.expected[stage])
    record = {"stage": stage, "status": "ok", "minutes": 0.0, "expected": f"{expected:.1f}", "note": ""}
    left = session.minutes_left()
    if left is not None and not stage.startswith("train-") and expected > left:
        record |= {"status": "skipped", "note": f"{expected:.1f} min expected, {left:.1f} left"}
    else:
        session.say(f"starts (expected {expected:.1f} min, {session.elapsed_minutes():.1f} min elapsed)")
        start = time.perf_counter()
        try:
            if stage.startswith("train-"):
                record["note"] = stage_train(session, stage.removeprefix("train-"), expected)
            else:
                record["note"] = RUNNERS[stage](session)
        except StageError as err:
            record |= {"status": "failed", "note": str(err)}
        record["minutes"] = (time.perf_counter() - start) / 60
    session.say(f"{record['status']} in {record['minutes']:.2f} min; {record['note']}")
    _current.stage = None
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen stages in order within the budget; write the outputs after each; returns session.json's dict."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    plan = DRY_RUN if args.dry_run else LEASE
    if args.budget_minutes is None:
        args.budget_minutes = plan.budget_minutes
    chosen = [s for s in STAGES if s in (args.stages or plan.default_stages)]
    notes = []
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: run the GPU session on the GPU machine, or --dry-run to check it on CPU")
        if not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++") if c):
            plan = without_compile(plan)  # LitMDM refuses compile without one: measure eager rather than nothing
            notes.append("no C++ compiler on the PATH: the models ran eager (--no-compile, --model.compile false)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or ("runs/gpu-session-dry" if args.dry_run else "runs/gpu-session"))
    work.mkdir(parents=True, exist_ok=True)
    with open(out / "session.log", "a") as log:
        session = Session(plan, args, out, work, log, notes=notes)
        session.say(f"[gpu_session] stages {','.join(chosen)}; budget "
                    f"{args.budget_minutes if args.budget_minutes else 'none'} min; work {work}; out {out}")
        pending = list(chosen)
        while pending:
            group = [pending.pop(0)]
            if group == ["data"] and pending[:1] == ["throughput"]:  # the data renders on the CPU cores while
                group.append(pending.pop(0))  # the throughput stage measures the GPU on synthetic batches
                session.notes.append("data and throughput ran at the same time (data on CPU cores, throughput on "
                                     f"the {plan.device.upper()} with synthetic batches)")
            with ThreadPoolExecutor(len(group)) as pool:
                records = list(pool.map(lambda stage: run_stage(session, stage, chosen), group))
            session.stages += records
            write_outputs(session)
        write_outputs(session)
        session.say(f"[gpu_session] done in {session.elapsed_minutes():.1f} min: {out}/session.md")
    return json.loads((out / "session.json").read_text())


if __name__ == "__main__":
    main()
