"""Generation that revises itself, measured in one run: pure AR, pure MDM, the MDM with a corrective
sampler (trained with and without correction), hybrid AR draft -> MDM revision, best-of-n by self-scoring; and the
correction probe (captions with one wrong colour word: is it found and fixed?).

    OMP_NUM_THREADS=2 python -m benchmarks.revision --ar runs/quickstart/ar --mdm runs/quickstart/model \\
        --corrected runs/corrected/model --shards 'data/shards/shapes-codes/val/*.tar' --out benchmarks/results/revision

`--mdm` is a masked-diffusion model trained without correction, `--corrected` the same recipe with
`--model.corrupt` (both at the same budget); `--seed-pair MDM,CORRECTED` adds another seed's pair for the
text-to-image lines. Quality as `mmdlm evaluate` scores it on the first `--limit` val records (text-to-image on
`--t2i-limit`), batches of 64; NFE and ms are per sample at that batch (`ms b64`), and captions are also timed at
batch 1 (median over `--latency` images, the AR's latency target). Rows:
- `AR`, `MDM`: each model with the pipeline's default samplers (AR + KV cache).
- `MDM, same NFE`: the MDM's images in as many steps as the corrective sampler spends (the fair budget).
- `+ corrective`: text-to-image with ReMDM-style self-correction in the sampler (`SelfCorrection()`); captions
  and answers revised after decoding (`revision=Revision()`: leave-one-out scoring, the doubtful tokens
  re-masked and decoded again).
- `hybrid AR -> X`: the AR twin drafts (its default sampler), X revises (`draft=`).
- `best-of-4`: four images per prompt, the one whose prompt X finds most likely as its caption kept.
The probe (`--probe` captions of val records, one colour word replaced by another colour): `revise_caption` of
each model; fixed = the revised caption describes the true scene (the world's parser), restored = it is the
true caption word for word; and on the true captions, how often the revision breaks one (false alarms).
Writes revision.json and revision.md under --out.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdlm.eval.report import command_line, md_table
from mmdlm.eval.timing import machine_info, timed
from mmdlm.inputs import add_device_argument

if TYPE_CHECKING:
    from mmdlm.pipeline import MMDLMPipeline

ATTRS = ("cell", "color", "shape", "size")


def caption_row(metrics: dict[str, Any]) -> dict[str, Any]:
    f1 = {a: metrics["per_attribute"][a]["f1"] for a in ATTRS}
    return {"caption_f1": f1, "caption_f1_mean": sum(f1.values()) / len(f1), **_cost("caption", metrics)}


def _cost(task: str, metrics: dict[str, Any]) -> dict[str, Any]:
    c = metrics["cost"]
    return {f"{task}_nfe": c["nfe_total"] / c["calls"], f"{task}_ms_b64": 1000 * c["seconds_per_sample"]}


def quality(pipe: MMDLMPipeline, records: list[dict], t2i_records: list[dict], tasks: set[str],
            options: dict[str, dict[str, Any]], samplers: dict[str, Any] | None = None) -> dict[str, Any]:
    """One row's quality and cost: `options[task]` are the pipeline call's keyword arguments."""
    from mmdlm.eval.tasks import eval_caption, eval_t2i, eval_vqa

    samplers = samplers or {}
    row: dict[str, Any] = {}
    if "caption" in tasks:
        m = eval_caption(pipe, records, samplers.get("caption"), progress=False, options=options.get("caption"))
        row |= caption_row(m.metrics)
    if "vqa" in tasks:
        m = eval_vqa(pipe, records, samplers.get("answer"), progress=False, options=options.get("vqa"))
        row |= {"vqa": m.metrics["accuracy"], **_cost("vqa", m.metrics)}
    if "t2i" in tasks:
        m = eval_t2i(pipe, t2i_records, samplers.get("text_to_image"), progress=False, scorer_ceiling=False,
                     options=options.get("t2i"))
        row |= {"t2i": m.metrics["all_correct"], **_cost("t2i", m.metrics)}
    return row


def caption_latency(pipe: MMDLMPipeline, records: list[dict], options: dict[str, Any] | None) -> float:
    """Median ms of one caption at batch 1 (the image tokenizer included, as for every row)."""
    from mmdlm.eval.records import stack_images

    times = []
    for i, r in enumerate(records):
        image = stack_images([r])
        seconds, _ = timed(lambda: pipe.caption(image, seed=0, **(options or {})), pipe.device)  # noqa: B023
        if i > 0:  # the first is a warm-up
            times.append(1000 * seconds)
    return statistics.median(times)


def probes(records: list[dict], seed: int) -> list[tuple[dict, str, str]]:
    """(record, true caption, the caption with one colour word replaced by another colour)."""
    from mmdlm.worlds.shapes import COLORS

    rng = random.Random(seed)
    out = []
    for r in records:
        words = r["captions"][0].split()
        at = [i for i, w in enumerate(words) if w in COLORS]
        if not at:
            continue
        i = rng.choice(at)
        wrong = list(words)
        wrong[i] = rng.choice([c for c in COLORS if c != words[i]])
        out.append((r, r["captions"][0], " ".join(wrong)))
    return out


def probe(pipe: MMDLMPipeline, cases: list[tuple[dict, str, str]], world: Any) -> dict[str, Any]:
    """Fix rate on the wrong captions; false alarms on the true ones."""
    from mmdlm.eval.records import stack_images

    images = stack_images([r for r, _, _ in cases])
    fixed = restored = broken = 0
    nfe = 0
    revised, kept = [], []
    for lo in range(0, len(cases), 64):
        chunk = cases[lo : lo + 64]
        out = pipe.revise_caption(images[lo : lo + 64], [w for _, _, w in chunk])
        same = pipe.revise_caption(images[lo : lo + 64], [t for _, t, _ in chunk])
        nfe += out.nfe
        revised += out.texts
        kept += same.texts
    for (_, true, _), text, again in zip(cases, revised, kept):
        scene = world.read_caption(true)
        fixed += world.read_caption(text) == scene
        restored += text == true
        broken += world.read_caption(again) != scene
    n = len(cases)
    return {"fixed": fixed / n, "restored": restored / n, "false_alarms": broken / n, "n": n,
            "nfe_per_batch": nfe / -(-n // 64), "examples": [(w, t) for (_, _, w), t in zip(cases[:5], revised)]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.revision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ar", required=True, help="the causal twin's model folder")
    parser.add_argument("--mdm", required=True, help="masked-diffusion model trained without correction")
    parser.add_argument("--corrected", required=True, help="the same recipe trained with --model.corrupt")
    parser.add_argument("--seed-pair", help="MDM,CORRECTED of another seed (text-to-image lines only)")
    parser.add_argument("--shards", required=True, help="val shards (glob)")
    parser.add_argument("--limit", type=int, default=200, help="val records for captions, VQA and the probe")
    parser.add_argument("--t2i-limit", type=int, default=400, help="val records for text-to-image")
    parser.add_argument("--latency", type=int, default=21, help="images timed at batch 1 (the first untimed)")
    parser.add_argument("--best-of", type=int, default=4, help="n of the best-of-n rows")
    parser.add_argument("--out", required=True, help="folder for revision.json and revision.md")
    add_device_argument(parser)
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    from mmdlm.eval.records import load_records
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.sampling import SelfCorrection
    from mmdlm.sampling.config import DEFAULT_SAMPLERS
    from mmdlm.sampling.revise import Revision
    from mmdlm.worlds.scoring import world_for

    ar = MMDLMPipeline.from_pretrained(args.ar, device=args.device)
    mdm = MMDLMPipeline.from_pretrained(args.mdm, device=args.device)
    fixer = MMDLMPipeline.from_pretrained(args.corrected, device=args.device)
    records = load_records(args.shards, mdm.vq.image_size, max(args.limit, args.t2i_limit))
    scored, t2i_records = records[: args.limit], records[: args.t2i_limit]
    world = world_for(records, mdm.vq.image_size)
    every = {"caption", "vqa", "t2i"}
    corrective = {"text_to_image": replace(DEFAULT_SAMPLERS["text_to_image"], self_correction=SelfCorrection())}
    revise = {"caption": {"revision": Revision()}, "vqa": {"revision": Revision()}}
    rows: list[dict[str, Any]] = []

    def add(name: str, pipe: MMDLMPipeline, tasks: set[str], options: dict | None = None,
            samplers: dict | None = None, latency: dict | None = None) -> None:
        row = {"name": name, **quality(pipe, scored, t2i_records, tasks, options or {}, samplers)}
        if latency is not None:
            row["caption_ms_b1"] = caption_latency(pipe, records[: args.latency], latency)
        rows.append(row)
        print(json.dumps(row), flush=True)

    add("AR (+ KV cache)", ar, every, latency={})
    add("MDM", mdm, every, latency={})
    add("MDM + corrective", mdm, every, revise, corrective, latency=revise["caption"])
    add("MDM corrected", fixer, every)
    add("MDM corrected + corrective", fixer, every, revise, corrective)
    t2i_nfe = rows[-1]["t2i_nfe"]
    same = {"text_to_image": replace(DEFAULT_SAMPLERS["text_to_image"], steps=round(t2i_nfe))}
    add(f"MDM, same NFE ({round(t2i_nfe)} steps)", mdm, {"t2i"}, samplers=same)
    for name, pipe in (("MDM", mdm), ("MDM corrected", fixer)):
        add(f"hybrid AR -> {name}", pipe, every, {t: {"draft": ar} for t in every}, latency={"draft": ar})
    add(f"MDM best-of-{args.best_of}", mdm, {"t2i"}, {"t2i": {"best_of": args.best_of}})
    add(f"MDM corrected best-of-{args.best_of}", fixer, {"t2i"}, {"t2i": {"best_of": args.best_of}})
    if args.seed_pair:
        other, other_fixer = (MMDLMPipeline.from_pretrained(p, device=args.device) for p in args.seed_pair.split(","))
        add("MDM (seed 1)", other, {"t2i"})
        add("MDM (seed 1) + corrective", other, {"t2i"}, samplers=corrective)
        add("MDM corrected (seed 1)", other_fixer, {"t2i"})
        add("MDM corrected (seed 1) + corrective", other_fixer, {"t2i"}, samplers=corrective)
    cases = probes(scored, seed=0)
    probe_rows = {name: probe(pipe, cases, world) for name, pipe in
                  (("AR", ar), ("MDM", mdm), ("MDM corrected", fixer))}
    for name, p in probe_rows.items():
        print(name, json.dumps(p), flush=True)
    return {"rows": rows, "probe": probe_rows}


def render(result: dict[str, Any]) -> str:
    def f(v: Any, pct: bool = False) -> str:
        if v is None:
            return "-"
        return f"{100 * v:.1f}%" if pct else f"{v:.3g}"

    lines = ["# Revision", "", f"`{result['command']}`", ""]
    header = ["variant", "t2i all-correct", "t2i NFE", "t2i ms (b64)", "caption F1 cell/colour/shape/size (mean)",
              "caption NFE", "caption ms b64 / b1", "VQA", "VQA NFE", "VQA ms (b64)"]
    body = []
    for r in result["rows"]:
        f1 = r.get("caption_f1")
        caption = "-" if f1 is None else " / ".join(f"{f1[a]:.3f}" for a in ATTRS) + f" ({r['caption_f1_mean']:.3f})"
        body.append([r["name"], f(r.get("t2i"), True), f(r.get("t2i_nfe")), f(r.get("t2i_ms_b64")), caption,
                     f(r.get("caption_nfe")), f"{f(r.get('caption_ms_b64'))} / {f(r.get('caption_ms_b1'))}",
                     f(r.get("vqa"), True), f(r.get("vqa_nfe")), f(r.get("vqa_ms_b64"))])
    lines += md_table(header, body)
    lines += ["", "Correction probe (one colour word of each caption replaced by another colour):", ""]
    lines += md_table(["model", "fixed (true scene)", "restored (word for word)", "false alarms on true captions",
                       "NFE per batch of 64"],
                      [[k, f(p["fixed"], True), f(p["restored"], True), f(p["false_alarms"], True),
                        f(p["nfe_per_batch"])] for k, p in result["probe"].items()])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run every variant and the probe; write revision.json and revision.md."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.limit < 1 or args.t2i_limit < 1 or args.latency < 2 or args.best_of < 2:
        parser.error("--limit and --t2i-limit must be >= 1, --latency and --best-of >= 2")
    try:
        result = run(args)
    except (OSError, ValueError, KeyError) as err:
        parser.error(str(err))
    result = {"command": command_line("benchmarks.revision", argv), "machine": machine_info(args.device or "cpu"),
              **result}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "revision.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "revision.md").write_text(render(result))
    print(f"wrote {out / 'revision.json'} and {out / 'revision.md'}")
    return result


if __name__ == "__main__":
    main()
