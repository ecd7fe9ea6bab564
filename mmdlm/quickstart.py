"""The quickstart recipe as a list of `Step`s: data -> text BPE -> image tokenizer -> pre-tokenize -> AR warm
start -> block-diffusion (or masked-diffusion) model adapted from it -> evaluation (`mmdlm quickstart` runs them).

Every step is an ordinary command a user could type; a step whose output already exists is skipped, so a
killed quickstart picks up where it stopped (a training stage resumes from `OUT/{ar,mdm}-run/checkpoints/
last.ckpt`, at the step it was killed after, through `--ckpt_path last`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Step:
    """One stage of the quickstart: a command and the file whose existence means it is done."""

    name: str
    command: list[str]
    done_when: Path

    def run(self) -> float:
        if self.done_when.exists():
            print(f"[quickstart] {self.name}: done already ({self.done_when}), skipping", flush=True)
            return 0.0
        print(f"\n[quickstart] {self.name}\n$ {shlex.join(self.command)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(self.command, env=step_env())
        if result.returncode != 0:
            sys.exit(f"[quickstart] step '{self.name}' failed (exit {result.returncode}); "
                     f"re-run `make quickstart` to resume after fixing it")
        if not self.done_when.exists():
            sys.exit(f"[quickstart] step '{self.name}' finished but did not write {self.done_when}")
        return time.perf_counter() - start


def step_env() -> dict[str, str]:
    """The environment of every step: OpenMP threads that sleep instead of spinning when they wait.

    With the default (active) wait policy, torch's two threads collapse when anything else runs on a 2-core
    box (BENCHMARKS.md, "Learning"); a user's own setting wins.
    """
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def shapes_data_step(args: argparse.Namespace, shards: Path) -> Step:
    """Render the procedural shapes world (scene graphs -> images, captions, QA)."""
    return Step("make the shapes shards",
                [sys.executable, "-m", "mmdlm.worlds.shapes", "--out", str(shards), "--train", str(args.train),
                 "--val", str(args.val), "--seed", str(args.seed)],
                shards / "stats.json")


def digits_data_step(args: argparse.Namespace, shards: Path) -> Step:
    """Write scikit-learn's 1,797 real digit scans (a fixed set: --train/--val do not apply)."""
    return Step("make the digits shards",
                [sys.executable, "-m", "mmdlm.worlds.digits", "--out", str(shards), "--seed", str(args.seed)],
                shards / "stats.json")


@dataclass(frozen=True)
class World:
    """A data recipe and the defaults that suit it."""

    data_step: Callable[[argparse.Namespace, Path], Step]
    data: str  # where its shards go
    codebook_size: int  # patch-dictionary codes: shapes needs 1,024 for 30 dB (BENCHMARKS.md); digits'
    #   nearest-upscaled 8x8 scans are 4x4 blocks of 17 grey levels, so 32 codes are already exact


WORLDS = {
    "shapes": World(shapes_data_step, "data/shards/shapes", 1024),
    "digits": World(digits_data_step, "data/shards/digits", 32),
}


def patch_tokenizer_step(args: argparse.Namespace, out: Path, train_glob: str, val_glob: str) -> Step:
    """Fit the patch-dictionary tokenizer (seconds; exact for 99% of shapes patches, BENCHMARKS.md)."""
    return Step("fit the patch image tokenizer",
                [sys.executable, "-m", "vision.patch_tokenizer", "--shards", train_glob, "--out", str(out / "vq"),
                 "--codebook-size", str(codebook_size(args))],
                out / "vq" / "config.json")


def vq_tokenizer_step(args: argparse.Namespace, out: Path, train_glob: str, val_glob: str) -> Step:
    """Train the diffusers VQ-VAE with Lightning (minutes; blurrier on a CPU budget, BENCHMARKS.md)."""
    return Step("train the VQ image tokenizer",
                [sys.executable, "train.py", "fit", "--config", "configs/vq-shapes.yaml",
                 "--data.train_shards", train_glob, "--data.val_shards", val_glob,
                 "--model.export_dir", str(out / "vq"), "--model.vq.codebook_size", str(codebook_size(args)),
                 "--trainer.max_steps", str(args.vq_steps), "--trainer.default_root_dir", str(out / "vq-run")],
                out / "vq" / "config.json")


def codebook_size(args: argparse.Namespace) -> int:
    """--codebook-size, or the world's default."""
    return args.codebook_size or WORLDS[args.world].codebook_size


TOKENIZER_STEPS = {"patch": patch_tokenizer_step, "vq": vq_tokenizer_step}
BASE, AR, BLOCK = "configs/mdm-shapes.yaml", "configs/ar.yaml", "configs/block.yaml"  # the base recipe, overlays


