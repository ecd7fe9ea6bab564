"""Memory of fine-tuning from a pretrained LM: peak resident memory of the real `configs/mdm-from-hf.yaml` fit, full
and LoRA, against the parameters it trains.

    OMP_NUM_THREADS=2 python -m benchmarks.finetune_memory --size 8x512 --size 12x1024 --vocab 32000 \\
        --out benchmarks/results/finetune_memory
    OMP_NUM_THREADS=2 python -m benchmarks.finetune_memory --size 8x512 --vocab 32000 --batch-size 32 \\
        --variant full --variant lora --out benchmarks/results/finetune_memory/batch32
    # the check that it runs (a minute): a toy size, two variants
    python -m benchmarks.finetune_memory --size 2x64 --vocab 2000 --steps 2 --variant full --variant lora \\
        --out /tmp/finetune_memory

Per --size LxD it writes, under a work folder (--work, else a temporary one):

- a random transformers `Qwen2ForCausalLM` folder (`save_pretrained`, safetensors): L layers of width D, D/64
  query heads, a quarter of them (at least 1) key/value heads, an MLP of about 2.7 D (a multiple of 64), q/k/v
  biases, tied embeddings as the small Qwens have, and --vocab rows; beside it a tokenizer.json with exactly that
  many ids (a `tokenizers` WordLevel model: every word of the shapes world's captions, paraphrases, questions and
  answers, then filler words up to --vocab, a Whitespace pre-tokenizer and an unknown token), so the embedding is
  a realistic share of the model; `BPETokenizer.from_file` must load it and encode shapes texts with no unknowns;
- small shapes shards (`mmdlm.worlds.shapes.write_shapes`) and an untrained VQ of `configs/vq-shapes.yaml`'s size
  (`VQTokenizer.new()`; an untrained one costs the same memory).

Then, per --variant, the fit command a user runs, in a subprocess, for --steps steps on the CPU in fp32:

    python train.py fit --config configs/mdm-from-hf.yaml [VARIANT'S ARGS] --model.init_from QWEN2_FOLDER \\
        --data.train_shards ... --data.vq ... --data.batch_size 8 --data.num_workers 0 --trainer.precision 32-true \\
        --trainer.accelerator cpu --trainer.max_steps 3 --trainer.limit_val_batches 0 \\
        --trainer.callbacks+=benchmarks.finetune_memory.MemoryProbe --trainer.callbacks.path PROBE.json

Variants: `full` (the recipe: every parameter trains, activation checkpointing), `full_no_ckpt` (without it),
`lora` (+ `--config configs/lora.yaml`: rank-8 adapters on every block Linear, the base frozen), `lora_no_ckpt`,
`lora_emb` (LoRA with the embedding table and the image embeddings trained fully, `--model.lora_train`, as a
transformers LM's new image rows need; the head is tied to the embedding, so there is no `lm_head` to name).

`MemoryProbe` (a Lightning callback appended to the recipe's) reads the process's resident set from /proc/self/status
and resets its high-water mark (`VmHWM`, by writing 5 to /proc/self/clear_refs) at each boundary, so each phase's
peak is exact: `start` (interpreter, torch, Lightning, the data module and the VQ: the baseline), `load` (the
transformers weights read, mapped into mmdlm's transformer, the optimizer built), each training step (the first
allocates the gradients and AdamW's two moments), `checkpoint` (ModelCheckpoint's last.ckpt at the end of training,
which Lightning serialises into memory before writing it) and `export` (`LitMDM.on_fit_end`'s model folder; LoRA's
merges the adapters into a copy of the weights); the largest of them is the process's peak. (The child's
`ru_maxrss`, from `os.wait4` or `RUSAGE_CHILDREN`, is no use here: a child spawned by a parent that has built the
model starts with the parent's peak.) On a GPU (--accelerator gpu) the probe records
`torch.cuda.max_memory_allocated` per phase as well.

Reported per run: parameters (total, trained), the baseline RSS, the load peak, the training peak (the largest step
peak), the training peak above the baseline and that per parameter, against the accounting for AdamW in fp32:
4 bytes a weight + 4 a gradient + 8 for the two moments = 16 bytes per trained parameter, 4 per frozen one; the
rest is activations, the logits over the vocabulary and allocator slack. The LoRA runs' trained-parameter line
(`mmdlm.lora.lora_report`, printed at fit start) is copied from their log.

Writes finetune_memory.json and finetune_memory.md under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
RECIPE = "configs/mdm-from-hf.yaml"
LORA = "configs/lora.yaml"
# a transformers LM's new rows and image embeddings, trained beside the adapters (tied head: no lm_head module)
LORA_EMB_TRAIN = "[tok_emb, modality_emb, row_emb, col_emb, code_proj]"


@dataclass(frozen=True)
class Variant:
    """What a variant adds to the recipe's fit command: overlay configs, then overrides."""

    description: str
    configs: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()


