"""The shapes world's image-editing recipe: (source image, instruction, edited image) triples, "what changed?"
questions over scene pairs, and an exact checker of generated edits.

It follows InstructPix2Pix (Brooks et al. 2023), which trains an editor on (source, instruction, edited)
triples, and MagicBrush (Zhang et al. 2023), whose edits are single, local operations (recolour, add, remove,
move, resize) scored against a ground-truth edited image. Here the edit is an exact operation on a shapes
scene graph (`mmdlm/worlds/shapes.py`: objects with a colour, shape, size and their own cell of a 3x3 grid),
so the edited image is known exactly and `mmdlm/worlds/oracle.py` can check a generated one pixel-true.

- `Edit(kind, cell, ...)`: recolour, move, add, remove, resize or swap (two objects exchange cells);
  `apply(objects)` returns a new scene graph (never mutates its input), `instruction(objects, rng)` the
  English text, which names the edited object by its shortest unique appearance ("the red circle") or,
  when two objects look alike, by its cell ("the top left shape").
- `random_edit(objects, rng)`: a valid edit; every edit changes the scene (a recolour changes the colour,
  a resize flips small/large, a swap exchanges two objects that look different, a move or an add goes to a
  free cell). `remove` needs >= 2 objects: the shapes world has no empty scenes (`shapes.caption` refuses
  one), so every result stays a scene the rest of mmdlm can caption and question.
- `infer_edit(before, after)`: the one edit that turns a scene into another (each kind leaves a different
  trace), so `what_changed` answers are determined by the scene pair alone.
- `what_changed(before, after)`: short exact questions over the pair ("what changed?" -> "color").
- `check_edit(source, edit, image)`: reads an image with the oracle and compares it with `edit.apply(source)`.
  Ground-truth renders of 1000 random edits all score `all_correct` at 32 and 64 px (the oracle's own bar:
  >= 99% of objects read right, `oracle.validate`).

Text uses the shapes world's words ("color", "shape"; only the kind is spelled "recolour"): instructions are
<= 10 words and <= 17 tokens of the quickstart's shapes BPE (406 ids, which never saw an edit word), answers
1-3 words, questions <= 9 words and <= 22 tokens.

Shards are interleaved documents (MMC4 / OBELICS): `KEY.json` with `texts` / `images` (one entry per segment,
exactly one of the two non-null), `targets` (the segments generated), `kind`, `edit`, `source`, `result` and
`split`, beside `KEY.0.png` (source) and `KEY.1.png` (edited). An edit sample is [0.png, instruction, 1.png]
with targets [2]; a what-changed sample is [0.png, 1.png, question, answer] with targets [3], one question
drawn at random per scene pair (so every sample is a different pair); with `--questions-per-sample N`, a train
sample asks 1..N of the pair's questions, [0.png, 1.png, q1, a1, q2, a2, ...], the answers one target group
(`targets` [[3, 5, ...]]: generated together).

Held-out split by source scene: `shapes.split_of(source)`, so a val source never occurs as a train source.
By default the result must land in the same split too (pairs whose result hashes to the other split are
redrawn), so no val scene, source or result, ever occurs in train (0 of 804 distinct val scenes at 5000 / 500
pairs), against 161 of 917 (18%, mostly one- and two-object scenes) when only sources are held out
(`--no-hold-out-results`; `stats.json` counts the overlaps). As `split_of` is the shapes world's own split,
a model trained on both recipes' train shards never sees a shapes val scene either. Sources have 1..3
objects (the shapes world's 1..2 plus one, so a swap or a remove often has a choice of objects); an add
reaches 4, the most the oracle is validated on.

    python -m mmdlm.worlds.edits --out data/shards/edits --train 20000 --val 1000
    python -m mmdlm.worlds.edits --out /tmp/edits --train 200 --val 20 --kinds recolour,move --quiet
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

from mmdlm.errors import UserError
from mmdlm.worlds.shapes import (
    CELL_NAMES,
    COLORS,
    NUMBERS,
    SHAPES,
    SIZES,
    _name,
    _qa,
    describe,
    make_object,
    position_phrase,
    render,
    sample_scene,
    scene_key,
    split_of,
)

KINDS: tuple[str, ...] = ("recolour", "move", "add", "remove", "resize", "swap")
# the fields each kind sets (the others stay None); `cell` is always the object edited (add: its new cell)
_FIELDS: dict[str, tuple[str, ...]] = {
    "recolour": ("color",), "move": ("to",), "add": ("color", "shape", "size"),
    "remove": (), "resize": ("size",), "swap": ("to",)}
# the answer to "what changed?" for each kind
CHANGE_WORDS: dict[str, str] = {
    "recolour": "color", "move": "position", "add": "added", "remove": "removed", "resize": "size",
    "swap": "swapped"}

# Paraphrase templates, <= 10 words with the longest names. {obj}/{other}: a unique name of an object
# ("red circle", "small red circle" or "top left shape"); {place}: a cell name; {where}: "at the top left".
TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolour": ("make the {obj} {color}", "paint the {obj} {color}", "turn the {obj} {color}",
                 "change the color of the {obj} to {color}"),
    "move": ("move the {obj} to the {place}", "put the {obj} {where}", "place the {obj} {where}"),
    "add": ("add {new}", "draw {new}", "put {new}"),
    "remove": ("remove the {obj}", "delete the {obj}", "erase the {obj}", "take away the {obj}"),
    "resize": ("make the {obj} {size}", "make the {obj} {comparative}", "{verb} the {obj}",
               "change the size of the {obj} to {size}"),
    "swap": ("swap the {obj} and the {other}", "exchange the {obj} and the {other}",
             "swap the {obj} with the {other}"),
}
SOURCE = "shapes-edits"  # the json's data source (the shapes world's is "shapes")
_COMPARATIVE = {"large": ("bigger", "enlarge"), "small": ("smaller", "shrink")}

Look = tuple[str, str, str]  # (color, shape, size): what an object looks like, wherever it is


def _look(obj: dict) -> Look:
    return obj["color"], obj["shape"], obj["size"]


def _by_cell(objects: list[dict]) -> dict[int, Look]:
    cells = {int(o["cell"]): _look(o) for o in objects}
    if len(cells) != len(objects):
        raise ValueError(f"a scene graph has one object per cell, got {len(objects)} objects in {len(cells)} cells")
    return cells


def _scene(cells: dict[int, Look]) -> list[dict]:
    return [make_object(color, shape, size, cell) for cell, (color, shape, size) in sorted(cells.items())]


@dataclass(frozen=True)
class Edit:
    """One edit of a scene graph; objects are addressed by their cell (one object per cell).

    Edit("recolour", 4, color="blue"), Edit("move", 0, to=8), Edit("add", 2, color="red", shape="circle",
    size="small"), Edit("remove", 3), Edit("resize", 4, size="large"), Edit("swap", 0, to=5).
    """

    kind: str  # one of KINDS
    cell: int  # the object edited; add: the free cell the new object goes to
    to: int | None = None  # move: the free destination cell; swap: the other object's cell
    color: str | None = None  # recolour: the new colour; add: the new object's
    shape: str | None = None  # add: the new object's shape
    size: str | None = None  # resize: the new size; add: the new object's

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; choose from {', '.join(KINDS)}")
        values = {"to": self.to, "color": self.color, "shape": self.shape, "size": self.size}
        wanted = _FIELDS[self.kind]
        if any((values[f] is None) != (f not in wanted) for f in values):
            raise ValueError(f"a {self.kind} edit sets {', '.join(('cell',) + wanted)} and nothing else, got {self}")
        legal = {"to": range(9), "color": COLORS, "shape": SHAPES, "size": SIZES}
        if self.cell not in range(9) or any(values[f] not in legal[f] for f in wanted) or self.to == self.cell:
            raise ValueError(f"invalid {self.kind} edit {self}")

    def cells(self) -> set[int]:
        """The cells whose contents the edit changes (the rest of the scene must stay as it is)."""
        return {self.cell} | ({self.to} if self.to is not None else set())

    def problem(self, objects: list[dict]) -> str | None:
        """Why the edit cannot apply to (or would not change) a scene graph, or None if it can."""
        cells = _by_cell(objects)
        if self.kind == "add":
            return f"cell {self.cell} is taken" if self.cell in cells else None
        if self.cell not in cells:
            return f"no object in cell {self.cell}"
        look = cells[self.cell]
        if self.kind == "move" and self.to in cells:
            return f"cell {self.to} is taken"
        if self.kind == "swap" and cells.get(self.to, look) == look:
            return f"cell {self.to} is empty or holds an object that looks the same"
        if self.kind == "remove" and len(cells) == 1:
            return "removing the only object would leave an empty scene"
        if (self.kind == "recolour" and self.color == look[0]) or (self.kind == "resize" and self.size == look[2]):
            return f"the object is already {self.color or self.size}"
        return None

    def apply(self, objects: list[dict]) -> list[dict]:
        """The edited scene graph: new object dicts sorted by cell; `objects` is left untouched."""
        if (problem := self.problem(objects)) is not None:
            raise ValueError(f"cannot apply {self}: {problem}")
        cells = _by_cell(objects)  # a new dict of tuples: editing it cannot reach the input
        if self.kind == "add":
            cells[self.cell] = (self.color, self.shape, self.size)
        elif self.kind == "recolour":
            cells[self.cell] = (self.color, *cells[self.cell][1:])
        elif self.kind == "resize":
            cells[self.cell] = (*cells[self.cell][:2], self.size)
        elif self.kind == "move":
            cells[self.to] = cells.pop(self.cell)
        elif self.kind == "remove":
            del cells[self.cell]
        else:  # swap
            cells[self.cell], cells[self.to] = cells[self.to], cells[self.cell]
        return _scene(cells)

    def instruction(self, objects: list[dict], rng: random.Random) -> str:
        """English text asking for this edit of `objects` (the source scene), from a random template.

        'make the red circle blue', 'put the top left shape on the right', 'add a small red circle in the middle'
        """
        if (problem := self.problem(objects)) is not None:
            raise ValueError(f"cannot describe {self}: {problem}")
        cells = {o["cell"]: o for o in objects}
        words: dict[str, str] = {}
        if self.kind == "add":
            words["new"] = describe(make_object(self.color, self.shape, self.size, self.cell))
        else:
            words["obj"] = refer(cells[self.cell], objects)
        if self.kind == "move":
            words.update(place=CELL_NAMES[self.to], where=position_phrase(self.to))
        if self.kind == "swap":
            words["other"] = refer(cells[self.to], objects)
        if self.kind == "recolour":
            words["color"] = self.color
        if self.kind == "resize":
            words["size"] = self.size
            words["comparative"], words["verb"] = _COMPARATIVE[self.size]
        return rng.choice(TEMPLATES[self.kind]).format(**words)

    def to_dict(self) -> dict:
        """{"kind": ..., "cell": ..., and the fields the kind sets}: the json form (`from_dict` reads it)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Edit:
        try:
            return cls(**data)
        except TypeError as err:  # a missing or unknown key
            raise ValueError(f"not an edit: {data!r} ({err})") from None


