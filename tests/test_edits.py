"""The shapes world's editing recipe: each edit does what it says and nothing else, instructions name one
object and fit the text budget, what-changed answers follow from the scene pair (checked by an independent
reader of the questions), the oracle checker passes ground-truth edits and fails wrong ones, and the shards
follow the interleaved format with a held-out split by source scene."""

import copy
import io
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmdlm.worlds.edits import (
    CHANGE_WORDS,
    KINDS,
    Edit,
    EditsConfig,
    check_edit,
    infer_edit,
    iter_pairs,
    main,
    random_edit,
    refer,
    what_changed,
)
from mmdlm.worlds.shapes import (
    CELL_NAMES,
    COLORS,
    SHAPES,
    SIZES,
    make_object,
    render,
    sample_scene,
    scene_key,
    split_of,
)
from tests.test_shapes import read_tars  # tarfile, not the code under test

# a small red circle top left, a large blue square in the middle, a small red square bottom right
SCENE = [make_object("red", "circle", "small", 0), make_object("blue", "square", "large", 4),
         make_object("red", "square", "small", 8)]


def looks(objects: list[dict]) -> set[tuple]:
    return set(scene_key(objects))


def random_pairs(n: int, seed: int = 0, max_objects: int = 3) -> list[tuple[list[dict], Edit]]:
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        source = sample_scene(rng, 1, max_objects)
        if (edit := random_edit(source, rng, max_objects=max_objects + 1)) is not None:
            pairs.append((source, edit))
    return pairs


@pytest.mark.parametrize("edit, changed", [
    (Edit("recolour", 4, color="green"), {(4, "green", "square", "large")}),
    (Edit("resize", 0, size="large"), {(0, "red", "circle", "large")}),
    (Edit("move", 0, to=2), {(2, "red", "circle", "small")}),
    (Edit("add", 6, color="white", shape="cross", size="large"), {(6, "white", "cross", "large")}),
    (Edit("remove", 4), set()),
    (Edit("swap", 0, to=8), {(0, "red", "square", "small"), (8, "red", "circle", "small")}),
])
def test_each_edit_changes_its_object_only_and_never_its_input(edit: Edit, changed: set) -> None:
    before = copy.deepcopy(SCENE)
    after = edit.apply(SCENE)
    assert SCENE == before  # the input is untouched
    kept = {o for o in looks(SCENE) if o[0] not in edit.cells()}
    assert looks(after) == kept | changed
    assert all(o["position"] == CELL_NAMES[o["cell"]] for o in after)
    assert [o["cell"] for o in after] == sorted(o["cell"] for o in after)
    after[0]["color"] = "cyan"  # nor does the output share dicts with the input
    assert SCENE == before
    assert infer_edit(SCENE, edit.apply(SCENE)) == edit
    assert Edit.from_dict(json.loads(json.dumps(edit.to_dict()))) == edit


@pytest.mark.parametrize("edit", [
    Edit("recolour", 0, color="red"),  # already red
    Edit("resize", 4, size="large"),  # already large
    Edit("move", 0, to=4),  # taken
    Edit("add", 8, color="red", shape="circle", size="small"),  # taken
    Edit("remove", 5),  # empty cell
    Edit("swap", 0, to=1),  # empty cell
])
def test_edits_that_cannot_apply_are_refused(edit: Edit) -> None:
    assert edit.problem(SCENE) is not None
    with pytest.raises(ValueError, match="cannot apply"):
        edit.apply(SCENE)


def test_degenerate_edits_are_refused() -> None:
    twins = [make_object("red", "circle", "small", 0), make_object("red", "circle", "small", 1)]
    assert Edit("swap", 0, to=1).problem(twins) is not None  # a no-op
    assert Edit("remove", 0).problem(twins[:1]) is not None  # would leave an empty scene
    assert random_edit(twins, random.Random(0), kinds=("swap",)) is None
    assert random_edit(twins[:1], random.Random(0), kinds=("remove", "swap")) is None
    assert random_edit(twins, random.Random(0), kinds=("add",), max_objects=2) is None
    for bad in ({"kind": "paint", "cell": 0}, {"kind": "recolour", "cell": 0},
                {"kind": "move", "cell": 0, "to": 0}, {"kind": "recolour", "cell": 0, "color": "pink"},
                {"kind": "remove", "cell": 0, "size": "small"}, {"kind": "remove", "cell": 9},
                {"kind": "remove", "cell": 0, "colour": "red"}, {"kind": "remove"}):
        with pytest.raises(ValueError):
            Edit.from_dict(bad)


