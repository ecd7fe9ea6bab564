"""The GPU benchmark: the one-GPU recipe trained and measured, stage by stage; with --dry-run the same stages at
toy sizes on the CPU, the check that every one of them runs.

    python -m benchmarks.gpu --out runs/gpu                               # every GPU stage (~40 min on an H100)
    python -m benchmarks.gpu --out runs/gpu --stages data,throughput      # some of them
    python -m benchmarks.gpu --out runs/gpu --list                        # each stage's hardware, minutes and
                                                                          #   commands; runs nothing
    python -m benchmarks.gpu --dry-run --out /tmp/gpu                     # toy sizes on the CPU (~2 min, 2 cores)

Setup: a Python with a CUDA build of torch (a version pyproject.toml allows), then `pip install -e ".[dev]"` in
this checkout; run from the checkout's root.

Hardware: one NVIDIA GPU with bf16 (Ampere or newer; the minutes below are estimates for an H100 or H200) and
8 CPU cores or more (the data stage renders and tokenizes on them, training reads through 8 loader workers). The
ddp stage needs no GPU. The recipe is `configs/mdm-shapes.yaml` with the `configs/gpu.yaml` overlay, and its AR
twin adds `configs/ar.yaml` (`RECIPES`).

Stages, in this order (--stages picks some; each runs its commands in their own processes, their output in
gpu.log; a failed stage is recorded and the later ones still run where they can):

- data (CPU cores; ~1.5 min, none when the outputs exist): the quickstart's data steps whose outputs are missing
  (`mmdlm.quickstart`, the same commands): render the shapes world (20,000 / 1,000 scenes), train the text BPE,
  fit the patch tokenizer (1,024 codes), pre-tokenize both splits, into the paths the recipe reads
  (data/shards/shapes-codes, runs/quickstart).
- throughput (1 GPU; ~3.5 min): `benchmarks.train_speed` on the MDM and AR recipes at d=768 L12 and d=1024 L24,
  compiled, bf16, 30 steps (10 warm-up, 3 profiled) on synthetic batches: tokens/s, MFU, and a torch.profiler
  trace and operator table of every run (where the step goes).
- train-mdm, train-ar (1 GPU, 8 CPU cores; --train-minutes each, 15 by default): `train.py fit` of each recipe
  for that wall-clock time (below).
- sampling (1 GPU; ~1.5 min): `benchmarks.speed` on the two exported models: MDM with every fast-sampling trick
  (the exact prefix cache of a prefix-attention model) vs AR + KV cache, text-to-image and VQA, batch 1, 8 and 32,
  quality on 200 val scenes.
- curve (1 GPU; ~2 min): `benchmarks.learning_curve --x minutes` on both runs: VQA, caption F1 per attribute and
  text-to-image all-correct (oracle) of every checkpoint's EMA weights on 200 val scenes, against wall-clock
  minutes, and where each documented target was first met.
- ddp (2 CPU processes, no GPU; ~1 min): the MDM recipe, tiny, 3 steps with `--trainer.strategy ddp
  --trainer.devices 2` over gloo: the check of the multi-GPU command (docs/gpu.md); not run by default on a GPU.

A training run's minutes become its recipe as: max_steps = (minutes - 1 of start-up, compilation and export) x 0.9
/ seconds per step (this --out folder's throughput result, read at 90% for the real loader, else 0.075 s), a
multiple of 5 checkpoints (the curve's points; weights only); warm-up at most a tenth of the run; an EMA
averaging about its last tenth (the recipe's own EMA averages more steps than a short run has); no
validation (the curve evaluates); the minutes as `trainer.max_time`. `<run>/wallclock.json` records the start:
the curve's clock.

Writes to --out after every stage, so an interrupted command leaves what it had: gpu.md (what ran, how long,
every stage's tables), gpu.json, gpu.log, learning_curve.png, results/ (each stage's json and markdown, the
profiler traces and tables). Checkpoints and model folders go to --work (default: --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from mmdlm.eval.report import md_table

STAGES = ("data", "throughput", "train-mdm", "train-ar", "sampling", "curve", "ddp")
HARDWARE = {"data": "CPU cores", "throughput": "1 GPU", "train-mdm": "1 GPU, 8 CPU cores",
            "train-ar": "1 GPU, 8 CPU cores", "sampling": "1 GPU", "curve": "1 GPU", "ddp": "2 CPU processes"}
# the recipe and its AR twin: the base config and its overlays, applied in this order (`train.py fit --config ...`)
RECIPES = {"mdm": ("configs/mdm-shapes.yaml", "configs/gpu.yaml"),
           "ar": ("configs/mdm-shapes.yaml", "configs/ar.yaml", "configs/gpu.yaml")}
# what the quickstart's data gives a model's vocabulary: its BPE learns 406 ids on the shapes world (512 asked), the
# patch tokenizer an 8 x 8 grid of 4 x 4 x 3 pixel codes (48 numbers each); train_speed needs no folder with these
QUICKSTART_SIZES = {"text_vocab": 406, "grid": 8, "codebook_dim": 48}
DATA_STEPS = ("make the shapes shards", "train the text BPE", "fit the patch image tokenizer",
              "pre-tokenize the train shards", "pre-tokenize the val shards")  # mmdlm.quickstart's names
LOADER_EFFICIENCY = 0.9  # the real loader's step rate against synthetic batches (BENCHMARKS.md)
STEP_MARGIN = 0.9  # the share of a run's minutes its max_steps fill (max_time stops it in any case)


@dataclass(frozen=True)
class Plan:
    """The sizes of every stage: on a GPU, or the toy ones of --dry-run (the CPU check)."""

    device: str  # where the models run: "cuda" or "cpu"
    scenes: tuple[int, int]  # (train, val) shapes scenes the data stage renders
    codebook_size: int  # patch-tokenizer codes (the quickstart's 1,024)
    sizes: tuple[str, ...]  # throughput model sizes, LAYERSxWIDTH
    speed_args: tuple[str, ...]  # more benchmarks.train_speed arguments
    train_args: tuple[str, ...]  # more train.py arguments, both recipes
    s_per_step: float  # a training step's seconds until the throughput stage has measured one
    overhead_minutes: float  # around each run's training loop: process start, data setup, compile, export
    checkpoints: int  # per run: the points of the learning curve
    fixed_steps: int | None  # training steps whatever the minutes (the dry run), else None
    curve_args: tuple[str, ...]
    sampling_args: tuple[str, ...]
    expected: dict[str, float]  # minutes per stage (training aside)
    default_stages: tuple[str, ...]
    train_minutes: float  # the default --train-minutes
    data_dir: str | None = None  # None: the recipe's own paths; else under --work


GPU = Plan(
    device="cuda", scenes=(20_000, 1_000), codebook_size=1024, sizes=("12x768", "24x1024"),
    speed_args=("--steps", "30", "--warmup", "10", "--profile-steps", "3", "--compile", "--device", "cuda",
                "--precision", "bf16-mixed"),
    train_args=(),  # the recipe as it is: bf16, compiled, batch 256, 8 loader workers
    s_per_step=0.075,  # H100, d=768 L12 batch 256 compiled (BENCHMARKS.md)
    overhead_minutes=1.0, checkpoints=5, fixed_steps=None,
    curve_args=("--limit", "200", "--device", "cuda"),
    sampling_args=("--batch-sizes", "1,8,32", "--limit", "200", "--repeats", "5", "--warmup", "1", "--device", "cuda"),
    expected={"data": 1.5, "throughput": 3.5, "curve": 2.0, "sampling": 1.5, "ddp": 1.0},
    default_stages=STAGES[:-1],  # ddp needs no GPU: the dry run and the tests check it on the CPU
    train_minutes=15.0,
)
DRY_RUN = Plan(
    device="cpu", scenes=(64, 48), codebook_size=64, sizes=("1x32", "2x64"),
    speed_args=("--steps", "4", "--warmup", "1", "--profile-steps", "2", "--no-compile", "--device", "cpu",
                "--precision", "32-true", "--batch-size", "4"),
    train_args=("--model.config.n_layer", "1", "--model.config.n_embd", "32", "--model.config.n_head", "2",
                "--model.compile", "false", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
                "--data.batch_size", "4", "--data.num_workers", "0"),
    s_per_step=1.0, overhead_minutes=0.5, checkpoints=2, fixed_steps=4,
    curve_args=("--limit", "4", "--device", "cpu"),
    sampling_args=("--batch-sizes", "1,2", "--limit", "2", "--repeats", "1", "--warmup", "1", "--device", "cpu"),
    expected={"data": 0.5, "throughput": 0.5, "curve": 0.5, "sampling": 0.5, "ddp": 1.0},
    default_stages=STAGES, train_minutes=0.3, data_dir="data",
)


# ---------------------------------------------------------------------------------------------
# recipes


def merged(configs: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The recipe the CLI builds from `--config A --config B ...`: later files' keys over earlier ones, mappings
    merged key by key, lists replaced; a `class_path` that changes drops the earlier `init_args`."""
    import yaml

    def merge(base: Any, over: Any) -> Any:
        if not (isinstance(base, dict) and isinstance(over, dict)):
            return over
        if "class_path" in over and base.get("class_path") not in (None, over["class_path"]):
            return dict(over)
        return {**base, **{k: merge(base[k], v) if k in base else v for k, v in over.items()}}

    result: dict[str, Any] = {}
    for path in configs:
        result = merge(result, yaml.safe_load(Path(path).read_text()) or {})
    return result


