"""Does an edit model read the instruction or copy the source? One forward per val edit, with the edited image masked
(all of it, or a random share `--ratio`), and its predictions compared with the truth cell by cell, apart for the
cells the edit leaves as they were (the source's token is right) and the cells it changes (the source's token is
wrong), per edit kind. A model that copies well and reads the instruction badly gets the first right and predicts
the source's token at the second (`changed_as_source`).

    python -m benchmarks.edit_probe --model runs/mdm-edits/model --shards 'data/shards/edits-codes/val/*.tar' \\
        --limit 200 --ratio 1.0 --ratio 0.5

Prints one JSON line per ratio: accuracy at unchanged and at changed cells, how often a changed cell was predicted as
the source's token, and per kind. Masked-diffusion models only (an AR model's one forward sees the truth).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from mmdlm.errors import UserError
from mmdlm.inputs import add_model_argument


@torch.no_grad()
def probe(pipe, items: list[dict], ratio: float, seed: int = 0) -> dict:
    """Cell-level accuracy of one forward over `items` (edit documents of `mmdlm.eval.records.load_records`), the edited
    image's tokens masked with probability `ratio` (1.0: all of them)."""
    from mmdlm.sequence import collate

    vocab, g = pipe.vocab, torch.Generator().manual_seed(seed)
    source = pipe.encode_images(torch.stack([r["segments"][0]["image"] for r in items])).cpu()  # (N, h, w)
    edited = pipe.encode_images(torch.stack([r["segments"][2]["image"] for r in items])).cpu()  # (N, h, w)
    samples = pipe.edit_documents(source, [r["segments"][1]["text"] for r in items], edited)
    batch = collate(samples, vocab).to(pipe.device)
    masked = batch.target & (torch.rand(batch.ids.shape, generator=g) < ratio).to(pipe.device)  # (N, T)
    ids = batch.ids.masked_fill(masked, vocab.mask)  # (N, T)
    logits = pipe.model(ids, pad=batch.pad, image_index=batch.image_index, prefix=batch.prefix)  # (N, T, V)
    n = len(items)
    pred = logits.argmax(-1)[batch.target].view(n, -1).cpu()  # (N, h*w)
    truth = vocab.image_to_token(edited.flatten(1))  # (N, h*w)
    copy = vocab.image_to_token(source.flatten(1))  # (N, h*w)
    scored = masked[batch.target].view(n, -1).cpu()  # (N, h*w)
    changed = truth != copy  # (N, h*w)
    right = pred == truth  # (N, h*w)

    def share(hit: torch.Tensor, where: torch.Tensor) -> float | None:
        return round(float(hit[where].float().mean()), 4) if bool(where.any()) else None

    per_kind: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(items):
        per_kind[r["meta"]["edit"]["kind"]].append(i)
    return {"ratio": ratio, "edits": n, "unchanged_right": share(right, scored & ~changed),
            "changed_right": share(right, scored & changed), "changed_as_source": share(pred == copy, scored & changed),
            "changed_cells_per_edit": round(float(changed.sum(1).float().mean()), 2),
            "per_kind": {k: {"changed_right": share(right[i], scored[i] & changed[i]),
                             "changed_as_source": share((pred == copy)[i], scored[i] & changed[i]), "n": len(i)}
                         for k, i in sorted(per_kind.items())}}


def main(argv: list[str] | None = None) -> None:
    """One-step predictions of an edit model at changed and unchanged cells."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.edit_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser, help="a masked-diffusion model folder trained on edits")
    parser.add_argument("--shards", required=True, help="edits val shards (mmdlm.worlds.edits)")
    parser.add_argument("--limit", type=int, default=200, help="edits probed (the first of the shards)")
    parser.add_argument("--ratio", type=float, action="append", default=[],
                        help="share of the edited image masked (repeatable; default 1.0: all of it)")
    args = parser.parse_args(argv)
    from mmdlm.eval.records import documents, load_records
    from mmdlm.pipeline import MMDLMPipeline

    ratios = args.ratio or [1.0]
    if any(not 0 < r <= 1 for r in ratios):
        parser.error(f"--ratio must be in (0, 1], got {ratios}")
    try:
        pipe = MMDLMPipeline.from_pretrained(args.model)
        if pipe.is_autoregressive:
            raise UserError("the probe needs a masked-diffusion model: an AR model's one forward sees the truth")
        records = load_records(args.shards, pipe.vq.image_size, limit=2 * args.limit)  # 3 of 4 documents are edits
        items = documents(records, "edit")[: args.limit]
    except (OSError, ValueError, UserError) as err:
        parser.exit(2, f"error: {err}\n")
    if not items:
        parser.exit(2, f"error: no edit documents in {args.shards!r} (python -m mmdlm.worlds.edits writes them)\n")
    for ratio in ratios:
        print(json.dumps(probe(pipe, items, ratio)), flush=True)


if __name__ == "__main__":
    main()
