"""The shapes world: procedural scenes of coloured shapes on a 3x3 grid, with exact captions and QA.

A scene graph is `min..max` objects; each has a colour (8), a shape (4), a size (2) and its own cell
of a 3x3 grid. Scenes are rendered with PIL without anti-aliasing, so every object pixel holds its
exact palette colour, and geometry scales with the image size (32 px default, 64 px supported).
Because the data come from scene graphs, captions and answers are exact, and `mmdlm/worlds/oracle.py`
can read a scene back from pixels, so text-to-image can be scored like VQA (as in the CLEVR-style
worlds of Johnson et al. 2017 and the shape worlds used to probe compositional generation).

The held-out split is by scene graph: `split_of(objects)` hashes the canonical `scene_key` with md5,
so a scene that lands in val never occurs in train (overlap 0 by construction, and measured).

    python -m mmdlm.worlds.shapes --out data/shards/shapes --train 20000 --val 1000
    python -m mmdlm.worlds.shapes --out /tmp/shapes64 --train 2000 --val 200 --image-size 64 --max-objects 3

From the repository root, `python -m data.shapes ...` is the same command (data/shapes.py, the recipe's
wrapper beside its shards).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

# Exact RGB values; every pair differs by >= 127 in one channel, so a decoder's colour error of
# well under half that still maps back to the right name by nearest palette colour.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
# Cell index = 3 * row + column, raster order: captions list objects in this order.
CELL_NAMES: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "middle", "right",
    "bottom left", "bottom", "bottom right",
)
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
PLURALS: dict[str, str] = {
    "circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
BACKGROUND = (0, 0, 0)

# "at the top left", "in the middle", "on the left": the preposition English uses for each cell.
_PREPOSITIONS: dict[str, str] = {name: "at the" for name in CELL_NAMES} | {
    "middle": "in the", "left": "on the", "right": "on the"}

# Object side as a fraction of the cell side (cell = image/3: 10.7 px at 32). Large leaves >= 2 px
# between neighbours; small is about half the cell, still >= 5 px so 4x4-px VQ patches keep its shape.
SIZE_FRACTION: dict[str, float] = {"small": 0.5, "large": 0.85}


def cell_rc(cell: int) -> tuple[int, int]:
    """(row, column) of a cell index 0..8."""
    return divmod(cell, 3)


def position_phrase(cell: int) -> str:
    """'at the top left', 'in the middle', 'on the right', ..."""
    name = CELL_NAMES[cell]
    return f"{_PREPOSITIONS[name]} {name}"


def extent(size: str, image_size: int) -> int:
    """Side in pixels of an object of `size`: the odd integer nearest SIZE_FRACTION x cell side.

    Odd, so shapes (triangle apex, cross bars) have an exact centre pixel.
    """
    target = SIZE_FRACTION[size] * image_size / 3
    return 2 * round((target - 1) / 2) + 1


def cell_bounds(cell: int, image_size: int) -> tuple[int, int, int, int]:
    """Pixel bounds (x0, y0, x1, y1), end-exclusive, of a cell of the 3x3 grid."""
    row, col = cell_rc(cell)
    edges = [round(i * image_size / 3) for i in range(4)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def object_box(cell: int, size: str, image_size: int) -> tuple[int, int, int]:
    """(x0, y0, side) of the square an object occupies, centred in its cell."""
    row, col = cell_rc(cell)
    side = extent(size, image_size)
    cx, cy = (col + 0.5) * image_size / 3, (row + 0.5) * image_size / 3
    return int(cx - side / 2 + 0.5), int(cy - side / 2 + 0.5), side


def _draw_circle(draw: ImageDraw.ImageDraw, x0: int, y0: int, side: int, fill: tuple[int, int, int]) -> None:
    draw.ellipse([x0, y0, x0 + side - 1, y0 + side - 1], fill=fill)


def _draw_square(draw: ImageDraw.ImageDraw, x0: int, y0: int, side: int, fill: tuple[int, int, int]) -> None:
    draw.rectangle([x0, y0, x0 + side - 1, y0 + side - 1], fill=fill)


def _draw_triangle(draw: ImageDraw.ImageDraw, x0: int, y0: int, side: int,
                   fill: tuple[int, int, int]) -> None:
    # upright isosceles: apex at the top centre pixel, base on the bottom row
    x1, y1 = x0 + side - 1, y0 + side - 1
    draw.polygon([(x0 + (side - 1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _draw_cross(draw: ImageDraw.ImageDraw, x0: int, y0: int, side: int, fill: tuple[int, int, int]) -> None:
    # a plus sign; bar thickness is the odd integer nearest side/3 (1 px at side 5, 3 px at 9)
    bar = 2 * round((side / 3 - 1) / 2) + 1
    lo = x0 + (side - bar) // 2
    draw.rectangle([lo, y0, lo + bar - 1, y0 + side - 1], fill=fill)
    lo = y0 + (side - bar) // 2
    draw.rectangle([x0, lo, x0 + side - 1, lo + bar - 1], fill=fill)


_DRAW: dict[str, Callable[..., None]] = {
    "circle": _draw_circle, "square": _draw_square, "triangle": _draw_triangle, "cross": _draw_cross}


def make_object(color: str, shape: str, size: str, cell: int) -> dict:
    """One scene-graph object in the json format of docs/INTERFACES.md."""
    return {"color": color, "shape": shape, "size": size, "cell": cell, "position": CELL_NAMES[cell]}


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 2) -> list[dict]:
    """A random scene graph: `min..max` objects in distinct cells, sorted by cell (raster order)."""
    if not 1 <= min_objects <= max_objects <= 9:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects}..{max_objects}")
    cells = sorted(rng.sample(range(9), rng.randint(min_objects, max_objects)))
    colors = list(COLORS)
    return [make_object(rng.choice(colors), rng.choice(SHAPES), rng.choice(SIZES), c) for c in cells]


def render(objects: list[dict], image_size: int = 32) -> Image.Image:
    """Draw a scene graph: RGB, black background, exact palette colours (no anti-aliasing)."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        x0, y0, side = object_box(obj["cell"], obj["size"], image_size)
        _DRAW[obj["shape"]](draw, x0, y0, side, COLORS[obj["color"]])
    return image