def refer(obj: dict, objects: list[dict]) -> str:
    """A name of `obj` that fits no other object of the scene: 'red circle', 'small red circle' (the
    shapes questions' `_name`), else its cell: 'top left shape' (two objects look exactly alike)."""
    return _name(obj, objects) or f"{CELL_NAMES[obj['cell']]} shape"


# ---------------------------------------------------------------------------------------------
# random edits: one generator per kind; each returns None when the kind cannot apply to the scene


def _free(objects: list[dict]) -> list[int]:
    taken = {o["cell"] for o in objects}
    return [c for c in range(9) if c not in taken]


def _random_recolour(objects: list[dict], rng: random.Random, max_objects: int) -> Edit:
    obj = rng.choice(objects)
    return Edit("recolour", obj["cell"], color=rng.choice([c for c in COLORS if c != obj["color"]]))


def _random_resize(objects: list[dict], rng: random.Random, max_objects: int) -> Edit:
    obj = rng.choice(objects)
    return Edit("resize", obj["cell"], size=SIZES[1 - SIZES.index(obj["size"])])


def _random_move(objects: list[dict], rng: random.Random, max_objects: int) -> Edit | None:
    free = _free(objects)
    return Edit("move", rng.choice(objects)["cell"], to=rng.choice(free)) if free else None


