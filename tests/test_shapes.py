"""The shapes world: determinism, held-out split, captions/answers that agree with the scene graph
(checked by an independent reader of the questions) and with the pixels."""

import hashlib
import io
import json
import random
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdlm.worlds.shapes import (
    CELL_NAMES,
    COLORS,
    NUMBERS,
    PLURALS,
    SHAPES,
    SIZES,
    ShapesConfig,
    caption,
    main,
    make_object,
    make_questions,
    object_box,
    paraphrase,
    parse_caption,
    render,
    sample_scene,
    scene_key,
    split_of,
    write_shapes,
)

CFG = ShapesConfig(train=120, val=30, seed=3, shard_size=40, max_objects=3)


def read_tars(folder: Path) -> dict[str, dict]:
    """key -> {ext: bytes} of every tar in a folder, read with tarfile (not with the code under test)."""
    samples: dict[str, dict] = {}
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    return out, write_shapes(out, CFG, progress=False)


def test_generation_is_deterministic(shards, tmp_path) -> None:
    out, _ = shards
    write_shapes(tmp_path / "again", CFG, progress=False)
    write_shapes(tmp_path / "other", ShapesConfig(**{**CFG.__dict__, "seed": 4}), progress=False)
    for split in ("train", "val"):
        files = sorted(p.name for p in (out / split).glob("*.tar"))
        assert files == sorted(p.name for p in (tmp_path / "again" / split).glob("*.tar"))
        for name in files:  # byte-identical shards for one seed
            assert (out / split / name).read_bytes() == (tmp_path / "again" / split / name).read_bytes()
    assert read_tars(out / "train") != read_tars(tmp_path / "other" / "train")


def test_shards_counts_and_stats(shards) -> None:
    out, stats = shards
    train, val = read_tars(out / "train"), read_tars(out / "val")
    assert len(train) == CFG.train and len(val) == CFG.val
    assert len(list((out / "train").glob("shapes-train-*.tar"))) == 3  # 120 / shard_size 40
    assert all("." not in key for key in train)
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["train"]["samples"] == CFG.train and on_disk["val"]["samples"] == CFG.val
    objects = [json.loads(s["json"])["objects"] for s in train.values()]
    assert on_disk["train"]["color"] == dict(Counter(o["color"] for obj in objects for o in obj))
    assert on_disk["train"]["objects_per_scene"] == {str(k): v for k, v in Counter(map(len, objects)).items()}
    assert "overlap: 0" in (out / "README.md").read_text()
    assert stats["train"]["question_type"]["exist"] == CFG.train


def test_val_scenes_never_in_train(shards) -> None:
    out, stats = shards
    keys = {split: {scene_key(json.loads(s["json"])["objects"]) for s in read_tars(out / split).values()}
            for split in ("train", "val")}
    assert keys["train"] and keys["val"]
    assert not keys["train"] & keys["val"]
    assert stats["train_val_scene_overlap"] == 0
    assert all(split_of([make_object(c, sh, si, cell) for cell, c, sh, si in k]) == "val" for k in keys["val"])


def test_split_is_a_stable_md5_hash() -> None:
    objects = [make_object("red", "circle", "large", 0)]
    digest = hashlib.md5(json.dumps(scene_key(objects)).encode()).hexdigest()
    assert split_of(objects) == ("val" if int(digest[:8], 16) / 2**32 < 0.1 else "train")
    rng = random.Random(0)
    share = np.mean([split_of(sample_scene(rng, 2, 2)) == "val" for _ in range(3000)])
    assert 0.07 < share < 0.13


def test_shard_images_are_the_renders_of_their_graphs(shards) -> None:
    out, _ = shards
    for sample in list(read_tars(out / "val").values())[:20]:
        meta = json.loads(sample["json"])
        image = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert image.shape == (32, 32, 3)
        assert np.array_equal(image, np.asarray(render(meta["objects"], 32)))
        assert meta["source"] == "shapes" and meta["captions"][0] == caption(meta["objects"])
        assert all(parse_caption(c) == meta["objects"] for c in meta["captions"])


