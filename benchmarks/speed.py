"""Sampling speed and quality in one run: the masked-diffusion model as it was, each fast-sampling trick alone,
all of them together, and the AR twin with and without its KV cache.

    OMP_NUM_THREADS=2 python -m benchmarks.speed --mdm runs/quickstart/model --fast runs/fast/model \\
        --ar runs/quickstart/ar --shards 'data/shards/shapes-codes/val/*.tar' --limit 200 \\
        --out benchmarks/results/sampling_speed --repeats 5
    # the batch sweep on a GPU: MDM with every fast-sampling trick vs AR + KV cache, batch 1, 8 and 32
    python -m benchmarks.speed --fast runs/gpu/mdm/model --ar runs/gpu/ar/model \\
        --variants fast,ar-kv --tasks t2i,vqa --batch-sizes 1,8,32 --shards 'data/shards/shapes-codes/val/*.tar' \\
        --limit 200 --device cuda --out /tmp/sweep
    # the same on CPU at toy size (the check that it runs)
    python -m benchmarks.speed --fast M --ar A --variants fast,ar-kv --tasks t2i,vqa --batch-sizes 1,2 \\
        --limit 2 --repeats 1 --shards 'VAL/*.tar' --device cpu --out /tmp/sweep

Per task (VQA answer, caption, text-to-image) and sampler variant: NFE, generated tokens per forward per row
(rows that finish early leave the batch) and milliseconds per sample at each batch size (median of `--repeats`
timed runs after `--warmup` untimed ones, each run on the next prompts of the val records; the
clock covers the sampler alone on the laid-out prompts, CUDA synchronised around it, VQ encoding and decoding
left out), and the quality on the first `--limit` val records (VQA accuracy, caption attribute F1, text-to-image
all-correct by the oracle, as `mmdlm evaluate` scores them, batches of 64).

Variants (`variants`):
- MDM (before): `--mdm` with the pipeline's earlier default samplers (`before_samplers`): answers
  and captions one token per step (no `<eos>` fill), images 16 cosine steps with guidance 2, every step a full
  forward.
- + approximate prefix cache: the same, the prompt's keys/values computed once (Fast-dLLM, never refreshed).
- + fast decoding: `--mdm` with the pipeline's defaults now (`DEFAULT_SAMPLERS`).
- prefix MDM, no cache / + exact prefix cache: `--fast`, a model trained with prefix attention, with the
  `before_samplers`, recomputing the prompt every step or computing it once (exact: same tokens).
- MDM fast: `--fast` with the pipeline's defaults and the exact cache: every trick together.
- block, one token per call / block: `--block`, a block-diffusion model (`configs/block.yaml`), first decoding one
  token per call inside each block (its slowest setting), then with its default samplers (`BLOCK_SAMPLERS`).
- AR + KV cache / AR, no cache: `--ar`, greedy answers and captions, sampled images (temperature 1).

`--variants` keeps some of them, by the names before, approx-cache, fast-decoding, prefix-nocache, prefix-cache,
fast, block-slow, block, ar-kv, ar-nocache; only the model folders those variants use are needed (fast,ar-kv: --fast
and --ar; block,ar-kv: --block and --ar).

Writes sampling_speed.json (every measurement, the machine, the command) and sampling_speed.md (one table per
task, and the acceptance checks) under --out.
"""


from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmdlm.eval.models import load_models
from mmdlm.eval.report import command_line, md_table
from mmdlm.eval.timing import load_text, machine_info, stats, timed
from mmdlm.inputs import add_device_argument, int_list, positive_int

if TYPE_CHECKING:  # the model stack loads lazily: `--help` answers at once
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.sampling import SamplerConfig
    from mmdlm.sequence import Sample


# ---------------------------------------------------------------------------------------------
# variants


TASKS = ("vqa", "caption", "t2i")
TITLES = {"vqa": "VQA answers", "caption": "Captions", "t2i": "Text-to-image"}
QUALITY = {"vqa": "VQA accuracy", "caption": "caption attribute F1 (mean; worst attribute)",
           "t2i": "all-correct (oracle)"}