def test_random_edits_are_valid_and_cover_every_kind() -> None:
    pairs = random_pairs(600)
    assert {edit.kind for _, edit in pairs} == set(KINDS)
    for source, edit in pairs:
        after = edit.apply(source)
        assert looks(after) != looks(source) and 1 <= len(after) <= 4
        inferred = infer_edit(source, after)  # the pair alone determines the edit
        assert inferred == edit or (edit.kind == "swap" and inferred.cells() == edit.cells())


# an independent reader of names: 'red circle', 'small red circle', 'circle', 'top left shape'
def resolve(name: str, objects: list[dict]) -> list[dict]:
    for cell, place in enumerate(CELL_NAMES):
        if name == f"{place} shape":
            return [o for o in objects if o["cell"] == cell]
    words = set(name.split())
    assert words <= set(COLORS) | set(SHAPES) | set(SIZES), name
    return [o for o in objects if words <= {o["color"], o["shape"], o["size"]}]


def test_instructions_name_the_object_uniquely_and_fit() -> None:
    from conftest import shapes_texts

    from mmdlm.text_tokenizer import BPETokenizer

    # the project's small BPE trained on shapes text only (no edit words): the worst case for edit text
    tok = BPETokenizer.train(shapes_texts(), vocab_size=512)
    rng = random.Random(1)
    longest = {"words": 0, "tokens": 0}
    for source, edit in random_pairs(600, seed=1):
        text = edit.instruction(source, rng)
        if edit.kind != "add":
            obj = next(o for o in source if o["cell"] == edit.cell)
            name = refer(obj, source)
            assert resolve(name, source) == [obj]
            assert f"the {name}" in text
        if edit.kind == "swap":
            other = next(o for o in source if o["cell"] == edit.to)
            assert resolve(refer(other, source), source) == [other]
        longest["words"] = max(longest["words"], len(text.split()))
        longest["tokens"] = max(longest["tokens"], len(tok.encode(text)))
    assert longest["words"] <= 12 and longest["tokens"] <= 24, longest
    twins = [make_object("red", "circle", "small", 0), make_object("red", "circle", "small", 4)]
    assert Edit("remove", 4).instruction(twins, random.Random(0)).endswith("the middle shape")


def test_what_changed_examples() -> None:
    def qa(edit: Edit) -> dict[str, str]:
        return {q["question"]: q["answer"] for q in what_changed(SCENE, edit.apply(SCENE), edit)}

    assert qa(Edit("recolour", 0, color="blue")) == {
        "what changed?": "color", "where did the color change?": "top left", "which shape changed color?": "circle",
        "what color is the circle now?": "blue", "what color was the circle?": "red"}
    assert qa(Edit("resize", 4, size="small")) == {  # two squares: named by colour
        "what changed?": "size", "where did the size change?": "middle", "which shape changed size?": "blue square",
        "what size is the blue square now?": "small", "did the blue square get bigger or smaller?": "smaller"}
    assert qa(Edit("move", 8, to=2)) == {
        "what changed?": "position", "which shape moved?": "red square",
        "where is the red square now?": "top right", "where was the red square before?": "bottom right"}
    assert qa(Edit("add", 6, color="white", shape="cross", size="large")) == {
        "what changed?": "added", "what was added?": "large white cross", "where was a shape added?": "bottom left",
        "how many shapes are there now?": "four"}
    assert qa(Edit("remove", 4))["what was removed?"] == "large blue square"
    assert qa(Edit("remove", 4))["how many shapes are there now?"] == "two"
    assert qa(Edit("swap", 0, to=4)) == {
        "what changed?": "swapped", "what swapped with the circle?": "blue square",
        "what swapped with the blue square?": "circle", "where is the circle now?": "middle",
        "where is the blue square now?": "top left"}
    with pytest.raises(ValueError):
        what_changed(SCENE, SCENE)  # no single edit


