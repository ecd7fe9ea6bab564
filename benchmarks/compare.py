"""Masked diffusion vs its autoregressive twin, side by side on the same val records, in one run.

    OMP_NUM_THREADS=2 python -m benchmarks.compare --mdm runs/quickstart/model --ar runs/ar/model \\
        --shards 'data/shards/shapes-codes/val/*.tar' --out benchmarks/results/infilling --limit 200
    python -m benchmarks.compare --mdm DIR --ar DIR --shards GLOB --out /tmp/cmp --limit 20 --device cpu \\
        --steps 1,2,4,8,16,32,64 --thresholds 0.7,0.8,0.9,0.95 --quiet

The two models share data, size and training steps (configs/mdm-shapes.yaml vs + configs/ar.yaml:
only `causal` differs); both see the first `--limit` val records in shard order, scored by the functions
of `mmdlm.eval`, at the same batch size and seeds.

1. Quality (`mmdlm evaluate` at the pipeline's default samplers): VQA accuracy, caption exact match and
   attribute F1, text-to-image all-correct (the oracle), held-out NLL per target token (MDM: its ELBO,
   an upper bound; AR: exact). The AR sampler has no classifier-free guidance, so the MDM's
   text-to-image is also given without guidance (`t2i_all_correct_unguided`).
2. Speed/quality trade-off of the MDM: fixed steps `--steps` (capped at the target region: a 4-token
   answer takes at most 4 steps, a 64-token image 64; capped duplicates are run once) and Fast-dLLM
   threshold decoding at `--thresholds`; VQA accuracy and text-to-image all-correct against NFE (forward
   calls per sampler call) and against wall-clock seconds per sample (the pipeline call at
   `--batch-size`, VQ encoding / decoding included, scoring not; after a warm-up), with the AR point(s)
   on the same axes.
3. What only diffusion does (the AR baseline given what a left-to-right decoder can use):
   - text infilling: a val caption with one attribute word blanked (colour, shape, size or a position
     word, in turn), filled by `pipe.infill` with as many tokens as the word has. AR: left context only
     (it continues the prefix; the same word is checked); the MDM given the same left context only is
     the control. Text alone does not determine a colour, shape or size (scenes are drawn uniformly;
     `chance` = 1 / choices): only position words are constrained by their context.
   - caption infilling given the image: the same blank in the caption of a captioning prompt, the image
     and the rest of the caption given (MDM); AR: the image and the caption's left part.
   - image inpainting: the token cells under one object's cell of a val image are regenerated with the
     caption as prompt; the oracle checks that object (colour, shape and size right) and the whole
     scene. Controls: the MDM without prompt, the oracle on the VQ reconstruction (the ceiling), and the
     AR, which can only regenerate every image token from the first blanked one on.
   - reversal: a two-object caption with its FIRST object phrase blanked and the rest visible. MDM: infill
     (one blank of as many tokens as the phrase); AR: it writes the phrase from the task token alone
     and cannot use the later words. Scored: the completed caption parses (`valid`), is in the
     canonical form and order of the scene it describes (`consistent`: the first object must sit in
     an earlier cell than the second, and not in its cell), and equals the original (`exact`,
     chance level: the text does not say which object it was).

Writes under --out: compare.json (everything), compare.md (the command line, then the tables),
accuracy_vs_nfe.png and accuracy_vs_time.png (panels VQA and text-to-image, log x, one line per model
and sampler family).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mmdlm.eval.models import load_pair
from mmdlm.eval.records import batches, stack_images
from mmdlm.eval.report import command_line, md_table
from mmdlm.eval.timing import load_text, machine_info
from mmdlm.inputs import add_device_argument, int_list, positive_int

if TYPE_CHECKING:  # the model stack loads lazily: `--help` answers at once
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.sampling import SamplerConfig, SampleResult
    from mmdlm.sequence import Sample

QUALITY_TASKS: tuple[str, ...] = ("vqa", "caption", "t2i", "nll")
BLANK_KINDS: tuple[str, ...] = ("color", "shape", "size", "position")
FAMILY_STYLE = {"MDM, fixed steps": ("C0", "o-"), "MDM, threshold": ("C2", "s--"), "AR, KV cache": ("C3", "*")}


# ---------------------------------------------------------------------------------------------
# running samplers on hand-built prompts


def _grouped(indices: Sequence[int], key: Callable[[int], Any], size: int) -> Iterator[list[int]]:
    """Chunks of at most `size` indices sharing `key` (the AR sampler needs one target layout per batch)."""
    groups: dict[Any, list[int]] = defaultdict(list)
    for i in indices:
        groups[key(i)].append(i)
    for _, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        for _, chunk in batches(members, size):
            yield list(chunk)


def generate(pipe: MMDLMPipeline, samples: Sequence[Sample], seed: int, temperature: float = 0.0) -> SampleResult:
    """Fill the `<mask>` targets of the samples: AR left to right (KV cache); MDM one token per step."""
    from mmdlm.sampling import SamplerConfig
    from mmdlm.sequence import collate

    batch = collate(list(samples), pipe.vocab).to(pipe.device)
    generator = torch.Generator(device=pipe.device).manual_seed(seed)
    config = SamplerConfig(steps=max(1, int(batch.target.sum(1).max())), temperature=temperature)
    return pipe.scheduler.sample(pipe.model, batch, config, generator=generator)


def cap_steps(steps: Sequence[int], region: int) -> dict[int, list[int]]:
    """Effective step count -> the requested counts it stands for (a step count is capped at the region)."""
    out: dict[int, list[int]] = {}
    for s in sorted(steps):
        out.setdefault(min(s, region), []).append(s)
    return out


def task_sampler(pipe: MMDLMPipeline, task: str, guidance: float, **fields: Any) -> SamplerConfig:
    """The pipeline's default sampler of an evaluated task (vqa, t2i) with `fields`; guidance for t2i only."""
    if task == "t2i":
        return pipe.sampler("text_to_image", guidance_scale=guidance, **fields)
    return pipe.sampler("answer", **fields)