def before_samplers() -> dict[str, SamplerConfig]:
    """The pipeline's earlier default samplers (before the fast-sampling defaults), per evaluation task."""
    from mmdlm.sampling import SamplerConfig

    return {"vqa": SamplerConfig(steps=None, block_length=1, eos_fill=False),
            "caption": SamplerConfig(steps=None, block_length=4, eos_fill=False),
            "t2i": SamplerConfig(steps=16, temperature=1.0, guidance_scale=2.0, eos_fill=False)}


def slowest_block_samplers() -> dict[str, SamplerConfig]:
    """A block-diffusion model's slowest setting: one token per call in every block (text in the defaults' order,
    left to right)."""
    from mmdlm.sampling import SamplerConfig

    return {"vqa": SamplerConfig(steps=None, left_to_right=True),
            "caption": SamplerConfig(steps=None, left_to_right=True),
            "t2i": SamplerConfig(steps=None, temperature=1.0, guidance_scale=2.0)}


def current_samplers(block_diffusion: bool = False) -> dict[str, SamplerConfig]:
    """The pipeline's defaults now (`DEFAULT_SAMPLERS`, or `BLOCK_SAMPLERS` for a block-diffusion model), per
    evaluation task."""
    from mmdlm.eval.tasks import PIPELINE_TASK
    from mmdlm.sampling.config import default_sampler

    return {task: default_sampler(PIPELINE_TASK[task], block_diffusion) for task in TASKS}


@dataclass
class Variant:
    name: str
    key: str  # its --variants name
    model: str  # "mdm", "fast", "block" or "ar": which --model folder
    samplers: dict[str, SamplerConfig]  # per task


# --variants names, in table order; "prefix-*" and "fast" need --fast
VARIANT_KEYS = ("before", "approx-cache", "fast-decoding", "prefix-nocache", "prefix-cache", "fast", "block-slow",
                "block", "ar-kv", "ar-nocache")
BLOCK, BLOCK_SLOW = "block", "block, one token per call"  # the block model's rows


def variants(has_fast: bool, has_block: bool = False) -> list[Variant]:
    """The rows of the tables, in order: as it was, each trick alone, all together, the AR twin."""
    from mmdlm.sampling import SamplerConfig

    before, now = before_samplers(), current_samplers()

    def with_(samplers: dict[str, SamplerConfig], **changes: Any) -> dict[str, SamplerConfig]:
        return {t: replace(c, **changes) for t, c in samplers.items()}

    rows = [Variant("MDM (before)", "before", "mdm", before),
            Variant("+ approximate prefix cache", "approx-cache", "mdm", with_(before, prefix_cache=1000)),
            Variant("+ fast decoding", "fast-decoding", "mdm", now)]
    if has_fast:
        rows += [Variant("prefix MDM, no cache", "prefix-nocache", "fast", with_(before, use_cache=False)),
                 Variant("+ exact prefix cache", "prefix-cache", "fast", before),
                 Variant("MDM fast (all)", "fast", "fast", now)]
    if has_block:
        rows += [Variant(BLOCK_SLOW, "block-slow", "block", slowest_block_samplers()),
                 Variant(BLOCK, "block", "block", current_samplers(block_diffusion=True))]
    ar = dict.fromkeys(TASKS, SamplerConfig())
    ar = {t: replace(c, temperature=1.0) if t == "t2i" else c for t, c in ar.items()}
    return rows + [Variant("AR + KV cache", "ar-kv", "ar", ar),
                   Variant("AR, no cache", "ar-nocache", "ar", with_(ar, use_cache=False))]


