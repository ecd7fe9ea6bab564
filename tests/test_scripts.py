"""The user-facing scripts on the real tiny model: `mmdlm.commands.vqa` (single and batch mode, errors, exit codes),
and `mmdlm.commands.generate` (grids, joint captions, inpainting, progress frames). The demo: tests/test_demo.py.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_scripts.py
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdlm.commands import generate, vqa
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.render import GREY, PADDING, decode_canvas
from mmdlm.worlds.shapes import render, sample_scene

REPO = Path(__file__).resolve().parents[1]
PAD = PADDING
LONG_QUESTION = " ".join(["what color is the circle"] * 6)  # far beyond Layout.question_len tokens


@pytest.fixture(scope="module")
def pipe(tiny_model_dir: str) -> MMDLMPipeline:
    return MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A 32x32 shapes scene as PNG (the model's image size, so no resizing happens)."""
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    render(sample_scene(random.Random(3), 2, 2), image_size=32).save(path)
    return path


def grid_size(rows: int, cols: int, side: int) -> tuple[int, int]:
    """(width, height) of a torchvision grid of `side`-pixel tiles."""
    return cols * (side + PAD) + PAD, rows * (side + PAD) + PAD


# ---- vqa -------------------------------------------------------------------------------------------------
def test_vqa_single_prints_the_pipeline_answer(tiny_model_dir, pipe, scene, capsys):
    question = "what color is the circle?"
    status = vqa.main(["--model", tiny_model_dir, "--device", "cpu", "--image", str(scene), "--question", question,
                       "--steps", "3", "--verbose"])
    out, err = capsys.readouterr()
    expected = pipe.answer([Image.open(scene)], [question], steps=3)
    assert status == vqa.EXIT_OK
    assert out == expected.texts[0] + "\n"  # exactly one line: the answer
    assert f"NFE {expected.nfe}" in err


@pytest.mark.parametrize("case", ["missing image", "unreadable image", "empty question", "too long", "bad model"])
def test_vqa_single_errors_are_one_sentence_and_exit_2(case, tiny_model_dir, scene, tmp_path, capsys):
    junk = tmp_path / "junk.png"
    junk.write_text("not an image")
    image, question, model = str(scene), "what color is the circle?", tiny_model_dir
    image = {"missing image": str(tmp_path / "nope.png"), "unreadable image": str(junk)}.get(case, image)
    question = {"empty question": "  ", "too long": LONG_QUESTION}.get(case, question)
    model = str(tmp_path) if case == "bad model" else model  # a folder, but not a model folder
    status = vqa.main(["--model", model, "--device", "cpu", "--image", image, "--question", question])
    out, err = capsys.readouterr()
    assert status == vqa.EXIT_USAGE
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ")


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_vqa_batch_answers_good_lines_and_reports_bad_ones(tiny_model_dir, scene, tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "rel.png").write_bytes(scene.read_bytes())
    lines = [
        json.dumps({"image": "img/rel.png", "question": "what color is the circle?", "id": "a"}),  # 1 relative
        json.dumps({"image": "img/missing.png", "question": "what shape?"}),  # 2 missing image
        json.dumps({"image": str(scene), "question": "   "}),  # 3 empty question
        "",  # 4 blank: ignored, not an error
        json.dumps({"image": str(scene), "question": LONG_QUESTION}),  # 5 too long (batched with line 6)
        json.dumps({"image": str(scene), "question": "how many squares are there?", "id": "b"}),  # 6 absolute
        '{"image": "img/rel.png", "question": ',  # 7 malformed JSON
        json.dumps({"question": "is there a cross?"}),  # 8 missing key
        json.dumps(["img/rel.png", "what?"]),  # 9 not an object
        json.dumps({"image": "img/rel.png", "question": "is there a red square?", "id": "c"}),  # 10
    ]
    questions = write_jsonl(tmp_path / "q.jsonl", lines)
    out_file = tmp_path / "answers.jsonl"
    status = vqa.main(["--model", tiny_model_dir, "--device", "cpu", "--questions", str(questions),
                       "--out", str(out_file), "--batch-size", "2", "--steps", "3"])
    err = capsys.readouterr().err
    assert status == vqa.EXIT_SKIPPED
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c"]  # every good line, in input order
    for row, source in zip(rows, [lines[0], lines[5], lines[9]]):
        assert {k: row[k] for k in json.loads(source)} == json.loads(source)  # the input fields, unchanged
        assert isinstance(row["answer"], str) and row["nfe"] == 3
    reported = sorted(int(line.split(":")[1]) for line in err.splitlines() if "skipped:" in line)
    assert reported == [2, 3, 5, 7, 8, 9]
    assert "longer than the model's limit" in err and "malformed JSON" in err and "missing key 'image'" in err