def _random_add(objects: list[dict], rng: random.Random, max_objects: int) -> Edit | None:
    free = _free(objects)
    if not free or len(objects) >= max_objects:
        return None
    return Edit("add", rng.choice(free), color=rng.choice(list(COLORS)), shape=rng.choice(SHAPES),
                size=rng.choice(SIZES))


def _random_remove(objects: list[dict], rng: random.Random, max_objects: int) -> Edit | None:
    return Edit("remove", rng.choice(objects)["cell"]) if len(objects) >= 2 else None


def _random_swap(objects: list[dict], rng: random.Random, max_objects: int) -> Edit | None:
    pairs = [sorted((a["cell"], b["cell"])) for a, b in combinations(objects, 2) if _look(a) != _look(b)]
    if not pairs:
        return None
    first, second = rng.choice(pairs)
    return Edit("swap", first, to=second)


_RANDOM: dict[str, Callable[[list[dict], random.Random, int], Edit | None]] = {
    "recolour": _random_recolour, "move": _random_move, "add": _random_add, "remove": _random_remove,
    "resize": _random_resize, "swap": _random_swap}


def random_edit(objects: list[dict], rng: random.Random, kinds: Sequence[str] = KINDS,
                max_objects: int = 4) -> Edit | None:
    """A random valid edit of `objects`: its kind uniform over the `kinds` that can apply, or None if none can.

    `max_objects` caps the edited scene (an add needs fewer objects than that).
    """
    order = list(kinds)
    rng.shuffle(order)
    for kind in order:
        if (edit := _RANDOM[kind](objects, rng, max_objects)) is not None:
            return edit
    return None