def answer(question: str, before: list[dict], after: list[dict]) -> str | None:
    """Answer a what-changed question from the two scenes alone, reading it with regexes (None: a question
    whose answer names an object, checked by the caller)."""
    gone = [o for o in before if scene_key([o])[0] not in looks(after)]  # objects as they were, where they were
    new = [o for o in after if scene_key([o])[0] not in looks(before)]
    if question == "what changed?":
        if len(gone) != len(new):
            return "added" if len(new) > len(gone) else "removed"
        if len(gone) == 2:
            return "swapped"
        [old], [now] = gone, new
        return "position" if old["cell"] != now["cell"] else "color" if old["color"] != now["color"] else "size"
    if question == "how many shapes are there now?":
        return ["zero", "one", "two", "three", "four", "five"][len(after)]
    if m := re.fullmatch(r"what (color|size) is the (.+) now\?", question):
        [obj] = resolve(m[2], after)
        return obj[m[1]]
    if m := re.fullmatch(r"what color was the (.+)\?", question):
        [obj] = resolve(m[1], before)
        return obj["color"]
    if m := re.fullmatch(r"did the (.+) get bigger or smaller\?", question):
        [obj] = resolve(m[1], after)
        return "bigger" if obj["size"] == "large" else "smaller"
    if m := re.fullmatch(r"where (?:is|was) the (.+?) (now|before)\?", question):
        [obj] = resolve(m[1], after if m[2] == "now" else before)
        return obj["position"]
    if question in ("what was added?", "what was removed?"):
        [obj] = new if "added" in question else gone
        return f"{obj['size']} {obj['color']} {obj['shape']}"
    if re.fullmatch(r"where (?:did the (?:color|size) change|was a shape (?:added|removed))\?", question):
        [cell] = {o["cell"] for o in gone + new}
        return CELL_NAMES[cell]
    if question in ("where did a shape move to?", "where did a shape move from?"):
        [obj] = new if question.endswith("to?") else gone
        return obj["position"]
    assert re.fullmatch(r"which shape (?:moved|changed (?:color|size))\?|what swapped with the .+\?", question)
    return None


def test_what_changed_answers_follow_from_the_pair() -> None:
    types = set()
    for source, edit in random_pairs(400, seed=2):
        after = edit.apply(source)
        questions = what_changed(source, after, edit)
        assert questions == what_changed(source, after)  # the pair alone determines them
        assert questions[0] == {"question": "what changed?", "answer": CHANGE_WORDS[edit.kind], "type": "what"}
        for qa in questions:
            types.add(qa["type"])
            assert 1 <= len(qa["answer"].split()) <= 3 and len(qa["question"].split()) <= 9
            expected = answer(qa["question"], source, after)
            if expected is not None:
                assert qa["answer"] == expected, (qa, source, after)
                continue
            [obj] = resolve(qa["answer"], source)  # the answer names one object, in both scenes
            assert len(resolve(qa["answer"], after)) == 1
            if m := re.fullmatch(r"what swapped with the (.+)\?", qa["question"]):
                [partner] = resolve(m[1], source)  # each now stands where the other stood
                assert scene_key(after) == scene_key(Edit("swap", obj["cell"], to=partner["cell"]).apply(source))
            else:
                assert obj["cell"] == edit.cell  # the object that moved or changed
    assert types == {"what", "which", "where", "now", "before", "how", "count"}


def test_ground_truth_edits_pass_the_checker() -> None:
    """The oracle reads >= 99% of objects on ground-truth renders (oracle.validate, tests/test_oracle.py);
    scored per scene here with the same 99% bar (measured: 1000 of 1000 at 32 and 64 px)."""
    pairs = random_pairs(300, seed=3)
    results = [check_edit(source, edit, render(edit.apply(source), 32)) for source, edit in pairs]
    assert np.mean([r["all_correct"] for r in results]) >= 0.99
    for r in results:
        if r["all_correct"]:
            assert r["edited_ok"] and r["rest_unchanged"] and r["extra_objects"] == r["missing_objects"] == 0
    source, edit = pairs[0]
    big = render(edit.apply(source), 64)  # resized to the image size before reading
    assert check_edit(source, edit, big, image_size=32)["all_correct"]
    assert check_edit(source, edit, render(edit.apply(source), 64), image_size=64)["all_correct"]