def warm_up(pipe: MMDLMPipeline, records: Sequence[dict]) -> None:
    """One untimed call of each timed task, so one-time costs stay out of the wall-clock."""
    fits = [(r, qa["question"]) for r in records for qa in r["qa"]
            if len(pipe.tokenizer.encode(qa["question"])) <= pipe.layout.question_len]
    if fits:
        pipe.answer(fits[0][0]["image"][None], [fits[0][1]])
    prompts = [r["captions"][0] for r in records
               if len(pipe.tokenizer.encode(r["captions"][0])) <= pipe.layout.caption_len]
    if prompts:
        pipe.text_to_image(prompts[:1], steps=2)


# ---------------------------------------------------------------------------------------------
# 1. quality


def summarize(m: dict) -> dict[str, Any]:
    """The headline numbers of an `mmdlm evaluate` metrics dict."""
    out: dict[str, Any] = {}
    if "vqa" in m:
        out |= {"vqa_accuracy": m["vqa"]["accuracy"], "vqa_n": m["vqa"]["n"],
                "vqa_nfe": m["vqa"]["cost"]["nfe_per_call"], "vqa_s_per_sample": m["vqa"]["cost"]["seconds_per_sample"]}
        out |= {f"vqa_{k}": v["accuracy"] for k, v in m["vqa"]["per_type"].items()}
    if "caption" in m:
        c = m["caption"]
        out |= {"caption_exact_match": c["exact_match"], "caption_attribute_f1": c.get("all_attributes_f1"),
                "caption_bleu4": c["bleu4"], "caption_nfe": c["cost"]["nfe_per_call"]}
    if "t2i" in m:
        t = m["t2i"]
        out |= {"t2i_all_correct": t["all_correct"], "t2i_object": t.get("object"),
                "t2i_nfe": t["cost"]["nfe_per_call"],
                "t2i_s_per_sample": t["cost"]["seconds_per_sample"],
                "t2i_oracle_on_ground_truth": t.get("scorer_on_ground_truth", {}).get("all_correct"),
                "t2i_oracle_on_vq_reconstruction": t.get("scorer_on_reconstructions", {}).get("all_correct")}
    if "nll" in m:
        out |= {"nll": m["nll"]["nll"], "nll_bound": m["nll"]["bound"]}
        out |= {f"nll_{k}": v["nll"] for k, v in m["nll"]["per_task"].items()}
    return out