def architecture(recipe: dict[str, Any]) -> dict[str, Any]:
    """The model's architecture keys (n_layer, n_embd, prefix_attention ...): `init_args.config`, or the init
    args themselves in a recipe that gives them one by one."""
    init = recipe.get("model", {}).get("init_args", {})
    return {**init, **(init.get("config") or {})}


# ---------------------------------------------------------------------------------------------
# where everything goes, and the log


class StageError(RuntimeError):
    """A stage could not do its work (the message says why)."""


@dataclass
class Bench:
    """The plan, the folders, the log, and what each stage did."""

    plan: Plan
    args: argparse.Namespace
    out: Path  # the results: reports, log, each stage's json and markdown
    work: Path  # checkpoints, model folders, the dry run's data
    log: TextIO | None = None
    started: float = field(default_factory=time.perf_counter)
    stages: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what differs from the plan, for gpu.md

    @property
    def results(self) -> Path:
        return self.out / "results"

    @property
    def shards(self) -> Path:  # the rendered shapes shards
        return self.work / self.plan.data_dir / "shapes" if self.plan.data_dir else Path("data/shards/shapes")

    @property
    def codes(self) -> Path:  # the pre-tokenized ones the recipe trains on
        return Path(f"{self.shards}-codes")

    @property
    def tokenizers(self) -> Path:  # text_tokenizer/ and vq/ (the quickstart's folder)
        return self.work / self.plan.data_dir / "quickstart" if self.plan.data_dir else Path("runs/quickstart")

    @property
    def train_minutes(self) -> float:
        return self.args.train_minutes if self.args.train_minutes is not None else self.plan.train_minutes

    def elapsed_minutes(self) -> float:
        return (time.perf_counter() - self.started) / 60

    def say(self, text: str, stage: str | None = None) -> None:
        """Lines to stdout and the log, prefixed by the stage that runs."""
        for line in text.splitlines() or [""]:
            line = f"[{stage}] {line}" if stage and line else line
            print(line, flush=True)
            if self.log is not None:
                self.log.write(line + "\n")
        if self.log is not None:
            self.log.flush()

    def run(self, command: list[str], stage: str | None = None) -> int:
        """Run a command from the repository root, its output to stdout and the log; its exit status."""
        from mmdlm.quickstart import step_env

        self.say("$ " + shlex.join(command), stage)
        env = step_env() | {"PYTHONUNBUFFERED": "1"}
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            for line in proc.stdout:
                self.say(line.rstrip("\n"), stage)
            return proc.wait()

    def check(self, command: list[str], stage: str) -> None:
        rc = self.run(command, stage)
        if rc != 0:
            raise StageError(f"`{shlex.join(command[:4])} ...` exited {rc} (see gpu.log)")