def test_wrong_images_fail_the_checker() -> None:
    unedited = render(SCENE)
    for edit in (Edit("recolour", 4, color="green"), Edit("move", 0, to=2), Edit("swap", 0, to=4),
                 Edit("resize", 8, size="large")):
        r = check_edit(SCENE, edit, unedited)
        assert not r["all_correct"] and not r["edited_ok"] and r["rest_unchanged"], edit
    add = Edit("add", 6, color="white", shape="cross", size="large")
    r = check_edit(SCENE, add, unedited)
    assert (r["all_correct"], r["edited_ok"], r["missing_objects"], r["extra_objects"]) == (False, False, 1, 0)
    r = check_edit(SCENE, Edit("remove", 4), unedited)
    assert (r["all_correct"], r["edited_ok"], r["missing_objects"], r["extra_objects"]) == (False, False, 0, 1)
    # the edit done right, plus an object nobody asked for: edited_ok, but the rest changed
    recolour = Edit("recolour", 4, color="green")
    extra = render(recolour.apply(SCENE) + [make_object("cyan", "cross", "small", 1)])
    r = check_edit(SCENE, recolour, extra)
    assert (r["all_correct"], r["edited_ok"], r["rest_unchanged"], r["extra_objects"]) == (False, True, False, 1)
    # the right object edited wrongly (blue instead of green); the rest intact
    r = check_edit(SCENE, recolour, render(Edit("recolour", 4, color="cyan").apply(SCENE)))
    assert (r["edited_ok"], r["rest_unchanged"]) == (False, True)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("edits")
    main(["--out", str(out), "--train", "20", "--val", "5", "--seed", "1", "--shard-size", "8",
          "--what-changed-fraction", "0.5", "--quiet"])
    return out


def test_shards_follow_the_document_format(shards) -> None:
    train, val = read_tars(shards / "train"), read_tars(shards / "val")
    assert len(train) == 20 and len(val) == 5
    assert sorted(p.name for p in (shards / "train").glob("*.tar")) == [
        "edits-000000.tar", "edits-000001.tar", "edits-000002.tar"]
    stats = json.loads((shards / "stats.json").read_text())
    kinds = set()
    for split, samples in (("train", train), ("val", val)):
        for key, sample in samples.items():
            assert "." not in key and set(sample) == {"json", "0.png", "1.png"}
            meta = json.loads(sample["json"])
            assert meta["source"] == "shapes-edits"
            assert set(meta) - {"question_type"} == {"texts", "images", "targets", "kind", "edit", "source", "before",
                                                     "after", "split"}
            assert ("question_type" in meta) == (meta["kind"] == "what_changed")
            assert meta["split"] == split and len(meta["texts"]) == len(meta["images"])
            assert all((t is None) != (i is None) for t, i in zip(meta["texts"], meta["images"]))
            kinds.add(meta["kind"])
            if meta["kind"] == "edit":
                assert meta["images"] == ["0.png", None, "1.png"] and meta["targets"] == [2]
                assert isinstance(meta["texts"][1], str)
            else:
                assert meta["images"] == ["0.png", "1.png", None, None] and meta["targets"] == [3]
                question, reply = meta["texts"][2:]
                assert {"question": question, "answer": reply} in [
                    {k: qa[k] for k in ("question", "answer")} for qa in what_changed(meta["before"], meta["after"])]
            edit = Edit.from_dict(meta["edit"])
            assert edit.apply(meta["before"]) == meta["after"]
            for member, scene in (("0.png", meta["before"]), ("1.png", meta["after"])):
                image = np.asarray(Image.open(io.BytesIO(sample[member])))
                assert image.shape == (32, 32, 3) and np.array_equal(image, np.asarray(render(scene, 32)))
        assert stats[split]["samples"] == len(samples)
        assert sum(stats[split]["edit_kind"].values()) == len(samples)
    assert kinds == {"edit", "what_changed"}
    assert "source overlap 0; 0 of the" in (shards / "README.md").read_text()
    assert stats["overlap"]["val_scenes_in_train_scenes"] == 0