def test_vqa_batch_all_good_exits_0_on_stdout(tiny_model_dir, scene, tmp_path, capsys):
    questions = write_jsonl(tmp_path / "q.jsonl", [
        json.dumps({"image": str(scene), "question": q}) for q in ("what shape?", "what color?", "how many?")])
    status = vqa.main(["--model", tiny_model_dir, "--device", "cpu", "--questions", str(questions),
                       "--threshold", "0.9"])
    out = capsys.readouterr().out
    assert status == vqa.EXIT_OK
    assert [json.loads(line)["question"] for line in out.splitlines()] == ["what shape?", "what color?", "how many?"]


def test_vqa_process_help_and_exit_codes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "mmdlm.commands.vqa"]
    helped = subprocess.run(run + ["--help"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert helped.returncode == 0 and "Exit status" in helped.stdout and "--questions" in helped.stdout
    missing = subprocess.run(run + ["--model", str(tmp_path), "--image", str(tmp_path / "nope.png"), "--question",
                                    "what?"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: image '{tmp_path / 'nope.png'}' does not exist"
    usage = subprocess.run(run + ["--model", str(tmp_path), "--image", "x.png"], capture_output=True, text=True,
                           cwd=REPO, env=env, timeout=120)
    assert usage.returncode == 2 and "--image needs --question" in usage.stderr


# ---- generate ---------------------------------------------------------------------------------------------
def test_generate_grid_has_a_row_per_prompt(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle at the top left\n\na blue square in the middle\n")
    out = tmp_path / "grid.png"
    status = generate.main(["--model", tiny_model_dir, "--device", "cpu", "--prompts", str(prompts), "--num", "3",
                            "--steps", "3", "--guidance", "3", "--scale", "2", "--out", str(out)])
    assert status == 0
    assert Image.open(out).size == grid_size(rows=2, cols=3, side=64)
    printed = capsys.readouterr().out
    assert re.search(r"NFE 3, \d+\.\d ms per image", printed), printed


def test_generate_progress_writes_a_frame_per_step_and_a_gif(tiny_model_dir, tmp_path):
    frames_dir, steps = tmp_path / "frames", 4
    status = generate.main(["--model", tiny_model_dir, "--device", "cpu", "--prompt", "a green cross", "--num", "2",
                            "--steps", str(steps), "--scale", "1", "--out", str(tmp_path / "s.png"),
                            "--progress", str(frames_dir)])
    assert status == 0
    frames = sorted(frames_dir.glob("step_*.png"))
    assert [f.name for f in frames] == [f"step_{i:03d}.png" for i in range(steps)]
    gif = Image.open(frames_dir / "progress.gif")
    assert gif.n_frames == steps and gif.size == grid_size(1, 2, 32)
    grey = [int((torch.tensor(list(Image.open(f).getdata())) == 127).all(1).sum()) for f in frames]
    assert grey[0] > 0 and grey[-1] == 0  # masked cells are grey until the last step fills them
    assert grey == sorted(grey, reverse=True)


def test_decode_canvas_paints_exactly_the_masked_cells_grey(pipe):
    codes = torch.randint(0, pipe.vq.codebook_size, (1, *pipe.vq.grid))
    codes[0, 1, 2] = -1
    images = decode_canvas(pipe, codes)
    cell = images[0, :, 4:8, 8:12]  # token (1, 2) of a 4-pixel-per-token grid
    assert torch.all(cell == GREY)
    full = pipe.vq.decode(codes.clamp(min=0))
    outside = torch.ones_like(images, dtype=torch.bool)
    outside[..., 4:8, 8:12] = False
    assert torch.equal(images[outside], full[outside])


def test_generate_joint_draws_and_prints_captions(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "joint.png"
    status = generate.main(["--model", tiny_model_dir, "--device", "cpu", "--joint", "--num", "3", "--steps", "3",
                            "--scale", "2", "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert status == 0
    assert [line.split(":")[0] for line in printed[:3]] == ["0", "1", "2"] and "NFE 3" in printed[3]
    width, height = Image.open(out).size
    assert width == grid_size(1, 3, 64)[0] and height > grid_size(1, 3, 64)[1]  # a text band under the images


def test_inpaint_keeps_the_codes_outside_the_box(pipe, scene):
    box = (0, 0, 12, 20)  # pixels -> token columns 0..2, rows 0..4 (4 pixels per token)
    result = generate.inpaint(pipe, Image.open(scene), box, num=2, steps=3)
    expected_mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected_mask[0, :5, :3] = True
    assert torch.equal(result.token_mask, expected_mask)
    before = pipe.encode_images([Image.open(scene)]).cpu().expand(2, -1, -1)  # (2, h, w)
    outside = ~expected_mask.expand(2, -1, -1)
    assert torch.equal(result.output.codes[outside], before[outside])
    assert result.output.codes.shape == before.shape


def test_generate_inpaint_writes_original_masked_results(tiny_model_dir, scene, tmp_path):
    out = tmp_path / "inpaint.png"
    status = generate.main(["--model", tiny_model_dir, "--device", "cpu", "--inpaint", str(scene), "--box", "0,0,12,20",
                            "--prompt", "a red circle at the top left", "--num", "2", "--steps", "3", "--scale", "1",
                            "--out", str(out)])
    assert status == 0
    sheet = torch.tensor(list(Image.open(out).getdata())).view(*grid_size(1, 4, 32)[::-1], 3)  # (H, W, 3)
    original = torch.tensor(list(Image.open(scene).getdata())).view(32, 32, 3)
    first = sheet[PAD:PAD + 32, PAD:PAD + 32]
    masked = sheet[PAD:PAD + 32, 2 * PAD + 32:2 * PAD + 64]
    assert torch.equal(first, original)
    assert torch.all(masked[:20, :12] == 128)  # the regenerated token cells, grey
    keep = torch.ones(32, 32, dtype=torch.bool)
    keep[:20, :12] = False
    assert torch.equal(masked[keep], original[keep])


def test_generate_edit_writes_the_original_then_the_edits(tiny_model_dir, pipe, scene, tmp_path, capsys):
    out = tmp_path / "edit.png"
    status = generate.main(["--model", tiny_model_dir, "--device", "cpu", "--edit", str(scene), "--instruction",
                            "make the circle blue", "--num", "2", "--steps", "3", "--image-guidance", "1.0",
                            "--scale", "1", "--out", str(out)])
    assert status == 0 and "2 edit(s), NFE 3" in capsys.readouterr().out
    assert Image.open(out).size == grid_size(1, 3, 32)
    sheet = torch.tensor(list(Image.open(out).getdata())).view(*grid_size(1, 3, 32)[::-1], 3)  # (H, W, 3)
    original = torch.tensor(list(Image.open(scene).getdata())).view(32, 32, 3)
    assert torch.equal(sheet[PAD:PAD + 32, PAD:PAD + 32], original)
    edits = pipe.edit([Image.open(scene)] * 2, ["make the circle blue"] * 2, steps=3)
    assert edits.codes.shape == (2, *pipe.vq.grid) and edits.nfe == 3
    with pytest.raises(ValueError, match="2 images but 1 instructions"):
        pipe.edit([Image.open(scene)] * 2, ["x"])
    from mmdlm.sampling.revise import Revision

    source = pipe.encode_images([Image.open(scene)]).cpu()  # (1, h, w)
    revised = pipe.edit([Image.open(scene)] * 2, ["make the circle blue"] * 2, steps=3,
                        revision=Revision(threshold=1.0, only_if_disagrees=False, max_tokens=2))
    changed = (revised.codes != source).flatten(1).sum(1)  # (2,) tokens the revision rewrote, at most 2 a row
    assert bool((changed <= 2).all()) and revised.nfe >= 2  # a scoring call, then the refill


@pytest.mark.parametrize("box", ["0,0,40,8", "8,0,8,16", "10,0,4,8", "-1,0,4,4"])
def test_generate_rejects_a_box_outside_or_empty(box, tiny_model_dir, scene, tmp_path, capsys):
    status = generate.main(["--model", tiny_model_dir, "--device", "cpu", "--inpaint", str(scene), f"--box={box}",
                            "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: box") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("argv", [
    ["--inpaint", "SCENE", "--box", "1,2,3"],  # not four numbers
    ["--inpaint", "SCENE"],  # no box
    ["--prompt", "x", "--num", "0"],
    ["--prompt", "x", "--plausibility", "1.5"],  # a fraction of the max probability
    ["--joint", "--prompt", "x"],
    ["--joint", "--progress", "frames"],
    ["--edit", "SCENE"],  # no instruction
    ["--instruction", "make it blue", "--prompt", "x"],  # an instruction without --edit
    ["--edit", "SCENE", "--instruction", "x", "--prompt", "y"],
    ["--edit", "SCENE", "--instruction", "x", "--image-guidance", "-1"],
    ["--joint", "--best-of", "2"],  # revision flags go with text-to-image
    ["--inpaint", "SCENE", "--box", "0,0,4,4", "--revise"],
    [],  # text-to-image without a prompt
])
def test_generate_usage_errors_exit_2(argv, tiny_model_dir, scene):
    with pytest.raises(SystemExit) as exc:
        generate.main(["--model", tiny_model_dir] + [str(scene) if a == "SCENE" else a for a in argv])
    assert exc.value.code == 2


@pytest.mark.parametrize("case", ["missing image", "bad model", "too long prompt"])
def test_generate_input_errors_exit_2(case, tiny_model_dir, scene, tmp_path, capsys):
    argv = {"missing image": ["--model", tiny_model_dir, "--inpaint", str(tmp_path / "no.png"), "--box", "0,0,4,4"],
            "bad model": ["--model", str(tmp_path / "no-model"), "--prompt", "a red circle"],
            "too long prompt": ["--model", tiny_model_dir, "--prompt", " ".join(["a red circle"] * 30)]}[case]
    status = generate.main(argv + ["--device", "cpu", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


# ---- caption and infill ----------------------------------------------------------------------------------
def test_caption_prints_the_pipeline_caption_and_takes_sampler_flags(tiny_model_dir, pipe, scene, tmp_path, capsys):
    from mmdlm.commands import caption

    status = caption.main(["--model", tiny_model_dir, "--device", "cpu", "--image", str(scene), "--steps", "4",
                           "--block-length", "0", "--threshold", "none", "-v"])
    out, err = capsys.readouterr()
    expected = pipe.caption([Image.open(scene)], steps=4, block_length=None, threshold=None)
    assert status in (caption.EXIT_OK, caption.EXIT_NO_ANSWER) and out == expected.texts[0] + "\n"
    assert f"NFE {expected.nfe}" in err and expected.nfe == 4
    two = caption.main(["--model", tiny_model_dir, "--device", "cpu", "--image", str(scene), "--image", str(scene)])
    lines = capsys.readouterr().out.splitlines()
    assert two in (caption.EXIT_OK, caption.EXIT_NO_ANSWER)
    assert [line.split("\t")[0] for line in lines] == [str(scene)] * 2
    assert caption.main(["--model", tiny_model_dir, "--image", str(tmp_path / "nope.png")]) == caption.EXIT_USAGE
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bad sampler value is a usage error
        caption.main(["--model", tiny_model_dir, "--image", str(scene), "--threshold", "2"])


def test_infill_fills_the_blanks_and_refuses_texts_without_one(tiny_model_dir, pipe, capsys):
    from mmdlm.commands import infill

    text = "a large [MASK] circle at the top left"
    assert infill.main(["--model", tiny_model_dir, "--device", "cpu", "--text", text]) == infill.EXIT_OK
    assert capsys.readouterr().out == pipe.infill([text]).texts[0] + "\n"
    assert infill.main(["--model", tiny_model_dir, "--text", "no blank here"]) == infill.EXIT_USAGE
    assert "no blank" in capsys.readouterr().err


def test_revision_flags_reach_the_pipeline(tiny_model_dir, pipe, scene, tmp_path, capsys):
    """--revise, --draft (any model folder of the same vocabulary drafts), --best-of and --tokens-per-blank auto."""
    from mmdlm.commands import caption, infill
    from mmdlm.sampling.revise import Revision

    image = Image.open(scene)
    base = ["--model", tiny_model_dir, "--device", "cpu", "--image", str(scene)]
    assert caption.main([*base, "--revise", "-v"]) in (caption.EXIT_OK, caption.EXIT_NO_ANSWER)
    out, err = capsys.readouterr()
    expected = pipe.caption([image], revision=Revision())
    assert out == expected.texts[0] + "\n" and f"NFE {expected.nfe}" in err
    assert caption.main([*base, "--draft", tiny_model_dir]) in (caption.EXIT_OK, caption.EXIT_NO_ANSWER)
    assert capsys.readouterr().out == pipe.caption([image], draft=pipe).texts[0] + "\n"
    assert caption.main([*base, "--draft", str(tmp_path / "none")]) == caption.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    status = vqa.main([*base, "--question", "what color is the circle?", "--revise"])
    assert status in (vqa.EXIT_OK, vqa.EXIT_NO_ANSWER)
    assert generate.main(["--model", tiny_model_dir, "--device", "cpu", "--prompt", "a red circle", "--num", "1",
                          "--steps", "2", "--best-of", "3", "--out", str(tmp_path / "b.png")]) == 0
    assert "NFE 3," in capsys.readouterr().out  # 2 steps for the 3 candidates together, then 1 scoring call
    text = "a large [MASK] circle at the top left"
    assert infill.main(["--model", tiny_model_dir, "--device", "cpu", "--text", text, "--tokens-per-blank", "auto",
                        "--max-blank", "2"]) == infill.EXIT_OK
    assert capsys.readouterr().out == pipe.infill([text], tokens_per_blank=None, max_blank=2).texts[0] + "\n"


def test_sampler_help_shows_the_task_defaults(capsys):
    from mmdlm.commands import caption
    from mmdlm.pipeline import DEFAULT_SAMPLERS

    with pytest.raises(SystemExit):
        caption.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    d = DEFAULT_SAMPLERS["caption"]
    assert f"steps={d.steps}, threshold={d.threshold}, block_length={d.block_length}" in out
    with pytest.raises(SystemExit):
        generate.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"text_to_image: steps={DEFAULT_SAMPLERS['text_to_image'].steps}," in out
