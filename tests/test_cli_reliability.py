"""Bad input through the real command-line entry points: every case gets a one-sentence error and
a non-zero exit, never a traceback, and the good input around it is still processed.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_cli_reliability.py

Covered: text that is not valid Unicode in `mmdlm vqa` / `mmdlm generate`, unsafe and non-checkpoint
files given to `mmdlm.commands.export` (items 4, 6), a model folder with damaged weights (item 5), a model that gives
no answer (item 12), and `benchmarks.train_speed` with a patch tokenizer or without the recipe's folders
(item 13).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import train_speed
from mmdlm import folder
from mmdlm.commands import export, generate, vqa
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.worlds.shapes import render, sample_scene

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

EXPORT = [sys.executable, "-m", "mmdlm.commands.export"]


def one_line_error(stderr: str) -> str:
    """The single stderr line of a one-sentence error (asserting that there is exactly one, no traceback)."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A 32x32 shapes scene as PNG (the tiny model's image size)."""
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    render(sample_scene(random.Random(3), 2, 2), image_size=32).save(path)
    return path


# ---- item 3: text that is not valid Unicode ----------------------------------------------------------------
def test_vqa_batch_skips_invalid_unicode_lines_and_answers_every_good_one(tiny_model_dir, scene, tmp_path,
                                                                          capsys) -> None:
    good = [{"image": str(scene), "question": q, "id": i} for i, q in enumerate(["what shape?", "what color?"])]
    lines = [
        json.dumps(good[0]).encode(),
        b'{"image": "%s", "question": "what \\ud800 is it?"}' % str(scene).encode(),  # 2: a lone surrogate (JSON)
        b'{"image": "%s", "question": "what \xff is it?"}' % str(scene).encode(),  # 3: a byte that is not UTF-8
        json.dumps(good[1]).encode(),
        b'{"image": "%s", "question": "how many?", "id": "\\udc80x"}' % str(scene).encode(),  # 5: a bad echo field
    ]
    questions = tmp_path / "q.jsonl"
    questions.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "answers.jsonl"
    status = vqa.main(["--model", tiny_model_dir, "--device", "cpu", "--questions", str(questions), "--out", str(out),
                       "--steps", "2", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert status == vqa.EXIT_SKIPPED
    assert f"{questions}:2: skipped: the question is not valid UTF-8 text (character 6 is the lone surrogate " \
           f"U+D800)" in err
    assert f"{questions}:3: skipped: the question is not valid UTF-8 text (character 6 is the byte 0xff)" in err
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["question"] for r in rows] == ["what shape?", "what color?", "how many?"]  # every good line
    assert rows[2]["id"] == "\udc80x"  # echoed as a JSON escape, not a crash while writing
    assert all(isinstance(r["answer"], str) and r["nfe"] == 2 for r in rows)
    assert "answered 3 question(s), skipped 2 line(s)" in err


@pytest.mark.parametrize("command", ["vqa", "generate"])
def test_non_utf8_bytes_on_the_command_line_are_a_one_line_error(command, tiny_model_dir, scene, tmp_path) -> None:
    # bytes argv: Python hands b"\xff" to the program as the surrogate escape U+DCFF
    if command == "vqa":
        argv = [b"--image", str(scene).encode(), b"--question", b"what \xff is it?"]
        expected = "error: the --question is not valid UTF-8 text (character 6 is the byte 0xff)"
    else:
        argv = [b"--prompt", b"a red \xff circle", b"--out", str(tmp_path / "g.png").encode()]
        expected = "error: the --prompt is not valid UTF-8 text (character 7 is the byte 0xff)"
    run = subprocess.run([sys.executable.encode(), b"-m", f"mmdlm.commands.{command}".encode(), b"--model",
                          tiny_model_dir.encode(), b"--device", b"cpu", *argv],
                         capture_output=True, cwd=REPO, env=ENV, timeout=300)
    stderr = run.stderr.decode("utf-8", "backslashreplace")
    assert run.returncode == 2, stderr
    assert one_line_error(stderr) == expected
    assert run.stdout == b""


def test_lone_surrogates_and_non_utf8_files_through_main(tiny_model_dir, scene, tmp_path, capsys) -> None:
    status = vqa.main(["--model", tiny_model_dir, "--image", str(scene), "--question", "what \ud800?"])
    assert status == vqa.EXIT_USAGE
    assert one_line_error(capsys.readouterr().err) == ("error: the --question is not valid UTF-8 text "
                                                       "(character 6 is the lone surrogate U+D800)")
    status = generate.main(["--model", tiny_model_dir, "--prompt", "\udfff", "--out", str(tmp_path / "g.png")])
    assert status == vqa.EXIT_USAGE and "character 1 is the lone surrogate U+DFFF" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\na blue \xfe square\n")
    status = generate.main(["--model", tiny_model_dir, "--prompts", str(prompts), "--out", str(tmp_path / "g.png")])
    assert status == vqa.EXIT_USAGE
    assert one_line_error(capsys.readouterr().err) == (f"error: prompts file '{prompts}' is not UTF-8 text "
                                                       f"(byte 0xfe at offset 20)")
    assert not (tmp_path / "g.png").exists()


# ---- items 4 and 6: mmdlm.commands.export on unsafe files and on files that are not checkpoints ---------------------
class RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint does with weights_only=False."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


@pytest.fixture(scope="module")
def real_checkpoint(tiny_model_dir, tiny_shards, tmp_path_factory) -> Path:
    """A real Lightning checkpoint of a 2-step LitMDM run (as tests/test_training.py makes them)."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mmdlm.model import ModelConfig
    from mmdlm.training import LitMDM, MDMDataModule

    root = tmp_path_factory.mktemp("ckpt")
    L.seed_everything(0)
    dm = MDMDataModule(train_shards=f"{tiny_shards}/train/*.tar", val_shards=f"{tiny_shards}/val/*.tar",
                       text_tokenizer=f"{tiny_model_dir}/text_tokenizer", vq=f"{tiny_model_dir}/vq", batch_size=4,
                       num_workers=0, resampled=True, shuffle_buffer=16, seed=3)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                        callbacks=[ModelCheckpoint(dirpath=root / "ck", save_last=True)])
    trainer.fit(LitMDM(ModelConfig(n_layer=1, n_head=2, n_embd=32), warmup_steps=2, samples_at_val=0), datamodule=dm)
    return root / "ck" / "last.ckpt"


@pytest.mark.parametrize("kind", ["zip", "plain pickle"])
def test_export_refuses_a_checkpoint_that_would_run_code(kind, tmp_path) -> None:
    import pickle

    marker, ckpt = tmp_path / "marker", tmp_path / "crafted.ckpt"
    payload = {"mmdlm": RunsCode(marker), "state_dict": {}}
    if kind == "zip":
        torch.save(payload, ckpt)
    else:
        ckpt.write_bytes(pickle.dumps(payload))
    run = subprocess.run([*EXPORT, "--ckpt", str(ckpt), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert run.returncode == 2
    line = one_line_error(run.stderr)
    assert str(ckpt) in line
    if kind == "zip":  # torch names the object it refused
        assert "refusing to load" in line and "posix.system" in line and "could run code" in line
    else:
        assert "is not a checkpoint that can be loaded safely" in line
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "out").exists()


def test_export_on_files_that_are_not_checkpoints_is_one_sentence(real_checkpoint, tmp_path, capsys) -> None:
    text, empty, cut = tmp_path / "notackpt.txt", tmp_path / "empty.ckpt", tmp_path / "cut.ckpt"
    text.write_text("hello, I am not a checkpoint\n")
    empty.write_bytes(b"")
    cut.write_bytes(real_checkpoint.read_bytes()[:5000])  # a copy that stopped half-way
    listed, weights = tmp_path / "list.ckpt", tmp_path / "weights.ckpt"
    torch.save([1, 2, 3], listed)
    torch.save({"state_dict": {}}, weights)  # a plain dict, not an mmdlm checkpoint
    expected = {text: "is not a PyTorch checkpoint", empty: "is not a PyTorch checkpoint",
                cut: "is not a PyTorch checkpoint (or it is truncated)", listed: "holds a list, not a dict",
                weights: "is not an mmdlm model checkpoint", tmp_path / "nope.ckpt": "does not exist"}
    for path, message in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            export.main(["--ckpt", str(path), "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2
        line = one_line_error(capsys.readouterr().err)
        assert str(path) in line and message in line, line
    assert not (tmp_path / "out").exists()
    run = subprocess.run([*EXPORT, "--ckpt", str(text), "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert run.returncode == 2 and one_line_error(run.stderr) == (f"error: '{text}' is not a PyTorch checkpoint "
                                                                  f"(or it is truncated)")


def test_a_real_checkpoint_still_exports_and_records_the_weights_checksum(real_checkpoint, tmp_path,
                                                                          capsys) -> None:
    export.main(["--ckpt", str(real_checkpoint), "--out", str(tmp_path / "model")])
    assert "exported" in capsys.readouterr().out
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config[folder.CHECKSUM_KEY] == folder.sha256_file(tmp_path / "model" / "model.safetensors")
    state = torch.load(real_checkpoint, map_location="cpu", weights_only=True)
    pipe = MMDLMPipeline.from_pretrained(tmp_path / "model", device="cpu")
    for name, value in pipe.model.state_dict().items():  # the EMA weights of the run
        assert torch.equal(value, state["ema"].get(name, state["state_dict"].get(f"model.{name}"))), name


def test_no_weights_only_false_left() -> None:
    grep = subprocess.run(["grep", "-rn", "weights_only=False", "mmdlm", "vision", "data", "benchmarks", "train.py"],
                          capture_output=True, text=True, cwd=REPO)
    assert grep.stdout == ""


# ---- item 5: a model folder with damaged weights ---------------------------------------------------------
def test_flipped_bytes_in_the_weights_are_refused(tiny_model_dir, scene, tmp_path, capsys) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4):  # flip four bytes inside the tensors (not the header)
        data[i] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(folder.CorruptModelError, match="is damaged: its sha256 differs"):
        MMDLMPipeline.from_pretrained(model, device="cpu")
    status = vqa.main(["--model", str(model), "--device", "cpu", "--image", str(scene), "--question", "what shape?"])
    out, err = capsys.readouterr()
    assert status == vqa.EXIT_USAGE and out == ""
    assert one_line_error(err) == (f"error: cannot load the model from '{model}': '{weights}' is damaged: its sha256 "
                                   f"differs from the one recorded in config.json at export (copy or export the "
                                   f"model again)")


def test_a_folder_exported_before_checksums_loads_with_a_warning(tiny_model_dir, tmp_path) -> None:
    model = tmp_path / "old"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    del config[folder.CHECKSUM_KEY]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="records no weights_sha256"):
        MMDLMPipeline.from_pretrained(model, device="cpu")


# ---- item 12: a model that gives no answer ---------------------------------------------------------------
@pytest.fixture(scope="module")
def silent_model(tiny_model_dir, scene, tmp_path_factory) -> str:
    """The tiny random model with the input/output embedding rows of `<eos>` and of the text token it always
    predicts swapped: a real model folder whose every answer is end-of-text first (no text)."""
    from PIL import Image

    from mmdlm.sequence import vqa_prompt

    pipe = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    image = Image.open(scene)
    out = pipe.answer([image], ["what shape?"], steps=1)
    sample = vqa_prompt(pipe.encode_images([image]).cpu()[0], pipe.tokenizer.encode("what shape?"), pipe.vocab,
                        pipe.layout)
    predicted = int(torch.mode(out.ids[0][: len(sample)][sample.target & (sample.image_index < 0)]).values)
    eos = pipe.vocab.eos
    with torch.no_grad():
        table = pipe.model.tok_emb.weight
        table[[predicted, eos]] = table[[eos, predicted]]
    root = tmp_path_factory.mktemp("silent")
    path = pipe.save_pretrained(root / "model")
    silent = MMDLMPipeline.from_pretrained(path, device="cpu")
    assert silent.answer([image] * 2, ["what shape?", "how many?"], steps=2).texts == ["", ""]  # the premise
    return str(path)


def test_vqa_says_when_the_model_gave_no_answer(silent_model, tiny_model_dir, scene, tmp_path, capsys) -> None:
    status = vqa.main(["--model", silent_model, "--device", "cpu", "--image", str(scene),
                       "--question", "how many objects?", "--steps", "2"])
    out, err = capsys.readouterr()
    assert status == vqa.EXIT_NO_ANSWER == 4
    assert out == "" and err.strip() == "(no answer: the model produced only end-of-text)"

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"image": str(scene), "question": q}) + "\n"
                                 for q in ("what shape?", "how many?", "what color?")))
    answers = tmp_path / "a.jsonl"
    status = vqa.main(["--model", silent_model, "--device", "cpu", "--questions", str(questions),
                       "--out", str(answers), "--steps", "2"])
    err = capsys.readouterr().err
    assert status == vqa.EXIT_NO_ANSWER
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 3 and all(r["answer"] == "" and r["empty"] is True for r in rows)
    assert "answered 3 question(s) (3 with no answer: the model produced only end-of-text), skipped 0" in err

    status = vqa.main(["--model", tiny_model_dir, "--device", "cpu", "--questions", str(questions),
                       "--out", str(answers), "--steps", "2"])  # a model that answers: no marks, exit 0
    assert status == vqa.EXIT_OK
    assert not any("empty" in json.loads(line) for line in answers.read_text().splitlines())
    assert "no answer" not in capsys.readouterr().err
    help_text = vqa.build_parser().format_help()
    assert "4  no answer" in help_text and "(no answer: the model produced only end-of-text)" in help_text


# ---- item 13: benchmarks/train_speed.py after `make quickstart`, and without its folders --------------------
def recipe(tmp_path: Path, text_tokenizer: str, vq: str) -> Path:
    config = tmp_path / "recipe.yaml"
    config.write_text(f"""
model:
  class_path: mmdlm.training.LitMDM
  init_args: {{config: {{n_layer: 1, n_head: 2, n_embd: 32}}}}
data:
  class_path: mmdlm.training.MDMDataModule
  init_args:
    text_tokenizer: {text_tokenizer}
    vq: {vq}
    layout: {{caption_len: 20, question_len: 12, answer_len: 4, text_len: 24, qa_per_sample: 2}}
    batch_size: 2
""")
    return config


def test_train_speed_reads_a_patch_tokenizer_folder(tiny_model_dir, tmp_path) -> None:
    from vision.patch_tokenizer import PatchTokenizer

    PatchTokenizer(image_size=32, patch_size=8, codebook_size=24).save_pretrained(tmp_path / "patch")  # as quickstart
    config = recipe(tmp_path, f"{tiny_model_dir}/text_tokenizer", str(tmp_path / "patch"))
    result = train_speed.main(["--config", str(config), "--steps", "2", "--warmup", "1", "--device", "cpu",
                               "--out", str(tmp_path / "ts"), "--quiet"])
    (run,) = result["runs"]
    assert run["vocab_size"] == 300 + 24 + 11  # the tokenizer's ids, the patch codebook, the specials
    assert f"vq {tmp_path / 'patch'}" in run["sizes_from"] and "shapes defaults" not in run["sizes_from"]


def test_train_speed_without_the_recipe_folders_names_them(tiny_model_dir, tmp_path, capsys) -> None:
    missing = tmp_path / "runs" / "quickstart" / "vq"
    config = recipe(tmp_path, f"{tiny_model_dir}/text_tokenizer", str(missing))
    with pytest.raises(SystemExit) as exit_info:
        train_speed.main(["--config", str(config), "--out", str(tmp_path / "ts"), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"python -m benchmarks.train_speed: error: {config}: the recipe's image tokenizer folder "
                   f"'{missing}' does not exist, so the vocabulary sizes are unknown: run `make quickstart` first, or "
                   f"give --codebook-size / --grid / --codebook-dim, or --shapes-sizes to use the shapes recipes' "
                   f"values")
    args = train_speed.build_parser().parse_args(["--config", str(config), "--out", "x", "--shapes-sizes"])
    sizes = train_speed.vocab_sizes(train_speed.load_recipe(str(config)), args)  # the explicit opt-in
    assert (sizes.codebook_size, sizes.grid, sizes.codebook_dim) == (256, (8, 8), 8)
    assert sizes.source == f"shapes defaults, tokenizer {tiny_model_dir}/text_tokenizer"
    args = train_speed.build_parser().parse_args(["--config", str(config), "--out", "x", "--codebook-size", "32",
                                                  "--grid", "4", "--codebook-dim", "6"])  # or every size by flag
    sizes = train_speed.vocab_sizes(train_speed.load_recipe(str(config)), args)
    assert (sizes.codebook_size, sizes.grid, sizes.codebook_dim) == (32, (4, 4), 6)
