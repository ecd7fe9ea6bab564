"""How a task is decoded: quality and NFE of a model under several sampler settings (the quality-vs-NFE curve
that the pipeline's defaults are chosen from), for captions, VQA answers, text-to-image or joint generation.

    python -m benchmarks.caption_decoding --model runs/quickstart/model \\
        --shards 'data/shards/shapes-codes/val/*.tar' --skip 500 --limit 200 \\
        --setting 16:none --setting 24:4 --setting 24:8 --setting 24:1
    python -m benchmarks.caption_decoding --task vqa --model runs/quickstart/model \\
        --shards 'data/shards/shapes-codes/val/*.tar' --skip 500 --limit 200 --setting 8:none --setting 4:1
    python -m benchmarks.caption_decoding --task t2i --model runs/quickstart/model \\
        --shards 'data/shards/shapes-codes/val/*.tar' --skip 500 --limit 200 \\
        --setting steps=16 --setting steps=8 --setting steps=16,threshold=0.9
    python -m benchmarks.caption_decoding --task joint --model runs/quickstart/model \\
        --shards 'data/shards/shapes-codes/val/*.tar' --skip 500 --limit 200 --setting text_temperature=0.7

A `--setting` is either STEPS:BLOCK, decoding in STEPS steps in blocks of BLOCK tokens left to right (LLaDA's
semi-autoregressive decoding; `none` = one block, confidence order only), or comma-separated `field=value`
overrides of the task's default `SamplerConfig` (`none` for None; `self_correction=true` for ReMDM-style
revision), e.g. `steps=none,threshold=0.9`. `--skip`
leaves out the first val records, so a setting can be chosen on scenes that `mmdlm evaluate --limit 200` does
not score (joint generation draws `--limit` pairs from nothing with seed `--skip`; the evaluation's is 0). Prints
one JSON line per setting: the per-attribute F1s (shapes scenes) and the exact-match rate, or the VQA accuracy per
question type, or text-to-image all-correct and per attribute, or joint agreement, parse, readable and distinct
rates; NFE per call, generated tokens per forward and seconds per sample (batches of 64; the speed benchmark times
batch 1 and 32).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from typing import Any

from mmdlm.eval.records import load_records
from mmdlm.eval.tasks import PIPELINE_TASK, eval_caption, eval_joint, eval_t2i, eval_vqa
from mmdlm.inputs import add_model_argument
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.sampling import SamplerConfig, SelfCorrection
from mmdlm.worlds.scoring import world_for

TASKS = {"caption": eval_caption, "vqa": eval_vqa, "t2i": eval_t2i, "joint": eval_joint}
FIELDS = {f.name for f in fields(SamplerConfig)}  # self_correction=true: `SelfCorrection()`


def _value(text: str) -> Any:
    if text.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_setting(text: str) -> dict[str, Any]:
    """'24:4' -> {steps: 24, block_length: 4}; 'steps=none,threshold=0.9' -> {steps: None, threshold: 0.9}."""
    if "=" not in text:
        steps, _, block = text.partition(":")
        try:
            return {"steps": int(steps), "block_length": None if block in ("", "none") else int(block)}
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"a setting is STEPS:BLOCK (e.g. 24:4 or 16:none) or "
                                             f"field=value,... (e.g. steps=8,threshold=0.9), got {text!r}") from err
    out = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in FIELDS:
            raise argparse.ArgumentTypeError(f"{name.strip()!r} is not a SamplerConfig field; known: "
                                             f"{', '.join(sorted(FIELDS))}")
        out[name.strip()] = _value(value.strip())
    if "self_correction" in out:  # true -> ReMDM-style revision with its defaults, false -> none
        out["self_correction"] = SelfCorrection() if out["self_correction"] is True else None
    return out


def summary(task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """The quality numbers of one task's metrics."""
    if task == "vqa":
        return {"accuracy": round(metrics["accuracy"], 4),
                "per_type": {k: round(v["accuracy"], 3) for k, v in metrics["per_type"].items()},
                "questions": metrics["n"]}
    if task == "caption":
        return {"f1": {k: round(v["f1"], 3) for k, v in metrics.get("per_attribute", {}).items()},
                "exact": metrics["exact_match"], "n": metrics["n"]}
    keys = [k for k in metrics if isinstance(metrics[k], float)]
    return {k: round(metrics[k], 4) for k in keys} | {"n": metrics["n"]}


def main(argv: list[str] | None = None) -> None:
    """Score decoding settings of one task on one model."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.caption_decoding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--shards", required=True, help="val shards (glob)")
    parser.add_argument("--skip", type=int, default=500, help="val records left out first")
    parser.add_argument("--limit", type=int, default=200, help="val records scored after those")
    parser.add_argument("--setting", type=parse_setting, action="append", required=True,
                        help="STEPS:BLOCK or field=value,... (SamplerConfig overrides)")
    parser.add_argument("--task", choices=tuple(TASKS), default="caption", help="what to decode")
    parser.add_argument("--prefix-cache", type=int, default=0,
                        help="SamplerConfig.prefix_cache of every setting (0 = off)")
    args = parser.parse_args(argv)
    pipe = MMDLMPipeline.from_pretrained(args.model)
    records = load_records(args.shards, pipe.vq.image_size, limit=args.skip + args.limit)[args.skip :]
    pipeline_task, evaluate = PIPELINE_TASK[args.task], TASKS[args.task]
    for overrides in args.setting:
        try:
            sampler = pipe.sampler(pipeline_task, **({"prefix_cache": args.prefix_cache} | overrides))
        except ValueError as err:
            parser.error(str(err))
        if args.task == "joint":  # `--limit` pairs from nothing, seeded by --skip (the evaluation's seed is 0)
            metrics = eval_joint(pipe, args.limit, world_for(records, pipe.vq.image_size), sampler, seed=args.skip,
                                 progress=False).metrics
        else:
            kwargs = {"scorer_ceiling": False} if args.task == "t2i" else {}
            metrics = evaluate(pipe, records, sampler, progress=False, **kwargs).metrics
        cost = metrics["cost"]
        shown = {k: v if k != "self_correction" else v is not None for k, v in overrides.items()}
        print(json.dumps({"task": args.task, **shown, **summary(args.task, metrics),
                          "nfe_per_call": cost["nfe_per_call"], "prefix_cache": args.prefix_cache,
                          "seconds_per_sample": round(cost["seconds_per_sample"], 5),
                          "sampler": sampler.to_dict()}), flush=True)


if __name__ == "__main__":
    main()