def infer_edit(before: list[dict], after: list[dict]) -> Edit | None:
    """The single edit that turns `before` into `after`, or None if no single edit does.

    Each kind leaves its own trace (one more / one fewer object; the same cells with one colour, one size or
    two objects exchanged; one object in a new cell), so the edit is unique; a swap's cells come sorted.
    """
    b, a = _by_cell(before), _by_cell(after)
    gone, new = sorted(set(b) - set(a)), sorted(set(a) - set(b))
    changed = sorted(c for c in set(a) & set(b) if a[c] != b[c])
    if not gone and len(new) == 1 and not changed:
        return Edit("add", new[0], color=a[new[0]][0], shape=a[new[0]][1], size=a[new[0]][2])
    if len(gone) == 1 and not new and not changed and a:
        return Edit("remove", gone[0])
    if len(gone) == 1 and len(new) == 1 and not changed and b[gone[0]] == a[new[0]]:
        return Edit("move", gone[0], to=new[0])
    if gone or new:
        return None
    if len(changed) == 2 and b[changed[0]] == a[changed[1]] and b[changed[1]] == a[changed[0]]:
        return Edit("swap", changed[0], to=changed[1])
    if len(changed) == 1:
        (c0, s0, z0), (c1, s1, z1) = b[changed[0]], a[changed[0]]
        if s0 == s1 and z0 == z1:
            return Edit("recolour", changed[0], color=c1)
        if c0 == c1 and s0 == s1:
            return Edit("resize", changed[0], size=z1)
    return None


# ---------------------------------------------------------------------------------------------
# "what changed?" questions over a scene pair


def _unique(obj: dict, objects: list[dict], *options: tuple[str, ...]) -> str | None:
    """The first of `options` (field tuples) whose values fit `obj` alone among `objects`, joined; or None."""
    for fields in options:
        if sum(all(o[f] == obj[f] for f in fields) for o in objects) == 1:
            return " ".join(obj[f] for f in fields)
    return None


# names from fields the edit leaves alone, so the name is the same in both scenes
_STABLE: dict[str, tuple[tuple[str, ...], ...]] = {
    "recolour": (("shape",), ("size", "shape")),
    "resize": (("shape",), ("color", "shape")),
    "move": (("shape",), ("color", "shape"), ("size", "color", "shape")),
}
_STABLE["swap"] = _STABLE["move"]


def _q_attribute(edit: Edit, before: list[dict], after: list[dict]) -> list[dict]:
    """recolour / resize: which object, where, its value now (and before / bigger or smaller)."""
    attr = "color" if edit.kind == "recolour" else "size"
    old = next(o for o in before if o["cell"] == edit.cell)
    new = next(o for o in after if o["cell"] == edit.cell)
    qa = [_qa(f"where did the {attr} change?", CELL_NAMES[edit.cell], "where")]
    name = _unique(old, before, *_STABLE[edit.kind])
    if name is None:
        return qa
    qa += [_qa(f"which shape changed {attr}?", name, "which"),
           _qa(f"what {attr} is the {name} now?", new[attr], "now")]
    if edit.kind == "recolour":
        qa.append(_qa(f"what color was the {name}?", old["color"], "before"))
    else:
        qa.append(_qa(f"did the {name} get bigger or smaller?", _COMPARATIVE[new["size"]][0], "how"))
    return qa


def _q_move(edit: Edit, before: list[dict], after: list[dict]) -> list[dict]:
    obj = next(o for o in before if o["cell"] == edit.cell)
    name = _unique(obj, before, *_STABLE["move"])
    if name is None:
        return [_qa("where did a shape move to?", CELL_NAMES[edit.to], "now"),
                _qa("where did a shape move from?", CELL_NAMES[edit.cell], "before")]
    return [_qa("which shape moved?", name, "which"),
            _qa(f"where is the {name} now?", CELL_NAMES[edit.to], "now"),
            _qa(f"where was the {name} before?", CELL_NAMES[edit.cell], "before")]