def scene_key(objects: list[dict]) -> tuple[tuple[int, str, str, str], ...]:
    """Canonical hashable form of a scene graph: sorted (cell, color, shape, size) tuples."""
    return tuple(sorted((int(o["cell"]), o["color"], o["shape"], o["size"]) for o in objects))


def split_of(objects: list[dict], val_fraction: float = 0.1) -> str:
    """'val' or 'train', from a stable md5 hash of the scene key (never Python's salted `hash`)."""
    digest = hashlib.md5(json.dumps(scene_key(objects)).encode()).hexdigest()
    return "val" if int(digest[:8], 16) / 2**32 < val_fraction else "train"


# ---------------------------------------------------------------------------------------------
# captions


def describe(obj: dict) -> str:
    """'a large red circle at the top left'."""
    return f"a {obj['size']} {obj['color']} {obj['shape']} {position_phrase(obj['cell'])}"


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(objects: list[dict]) -> str:
    """The canonical caption: objects in raster order of their cell, joined by ', ' and ' and '.

    'a large red circle at the top left and a small blue square in the middle'
    """
    if not objects:
        raise ValueError("a scene needs at least one object to be captioned")
    return _join([describe(o) for o in sorted(objects, key=lambda o: o["cell"])])


def paraphrase(objects: list[dict], rng: random.Random) -> str:
    """A second caption: 'there is ...' with the objects in random order (parse_caption reads it too)."""
    shuffled = list(objects)
    rng.shuffle(shuffled)
    return "there is " + _join([describe(o) for o in shuffled])


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE = re.compile(
    rf"an? ({_alternation(SIZES)}) ({_alternation(COLORS)}) ({_alternation(SHAPES)}) "
    rf"(?:at|in|on) the ({_alternation(CELL_NAMES)})")


def parse_caption(text: str) -> list[dict] | None:
    """Inverse of `caption` (and `paraphrase`): the scene graph a caption describes, or None.

    Lenient about case, spacing, a final period, the preposition and a 'there is' prefix; strict
    about everything else: one unreadable phrase or two objects in one cell make the whole caption
    unparseable (None), so a generated caption scores only if it describes a valid scene exactly.
    """
    text = " ".join(text.lower().replace(",", " , ").split()).rstrip(" .")
    text = re.sub(r"^there (?:is|are) ", "", text)
    if not text:
        return None
    objects = []
    for phrase in re.split(r" , (?:and )?| and ", text):
        match = _PHRASE.fullmatch(phrase.strip())
        if match is None:
            return None
        size, color, shape, where = match.groups()
        objects.append(make_object(color, shape, size, CELL_NAMES.index(where)))
    if len({o["cell"] for o in objects}) != len(objects):
        return None
    return sorted(objects, key=lambda o: o["cell"])