NO_CKPT = ("--model.activation_checkpointing", "false")
VARIANTS: dict[str, Variant] = {
    "full": Variant("full fine-tuning, activation checkpointing (the recipe)"),
    "full_no_ckpt": Variant("full fine-tuning, no activation checkpointing", overrides=NO_CKPT),
    "lora": Variant("LoRA rank 8 on every block Linear, activation checkpointing", (LORA,)),
    "lora_no_ckpt": Variant("LoRA rank 8, no activation checkpointing", (LORA,), NO_CKPT),
    "lora_emb": Variant("LoRA rank 8 + embeddings trained fully, activation checkpointing", (LORA,),
                        ("--model.lora_train", LORA_EMB_TRAIN)),
}
UNK = "[UNK]"
KIB = 1024
GIB = 1024**3
LORA_LINE = re.compile(r"LoRA rank .*: training [\d,]+ of [\d,]+ parameters \([\d.]+%\)")


# ---------------------------------------------------------------------------------------------
# the probe, inside the fit process


def _proc_status_kib(key: str) -> int:
    """A /proc/self/status field in KiB (VmRSS: resident now, VmHWM: the resident peak since the last reset)."""
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else -1


def _reset_peak() -> None:
    """Start a new resident high-water mark (Linux >= 4.0: VmHWM := VmRSS)."""
    Path("/proc/self/clear_refs").write_text("5")