def _q_add_remove(edit: Edit, before: list[dict], after: list[dict]) -> list[dict]:
    scene, verb = (after, "added") if edit.kind == "add" else (before, "removed")
    obj = next(o for o in scene if o["cell"] == edit.cell)
    return [_qa(f"what was {verb}?", f"{obj['size']} {obj['color']} {obj['shape']}", "which"),
            _qa(f"where was a shape {verb}?", CELL_NAMES[edit.cell], "where"),
            _qa("how many shapes are there now?", NUMBERS[len(after)], "count")]


def _q_swap(edit: Edit, before: list[dict], after: list[dict]) -> list[dict]:
    pair = [next(o for o in before if o["cell"] == c) for c in (edit.cell, edit.to)]
    names = [_unique(o, before, *_STABLE["swap"]) for o in pair]
    qa = []
    for (name, other_name), other in ((names, pair[1]), (names[::-1], pair[0])):  # both directions
        if name is not None and other_name is not None:
            qa.append(_qa(f"what swapped with the {name}?", other_name, "which"))
        if name is not None:  # it is now where the other one was
            qa.append(_qa(f"where is the {name} now?", CELL_NAMES[other["cell"]], "now"))
    return qa


_QUESTIONS: dict[str, Callable[[Edit, list[dict], list[dict]], list[dict]]] = {
    "recolour": _q_attribute, "resize": _q_attribute, "move": _q_move, "add": _q_add_remove,
    "remove": _q_add_remove, "swap": _q_swap}


def what_changed(before: list[dict], after: list[dict], edit: Edit | None = None) -> list[dict]:
    """Questions about what one edit changed, {question, answer, type}, with exact 1-3 word answers.

    The pair determines them: `edit` (if given) must be the edit `infer_edit` finds, up to a swap's order,
    and the questions depend on the pair only. Types: what (the kind: 'color', 'position', 'added',
    'removed', 'size', 'swapped'), which (the object), where (its cell), now / before (a value after / before
    the edit), how ('bigger' / 'smaller'), count (objects after an add or a remove).
    """
    inferred = infer_edit(before, after)
    if inferred is None or (edit is not None and scene_key(edit.apply(before)) != scene_key(after)):
        raise ValueError(f"{'no single edit' if edit is None else edit} turns {scene_key(before)} into "
                         f"{scene_key(after)}")
    return [_qa("what changed?", CHANGE_WORDS[inferred.kind], "what"),
            *_QUESTIONS[inferred.kind](inferred, before, after)]


# ---------------------------------------------------------------------------------------------
# the exact checker


def check_edit(source_objects: list[dict], edit: Edit, image, image_size: int = 32) -> dict:
    """Score an edited image (PIL image or FloatTensor[3,H,W] in [0,1]) against `edit.apply(source_objects)`.

    The oracle reads the image (resized to `image_size` first, nearest neighbour). Returns `all_correct`
    (the read scene equals the expected one exactly: the same (cell, color, shape, size) set), `edited_ok`
    (every cell the edit changes holds what it should: the new object, or nothing where one left),
    `rest_unchanged` (every other cell as expected: untouched objects kept, nothing extra),
    `extra_objects` (objects read in cells the expected scene leaves empty), `missing_objects` (expected
    objects whose cell reads empty), `read` and `expected` (the two scene graphs).
    """
    from mmdlm.worlds.oracle import read_scene  # torch, only for checking

    expected = edit.apply(source_objects)
    read = read_scene(image, image_size=image_size)
    got, want = {o["cell"]: _look(o) for o in read}, _by_cell(expected)
    return {
        "all_correct": got == want,
        "edited_ok": all(got.get(c) == want.get(c) for c in edit.cells()),
        "rest_unchanged": all(got.get(c) == want.get(c) for c in range(9) if c not in edit.cells()),
        "extra_objects": sum(c not in want for c in got),
        "missing_objects": sum(c not in got for c in want),
        "read": read,
        "expected": expected,
    }


# ---------------------------------------------------------------------------------------------
# shards