# ---------------------------------------------------------------------------------------------
# each stage's commands (what --list shows) and its run (a note for gpu.md; StageError when it fails)


def data_steps(bench: Bench) -> list[Any]:
    """The quickstart's data steps (`mmdlm.quickstart.Step`s), at this plan's sizes and paths."""
    from mmdlm.quickstart import steps

    plan = bench.plan
    quickstart = argparse.Namespace(
        out=str(bench.tokenizers), world="shapes", data=str(bench.shards), train=plan.scenes[0],
        val=plan.scenes[1], seed=0, text_vocab=512, tokenizer="patch", codebook_size=plan.codebook_size,
        vq_steps=0, ar_steps=0, adapt="mdm", mdm_steps=0, ar_rows=0.0, ar_args="", mdm_args="", eval_limit=0)
    chosen = [s for s in steps(quickstart) if s.name in DATA_STEPS]
    if len(chosen) != len(DATA_STEPS):
        raise StageError(f"mmdlm.quickstart no longer has the steps {DATA_STEPS}")
    return chosen


def stage_data(bench: Bench) -> str:
    """The quickstart's data steps whose outputs are missing."""
    done = []
    for step in data_steps(bench):
        if step.done_when.exists():
            continue
        bench.check(step.command, "data")
        done.append(step.name)
    return ("made: " + ", ".join(done) if done else "all there already") + f" ({bench.codes}, {bench.tokenizers})"


