"""Two ways to edit with a masked-diffusion model, side by side: the edited image drawn from masks (`pipe.edit`), or
started as a copy of the source and revised where the model doubts it given the instruction (`pipe.edit(revision=)`,
`mmdlm.sampling.revise`), on the first `--limit` val documents of the edits world, scored by the oracle.

    python -m benchmarks.edit_modes --model runs/mdm-edits/model --shards 'data/shards/edits-codes/val/*.tar' \\
        --limit 200 --revision 16,2 --revision 8,1

A `--revision MAX_TOKENS,ROUNDS` re-masks at most that many tokens per round (p < 0.5 and the model would put
another token there). Prints one JSON line per mode: all-correct, edited object right, rest unchanged, extra
objects, per edit kind.
"""

from __future__ import annotations

import argparse
import json

from mmdlm.errors import UserError
from mmdlm.inputs import add_model_argument


def parse_revision(text: str) -> tuple[int, int]:
    try:
        tokens, rounds = (int(x) for x in text.split(","))
        return tokens, rounds
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--revision is MAX_TOKENS,ROUNDS (e.g. 16,2), got {text!r}") from err


def main(argv: list[str] | None = None) -> None:
    """Edit from masks and by revision of the source, scored by the oracle."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.edit_modes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser, help="a model folder trained on edits")
    parser.add_argument("--shards", required=True, help="edits val shards (mmdlm.worlds.edits, pre-tokenized or not)")
    parser.add_argument("--limit", type=int, default=200, help="val documents (edits and what-changed; edits scored)")
    parser.add_argument("--revision", type=parse_revision, action="append", default=[],
                        help="MAX_TOKENS,ROUNDS of a revision mode (repeatable)")
    args = parser.parse_args(argv)
    from mmdlm.eval.records import load_records
    from mmdlm.eval.tasks import eval_edit
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.sampling.revise import Revision

    try:
        pipe = MMDLMPipeline.from_pretrained(args.model)
        records = load_records(args.shards, pipe.vq.image_size, limit=args.limit)
    except (OSError, ValueError, UserError) as err:
        parser.exit(2, f"error: {err}\n")
    modes = [("from masks", {})] + [(f"revision {t} tokens x {r}", {"revision": Revision(max_tokens=t, rounds=r)})
                                    for t, r in args.revision]
    for name, options in modes:
        m = eval_edit(pipe, records, progress=False, options=options).metrics
        print(json.dumps({"mode": name, "n": m["n"], **{k: round(m[k], 4) for k in (
            "all_correct", "edited_ok", "rest_unchanged", "extra_objects", "missing_objects")},
            "per_kind": {k: round(v["all_correct"], 3) for k, v in m["per_kind"].items()}}), flush=True)


if __name__ == "__main__":
    main()
