"""How the captions and images of a data source are scored: the `World` protocol and its worlds (shapes: the
caption parser and the pixel oracle; digits: a k-NN classifier; `CaptionsWorld`: any captioned images, with a
user's text-to-image scorer plugged in as `module:function`), and `world_for`, which picks one from the records'
`meta["source"]`. `mmdlm evaluate` and the RL rewards (`mmdlm.training.rewards`) score through them.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from functools import lru_cache
from typing import Any, Protocol

import torch

from mmdlm.eval.metrics import cider, mean_dicts, normalize, prf

ATTRIBUTES: tuple[str, ...] = ("cell", "color", "shape", "size", "object")  # object = all of them


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