def quality(pipe: MMDLMPipeline, records: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    """`mmdlm evaluate` on the records at the pipeline's defaults (guidance `--guidance` for text-to-image)."""
    from mmdlm.eval.tasks import eval_t2i, evaluate

    metrics = evaluate(pipe, records=records, tasks=QUALITY_TASKS,
                       samplers={"t2i": task_sampler(pipe, "t2i", args.guidance)},
                       batch_size=args.batch_size, seed=args.seed, nll_draws=args.nll_draws, progress=not args.quiet)
    summary = summarize(metrics)
    if not pipe.is_autoregressive:  # the AR sampler has no guidance: the MDM without it, like for like
        t2i = eval_t2i(pipe, records, task_sampler(pipe, "t2i", 0.0), args.batch_size, args.seed, not args.quiet,
                       scorer_ceiling=False).metrics
        summary["t2i_all_correct_unguided"] = t2i["all_correct"]
    return {"summary": summary, "metrics": metrics}


# ---------------------------------------------------------------------------------------------
# 2. speed / quality trade-off


def task_score(pipe: MMDLMPipeline, task: str, records: list[dict], sampler: SamplerConfig,
               args: argparse.Namespace) -> dict[str, float]:
    """Accuracy (VQA) or all-correct (text-to-image), NFE per call and seconds per sample of one setting."""
    from mmdlm.eval.tasks import eval_t2i, eval_vqa

    if task == "vqa":
        m = eval_vqa(pipe, records, sampler, args.batch_size, args.seed, not args.quiet).metrics
        score = m["accuracy"]
    else:
        m = eval_t2i(pipe, records, sampler, args.batch_size, args.seed, not args.quiet, scorer_ceiling=False).metrics
        score = m["all_correct"]
    return {"accuracy": score, "nfe": m["cost"]["nfe_per_call"], "seconds_per_sample": m["cost"]["seconds_per_sample"],
            "batch_size": args.batch_size}


def tradeoff(mdm: MMDLMPipeline, ar_summary: dict, records: list[dict], args: argparse.Namespace) -> list[dict]:
    """The MDM's points at every step count and threshold, and the AR's (from its quality run)."""
    points = []
    regions = {"vqa": mdm.layout.answer_len, "t2i": mdm.vq.tokens_per_image}
    for task in ("vqa", "t2i"):
        for steps, asked in cap_steps(args.steps, regions[task]).items():
            sampler = task_sampler(mdm, task, args.guidance, steps=steps)
            points.append({"model": "mdm", "family": "MDM, fixed steps", "task": task, "setting": f"s={steps}",
                           "steps": steps, "requested_steps": asked, **task_score(mdm, task, records, sampler, args)})
        for tau in args.thresholds:
            sampler = task_sampler(mdm, task, args.guidance, threshold=tau)
            points.append({"model": "mdm", "family": "MDM, threshold", "task": task, "setting": f"tau={tau}",
                           "threshold": tau, **task_score(mdm, task, records, sampler, args)})
        points.append({"model": "ar", "family": "AR, KV cache", "task": task, "setting": "AR",
                       "accuracy": ar_summary[f"{task}_accuracy" if task == "vqa" else "t2i_all_correct"],
                       "nfe": ar_summary[f"{task}_nfe"], "seconds_per_sample": ar_summary[f"{task}_s_per_sample"],
                       "batch_size": args.batch_size})
    return points


def plot_tradeoff(points: list[dict], x: str, path: Path) -> Path:
    """Accuracy against `x` (nfe or seconds_per_sample), log x, panels VQA and text-to-image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    titles = {"vqa": "VQA accuracy", "t2i": "Text-to-image all-correct (oracle)"}
    for ax, task in zip(axes, ("vqa", "t2i")):
        for family, (color, style) in FAMILY_STYLE.items():
            pts = sorted((p for p in points if p["task"] == task and p["family"] == family), key=lambda p: p[x])
            if not pts:
                continue
            xs, ys = [max(p[x], 1e-9) for p in pts], [p["accuracy"] for p in pts]
            ax.plot(xs, ys, style, color=color, label=family, markersize=8 if style == "*" else 5)
            for p, xv, yv in zip(pts, xs, ys):
                ax.annotate(p["setting"], (xv, yv), textcoords="offset points", xytext=(3, 4), fontsize=7)
        if x == "nfe":  # ticks at 1, 2, 4, ... forward calls
            ax.set_xscale("log", base=2)
        else:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())  # major labels only: no overlaps
        ax.set_xlabel("NFE (forward calls per sampler call)" if x == "nfe" else "seconds per sample")
        ax.set_ylabel("accuracy")
        ax.set_title(titles[task])
        ax.set_ylim(-0.03, 1.03)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# 3. what only diffusion does: the blanks


@dataclass
class Blank:
    """A span of a record's canonical caption to restore, with its tokens split at the span."""

    record: int  # index into the records
    text: str  # the caption
    start: int  # character span of the blank
    end: int
    kind: str  # color / shape / size / position / first_object
    prefix: list[int]  # text ids before, of the span (the word, with its leading space), and after
    word: list[int]
    rest: list[int]

    def masked(self) -> str:
        from mmdlm.pipeline import BLANK

        return self.text[: self.start] + BLANK + self.text[self.end :]

    @property
    def answer(self) -> str:
        return self.text[self.start : self.end]


def make_blank(pipe: MMDLMPipeline, record: int, text: str, start: int, end: int, kind: str) -> Blank | None:
    """A Blank, or None when the tokenizer does not split the caption at the span's edges (or it is too long)."""
    enc = pipe.tokenizer.encode
    lead = " " if start > 0 else ""
    prefix = enc(text[:start].rstrip()) if start > 0 else []
    word, rest = enc(lead + text[start:end]), enc(text[end:]) if end < len(text) else []
    full = enc(text)
    if prefix + word + rest != full or len(full) > min(pipe.layout.caption_len, pipe.layout.text_len - 1):
        return None
    return Blank(record, text, start, end, kind, prefix, word, rest)


def attribute_blanks(pipe: MMDLMPipeline, records: Sequence[dict], seed: int) -> list[Blank]:
    """One blanked attribute word per record: colour, shape, size and a position word in turn, of a random object."""
    from mmdlm.worlds.shapes import describe

    rng = random.Random(f"compare/blanks/{seed}")
    blanks = []
    for i, r in enumerate(records):
        text, kind = r["captions"][0], BLANK_KINDS[i % len(BLANK_KINDS)]
        obj = rng.choice(r["meta"]["objects"])
        phrase = describe(obj)
        at = text.find(phrase)
        if at < 0:  # not a canonical shapes caption
            continue
        value = rng.choice(obj["position"].split()) if kind == "position" else obj[kind]
        base = phrase.rfind(obj["position"]) if kind == "position" else 0
        match = re.compile(rf"\b{re.escape(value)}\b").search(phrase, base)
        if match and (b := make_blank(pipe, i, text, at + match.start(), at + match.end(), kind)):
            blanks.append(b)
    return blanks


def first_object_blanks(pipe: MMDLMPipeline, records: Sequence[dict]) -> list[Blank]:
    """The first object phrase of every caption that describes two objects or more."""
    from mmdlm.worlds.shapes import describe

    blanks = []
    for i, r in enumerate(records):
        objects = sorted(r["meta"]["objects"], key=lambda o: o["cell"])
        text = r["captions"][0]
        phrase = describe(objects[0])
        if len(objects) >= 2 and text.startswith(phrase):
            if b := make_blank(pipe, i, text, 0, len(phrase), "first_object"):
                blanks.append(b)
    return blanks


def mdm_infill(pipe: MMDLMPipeline, blanks: Sequence[Blank], args: argparse.Namespace) -> list[str]:
    """`pipe.infill` of every blank with as many tokens as its answer; the completed texts."""
    out: dict[int, str] = {}
    for b, chunk in enumerate(_grouped(range(len(blanks)), lambda i: len(blanks[i].word), args.batch_size)):
        res = pipe.infill([blanks[i].masked() for i in chunk], tokens_per_blank=len(blanks[chunk[0]].word),
                          seed=args.seed + b)
        out.update(zip(chunk, res.texts))
    return [out[i] for i in range(len(blanks))]


def continue_left(pipe: MMDLMPipeline, blanks: Sequence[Blank], args: argparse.Namespace) -> list[list[int]]:
    """Text ids each model writes at the blank given the left context alone (text task, rest masked)."""
    from mmdlm.sequence import text_prompt

    out: dict[int, list[int]] = {}
    n = pipe.layout.text_len
    for b, chunk in enumerate(_grouped(range(len(blanks)), lambda i: len(blanks[i].prefix), args.batch_size)):
        samples = [text_prompt(blanks[i].prefix + [pipe.vocab.mask] * (n - len(blanks[i].prefix)), pipe.vocab,
                               pipe.layout) for i in chunk]
        res = generate(pipe, samples, args.seed + b).ids.cpu()
        for row, i in enumerate(chunk):
            at = 1 + len(blanks[i].prefix)  # position 0 holds <text>
            out[i] = res[row, at : at + len(blanks[i].word)].tolist()
    return [out[i] for i in range(len(blanks))]


def caption_fill(pipe: MMDLMPipeline, blanks: Sequence[Blank], codes: torch.Tensor,
                 args: argparse.Namespace) -> list[list[int]]:
    """Text ids written at each blank of the caption in a captioning prompt, given the image: the MDM sees
    the rest of the caption, the AR the part before the blank."""
    from mmdlm.sequence import caption_sample, mask_target

    out: dict[int, list[int]] = {}
    for b, chunk in enumerate(_grouped(range(len(blanks)), lambda i: len(blanks[i].prefix), args.batch_size)):
        samples, starts = [], []
        for i in chunk:
            bl = blanks[i]
            s = caption_sample(codes[bl.record], bl.prefix + bl.word + bl.rest, pipe.vocab, pipe.layout)
            start = int(s.target.nonzero()[0]) + len(bl.prefix)
            pos = torch.arange(len(s))
            where = pos >= start if pipe.is_autoregressive else (pos >= start) & (pos < start + len(bl.word))
            samples.append(mask_target(s, pipe.vocab, where))
            starts.append(start)
        res = generate(pipe, samples, args.seed + b).ids.cpu()
        for row, (i, start) in enumerate(zip(chunk, starts)):
            out[i] = res[row, start : start + len(blanks[i].word)].tolist()
    return [out[i] for i in range(len(blanks))]


def rates_by_kind(blanks: Sequence[Blank], right: Sequence[bool]) -> dict[str, Any]:
    """Overall and per-kind share of restored blanks."""
    by: dict[str, list[bool]] = defaultdict(list)
    for b, r in zip(blanks, right):
        by[b.kind].append(bool(r))
    flat = [bool(r) for r in right]
    return {"accuracy": sum(flat) / max(len(flat), 1), "n": len(flat),
            "per_kind": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by.items())}}