@dataclass
class EditsConfig:
    """What `python -m mmdlm.worlds.edits` generates."""

    train: int = 20_000  # scene pairs, as many as the shapes world's scenes: seconds to write
    val: int = 1_000  # enough for edit accuracies with ~1-2% standard error
    seed: int = 0
    image_size: int = 32  # the shapes world's default: 64 image tokens per image with 4x4-px patches
    max_objects: int = 3  # per source scene (from 1): an add reaches 4, the most the oracle is validated on
    kinds: tuple[str, ...] = KINDS  # each sample's kind is drawn uniformly from these
    what_changed_fraction: float = 0.25  # share of what-changed samples; the rest are edits (the main task)
    questions_per_sample: int = 1  # a train what-changed sample asks 1..this of its pair's questions, all answers
    #   generated together (VQA's qa_per_sample): more answers per forward. Val keeps one: the evaluation asks one
    val_fraction: float = 0.1  # share of source scenes (by shapes.split_of) held out for val
    hold_out_results: bool = True  # results in the split too: no val scene (nor shapes val scene) seen in train
    shard_size: int = 1000  # samples per shard: several shards per split for workers and ranks

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise UserError(f"unknown edit kinds {','.join(unknown) or '(none)'}; choose from {','.join(KINDS)}")
        if not 1 <= self.max_objects <= 8:
            raise UserError(f"max_objects must be in 1..8 (an add needs a free cell), got {self.max_objects}")
        if self.max_objects < 2 and set(self.kinds) <= {"remove", "swap"}:
            raise UserError(f"edit kinds {','.join(self.kinds)} need source scenes of >= 2 objects (max_objects >= 2)")
        if self.image_size < 24:
            raise UserError(f"image_size {self.image_size} is too small for recognisable shapes (>= 24)")
        if not 0 <= self.what_changed_fraction <= 1 or not 0 < self.val_fraction < 1:
            raise UserError(f"what_changed_fraction must be in [0, 1] and val_fraction in (0, 1), got "
                            f"{self.what_changed_fraction} and {self.val_fraction}")
        if self.questions_per_sample < 1:
            raise UserError(f"questions_per_sample must be >= 1, got {self.questions_per_sample}")
        if self.train < 0 or self.val < 0 or self.shard_size < 1:
            raise UserError(f"train and val must be >= 0 and shard_size >= 1, got {self.train}, {self.val}, "
                            f"{self.shard_size}")


def iter_pairs(split: str, n: int, cfg: EditsConfig) -> Iterator[tuple[list[dict], Edit, random.Random]]:
    """n (source scene, edit, rng) of one split; the rng drew them and draws the sample's text.

    Each sample's kind is drawn first, then source scenes of the split and edits of that kind until one
    applies (remove and swap need two objects) and, with `hold_out_results`, its result is in the split
    too; so kinds are balanced. Each split has its own random stream (seeded by seed and split
    name) that rejects the other split's sources, so train does not change when --val does, and vice versa.
    """
    rng = random.Random(f"edits/{cfg.seed}/{split}")
    for _ in range(n):
        kind = rng.choice(cfg.kinds)
        while True:
            source = sample_scene(rng, 1, cfg.max_objects)
            if split_of(source, cfg.val_fraction) != split:
                continue
            edit = random_edit(source, rng, (kind,), cfg.max_objects + 1)
            if edit is not None and (not cfg.hold_out_results
                                     or split_of(edit.apply(source), cfg.val_fraction) == split):
                break
        yield source, edit, rng


def _png(objects: list[dict], image_size: int) -> bytes:
    buffer = io.BytesIO()
    render(objects, image_size).save(buffer, format="PNG")
    return buffer.getvalue()


def make_sample(source: list[dict], edit: Edit, rng: random.Random, image_size: int = 32,
                what_changed_sample: bool = False, split: str = "train", questions: int = 1) -> dict:
    """The webdataset members of one sample, without the key: `json`, `0.png` (source), `1.png` (edited). A
    what-changed sample asks one question of the pair, or with `questions` > 1, 1..questions distinct ones:
    [0.png, 1.png, q1, a1, q2, a2, ...] with the answers one target group (`targets` [[3, 5, ...]]: generated
    together, none given to another); its `question_type` is the first question's."""
    result = edit.apply(source)
    if what_changed_sample:
        pool = what_changed(source, result, edit)
        asked = [rng.choice(pool)] if questions == 1 else rng.sample(pool, rng.randint(1, min(questions, len(pool))))
        texts = [t for qa in asked for t in (qa["question"], qa["answer"])]
        answers = list(range(3, 2 + len(texts), 2))
        layout = {"kind": "what_changed", "texts": [None, None, *texts],
                  "images": ["0.png", "1.png", *[None] * len(texts)],
                  "targets": answers if len(answers) == 1 else [answers], "question_type": asked[0]["type"]}
    else:
        layout = {"kind": "edit", "texts": [None, edit.instruction(source, rng), None],
                  "images": ["0.png", None, "1.png"], "targets": [2]}
    # "source" names the data source, as the shapes world's json does (`mmdlm.worlds.scoring.world_for` reads it);
    # the scenes are "before" and "after"
    meta = {"source": SOURCE, **layout, "edit": edit.to_dict(), "before": source, "after": result, "split": split}
    return {"json": json.dumps(meta).encode(), "0.png": _png(source, image_size), "1.png": _png(result, image_size)}