class MemoryProbe(Callback):
    """Records the fit process's resident memory per phase (start, load, each step, end) into a JSON file: the
    phase's peak (VmHWM, reset at every boundary) and the resident set at its end, in bytes; and the model's
    parameter counts. With CUDA, `torch.cuda.max_memory_allocated` per phase too."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.record: dict[str, Any] = {"phases": [], "steps": []}
        self.step_start = 0.0

    def _cuda(self, pl_module: Any) -> bool:
        import torch

        return torch.cuda.is_available() and any(p.is_cuda for p in pl_module.parameters())

    def _close(self, name: str, pl_module: Any = None) -> dict[str, Any]:
        """End the current phase as `name`: its peak and the resident set now; start the next one."""
        import torch

        phase = {"phase": name, "peak": _proc_status_kib("VmHWM") * KIB, "rss": _proc_status_kib("VmRSS") * KIB,
                 "time": time.time()}
        _reset_peak()
        if pl_module is not None and pl_module.model is not None and self._cuda(pl_module):
            phase["cuda_peak"] = torch.cuda.max_memory_allocated()
            phase["cuda_allocated"] = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        self.record["phases"].append(phase)
        self._write()
        return phase

    def _write(self) -> None:
        self.path.write_text(json.dumps(self.record, indent=1) + "\n")

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Lightning calls callbacks' setup after the data module's and before `configure_model` builds the model
        self._close("start")

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from mmdlm.lora import parameter_counts

        self._close("load", pl_module)
        trained, total = parameter_counts(pl_module.model)
        self.record.update(trained=trained, total=total, vocab_rows=pl_module.model.config.vocab_size,
                           activation_checkpointing=bool(pl_module.model.activation_checkpointing),
                           precision=str(trainer.precision))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.step_start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        seconds = time.perf_counter() - self.step_start
        phase = self._close(f"step{trainer.global_step}", pl_module)
        self.record["steps"].append({**phase, "seconds": seconds, "batch": list(batch.ids.shape)})

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        # after ModelCheckpoint's on_train_end (save_last) and before `LitMDM.on_fit_end` (callbacks come first)
        self._close("checkpoint", pl_module)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._close("export", pl_module)  # `LitMDM.on_fit_end`: the model folder (LoRA: merged into a copy)


# ---------------------------------------------------------------------------------------------
# the inputs: a transformers Qwen2 folder with a tokenizer of --vocab ids, shards, a VQ


def parse_size(text: str) -> tuple[int, int]:
    """'12x1024' -> (12 layers, width 1024); the width a multiple of 64 (heads of 64)."""
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) % 64:
        raise argparse.ArgumentTypeError(f"--size wants LAYERSxWIDTH with the width a multiple of 64, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def qwen2_shape(layers: int, hidden: int, vocab: int) -> dict[str, Any]:
    """The `Qwen2Config` fields of a model of `layers` x `hidden`: heads of 64, a quarter of them (at least 1) for
    keys and values, an MLP of about 2.7 x hidden (a multiple of 64), tied embeddings, `vocab` rows."""
    heads = hidden // 64
    kv = max(1, heads // 4)
    while heads % kv:
        kv -= 1
    return dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv, intermediate_size=max(64, round(2.7 * hidden / 64) * 64),
                max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=1e6)


def shapes_texts(n: int, seed: int) -> list[str]:
    """The captions, paraphrases, questions and answers of `n` random shapes scenes."""
    from mmdlm.worlds.shapes import caption, make_questions, paraphrase, sample_scene

    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        objects = sample_scene(rng, 1, 2)
        texts += [caption(objects), paraphrase(objects, rng)]
        for qa in make_questions(objects, rng):
            texts += [qa["question"], qa["answer"]]
    return texts


def word_level_tokenizer(vocab_size: int) -> Any:
    """A `tokenizers.Tokenizer` of exactly `vocab_size` ids: the unknown token, every word (and punctuation run)
    of the shapes world's texts, then filler words; Whitespace pre-tokenizer, words joined by spaces on decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pre = pre_tokenizers.Whitespace()
    words = sorted({piece for text in shapes_texts(3000, seed=0) for piece, _ in pre.pre_tokenize_str(text)})
    if vocab_size < len(words) + 1:
        raise SystemExit(f"--vocab {vocab_size} is below the shapes world's {len(words) + 1} words")
    names = [UNK, *words] + [f"filler{i}" for i in range(vocab_size - len(words) - 1)]
    tok = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, "a , b" -> "a, b"
    return tok


def write_qwen2_folder(path: Path, layers: int, hidden: int, vocab: int, dtype: str = "bfloat16",
                       seed: int = 0) -> dict[str, Any]:
    """A random `Qwen2ForCausalLM` of that shape saved to `path` (safetensors, weights in `dtype`: Qwen's published
    checkpoints are bfloat16; mmdlm trains them in fp32 whatever they are stored in) with its tokenizer.json;
    checks that `BPETokenizer.from_file` loads it with `vocab` ids and encodes fresh shapes texts with no unknown
    token.
    Returns the config fields and the transformers parameter count."""
    import torch
    import transformers

    from mmdlm.text_tokenizer import BPETokenizer

    shape = qwen2_shape(layers, hidden, vocab)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape)).to(getattr(torch, dtype))
    n_params = sum(p.numel() for p in model.parameters())  # the tied table counted once
    model.save_pretrained(path)
    del model
    word_level_tokenizer(vocab).save(str(path / "tokenizer.json"))
    loaded = BPETokenizer.from_file(path)
    unk = loaded.tok.token_to_id(UNK)
    if loaded.vocab_size != vocab:
        raise RuntimeError(f"the tokenizer.json has {loaded.vocab_size} ids, not {vocab}")
    for text in shapes_texts(500, seed=1):
        if unk in loaded.encode(text):
            raise RuntimeError(f"the tokenizer.json maps part of {text!r} to {UNK}")
    return {**shape, "parameters": n_params, "dtype": dtype}