def chance_by_kind() -> dict[str, float]:
    """Chance of a uniform guess among the world's values (scenes draw attributes uniformly)."""
    from mmdlm.worlds.shapes import COLORS, SHAPES, SIZES

    return {"color": 1 / len(COLORS), "shape": 1 / len(SHAPES), "size": 1 / len(SIZES)}


def probe_text_infill(mdm: MMDLMPipeline, ar: MMDLMPipeline, blanks: list[Blank],
                      args: argparse.Namespace) -> dict[str, Any]:
    """Text-only infilling of one attribute word: MDM with both sides, MDM and AR with the left side only."""
    from mmdlm.eval.metrics import normalize

    filled = mdm_infill(mdm, blanks, args)
    both = [normalize(f) == normalize(b.text) for f, b in zip(filled, blanks)]
    left_mdm = [ids == b.word for ids, b in zip(continue_left(mdm, blanks, args), blanks)]
    left_ar = [ids == b.word for ids, b in zip(continue_left(ar, blanks, args), blanks)]
    examples = [{"masked": b.masked(), "answer": b.answer, "mdm": f} for b, f in zip(blanks[:6], filled)]
    return {"mdm": rates_by_kind(blanks, both), "mdm_left_only": rates_by_kind(blanks, left_mdm),
            "ar_left_only": rates_by_kind(blanks, left_ar), "chance": chance_by_kind(), "examples": examples}