# ---------------------------------------------------------------------------------------------
# questions: one generator per type; each returns one unambiguous question or None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _name(obj: dict, objects: list[dict]) -> str | None:
    """Shortest unambiguous name: 'red circle', else 'small red circle', else None."""
    for fields in (("color", "shape"), ("size", "color", "shape")):
        if sum(all(o[f] == obj[f] for f in fields) for o in objects) == 1:
            return " ".join(obj[f] for f in fields)
    return None


def _qa(question: str, answer: str, kind: str) -> dict:
    return {"question": question, "answer": answer, "type": kind}


def _q_color(objects: list[dict], rng: random.Random) -> dict:
    obj = rng.choice(objects)
    unique = sum(o["shape"] == obj["shape"] for o in objects) == 1
    where = "" if unique else " " + position_phrase(obj["cell"])
    return _qa(f"what color is the {obj['shape']}{where}?", obj["color"], "color")


def _q_shape(objects: list[dict], rng: random.Random) -> dict:
    obj = rng.choice(objects)
    return _qa(f"what shape is {position_phrase(obj['cell'])}?", obj["shape"], "shape")


def _q_position(objects: list[dict], rng: random.Random) -> dict | None:
    named = [(o, n) for o in objects if (n := _name(o, objects))]
    if not named:
        return None
    obj, name = rng.choice(named)
    return _qa(f"where is the {name}?", obj["position"], "position")


def _q_count(objects: list[dict], rng: random.Random) -> dict:
    form = rng.randrange(3)
    if form == 0:
        return _qa("how many shapes are there?", NUMBERS[len(objects)], "count")
    if form == 1:  # half the time a shape that is present, else any shape (answers include "zero")
        shape = rng.choice(objects)["shape"] if rng.random() < 0.5 else rng.choice(SHAPES)
        n = sum(o["shape"] == shape for o in objects)
        return _qa(f"how many {PLURALS[shape]} are there?", NUMBERS[n], "count")
    color = rng.choice(objects)["color"] if rng.random() < 0.5 else rng.choice(list(COLORS))
    n = sum(o["color"] == color for o in objects)
    return _qa(f"how many {color} shapes are there?", NUMBERS[n], "count")


def _q_exist(objects: list[dict], rng: random.Random) -> dict:
    present = {(o["color"], o["shape"]) for o in objects}
    if rng.random() < 0.5:  # balanced yes/no
        color, shape = rng.choice(sorted(present))
        answer = "yes"
    else:
        color, shape = rng.choice([(c, s) for c in COLORS for s in SHAPES if (c, s) not in present])
        answer = "no"
    return _qa(f"is there {_article(color)} {color} {shape}?", answer, "exist")


def _q_size(objects: list[dict], rng: random.Random) -> dict:
    obj = rng.choice(objects)
    unique = sum(o["color"] == obj["color"] and o["shape"] == obj["shape"] for o in objects) == 1
    where = "" if unique else " " + position_phrase(obj["cell"])  # a size-free name, so no give-away
    return _qa(f"what size is the {obj['color']} {obj['shape']}{where}?", obj["size"], "size")


# "what is left of X?": the one object whose column is smaller than X's (any row), or "nothing".
_RELATIONS: dict[str, Callable[[dict, dict], bool]] = {
    "left of": lambda ref, o: cell_rc(o["cell"])[1] < cell_rc(ref["cell"])[1],
    "right of": lambda ref, o: cell_rc(o["cell"])[1] > cell_rc(ref["cell"])[1],
    "above": lambda ref, o: cell_rc(o["cell"])[0] < cell_rc(ref["cell"])[0],
    "below": lambda ref, o: cell_rc(o["cell"])[0] > cell_rc(ref["cell"])[0],
}


