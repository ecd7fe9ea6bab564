"""Tests of the evaluation (mmdlm.eval: metrics, tasks, report), its command (mmdlm.commands.evaluate), the
world scorers (mmdlm.worlds.scoring) and mmdlm.worlds.digits_scorer, on the tiny model fixture."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mmdlm.commands.evaluate import main as evaluate_main
from mmdlm.eval.metrics import cider, mean_dicts, prf
from mmdlm.eval.records import load_records, stack_images
from mmdlm.eval.report import TITLES
from mmdlm.eval.tasks import ALL_TASKS, NLL_TASKS, PIPELINE_TASK, eval_nll, eval_t2i, evaluate
from mmdlm.pipeline import DEFAULT_SAMPLERS
from mmdlm.worlds.scoring import ATTRIBUTES, CaptionsWorld, ShapesWorld, parse_digit, world_for
from mmdlm.worlds.shapes import ShapesConfig, caption, make_object, paraphrase, render, write_shapes

RATE_SECTIONS = {
    "vqa": ["accuracy"],
    "caption": ["exact_match", "parse_rate", "scene_match", "all_attributes_f1", "bleu4"],
    "t2i": ["all_correct", "count_correct", "cell", "color", "shape", "size", "object"],
    "joint": ["agreement", "parse_rate", "image_readable_rate"],
}


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Fitted digit classifiers go to a temporary cache, never the user's."""
    monkeypatch.setenv("MMDLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def shapes_val(tmp_path_factory) -> str:
    """A glob of two small val shards of the shapes world."""
    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, ShapesConfig(train=0, val=6, shard_size=3), progress=False)
    return str(out / "val" / "*.tar")


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    from mmdlm.pipeline import MMDLMPipeline

    return MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def ar_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model's causal twin: same weights, `causal: true`."""
    out = tmp_path_factory.mktemp("tiny_ar") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["model"]["causal"] = True
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def _scene_record(objects: list[dict], key: str = "s0") -> dict:
    import random

    caps = [caption(objects), paraphrase(objects, random.Random(0))]
    image = torch.from_numpy(__import__("numpy").asarray(render(objects)).copy()).permute(2, 0, 1).float() / 255
    return {"__key__": key, "image": image, "captions": caps, "qa": [],
            "meta": {"source": "shapes", "objects": objects, "captions": caps}}


TWO = [make_object("red", "circle", "large", 0), make_object("blue", "square", "small", 4)]


def _summary(text: str, objects: list[dict] = TWO) -> dict:
    world = ShapesWorld()
    return world.caption_summary([world.caption_counts(text, _scene_record(objects))])


# ---- caption scoring on hand-made cases ---------------------------------------------------------------
def test_perfect_caption_scores_one():
    s = _summary("a large red circle at the top left and a small blue square in the middle")
    assert s["exact_match"] == 1.0 and s["parse_rate"] == 1.0 and s["scene_match"] == 1.0
    assert s["all_attributes_f1"] == 1.0
    for attr in ATTRIBUTES:
        assert s["per_attribute"][attr] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_wrong_colour_lowers_colour_only():
    s = _summary("a large green circle at the top left and a small blue square in the middle")
    pa = s["per_attribute"]
    assert s["exact_match"] == 0.0 and s["scene_match"] == 0.0
    assert pa["color"]["precision"] == 0.5 and pa["color"]["recall"] == 0.5
    assert pa["shape"]["precision"] == 1.0 and pa["size"]["f1"] == 1.0 and pa["cell"]["f1"] == 1.0
    assert pa["object"]["precision"] == 0.5 and s["all_attributes_f1"] == 0.5


def test_paraphrase_is_not_exact_but_same_scene():
    s = _summary("there is a small blue square in the middle and a large red circle at the top left")
    assert s["exact_match"] == 0.0 and s["scene_match"] == 1.0 and s["all_attributes_f1"] == 1.0