def select_variants(keys: Sequence[str] | None, has_fast: bool, has_block: bool = False) -> list[Variant]:
    """The variants named by `keys` (all of them for None), in table order; ValueError for an unknown name or
    one that needs --fast or --block without it."""
    rows = variants(has_fast, has_block)
    if keys is None:
        return rows
    unknown = sorted(set(keys) - set(VARIANT_KEYS))
    if unknown:
        raise ValueError(f"--variants: unknown {', '.join(unknown)} (choose from {','.join(VARIANT_KEYS)})")
    missing = sorted(set(keys) - {v.key for v in rows})
    if missing:
        raise ValueError(f"--variants {','.join(missing)} need(s) --fast (a model trained with prefix attention) "
                         f"or --block (a block-diffusion model)")
    return [v for v in rows if v.key in keys]


# ---------------------------------------------------------------------------------------------
# measuring


def prompts(pipe: MMDLMPipeline, task: str, records: Sequence[dict], codes: torch.Tensor, n: int) -> list[Sample]:
    """The first `n` prompts of a task, laid out as the pipeline lays them out (the first question of a record)."""
    from mmdlm.sequence import caption_prompt, t2i_prompt, vqa_prompt

    out = []
    for record, c in zip(records, codes):
        if len(out) == n:
            break
        if task == "vqa":
            q = pipe.tokenizer.encode(record["qa"][0]["question"])
            if len(q) <= pipe.layout.question_len:
                out.append(vqa_prompt(c, q, pipe.vocab, pipe.layout))
        elif task == "caption":
            out.append(caption_prompt(c, pipe.vocab, pipe.layout))
        else:
            cap = pipe.tokenizer.encode(record["captions"][0])
            if len(cap) <= pipe.layout.caption_len:
                out.append(t2i_prompt(cap, pipe.vocab, pipe.layout, pipe.vq.tokens_per_image))
    if len(out) < n:
        raise ValueError(f"only {len(out)} usable {task} prompts in the records, need {n}")
    return out


def timing(pipe: MMDLMPipeline, samples: list[Sample], sampler: SamplerConfig, warmup: int, repeats: int,
           seed: int) -> dict[str, Any]:
    """Warm-up runs (untimed), then `repeats` timed runs of one sampler on one batch."""
    from mmdlm.sequence import collate

    n = len(samples) // (warmup + repeats)  # the batch size: each run decodes other prompts
    seconds, nfe, rows, tokens, row_forwards = [], [], [], 0, 0
    for i in range(warmup + repeats):
        batch = collate(samples[i * n : (i + 1) * n], pipe.vocab).to(pipe.device)
        g = torch.Generator(device=pipe.device).manual_seed(seed + i)
        t, res = timed(lambda g=g, b=batch: pipe.scheduler.sample(pipe.model, b, sampler, generator=g), pipe.device)
        if i >= warmup:
            seconds.append(t)
            nfe.append(res.nfe)
            rows.append(res.forward_rows / max(res.nfe, 1) / n)
            tokens += int(batch.target.sum())  # generated tokens
            row_forwards += int(res.row_nfe.sum()) if res.row_nfe is not None else res.nfe * n
    per_sample = stats([s / n for s in seconds])
    return {"nfe": statistics.median(nfe), "tokens_per_forward": tokens / max(row_forwards, 1),
            "rows_per_call": max(rows), "ms_per_sample": {k: v * 1e3 if k != "n" else v for k, v in per_sample.items()}}


def quality(pipe: MMDLMPipeline, task: str, records: Sequence[dict], sampler: SamplerConfig,
            seed: int) -> dict[str, Any]:
    """The task's metric on the records, as `mmdlm evaluate` computes it."""
    from mmdlm.eval.tasks import eval_caption, eval_t2i, eval_vqa

    if task == "vqa":
        m = eval_vqa(pipe, records, sampler, seed=seed, progress=False).metrics
        return {"value": m["accuracy"], "n": m["n"], "nfe_per_call": m["cost"]["nfe_per_call"]}
    if task == "caption":
        m = eval_caption(pipe, records, sampler, seed=seed, progress=False).metrics
        f1 = {k: v["f1"] for k, v in m["per_attribute"].items()}
        return {"value": sum(f1.values()) / len(f1), "f1": f1, "n": m["n"], "nfe_per_call": m["cost"]["nfe_per_call"]}
    m = eval_t2i(pipe, records, sampler, seed=seed, progress=False, scorer_ceiling=False).metrics
    return {"value": m["all_correct"], "n": m["n"], "nfe_per_call": m["cost"]["nfe_per_call"]}