def fit_step(name: str, configs: list[str], args: argparse.Namespace, out: Path, codes: Path, run: str,
             export: str, max_steps: int, extra: list[str]) -> Step:
    """A `train.py fit` step on the pre-tokenized shards; a killed one resumes from its `last.ckpt`."""
    return Step(name,
                [sys.executable, "train.py", "fit", *[arg for c in configs for arg in ("--config", c)],
                 "--data.train_shards", f"{codes}/train/*.tar", "--data.val_shards", f"{codes}/val/*.tar",
                 "--data.text_tokenizer", str(out / "text_tokenizer"), "--data.vq", str(out / "vq"),
                 "--model.export_dir", str(out / export), "--trainer.max_steps", str(max_steps),
                 "--trainer.default_root_dir", str(out / run)]
                + extra
                # a run before this one was killed: resume from OUT/RUN/checkpoints/last.ckpt (train.py keeps
                # checkpoints there, not in the logger's new version_N folder; none yet = a fresh start)
                + (["--ckpt_path", "last"] if (out / run).exists() else []),
                out / export / "config.json")


ADAPTATIONS = {"block": [BASE, BLOCK], "mdm": [BASE]}  # --adapt: the second stage's configs
# the warm start holds its peak learning rate after the warmup (no decay), and the adaptation's schedule anneals:
# one warmup-stable-decay run over both stages (BENCHMARKS.md, "Block diffusion: how the recipe was chosen")
WARM_START = ["--model.min_lr_ratio", "1.0"]


def training_steps(args: argparse.Namespace, out: Path, codes: Path) -> list[Step]:
    """The model: an AR warm start adapted to block or full-sequence masked diffusion (`--ar-steps` > 0), or an MDM
    from scratch.

    The warm start is the AR twin (the base recipe + `configs/ar.yaml`) trained for `--ar-steps` at a constant
    learning rate after its warmup (`WARM_START`; the second stage's cosine decay then anneals both, one
    warmup-stable-decay run: the AR learns the shapes world's yes/no "exist" questions by the hand-over, which a
    decayed AR did not). The second stage starts from its weights (`--model.init_from`: the AR's next-token head kept
    through `shift_logits`, as Dream / DiffuLLaMA / SDAR adapt AR models) and trains `--mdm-steps` on the diffusion
    objective, half of each batch still on the AR one (`--ar-rows`: the adaptation keeps more of what the AR
    learned). `--adapt block` (+ `configs/block.yaml`) makes it block diffusion: causal across blocks of 8 text tokens
    / 4 image rows, masked diffusion inside one, an exact KV cache; `--adapt mdm` full-sequence masked diffusion.
    `--seed` seeds the data, the weights and the masking noise.
    """
    seed = ["--seed_everything", str(args.seed), "--model.seed", str(args.seed)]
    if args.ar_steps <= 0:
        return [fit_step("train the masked-diffusion model", ADAPTATIONS[args.adapt], args, out, codes,
                         "mdm-run", "model", args.mdm_steps, seed + shlex.split(args.mdm_args))]
    return [
        fit_step("train the AR warm start", [BASE, AR], args, out, codes, "ar-run", "ar",
                 args.ar_steps, seed + WARM_START + shlex.split(args.ar_args)),
        fit_step(f"adapt it to {'block' if args.adapt == 'block' else 'masked'} diffusion", ADAPTATIONS[args.adapt],
                 args, out, codes, "mdm-run", "model", args.mdm_steps,
                 seed + ["--model.init_from", str(out / "ar"), "--model.ar_rows", str(args.ar_rows)]
                 + shlex.split(args.mdm_args)),
    ]


def steps(args: argparse.Namespace) -> list[Step]:
    py = sys.executable
    out = Path(args.out)
    world = WORLDS[args.world]
    shards = Path(args.data or world.data)
    codes = Path(str(shards) + "-codes")
    train_glob, val_glob = f"{shards}/train/*.tar", f"{shards}/val/*.tar"
    return [
        world.data_step(args, shards),
        Step("train the text BPE",
             [py, "-m", "mmdlm.text_tokenizer", "--shards", train_glob, "--out", str(out / "text_tokenizer"),
              "--vocab-size", str(args.text_vocab)],
             out / "text_tokenizer" / "tokenizer.json"),
        TOKENIZER_STEPS[args.tokenizer](args, out, train_glob, val_glob),
        Step("pre-tokenize the train shards",
             [py, "-m", "mmdlm.commands.pretokenize", "--vq", str(out / "vq"), "--shards", train_glob,
              "--out", str(codes / "train")],
             codes / "train" / "DONE"),
        Step("pre-tokenize the val shards",
             [py, "-m", "mmdlm.commands.pretokenize", "--vq", str(out / "vq"), "--shards", val_glob,
              "--out", str(codes / "val")],
             codes / "val" / "DONE"),
        *training_steps(args, out, codes),
        Step("evaluate",
             [py, "-m", "mmdlm.commands.evaluate", "--model", str(out / "model"), "--shards", f"{codes}/val/*.tar",
              "--out", str(out / "metrics.json"), "--report", str(out / "report.md"),
              "--samples", str(out / "samples.png"), "--limit", str(args.eval_limit)],
             out / "metrics.json"),
    ]
