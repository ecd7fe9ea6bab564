"""Training throughput of the recipes' model sizes here: tokens/s of the real training step, and MFU on a GPU.

    OMP_NUM_THREADS=2 python -m benchmarks.train_speed --config configs/mdm-shapes.yaml \\
        --config configs/mdm-shapes.yaml+configs/ar.yaml --steps 30 --out benchmarks/results
    python -m benchmarks.train_speed --config configs/mdm-shapes.yaml+configs/gpu.yaml --device cuda \\
        --precision bf16-mixed --steps 50 --out /tmp/train_speed
    # the GPU table in one command: MDM and AR at d=768 L12 and d=1024 L24, compiled, bf16, with a profile
    python -m benchmarks.train_speed --config configs/mdm-shapes.yaml+configs/gpu.yaml \\
        --config configs/mdm-shapes.yaml+configs/ar.yaml+configs/gpu.yaml \\
        --size 12x768 --size 24x1024 --steps 30 --warmup 10 --profile /tmp/ts/profile --out /tmp/ts
    # the same on CPU at toy sizes (the check that it runs: a few seconds)
    python -m benchmarks.train_speed --config configs/mdm-shapes.yaml+configs/gpu.yaml --size 1x32 --device cpu \\
        --precision 32-true --no-compile --batch-size 4 --steps 4 --warmup 1 --profile /tmp/ts/profile \\
        --profile-steps 2 --shapes-sizes --out /tmp/ts

Each `--config` is a LightningCLI recipe (`train.py fit --config ...`; overlays joined by '+'); its model
(`LitMDM` init args), layout, batch size, task weights, precision, gradient clipping and `compile` are used as
they are. The step is the real one: `LitMDM` in a Lightning `Trainer` (condition dropout, masked-diffusion or AR loss,
backward, clipping, AdamW, EMA update), fed synthetic batches of the real layout: sequences laid out by
the `mmdlm.sequence` templates (tasks drawn by the recipe's weights, 1..qa_per_sample QA pairs as in
training) with random VQ codes and random text ids (captions half to all of their region, answers
1..answer_len-1 tokens), so no data and no trained VQ are needed. Vocabulary sizes come from
--text-vocab / --codebook-size / --grid / --codebook-dim when given, else from the recipe's text tokenizer
and image tokenizer folders (a VQModel or a PatchTokenizer, as `make quickstart` writes them). A folder
that does not exist is an error naming it, unless the flags give every size it would have given, or
--shapes-sizes asks for the shapes recipes' values (text vocab 512, codebook 256, grid 8, code vectors of
8) in its place. --batch-size (repeatable) replaces the recipe's batch size, --size LxD[xH] (repeatable)
its n_layer, n_embd and n_head (H default D/64): each recipe runs once per size and batch size given.
--compile / --no-compile override the recipe's `compile` (`LitMDM`: its blocks compiled for the training
forward), whose compile time falls in the warm-up steps: give --warmup enough of them (a new sequence
length can recompile).

Each step is timed from `on_train_batch_start` to `on_train_batch_end` (CUDA synchronised; the batch is
already on the device); the first --warmup steps are left out and the median of the rest reported with
min and max. tokens/s counts attended (non-pad) tokens, as the training log's `train/tokens_per_s`;
positions/s all B x T positions computed. Achieved FLOP/s = `Transformer.flops_per_token(T)` x B x T /
step time (6N + 12 L d T per position: PaLM / nanoGPT accounting); on a GPU found in the table of
dense bf16 peaks (or given --peak-flops) MFU = achieved / peak. MFU against the bf16 peak is only
meaningful for a bf16 run (--precision bf16-mixed).

--profile DIR records --profile-steps steps right after the warm-up of every run with `torch.profiler`
(CPU, and CUDA on a GPU; those steps are left out of the timing) and writes per run, named
`<recipe>_<L>x<d>_b<batch>`: `.trace.json.gz` (a Chrome / Perfetto trace: chrome://tracing or
ui.perfetto.dev) and `.ops.txt` (`key_averages()` tables: by self CUDA time on a GPU, and by self CPU
time); the run's JSON gets a summary: wall time per profiled step, GPU kernel time per step and its share of
the wall time (how far the step is from GPU-bound: the rest is launch and Python overhead or host syncs),
kernel time by kind (matmul, attention, compiled/elementwise, optimizer, copies) and the top operators.

Writes train_speed.json and train_speed.md under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmdlm.eval.report import command_line, md_table
from mmdlm.eval.timing import load_text, machine_info, stats, sync
from mmdlm.inputs import positive_int

# Dense (no sparsity) bf16 tensor-core peaks in FLOP/s, from the vendors' data sheets; first match wins.
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
)
SHAPES_SIZES = {"text_vocab": 512, "codebook_size": 256, "grid": 8, "codebook_dim": 8}  # the shapes recipes'


def peak_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by name (None when it is not in the table)."""
    for key, value in PEAK_BF16:
        if key.lower() in device_name.lower():
            return value
    return None