def run(pipes: dict[str, MMDLMPipeline], records: list[dict], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (variant, task): quality once, timing at each batch size."""
    from mmdlm.eval.records import stack_images

    n = max(args.batch_sizes) * (args.warmup + args.repeats) + 16  # prompts for the timed runs (+ spares)
    codes = {kind: pipe.encode_images(stack_images(records[:n])).cpu() for kind, pipe in pipes.items()}
    rows = []
    for variant in args.variants:
        pipe = pipes[variant.model]
        for task in args.tasks:
            sampler = variant.samplers[task]
            row: dict[str, Any] = {"variant": variant.name, "model": variant.model, "task": task,
                                   "sampler": sampler.to_dict()}
            if args.limit > 0:
                row["quality"] = quality(pipe, task, records[: args.limit], sampler, args.seed)
            row["timing"] = {}
            for bs in args.batch_sizes:
                samples = prompts(pipe, task, records, codes[variant.model], bs * (args.warmup + args.repeats))
                row["timing"][str(bs)] = timing(pipe, samples, sampler, args.warmup, args.repeats, args.seed)
            rows.append(row)
            if not args.quiet:
                q = f"quality {row['quality']['value']:.4f}, " if "quality" in row else ""
                times = ", ".join(f"b{bs} {t['ms_per_sample']['median']:.2f} ms (NFE {t['nfe']:g})"
                                  for bs, t in row["timing"].items())
                print(f"{variant.name} | {task}: {q}{times}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# outputs


def _row(rows: list[dict[str, Any]], variant: str, task: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["variant"] == variant and r["task"] == task), None)


def checks(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The fast-sampling targets' acceptance lines on this run: (what, measured, holds)."""
    rows, out = result["rows"], []
    fast, ar, before = "MDM fast (all)", "AR + KV cache", "MDM (before)"
    if not all(_row(rows, v, t) for v in (fast, ar, before) for t in result["settings"]["tasks"]):
        return out
    if "1" not in rows[0]["timing"] or "quality" not in rows[0]:
        return out

    def ms(v: str, t: str) -> float:
        return _row(rows, v, t)["timing"]["1"]["ms_per_sample"]["median"]

    def q(v: str, t: str) -> dict[str, Any]:
        return _row(rows, v, t)["quality"]

    tasks = result["settings"]["tasks"]
    if "t2i" in tasks:
        own = max(q(v, "t2i")["value"] for v in (before, "+ exact prefix cache") if _row(rows, v, "t2i"))
        speedup, drop = ms(ar, "t2i") / ms(fast, "t2i"), own - q(fast, "t2i")["value"]  # vs the better default
        out.append(("text-to-image, batch 1: MDM fast >= 3x faster than AR + KV, all-correct within 2 points of "
                    "the MDM's default", f"{speedup:.2f}x, {-100 * drop:+.1f} points", speedup >= 3 and drop <= 0.02))
    if "vqa" in tasks:
        speedup, gap = ms(ar, "vqa") / ms(fast, "vqa"), q(fast, "vqa")["value"] - q(ar, "vqa")["value"]
        out.append(("VQA, batch 1: MDM fast >= 1.5x faster than AR + KV at equal accuracy (+-1 point)",
                    f"{speedup:.2f}x, {100 * gap:+.1f} points", speedup >= 1.5 and abs(gap) <= 0.01))
    if "caption" in tasks:
        tpf = _row(rows, fast, "caption")["timing"]["1"]["tokens_per_forward"]
        f_before, f_fast = q(before, "caption")["f1"], q(fast, "caption")["f1"]
        worst = max(f_before[k] - f_fast[k] for k in f_before)
        measured = f"{tpf:.2f} tokens/forward, worst attribute {-100 * worst:+.1f} points"
        out.append(("captions: >= 3 tokens per forward at <= 1 point attribute-F1 loss", measured,
                    tpf >= 3 and worst <= 0.01))
    return out


BLOCK_TARGETS = {"caption": 2.0, "vqa": 1.5, "t2i": 3.0}  # batch-1 speed-up over AR + KV cache


def block_checks(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """The block model's targets on this run: batch 1 faster than AR + KV cache by `BLOCK_TARGETS` at quality
    within 1 point of its own slowest setting; at the largest batch no task slower; captions >= 2.5 tokens per
    forward."""
    rows, out = result["rows"], []
    tasks, sizes = result["settings"]["tasks"], result["settings"]["batch_sizes"]
    if not all(_row(rows, v, t) for v in (BLOCK, BLOCK_SLOW, "AR + KV cache") for t in tasks):
        return out

    def ms(v: str, t: str, b: int) -> float:
        return _row(rows, v, t)["timing"][str(b)]["ms_per_sample"]["median"]

    for task in tasks:
        if 1 in sizes and "quality" in _row(rows, BLOCK, task):
            speedup = ms("AR + KV cache", task, 1) / ms(BLOCK, task, 1)
            own, fast = _row(rows, BLOCK_SLOW, task)["quality"], _row(rows, BLOCK, task)["quality"]
            drop = (max(own["f1"][k] - fast["f1"][k] for k in own["f1"]) if task == "caption"
                    else own["value"] - fast["value"])
            out.append((f"{TITLES[task]}, batch 1: block >= {BLOCK_TARGETS[task]:g}x faster than AR + KV, within 1 "
                        f"point of its slowest setting", f"{speedup:.2f}x, {-100 * drop:+.1f} points",
                        speedup >= BLOCK_TARGETS[task] and drop <= 0.01))
        big = max(sizes)
        if big > 1:
            ratio = ms("AR + KV cache", task, big) / ms(BLOCK, task, big)
            out.append((f"{TITLES[task]}, batch {big}: block not slower than AR + KV", f"{ratio:.2f}x", ratio >= 1))
    if "caption" in tasks and 1 in sizes:
        tpf = _row(rows, BLOCK, "caption")["timing"]["1"]["tokens_per_forward"]
        out.append(("captions: block >= 2.5 tokens per forward", f"{tpf:.2f}", tpf >= 2.5))
    return out


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["settings"]
    lines = ["# Sampling speed and quality: MDM vs AR", "", f"`{result['command']}`", "",
             f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} with {m['torch_threads']} "
             f"threads, device {m['device']}{', ' + m['gpu'] if m.get('gpu') else ''}, load average "
             f"{load_text(m)}. Median of {s['repeats']} timed runs after {s['warmup']} warm-up run(s); sampler "
             f"only (VQ encode/decode excluded). Quality on the first {s['limit']} val records.", ""]
    sizes = s["batch_sizes"]
    for task in s["tasks"]:
        header = ["variant", QUALITY[task]] + [x for b in sizes for x in (f"b{b} NFE", f"b{b} tok/fwd",
                                                                          f"b{b} ms/sample")]
        table = []
        for r in (r for r in result["rows"] if r["task"] == task):
            qv = r.get("quality")
            if qv is None:
                cell = "-"
            elif task == "caption":
                cell = f"{qv['value']:.3f}; {min(qv['f1'].values()):.3f}"
            else:
                cell = f"{100 * qv['value']:.1f}%"
            timing_cells = []
            for b in sizes:
                t = r["timing"][str(b)]
                timing_cells += [f"{t['nfe']:g}", f"{t['tokens_per_forward']:.2f}",
                                 f"{t['ms_per_sample']['median']:.3g}"]
            table.append([r["variant"], cell, *timing_cells])
        lines += [f"## {TITLES[task]}", ""] + md_table(header, table) + [""]
    found = checks(result) + block_checks(result)
    if found:
        lines += ["## Acceptance", ""] + md_table(["target", "measured", "holds"],
                                                             [[a, b, "yes" if c else "no"] for a, b, c in found])
        lines.append("")
    lines.append("NFE = forward calls per sampler call (median); tok/fwd = generated target tokens / forward calls "
                 "a row was in, over the timed runs.")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdm", help="masked-diffusion model folder (as it was); needed by the variants before, "
                                      "approx-cache and fast-decoding")
    parser.add_argument("--fast", help="a masked-diffusion model trained with prefix attention (optional)")
    parser.add_argument("--block", help="a block-diffusion model folder (optional): the variants block-slow, block")
    parser.add_argument("--ar", required=True, help="the causal twin's model folder")
    parser.add_argument("--variants", type=lambda text: [v.strip() for v in text.split(",") if v.strip()],
                        help=f"comma-separated subset of {','.join(VARIANT_KEYS)} (default: all that the models "
                             f"given allow); e.g. fast,ar-kv: MDM with every fast-sampling trick vs AR + KV cache")
    parser.add_argument("--shards", required=True, help="val shards (glob): prompts and quality")
    parser.add_argument("--limit", type=int, default=200, help="val records scored for quality (0: timing only)")
    parser.add_argument("--out", required=True, help="folder for sampling_speed.json and sampling_speed.md")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed runs per setting (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before them")
    parser.add_argument("--batch-sizes", type=int_list, default=[1, 32], help="prompts per sampler call")
    parser.add_argument("--tasks", default="vqa,caption,t2i", help="comma-separated subset of vqa,caption,t2i")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no per-setting lines")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Time and score every sampler variant; write sampling_speed.json and .md; returns the result."""
    from mmdlm.eval.records import load_records

    parser = build_parser()
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks or set(args.tasks) - set(TASKS):
        parser.error(f"--tasks must be a subset of {','.join(TASKS)}")
    if args.warmup < 0 or args.limit < 0:
        parser.error("--warmup and --limit must be >= 0")
    folders = {"mdm": args.mdm, "fast": args.fast, "block": args.block, "ar": args.ar}
    try:
        args.variants = select_variants(args.variants, has_fast=bool(args.fast), has_block=bool(args.block))
        if args.mdm is None and any(v.model == "mdm" for v in args.variants):
            raise ValueError("--mdm is needed by the variants " + ",".join(v.key for v in args.variants
                                                                            if v.model == "mdm"))
        pipes = load_models({k: folders[k] for k in ("mdm", "fast", "block", "ar")
                             if any(v.model == k for v in args.variants)}, args.device)
        first = next(iter(pipes.values()))
        need = max(args.limit, max(args.batch_sizes) * (args.warmup + args.repeats) + 16)
        records = load_records(args.shards, first.vq.image_size, need)
    except (OSError, ValueError, KeyError) as err:
        parser.error(str(err))
    torch.manual_seed(args.seed)
    rows = run(pipes, records, args)
    result = {"command": command_line("benchmarks.speed", argv), "machine": machine_info(first.device),
              "settings": {"repeats": args.repeats, "warmup": args.warmup, "batch_sizes": args.batch_sizes,
                           "tasks": args.tasks, "limit": args.limit, "seed": args.seed,
                           "models": {"mdm": args.mdm, "fast": args.fast, "block": args.block, "ar": args.ar}},
              "rows": rows}
    result["checks"] = [{"target": a, "measured": b, "holds": c} for a, b, c in checks(result) + block_checks(result)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sampling_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "sampling_speed.md").write_text(render_markdown(result))
    print(f"wrote {out / 'sampling_speed.json'} and {out / 'sampling_speed.md'}")
    return result


if __name__ == "__main__":
    main()