def _new_stats() -> dict:
    return {"samples": 0, "kind": Counter(), "edit_kind": Counter(), "answers": Counter(),
            "source_objects": Counter(), "result_objects": Counter(), "max_text_words": 0}


def _update_stats(stats: dict, meta: dict) -> None:
    stats["samples"] += 1
    stats["kind"][meta["kind"]] += 1
    stats["edit_kind"][meta["edit"]["kind"]] += 1
    stats["source_objects"][len(meta["before"])] += 1
    stats["result_objects"][len(meta["after"])] += 1
    texts = [t for t in meta["texts"] if t is not None]
    stats["max_text_words"] = max(stats["max_text_words"], *(len(t.split()) for t in texts))
    if meta["kind"] == "what_changed":  # the answers' balance ("color", "top left", "three", ...)
        for answer in texts[1::2]:
            stats["answers"][answer] += 1


def write_edits(out: str | Path, cfg: EditsConfig, progress: bool = True) -> dict:
    """Write train/val shards (`out/{split}/edits-%06d.tar`), stats.json and README.md; returns the stats."""
    import webdataset as wds
    from tqdm import tqdm

    out = Path(out)
    start = time.perf_counter()
    stats: dict = {"config": asdict(cfg)}
    sources: dict[str, set] = {}
    results: dict[str, set] = {}
    bar = tqdm(total=cfg.train + cfg.val, desc="edits", unit="sample", disable=not progress)
    for split, n in (("train", cfg.train), ("val", cfg.val)):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("edits-*.tar"):  # a rerun with fewer samples leaves no extras
            stale.unlink()
        split_stats, sources[split], results[split] = _new_stats(), set(), set()
        # mtime=0: byte-identical shards for one seed
        with wds.ShardWriter(str(folder / "edits-%06d.tar"), maxcount=cfg.shard_size, verbose=0, mtime=0) as sink:
            for i, (source, edit, rng) in enumerate(iter_pairs(split, n, cfg)):
                sample = make_sample(source, edit, rng, cfg.image_size, rng.random() < cfg.what_changed_fraction,
                                     split, cfg.questions_per_sample if split == "train" else 1)
                sink.write({"__key__": f"edits-{split}-{i:06d}", **sample})
                meta = json.loads(sample["json"])
                _update_stats(split_stats, meta)
                sources[split].add(scene_key(source))
                results[split].add(scene_key(meta["after"]))
                bar.update()
        split_stats["distinct_sources"] = len(sources[split])
        split_stats["shards"] = len(list(folder.glob("edits-*.tar")))
        stats[split] = split_stats
    bar.close()
    scenes = {split: sources[split] | results[split] for split in sources}
    stats["overlap"] = {  # distinct scenes in both; sources is 0 by construction, the rest are measured
        "sources": len(sources["train"] & sources["val"]),
        "val_sources_in_train_results": len(sources["val"] & results["train"]),
        "val_results_in_train_sources": len(results["val"] & sources["train"]),
        "val_results_in_train_results": len(results["val"] & results["train"]),
        "val_scenes_in_train_scenes": len(scenes["val"] & scenes["train"]),
        "val_scenes": len(scenes["val"]),
    }
    stats["seconds"] = round(time.perf_counter() - start, 2)
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    (out / "README.md").write_text(_readme(stats))
    return stats