@pytest.mark.parametrize("image_size", [32, 64])
def test_pixels_agree_with_the_graph(image_size: int) -> None:
    rng = random.Random(image_size)
    for _ in range(50):
        objects = sample_scene(rng, 1, 5)
        image = np.asarray(render(objects, image_size))
        covered = np.zeros(image.shape[:2], bool)
        for obj in objects:
            x0, y0, side = object_box(obj["cell"], obj["size"], image_size)
            assert tuple(image[y0 + side // 2, x0 + side // 2]) == COLORS[obj["color"]]  # the centre
            box = image[y0:y0 + side, x0:x0 + side].reshape(-1, 3)
            colours = {tuple(p) for p in box} - {(0, 0, 0)}
            assert colours == {COLORS[obj["color"]]}  # exact palette colour, no anti-aliasing
            covered[y0:y0 + side, x0:x0 + side] = True
        assert not image[~covered].any()  # black everywhere else


def test_geometry_scales_and_shapes_differ() -> None:
    def area(shape: str, size: str, image_size: int) -> int:
        return int((np.asarray(render([make_object("white", shape, size, 4)], image_size)) > 0).any(2).sum())

    for image_size in (32, 64):
        areas = {(shape, size): area(shape, size, image_size) for shape in SHAPES for size in SIZES}
        assert len(set(areas.values())) == len(areas)  # every shape x size is a different pixel set
        assert all(areas[s, "large"] > 2 * areas[s, "small"] for s in SHAPES)
        assert areas["square", "large"] == object_box(4, "large", image_size)[2] ** 2
    for size in SIZES:  # sides scale with the image (odd integers, so not exactly 2x)
        assert 1.8 < object_box(4, size, 64)[2] / object_box(4, size, 32)[2] < 2.3


def test_parse_caption_round_trips_and_rejects() -> None:
    rng = random.Random(1)
    for _ in range(300):
        objects = sample_scene(rng, 1, 9)
        assert parse_caption(caption(objects)) == objects
        assert parse_caption(paraphrase(objects, rng)) == objects
    assert caption([make_object("red", "circle", "large", 0), make_object("blue", "square", "small", 4)]) == (
        "a large red circle at the top left and a small blue square in the middle")
    assert caption([make_object("green", "cross", "small", 7)]) == "a small green cross at the bottom"
    assert parse_caption("A small green cross at the bottom.") == [make_object("green", "cross", "small", 7)]
    for bad in ("", "a small green cross", "a small purple cross at the top",
                "a small red circle at the top and a large blue cross at the top",  # two in one cell
                "a small red circle at the top and", "a small red circle at the top and a dog"):
        assert parse_caption(bad) is None, bad


# --- an independent reader of the questions, to check every answer from the scene graph ---------
_ATTRS = {**{c: "color" for c in COLORS}, **{s: "shape" for s in SHAPES}, **{s: "size" for s in SIZES}}
_WHERE = re.compile(r"(.*?)(?: (?:at|in|on) the (" + "|".join(sorted(CELL_NAMES, key=len, reverse=True)) + "))?")


def select(objects: list[dict], description: str) -> list[dict]:
    """Objects matching 'small red circle at the top' (attribute words, optional position)."""
    words, where = _WHERE.fullmatch(description).groups()
    wanted = [(_ATTRS[w], w) for w in words.split()]
    return [o for o in objects if all(o[f] == w for f, w in wanted) and where in (None, o["position"])]


def only(found: list[dict], question: str) -> dict:
    assert len(found) == 1, f"ambiguous or missing referent in {question!r}"
    return found[0]


def expected_answer(objects: list[dict], question: str) -> str:
    """The answer to a generated question, computed from the scene graph by regexes and filters."""

    def one(description: str) -> dict:
        return only(select(objects, description), question)

    def relation(direction: str, description: str) -> str:
        ref = one(description)
        axis, sign = {"left of": (1, -1), "right of": (1, 1), "above": (0, -1), "below": (0, 1)}[direction]
        found = [o for o in objects
                 if o is not ref and (divmod(o["cell"], 3)[axis] - divmod(ref["cell"], 3)[axis]) * sign > 0]
        assert len(found) <= 1, f"ambiguous relation in {question!r}"
        return " ".join(found[0][f] for f in ("size", "color", "shape")) if found else "nothing"

    patterns = [
        (r"what color is the (.+)\?", lambda d: one(d)["color"]),
        (r"what shape is (?:at|in|on) the (.+)\?",
         lambda where: only([o for o in objects if o["position"] == where], question)["shape"]),
        (r"where is the (.+)\?", lambda d: one(d)["position"]),
        (r"what size is the (.+)\?", lambda d: one(d)["size"]),
        (r"how many shapes are there\?", lambda: NUMBERS[len(objects)]),
        (r"how many (\w+) shapes are there\?", lambda c: NUMBERS[sum(o["color"] == c for o in objects)]),
        (r"how many (\w+) are there\?", lambda p: NUMBERS[sum(PLURALS[o["shape"]] == p for o in objects)]),
        (r"is there an? (.+)\?", lambda d: "yes" if select(objects, d) else "no"),
        (r"what is (left of|right of|above|below) the (.+)\?", relation),
    ]
    for pattern, answer in patterns:
        match = re.fullmatch(pattern, question)
        if match:
            return answer(*match.groups())
    raise AssertionError(f"question not understood: {question!r}")


def test_answers_agree_with_the_graph() -> None:
    rng = random.Random(2)
    types, exist, relation = Counter(), Counter(), Counter()
    for _ in range(600):
        objects = sample_scene(rng, 1, 4)
        qa = make_questions(objects, rng)
        assert len({q["type"] for q in qa}) == len(qa)  # distinct types
        for q in qa:
            expected = expected_answer(objects, q["question"])
            if q["type"] == "relation" and q["answer"] != "nothing":  # answers name the object minimally
                assert only(select(objects, q["answer"]), q["answer"]) == only(select(objects, expected), q), q
            else:
                assert q["answer"] == expected, (objects, q)
            types[q["type"]] += 1
            exist[q["answer"]] += q["type"] == "exist"
            relation[q["answer"] == "nothing"] += q["type"] == "relation"
    assert set(types) == {"color", "shape", "position", "count", "exist", "size", "relation"}
    assert types["color"] == types["shape"] == types["count"] == types["exist"] == types["size"] == 600
    assert abs(exist["yes"] - exist["no"]) < 80  # balanced
    assert relation[False] > 100  # relational questions often name an object, not just "nothing"


def test_cli_help_and_arguments(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Write the shapes world" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--min-objects", "3", "--max-objects", "2"])
    main(["--out", str(tmp_path), "--train", "5", "--val", "2", "--image-size", "64", "--quiet"])
    sample = next(iter(read_tars(tmp_path / "train").values()))
    assert Image.open(io.BytesIO(sample["png"])).size == (64, 64)