def joined(kind: str) -> str:
    """A recipe as benchmarks.train_speed's --config takes it: the base and its overlays joined by '+'."""
    return "+".join(RECIPES[kind])


def throughput_command(bench: Bench) -> list[str]:
    """benchmarks.train_speed: MDM and AR at each size, with a profile of every run."""
    plan, out = bench.plan, bench.results / "throughput"
    sizes = [x for s in plan.sizes for x in ("--size", s)]
    vocab = ["--text-vocab", str(QUICKSTART_SIZES["text_vocab"]), "--codebook-size", str(plan.codebook_size),
             "--grid", str(QUICKSTART_SIZES["grid"]), "--codebook-dim", str(QUICKSTART_SIZES["codebook_dim"])]
    configs = [x for kind in RECIPES for x in ("--config", joined(kind))]
    return [sys.executable, "-m", "benchmarks.train_speed", *configs, *sizes, *vocab, *plan.speed_args,
            "--profile", str(out / "profile"), "--out", str(out), "--quiet"]


def stage_throughput(bench: Bench) -> str:
    bench.check(throughput_command(bench), "throughput")
    return f"{bench.results / 'throughput' / 'train_speed.md'}"


def measured_step_seconds(bench: Bench, kind: str) -> float | None:
    """A recipe's measured seconds per step at its own size and batch (this --out folder's throughput result)."""
    path = bench.results / "throughput" / "train_speed.json"
    if not path.is_file():
        return None
    recipe = merged(RECIPES[kind])
    arch, batch = architecture(recipe), recipe["data"]["init_args"]["batch_size"]
    for run in json.loads(path.read_text())["runs"]:
        if (run["config"] == joined(kind) and run["device"] == bench.plan.device
                and (run["n_layer"], run["n_embd"], run["batch_size"]) == (arch["n_layer"], arch["n_embd"], batch)):
            return run["seconds_per_step"]["median"]
    return None