def probe_caption_infill(mdm: MMDLMPipeline, ar: MMDLMPipeline, blanks: list[Blank], records: list[dict],
                         args: argparse.Namespace) -> dict[str, Any]:
    """The same blanks in a captioning prompt with the image: MDM both sides, AR the left side."""
    codes = {kind: torch.cat([p.encode_images(stack_images(chunk)).cpu()
                              for _, chunk in batches(records, args.batch_size)])
             for kind, p in (("mdm", mdm), ("ar", ar))}
    right = {kind: [ids == b.word for ids, b in zip(caption_fill(p, blanks, codes[kind], args), blanks)]
             for kind, p in (("mdm", mdm), ("ar", ar))}
    return {"mdm": rates_by_kind(blanks, right["mdm"]), "ar_left_only": rates_by_kind(blanks, right["ar"])}


def reversal_scores(blanks: Sequence[Blank], completed: Sequence[str]) -> dict[str, Any]:
    """valid / consistent / exact rates of completed captions (see the module docstring)."""
    from mmdlm.eval.metrics import normalize
    from mmdlm.worlds.shapes import caption, parse_caption

    valid, consistent, exact = [], [], []
    for b, text in zip(blanks, completed):
        parsed = parse_caption(text)
        valid.append(parsed is not None)
        consistent.append(parsed is not None and normalize(caption(parsed)) == normalize(text))
        exact.append(normalize(text) == normalize(b.text))
    n = max(len(blanks), 1)
    return {"valid": sum(valid) / n, "consistent": sum(consistent) / n, "exact": sum(exact) / n, "n": len(blanks)}


def probe_reversal(mdm: MMDLMPipeline, ar: MMDLMPipeline, records: list[dict],
                   args: argparse.Namespace) -> dict[str, Any]:
    """Restore a caption's first object phrase from the words after it (MDM) or from nothing (AR)."""
    blanks = first_object_blanks(mdm, records)
    filled = mdm_infill(mdm, blanks, args)

    def spliced(pipe: MMDLMPipeline) -> list[str]:
        return [pipe.tokenizer.decode(pipe.vocab.text_ids_only(ids)) + b.text[b.end :]
                for ids, b in zip(continue_left(pipe, blanks, args), blanks)]

    ar_texts, mdm_left = spliced(ar), spliced(mdm)
    examples = [{"masked": b.masked(), "answer": b.answer, "mdm": f, "ar": a}
                for b, f, a in zip(blanks[:6], filled, ar_texts)]
    return {"mdm": reversal_scores(blanks, filled), "mdm_left_only": reversal_scores(blanks, mdm_left),
            "ar_left_only": reversal_scores(blanks, ar_texts), "examples": examples}


# ---------------------------------------------------------------------------------------------
# 3. what only diffusion does: inpainting