def _q_relation(objects: list[dict], rng: random.Random) -> dict | None:
    something, nothing = [], []
    for ref in objects:
        ref_name = _name(ref, objects)
        if ref_name is None:
            continue
        for relation, holds in _RELATIONS.items():
            matches = [o for o in objects if o is not ref and holds(ref, o)]
            question = f"what is {relation} the {ref_name}?"
            if not matches:
                nothing.append(_qa(question, "nothing", "relation"))
            elif len(matches) == 1 and (answer := _name(matches[0], objects)):
                something.append(_qa(question, answer, "relation"))
    pool = something if something and (not nothing or rng.random() < 0.5) else nothing
    return rng.choice(pool) if pool else None


QUESTION_TYPES: dict[str, Callable[[list[dict], random.Random], dict | None]] = {
    "color": _q_color, "shape": _q_shape, "position": _q_position, "count": _q_count,
    "exist": _q_exist, "size": _q_size, "relation": _q_relation,
}


def make_questions(objects: list[dict], rng: random.Random) -> list[dict]:
    """One unambiguous question of each type that the scene allows: {question, answer, type}."""
    return [qa for make in QUESTION_TYPES.values() if (qa := make(objects, rng)) is not None]


# ---------------------------------------------------------------------------------------------
# shards


@dataclass
class ShapesConfig:
    """What `python -m mmdlm.worlds.shapes` (= `python -m data.shapes`) generates."""

    train: int = 20_000  # 20k scenes: seconds to write, many sightings of every colour x shape
    val: int = 1_000  # enough for VQA / text-to-image accuracies with ~1-2% standard error
    seed: int = 0
    image_size: int = 32  # 32 px = an 8x8 grid of 4x4-px VQ patches: 64 image tokens
    min_objects: int = 1
    max_objects: int = 2  # 1-2 objects: learnable by a tiny CPU model, still compositional
    val_fraction: float = 0.1  # share of scene graphs (by md5 of the scene key) held out for val
    shard_size: int = 1000  # samples per shard: several shards per split for workers and ranks


def make_sample(objects: list[dict], rng: random.Random, image_size: int = 32) -> dict:
    """png bytes + json metadata of one scene (the webdataset members, without the key)."""
    buffer = io.BytesIO()
    render(objects, image_size).save(buffer, format="PNG")
    meta = {"source": "shapes", "objects": objects,
            "captions": [caption(objects), paraphrase(objects, rng)],
            "qa": make_questions(objects, rng)}
    return {"png": buffer.getvalue(), "json": json.dumps(meta).encode()}


def iter_scenes(split: str, n: int, cfg: ShapesConfig) -> Iterator[tuple[list[dict], random.Random]]:
    """n scene graphs of one split, with the rng that drew them (for captions and questions).

    Each split has its own random stream (seeded by seed and split name) that rejects the other
    split's scenes, so the train samples do not change when --val changes, and vice versa.
    """
    share = cfg.val_fraction if split == "val" else 1 - cfg.val_fraction
    if n > 0 and share <= 0:
        raise ValueError(f"val_fraction={cfg.val_fraction} leaves no scenes for the {split} split")
    rng = random.Random(f"shapes/{cfg.seed}/{split}")
    made = 0
    while made < n:
        objects = sample_scene(rng, cfg.min_objects, cfg.max_objects)
        if split_of(objects, cfg.val_fraction) == split:
            made += 1
            yield objects, rng


def _new_stats() -> dict:
    return {"samples": 0, "objects_per_scene": Counter(), "color": Counter(), "shape": Counter(),
            "size": Counter(), "cell": Counter(), "question_type": Counter(),
            "answers": {kind: Counter() for kind in QUESTION_TYPES}}


def _update_stats(stats: dict, meta: dict) -> None:
    stats["samples"] += 1
    stats["objects_per_scene"][len(meta["objects"])] += 1
    for obj in meta["objects"]:
        for field in ("color", "shape", "size"):
            stats[field][obj[field]] += 1
        stats["cell"][obj["position"]] += 1
    for qa in meta["qa"]:
        stats["question_type"][qa["type"]] += 1
        stats["answers"][qa["type"]][qa["answer"]] += 1