def schedule(minutes: float, s_per_step: float, plan: Plan) -> tuple[int, int]:
    """(max_steps, checkpoint every) for a run of `minutes`: the steps that fit after the overhead, a multiple of
    `plan.checkpoints` checkpoints."""
    if plan.fixed_steps is not None:
        return plan.fixed_steps, max(1, plan.fixed_steps // plan.checkpoints)
    steps = int(max(0.0, minutes - plan.overhead_minutes) * 60 * STEP_MARGIN / s_per_step)
    every = steps // plan.checkpoints  # 0: too short for a checkpoint each
    return every * plan.checkpoints, every


@dataclass(frozen=True)
class Training:
    """One training run's schedule and command."""

    steps: int
    every: int  # a checkpoint every this many steps
    s_per_step: float  # the seconds per step it was scaled with
    measured: bool  # whether those come from the throughput stage (else the plan's guess)
    command: list[str]


def training(bench: Bench, kind: str) -> Training:
    """`train.py fit` of one recipe, scaled to --train-minutes."""
    plan, run, minutes = bench.plan, bench.work / kind, bench.train_minutes
    measured = measured_step_seconds(bench, kind)
    s_per_step = measured / LOADER_EFFICIENCY if measured else plan.s_per_step
    steps, every = schedule(minutes, s_per_step, plan)
    init = merged(RECIPES[kind])["model"]["init_args"]
    configs = [x for path in (*RECIPES[kind], str(run / "checkpoints.yaml")) for x in ("--config", path)]
    command = [sys.executable, "train.py", "fit", *configs,
               "--data.train_shards", f"{bench.codes}/train/*.tar", "--data.val_shards", f"{bench.codes}/val/*.tar",
               "--data.text_tokenizer", str(bench.tokenizers / "text_tokenizer"),
               "--data.vq", str(bench.tokenizers / "vq"),
               "--model.warmup_steps", str(max(1, min(int(init.get("warmup_steps", 100)), steps // 10))),
               "--model.ema_decay", f"{1 - 1 / max(20.0, steps / 10):.6g}", "--trainer.max_steps", str(steps),
               "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
               "--trainer.default_root_dir", str(run)]
    if plan.fixed_steps is None:
        whole = int(minutes * 60)
        command += ["--trainer.max_time", f"00:{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"]
    return Training(steps, every, s_per_step, measured is not None, command + list(plan.train_args))


def stage_train(bench: Bench, kind: str) -> str:
    import yaml

    run, minutes = bench.work / kind, bench.train_minutes
    if run.exists():
        shutil.rmtree(run)  # a fresh run: its clock starts at zero
    run.mkdir(parents=True)
    train = training(bench, kind)
    if train.steps == 0:
        raise StageError(f"{minutes:.1f} min leave no training steps after {bench.plan.overhead_minutes} min "
                         f"of start-up")
    # merged into the recipe's ModelCheckpoint: the checkpoints of the curve; max_steps is a multiple of every,
    # so the last one is the final step
    (run / "checkpoints.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"every_n_train_steps": train.every, "save_top_k": -1, "save_weights_only": True,
                      "save_last": False}}]}}))
    source = "throughput stage" if train.measured else "plan guess"
    clock = {"started": time.time(), "minutes": minutes, "max_steps": train.steps,
             "checkpoint_every": train.every, "s_per_step_assumed": train.s_per_step, "s_per_step_from": source}
    (run / "wallclock.json").write_text(json.dumps(clock, indent=2) + "\n")
    bench.check(train.command, f"train-{kind}")
    clock["finished"] = time.time()
    (run / "wallclock.json").write_text(json.dumps(clock, indent=2) + "\n")
    return (f"{train.steps} steps (checkpoint every {train.every}; {train.s_per_step:.3g} s/step assumed, {source}) "
            f"in {(clock['finished'] - clock['started']) / 60:.1f} of {minutes:.1f} min; model {run / 'model'}")


def curve_command(bench: Bench) -> list[str]:
    """benchmarks.learning_curve against wall-clock minutes, on both runs."""
    runs = [x for kind in RECIPES for x in ("--run", f"{kind}={bench.work / kind}")]
    return [sys.executable, "-m", "benchmarks.learning_curve", *runs, "--x", "minutes",
            "--shards", f"{bench.codes}/val/*.tar", "--tasks", "vqa,caption,t2i", "--out",
            str(bench.results / "curve"), "--quiet", *bench.plan.curve_args]


def stage_curve(bench: Bench) -> str:
    missing = [kind for kind in RECIPES if not list((bench.work / kind).rglob("*step=*.ckpt"))]
    if missing:
        raise StageError(f"no checkpoints of {', '.join(missing)} in {bench.work} (run train-{missing[0]} first)")
    bench.check(curve_command(bench), "curve")
    return f"{bench.results / 'curve' / 'learning_curve.md'}"


def sampling_command(bench: Bench) -> list[str]:
    """benchmarks.speed: the fastest MDM sampler vs AR + KV cache, text-to-image and VQA, at each batch size."""
    mdm, ar = bench.work / "mdm" / "model", bench.work / "ar" / "model"
    # a prefix-attention model takes the exact prefix cache with the fast samplers; another, the fast samplers alone
    prefix = architecture(merged(RECIPES["mdm"])).get("prefix_attention", False)
    models = (["--fast", str(mdm), "--variants", "fast,ar-kv"] if prefix
              else ["--mdm", str(mdm), "--variants", "fast-decoding,ar-kv"])
    return [sys.executable, "-m", "benchmarks.speed", *models, "--ar", str(ar), "--tasks", "t2i,vqa",
            "--shards", f"{bench.codes}/val/*.tar", "--out", str(bench.results / "sampling"), "--quiet",
            *bench.plan.sampling_args]


def stage_sampling(bench: Bench) -> str:
    for kind in RECIPES:
        if not (bench.work / kind / "model" / "config.json").is_file():
            raise StageError(f"no model folder {bench.work / kind / 'model'} (run train-{kind} first)")
    bench.check(sampling_command(bench), "sampling")
    return f"{bench.results / 'sampling' / 'sampling_speed.md'}"


