"""Evaluation of an mmdlm model on held-out shards: VQA, captioning, text-to-image, joint generation, NLL.

    python -m mmdlm.evaluate --model runs/quickstart/model --shards 'data/shards/shapes/val/*.tar' \\
        --out metrics.json --report report.md --samples samples.png --limit 300
    python -m mmdlm.evaluate --model DIR --shards 'data/shards/digits/val/*.tar' --out m.json --device cpu \\
        --tasks vqa,t2i --steps 8 --guidance 3 --batch-size 32

The world (shapes or digits) is read from the records' `meta["source"]`; records of any other source (a
user's own captioned shards, img2dataset's layout) are evaluated as plain captioned images (`CaptionsWorld`):
held-out NLL, VQA where records carry `qa`, captions against their references (exact match, BLEU-4, CIDEr-D),
and text-to-image only with a scorer the user plugs in (`--scorer module:function`, see `load_scorer`).
Every metric is computed on
the first `--limit` val records in shard order (all records without it), so two models evaluated with
the same arguments see the same inputs. The masked-diffusion model and its causal AR twin go through
the same code: only the sampler behind `MMDLMPipeline` and the NLL (a bound vs exact) differ.

Metrics (`metrics.json`, one section per task; rates are in [0, 1]):
- vqa: exact match of the answer after strip/lower, overall and per question type (`qa[i]["type"]`).
  A question longer than the model's question region cannot be asked: it counts as wrong (`too_long`).
- caption: exact match with the canonical caption (`captions[0]`, case/space/final period ignored),
  BLEU-4 (torchmetrics) against all of the record's captions, and for the shapes world per-attribute
  precision / recall / F1 of the objects the caption describes (see `ShapesWorld.caption_counts`).
- t2i: the prompt is the canonical caption; the generated image is read back by the world's scorer
  (shapes: `mmdlm.worlds.oracle.score_image`, GenEval-style: `all_correct` = exactly the described objects
  with the right colour/shape/size/cell and nothing else, per-attribute rates over the described
  objects, and `extra_objects`, the mean count of objects drawn in empty cells; digits: a k-NN
  classifier, `mmdlm.worlds.digits_scorer`). The same scorer on the ground-truth val images and on their
  VQ reconstructions decode(encode(x)) gives the scorer's accuracy and the ceiling text-to-image can
  reach through this tokenizer.
- joint: n image+caption samples from nothing: the share of captions that parse, and of samples whose
  caption describes exactly the scene the scorer reads in the image (`agreement`).
- nll: held-out NLL per target token over the same sequences for both models: every val record laid
  out under every task of `NLL_TASKS` by `SequenceBuilder` (same seed). MDM: the ELBO bound of
  `masked_diffusion_loss` averaged over `nll_draws` draws of (t, mask); AR: the exact NLL of `ar_loss`.
- every task: `cost`, the forward passes per sampler call (NFE), the calls, and seconds per sample
  at the stated batch size (model time only; scoring excluded).

Python: `evaluate(pipe, shards, tasks, limit, ...) -> dict`; the per-task functions (`eval_vqa`,
`eval_caption`, `eval_t2i`, `eval_scorer`, `eval_joint`, `eval_nll`) take a pipeline, records and a
`SamplerConfig` (None = the pipeline's default for the task), so a benchmark can sweep steps / threshold /
guidance. The command line's sampler flags (`mmdlm.sampling.arguments`) change every task's default,
except guidance, which only text-to-image has (the other tasks have no condition to drop).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from mmdlm.sampling.arguments import add_sampler_arguments, sampler_overrides

if TYPE_CHECKING:  # the pipeline (and with it the model stack) loads lazily: `--help` answers at once
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.sampling import SamplerConfig

ALL_TASKS: tuple[str, ...] = ("vqa", "caption", "t2i", "joint", "nll")
NLL_TASKS: tuple[str, ...] = ("t2i", "caption", "vqa", "joint")  # Task names laid out for the NLL
ATTRIBUTES: tuple[str, ...] = ("cell", "color", "shape", "size", "object")  # object = all of them
N_EXAMPLES = 6  # examples per task kept for the report and samples.png


# ---------------------------------------------------------------------------------------------
# options, costs, results


# evaluation task -> the pipeline task whose default sampler it uses (`MMDLMPipeline.sampler`)
PIPELINE_TASK: dict[str, str] = {"vqa": "answer", "caption": "caption", "t2i": "text_to_image", "joint": "joint",
                                 "edit": "edit", "what_changed": "answer"}
GUIDED_TASKS = ("t2i", "edit")  # the tasks whose --guidance flags apply: an image drawn from a condition


@dataclass
class Cost:
    """Forward passes and wall-clock of the model calls of one task."""

    batch_size: int
    nfe: list[int] = field(default_factory=list)  # per call
    seconds: float = 0.0
    samples: int = 0

    def add(self, nfe: int, seconds: float, samples: int) -> None:
        self.nfe.append(int(nfe))
        self.seconds += seconds
        self.samples += samples

    def to_dict(self) -> dict:
        calls = len(self.nfe)
        return {"nfe_per_call": sum(self.nfe) / max(calls, 1), "calls": calls, "nfe_total": sum(self.nfe),
                "samples": self.samples, "batch_size": self.batch_size, "seconds": round(self.seconds, 3),
                "seconds_per_sample": self.seconds / max(self.samples, 1)}


@dataclass
class Example:
    """One shown sample: an image and the text under it (prompt, caption, question and answers)."""

    image: torch.Tensor  # Float[3, H, W] in [0, 1]
    text: str


@dataclass
class TaskResult:
    metrics: dict  # JSON-serialisable
    examples: list[Example] = field(default_factory=list)


@dataclass
class Evaluation:
    metrics: dict  # the content of metrics.json
    examples: dict[str, list[Example]]  # task -> examples for samples.png


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """`with _Timer(device) as t: ...; t.seconds` (synchronises CUDA so the time is the work's)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> _Timer:
        _sync(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync(self.device)
        self.seconds = time.perf_counter() - self._start


def _batches(items: Sequence, size: int) -> Iterator[tuple[int, Sequence]]:
    """(batch index, items) in chunks of `size`."""
    for b, start in enumerate(range(0, len(items), size)):
        yield b, items[start : start + size]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="sample", disable=not enabled, leave=False)


def mean_dicts(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of numeric dicts (all with the same keys)."""
    if not rows:
        return {}
    return {k: float(sum(float(r[k]) for r in rows) / len(rows)) for k in rows[0]}


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / max(len(flags), 1)


def normalize(text: str) -> str:
    """Lower case, single spaces, no final period: how captions are compared for exact match."""
    return " ".join(text.lower().split()).rstrip(" .")


def prf(tp: float, n_pred: float, n_true: float) -> dict[str, float]:
    """Precision, recall, F1 from counts (0 where a denominator is 0)."""
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


# ---------------------------------------------------------------------------------------------
# worlds: how captions and images of a data source are scored


class World(Protocol):
    """What the task evaluators need to know about a data source."""

    source: str
    scorer: str | None  # what reads images: "oracle", "digits classifier"; None: text-to-image is not scored
    image_keys: tuple[str, ...]  # the keys of `score_images`' dicts

    def caption_counts(self, text: str, record: dict) -> dict[str, Any]:
        """Per-record counts of a generated caption, summed/averaged by `caption_summary` (a world with a
        corpus-level metric, as CIDEr-D, also keeps the text and its references)."""
        ...

    def caption_summary(self, counts: Sequence[dict[str, Any]]) -> dict:
        """Dataset-level caption metrics from the per-record counts."""
        ...

    def score_images(self, images: torch.Tensor, records: Sequence[dict]) -> list[dict[str, float]]:
        """How well each image (Float[B,3,H,W]) shows its record's scene: rates in [0, 1]."""
        ...

    def read_caption(self, text: str) -> Hashable | None:
        """The scene a caption describes (comparable with `read_images`), or None if unparseable."""
        ...

    def read_images(self, images: torch.Tensor) -> list[Hashable | None]:
        """The scene each image shows, or None where the scorer cannot read one."""
        ...


class ShapesWorld:
    """Shapes scenes: captions parsed by `mmdlm.worlds.shapes.parse_caption`, images read by `mmdlm.worlds.oracle`."""

    source = "shapes"
    scorer = "oracle"
    image_keys = ("all_correct", "count_correct", *ATTRIBUTES, "extra_objects")

    def caption_counts(self, text: str, record: dict) -> dict[str, float]:
        """Counts for per-attribute precision / recall of a caption against the record's scene graph.

        The caption is parsed into objects (an unparseable caption describes no objects). Each
        predicted object is matched to the true object in the same cell, if any; then for attribute
        `a` it is a true positive when that true object exists and agrees on `a` (`cell`: the cell
        holds a true object; `object`: colour, shape and size all agree, the whole-object match).
        precision_a = TP_a / predicted objects, recall_a = TP_a / true objects, both summed over the
        records (micro average); F1 their harmonic mean.
        """
        from mmdlm.worlds.shapes import parse_caption, scene_key

        truth = record["meta"]["objects"]
        parsed = parse_caption(text)
        pred = parsed or []
        by_cell = {o["cell"]: o for o in truth}
        counts = {"exact": float(normalize(text) == normalize(record["captions"][0])),
                  "parsed": float(parsed is not None),
                  "scene": float(parsed is not None and scene_key(parsed) == scene_key(truth)),
                  "n_pred": float(len(pred)), "n_true": float(len(truth))}
        for attr in ATTRIBUTES:
            counts[f"tp_{attr}"] = float(sum(_same(p, by_cell.get(p["cell"]), attr) for p in pred))
        return counts

    def caption_summary(self, counts: Sequence[dict[str, float]]) -> dict:
        total = defaultdict(float)
        for c in counts:
            for k, v in c.items():
                total[k] += v
        n = max(len(counts), 1)
        return {"exact_match": total["exact"] / n, "parse_rate": total["parsed"] / n,
                "scene_match": total["scene"] / n,
                "per_attribute": {a: prf(total[f"tp_{a}"], total["n_pred"], total["n_true"]) for a in ATTRIBUTES},
                "all_attributes_f1": prf(total["tp_object"], total["n_pred"], total["n_true"])["f1"]}

    def score_images(self, images: torch.Tensor, records: Sequence[dict]) -> list[dict[str, float]]:
        from mmdlm.worlds.oracle import score_image

        rows = []
        for image, record in zip(images, records):
            s = score_image(record["meta"]["objects"], image)
            rows.append({"all_correct": float(s["all_correct"]), "count_correct": float(s["count_correct"]),
                         **{a: float(s[a]) for a in ATTRIBUTES}, "extra_objects": float(s["extra"])})
        return rows

    def read_caption(self, text: str) -> Hashable | None:
        from mmdlm.worlds.shapes import parse_caption, scene_key

        parsed = parse_caption(text)
        return None if parsed is None else scene_key(parsed)

    def read_images(self, images: torch.Tensor) -> list[Hashable | None]:
        from mmdlm.worlds.oracle import read_scene
        from mmdlm.worlds.shapes import SHAPES, scene_key

        scenes = [read_scene(image) for image in images]
        return [scene_key(s) if s and all(o["shape"] in SHAPES for o in s) else None for s in scenes]


def _same(pred: dict, true: dict | None, attr: str) -> bool:
    """Whether a predicted object agrees with the true object of its cell on `attr` (see caption_counts)."""
    if true is None:
        return False
    if attr == "object":
        return all(pred[a] == true[a] for a in ("color", "shape", "size"))
    return pred[attr] == true[attr]


@lru_cache(maxsize=1)
def _digit_words() -> re.Pattern:
    from mmdlm.worlds.shapes import NUMBERS

    return re.compile(r"\b(" + "|".join(NUMBERS) + r")\b")


def parse_digit(text: str) -> int | None:
    """The one digit a caption names ('a handwritten digit seven' -> 7); None for none or several."""
    from mmdlm.worlds.shapes import NUMBERS

    found = {NUMBERS.index(w) for w in _digit_words().findall(text.lower())}
    return found.pop() if len(found) == 1 else None


class DigitsWorld:
    """Handwritten digits: captions name a digit; images are read by `mmdlm.worlds.digits_scorer`.

    The classifier is fitted leaving out the scans being evaluated (keys `digits-<index>`), so its
    accuracy on the val images is a held-out one.
    """

    source = "digits"
    scorer = "digits classifier"
    image_keys = ("all_correct", "digit")

    def __init__(self, records: Sequence[dict], image_size: int) -> None:
        from mmdlm.worlds.digits_scorer import index_of_key, load_or_fit

        held_out = [i for r in records if (i := index_of_key(r["__key__"])) is not None]
        self.classifier = load_or_fit(image_size, held_out)

    def caption_counts(self, text: str, record: dict) -> dict[str, float]:
        digit = parse_digit(text)
        return {"exact": float(normalize(text) == normalize(record["captions"][0])),
                "parsed": float(digit is not None), "digit": float(digit == record["meta"]["label"])}

    def caption_summary(self, counts: Sequence[dict[str, float]]) -> dict:
        m = mean_dicts(counts)
        return {"exact_match": m.get("exact", 0.0), "parse_rate": m.get("parsed", 0.0),
                "digit_accuracy": m.get("digit", 0.0)}

    def score_images(self, images: torch.Tensor, records: Sequence[dict]) -> list[dict[str, float]]:
        pred = self.classifier.predict(images).tolist()
        return [{"all_correct": float(p == r["meta"]["label"]), "digit": float(p == r["meta"]["label"])}
                for p, r in zip(pred, records)]

    def read_caption(self, text: str) -> Hashable | None:
        return parse_digit(text)

    def read_images(self, images: torch.Tensor) -> list[Hashable | None]:
        return self.classifier.predict(images).tolist()


ImageScorer = Callable[[torch.Tensor, Sequence[dict]], list[dict[str, float]]]
"""(images Float[B, 3, H, W] in [0, 1], their records) -> one dict of rates in [0, 1] per image, with at least
`all_correct` (does the image show its record's caption?): a user's text-to-image scorer."""


def cider(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """CIDEr-D (Vedantam et al. 2015) of the candidates against their references, as the COCO caption
    evaluation computes it (pycocoevalcap), on `normalize`d text."""
    from pycocoevalcap.cider.cider import Cider

    res = {i: [normalize(c) or "."] for i, c in enumerate(candidates)}  # an empty caption scores 0, not a crash
    gts = {i: [normalize(r) for r in refs] for i, refs in enumerate(references)}
    score, _ = Cider().compute_score(gts, res)
    return float(score)


class CaptionsWorld:
    """Plain captioned images (any data source without a world of its own): captions are scored against the
    record's captions (exact match; BLEU-4 is `eval_caption`'s; CIDEr-D), text-to-image by the user's
    `scorer` when one is given, joint generation not at all (nothing reads a scene from both sides)."""

    source = "captions"

    def __init__(self, scorer: ImageScorer | None = None, name: str | None = None) -> None:
        self.image_scorer = scorer
        self.scorer = name if scorer is not None else None  # None: text-to-image is not scored
        self.image_keys: tuple[str, ...] = ("all_correct",)

    def caption_counts(self, text: str, record: dict) -> dict[str, Any]:
        return {"exact": float(normalize(text) in {normalize(c) for c in record["captions"]}),
                "text": text, "refs": record["captions"]}

    def caption_summary(self, counts: Sequence[dict]) -> dict:
        return {"exact_match": sum(c["exact"] for c in counts) / max(len(counts), 1),
                "cider": cider([c["text"] for c in counts], [c["refs"] for c in counts]) if counts else 0.0}

    def score_images(self, images: torch.Tensor, records: Sequence[dict]) -> list[dict[str, float]]:
        if self.image_scorer is None:
            raise ValueError("no image scorer for this data: pass one (--scorer module:function)")
        scores = self.image_scorer(images, records)
        if len(scores) != len(records) or not all("all_correct" in s for s in scores):
            raise ValueError(f"the scorer {self.scorer!r} must return one dict with 'all_correct' per image")
        self.image_keys = tuple(scores[0]) if scores else self.image_keys
        return scores

    def read_caption(self, text: str) -> Hashable | None:
        return None

    def read_images(self, images: torch.Tensor) -> list[Hashable | None]:
        return [None] * len(images)


def load_callable(spec: str, what: str) -> Callable:
    """`module:function` -> that callable; a ValueError naming `what` (e.g. "scorer") and what is wrong."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"a {what} is given as module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot load the {what} {spec!r}: {err}") from err
    if not callable(fn):
        raise ValueError(f"the {what} {spec!r} is not callable")
    return fn


def load_scorer(spec: str) -> ImageScorer:
    """`module:function` -> that callable (an `ImageScorer`); ValueError naming what is wrong."""
    return load_callable(spec, "scorer")


WORLDS: dict[str, Callable[[Sequence[dict], int], World]] = {
    "shapes": lambda records, image_size: ShapesWorld(),
    "digits": DigitsWorld,
}


def world_for(records: Sequence[dict], image_size: int, scorer: str | None = None) -> World:
    """The world of the records, from `meta["source"]` (all records must share it); a source without a world
    of its own is `CaptionsWorld`, scoring text-to-image with `scorer` (module:function) when given."""
    sources = {(r.get("meta") or {}).get("source") for r in records}
    if len(sources) != 1:
        raise ValueError(f"records mix data sources {sorted(map(str, sources))}; evaluate one at a time")
    source = sources.pop()
    if source not in WORLDS:
        return CaptionsWorld(load_scorer(scorer), scorer) if scorer else CaptionsWorld()
    if scorer:
        raise ValueError(f"--scorer is for data without a world of its own; {source!r} is scored by its own")
    return WORLDS[source](records, image_size)


# ---------------------------------------------------------------------------------------------
# records


def load_records(shards: str | Sequence[str], image_size: int, limit: int | None = None) -> list[dict]:
    """The first `limit` Records of the shards (all if None), in shard order, with images decoded.

    Raises FileNotFoundError when the pattern matches nothing, ValueError when the shards hold no record.
    """
    from itertools import islice

    from mmdlm.data import expand_shards, record_pipeline

    urls = expand_shards(shards)
    records = list(islice(record_pipeline(urls, image_size, load_images=True, load_codes=False), limit))
    if not records:
        raise ValueError(f"the shards {shards!r} hold no readable record")
    return records


def stack_images(records: Sequence[dict]) -> torch.Tensor:
    """Float[B, 3, H, W]: the decoded images of `load_records` records."""
    return torch.stack([r["image"] for r in records])  # (B, 3, H, W)


def _fits(pipe: MMDLMPipeline, text: str, limit: int) -> bool:
    return len(pipe.tokenizer.encode(text)) <= limit


# ---------------------------------------------------------------------------------------------
# tasks


def eval_vqa(pipe: MMDLMPipeline, records: Sequence[dict], sampler: SamplerConfig | None = None,
             batch_size: int = 64, seed: int = 0, progress: bool = True,
             options: Mapping[str, Any] | None = None) -> TaskResult:
    """VQA accuracy (exact match after strip/lower) over every QA pair of the records, per type too.
    `options`: further keyword arguments of `pipe.answer` (`draft=`, `revision=`)."""
    pairs = [(r, qa) for r in records for qa in r.get("qa") or []]
    askable = [(r, qa) for r, qa in pairs if _fits(pipe, qa["question"], pipe.layout.question_len)]
    cost = Cost(batch_size)
    answers: dict[int, str] = {}  # id(qa) -> predicted answer
    with _progress(len(askable), "vqa", progress) as bar:
        for b, chunk in _batches(askable, batch_size):
            with _Timer(pipe.device) as t:
                out = pipe.answer(stack_images([r for r, _ in chunk]), [qa["question"] for _, qa in chunk],
                                  seed=seed + b, sampler=sampler, **(options or {}))
            cost.add(out.nfe, t.seconds, len(chunk))
            answers.update({id(qa): text for (_, qa), text in zip(chunk, out.texts)})
            bar.update(len(chunk))
    by_type: dict[str, list[float]] = defaultdict(list)
    for _, qa in pairs:
        predicted = answers.get(id(qa))
        right = predicted is not None and predicted.strip().lower() == qa["answer"].strip().lower()
        by_type[qa.get("type", "unknown")].append(float(right))
    first_per_record = list({r["__key__"]: (r, qa) for r, qa in reversed(askable)}.values())[::-1]
    shown = [{"key": r["__key__"], "question": qa["question"], "predicted": answers[id(qa)], "answer": qa["answer"]}
             for r, qa in first_per_record[:N_EXAMPLES]]
    examples = [Example(r["image"], f"Q: {qa['question']}\npred: {answers[id(qa)]} | true: {qa['answer']}")
                for r, qa in first_per_record[:N_EXAMPLES]]
    scores = [s for v in by_type.values() for s in v]
    metrics = {"accuracy": sum(scores) / max(len(scores), 1), "n": len(scores),
               "too_long": len(pairs) - len(askable),
               "per_type": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_type.items())},
               "cost": cost.to_dict(), "examples": shown}
    return TaskResult(metrics, examples)


def eval_caption(pipe: MMDLMPipeline, records: Sequence[dict], sampler: SamplerConfig | None = None,
                 batch_size: int = 64, seed: int = 0, progress: bool = True,
                 world: World | None = None, options: Mapping[str, Any] | None = None) -> TaskResult:
    """Captioning: exact match, BLEU-4 and the world's caption scores (shapes: per-attribute P/R/F1).
    `options`: further keyword arguments of `pipe.caption` (`draft=`, `revision=`)."""
    from torchmetrics.text import BLEUScore

    world = world or world_for(records, pipe.vq.image_size)
    cost = Cost(batch_size)
    texts: list[str] = []
    with _progress(len(records), "caption", progress) as bar:
        for b, chunk in _batches(records, batch_size):
            with _Timer(pipe.device) as t:
                out = pipe.caption(stack_images(chunk), seed=seed + b, sampler=sampler, **(options or {}))
            cost.add(out.nfe, t.seconds, len(chunk))
            texts += out.texts
            bar.update(len(chunk))
    counts = [world.caption_counts(text, r) for text, r in zip(texts, records)]
    bleu = BLEUScore(n_gram=4)([normalize(t) for t in texts], [[normalize(c) for c in r["captions"]] for r in records])
    shown = [{"key": r["__key__"], "predicted": t, "caption": r["captions"][0]}
             for t, r in zip(texts[:N_EXAMPLES], records)]
    metrics = {**world.caption_summary(counts), "bleu4": float(bleu), "n": len(records),
               "cost": cost.to_dict(), "examples": shown}
    examples = [Example(r["image"], f"generated: {t}\ntrue: {r['captions'][0]}")
                for t, r in zip(texts[:N_EXAMPLES], records)]
    return TaskResult(metrics, examples)


def eval_t2i(pipe: MMDLMPipeline, records: Sequence[dict], sampler: SamplerConfig | None = None,
             batch_size: int = 64, seed: int = 0, progress: bool = True, world: World | None = None,
             scorer_ceiling: bool = True, options: Mapping[str, Any] | None = None) -> TaskResult:
    """Text-to-image from each record's canonical caption, scored by the world's scorer (see module doc).
    `options`: further keyword arguments of `pipe.text_to_image` (`best_of=`, `draft=`, `revision=`).

    A prompt longer than the model's caption region cannot be given: it scores 0 (`too_long`).
    With `scorer_ceiling`, also the scorer on the ground-truth images and their VQ reconstructions.
    Data without a scorer (a `CaptionsWorld` given none) is not scored: `skipped` says why.
    """
    world = world or world_for(records, pipe.vq.image_size)
    if world.scorer is None:
        return TaskResult({"skipped": "no image scorer for this data (pass --scorer module:function)",
                           "n": 0})
    prompts = [r["captions"][0] for r in records]
    usable = [i for i, p in enumerate(prompts) if _fits(pipe, p, pipe.layout.caption_len)]
    cost = Cost(batch_size)
    scores: dict[int, dict[str, float]] = {}
    examples: list[Example] = []
    with _progress(len(usable), "t2i", progress) as bar:
        for b, chunk in _batches(usable, batch_size):
            with _Timer(pipe.device) as t:
                out = pipe.text_to_image([prompts[i] for i in chunk], seed=seed + b, sampler=sampler,
                                         **(options or {}))
            cost.add(out.nfe, t.seconds, len(chunk))
            batch_records = [records[i] for i in chunk]
            scores.update(zip(chunk, world.score_images(out.images, batch_records)))
            examples += [Example(img, prompts[i]) for img, i in zip(out.images, chunk)][: N_EXAMPLES - len(examples)]
            bar.update(len(chunk))
    zero = dict.fromkeys(world.image_keys, 0.0)
    metrics = {**mean_dicts([scores.get(i, zero) for i in range(len(records))]), "n": len(records),
               "too_long": len(records) - len(usable), "scorer": world.scorer, "cost": cost.to_dict()}
    if scorer_ceiling:
        ceiling = eval_scorer(pipe, records, world, batch_size)
        metrics["scorer_on_ground_truth"] = ceiling["ground_truth"]
        metrics["scorer_on_reconstructions"] = ceiling["reconstructions"]
    return TaskResult(metrics, examples)


@torch.no_grad()
def eval_scorer(pipe: MMDLMPipeline, records: Sequence[dict], world: World | None = None,
                batch_size: int = 64) -> dict[str, dict[str, float]]:
    """The image scorer on the ground-truth images (its own accuracy) and on their VQ reconstructions
    decode(encode(x)) (the most text-to-image can reach through this tokenizer)."""
    world = world or world_for(records, pipe.vq.image_size)
    truth, recon = [], []
    for _, chunk in _batches(records, batch_size):
        images = stack_images(chunk)
        truth += world.score_images(images, chunk)
        rebuilt = pipe.vq.decode(pipe.encode_images(images)).cpu()  # (B, 3, H, W)
        recon += world.score_images(rebuilt, chunk)
    return {"ground_truth": mean_dicts(truth), "reconstructions": mean_dicts(recon)}


def eval_joint(pipe: MMDLMPipeline, n: int, world: World, sampler: SamplerConfig | None = None,
               batch_size: int = 64, seed: int = 0, progress: bool = True) -> TaskResult:
    """`n` image+caption pairs from nothing: parseable captions, readable images, and their agreement (only
    where the world reads scenes from both captions and images: shapes, digits)."""
    if isinstance(world, CaptionsWorld):
        return TaskResult({"skipped": "joint generation is scored by a world that reads scenes (shapes, digits)",
                           "n": 0})
    cost = Cost(batch_size)
    parsed, readable, agree = [], [], []
    examples: list[Example] = []
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    with _progress(n, "joint", progress) as bar:
        for b, k in enumerate(sizes):
            with _Timer(pipe.device) as t:
                out = pipe.generate_joint(k, seed=seed + b, sampler=sampler)
            cost.add(out.nfe, t.seconds, k)
            said = [world.read_caption(c) for c in out.captions]
            seen = world.read_images(out.images)
            parsed += [s is not None for s in said]
            readable += [s is not None for s in seen]
            agree += [s is not None and s == v for s, v in zip(said, seen)]
            examples += [Example(img, c) for img, c in zip(out.images, out.captions)][: N_EXAMPLES - len(examples)]
            bar.update(k)
    metrics = {"agreement": _rate(agree), "parse_rate": _rate(parsed), "image_readable_rate": _rate(readable),
               "n": n, "scorer": world.scorer, "cost": cost.to_dict(),
               "examples": [e.text for e in examples]}
    return TaskResult(metrics, examples)


@torch.no_grad()
def eval_nll(pipe: MMDLMPipeline, records: Sequence[dict], tasks: Sequence[str] = NLL_TASKS, draws: int = 4,
             batch_size: int = 64, seed: int = 0, progress: bool = True) -> TaskResult:
    """Held-out NLL per target token (MDM: ELBO bound averaged over `draws`; AR: exact), per task too.

    Every record is laid out under every task it can do (`SequenceBuilder(..., seed)`), one task per
    batch, so both models are scored on identical sequences. Image codes come from the pipeline's VQ.
    """
    from mmdlm.diffusion import ar_loss, masked_diffusion_loss
    from mmdlm.sequence import SequenceBuilder, Task, collate

    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    exact = pipe.is_autoregressive
    draws = 1 if exact else draws
    generator = torch.Generator(device=pipe.device).manual_seed(seed)

    def nll_sum(batch) -> tuple[float, int]:
        """(NLL summed over the batch's target tokens, their number), averaged over the draws."""
        outs = [ar_loss(pipe.model, batch) if exact else
                masked_diffusion_loss(pipe.model, batch, pipe.vocab, generator=generator) for _ in range(draws)]
        return sum(float(o.nll) * o.num_tokens for o in outs) / draws, outs[0].num_tokens

    codes = torch.cat([pipe.encode_images(stack_images(chunk)).cpu() for _, chunk in _batches(records, batch_size)])
    rows = [{**r, "codes": c} for r, c in zip(records, codes)]
    task_list = [Task[t.upper()] for t in tasks]
    builder = SequenceBuilder(pipe.vocab, pipe.tokenizer, pipe.layout, dict.fromkeys(task_list, 1.0), seed)
    cost = Cost(batch_size)
    sums: dict[str, list[float]] = {}  # task -> [summed NLL, target tokens, sequences]
    with _progress(len(rows) * len(task_list), "nll", progress) as bar:
        for task in task_list:
            samples = [builder.build(row, task=task) for row in rows if builder.can_do(row, task)]
            acc = sums[task.name.lower()] = [0.0, 0, len(samples)]
            for _, chunk in _batches(samples, batch_size):
                batch = collate(chunk, pipe.vocab).to(pipe.device)
                with _Timer(pipe.device) as t:
                    total, tokens = nll_sum(batch)
                cost.add(draws, t.seconds, len(chunk))
                acc[0], acc[1] = acc[0] + total, acc[1] + tokens
                bar.update(len(chunk))
    per_task = {k: {"nll": total / max(tokens, 1), "tokens": tokens, "sequences": n}
                for k, (total, tokens, n) in sums.items()}
    all_tokens = sum(v[1] for v in sums.values())
    metrics = {"nll": sum(v[0] for v in sums.values()) / max(all_tokens, 1), "tokens": all_tokens,
               "bound": "exact (AR)" if exact else "ELBO upper bound (MDM)", "draws": draws,
               "per_task": per_task, "truncated": dict(builder.truncated), "cost": cost.to_dict()}
    return TaskResult(metrics)


def _documents(records: Sequence[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("segments") and (r.get("meta") or {}).get("kind") == kind]


def eval_edit(pipe: MMDLMPipeline, records: Sequence[dict], sampler: SamplerConfig | None = None,
              batch_size: int = 64, seed: int = 0, progress: bool = True,
              options: Mapping[str, Any] | None = None) -> TaskResult:
    """Image editing (issue 20): each edit record's source image and instruction (`pipe.edit`), the edited image
    read by the shapes oracle against the edit applied to the source scene (`mmdlm.worlds.edits.check_edit`):
    all-correct (the read scene is exactly the expected one), the edited object right, the rest unchanged; per
    edit kind too. An instruction longer than the model's text region scores 0 (`too_long`). `options`: further
    keyword arguments of `pipe.edit` (`revision=`)."""
    from mmdlm.worlds.edits import Edit, check_edit

    items = _documents(records, "edit")
    if not items:
        return TaskResult({"skipped": "no edit records (python -m mmdlm.worlds.edits writes them)", "n": 0})
    usable = [i for i, r in enumerate(items) if _fits(pipe, r["segments"][1]["text"], pipe.layout.text_len)]
    cost = Cost(batch_size)
    checks: dict[int, dict] = {}
    examples: list[Example] = []
    with _progress(len(usable), "edit", progress) as bar:
        for b, chunk in _batches(usable, batch_size):
            batch = [items[i] for i in chunk]
            with _Timer(pipe.device) as t:
                out = pipe.edit(torch.stack([r["segments"][0]["image"] for r in batch]),
                                [r["segments"][1]["text"] for r in batch], sampler, seed=seed + b, **(options or {}))
            cost.add(out.nfe, t.seconds, len(chunk))
            for i, r, image in zip(chunk, batch, out.images):
                checks[i] = check_edit(r["meta"]["before"], Edit.from_dict(r["meta"]["edit"]), image,
                                       pipe.vq.image_size)
            examples += [Example(torch.cat([r["segments"][0]["image"], img], 2), r["segments"][1]["text"])
                         for r, img in zip(batch, out.images)][: N_EXAMPLES - len(examples)]
            bar.update(len(chunk))
    keys = ("all_correct", "edited_ok", "rest_unchanged", "extra_objects", "missing_objects")
    failed = dict.fromkeys(keys, 0.0)
    rows = [{k: float(checks[i][k]) for k in keys} if i in checks else failed for i in range(len(items))]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for r, row in zip(items, rows):
        by_kind[r["meta"]["edit"]["kind"]].append(row["all_correct"])
    metrics = {**mean_dicts(rows), "n": len(items), "too_long": len(items) - len(usable),
               "per_kind": {k: {"all_correct": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_kind.items())},
               "cost": cost.to_dict()}
    return TaskResult(metrics, examples)


def eval_what_changed(pipe: MMDLMPipeline, records: Sequence[dict], sampler: SamplerConfig | None = None,
                      batch_size: int = 64, seed: int = 0, progress: bool = True) -> TaskResult:
    """"What changed?" (issue 20): two images and a question, the answer generated (`pipe.complete_document`);
    exact match after strip/lower, per question type too."""
    from mmdlm.pipeline import Blank

    items = _documents(records, "what_changed")
    if not items:
        return TaskResult({"skipped": "no what-changed records (python -m mmdlm.worlds.edits writes them)", "n": 0})
    cost = Cost(batch_size)
    answers: dict[int, str] = {}
    with _progress(len(items), "what_changed", progress) as bar:
        for b, chunk in _batches(range(len(items)), batch_size):
            docs = [[*(s["image"] for s in items[i]["segments"][:2]), items[i]["segments"][2]["text"], Blank()]
                    for i in chunk]
            with _Timer(pipe.device) as t:
                out = pipe.complete_document(docs, sampler, seed=seed + b)
            cost.add(out.nfe, t.seconds, len(chunk))
            answers.update({i: doc[3] for i, doc in zip(chunk, out.documents)})
            bar.update(len(chunk))
    by_type: dict[str, list[float]] = defaultdict(list)
    for i, r in enumerate(items):
        truth = r["segments"][3]["text"]
        by_type[r["meta"].get("question_type", "unknown")].append(float(normalize(answers[i]) == normalize(truth)))
    scores = [s for v in by_type.values() for s in v]
    shown = [{"question": items[i]["segments"][2]["text"], "predicted": answers[i],
              "answer": items[i]["segments"][3]["text"]} for i in range(min(N_EXAMPLES, len(items)))]
    examples = [Example(torch.cat([s["image"] for s in items[i]["segments"][:2]], 2),
                        f"Q: {d['question']}\npred: {d['predicted']} | true: {d['answer']}")
                for i, d in enumerate(shown)]
    metrics = {"accuracy": sum(scores) / len(scores), "n": len(scores),
               "per_type": {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_type.items())},
               "cost": cost.to_dict(), "examples": shown}
    return TaskResult(metrics, examples)


# ---------------------------------------------------------------------------------------------
# the whole evaluation


@dataclass
class _Context:
    pipe: MMDLMPipeline
    records: list[dict]
    world: World
    samplers: Mapping[str, SamplerConfig]
    batch_size: int
    seed: int
    nll_draws: int
    progress: bool


TASKS: dict[str, Callable[[_Context], TaskResult]] = {
    "vqa": lambda c: eval_vqa(c.pipe, c.records, c.samplers["vqa"], c.batch_size, c.seed, c.progress),
    "caption": lambda c: eval_caption(c.pipe, c.records, c.samplers["caption"], c.batch_size, c.seed, c.progress,
                                      c.world),
    "t2i": lambda c: eval_t2i(c.pipe, c.records, c.samplers["t2i"], c.batch_size, c.seed, c.progress, c.world),
    "joint": lambda c: eval_joint(c.pipe, len(c.records), c.world, c.samplers["joint"], c.batch_size, c.seed,
                                  c.progress),
    "nll": lambda c: eval_nll(c.pipe, c.records, NLL_TASKS, c.nll_draws, c.batch_size, c.seed, c.progress),
    "edit": lambda c: eval_edit(c.pipe, c.records, c.samplers["edit"], c.batch_size, c.seed, c.progress),
    "what_changed": lambda c: eval_what_changed(c.pipe, c.records, c.samplers["what_changed"], c.batch_size, c.seed,
                                                c.progress),
}


def run_evaluation(pipe: MMDLMPipeline, shards: str | Sequence[str] | None = None,
                   tasks: Sequence[str] = ALL_TASKS, limit: int | None = None, *,
                   records: list[dict] | None = None, samplers: Mapping[str, SamplerConfig] | None = None,
                   batch_size: int = 64, seed: int = 0, nll_draws: int = 4, progress: bool = True,
                   scorer: str | None = None) -> Evaluation:
    """`evaluate`, also returning the examples for `write_samples`. Give `shards` or loaded `records`;
    `samplers` maps a task (vqa, caption, t2i, joint) to its `SamplerConfig`; a task left out gets the
    pipeline's default."""
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
    if records is None:
        if shards is None:
            raise ValueError("give shards or records")
        records = load_records(shards, pipe.vq.image_size, limit)
    records = records[:limit] if limit is not None else records
    samplers = {task: (samplers or {}).get(task) or pipe.sampler(name) for task, name in PIPELINE_TASK.items()}
    ctx = _Context(pipe, records, world_for(records, pipe.vq.image_size, scorer), samplers, batch_size, seed, nll_draws,
                   progress)
    metrics: dict[str, Any] = {
        "source": ctx.world.source, "records": len(records),
        "model_kind": "ar" if pipe.is_autoregressive else "mdm",
        "parameters": sum(p.numel() for p in pipe.model.parameters()),
        "device": str(pipe.device),
        "settings": {"tasks": list(tasks), "limit": limit, "batch_size": batch_size, "seed": seed,
                     "nll_draws": nll_draws,
                     "sampler": {t: samplers[t].to_dict() for t in tasks if t in samplers}},
    }
    examples = {}
    for name in tasks:
        with _Timer(pipe.device) as t:
            result = TASKS[name](ctx)
        metrics[name] = {**result.metrics, "task_seconds": round(t.seconds, 3)}
        examples[name] = result.examples
    return Evaluation(metrics, examples)


def evaluate(pipe: MMDLMPipeline, shards: str | Sequence[str] | None = None, tasks: Sequence[str] = ALL_TASKS,
             limit: int | None = None, **kw) -> dict:
    """Evaluate a pipeline on val shards; returns the nested metrics dict (see the module docstring).

    Keyword arguments: `records` (already loaded, instead of shards), `samplers` (task -> SamplerConfig),
    `batch_size`, `seed`, `nll_draws`, `progress`.
    """
    return run_evaluation(pipe, shards, tasks, limit, **kw).metrics


# ---------------------------------------------------------------------------------------------
# outputs

_TITLES = {
    "vqa": "Visual question answering (exact match after strip/lower)",
    "caption": "Captioning",
    "t2i": "Text-to-image (prompt = canonical caption; image read by the scorer)",
    "joint": "Joint image + caption generation",
    "nll": "Held-out NLL per target token",
    "edit": "Image editing (the edited image read by the oracle against the edited scene)",
    "what_changed": "What changed? (two images, a question; exact match)",
}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) or "-"
    text = "".join(c if c.isprintable() else "?" for c in str(value).replace("\n", " "))
    return text.replace("|", "\\|").replace("`", "'")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return lines + ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]


def _md_section(name: str, section: dict) -> list[str]:
    """A task's metrics as markdown: scalars in one table, each dict-of-dicts as its own table."""
    lines = [f"## {_TITLES.get(name, name)}", ""]
    scalars = [(k, v) for k, v in section.items() if not isinstance(v, dict | list)]
    lines += _md_table(["metric", "value"], scalars) + [""]
    for key, value in section.items():
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            columns = list(dict.fromkeys(c for v in value.values() for c in v))
            lines += [f"**{key}**", ""]
            lines += _md_table([key, *columns], [[k, *(v.get(c, "") for c in columns)] for k, v in value.items()])
            lines.append("")
        elif isinstance(value, dict):
            lines += [f"**{key}**: {_fmt(value)}", ""]
        elif isinstance(value, list) and value:
            lines += [f"**{key}**", ""] + [f"- `{_fmt(v)}`" for v in value] + [""]
    return lines


def render_report(metrics: dict) -> str:
    """metrics.json as a readable markdown report."""
    head = ["# mmdlm evaluation", ""]
    for key in ("model", "model_kind", "parameters", "source", "records", "device", "command"):
        if key in metrics:
            head.append(f"- **{key}**: `{_fmt(metrics[key])}`")
    head += [f"- **settings**: {_fmt(metrics.get('settings', {}))}", ""]
    body = [line for name in TASKS if name in metrics for line in _md_section(name, metrics[name])]
    return "\n".join(head + body) + "\n"


def _plain(text: str) -> str:
    """Printable ASCII for a figure title (generated text may hold any byte)."""
    return "".join(c if c.isprintable() or c == "\n" else "?" for c in text.encode("ascii", "replace").decode())


def write_samples(examples: dict[str, list[Example]], path: str | Path, columns: int = N_EXAMPLES) -> Path:
    """A figure with one row per task: its images with their prompts / captions / QA as titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, ex[:columns]) for name, ex in examples.items() if ex]
    if not rows:
        raise ValueError("no examples to draw (run a generating task: vqa, caption, t2i or joint)")
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.3 * columns, 2.9 * len(rows)), squeeze=False)
    for (name, row), line in zip(rows, axes):
        for j, ax in enumerate(line):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(row):
                ax.axis("off")
                continue
            ax.imshow(row[j].image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy(),
                      interpolation="nearest")
            wrapped = "\n".join(textwrap.fill(part, 30) for part in _plain(row[j].text).split("\n"))
            ax.set_title(wrapped, fontsize=6, parse_math=False)
        line[0].set_ylabel(name, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    """Floats that JSON can hold (NaN / inf become None), recursively."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------------------------
# command line


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(f"unknown tasks {unknown or text!r}; choose from {','.join(TASKS)}")
    return tasks


def build_parser(prog: str = "python -m mmdlm.evaluate") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder (mmdlm.commands.export / save_pretrained)")
    parser.add_argument("--shards", required=True, help="val shards: glob, brace pattern, folder or comma list")
    parser.add_argument("--out", required=True, help="metrics.json to write")
    parser.add_argument("--report", help="markdown report to write")
    parser.add_argument("--samples", help="figure of samples (png) to write")
    parser.add_argument("--limit", type=_positive, help="val records to evaluate (and joint samples); all if absent")
    parser.add_argument("--tasks", type=_task_list, default=list(ALL_TASKS),
                        help=f"comma-separated subset of {','.join(ALL_TASKS)} (default: all)")
    add_sampler_arguments(parser, "mmdlm.pipeline.DEFAULT_SAMPLERS; --guidance and --plausibility apply to "
                                  "text-to-image only")
    parser.add_argument("--scorer", metavar="MODULE:FUNCTION",
                        help="text-to-image scorer for data without a world of its own: a function (images "
                             "Float[B,3,H,W] in [0,1], records) -> one dict of rates with 'all_correct' per image")
    parser.add_argument("--batch-size", type=_positive, default=64, help="samples per model call")
    parser.add_argument("--nll-draws", type=_positive, default=4, help="(t, mask) draws of the MDM's NLL bound")
    parser.add_argument("--seed", type=int, default=0, help="seed of the samplers and the NLL sequences")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m mmdlm.evaluate") -> None:
    """Evaluate a model folder on val shards; write metrics.json and optionally report.md / samples.png."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.samples and not set(args.tasks) - {"nll"}:
        parser.error("--samples needs a generating task in --tasks (vqa, caption, t2i or joint)")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model!r} is not a model folder (no config.json)")
    from mmdlm.data import expand_shards
    from mmdlm.pipeline import MMDLMPipeline

    try:
        expand_shards(args.shards)
    except FileNotFoundError as err:
        parser.error(f"--shards: {err}")
    try:
        pipe = MMDLMPipeline.from_pretrained(args.model, device=args.device)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        parser.error(f"cannot load --model {args.model!r}: {err}")
    overrides = sampler_overrides(args)
    unguided = {k: v for k, v in overrides.items() if not k.startswith("guidance")}
    try:  # the guidance flags are for the tasks that draw an image from a condition
        samplers = {task: pipe.sampler(name, **(overrides if task in GUIDED_TASKS else unguided))
                    for task, name in PIPELINE_TASK.items()}
    except ValueError as err:
        parser.error(f"sampler: {err}")
    try:
        records = load_records(args.shards, pipe.vq.image_size, args.limit)
        world_for(records, pipe.vq.image_size, args.scorer)
    except ValueError as err:
        parser.error(str(err))
    result = run_evaluation(pipe, tasks=args.tasks, limit=args.limit, records=records, samplers=samplers,
                            batch_size=args.batch_size, seed=args.seed, nll_draws=args.nll_draws,
                            progress=not args.quiet, scorer=args.scorer)
    metrics = {"command": shlex.join(["python", "-m", "mmdlm.evaluate", *(sys.argv[1:] if argv is None else argv)]),
               "model": str(Path(args.model).resolve()), "shards": args.shards, **result.metrics}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    written = [str(out)]
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(render_report(metrics))
        written.append(args.report)
    if args.samples:
        written.append(str(write_samples(result.examples, args.samples)))
    print(f"evaluated {metrics['records']} {metrics['source']} records ({', '.join(args.tasks)}) -> "
          f"{', '.join(written)}")


if __name__ == "__main__":
    main()