def _readme(stats: dict) -> str:
    cfg, overlap = stats["config"], stats["overlap"]
    lines = [
        "# edits shards (the shapes world's image-editing recipe)",
        "",
        f"Written by `python -m mmdlm.worlds.edits --out <dir> --train {cfg['train']} --val {cfg['val']} "
        f"--seed {cfg['seed']} --image-size {cfg['image_size']} --max-objects {cfg['max_objects']} "
        f"--kinds {','.join(cfg['kinds'])} --what-changed-fraction {cfg['what_changed_fraction']} "
        f"--questions-per-sample {cfg['questions_per_sample']} "
        f"--val-fraction {cfg['val_fraction']} --{'' if cfg['hold_out_results'] else 'no-'}hold-out-results "
        f"--shard-size {cfg['shard_size']}`.",
        "",
        "Each sample: `json` + `0.png` (source scene) + `1.png` (edited scene). The json is an interleaved "
        "document (`texts` / `images`, one entry per segment, `targets`: the segments generated) with `kind`, "
        "`edit` (`Edit.from_dict`), `source`, `result` and `split`. Edit: [0.png, instruction, 1.png], "
        "targets [2]; what_changed: [0.png, 1.png, question, answer], targets [3] (with several questions, "
        "[0.png, 1.png, q1, a1, q2, a2, ...], targets [[3, 5, ...]]: the answers generated together).",
        "",
        f"Held out by source scene{' and result scene' if cfg['hold_out_results'] else ''}: train/val source "
        f"overlap {overlap['sources']}; {overlap['val_scenes_in_train_scenes']} of the {overlap['val_scenes']} "
        "distinct val scenes (sources and results) also occur in train (stats.json: `overlap`).",
        "",
        "| split | samples | shards | edit / what_changed | per edit kind |",
        "| --- | --- | --- | --- | --- |",
    ]
    for split in ("train", "val"):
        s = stats[split]
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(s["edit_kind"].items()))
        lines.append(f"| {split} | {s['samples']} | {s['shards']} | {s['kind'].get('edit', 0)} / "
                     f"{s['kind'].get('what_changed', 0)} | {kinds} |")
    lines += ["", "Objects per source and result scene, longest text (words), what-changed answers: `stats.json`.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Write the shapes world's image edits as webdataset shards: DIR/{train,val}/edits-*.tar, stats.json, README.md.

    python -m mmdlm.worlds.edits --out data/shards/edits --train 20000 --val 1000 --seed 0
    python -m mmdlm.worlds.edits --out /tmp/edits --train 200 --val 20 --kinds recolour,move --quiet
    """
    defaults = EditsConfig()
    parser = argparse.ArgumentParser(prog="python -m mmdlm.worlds.edits", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=defaults.train, help="train samples (one scene pair each)")
    parser.add_argument("--val", type=int, default=defaults.val, help="val samples (held-out source scenes)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help="side in pixels (geometry scales; 32 and 64 are validated by the oracle)")
    parser.add_argument("--max-objects", type=int, default=defaults.max_objects,
                        help="objects per source scene, from 1 (an add makes one more)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma-separated edit kinds to draw from")
    parser.add_argument("--what-changed-fraction", type=float, default=defaults.what_changed_fraction,
                        help="share of samples that ask a what-changed question instead of an edit")
    parser.add_argument("--questions-per-sample", type=int, default=defaults.questions_per_sample,
                        help="a train what-changed sample asks 1..N of its pair's questions, answered together "
                             "(val asks one)")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction,
                        help="share of source scenes held out for val")
    parser.add_argument("--hold-out-results", action=argparse.BooleanOptionalAction,
                        default=defaults.hold_out_results,
                        help="redraw pairs whose result scene hashes to the other split (no val scene in train)")
    parser.add_argument("--shard-size", type=int, default=defaults.shard_size, help="samples per shard")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        cfg = EditsConfig(train=args.train, val=args.val, seed=args.seed, image_size=args.image_size,
                          max_objects=args.max_objects, kinds=tuple(k.strip() for k in args.kinds.split(",")),
                          what_changed_fraction=args.what_changed_fraction,
                          questions_per_sample=args.questions_per_sample, val_fraction=args.val_fraction,
                          hold_out_results=args.hold_out_results, shard_size=args.shard_size)
    except UserError as err:
        parser.exit(2, f"error: {err}\n")
    stats = write_edits(args.out, cfg, progress=not args.quiet)
    print(f"wrote {stats['train']['samples']} train / {stats['val']['samples']} val samples to {args.out} "
          f"in {stats['seconds']} s (train/val source overlap: {stats['overlap']['sources']}; val scenes also "
          f"in train: {stats['overlap']['val_scenes_in_train_scenes']} of {stats['overlap']['val_scenes']})")


if __name__ == "__main__":
    main()