def write_shapes(out: str | Path, cfg: ShapesConfig, progress: bool = True) -> dict:
    """Write train/val shards, stats.json and README.md under `out`; returns the stats."""
    import webdataset as wds
    from tqdm import tqdm

    out = Path(out)
    start = time.perf_counter()
    stats: dict = {"config": asdict(cfg)}
    keys: dict[str, set] = {}
    bar = tqdm(total=cfg.train + cfg.val, desc="shapes", unit="sample", disable=not progress)
    for split, n in (("train", cfg.train), ("val", cfg.val)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"shapes-{split}-*.tar"):  # a rerun with fewer samples leaves no extras
            stale.unlink()
        split_stats, keys[split] = _new_stats(), set()
        # mtime=0: byte-identical shards for one seed
        with wds.ShardWriter(str(folder / f"shapes-{split}-%06d.tar"), maxcount=cfg.shard_size,
                             verbose=0, mtime=0) as sink:
            for i, (objects, rng) in enumerate(iter_scenes(split, n, cfg)):
                sample = make_sample(objects, rng, cfg.image_size)
                sink.write({"__key__": f"shapes-{split}-{i:06d}", **sample})
                _update_stats(split_stats, json.loads(sample["json"]))
                keys[split].add(scene_key(objects))
                bar.update()
        split_stats["distinct_scenes"] = len(keys[split])
        split_stats["shards"] = len(list(folder.glob(f"shapes-{split}-*.tar")))
        stats[split] = split_stats
    bar.close()
    stats["train_val_scene_overlap"] = len(keys["train"] & keys["val"])  # 0 by construction; measured
    stats["seconds"] = round(time.perf_counter() - start, 2)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(_readme(stats))
    return stats


def _readme(stats: dict) -> str:
    cfg = stats["config"]
    lines = [
        "# shapes shards",
        "",
        f"Written by `python -m mmdlm.worlds.shapes --out <dir> --train {cfg['train']} --val {cfg['val']} "
        f"--seed {cfg['seed']} --image-size {cfg['image_size']} --min-objects {cfg['min_objects']} "
        f"--max-objects {cfg['max_objects']} --shard-size {cfg['shard_size']}` (see data/README.md).",
        "",
        "Each sample: `png` (the scene) + `json` (`source`, `objects`, `captions`, `qa`).",
        f"Train/val scene-graph overlap: {stats['train_val_scene_overlap']} "
        f"(val holds ~{cfg['val_fraction']:.0%} of scene graphs, chosen by md5 of the scene key).",
        "",
        "| split | samples | shards | distinct scenes | objects per scene |",
        "| --- | --- | --- | --- | --- |",
    ]
    for split in ("train", "val"):
        s = stats[split]
        per = ", ".join(f"{k}: {v}" for k, v in sorted(s["objects_per_scene"].items()))
        lines.append(f"| {split} | {s['samples']} | {s['shards']} | {s['distinct_scenes']} | {per} |")
    lines += ["", "Full counts per colour, shape, size, cell and question type: `stats.json`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Write the shapes world as webdataset shards: DIR/train/*.tar, DIR/val/*.tar, stats.json, README.md.

    python -m mmdlm.worlds.shapes --out data/shards/shapes --train 20000 --val 1000 --seed 0
    """
    defaults = ShapesConfig()
    parser = argparse.ArgumentParser(prog="python -m mmdlm.worlds.shapes", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=defaults.train, help="train samples")
    parser.add_argument("--val", type=int, default=defaults.val, help="val samples (held-out scene graphs)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help="side in pixels (geometry scales; 32 and 64 are validated by the oracle)")
    parser.add_argument("--min-objects", type=int, default=defaults.min_objects)
    parser.add_argument("--max-objects", type=int, default=defaults.max_objects)
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="share of scene graphs held out for val")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="samples per shard")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if not 1 <= args.min_objects <= args.max_objects <= 9:
        parser.error(f"need 1 <= --min-objects <= --max-objects <= 9, "
                     f"got {args.min_objects}, {args.max_objects}")
    if args.image_size < 24:
        parser.error(f"--image-size {args.image_size} is too small for recognisable shapes (>= 24)")
    cfg = ShapesConfig(train=args.train, val=args.val, seed=args.seed, image_size=args.image_size,
                       min_objects=args.min_objects, max_objects=args.max_objects,
                       val_fraction=args.val_fraction, shard_size=args.shard_size)
    stats = write_shapes(args.out, cfg, progress=not args.quiet)
    print(f"wrote {stats['train']['samples']} train / {stats['val']['samples']} val samples to {args.out} "
          f"in {stats['seconds']} s (train/val scene overlap: {stats['train_val_scene_overlap']})")


if __name__ == "__main__":
    main()