def write_data(root: Path) -> tuple[Path, Path]:
    """Small shapes shards (train 256 / val 32 scenes) and an untrained VQ of configs/vq-shapes.yaml's size."""
    import torch

    from mmdlm.worlds.shapes import ShapesConfig, write_shapes
    from vision.tokenizer import VQTokenizer

    shards, vq = root / "shapes", root / "vq"
    if not (shards / "stats.json").is_file():
        write_shapes(shards, ShapesConfig(train=256, val=32, seed=1, shard_size=128), progress=False)
    if not (vq / "config.json").is_file():
        torch.manual_seed(0)
        VQTokenizer.new().save_pretrained(vq)
    return shards, vq


# ---------------------------------------------------------------------------------------------
# one fit


@dataclass
class Run:
    size: str
    variant: str
    description: str
    command: list[str]
    returncode: int = -1
    seconds: float = 0.0
    probe: dict[str, Any] = field(default_factory=dict)
    lora_line: str | None = None
    disk: dict[str, int] = field(default_factory=dict)  # bytes of the checkpoints folder and the model folder
    log_tail: str = ""

    def phase(self, name: str) -> dict[str, Any]:
        return next((p for p in self.probe.get("phases", []) if p["phase"] == name), {})

    def summary(self) -> dict[str, Any]:
        """The numbers of the table: bytes, and bytes per parameter."""
        steps = self.probe.get("steps", [])
        if self.returncode != 0 or not steps:
            return {}
        total, trained = self.probe["total"], self.probe["trained"]
        baseline = self.phase("start")["rss"]
        train_peak = max(s["peak"] for s in steps)
        net = train_peak - baseline
        accounted = 4 * total + 12 * trained  # fp32 weights; a gradient and two AdamW moments per trained one
        longest = max(s["batch"][0] * s["batch"][1] for s in steps)
        out = {
            "total": total, "trained": trained, "trained_share": trained / total, "baseline": baseline,
            "load_peak": self.phase("load")["peak"], "loaded_rss": self.phase("load")["rss"],
            "train_peak": train_peak, "checkpoint_peak": self.phase("checkpoint").get("peak"),
            "export_peak": self.phase("export").get("peak"),
            "process_peak": max(p["peak"] for p in self.probe["phases"]),
            "net_train_peak": net, "bytes_per_param": net / total, "accounted": accounted,
            "accounted_per_param": accounted / total, "rest": net - accounted,
            "rest_per_param": (net - accounted) / total, "step_seconds": [s["seconds"] for s in steps],
            "batches": [s["batch"] for s in steps], "activation_checkpointing": self.probe["activation_checkpointing"],
            "vocab_rows": self.probe["vocab_rows"],
            "logits_bytes": 4 * longest * self.probe["vocab_rows"],  # one fp32 copy of the largest batch's logits
        }
        if any("cuda_peak" in s for s in steps):
            out["cuda_train_peak"] = max(s.get("cuda_peak", 0) for s in steps)
        return out


def fit_command(args: argparse.Namespace, variant: str, qwen: Path, shards: Path, vq: Path, root: Path,
                probe: Path) -> list[str]:
    """The recipe's fit command for `variant`, on these inputs, with the probe appended to its callbacks."""
    v = VARIANTS[variant]
    configs = [arg for config in v.configs for arg in ("--config", config)]
    return [sys.executable, "train.py", "fit", "--config", RECIPE, *configs, "--model.init_from", str(qwen),
            "--data.train_shards", f"{shards}/train/*.tar", "--data.val_shards", f"{shards}/val/*.tar",
            "--data.vq", str(vq), "--data.batch_size", str(args.batch_size), "--data.num_workers", "0",
            "--trainer.precision", args.precision, "--trainer.accelerator", args.accelerator,
            "--trainer.max_steps", str(args.steps), "--trainer.limit_val_batches", "0",
            "--trainer.default_root_dir", str(root), "--model.warmup_steps", "1", "--model.samples_at_val", "0",
            "--trainer.callbacks+=benchmarks.finetune_memory.MemoryProbe", "--trainer.callbacks.path", str(probe),
            *v.overrides]