def test_train_samples_ask_several_questions_answered_together(tmp_path) -> None:
    """--questions-per-sample 3: a train what-changed sample asks 1..3 distinct questions of its pair, the answers
    one target group; val asks one (the evaluation's layout); the data loader reads the groups."""
    from mmdlm.eval.records import load_records

    main(["--out", str(tmp_path), "--train", "40", "--val", "6", "--seed", "2", "--what-changed-fraction", "1",
          "--questions-per-sample", "3", "--quiet"])
    counts = set()
    for split in ("train", "val"):
        for sample in read_tars(tmp_path / split).values():
            meta = json.loads(sample["json"])
            questions = meta["texts"][2::2]
            pairs = [{"question": q, "answer": a} for q, a in zip(questions, meta["texts"][3::2])]
            truth = [{k: qa[k] for k in ("question", "answer")} for qa in what_changed(meta["before"], meta["after"])]
            assert all(pair in truth for pair in pairs) and len(set(questions)) == len(questions)
            counts.add((split, len(pairs)))
            answers = list(range(3, 2 + 2 * len(pairs), 2))
            assert meta["targets"] == (answers if len(pairs) == 1 else [answers])
    assert {n for split, n in counts if split == "train"} == {1, 2, 3} and {n for s, n in counts if s == "val"} == {1}
    records = load_records(str(tmp_path / "train" / "*.tar"), image_size=32)
    assert len(records) == 40 and any(isinstance(r["targets"][0], list) for r in records)


def test_generation_is_deterministic(shards, tmp_path) -> None:
    main(["--out", str(tmp_path), "--train", "20", "--val", "5", "--seed", "1", "--shard-size", "8",
          "--what-changed-fraction", "0.5", "--quiet"])
    for split in ("train", "val"):
        for path in (shards / split).glob("*.tar"):
            assert path.read_bytes() == (tmp_path / split / path.name).read_bytes()


def held_out_overlap(hold_out_results: bool) -> dict[str, int]:
    """Distinct scenes shared by the splits over 5000 train / 500 val pairs (the numbers in the module docstring)."""
    cfg = EditsConfig(train=5000, val=500, hold_out_results=hold_out_results)
    sources, results = {}, {}
    for split, n in (("train", cfg.train), ("val", cfg.val)):
        pairs = [(source, edit) for source, edit, _ in iter_pairs(split, n, cfg)]
        assert all(split_of(source) == split for source, _ in pairs)
        sources[split] = {scene_key(source) for source, _ in pairs}
        results[split] = {scene_key(edit.apply(source)) for source, edit in pairs}
    val_scenes = sources["val"] | results["val"]
    return {"sources": len(sources["train"] & sources["val"]),
            "val_sources_in_train_results": len(sources["val"] & results["train"]),
            "val_results_in_train_sources": len(results["val"] & sources["train"]),
            "val_scenes_in_train": len(val_scenes & (sources["train"] | results["train"])),
            "val_scenes": len(val_scenes)}


def test_val_scenes_never_occur_in_train() -> None:
    """Held out by source and (by default) result scene; holding out sources only leaves ~18% of val scenes
    in train (printed with -s), mostly one- and two-object scenes."""
    held_out = held_out_overlap(hold_out_results=True)
    sources_only = held_out_overlap(hold_out_results=False)
    print(f"held out: {held_out}\nsources only: {sources_only}")
    assert held_out["val_scenes_in_train"] == held_out["sources"] == sources_only["sources"] == 0
    assert 0 < sources_only["val_scenes_in_train"] < 0.3 * sources_only["val_scenes"]


@pytest.mark.parametrize("args, message", [
    (["--kinds", "recolour,paint"], "unknown edit kinds paint"),
    (["--max-objects", "9"], "max_objects must be in 1..8"),
    (["--max-objects", "1", "--kinds", "swap"], "need source scenes of >= 2 objects"),
    (["--image-size", "16"], "too small"),
    (["--what-changed-fraction", "1.5"], "what_changed_fraction must be in [0, 1]"),
    (["--train", "-1"], "train and val must be >= 0"),
    (["--questions-per-sample", "0"], "questions_per_sample must be >= 1"),
])
def test_bad_arguments_give_one_sentence_and_exit_2(args, message, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "x"), "--quiet", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_help_is_the_docstring(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Write the shapes world's image edits" in capsys.readouterr().out