def cell_mask(cell: int, image_size: int) -> torch.Tensor:
    """Bool[H, W]: the pixels of one cell of the 3x3 grid."""
    from mmdlm.worlds.shapes import cell_bounds

    x0, y0, x1, y1 = cell_bounds(cell, image_size)
    m = torch.zeros(image_size, image_size, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def object_scores(images: torch.Tensor, records: Sequence[dict], targets: Sequence[dict]) -> list[dict[str, float]]:
    """Per image: whether the target object is read back in its cell (and with which attributes right),
    and whether the whole scene is read exactly."""
    from mmdlm.worlds.oracle import read_scene
    from mmdlm.worlds.shapes import scene_key

    rows = []
    for image, r, obj in zip(images, records, targets):
        read = read_scene(image)
        got = {o["cell"]: o for o in read}.get(obj["cell"])
        attrs = {a: float(got is not None and got[a] == obj[a]) for a in ("color", "shape", "size")}
        rows.append({"object": float(all(attrs.values())), **attrs,
                     "scene": float(scene_key(read) == scene_key(r["meta"]["objects"]))})
    return rows


def ar_inpaint(pipe: MMDLMPipeline, images: torch.Tensor, masks: torch.Tensor, prompts: list[str],
               seed: int) -> tuple[torch.Tensor, list[int]]:
    """The AR's best: keep the image tokens before the first blanked one, regenerate all after it (caption
    given). Returns the images and how many tokens each regenerated."""
    from mmdlm.sequence import mask_target, t2i_sample

    codes = pipe.encode_images(images).cpu()  # (B, h, w)
    first = pipe.token_mask(masks).cpu().flatten(1).float().argmax(1).tolist()  # raster index of the first blank
    out = codes.clone()
    for chunk in _grouped(range(len(codes)), lambda i: first[i], len(codes)):
        samples = []
        for i in chunk:
            s = t2i_sample(pipe.tokenizer.encode(prompts[i]), codes[i], pipe.vocab, pipe.layout)
            samples.append(mask_target(s, pipe.vocab, s.image_index >= first[i]))
        ids = generate(pipe, samples, seed, temperature=1.0).ids.cpu()[:, : len(samples[0])]
        image_pos = samples[0].image_index >= 0
        out[chunk] = pipe.vocab.token_to_image(ids[:, image_pos]).view(len(chunk), *codes.shape[1:])
    with torch.no_grad():
        decoded = pipe.vq.decode(out.to(pipe.device)).cpu()
    return decoded, [pipe.vq.tokens_per_image - f for f in first]


def probe_inpaint(mdm: MMDLMPipeline, ar: MMDLMPipeline, records: list[dict],
                  args: argparse.Namespace) -> dict[str, Any]:
    """Blank one object's cell, regenerate it; the oracle checks the object and the scene."""
    from mmdlm.eval.metrics import mean_dicts

    rng = random.Random(f"compare/inpaint/{args.seed}")
    records = [r for r in records if len(mdm.tokenizer.encode(r["captions"][0])) <= mdm.layout.caption_len]
    targets = [rng.choice(r["meta"]["objects"]) for r in records]
    size = mdm.vq.image_size
    scores: dict[str, list[dict]] = defaultdict(list)
    regenerated: list[int] = []
    for b, idx in batches(range(len(records)), args.batch_size):
        recs, objs = [records[i] for i in idx], [targets[i] for i in idx]
        images, prompts = stack_images(recs), [r["captions"][0] for r in recs]
        masks = torch.stack([cell_mask(o["cell"], size) for o in objs])
        runs = {"mdm": mdm.inpaint(images, masks, prompt=prompts, seed=args.seed + b).images,
                "mdm_no_prompt": mdm.inpaint(images, masks, prompt=None, seed=args.seed + b).images}
        runs["ar_suffix"], n = ar_inpaint(ar, images, masks, prompts, args.seed + b)
        regenerated += n
        with torch.no_grad():
            runs["vq_reconstruction"] = mdm.vq.decode(mdm.encode_images(images)).cpu()
        for name, out in runs.items():
            scores[name] += object_scores(out, recs, objs)
    masked_tokens = [int(mdm.token_mask(cell_mask(o["cell"], size)).sum()) for o in targets]
    keys = ("object", "color", "shape", "size", "scene")
    result = {name: {**dict.fromkeys(keys), **mean_dicts(scores[name]), "n": len(scores[name])}
              for name in ("mdm", "mdm_no_prompt", "ar_suffix", "vq_reconstruction")}
    result["tokens_regenerated"] = {"mdm": sum(masked_tokens) / max(len(targets), 1),
                                    "ar_suffix": sum(regenerated) / max(len(regenerated), 1)}
    return result


# ---------------------------------------------------------------------------------------------
# report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


QUALITY_ROWS: tuple[tuple[str, str], ...] = (
    ("vqa_accuracy", "VQA accuracy"), ("caption_exact_match", "caption exact match"),
    ("caption_attribute_f1", "caption attribute F1 (whole object)"), ("caption_bleu4", "caption BLEU-4"),
    ("t2i_all_correct", "text-to-image all-correct"),
    ("t2i_all_correct_unguided", "text-to-image all-correct, no guidance"),
    ("t2i_object", "text-to-image objects right"), ("t2i_oracle_on_vq_reconstruction", "oracle on VQ reconstructions"),
    ("nll", "held-out NLL / target token"), ("nll_t2i", "NLL, text-to-image"), ("nll_caption", "NLL, caption"),
    ("nll_vqa", "NLL, VQA"), ("nll_joint", "NLL, joint"),
    ("vqa_nfe", "VQA NFE per call"), ("vqa_s_per_sample", "VQA seconds per answer"),
    ("t2i_nfe", "text-to-image NFE per call"), ("t2i_s_per_sample", "text-to-image seconds per image"),
)


def _quality_md(q: dict) -> list[str]:
    mdm, ar = q["mdm"]["summary"], q["ar"]["summary"]
    rows = []
    for key, title in QUALITY_ROWS:
        if key not in mdm and key not in ar:
            continue
        fmt = _pct if key.startswith(("vqa_acc", "caption_exact", "t2i_all", "t2i_object", "t2i_oracle")) else (
            lambda v: "-" if v is None else f"{v:.4g}")
        rows.append([title, fmt(mdm.get(key)), fmt(ar.get(key))])
    note = (f"NLL: MDM = {mdm.get('nll_bound', '?')}, AR = {ar.get('nll_bound', '?')}. Text-to-image uses guidance "
            f"{q['guidance']} for the MDM; the AR sampler has none (the unguided MDM row compares like for like).")
    return ["## Quality (pipeline defaults)", ""] + md_table(["metric", "MDM", "AR"], rows) + ["", note, ""]


def _tradeoff_md(points: list[dict]) -> list[str]:
    rows = []
    for p in points:
        asked = p.get("requested_steps")
        setting = p["setting"] + (f" (asked {','.join(map(str, asked))})" if asked and asked != [p["steps"]] else "")
        rows.append([{"vqa": "VQA", "t2i": "text-to-image"}[p["task"]], p["family"], setting, f"{p['nfe']:.3g}",
                     f"{p['seconds_per_sample'] * 1e3:.3g}", _pct(p["accuracy"])])
    return (["## Speed / quality trade-off", ""]
            + md_table(["task", "family", "setting", "NFE", "ms / sample", "accuracy"], rows)
            + ["", "Step counts above the target region are capped at it (one token per step at most). "
               "Plots: accuracy_vs_nfe.png, accuracy_vs_time.png.", ""])


def _probes_md(p: dict) -> list[str]:
    ti, ci, rv, ip = p["text_infill"], p["caption_infill"], p["reversal"], p["inpaint"]
    kinds = sorted(ti["mdm"]["per_kind"])

    def kind_row(name: str, r: dict) -> list[str]:
        return [name, _pct(r["accuracy"])] + [_pct(r["per_kind"].get(k, {}).get("accuracy")) for k in kinds]

    lines = ["## What only diffusion does", "", f"**Text infilling** (one attribute word of a val caption blanked; "
             f"n = {ti['mdm']['n']}): restored exactly.", ""]
    lines += md_table(["model (context)", "all", *kinds], [
        kind_row("MDM (both sides)", ti["mdm"]), kind_row("MDM (left only)", ti["mdm_left_only"]),
        kind_row("AR (left only)", ti["ar_left_only"]),
        ["chance (uniform guess)", "-"] + [_pct(ti["chance"].get(k)) for k in kinds]])
    lines += ["", "Text alone does not determine a colour, shape or size: those columns stay near chance for "
              "every model; position words are constrained by the preposition and the raster order of objects.", "",
              f"**Caption infilling given the image** (same blanks, captioning prompt; n = {ci['mdm']['n']}).", ""]
    lines += md_table(["model (context)", "all", *kinds], [kind_row("MDM (image + both sides)", ci["mdm"]),
                                                          kind_row("AR (image + left side)", ci["ar_left_only"])])
    lines += ["", f"**Image inpainting** (one object's cell blanked, caption as prompt; n = {ip['mdm']['n']}): the "
              "oracle reads the object back (colour, shape, size) and the whole scene.", ""]
    names = {"mdm": "MDM, caption prompt", "mdm_no_prompt": "MDM, no prompt",
             "ar_suffix": "AR: regenerates every token from the first blanked one",
             "vq_reconstruction": "ceiling: VQ reconstruction, nothing blanked"}
    lines += md_table(["run", "object right", "colour", "shape", "size", "whole scene right"],
                      [[title, *(_pct(ip[k][a]) for a in ("object", "color", "shape", "size", "scene"))]
                       for k, title in names.items()])
    t = ip["tokens_regenerated"]
    lines += ["", f"Tokens regenerated per image: MDM {t['mdm']:.3g}, AR {t['ar_suffix']:.3g}.", "",
              f"**Reversal** (the first object phrase of a two-object caption blanked; n = {rv['mdm']['n']}).", ""]
    lines += md_table(["model (context)", "valid", "consistent with the later words", "exact (chance level)"],
                      [[title, *(_pct(rv[k][a]) for a in ("valid", "consistent", "exact"))]
                       for k, title in (("mdm", "MDM (the words after)"), ("mdm_left_only", "MDM (nothing after)"),
                                        ("ar_left_only", "AR (nothing: left context only)"))])
    return lines + [""]


def render_markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    head = ["# MDM vs AR: quality, speed/quality, diffusion-only tasks", "", f"`{result['command']}`", "",
            f"- MDM: `{result['mdm']}`; AR: `{result['ar']}`; shards `{result['shards']}`, "
            f"{result['records']} val records; batch {result['settings']['batch_size']}, "
            f"seed {result['settings']['seed']}",
            f"- machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} ({m['torch_threads']} threads), "
            f"device {m['device']}{', ' + m['gpu'] if m.get('gpu') else ''}, load average {load_text(m)} at the start; "
            f"run took {result['seconds']:.0f} s", ""]
    return "\n".join(head + _quality_md(result["quality"]) + _tradeoff_md(result["tradeoff"])
                     + _probes_md(result["probes"])) + "\n"


# ---------------------------------------------------------------------------------------------
# command line


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if any(not 0 < v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"thresholds must lie in (0, 1), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mdm", required=True, help="masked-diffusion model folder")
    parser.add_argument("--ar", required=True, help="its causal twin (same data, size and steps)")
    parser.add_argument("--shards", required=True, help="val shards: glob, brace pattern, folder or comma list")
    parser.add_argument("--out", required=True, help="folder for compare.json, compare.md and the plots")
    parser.add_argument("--limit", type=positive_int, help="val records (the first, in shard order); all if absent")
    parser.add_argument("--steps", type=int_list, default=[4, 8, 16, 32, 64], help="MDM step counts of the sweep")
    parser.add_argument("--thresholds", type=float_list, default=[0.7, 0.8, 0.9, 0.95],
                        help="MDM threshold-decoding confidences of the sweep")
    parser.add_argument("--guidance", type=float, default=2.0, help="MDM classifier-free guidance of text-to-image")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="samples per model call (both models)")
    parser.add_argument("--nll-draws", type=positive_int, default=4, help="(t, mask) draws of the MDM's NLL bound")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison; write compare.json, compare.md and the two plots; returns the result."""
    from mmdlm.eval.records import load_records

    parser = build_parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        mdm, ar = load_pair(args.mdm, args.ar, args.device)
        records = load_records(args.shards, mdm.vq.image_size, args.limit)
    except (OSError, ValueError, KeyError) as err:
        parser.error(str(err))
    if any(r["meta"].get("source") != "shapes" for r in records):
        parser.error("the probes need shapes-world records (meta.source == 'shapes')")
    torch.manual_seed(args.seed)

    def say(what: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:7.1f} s] {what}", flush=True)

    machine = machine_info(mdm.device)  # before the run: its load average is the other work's
    for pipe in (mdm, ar):
        warm_up(pipe, records)
    say("quality")
    q = {"mdm": quality(mdm, records, args), "ar": quality(ar, records, args), "guidance": args.guidance}
    say("trade-off")
    points = tradeoff(mdm, q["ar"]["summary"], records, args)
    say("probes")
    blanks = attribute_blanks(mdm, records, args.seed)
    probes = {"text_infill": probe_text_infill(mdm, ar, blanks, args),
              "caption_infill": probe_caption_infill(mdm, ar, blanks, records, args),
              "inpaint": probe_inpaint(mdm, ar, records, args), "reversal": probe_reversal(mdm, ar, records, args)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line("benchmarks.compare", argv), "mdm": str(Path(args.mdm).resolve()),
              "ar": str(Path(args.ar).resolve()), "shards": args.shards, "records": len(records),
              "machine": machine,
              "settings": {k: v for k, v in vars(args).items() if k not in ("mdm", "ar", "shards", "out", "quiet")},
              "quality": q, "tradeoff": points, "probes": probes, "seconds": time.perf_counter() - started}
    plots = [plot_tradeoff(points, "nfe", out / "accuracy_vs_nfe.png"),
             plot_tradeoff(points, "seconds_per_sample", out / "accuracy_vs_time.png")]
    (out / "compare.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "compare.md").write_text(render_markdown(result))
    say(f"wrote {out / 'compare.json'}, {out / 'compare.md'}, {', '.join(str(p) for p in plots)}")
    return result


if __name__ == "__main__":
    main()