def run_fit(command: list[str], log: Path, threads: int, timeout: float) -> tuple[int, float]:
    """Run `command` from the repository root with its output in `log`: (exit code, seconds); killed after
    `timeout` seconds (exit code -9)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    return code, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# the report


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def markdown(runs: list[Run], models: dict[str, dict[str, Any]], args: argparse.Namespace,
             machine: dict[str, Any]) -> str:
    """The results as a markdown fragment: the memory table, the process and disk table, the models."""
    from mmdlm.eval.report import command_line, md_table
    from mmdlm.eval.timing import load_text

    rows, other = [], []
    for run in runs:
        s = run.summary()
        if not s:
            rows.append([run.size, run.variant, "failed", *["-"] * 10])
            continue
        rows.append([run.size, run.variant, f"{s['total'] / 1e6:.1f}M", f"{s['trained'] / 1e6:.2f}M "
                     f"({100 * s['trained_share']:.1f}%)", gib(s["baseline"]), gib(s["load_peak"]),
                     gib(s["train_peak"]), gib(s["net_train_peak"]), f"{s['bytes_per_param']:.1f}",
                     f"{s['accounted_per_param']:.1f}", f"{gib(s['rest'])} ({s['rest_per_param']:.1f})",
                     gib(s["checkpoint_peak"]), gib(s["export_peak"])])
        other.append([run.size, run.variant, gib(s["process_peak"]), gib(run.disk.get("checkpoint_bytes")),
                      gib(run.disk.get("export_bytes")), ", ".join(f"{b}x{t}" for b, t in s["batches"]),
                      f"{statistics.median(s['step_seconds']):.0f}", f"{run.seconds:.0f}"])
    first = next((run.summary() for run in runs if run.summary()), {})
    lines = [f"# Fine-tuning memory from a pretrained LM ({args.precision}, {args.accelerator})", "",
             f"    {command_line('benchmarks.finetune_memory', None)}", "",
             f"`{RECIPE}` fit from a random transformers Qwen2 folder ({args.weights_dtype} safetensors) with a "
             f"{args.vocab:,}-id tokenizer.json, {args.steps} steps at batch {args.batch_size} on shapes shards, "
             f"no validation, OMP_NUM_THREADS={args.threads}; {machine['cpu_count']} CPUs, load average "
             f"{load_text(machine)}. Memory is resident set (RSS), GiB; B/param are bytes per parameter.", "",
             *md_table(["size", "variant", "params", "trained", "baseline", "load peak", "train peak",
                        "train peak - baseline", "B/param", "accounted B/param", "rest GiB (B/param)",
                        "checkpoint peak", "export peak"], rows), "",
             "- params: the mmdlm transformer's (the Qwen2 weights with its tokenizer's rows, grown by the VQ codes "
             "and mmdlm's specials, and the image embeddings), LoRA adapters included; trained: those that require "
             "grad.",
             "- baseline: the resident set before the model is built (Python, torch, Lightning, the data module, "
             "the VQ); load peak: reading the safetensors and mapping them into mmdlm's transformer; train peak: "
             "the largest training step's peak; checkpoint peak: saving last.ckpt at the end of fit (Lightning "
             "serialises the whole checkpoint into memory before writing it); export peak: writing the model folder "
             "(LoRA: the adapters merged into a copy of the weights).",
             "- B/param: (train peak - baseline) / params. Accounted: AdamW in fp32, 4 bytes per weight + 12 per "
             "trained parameter (its gradient 4, the two moments 8). Rest: the measured minus the accounted: "
             "activations, the logits over the vocabulary and their gradient (one fp32 copy of the longest batch's "
             f"logits: {gib(first.get('logits_bytes'))} GiB at {first.get('vocab_rows', 0):,} rows), temporaries "
             "and allocator slack.", "",
             "Whole process, disk (what each run wrote: its checkpoints folder, the model folder) and time "
             f"({args.threads} threads on shared cores: indicative only):", "",
             *md_table(["size", "variant", "process peak", "checkpoints GiB", "model folder GiB", "batches",
                        "median s/step", "fit s"], other),
             "", "Models:", ""]
    lines += md_table(["size", "layers", "hidden", "heads", "kv heads", "mlp", "vocab", "transformers params"],
                      [[size, m["num_hidden_layers"], m["hidden_size"], m["num_attention_heads"],
                        m["num_key_value_heads"], m["intermediate_size"], m["vocab_size"], f"{m['parameters']:,}"]
                       for size, m in models.items()])
    lora = [f"- {run.size} {run.variant}: `{run.lora_line}`" for run in runs if run.lora_line]
    if lora:
        lines += ["", "The LoRA runs' report line (logged at fit start):", "", *lora]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.finetune_memory", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, action="append", help="LAYERSxWIDTH, repeatable (12x1024)")
    parser.add_argument("--vocab", type=int, default=32000, help="text vocabulary of the tokenizer.json and model")
    parser.add_argument("--variant", action="append", choices=list(VARIANTS), help="repeatable (default: all)")
    parser.add_argument("--weights-dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="dtype of the Qwen2 folder's safetensors (the fit trains in --precision regardless)")
    parser.add_argument("--steps", type=int, default=3, help="3 covers the stream's longest batch (8 x 130)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", default="32-true", help="the trainer's (a GPU's: bf16-mixed)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of each fit")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per fit before it is killed")
    parser.add_argument("--work", help="where the models, data and runs go (kept); default a temporary folder")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sizes = args.size or [(12, 1024)]
    variants = args.variant or list(VARIANTS)

    from mmdlm.eval.timing import machine_info

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    temporary = None if args.work else tempfile.TemporaryDirectory(prefix="finetune_memory_")
    work = Path(args.work or temporary.name)
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(args.accelerator if args.accelerator != "gpu" else "cuda")
    shards, vq = write_data(work)
    runs: list[Run] = []
    models: dict[str, dict[str, Any]] = {}
    try:
        for layers, hidden in sizes:
            size = f"{layers}x{hidden}"
            qwen = work / f"qwen2_{size}_v{args.vocab}_{args.weights_dtype}"
            models[size] = write_qwen2_folder(qwen, layers, hidden, args.vocab, args.weights_dtype)
            print(f"{size}: {models[size]['parameters']:,} transformers parameters in {qwen}", flush=True)
            for variant in variants:
                root = work / "runs" / f"{size}_{variant}"
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
                probe = root / "probe.json"
                command = fit_command(args, variant, qwen, shards, vq, root, probe)
                run = Run(size, variant, VARIANTS[variant].description, command)
                log = work / "runs" / f"{size}_{variant}.log"
                run.returncode, run.seconds = run_fit(command, log, args.threads, args.timeout)
                text = log.read_text(errors="replace")
                run.log_tail = text[-3000:]
                if probe.is_file():
                    run.probe = json.loads(probe.read_text())
                match = LORA_LINE.search(text)
                run.lora_line = match.group(0) if match else None
                for kind, folder in (("checkpoint_bytes", root / "checkpoints"), ("export_bytes", root / "model")):
                    run.disk[kind] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                    shutil.rmtree(folder, ignore_errors=True)  # fp32 weights (+ moments): large
                runs.append(run)
                s = run.summary()
                print(json.dumps({"size": size, "variant": variant, "rc": run.returncode,
                                  "seconds": round(run.seconds, 1),
                                  **{k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()
                                     if k not in ("step_seconds",)}}), flush=True)
                if run.lora_line:
                    print(run.lora_line, flush=True)
                if run.returncode != 0:
                    print(run.log_tail, file=sys.stderr)
            if temporary is not None:
                shutil.rmtree(qwen, ignore_errors=True)
    finally:
        if temporary is not None:
            temporary.cleanup()
    from mmdlm.eval.report import command_line

    def shown(command: list[str]) -> str:  # the fit command as run, the work folder written WORK
        return shlex.join(["python", *command[1:]]).replace(str(work), "WORK")

    result = {"command": command_line("benchmarks.finetune_memory", argv),
              "recipe": RECIPE, "vocab": args.vocab, "steps": args.steps, "batch_size": args.batch_size,
              "precision": args.precision, "accelerator": args.accelerator, "threads": args.threads,
              "machine": machine, "models": models,
              "runs": [{**{k: v for k, v in asdict(run).items() if k not in ("log_tail", "command")},
                        "command": shown(run.command), "summary": run.summary(),
                        **({"log_tail": run.log_tail} if run.returncode else {})} for run in runs]}
    (out / "finetune_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "finetune_memory.md").write_text(markdown(runs, models, args, machine))
    print((out / "finetune_memory.md").read_text())
    if any(run.returncode for run in runs):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
