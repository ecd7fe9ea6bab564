"""The MDM-vs-AR benchmark scripts (benchmarks/compare.py, speed.py, train_speed.py), run in-process on the
tiny random model and its causal twin, plus the scoring pieces they are built from.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_benchmarks.py

Tiny limits and repeats: these check the outputs (files, keys, plausible values, valid PNGs) and the
bookkeeping (which positions are blanked and read back), not the numbers of a trained model.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks import (
    caption_decoding,
    compare,
    gpu,
    infill_length,
    learning_curve,
    revision,
    speed,
    train_speed,
)
from mmdlm.worlds.shapes import caption, make_object, render

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TWO = [make_object("red", "circle", "large", 0), make_object("blue", "square", "small", 4)]


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair(tiny_model_dir, tmp_path_factory) -> tuple[str, str]:
    """The tiny MDM and its causal twin (same weights), with text regions roomy enough for the tiny BPE
    (its 300 ids spell a two-object caption in ~50 tokens), so no caption or question is too long."""
    root = tmp_path_factory.mktemp("pair")
    dirs = []
    for name, causal in (("mdm", False), ("ar", True)):
        out = root / name
        shutil.copytree(tiny_model_dir, out)
        config = json.loads((out / "config.json").read_text())
        config["model"]["causal"] = causal
        config["layout"].update(caption_len=64, question_len=32, text_len=64)
        (out / "config.json").write_text(json.dumps(config))
        dirs.append(str(out))
    return dirs[0], dirs[1]


@pytest.fixture(scope="module")
def pipes(pair):
    from mmdlm.pipeline import MMDLMPipeline

    return tuple(MMDLMPipeline.from_pretrained(d, device="cpu") for d in pair)


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> str:
    from mmdlm.worlds.shapes import ShapesConfig, write_shapes

    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, ShapesConfig(train=0, val=6, shard_size=3), progress=False)
    return str(out / "val" / "*.tar")


def _record(objects: list[dict], key: str = "r0") -> dict:
    image = torch.from_numpy(__import__("numpy").asarray(render(objects)).copy()).permute(2, 0, 1).float() / 255
    return {"__key__": key, "image": image, "captions": [caption(objects)], "qa": [],
            "meta": {"source": "shapes", "objects": objects}}


def _valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.size[0] > 300 and im.size[1] > 200


def _is_rate(x) -> bool:
    return isinstance(x, float | int) and 0.0 <= x <= 1.0


# ---- pieces -------------------------------------------------------------------------------------------
def test_cap_steps_and_peaks():
    assert compare.cap_steps([4, 8, 16, 32, 64], 4) == {4: [4, 8, 16, 32, 64]}
    assert compare.cap_steps([64, 4, 100], 64) == {4: [4], 64: [64, 100]}
    assert train_speed.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert train_speed.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert train_speed.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert train_speed.peak_flops("NVIDIA L40S") == 362e12 and train_speed.peak_flops("NVIDIA L4") == 121e12
    assert train_speed.peak_flops("Some Other GPU") is None


def test_blanks_split_the_caption_at_the_word(pipes):
    mdm, _ = pipes
    records = [_record(TWO, f"r{i}") for i in range(8)]
    blanks = compare.attribute_blanks(mdm, records, seed=0)
    assert [b.kind for b in blanks] == list(compare.BLANK_KINDS) * 2  # each kind in turn
    for b in blanks:
        assert b.prefix + b.word + b.rest == mdm.tokenizer.encode(b.text)
        assert b.masked().replace("[MASK]", b.answer) == b.text and b.masked().count("[MASK]") == 1
        obj = next(o for o in TWO if b.answer in o.values() or b.answer in o["position"].split())
        assert b.answer in obj["position"].split() if b.kind == "position" else b.answer == obj[b.kind]
    (first,) = compare.first_object_blanks(mdm, records[:1])
    assert first.answer == "a large red circle at the top left" and first.start == 0 and first.prefix == []


def test_reversal_and_object_scores():
    b = compare.Blank(0, caption(TWO), 0, 34, "first_object", [], [], [])
    assert compare.reversal_scores([b], [caption(TWO)]) == {"valid": 1.0, "consistent": 1.0, "exact": 1.0, "n": 1}
    swapped = "a small blue square in the middle and a large red circle at the top left"  # parses, wrong order
    same_cell = "a small green cross in the middle and a small blue square in the middle"
    s = compare.reversal_scores([b, b, b], [swapped, same_cell, "a large red"])
    assert s["valid"] == pytest.approx(1 / 3) and s["consistent"] == 0.0 and s["exact"] == 0.0
    record = _record(TWO)
    truth = compare.object_scores(record["image"][None], [record], [TWO[1]])[0]
    assert truth == {"object": 1.0, "color": 1.0, "shape": 1.0, "size": 1.0, "scene": 1.0}
    wiped = record["image"].clone()
    wiped[:, compare.cell_mask(4, 32)] = 0.0  # the square's cell blanked to background
    assert compare.object_scores(wiped[None], [record], [TWO[1]])[0] == dict.fromkeys(truth, 0.0)
    assert compare.object_scores(wiped[None], [record], [TWO[0]])[0]["object"] == 1.0


def test_fills_are_read_at_the_blanked_positions(pipes, monkeypatch):
    """With a fake sampler that writes FILL into every masked target, the probes read FILL back, and
    only the word (MDM) or the word and all after it (AR) were masked."""
    from mmdlm.sampling import SampleResult
    from mmdlm.sequence import collate

    mdm, ar = pipes
    seen = []

    def fake_generate(pipe, samples, seed, temperature=0.0):
        seen.append((pipe, samples))
        batch = collate(list(samples), pipe.vocab)
        return SampleResult(torch.where(batch.target & (batch.ids == pipe.vocab.mask), FILL, batch.ids), 1)

    FILL = 7
    monkeypatch.setattr(compare, "generate", fake_generate)
    records = [_record(TWO, f"r{i}") for i in range(4)]
    blanks = compare.attribute_blanks(mdm, records, seed=1)
    args = argparse.Namespace(batch_size=3, seed=0)
    codes = mdm.encode_images(compare.stack_images(records)).cpu()
    for pipe in (mdm, ar):
        seen.clear()
        assert compare.caption_fill(pipe, blanks, codes, args) == [[FILL] * len(b.word) for b in blanks]
        masked = sorted(int(s.target.sum()) for _, chunk in seen for s in chunk)
        if pipe is mdm:  # the word alone
            assert masked == sorted(len(b.word) for b in blanks)
        else:  # the word and the rest of the caption region
            assert masked == sorted(pipe.layout.caption_len - len(b.prefix) for b in blanks)
        assert compare.continue_left(pipe, blanks, args) == [[FILL] * len(b.word) for b in blanks]


# ---- the scripts ------------------------------------------------------------------------------------
def test_compare(pair, pipes, val_shards, tmp_path, capsys):
    mdm_dir, ar_dir = pair
    mdm, _ = pipes
    out = tmp_path / "cmp"
    result = compare.main(["--mdm", mdm_dir, "--ar", ar_dir, "--shards", val_shards, "--out", str(out),
                           "--limit", "4", "--steps", "2,100", "--thresholds", "0.5", "--batch-size", "4",
                           "--nll-draws", "1", "--device", "cpu", "--quiet"])
    for name in ("compare.json", "compare.md", "accuracy_vs_nfe.png", "accuracy_vs_time.png"):
        assert (out / name).is_file(), name
    for name in ("accuracy_vs_nfe.png", "accuracy_vs_time.png"):
        _valid_png(out / name)
    md = (out / "compare.md").read_text()
    assert md.splitlines()[2].startswith("`python -m benchmarks.compare --mdm ")
    for section in ("## Quality", "## Speed / quality trade-off", "## What only diffusion does", "Reversal"):
        assert section in md
    saved = json.loads((out / "compare.json").read_text())
    assert saved["records"] == 4 and saved["quality"]["mdm"]["summary"] == result["quality"]["mdm"]["summary"]

    q = saved["quality"]
    for kind in ("mdm", "ar"):
        s = q[kind]["summary"]
        for key in ("vqa_accuracy", "caption_exact_match", "caption_attribute_f1", "t2i_all_correct"):
            assert _is_rate(s[key]), (kind, key)
        assert s["nll"] > 0 and s["vqa_n"] > 0
    assert _is_rate(q["mdm"]["summary"]["t2i_all_correct_unguided"])
    assert q["mdm"]["summary"]["nll_bound"].startswith("ELBO") and q["ar"]["summary"]["nll_bound"].startswith("exact")

    region = {"vqa": mdm.layout.answer_len, "t2i": mdm.vq.tokens_per_image}
    points = saved["tradeoff"]
    assert {p["family"] for p in points} == set(compare.FAMILY_STYLE)
    for p in points:
        assert p["nfe"] > 0 and p["seconds_per_sample"] > 0 and _is_rate(p["accuracy"])
        if p["family"] == "MDM, fixed steps":
            assert p["nfe"] <= p["steps"] <= region[p["task"]]
        elif p["family"] == "AR, KV cache":
            assert p["nfe"] == region[p["task"]]  # one forward per target token
        else:
            assert p["nfe"] <= region[p["task"]]
    capped = {(p["task"], p["steps"]): p["requested_steps"] for p in points if p["family"] == "MDM, fixed steps"}
    assert capped == {("vqa", 2): [2], ("vqa", region["vqa"]): [100], ("t2i", 2): [2], ("t2i", 64): [100]}

    probes = saved["probes"]
    for name in ("text_infill", "caption_infill"):
        for kind in ("mdm", "ar_left_only"):
            r = probes[name][kind]
            assert r["n"] == 4 and _is_rate(r["accuracy"])
            assert all(_is_rate(v["accuracy"]) for v in r["per_kind"].values())
    assert _is_rate(probes["text_infill"]["mdm_left_only"]["accuracy"])
    assert probes["text_infill"]["chance"]["color"] == pytest.approx(1 / 8)
    for name in ("mdm", "mdm_no_prompt", "ar_suffix", "vq_reconstruction"):
        r = probes["inpaint"][name]
        assert r["n"] == 4 and all(_is_rate(r[k]) for k in ("object", "color", "shape", "size", "scene"))
    t = probes["inpaint"]["tokens_regenerated"]
    assert 0 < t["mdm"] <= t["ar_suffix"] <= region["t2i"]  # the AR regenerates the whole suffix
    for kind in ("mdm", "mdm_left_only", "ar_left_only"):
        r = probes["reversal"][kind]
        assert all(_is_rate(r[k]) for k in ("valid", "consistent", "exact"))
        assert r["consistent"] <= r["valid"]


def test_speed(pair, val_shards, tmp_path):
    mdm_dir, ar_dir = pair
    fast_dir = tmp_path / "fast"  # the tiny MDM with prefix attention (untrained for it: exactness needs no training)
    shutil.copytree(mdm_dir, fast_dir)
    config = json.loads((fast_dir / "config.json").read_text())
    config["model"]["prefix_attention"] = True
    (fast_dir / "config.json").write_text(json.dumps(config))
    out = tmp_path / "speed"
    result = speed.main(["--mdm", mdm_dir, "--fast", str(fast_dir), "--ar", ar_dir, "--shards", val_shards,
                         "--limit", "2", "--out", str(out), "--repeats", "2", "--warmup", "1", "--batch-sizes", "1,2",
                         "--device", "cpu", "--quiet"])
    saved = json.loads((out / "sampling_speed.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert {"cpu_count", "torch_threads", "torch"} <= set(saved["machine"])
    names = [v.name for v in speed.variants(True)]
    assert [(r["variant"], r["task"]) for r in saved["rows"]] == [(v, t) for v in names for t in speed.TASKS]
    rows = {(r["variant"], r["task"]): r for r in saved["rows"]}
    for row in saved["rows"]:
        assert 0 <= row["quality"]["value"] <= 1 and row["quality"]["n"] > 0
        for t in row["timing"].values():
            assert t["nfe"] > 0 and t["tokens_per_forward"] > 0
            assert 0 < t["ms_per_sample"]["min"] <= t["ms_per_sample"]["median"] <= t["ms_per_sample"]["max"]
    assert rows[("MDM (before)", "t2i")]["timing"]["1"]["rows_per_call"] == 2  # guidance rows ride along
    for task in speed.TASKS:  # exact caches change no token: the same quality
        assert rows[("+ exact prefix cache", task)]["quality"] == rows[("prefix MDM, no cache", task)]["quality"]
        assert rows[("AR + KV cache", task)]["quality"] == rows[("AR, no cache", task)]["quality"]
    assert len(saved["checks"]) == 3 and all(isinstance(c["holds"], bool) for c in saved["checks"])
    md = (out / "sampling_speed.md").read_text()
    assert "python -m benchmarks.speed" in md and "## Acceptance" in md and "AR + KV cache" in md


def test_speed_variants_pick_the_rows_and_the_models(pair, val_shards, tmp_path, capsys):
    """--variants fast,ar-kv: the GPU sweep needs only the prefix-attention MDM and the AR twin."""
    mdm_dir, ar_dir = pair
    fast_dir = tmp_path / "fast"
    shutil.copytree(mdm_dir, fast_dir)
    config = json.loads((fast_dir / "config.json").read_text())
    config["model"]["prefix_attention"] = True
    (fast_dir / "config.json").write_text(json.dumps(config))
    common = ["--ar", ar_dir, "--shards", val_shards, "--limit", "0", "--repeats", "1", "--warmup", "0",
              "--batch-sizes", "1,2", "--tasks", "t2i,vqa", "--device", "cpu", "--quiet", "--out", str(tmp_path)]
    result = speed.main(["--fast", str(fast_dir), "--variants", "fast,ar-kv", *common])
    assert [(r["variant"], r["task"]) for r in result["rows"]] == [
        ("MDM fast (all)", "t2i"), ("MDM fast (all)", "vqa"), ("AR + KV cache", "t2i"), ("AR + KV cache", "vqa")]
    assert all(set(r["timing"]) == {"1", "2"} for r in result["rows"])
    for argv, says in ((["--variants", "fast,ar-kv"], "need(s) --fast"), (["--variants", "fastest"], "unknown"),
                       (["--fast", str(fast_dir), "--variants", "before"], "--mdm is needed"),
                       (["--fast", mdm_dir, "--variants", "fast"], "prefix attention")):
        with pytest.raises(SystemExit):
            speed.main([*argv, *common])
        assert says in capsys.readouterr().err


def test_speed_of_a_block_model_against_the_ar_twin(pair, val_shards, tmp_path, capsys):
    """--block: the block model at its slowest setting and its defaults against AR + KV, with the block targets."""
    mdm_dir, ar_dir = pair
    block_dir = tmp_path / "block"  # the tiny MDM as a block model (untrained for it: the benchmark runs all the same)
    shutil.copytree(mdm_dir, block_dir)
    config = json.loads((block_dir / "config.json").read_text())
    config["model"].update(block_diffusion=True, block_size=4, image_block_rows=2, shift_logits=True)
    (block_dir / "config.json").write_text(json.dumps(config))
    common = ["--ar", ar_dir, "--shards", val_shards, "--limit", "2", "--repeats", "1", "--warmup", "0",
              "--batch-sizes", "1,2", "--device", "cpu", "--quiet", "--out", str(tmp_path / "speed")]
    result = speed.main(["--block", str(block_dir), "--variants", "block-slow,block,ar-kv", *common])
    assert [r["variant"] for r in result["rows"]] == [speed.BLOCK_SLOW] * 3 + [speed.BLOCK] * 3 + ["AR + KV cache"] * 3
    slow = {r["task"]: r for r in result["rows"] if r["variant"] == speed.BLOCK_SLOW}
    assert slow["t2i"]["timing"]["1"]["tokens_per_forward"] == 1.0  # one image token per call
    targets = [c["target"] for c in result["checks"]]
    assert len(targets) == 7 and sum("batch 2: block not slower" in t for t in targets) == 3
    with pytest.raises(SystemExit):
        speed.main(["--block", mdm_dir, "--variants", "block", *common])
    assert "not a block-diffusion model" in capsys.readouterr().err


def test_train_speed(pair, tmp_path):
    mdm_dir, _ = pair
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
trainer:
  precision: 32-true
  gradient_clip_val: 1.0
model:
  class_path: mmdlm.training.LitMDM
  init_args: {{config: {{n_layer: 1, n_head: 2, n_embd: 32, causal: true}}, weighting: masked_mean,
              export_dir: {tmp_path / 'must_not_be_written'}}}
data:
  class_path: mmdlm.training.MDMDataModule
  init_args:
    train_shards: no/such/shards/*.tar
    text_tokenizer: {mdm_dir}/text_tokenizer
    vq: {tmp_path / 'no_vq'}
    task_weights: {{t2i: 1.0, vqa: 1.0, caption: 0.5, joint: 0.25, text: 0.25}}
    layout: {{caption_len: 20, question_len: 12, answer_len: 4, text_len: 24, qa_per_sample: 3}}
    batch_size: 4
""")
    out = tmp_path / "ts"
    result = train_speed.main(["--config", str(config), "--steps", "4", "--warmup", "1", "--device", "cpu",
                               "--codebook-size", "32", "--shapes-sizes", "--out", str(out), "--quiet"])
    assert not (tmp_path / "must_not_be_written").exists()
    saved = json.loads((out / "train_speed.json").read_text())
    assert saved == json.loads(json.dumps(result))
    (run,) = saved["runs"]
    assert run["causal"] is True and run["steps_timed"] == 3 and run["batch_size"] == 4
    assert run["vocab_size"] == 300 + 32 + 11  # the tokenizer's ids, --codebook-size, the specials
    assert "tokenizer" in run["sizes_from"] and "--codebook-size" in run["sizes_from"]
    assert run["tokens_per_s"]["median"] > 0 and run["positions_per_s"]["median"] >= run["tokens_per_s"]["median"]
    assert run["achieved_flops"]["median"] > 0 and "mfu" not in run  # no GPU: no MFU
    assert {"cpu_count", "torch_threads", "torch"} <= set(saved["machine"])
    assert "tiny.yaml" in (out / "train_speed.md").read_text()