def test_missing_and_extra_objects():
    missing = _summary("a large red circle at the top left")
    assert missing["per_attribute"]["object"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3)}
    extra = _summary("a large red circle at the top left and a small blue square at the bottom right")
    assert extra["per_attribute"]["cell"]["precision"] == 0.5 and extra["per_attribute"]["cell"]["recall"] == 0.5
    garbage = _summary("zq7 a large red")
    assert garbage["parse_rate"] == 0.0 and garbage["per_attribute"]["color"]["recall"] == 0.0


def test_caption_counts_micro_average_over_records():
    world = ShapesWorld()
    one = [make_object("white", "cross", "small", 8)]
    counts = [world.caption_counts("a small white cross at the bottom right", _scene_record(one)),
              world.caption_counts("a large red circle at the top left", _scene_record(TWO))]
    s = world.caption_summary(counts)
    assert s["exact_match"] == 0.5
    assert s["per_attribute"]["object"]["precision"] == 1.0  # 2 predicted, both right
    assert s["per_attribute"]["object"]["recall"] == pytest.approx(2 / 3)  # of 3 true objects


# ---- image scoring -------------------------------------------------------------------------------------
def test_t2i_scorer_on_ground_truth_is_all_correct():
    world = ShapesWorld()
    scenes = [TWO, [make_object("orange", "triangle", "large", 2)],
              [make_object("cyan", "cross", "small", 6), make_object("yellow", "square", "large", 7)]]
    records = [_scene_record(s, f"s{i}") for i, s in enumerate(scenes)]
    summary = mean_dicts(world.score_images(torch.stack([r["image"] for r in records]), records))
    assert summary["all_correct"] == 1.0 and summary["object"] == 1.0 and summary["extra_objects"] == 0.0
    swapped = world.score_images(torch.stack([records[1]["image"]]), [records[0]])[0]  # the wrong image
    assert swapped["all_correct"] == 0.0 and swapped["object"] == 0.0


def test_joint_reading_agrees_on_a_true_pair_only():
    world = ShapesWorld()
    image = _scene_record(TWO)["image"][None]
    assert world.read_images(image)[0] == world.read_caption(caption(TWO))
    assert world.read_images(image)[0] != world.read_caption("a large red circle at the top left")
    assert world.read_caption("not a caption") is None
    assert world.read_images(torch.zeros(1, 3, 32, 32)) == [None]  # an empty canvas shows no scene


def test_parse_digit_and_prf():
    assert parse_digit("a handwritten digit seven") == 7
    assert parse_digit("The digit ZERO, handwritten") == 0
    assert parse_digit("seven or eight") is None and parse_digit("eleventy") is None
    assert prf(0, 0, 3) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert prf(1, 2, 4)["f1"] == pytest.approx(2 * 0.5 * 0.25 / 0.75)


def test_digits_classifier_reads_held_out_digits():
    from sklearn.datasets import load_digits

    from mmdlm.worlds.digits_scorer import load_or_fit, render, split_indices

    val = split_indices()["val"][:60]
    clf = load_or_fit(32, val)
    truth = torch.from_numpy(load_digits().target[val]).long()
    for interp in ("nearest", "bilinear"):
        assert (clf.predict(render(val, 32, interp)) == truth).float().mean() >= 0.95
    assert load_or_fit(32, val) is clf  # cached


# ---- whole evaluations -----------------------------------------------------------------------------------
def _check_sections(metrics: dict, tasks: list[str]) -> None:
    for task in tasks:
        section = metrics[task]
        for key in RATE_SECTIONS.get(task, []):
            assert 0.0 <= section[key] <= 1.0, (task, key, section[key])
        assert section["cost"]["nfe_total"] > 0 and section["cost"]["nfe_per_call"] > 0
        assert section["cost"]["seconds_per_sample"] > 0 and section["cost"]["batch_size"] > 0
    if "caption" in tasks:
        for scores in metrics["caption"]["per_attribute"].values():
            assert all(0.0 <= v <= 1.0 for v in scores.values())
    if "t2i" in tasks:
        assert metrics["t2i"]["scorer_on_ground_truth"]["all_correct"] == 1.0  # the oracle on real renders
        assert 0.0 <= metrics["t2i"]["scorer_on_reconstructions"]["all_correct"] <= 1.0
    if "nll" in tasks:
        assert math.isfinite(metrics["nll"]["nll"]) and metrics["nll"]["nll"] > 0
        for t in NLL_TASKS:
            assert math.isfinite(metrics["nll"]["per_task"][t]["nll"]) and metrics["nll"]["per_task"][t]["tokens"] > 0


