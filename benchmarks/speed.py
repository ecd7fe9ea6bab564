"""Sampling speed of the masked-diffusion model and its AR twin: NFE and wall-clock per answer and per image.

    OMP_NUM_THREADS=2 python -m benchmarks.speed --mdm runs/quickstart/model --ar runs/ar/model \\
        --out benchmarks/results --repeats 5
    python -m benchmarks.speed --mdm DIR --ar DIR --out /tmp/speed --device cuda --batch-sizes 1,32,256

Inputs are synthetic shapes scenes (`mmdlm.worlds.shapes`, seeded), so no shards are needed: their images are
encoded by each model's VQ, one question per scene is asked (VQA) and the canonical caption is the
prompt (text-to-image). Every setting runs `--warmup` times untimed, then `--repeats` times timed;
the tables give the median per call and per generated answer / image, with min and max. The clock
covers the sampler alone (`mmdlm.sampling` on the laid-out prompts, CUDA synchronised around it): the
VQ's image encoding and decoding cost the same for both models and are left out.

Settings:
- MDM: fixed steps `--steps` (confidence remasking; a step count above the target region's length is
  capped at it, so a 4-token answer takes at most 4 steps and a 64-token image 64); text-to-image with
  classifier-free guidance `--guidance` (the pipeline's default; its unconditional rows ride in the same
  forward call, so NFE is unchanged and the compute is two rows: see `rows_per_call`).
- AR: greedy / temperature decoding with its KV cache, and without it (the whole prefix recomputed at
  every token), to show what the cache buys. AR NFE = the number of target tokens.
VQA decodes greedily, text-to-image samples at temperature 1 (the pipeline's defaults).

Writes speed.json (every measurement and the machine) and speed.md (one table per task) under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the model stack loads lazily: `--help` answers at once
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.sampling import SampleResult
    from mmdlm.sequence import Sample

TASKS: tuple[str, ...] = ("vqa", "t2i")
TASK_TITLES = {"vqa": "VQA: seconds per answer", "t2i": "Text-to-image: seconds per image"}


# ---------------------------------------------------------------------------------------------
# shared by the benchmark scripts


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """What the timings were taken on: CPU count, torch threads and version, the GPU if any."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device) if device is not None else "cpu",
        # other work on the machine skews every timing: 1/5/15-min load averages when measured
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def load_text(machine: dict[str, Any]) -> str:
    load = machine.get("load_average")
    return "n/a" if not load else " / ".join(f"{x:.2f}" for x in load)


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of repeated measurements."""
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values)),
            "n": len(values)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """(seconds, result) of one call, CUDA synchronised on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table (floats to 4 significant digits)."""
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    return (["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (each >= 1)."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def command_line(prog: str, argv: Sequence[str] | None) -> str:
    return shlex.join(["python", "-m", prog, *(sys.argv[1:] if argv is None else argv)])


def load_pair(mdm: str, ar: str, device: str | None) -> tuple[MMDLMPipeline, MMDLMPipeline]:
    """The two pipelines; raises ValueError when --mdm is causal or --ar is not."""
    from mmdlm.pipeline import MMDLMPipeline

    pipes = MMDLMPipeline.from_pretrained(mdm, device=device), MMDLMPipeline.from_pretrained(ar, device=device)
    if pipes[0].is_autoregressive:
        raise ValueError(f"--mdm {mdm!r} is a causal (AR) model")
    if not pipes[1].is_autoregressive:
        raise ValueError(f"--ar {ar!r} is not a causal model (config model.causal is false)")
    return pipes


def cap_steps(steps: Sequence[int], region: int) -> dict[int, list[int]]:
    """Effective step count -> the requested counts it stands for (a step count is capped at the region)."""
    out: dict[int, list[int]] = {}
    for s in sorted(steps):
        out.setdefault(min(s, region), []).append(s)
    return out


# ---------------------------------------------------------------------------------------------
# inputs and samplers


@dataclass
class Inputs:
    codes: torch.Tensor  # Long[n, h, w] the scenes' VQ codes
    questions: list[list[int]]  # one question's text ids per scene
    captions: list[list[int]]  # the canonical caption's text ids per scene


def make_inputs(pipe: MMDLMPipeline, n: int, seed: int = 0) -> Inputs:
    """`n` random shapes scenes (rendered at the VQ's image size), a question and the caption of each."""
    from mmdlm.worlds.shapes import caption, make_questions, render, sample_scene

    rng = random.Random(f"speed/{seed}")
    images, questions, captions = [], [], []
    while len(images) < n:
        objects = sample_scene(rng, 1, 2)
        qas = [qa for qa in make_questions(objects, rng)
               if len(pipe.tokenizer.encode(qa["question"])) <= pipe.layout.question_len]
        cap = pipe.tokenizer.encode(caption(objects))
        if not qas or len(cap) > pipe.layout.caption_len:
            continue
        images.append(render(objects, pipe.vq.image_size))
        questions.append(pipe.tokenizer.encode(rng.choice(qas)["question"]))
        captions.append(cap)
    return Inputs(pipe.encode_images(images).cpu(), questions, captions)


def prompts(pipe: MMDLMPipeline, task: str, inputs: Inputs, batch_size: int) -> list[Sample]:
    """The first `batch_size` prompts of a task, laid out as the pipeline lays them out."""
    from mmdlm.sequence import t2i_prompt, vqa_prompt

    if task == "vqa":
        return [vqa_prompt(c, q, pipe.vocab, pipe.layout) for c, q in zip(inputs.codes[:batch_size],
                                                                          inputs.questions[:batch_size])]
    n = pipe.vq.tokens_per_image
    return [t2i_prompt(c, pipe.vocab, pipe.layout, n) for c in inputs.captions[:batch_size]]


@dataclass
class Setting:
    name: str  # "steps=8", "KV cache", "no cache"
    run: Callable[[Any, torch.Generator], SampleResult]  # (batch on device, generator) -> result
    steps: int | None = None
    requested: list[int] | None = None


def settings(pipe: MMDLMPipeline, task: str, steps: Sequence[int], guidance: float) -> list[Setting]:
    """The sampler settings to time for one model and task."""
    from mmdlm.sampling import SamplerConfig

    temperature = 0.0 if task == "vqa" else 1.0
    model, scheduler = pipe.model, pipe.scheduler
    if pipe.is_autoregressive:
        return [Setting(name, lambda b, g, c=cache: scheduler.sample(
                    model, b, SamplerConfig(temperature=temperature, use_cache=c), generator=g))
                for name, cache in (("KV cache", True), ("no cache", False))]
    region = pipe.layout.answer_len if task == "vqa" else pipe.vq.tokens_per_image
    scale = guidance if task == "t2i" else 0.0
    out = []
    for s, asked in cap_steps(steps, region).items():
        o = SamplerConfig(steps=s, temperature=temperature, guidance_scale=scale)
        out.append(Setting(f"steps={s}", lambda b, g, o=o: scheduler.sample(model, b, o, generator=g), s, asked))
    return out


def measure(pipe: MMDLMPipeline, samples: list[Sample], setting: Setting, warmup: int, repeats: int,
            seed: int) -> dict[str, Any]:
    """Warm-up runs (untimed), then `repeats` timed runs of one setting on one batch."""
    from mmdlm.sequence import collate

    batch = collate(samples, pipe.vocab).to(pipe.device)
    seconds, nfe, rows = [], set(), set()
    for i in range(warmup + repeats):
        g = torch.Generator(device=pipe.device).manual_seed(seed + i)
        t, res = timed(lambda g=g: setting.run(batch, g), pipe.device)
        if i >= warmup:
            seconds.append(t)
            nfe.add(res.nfe)
            rows.add(res.forward_rows)
    n = len(samples)
    per_call = stats(seconds)
    return {"nfe": max(nfe), "nfe_varies": len(nfe) > 1, "rows_per_call": max(rows) / max(max(nfe), 1) / n,
            "target_tokens": int(batch.target[0].sum()), "seconds_per_call": per_call,
            "seconds_per_sample": {k: v / n if k != "n" else v for k, v in per_call.items()},
            "samples_per_s": n / per_call["median"] if per_call["median"] > 0 else None}


def benchmark(pipe: MMDLMPipeline, kind: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (task, batch size, setting) of one model."""
    inputs = make_inputs(pipe, max(args.batch_sizes), args.seed)
    rows = []
    for task in args.tasks:
        for setting in settings(pipe, task, args.steps, args.guidance):
            for bs in args.batch_sizes:
                m = measure(pipe, prompts(pipe, task, inputs, bs), setting, args.warmup, args.repeats, args.seed)
                rows.append({"model": kind, "task": task, "batch_size": bs, "sampler": setting.name,
                             "steps": setting.steps, "requested_steps": setting.requested, **m})
                if not args.quiet:
                    print(f"{kind} {task} b={bs} {setting.name}: nfe {m['nfe']}, "
                          f"{m['seconds_per_sample']['median'] * 1e3:.2f} ms/sample", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# outputs


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = ["# Sampling speed: MDM vs AR", "", f"`{result['command']}`", "",
             f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} "
             f"threads, device {m['device']}{', ' + m['gpu'] if m.get('gpu') else ''}, load average "
             f"{load_text(m)}. "
             f"Median of {result['settings']['repeats']} timed runs after {result['settings']['warmup']} warm-up "
             f"run(s), [min - max]; sampler only (VQ encode/decode excluded).", ""]
    header = ["model", "sampler", "batch", "NFE", "rows/call", "s/call (median)", "ms/sample (median [min - max])",
              "samples/s"]
    for task in TASKS:
        rows = [r for r in result["rows"] if r["task"] == task]
        if not rows:
            continue
        table = []
        for r in rows:
            s = r["seconds_per_sample"]
            sampler = r["sampler"] + (f" (asked {','.join(map(str, r['requested_steps']))})"
                                      if r["requested_steps"] and r["requested_steps"] != [r["steps"]] else "")
            table.append([r["model"].upper(), sampler, r["batch_size"], r["nfe"], round(r["rows_per_call"], 2),
                          r["seconds_per_call"]["median"],
                          f"{s['median'] * 1e3:.3g} [{s['min'] * 1e3:.3g} - {s['max'] * 1e3:.3g}]",
                          r["samples_per_s"] or "-"])
        lines += [f"## {TASK_TITLES[task]}", ""] + md_table(header, table) + [""]
    lines.append("NFE = forward calls per sampler call; AR NFE = target tokens; rows/call = sequences per "
                 "forward per sample (2 with classifier-free guidance).")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdm", required=True, help="masked-diffusion model folder")
    parser.add_argument("--ar", required=True, help="its causal twin's model folder")
    parser.add_argument("--out", required=True, help="folder for speed.json and speed.md")
    parser.add_argument("--repeats", type=positive, default=5, help="timed runs per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument("--steps", type=int_list, default=[4, 8, 16, 32, 64], help="MDM step counts")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 32], help="prompts per sampler call")
    parser.add_argument("--tasks", default="vqa,t2i", help="comma-separated subset of vqa,t2i")
    parser.add_argument("--guidance", type=float, default=2.0, help="MDM classifier-free guidance of text-to-image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cpu, cuda ... (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no per-setting lines")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time both models' samplers; write speed.json and speed.md; returns the result."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or set(args.tasks) - set(TASKS):
        parser.error(f"--tasks must be a subset of {','.join(TASKS)}")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    try:
        pipes = load_pair(args.mdm, args.ar, args.device)
    except (OSError, ValueError, KeyError) as err:
        parser.error(str(err))
    torch.manual_seed(args.seed)
    rows = [row for pipe, kind in zip(pipes, ("mdm", "ar")) for row in benchmark(pipe, kind, args)]
    result = {"command": command_line("benchmarks.speed", argv), "machine": machine_info(pipes[0].device),
              "settings": {"repeats": args.repeats, "warmup": args.warmup, "steps": args.steps,
                           "batch_sizes": args.batch_sizes, "guidance": args.guidance, "seed": args.seed,
                           "answer_len": pipes[0].layout.answer_len,
                           "image_tokens": pipes[0].vq.tokens_per_image},
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "speed.md").write_text(render_markdown(result))
    print(f"wrote {out / 'speed.json'} and {out / 'speed.md'}")
    return result


if __name__ == "__main__":
    main()