# ---------------------------------------------------------------------------------------------
# the recipe


@dataclass
class Recipe:
    path: str
    model: dict[str, Any]  # LitMDM init args
    data: dict[str, Any]  # MDMDataModule init args
    trainer: dict[str, Any]


def merged(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` read over `base` as LightningCLI reads a second --config: mappings merge, other values replace."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_recipe(path: str) -> Recipe:
    """A LightningCLI YAML recipe of `LitMDM` + `MDMDataModule`: one file, or a base and its overlays joined by
    '+' (`configs/mdm-shapes.yaml+configs/gpu.yaml`)."""
    import yaml

    cfg: dict[str, Any] = {}
    for part in path.split("+"):
        cfg = merged(cfg, yaml.safe_load(Path(part).read_text()) or {})
    model, data = cfg.get("model", {}), cfg.get("data", {})
    if not str(model.get("class_path", "")).endswith("LitMDM"):
        raise ValueError(f"{path}: model.class_path is not mmdlm.training.LitMDM")
    return Recipe(path, dict(model.get("init_args", {})), dict(data.get("init_args", {})), cfg.get("trainer", {}))


def model_size(text: str) -> tuple[int, int, int]:
    """'12x768' -> (12 layers, width 768, 12 heads of 64); '2x64x2' gives the heads. An ArgumentTypeError
    for anything else (heads must divide the width into an even head dimension, as RoPE needs)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (2, 3) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"--size takes LAYERSxWIDTH or LAYERSxWIDTHxHEADS, got {text!r}")
    layers, width = parts[0], parts[1]
    heads = parts[2] if len(parts) == 3 else max(1, width // 64)
    if width % heads or (width // heads) % 2:
        raise argparse.ArgumentTypeError(f"--size {text}: {heads} heads do not split width {width} into an even "
                                         f"head dimension")
    return layers, width, heads


def resized(recipe: Recipe, batch_size: int | None, size: tuple[int, int, int] | None,
            compile_: bool | None) -> Recipe:
    """The recipe with its batch size, model size (layers, width, heads) and `compile` replaced where given."""
    model, data = dict(recipe.model), dict(recipe.data)
    if size is not None:
        model["config"] = {**model.get("config", {}), "n_layer": size[0], "n_embd": size[1], "n_head": size[2]}
    if compile_ is not None:
        model["compile"] = compile_
    if batch_size is not None:
        data["batch_size"] = batch_size
    return Recipe(recipe.path, model, data, recipe.trainer)


@dataclass
class Sizes:
    text_vocab: int
    codebook_size: int
    grid: tuple[int, int]
    codebook_dim: int
    source: str  # where they came from


TOKENIZER_SIZES = ("text_vocab",)  # what the recipe's text tokenizer folder gives
IMAGE_SIZES = ("codebook_size", "grid", "codebook_dim")  # what its image tokenizer folder gives


def _missing_folder(recipe: Recipe, key: str, what: str, flags: tuple[str, ...]) -> str:
    """The one-sentence error for a recipe folder that is needed but absent."""
    folder = recipe.data.get(key)
    named = f"{what} folder {folder!r} does not exist" if folder else f"names no {what} folder (data.{key})"
    options = " / ".join(f"--{f.replace('_', '-')}" for f in flags)
    return (f"{recipe.path}: the recipe's {named}, so the vocabulary sizes are unknown: run `make quickstart` "
            f"first, or give {options}, or --shapes-sizes to use the shapes recipes' values")


def vocab_sizes(recipe: Recipe, args: argparse.Namespace) -> Sizes:
    """Text vocabulary, codebook size, VQ grid and code-vector size: flags, else the recipe's folders, else
    (only with --shapes-sizes) the shapes recipes' values; a `ValueError` naming a missing folder otherwise."""
    from mmdlm.text_tokenizer import load_text_tokenizer

    found = dict(SHAPES_SIZES)
    defaults_ok = bool(getattr(args, "shapes_sizes", False))  # --shapes-sizes: a missing folder is fine
    source = ["shapes defaults"] if defaults_ok else []
    tok, vq = recipe.data.get("text_tokenizer"), recipe.data.get("vq")
    flagged = {key for key in SHAPES_SIZES if getattr(args, key) is not None}
    if not flagged.issuperset(TOKENIZER_SIZES):
        if tok and Path(tok).exists():
            found["text_vocab"] = load_text_tokenizer(tok).vocab_size
            source.append(f"tokenizer {tok}")
        elif not defaults_ok:
            raise ValueError(_missing_folder(recipe, "text_tokenizer", "text tokenizer", TOKENIZER_SIZES))
    if not flagged.issuperset(IMAGE_SIZES):
        if vq and Path(vq).exists():
            from vision.load import load_image_tokenizer  # a VQModel or a PatchTokenizer folder

            try:
                v = load_image_tokenizer(vq)
            except (OSError, ValueError) as err:
                raise ValueError(f"{recipe.path}: the recipe's image tokenizer folder {vq!r} cannot be loaded: "
                                 f"{str(err).strip().splitlines()[0] if str(err).strip() else err!r}") from err
            found.update(codebook_size=v.codebook_size, grid=v.grid[0], codebook_dim=v.embed_dim)
            source.append(f"vq {vq}")
        elif not defaults_ok:
            raise ValueError(_missing_folder(recipe, "vq", "image tokenizer", IMAGE_SIZES))
    for key in SHAPES_SIZES:
        if getattr(args, key) is not None:
            found[key] = getattr(args, key)
            source.append(f"--{key.replace('_', '-')}")
    g = found["grid"]
    return Sizes(found["text_vocab"], found["codebook_size"], (g, g) if isinstance(g, int) else tuple(g),
                 found["codebook_dim"], ", ".join(source))


# ---------------------------------------------------------------------------------------------
# synthetic batches of the real layout


def synthetic_sample(task, rng: random.Random, vocab, layout, grid: tuple[int, int]):
    """One training sequence of `task` with random codes and random text ids, laid out by mmdlm.sequence."""
    from mmdlm.sequence import Task, caption_sample, joint_sample, t2i_sample, text_sample, vqa_sample

    def text(lo: int, hi: int) -> list[int]:
        return [rng.randrange(vocab.text_size) for _ in range(rng.randint(max(1, lo), max(1, hi)))]

    codes = torch.tensor([[rng.randrange(vocab.codebook_size) for _ in range(grid[1])] for _ in range(grid[0])])
    caption = text(layout.caption_len // 2, layout.caption_len - 1)
    if task == Task.VQA:
        qa = [(text(layout.question_len // 2, layout.question_len), text(1, layout.answer_len - 1))
              for _ in range(rng.randint(1, layout.qa_per_sample))]
        return vqa_sample(codes, qa, vocab, layout)
    if task == Task.TEXT:
        return text_sample(text(layout.text_len // 4, layout.text_len // 2), vocab, layout)
    if task == Task.T2I:
        return t2i_sample(caption, codes, vocab, layout)
    if task == Task.JOINT:
        return joint_sample(codes, caption, vocab, layout)
    return caption_sample(codes, caption, vocab, layout)


def synthetic_batches(recipe: Recipe, vocab, layout, grid: tuple[int, int], n: int, seed: int) -> list:
    """`n` collated batches of the recipe's batch size, tasks drawn by its task weights."""
    from mmdlm.sequence import Task, collate

    weights = recipe.data.get("task_weights") or {"t2i": 1.0, "vqa": 1.0, "caption": 0.5, "joint": 0.25}
    tasks = [Task[k.upper()] for k, w in weights.items() if w > 0]
    probs = [weights[t.name.lower()] for t in tasks]
    rng = random.Random(seed)
    size = int(recipe.data.get("batch_size", 32))
    return [collate([synthetic_sample(rng.choices(tasks, probs)[0], rng, vocab, layout, grid) for _ in range(size)],
                    vocab) for _ in range(n)]


def _identity(batch):
    return batch


class SyntheticProcessor:
    """What `LitMDM.configure_model` reads from `dm.processor` (an `MMDLMProcessor`), from sizes alone: the
    vocabulary, layout, image grid, longest sequence and a codebook of random vectors (no tokenizer folders)."""

    def __init__(self, sizes: Sizes, layout, seed: int) -> None:
        from mmdlm.vocab import Vocab

        self.vocab = Vocab(sizes.text_vocab, sizes.codebook_size)
        self.layout, self.image_grid, self.codebook_dim, self.seed = layout, sizes.grid, sizes.codebook_dim, seed

    @property
    def max_seq_len(self) -> int:  # as MMDLMProcessor.max_seq_len: the longest template
        from mmdlm.processor import longest_sequence

        return longest_sequence(self.vocab, self.layout, self.image_grid)

    def code_features(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        # on the CPU, as the generator: configure_model runs under the trainer's device context
        return torch.randn(self.vocab.codebook_size, self.codebook_dim, generator=g, device="cpu")


def synthetic_datamodule(recipe: Recipe, sizes: Sizes, n_batches: int, seed: int):
    """A DataModule with the processor's values `LitMDM.configure_model` reads, and synthetic batches."""
    import lightning as L
    from torch.utils.data import DataLoader

    from mmdlm.sequence import Layout

    class SyntheticData(L.LightningDataModule):
        def __init__(self) -> None:
            super().__init__()
            self.processor = SyntheticProcessor(sizes, Layout(**recipe.data.get("layout", {})), seed)
            p = self.processor
            self.batches = synthetic_batches(recipe, p.vocab, p.layout, sizes.grid, n_batches, seed)

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.batches, batch_size=None, shuffle=False, collate_fn=_identity)

    return SyntheticData()


# ---------------------------------------------------------------------------------------------
# timing


def step_timer(device_type: str):
    """A Callback recording each training step's seconds, attended tokens and B x T positions."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.tokens: list[int] = []
            self.positions: list[int] = []
            self.seq_len: list[int] = []
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            sync(torch.device(device_type))
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            sync(torch.device(device_type))
            self.seconds.append(time.perf_counter() - self._start)
            self.tokens.append(int((~batch.pad).sum()))
            self.positions.append(batch.pad.numel())
            self.seq_len.append(batch.pad.shape[1])

    return StepTimer()


# Kinds of GPU kernel by name (first match wins): where a profiled step's GPU time goes.
KERNEL_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient_attention")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90_", "sm80_", "cublas")),
    ("optimizer and EMA", ("multi_tensor_apply", "foreach", "adam", "lerp")),
    ("compiled (triton)", ("triton",)),
    ("copies and fills", ("memcpy", "memset", "copy", "fill", "cat")),
    ("reductions", ("reduce", "softmax", "norm", "cross_entropy", "nll_loss")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(k in low for k in keys)), "other elementwise")


def profile_summary(prof, steps: int, wall: float, device_type: str, top: int = 12) -> dict[str, Any]:
    """Per profiled step: wall ms, GPU kernel ms and its share of the wall time, kernel ms by `kernel_kind`,
    and the `top` operators by self time (self CUDA time on a GPU, self CPU time otherwise)."""
    out: dict[str, Any] = {"steps": steps, "wall_ms_per_step": 1e3 * wall / steps}
    averages = prof.key_averages()
    if device_type == "cuda":
        from torch.autograd import DeviceType

        by_kind: dict[str, float] = {}
        for event in prof.events():  # device-side events only: each kernel (and copy) counted once
            if event.device_type == DeviceType.CUDA:
                kind = kernel_kind(event.name)
                by_kind[kind] = by_kind.get(kind, 0.0) + event.time_range.elapsed_us() / 1e3 / steps
        busy = sum(by_kind.values())
        out |= {"gpu_kernel_ms_per_step": busy, "gpu_busy_fraction": busy / out["wall_ms_per_step"],
                "gpu_ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))}
        key = "self_device_time_total"
    else:
        key = "self_cpu_time_total"
    rows = sorted(averages, key=lambda e: -getattr(e, key))[:top]
    out["top_ops"] = [{"name": e.key, "calls_per_step": e.count / steps, "self_ms_per_step": getattr(e, key) / 1e3
                       / steps} for e in rows]
    return out


def step_profiler(device_type: str, start: int, steps: int, folder: Path, name: str):
    """A Callback running `torch.profiler` over training steps [start, start + steps) and writing
    `<folder>/<name>.trace.json.gz`, `<folder>/<name>.ops.txt`; `.summary` holds `profile_summary`."""
    from lightning.pytorch.callbacks import Callback
    from torch.profiler import ProfilerActivity, profile

    class StepProfiler(Callback):
        def __init__(self) -> None:
            self.step = -1
            self.prof: Any = None
            self.summary: dict[str, Any] | None = None
            self._start = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.step += 1
            if self.step == start:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
                self.prof = profile(activities=activities, record_shapes=True)
                self.prof.start()
                sync(torch.device(device_type))
                self._start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.prof is None or self.step != start + steps - 1:
                return
            sync(torch.device(device_type))
            wall = time.perf_counter() - self._start
            self.prof.stop()
            folder.mkdir(parents=True, exist_ok=True)
            trace, table = folder / f"{name}.trace.json.gz", folder / f"{name}.ops.txt"
            self.prof.export_chrome_trace(str(trace))
            averages = self.prof.key_averages()
            sorts = (["self_device_time_total"] if device_type == "cuda" else []) + ["self_cpu_time_total"]
            table.write_text("\n\n".join(f"{steps} profiled steps of {name}, sorted by {s}:\n"
                                         + averages.table(sort_by=s, row_limit=40) for s in sorts) + "\n")
            self.summary = {**profile_summary(self.prof, steps, wall, device_type), "trace": str(trace),
                            "table": str(table)}
            self.prof = None

    return StepProfiler()


def run_name(recipe: Recipe) -> str:
    """`<recipe file stem>_<L>x<d>_b<batch>`: a run's name in profile file names."""
    m = recipe.model.get("config", {})
    stem = "+".join(Path(part).stem for part in recipe.path.split("+"))
    return f"{stem}_{m.get('n_layer', 4)}x{m.get('n_embd', 128)}_b{recipe.data.get('batch_size', 32)}"


def run_recipe(recipe: Recipe, args: argparse.Namespace, batch_size: int | None = None,
               sizes: Sizes | None = None, size: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """Train `args.steps` real steps of one recipe on synthetic batches (at `batch_size` and model `size` where
    given); its throughput, and with `args.profile` a profile of the steps after the warm-up."""
    import lightning as L

    from mmdlm.model import ModelConfig
    from mmdlm.training import LitMDM

    recipe = resized(recipe, batch_size, size, getattr(args, "compile", None))
    sizes = sizes or vocab_sizes(recipe, args)
    precision = args.precision or recipe.trainer.get("precision", "32-true")
    device_type = args.device
    L.seed_everything(args.seed, verbose=False)
    dm = synthetic_datamodule(recipe, sizes, min(args.steps, 8), args.seed)
    compiled = bool(recipe.model.get("compile", False))
    lit = LitMDM(**{**recipe.model, "config": ModelConfig(**recipe.model.get("config", {})), "export_dir": None,
                    "samples_at_val": 0, "compile": compiled})
    timer = step_timer(device_type)
    profiled = getattr(args, "profile", None) is not None
    callbacks = [timer]
    if profiled:
        profiler = step_profiler(device_type, args.warmup, args.profile_steps, Path(args.profile), run_name(recipe))
        callbacks.append(profiler)
    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(accelerator="gpu" if device_type == "cuda" else "cpu", devices=1, precision=precision,
                            max_steps=args.steps, gradient_clip_val=recipe.trainer.get("gradient_clip_val"),
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                            callbacks=callbacks, default_root_dir=root)
        if device_type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.fit(lit, datamodule=dm)
    first = args.warmup + (args.profile_steps if profiled else 0)  # profiled steps are not timed
    kept = slice(min(first, len(timer.seconds) - 1), None)
    secs, toks, pos, seq = timer.seconds[kept], timer.tokens[kept], timer.positions[kept], timer.seq_len[kept]
    model = lit.model
    flops = [model.flops_per_token(t) * p / s for t, p, s in zip(seq, pos, secs)]
    out: dict[str, Any] = {
        "config": recipe.path, "causal": bool(model.config.causal), "parameters": model.num_params(),
        "non_embedding_parameters": model.num_params(non_embedding=True),
        "n_layer": model.config.n_layer, "n_embd": model.config.n_embd, "vocab_size": model.config.vocab_size,
        "sizes_from": sizes.source, "batch_size": len(dm.batches[0]), "seq_len_mean": statistics.fmean(seq),
        "n_head": model.config.n_head, "precision": str(precision), "compile": compiled, "device": device_type,
        "steps_timed": len(secs), "warmup": args.warmup,
        "seconds_per_step": stats(secs),
        "tokens_per_s": stats([t / s for t, s in zip(toks, secs)]),
        "positions_per_s": stats([p / s for p, s in zip(pos, secs)]),
        "flops_per_token": model.flops_per_token(round(statistics.fmean(seq))),
        "achieved_flops": stats(flops),
    }
    if device_type == "cuda":
        peak = args.peak_flops or peak_flops(torch.cuda.get_device_name())
        out["gpu"] = torch.cuda.get_device_name()
        out["peak_bf16_flops"] = peak
        out["mfu"] = out["achieved_flops"]["median"] / peak if peak else None
        out["max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if profiled:
        out["profile"] = profiler.summary
    return out


# ---------------------------------------------------------------------------------------------
# outputs


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# Training throughput", "", f"`{result['command']}`", "",
             f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} threads"
             f"{', GPU ' + m['gpu'] if m.get('gpu') else ''}, load average {load_text(m)}. "
             f"Real `LitMDM` training steps on synthetic batches of "
             f"the recipes' layout; median over the steps after {result['warmup']} warm-up step(s), [min - max].", ""]
    header = ["config", "kind", "L x d", "params (non-emb.)", "batch x T", "precision", "device",
              "s/step [min - max]", "tokens/s", "positions/s", "TFLOP/s", "MFU"]
    rows = []
    for r in result["runs"]:
        s = r["seconds_per_step"]
        mfu = r.get("mfu")
        kind = ("AR" if r["causal"] else "MDM") + (" compiled" if r.get("compile") else "")
        rows.append([Path(r["config"]).name, kind, f"{r['n_layer']} x {r['n_embd']}",
                     f"{r['parameters'] / 1e6:.2f}M ({r['non_embedding_parameters'] / 1e6:.2f}M)",
                     f"{r['batch_size']} x {r['seq_len_mean']:.0f}", r["precision"], r.get("gpu", r["device"]),
                     f"{s['median']:.3g} [{s['min']:.3g} - {s['max']:.3g}]", f"{r['tokens_per_s']['median']:.4g}",
                     f"{r['positions_per_s']['median']:.4g}", f"{r['achieved_flops']['median'] / 1e12:.3g}",
                     "-" if mfu is None else f"{100 * mfu:.1f}%"])
    lines += md_table(header, rows)
    lines += ["", "tokens/s: attended (non-pad) tokens; positions/s: all B x T; FLOP/s from "
              "`Transformer.flops_per_token` (6N + 12 L d T per position); MFU against the GPU's dense bf16 peak."]
    profiles = [(r, r["profile"]) for r in result["runs"] if r.get("profile")]
    if profiles:
        lines += ["", "## Where the step goes (torch.profiler)", "",
                  "Per profiled step (left out of the timing above). GPU busy: kernel time / wall time; the rest "
                  "is launch and Python overhead or host syncs. Trace and operator tables: the files named.", ""]
        header = ["config", "kind", "L x d", "wall ms", "GPU kernel ms", "GPU busy", "GPU ms by kind",
                  "top operators (self ms)"]
        table = []
        for r, p in profiles:
            busy = p.get("gpu_busy_fraction")
            kinds = "; ".join(f"{k} {v:.3g}" for k, v in p.get("gpu_ms_per_step_by_kind", {}).items()) or "-"
            ops = "; ".join(f"{o['name']} {o['self_ms_per_step']:.3g}" for o in p["top_ops"][:5])
            table.append([Path(r["config"]).name, "AR" if r["causal"] else "MDM", f"{r['n_layer']} x {r['n_embd']}",
                          f"{p['wall_ms_per_step']:.4g}", "-" if busy is None else f"{p['gpu_kernel_ms_per_step']:.4g}",
                          "-" if busy is None else f"{100 * busy:.0f}%", kinds, ops])
        lines += md_table(header, table)
        lines += ["", "Files: " + ", ".join(f"`{Path(p['trace']).name}`" for _, p in profiles)
                  + " and the matching `.ops.txt` tables."]
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True,
                        help="a LitMDM recipe, overlays joined by '+' (repeatable)")
    parser.add_argument("--out", required=True, help="folder for train_speed.json and train_speed.md")
    parser.add_argument("--steps", type=positive_int, default=30, help="training steps per recipe, warm-up included")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the statistics")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto = cuda if available")
    parser.add_argument("--precision", help="override the recipe's trainer.precision (e.g. bf16-mixed on a GPU)")
    parser.add_argument("--batch-size", type=positive_int, action="append",
                        help="replace the recipe's batch size (repeatable: one run per size)")
    parser.add_argument("--size", type=model_size, action="append",
                        help="LAYERSxWIDTH[xHEADS] replacing the recipe's n_layer, n_embd, n_head (repeatable: one "
                             "run per size; heads default to width/64)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile the transformer's blocks for training, or not (default: the recipe's)")
    parser.add_argument("--profile", metavar="DIR",
                        help="write a torch.profiler trace and operator tables of --profile-steps steps per run here")
    parser.add_argument("--profile-steps", type=positive_int, default=3,
                        help="steps profiled after the warm-up (not timed)")
    parser.add_argument("--peak-flops", type=float, help="peak FLOP/s for MFU (default: the table, by GPU name)")
    parser.add_argument("--text-vocab", type=positive_int, help="text ids (default: the recipe's tokenizer, else 512)")
    parser.add_argument("--codebook-size", type=positive_int, help="VQ codes (default: the recipe's VQ, else 256)")
    parser.add_argument("--grid", type=positive_int, help="VQ grid side (default: the recipe's VQ, else 8)")
    parser.add_argument("--codebook-dim", type=positive_int,
                        help="VQ code vector size (default: the recipe's VQ, else 8)")
    parser.add_argument("--shapes-sizes", action="store_true",
                        help="where a recipe's tokenizer or VQ folder does not exist, use the shapes recipes' sizes "
                             "(without it, a missing folder is an error)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="silence Lightning's info lines")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure each recipe; write train_speed.json and train_speed.md; returns the result."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must lie in [0, --steps), got {args.warmup} with --steps {args.steps}")
    if args.profile is not None and args.warmup + args.profile_steps >= args.steps:
        parser.error(f"--profile: --steps {args.steps} leaves no timed step after {args.warmup} warm-up and "
                     f"{args.profile_steps} profiled steps")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    import yaml

    recipes = []
    for path in args.config:
        try:
            recipe = load_recipe(path)
        except (OSError, ValueError, AttributeError, yaml.YAMLError) as err:  # AttributeError: not a mapping
            parser.error(f"--config {path!r}: {str(err).strip().splitlines()[0] if str(err).strip() else err!r}")
        try:
            recipes.append((recipe, vocab_sizes(recipe, args)))  # before any run: a missing folder fails fast
        except ValueError as err:
            parser.error(str(err))
    if args.quiet:
        import lightning.pytorch  # noqa: F401  (it sets its logger's level when imported: import first)

        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    runs = [run_recipe(recipe, args, batch, sizes, size) for recipe, sizes in recipes
            for size in (args.size or [None]) for batch in (args.batch_size or [None])]
    result = {"command": command_line("benchmarks.train_speed", argv), "machine": machine_info(args.device),
              "warmup": args.warmup, "steps": args.steps, "profile_steps": args.profile_steps if args.profile else 0,
              "runs": runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "train_speed.md").write_text(render_markdown(result))
    print(f"wrote {out / 'train_speed.json'} and {out / 'train_speed.md'}")
    return result


if __name__ == "__main__":
    main()