def test_the_guidance_flags_reach_every_task_that_draws_an_image_from_a_condition(tiny_model_dir, shapes_val, tmp_path):
    """`--guidance` sets text-to-image's and an edit's scale (it was read by text-to-image only), not VQA's."""
    out = tmp_path / "metrics.json"
    evaluate_main(["--model", tiny_model_dir, "--shards", shapes_val, "--out", str(out), "--limit", "2", "--tasks",
             "t2i,edit,vqa", "--guidance", "0.5", "--steps", "2", "--device", "cpu", "--quiet"])
    samplers = json.loads(out.read_text())["settings"]["sampler"]
    assert samplers["t2i"]["guidance_scale"] == samplers["edit"]["guidance_scale"] == 0.5
    assert samplers["vqa"]["guidance_scale"] == 0.0 and samplers["vqa"]["steps"] == 2


def test_cli_writes_metrics_report_and_samples(tiny_model_dir, shapes_val, tmp_path):
    out = tmp_path / "run"
    evaluate_main(["--model", tiny_model_dir, "--shards", shapes_val, "--out", str(out / "metrics.json"),
             "--report", str(out / "report.md"), "--samples", str(out / "samples.png"), "--limit", "4",
             "--batch-size", "3", "--steps", "2", "--device", "cpu", "--quiet"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["source"] == "shapes" and metrics["records"] == 4 and metrics["model_kind"] == "mdm"
    assert "--limit 4" in metrics["command"] and metrics["model"] == str(Path(tiny_model_dir).resolve())
    samplers = metrics["settings"]["sampler"]  # every generating task's whole config, --steps in each
    assert {t: c["steps"] for t, c in samplers.items()} == {"vqa": 2, "caption": 2, "t2i": 2, "joint": 2}
    defaults = {t: DEFAULT_SAMPLERS[PIPELINE_TASK[t]] for t in samplers}
    assert samplers["t2i"]["guidance_scale"] == defaults["t2i"].guidance_scale == 2.0
    assert samplers["caption"]["block_length"] == defaults["caption"].block_length  # the rest: the task defaults
    assert metrics["settings"]["batch_size"] == 3
    _check_sections(metrics, list(ALL_TASKS))
    assert metrics["caption"]["cost"]["nfe_per_call"] == 2  # --steps reaches the sampler
    assert metrics["caption"]["cost"]["calls"] == 2  # 4 records in batches of 3
    assert metrics["joint"]["n"] == 4 and metrics["nll"]["draws"] == 4
    report = (out / "report.md").read_text()
    for name, title in TITLES.items():  # every task evaluated has its section (the default run: not the edits')
        assert (title in report) == (name in metrics), name
    assert "| accuracy |" in report
    png = (out / "samples.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_ar_twin_is_scored_on_the_same_sequences(pipe, ar_model_dir, shapes_val):
    from mmdlm.pipeline import MMDLMPipeline

    ar = MMDLMPipeline.from_pretrained(ar_model_dir, device="cpu")
    records = load_records(shapes_val, 32, limit=3)
    tasks = ["vqa", "t2i", "nll"]
    m_ar = evaluate(ar, records=records, tasks=tasks, batch_size=8, progress=False)
    m_mdm = evaluate(pipe, records=records, tasks=["nll"], batch_size=8, nll_draws=4, progress=False)
    _check_sections(m_ar, tasks)
    assert m_ar["model_kind"] == "ar" and m_ar["nll"]["draws"] == 1 and "exact" in m_ar["nll"]["bound"]
    assert "ELBO" in m_mdm["nll"]["bound"]
    for t in NLL_TASKS:
        assert m_ar["nll"]["per_task"][t]["tokens"] == m_mdm["nll"]["per_task"][t]["tokens"]
    assert m_ar["t2i"]["cost"]["nfe_per_call"] == ar.vq.tokens_per_image  # one forward per image token


def test_mdm_nll_bound_averages_draws(pipe, shapes_val):
    records = load_records(shapes_val, 32, limit=3)
    one = eval_nll(pipe, records, draws=1, seed=1, progress=False).metrics
    four = eval_nll(pipe, records, draws=4, seed=1, progress=False).metrics
    assert four["cost"]["nfe_total"] == 4 * one["cost"]["nfe_total"]
    assert one["nll"] != four["nll"]  # independent draws of (t, mask) differ
    again = eval_nll(pipe, records, draws=4, seed=1, progress=False).metrics
    assert again["nll"] == four["nll"]  # seeded


def test_sampler_config_reaches_the_pipeline(pipe, shapes_val):
    records = load_records(shapes_val, 32, limit=2)
    opts = pipe.sampler("text_to_image", steps=3, guidance_scale=1.5)
    assert opts.temperature == 1.0 and opts.guidance_plausibility == 0.1  # the task's other defaults kept
    result = eval_t2i(pipe, records, opts, batch_size=2, progress=False, scorer_ceiling=False)
    assert result.metrics["cost"]["nfe_per_call"] == 3 and "scorer_on_ground_truth" not in result.metrics
    assert len(result.examples) == 2 - result.metrics["too_long"]


def _digit_shards(folder: Path, indices: list[int]) -> str:
    import webdataset as wds
    from sklearn.datasets import load_digits

    from mmdlm.worlds.digits import digit_image, digit_meta

    digits = load_digits()
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "digits-val-%06d.tar"), maxcount=100, verbose=0) as sink:
        for i in indices:
            buffer = io.BytesIO()
            digit_image(digits.data[i], 32).save(buffer, format="PNG")
            meta = json.dumps(digit_meta(int(digits.target[i]))).encode()
            sink.write({"__key__": f"digits-{i:04d}", "png": buffer.getvalue(), "json": meta})
    return str(folder / "*.tar")


def test_digits_world(pipe, tmp_path):
    shards = _digit_shards(tmp_path / "digits", [3, 10, 42, 77])
    metrics = evaluate(pipe, shards, tasks=["vqa", "caption", "t2i"], limit=4, batch_size=4,
                          samplers={t: pipe.sampler(PIPELINE_TASK[t], steps=2) for t in ("vqa", "caption", "t2i")},
                          progress=False)
    assert metrics["source"] == "digits" and metrics["t2i"]["scorer"] == "digits classifier"
    assert set(metrics["vqa"]["per_type"]) == {"digit", "parity"}
    assert metrics["t2i"]["scorer_on_ground_truth"]["all_correct"] == 1.0  # held-out scans, read right
    for key in ("exact_match", "parse_rate", "digit_accuracy", "bleu4"):
        assert 0.0 <= metrics["caption"][key] <= 1.0
    world = world_for(load_records(shards, 32), 32)
    record = load_records(shards, 32, limit=1)[0]
    perfect = world.caption_summary([world.caption_counts(record["captions"][0], record)])
    assert perfect == {"exact_match": 1.0, "parse_rate": 1.0, "digit_accuracy": 1.0}


# ---- command-line errors ---------------------------------------------------------------------------------
def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_cli_rejects_a_bad_model_path(shapes_val, tmp_path, capsys):
    err = _cli_error(["--model", str(tmp_path / "nowhere"), "--shards", shapes_val,
                      "--out", str(tmp_path / "m.json")], capsys)
    assert "not a model folder" in err and "Traceback" not in err
    assert not (tmp_path / "m.json").exists()


def test_cli_rejects_an_empty_glob(tiny_model_dir, tmp_path, capsys):
    err = _cli_error(["--model", tiny_model_dir, "--shards", str(tmp_path / "none" / "*.tar"),
                      "--out", str(tmp_path / "m.json")], capsys)
    assert "matches no files" in err
    err = _cli_error(["--model", tiny_model_dir, "--shards", "x.tar", "--out", "m.json", "--tasks", "vqa,bogus"],
                     capsys)
    assert "bogus" in err


def test_mixed_sources_are_refused_and_unknown_ones_are_plain_captioned_images():
    record = _scene_record(TWO)
    with pytest.raises(ValueError, match="mix"):
        world_for([record, {**record, "meta": {"source": "digits"}}], 32)
    world = world_for([{**record, "meta": {"source": "laion"}}], 32)
    assert isinstance(world, CaptionsWorld) and world.scorer is None
    with pytest.raises(ValueError, match="module:function"):
        world_for([{**record, "meta": {}}], 32, scorer="no_colon")
    with pytest.raises(ValueError, match="its own"):
        world_for([record], 32, scorer="test_evaluate:brightness_scorer")


def brightness_scorer(images, records):
    """A user's text-to-image scorer (for the test below): 'all_correct' when the image is not black."""
    return [{"all_correct": float(im.mean() > 0.01), "brightness": float(im.mean())} for im in images]


def _user_shards(folder: Path, n: int = 4) -> str:
    """A user's own shards in img2dataset's layout: jpg + txt caption + json without a `source`."""
    import webdataset as wds
    from PIL import Image

    folder.mkdir(parents=True)
    captions = ["a photo of a red thing", "a photo of a blue thing"]
    with wds.TarWriter(str(folder / "mine-000000.tar")) as sink:
        for i in range(n):
            buffer = io.BytesIO()
            Image.new("RGB", (40, 30), ((i * 60) % 256, 80, 160)).save(buffer, format="JPEG")
            sink.write({"__key__": f"{i:05d}", "jpg": buffer.getvalue(), "txt": captions[i % 2],
                        "json": json.dumps({"url": f"http://example.com/{i}.jpg"}).encode()})
    return str(folder / "*.tar")


def test_evaluation_on_a_users_own_captioned_shards(pipe, tmp_path):
    shards = _user_shards(tmp_path / "mine")
    metrics = evaluate(pipe, shards, tasks=list(ALL_TASKS), batch_size=4, progress=False,
                          samplers={t: pipe.sampler(PIPELINE_TASK[t], steps=2) for t in PIPELINE_TASK})
    assert metrics["source"] == "captions" and metrics["records"] == 4
    assert metrics["vqa"]["n"] == 0  # no qa in these records
    assert 0.0 <= metrics["caption"]["exact_match"] <= 1 and metrics["caption"]["cider"] >= 0.0
    assert 0.0 <= metrics["caption"]["bleu4"] <= 1
    assert "scorer" in metrics["t2i"]["skipped"] and "skipped" in metrics["joint"]
    assert math.isfinite(metrics["nll"]["nll"]) and metrics["nll"]["per_task"]["t2i"]["tokens"] > 0
    scored = evaluate(pipe, shards, tasks=["t2i"], batch_size=4, progress=False,
                         scorer="test_evaluate:brightness_scorer",
                         samplers={"t2i": pipe.sampler("text_to_image", steps=2)})["t2i"]
    assert scored["scorer"] == "test_evaluate:brightness_scorer" and 0.0 <= scored["all_correct"] <= 1.0
    assert 0.0 < scored["scorer_on_ground_truth"]["brightness"] < 1.0  # the user's keys come through


def test_cider_agrees_with_its_definition():
    assert cider(["a red circle on the left"] * 2, [["a red circle on the left"], ["a blue square"]]) > 0
    same = cider(["a red circle", "a blue square"], [["a red circle"], ["a blue square"]])
    worse = cider(["a red circle", "a red circle"], [["a red circle"], ["a blue square"]])
    assert same > worse >= 0.0


def test_captions_decode_one_token_per_step_in_blocks_by_default(pipe, shapes_val):
    """The caption default is LLaDA's semi-AR decoding (the `<eos>` fill would otherwise be committed first):
    as many steps as the caption region has tokens; one block with any step count on request."""
    images = stack_images(load_records(shapes_val, 32, limit=2))
    assert pipe.caption(images).nfe == pipe.layout.caption_len
    assert pipe.caption(images, steps=3, block_length=None).nfe == 3
    assert pipe.caption(images, steps=2).nfe == 2  # fewer steps than blocks of 4: two blocks of 12
