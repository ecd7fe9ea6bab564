"""Blanks of unknown length: a gap of 1-4 words cut from a caption, filled with a fixed number of tokens
per blank or with the length the model chooses (`MMDLMPipeline.infill(tokens_per_blank=None)`: every length of 1 to
`--max-blank` tokens is filled and the completion the model finds most likely per token is kept).

    OMP_NUM_THREADS=2 python -m benchmarks.infill_length --model runs/quickstart/model \\
        --shards 'data/shards/shapes-codes/val/*.tar' --limit 200 --out benchmarks/results/infilling

Per gap size and decoding: `valid` = the completed text is a caption of the shapes world (its parser reads a
scene from it), `length right` = the blank got as many words as were cut, and the NFE per batch of 64 texts.
A text-only task: the model cannot know which colour or shape was cut, only what fits. Writes infill_length.json
and infill_length.md under --out.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from mmdlm.eval.report import command_line, md_table
from mmdlm.inputs import add_device_argument, add_model_argument

GAPS = (1, 2, 3, 4)


def gapped(records: list[dict], words: int, seed: int) -> list[tuple[str, str, int]]:
    """(text with one [MASK] where `words` consecutive words were, the true caption, words before the gap)."""
    rng = random.Random(seed * 100 + words)
    out = []
    for r in records:
        caption = r["captions"][0].split()
        if len(caption) <= words:
            continue
        at = rng.randrange(len(caption) - words + 1)
        out.append((" ".join(caption[:at] + ["[MASK]"] + caption[at + words :]), r["captions"][0], at))
    return out


def score(texts: list[str], cases: list[tuple[str, str, int]], words: int, world: Any) -> dict[str, float]:
    n = len(cases)
    valid = sum(world.read_caption(t) is not None for t in texts)
    right = sum(len(t.split()) == len(true.split()) for t, (_, true, _) in zip(texts, cases))
    return {"valid": valid / n, "length_right": right / n, "n": n}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Fill the gaps every way; write infill_length.json and .md."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.infill_length", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser, help="masked-diffusion model folder")
    parser.add_argument("--shards", required=True, help="val shards (glob)")
    parser.add_argument("--limit", type=int, default=200, help="val captions per gap size")
    parser.add_argument("--max-blank", type=int, default=6, help="longest blank the model may choose (tokens)")
    parser.add_argument("--out", required=True, help="folder for infill_length.json and .md")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    from mmdlm.eval.records import load_records
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.worlds.scoring import world_for

    try:
        pipe = MMDLMPipeline.from_pretrained(args.model, device=args.device)
        records = load_records(args.shards, pipe.vq.image_size, args.limit)
    except (OSError, ValueError, KeyError) as err:
        parser.error(str(err))
    world = world_for(records, pipe.vq.image_size)
    rows = []
    for words in GAPS:
        cases = gapped(records, words, seed=0)
        texts = [t for t, _, _ in cases]
        for name, k in [("1 token per blank", 1), ("4 tokens per blank", 4), ("the model chooses", None)]:
            out_texts, nfe = [], 0
            for lo in range(0, len(texts), 64):
                out = pipe.infill(texts[lo : lo + 64], tokens_per_blank=k, max_blank=args.max_blank)
                out_texts += out.texts
                nfe += out.nfe
            row = {"gap_words": words, "decoding": name, **score(out_texts, cases, words, world),
                   "nfe_per_batch": nfe / -(-len(texts) // 64), "examples": list(zip(texts[:3], out_texts[:3]))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"command": command_line("benchmarks.infill_length", argv), "rows": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "infill_length.json").write_text(json.dumps(result, indent=2) + "\n")
    table = md_table(["words cut", "decoding", "valid caption", "length right", "NFE per batch of 64"],
                     [[r["gap_words"], r["decoding"], f"{100 * r['valid']:.1f}%", f"{100 * r['length_right']:.1f}%",
                       f"{r['nfe_per_batch']:.3g}"] for r in rows])
    (out_dir / "infill_length.md").write_text("\n".join(["# Blanks of unknown length", "", f"`{result['command']}`",
                                                         "", *table]) + "\n")
    print(f"wrote {out_dir / 'infill_length.json'}")
    return result


if __name__ == "__main__":
    main()