def test_revision(pair, val_shards, tmp_path):
    mdm_dir, ar_dir = pair
    out = tmp_path / "revision"
    result = revision.main(["--ar", ar_dir, "--mdm", mdm_dir, "--corrected", mdm_dir, "--seed-pair",
                            f"{mdm_dir},{mdm_dir}", "--shards", val_shards, "--limit", "3", "--t2i-limit", "2",
                            "--latency", "2", "--best-of", "2", "--out", str(out), "--device", "cpu"])
    saved = json.loads((out / "revision.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    rows = {r["name"]: r for r in saved["rows"]}
    assert {"AR (+ KV cache)", "MDM", "MDM + corrective", "MDM corrected + corrective", "hybrid AR -> MDM",
            "MDM best-of-2", "MDM corrected (seed 1) + corrective"} <= set(rows)
    for name in ("AR (+ KV cache)", "MDM", "hybrid AR -> MDM"):
        r = rows[name]
        assert all(_is_rate(r[k]) for k in ("t2i", "vqa", "caption_f1_mean")) and r["caption_ms_b1"] > 0
    assert rows["hybrid AR -> MDM"]["caption_nfe"] > rows["AR (+ KV cache)"]["caption_nfe"]  # draft, then revision
    assert rows["MDM best-of-2"]["t2i_nfe"] == rows["MDM"]["t2i_nfe"] + 1  # candidates batched, one scoring call
    assert set(saved["probe"]) == {"AR", "MDM", "MDM corrected"}
    for p in saved["probe"].values():
        assert p["n"] == 3 and all(_is_rate(p[k]) for k in ("fixed", "restored", "false_alarms"))
        assert p["restored"] <= p["fixed"]
    md = (out / "revision.md").read_text()
    assert "python -m benchmarks.revision" in md and "Correction probe" in md and "hybrid AR -> MDM" in md


def test_infill_length(pair, val_shards, tmp_path):
    mdm_dir, _ = pair
    out = tmp_path / "infill"
    result = infill_length.main(["--model", mdm_dir, "--shards", val_shards, "--limit", "3", "--max-blank", "2",
                                 "--out", str(out), "--device", "cpu"])
    rows = result["rows"]
    assert [(r["gap_words"], r["decoding"]) for r in rows][:3] == [
        (1, "1 token per blank"), (1, "4 tokens per blank"), (1, "the model chooses")]
    assert len(rows) == 12 and all(_is_rate(r["valid"]) and _is_rate(r["length_right"]) for r in rows)
    assert json.loads((out / "infill_length.json").read_text())["rows"] == json.loads(json.dumps(rows))
    assert "python -m benchmarks.infill_length" in (out / "infill_length.md").read_text()


@pytest.mark.parametrize("module", [compare, speed, train_speed, learning_curve, caption_decoding, revision,
                                    infill_length, gpu])
def test_help_is_the_docstring(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert module.__doc__.splitlines()[0][:60] in capsys.readouterr().out


def test_bad_arguments(pair, tmp_path, capsys):
    mdm_dir, ar_dir = pair
    with pytest.raises(SystemExit):  # the twins swapped
        speed.main(["--mdm", ar_dir, "--ar", mdm_dir, "--shards", "x", "--out", str(tmp_path)])
    assert "causal" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_speed.main(["--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        compare.main(["--mdm", mdm_dir, "--ar", ar_dir, "--shards", str(tmp_path / "none*.tar"),
                      "--out", str(tmp_path), "--thresholds", "1.5"])


def test_learning_curve(tiny_model_dir, tiny_shards, tmp_path, monkeypatch, capsys):
    """Two checkpoints of a real (tiny) run are exported and evaluated; the cache is reused on a rerun."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mmdlm.model import ModelConfig
    from mmdlm.training import LitMDM, MDMDataModule

    L.seed_everything(0)
    dm = MDMDataModule(train_shards=f"{tiny_shards}/train/*.tar", val_shards=f"{tiny_shards}/val/*.tar",
                       text_tokenizer=f"{tiny_model_dir}/text_tokenizer", vq=f"{tiny_model_dir}/vq",
                       batch_size=4, resampled=True, shuffle_buffer=16)
    module = LitMDM(ModelConfig(n_layer=1, n_head=2, n_embd=32), warmup_steps=1, samples_at_val=0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "run" / "checkpoints", every_n_train_steps=2, save_top_k=-1)
    L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              limit_val_batches=0, callbacks=[ckpt]).fit(module, datamodule=dm)
    assert [s for s, _ in learning_curve.checkpoints(tmp_path / "run")] == [2, 4]

    out = tmp_path / "lc"
    argv = ["--run", f"tiny={tmp_path / 'run'}", "--shards", f"{tiny_shards}/val/*.tar", "--out", str(out),
            "--limit", "3", "--tasks", "vqa,nll", "--quiet"]
    result = learning_curve.main(argv)
    points = result["curves"]["tiny"]
    assert [p["step"] for p in points] == [2, 4]
    for p in points:
        assert _is_rate(p["headline"]["vqa"]) and p["headline"]["nll"] > 0
        assert "t2i_all_correct" not in p["headline"]  # only the tasks asked for
    saved = json.loads((out / "learning_curve.json").read_text())
    assert saved["curves"] == json.loads(json.dumps(result["curves"]))
    assert "| 4 |" in (out / "learning_curve.md").read_text()
    _valid_png(out / "learning_curve.png")

    def boom(*args, **kwargs):
        raise AssertionError("a cached checkpoint was evaluated again")

    monkeypatch.setattr(learning_curve, "evaluate_checkpoint", boom)
    again = learning_curve.main(argv)
    assert again["curves"] == result["curves"]
    untrained = [None] * len(learning_curve.TARGETS)  # an untrained model meets none
    assert [t["first_step"] for t in again["targets"]["tiny"]] == untrained
    assert "## Targets: where each was first met" in (out / "learning_curve.md").read_text()

    with pytest.raises(SystemExit):  # against wall-clock: the run must say when it started
        learning_curve.main(argv + ["--x", "minutes"])
    assert "wallclock.json" in capsys.readouterr().err
    first = min(path.stat().st_mtime for _, path in learning_curve.checkpoints(tmp_path / "run"))
    (tmp_path / "run" / "wallclock.json").write_text(json.dumps({"started": first - 120}))  # 2 min before
    timed = learning_curve.main(argv + ["--x", "minutes"])  # the cache again: nothing is evaluated
    assert timed["curves"]["tiny"][0]["minutes"] == pytest.approx(2.0)
    assert all(2.0 <= p["minutes"] < 30 for p in timed["curves"]["tiny"]), timed["curves"]["tiny"]
    _valid_png(out / "learning_curve.png")

    for step in (2, 4):  # the same checkpoints as a second stage: their cached metrics (nothing is evaluated)
        (out / f"again_step{step}.json").write_text((out / f"tiny_step{step}.json").read_text())
    staged = learning_curve.main(argv + ["--run", f"again={tmp_path / 'run'}", "--continues", "again=tiny"])
    assert [p["step"] for p in staged["curves"]["again"]] == [6, 8]  # counted after tiny's last step, 4
    assert [p["run_step"] for p in staged["curves"]["again"]] == [2, 4]
    only = learning_curve.main(argv + ["--run", f"again={tmp_path / 'run'}", "--continues", "again=tiny",
                                       "--steps", "2"])  # a stage still ends at its last checkpoint, shown or not
    assert [p["step"] for p in only["curves"]["again"]] == [6]
    assert "## again (" in (out / "learning_curve.md").read_text() and "continuing tiny" in (
        out / "learning_curve.md").read_text()
    assert learning_curve.stage_offsets({"c": "b", "b": "a"}, {"a": (4, 1.0), "b": (2, 0.5), "c": (2, None)}) == {
        "a": (0, 0.0), "b": (4, 1.0), "c": (6, 1.5)}  # a chain of stages adds up
    for bad in (["--continues", "again=nobody"], ["--continues", "tiny=tiny"]):
        with pytest.raises(SystemExit):
            learning_curve.main(argv + ["--run", f"again={tmp_path / 'run'}", *bad])
    assert "distinct --run names" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # two runs continuing each other
        learning_curve.main(argv + ["--run", f"again={tmp_path / 'run'}", "--continues", "again=tiny",
                                    "--continues", "tiny=again"])
    assert "cycle" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        learning_curve.main(["--run", "no-equals-sign", "--shards", "x", "--out", str(out)])
    with pytest.raises(SystemExit):
        learning_curve.main(["--run", f"none={tmp_path / 'empty'}", "--shards", "x", "--out", str(out)])
    assert "no '*step=N.ckpt' checkpoints" in capsys.readouterr().err


def test_budget_plot_joins_points_by_label_and_names_a_missing_file(tmp_path, capsys) -> None:
    """Finished runs' metrics (the committed issue-15 results) plotted against their steps; bad input exits 2."""
    import pytest

    from benchmarks.budget_plot import main

    r = "benchmarks/results/learning/recipe"
    curves = main(["--out", str(tmp_path / "b.png"), "--point", f"x=2600={r}/ar_2600.json",
                   "--point", f"x=650={r}/ar_650.json", "--curve", f"old={r}/mdm_scratch_step*.json"])
    assert (tmp_path / "b.png").stat().st_size > 0
    assert [p["step"] for p in curves["x"]] == [650, 2600] and curves["x"][1]["headline"]["vqa"] > 0.8
    assert len(curves["old"]) == 8
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "c.png"), "--point", f"x=10={r}/nothing.json"])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_caption_decoding(tiny_model_dir, tiny_shards, capsys):
    caption_decoding.main(["--model", tiny_model_dir, "--shards", f"{tiny_shards}/val/*.tar", "--skip", "1",
                           "--limit", "2", "--setting", "3:none", "--setting", "24:4"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    got = [(r["steps"], r["block_length"], r["nfe_per_call"], r["n"]) for r in rows]
    assert got == [(3, None, 3, 2), (24, 4, 24, 2)]
    assert {"cell", "color", "shape", "size"} <= set(rows[0]["f1"])
    caption_decoding.main(["--model", tiny_model_dir, "--shards", f"{tiny_shards}/val/*.tar", "--skip", "1",
                           "--limit", "2", "--task", "vqa", "--setting", "4:1", "--setting", "1:none"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["steps"], r["block_length"], r["nfe_per_call"]) for r in rows] == [(4, 1, 4), (1, None, 1)]
    assert all(0 <= r["accuracy"] <= 1 and r["questions"] > 0 for r in rows)
    caption_decoding.main(["--model", tiny_model_dir, "--shards", f"{tiny_shards}/val/*.tar", "--skip", "1",
                           "--limit", "2", "--task", "t2i", "--setting", "steps=3,threshold=none,guidance_scale=0",
                           "--setting", "steps=3,self_correction=true"])
    row, revised = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert row["nfe_per_call"] == 3 and row["sampler"]["guidance_scale"] == 0 and 0 <= row["all_correct"] <= 1
    assert revised["self_correction"] is True and revised["sampler"]["self_correction"]["extra_steps"] == 8
    assert 3 <= revised["nfe_per_call"] <= 3 + 8
    caption_decoding.main(["--model", tiny_model_dir, "--shards", f"{tiny_shards}/val/*.tar", "--skip", "1",
                           "--limit", "3", "--task", "joint", "--setting", "steps=2,text_temperature=0"])
    (joint,) = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert joint["n"] == 3 and joint["sampler"]["text_temperature"] == 0 and joint["nfe_per_call"] == 2
    assert all(0 <= joint[k] <= 1 for k in ("agreement", "parse_rate", "image_readable_rate", "distinct_captions"))
    for bad in ("four:4", "stepz=4", "steps=0"):
        with pytest.raises(SystemExit):
            caption_decoding.main(["--model", tiny_model_dir, "--shards", f"{tiny_shards}/val/*.tar", "--skip", "1",
                                   "--limit", "1", "--setting", bad])
