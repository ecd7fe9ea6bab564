"""How captions (or VQA answers) are decoded: caption F1 (or VQA accuracy) and NFE of a model under several
block / step settings.

    python -m benchmarks.caption_decoding --model runs/quickstart/model \\
        --shards 'data/shards/shapes-codes/val/*.tar' --skip 500 --limit 200 \\
        --setting 16:none --setting 24:4 --setting 24:8 --setting 24:1
    python -m benchmarks.caption_decoding --task vqa --model runs/quickstart/model \\
        --shards 'data/shards/shapes-codes/val/*.tar' --skip 500 --limit 200 --setting 8:none --setting 4:1

A `--setting STEPS:BLOCK` decodes every caption in STEPS steps, in blocks of BLOCK tokens left to right
(LLaDA's semi-autoregressive decoding; `none` = one block, confidence order only). `--skip` leaves out the
first val records, so a setting can be chosen on scenes that `mmdlm evaluate --limit 200` does not score.
Prints one line per setting: the per-attribute F1s (shapes scenes) and the exact-match rate, or the VQA
accuracy per question type, and the NFE per call.
"""

from __future__ import annotations

import argparse
import json

from mmdlm.evaluate import eval_caption, eval_vqa, load_records
from mmdlm.pipeline import MMDLMPipeline


def parse_setting(text: str) -> tuple[int, int | None]:
    """'24:4' -> (24, 4); '16:none' -> (16, None)."""
    steps, _, block = text.partition(":")
    try:
        return int(steps), None if block in ("", "none") else int(block)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a setting is STEPS:BLOCK (e.g. 24:4 or 16:none), got {text!r}") from err


def main(argv: list[str] | None = None) -> None:
    """Score caption decoding settings on one model."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.caption_decoding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder")
    parser.add_argument("--shards", required=True, help="val shards (glob)")
    parser.add_argument("--skip", type=int, default=500, help="val records left out first")
    parser.add_argument("--limit", type=int, default=200, help="val records scored after those")
    parser.add_argument("--setting", type=parse_setting, action="append", required=True, help="STEPS:BLOCK")
    parser.add_argument("--task", choices=("caption", "vqa"), default="caption", help="what to decode")
    parser.add_argument("--prefix-cache", type=int, default=0,
                        help="SamplerConfig.prefix_cache of every setting (0 = off); seconds per sample are printed")
    args = parser.parse_args(argv)
    pipe = MMDLMPipeline.from_pretrained(args.model)
    records = load_records(args.shards, pipe.vq.image_size, limit=args.skip + args.limit)[args.skip :]
    for steps, block in args.setting:
        if args.task == "vqa":
            m = eval_vqa(pipe, records, pipe.sampler("answer", steps=steps, block_length=block,
                                                     prefix_cache=args.prefix_cache), progress=False).metrics
            print(json.dumps({"steps": steps, "block_length": block, "accuracy": round(m["accuracy"], 4),
                              "per_type": {k: round(v["accuracy"], 3) for k, v in m["per_type"].items()},
                              "nfe_per_call": m["cost"]["nfe_per_call"], "questions": m["n"],
                              "prefix_cache": args.prefix_cache,
                              "seconds_per_sample": round(m["cost"]["seconds_per_sample"], 5)}), flush=True)
            continue
        metrics = eval_caption(pipe, records, pipe.sampler("caption", steps=steps, block_length=block,
                                                           prefix_cache=args.prefix_cache), progress=False).metrics
        f1 = {k: round(v["f1"], 3) for k, v in metrics.get("per_attribute", {}).items()}
        print(json.dumps({"steps": steps, "block_length": block, "f1": f1, "exact": metrics["exact_match"],
                          "nfe_per_call": metrics["cost"]["nfe_per_call"], "n": len(records),
                          "prefix_cache": args.prefix_cache,
                          "seconds_per_sample": round(metrics["cost"]["seconds_per_sample"], 5)}), flush=True)


if __name__ == "__main__":
    main()