def ddp_command(bench: Bench) -> list[str]:
    """The MDM recipe, tiny, for 3 steps of DDP on 2 CPU processes."""
    return [sys.executable, "train.py", "fit", *(x for path in RECIPES["mdm"] for x in ("--config", path)),
            "--data.train_shards", f"{bench.codes}/train/*.tar", "--data.val_shards", f"{bench.codes}/val/*.tar",
            "--data.text_tokenizer", str(bench.tokenizers / "text_tokenizer"),
            "--data.vq", str(bench.tokenizers / "vq"), "--data.batch_size", "4", "--data.num_workers", "0",
            "--model.config.n_layer", "1", "--model.config.n_embd", "32", "--model.config.n_head", "2",
            "--model.compile", "false", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
            "--trainer.strategy", "ddp", "--trainer.precision", "32-true", "--trainer.max_steps", "3",
            "--trainer.limit_val_batches", "0", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(bench.work / "ddp")]


def stage_ddp(bench: Bench) -> str:
    """The multi-GPU path checked on 2 CPU processes (DDP over gloo)."""
    run = bench.work / "ddp"
    shutil.rmtree(run, ignore_errors=True)
    bench.check(ddp_command(bench), "ddp")
    if not (run / "model" / "config.json").is_file():
        raise StageError(f"DDP fit ended without exporting {run / 'model'}")
    return f"3 DDP steps on 2 CPU processes, model exported to {run / 'model'}"


def stage_commands(bench: Bench, stage: str) -> list[list[str]]:
    """The commands a stage runs (the data stage: every data step's, done or not)."""
    if stage == "data":
        return [step.command for step in data_steps(bench)]
    if stage.startswith("train-"):
        return [training(bench, stage.removeprefix("train-")).command]
    return [{"throughput": throughput_command, "sampling": sampling_command, "curve": curve_command,
             "ddp": ddp_command}[stage](bench)]


def expected_minutes(bench: Bench, stage: str) -> float:
    return bench.train_minutes if stage.startswith("train-") else bench.plan.expected[stage]


RUNNERS = {"data": stage_data, "throughput": stage_throughput, "train-mdm": lambda b: stage_train(b, "mdm"),
           "train-ar": lambda b: stage_train(b, "ar"), "sampling": stage_sampling, "curve": stage_curve,
           "ddp": stage_ddp}


# ---------------------------------------------------------------------------------------------
# outputs


FRAGMENTS = ("curve/learning_curve.md", "sampling/sampling_speed.md", "throughput/train_speed.md")  # results/...


def machine(device: str) -> dict[str, Any]:
    """What the stages ran on."""
    import torch

    info: dict[str, Any] = {"device": device, "cpu_count": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info |= {"gpu": torch.cuda.get_device_name(), "cuda": torch.version.cuda}
    return info


def write_outputs(bench: Bench) -> None:
    """gpu.json, gpu.md and learning_curve.png under --out (after every stage)."""
    b = bench
    summary = {"command": shlex.join(["python", "-m", "benchmarks.gpu", *b.args.argv]), "dry_run": b.args.dry_run,
               "machine": machine(b.plan.device), "train_minutes": b.train_minutes,
               "elapsed_minutes": b.elapsed_minutes(), "work": str(b.work), "notes": b.notes, "stages": b.stages}
    (b.out / "gpu.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    m = summary["machine"]
    lines = ["# GPU benchmark" + (": dry run, toy sizes on the CPU" if b.args.dry_run else ""), "",
             f"`{summary['command']}`", "",
             f"Machine: {m.get('gpu', 'no GPU')}, {m['cpu_count']} CPUs, torch {m['torch']}; "
             f"{summary['elapsed_minutes']:.1f} min so far.", ""]
    lines += [f"- {note}" for note in b.notes] + ([""] if b.notes else [])
    lines += md_table(["stage", "hardware", "status", "minutes", "expected", "note"],
                      [[x["stage"], HARDWARE[x["stage"]], x["status"], f"{x['minutes']:.2f}", x["expected"],
                        x["note"]] for x in b.stages])
    for rel in FRAGMENTS:
        path = b.results / rel
        if path.is_file():  # its headings one level down, under the report's
            lines += [""] + ["#" + line if line.startswith("#") else line for line in path.read_text().splitlines()]
    (b.out / "gpu.md").write_text("\n".join(lines) + "\n")
    png = b.results / "curve" / "learning_curve.png"
    if png.is_file():
        shutil.copy(png, b.out / "learning_curve.png")


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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="gpu.md/.json/.log, learning_curve.png, results/ (default "
                                      "runs/gpu, or runs/gpu-dry with --dry-run)")
    parser.add_argument("--work", help="checkpoints and model folders (and the dry run's data); default: --out")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage at toy size on the CPU, data made under --work: the check that it all runs")
    parser.add_argument("--stages", type=stage_list,
                        help=f"comma-separated subset of {','.join(STAGES)}, run in that order (default: all but ddp "
                             f"on a GPU; all with --dry-run)")
    parser.add_argument("--train-minutes", type=float,
                        help=f"each training run's wall-clock minutes, start-up included (default "
                             f"{GPU.train_minutes:g}; the dry run trains {DRY_RUN.fixed_steps} steps)")
    parser.add_argument("--list", action="store_true",
                        help="print each chosen stage's hardware, expected minutes and commands; run nothing")
    return parser


def without_compile(plan: Plan) -> Plan:
    """The plan with every model eager."""
    return replace(plan, speed_args=tuple("--no-compile" if a == "--compile" else a for a in plan.speed_args),
                   train_args=(*plan.train_args, "--model.compile", "false"))


def run_stage(bench: Bench, stage: str) -> dict[str, Any]:
    """Run one stage; its record for gpu.json (status ok / failed)."""
    expected = expected_minutes(bench, stage)
    record = {"stage": stage, "status": "ok", "minutes": 0.0, "expected": f"{expected:.1f}", "note": ""}
    bench.say(f"starts ({HARDWARE[stage]}, expected {expected:.1f} min, {bench.elapsed_minutes():.1f} min "
              f"elapsed)", stage)
    start = time.perf_counter()
    try:
        record["note"] = RUNNERS[stage](bench)
    except StageError as err:
        record |= {"status": "failed", "note": str(err)}
    record["minutes"] = (time.perf_counter() - start) / 60
    bench.say(f"{record['status']} in {record['minutes']:.2f} min; {record['note']}", stage)
    return record


def list_stages(bench: Bench, chosen: list[str]) -> dict[str, Any]:
    """Each chosen stage's hardware, expected minutes and commands, printed; nothing runs."""
    stages = []
    for stage in chosen:
        commands = stage_commands(bench, stage)
        stages.append({"stage": stage, "hardware": HARDWARE[stage], "minutes": expected_minutes(bench, stage),
                       "commands": commands})
        print(f"{stage}: {HARDWARE[stage]}, ~{expected_minutes(bench, stage):g} min")
        for command in commands:
            print("    " + shlex.join(command))
    print(f"total: ~{sum(s['minutes'] for s in stages):g} min")
    return {"stages": stages}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the chosen stages in order, writing the outputs after each; returns gpu.json's dict (with --list, the
    stages' commands)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    plan = DRY_RUN if args.dry_run else GPU
    if args.train_minutes is not None and args.train_minutes <= 0:
        parser.error(f"--train-minutes must be > 0, got {args.train_minutes:g}")
    chosen = [s for s in STAGES if s in (args.stages or plan.default_stages)]
    out = Path(args.out or ("runs/gpu-dry" if args.dry_run else "runs/gpu"))
    work = Path(args.work) if args.work else out
    if args.list:
        return list_stages(Bench(plan, args, out, work), chosen)
    notes = []
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device here: run it on a GPU machine, --dry-run to check it on the CPU, or --list "
                         "to see the commands")
        if not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++") if c):
            plan = without_compile(plan)  # LitMDM refuses compile without one: measure eager rather than nothing
            notes.append("no C++ compiler on the PATH: the models ran eager (--no-compile, --model.compile false)")
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    with open(out / "gpu.log", "a") as log:
        bench = Bench(plan, args, out, work, log, notes=notes)
        bench.say(f"[gpu] stages {','.join(chosen)}; ~{sum(expected_minutes(bench, s) for s in chosen):g} min "
                  f"expected; work {work}; out {out}")
        for stage in chosen:
            bench.stages.append(run_stage(bench, stage))
            write_outputs(bench)
        write_outputs(bench)
        bench.say(f"[gpu] done in {bench.elapsed_minutes():.1f} min: {out}/gpu.md")
    return json.loads((out / "gpu.json").read_text())


if __name__ == "__main__":
    main()
