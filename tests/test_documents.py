"""Interleaved documents: a user's MMC4 / OBELICS-style shard is read, pre-tokenized and laid out, and
any of its segments can be generated given the others."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdlm.data import BadSampleCounter, record_pipeline
from mmdlm.pipeline import Blank, MMDLMPipeline
from mmdlm.pretokenize import pretokenize
from mmdlm.sequence import Segment, SequenceBuilder, Task, document_prompt, document_sample
from mmdlm.training import MDMDataModule
from mmdlm.worlds.shapes import make_object, render

TEXTS = ["a red circle at the top left", "then the circle turns blue", "what changed ? colour"]
SCENES = [[make_object("red", "circle", "large", 0)], [make_object("blue", "circle", "large", 0)]]


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def doc_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny folder with text regions that let 2 images and 3 texts fit its 256 positions (the default layout's
    48-token text regions would not)."""
    import shutil

    out = tmp_path_factory.mktemp("docs") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["layout"].update(text_len=24, segment_len=24)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def write_documents(path: Path, extra: dict[str, dict] | None = None) -> str:
    """One shard: `doc0` holds text, image, text, image, text (2 images, 3 texts), the MMC4 / OBELICS layout of a
    json `texts` / `images` pair with the images as members; `extra`: more samples' json (no images)."""
    with tarfile.open(path, "w") as tar:
        meta = {"texts": [TEXTS[0], None, TEXTS[1], None, TEXTS[2]], "images": [None, "0.png", None, "1.png", None]}
        _member(tar, "doc0.json", json.dumps(meta).encode())
        for i, scene in enumerate(SCENES):
            _member(tar, f"doc0.{i}.png", _png(render(scene)))
        for key, meta in (extra or {}).items():
            _member(tar, f"{key}.json", json.dumps(meta).encode())
    return str(path)


def test_a_users_interleaved_shard_is_read_pretokenized_and_laid_out(tiny_model_dir, tmp_path: Path) -> None:
    bad = {"both": {"texts": ["a", "b"], "images": [None, "0.png"], "targets": [5]},  # target out of range
           "neither": {"texts": [None], "images": [None]},
           "lost": {"texts": ["x", None], "images": [None, "0.png"]}}  # names a member it lacks
    url = write_documents(tmp_path / "docs.tar", bad)
    counter = BadSampleCounter()
    records = list(record_pipeline(url, counter=counter))
    assert [r["__key__"] for r in records] == ["doc0"] and counter.total == 3, counter.describe()
    segments = records[0]["segments"]
    assert [("text" in s) for s in segments] == [True, False, True, False, True]
    assert [s["text"] for s in segments if "text" in s] == TEXTS
    assert segments[1]["image"].shape == (3, 32, 32)

    pretokenize(f"{tiny_model_dir}/vq", url, str(tmp_path / "codes"))
    dm = MDMDataModule(str(tmp_path / "codes" / "docs.tar"), text_tokenizer=f"{tiny_model_dir}/text_tokenizer",
                       vq=f"{tiny_model_dir}/vq")
    (record,) = list(record_pipeline(str(tmp_path / "codes" / "docs.tar"), load_images=False))
    vq = dm.processor.vq
    for i, seg in ((1, 0), (3, 1)):  # the stored codes are the DataModule's own encoding of the image
        image = record_pipeline(url).__iter__().__next__()["segments"][i]["image"]
        assert torch.equal(record["segments"][i]["codes"], vq.encode(image[None])[0]), seg
    sample = dm.transform(record)
    vocab, n = dm.processor.vocab, vq.tokens_per_image
    assert sample.task == Task.DOC and sample.ids[0] == vocab.bos
    assert int((sample.ids == vocab.sep).sum()) == 3 and int((sample.ids == vocab.soi).sum()) == 2
    index = sample.image_index[sample.image_index >= 0]
    assert torch.equal(index, torch.arange(n).repeat(2))  # each image its own 2D positions
    assert int(sample.target.sum()) in (n, dm.processor.layout.segment_len)  # one segment is the target


def test_any_segment_is_the_target_and_its_region_alone(doc_model_dir) -> None:
    pipe = MMDLMPipeline.from_pretrained(doc_model_dir)
    vocab, layout, tok = pipe.vocab, pipe.layout, pipe.tokenizer
    codes = pipe.encode_images([render(s) for s in SCENES]).cpu()
    parts = [tok.encode(TEXTS[0]), codes[0], tok.encode(TEXTS[1]), codes[1], tok.encode(TEXTS[2])]
    given = document_sample([Segment.of_image(p) if isinstance(p, torch.Tensor) else Segment.of_text(p)
                             for p in parts], vocab, layout)
    assert not given.target.any()
    for t in range(len(parts)):
        segs = [(Segment.of_image(p, target=i == t) if isinstance(p, torch.Tensor) else
                 Segment.of_text(p, target=i == t)) for i, p in enumerate(parts)]
        sample = document_sample(segs, vocab, layout)
        prompt = document_prompt(segs, vocab, layout)
        region = sample.target.nonzero().flatten()
        assert sample.prefix == int(region[0]) and torch.all(region.diff() == 1)  # one contiguous region
        if isinstance(parts[t], torch.Tensor):
            assert torch.equal(vocab.token_to_image(sample.ids[region]), parts[t].flatten())
            assert bool(sample.cond.any()) and not bool((sample.cond & sample.target).any())  # guidance drops context
        else:
            assert len(region) == layout.segment_len and not bool(sample.cond.any())
            assert sample.ids[region][: len(parts[t])].tolist() == list(parts[t])
        assert bool((prompt.ids[region] == vocab.mask).all())
        assert torch.equal(prompt.ids[: region[0]], given.ids[: region[0]])  # the segments before it, as given
        after = len(given) - (len(sample) - int(region[-1]) - 1)  # where the rest starts in the all-given layout
        assert torch.equal(prompt.ids[int(region[-1]) + 1:], given.ids[after:])  # ... and after it


@pytest.mark.parametrize("blank", [1, 2, 3])
def test_complete_document_generates_any_segment_given_the_others(doc_model_dir, blank: int) -> None:
    pipe = MMDLMPipeline.from_pretrained(doc_model_dir)
    images = [render(s) for s in SCENES]
    doc: list = [TEXTS[0], images[0], TEXTS[1], images[1], TEXTS[2]]
    doc[blank] = Blank(image=blank in (1, 3))
    out = pipe.complete_document([doc, [Blank(image=True), "a red circle"]], seed=0)
    filled, second = out.documents
    for i, part in enumerate(filled):
        if i != blank:
            assert part is doc[i]  # given segments come back as given
        elif blank in (1, 3):
            assert isinstance(part, Image.Image) and part.size == (32, 32)
        else:
            assert isinstance(part, str)
    assert isinstance(second[0], Image.Image) and second[1] == "a red circle"
    assert not bool((out.ids == pipe.vocab.mask).any()) and out.nfe >= 1
    with pytest.raises(ValueError, match="Blank"):
        pipe.complete_document([["only given text"]])


def test_the_builder_draws_the_target_among_the_records_targets(tiny_model_dir) -> None:
    pipe = MMDLMPipeline.from_pretrained(tiny_model_dir)
    codes = torch.zeros(pipe.vq.grid, dtype=torch.long)
    record = {"segments": [{"codes": codes}, {"text": "make the circle blue"}, {"codes": codes}], "targets": [2]}
    builder = SequenceBuilder(pipe.vocab, pipe.tokenizer, pipe.layout, {"t2i": 1.0, "doc": 1.0})
    rng = random.Random(0)
    for _ in range(5):
        sample = builder.build(record, rng=rng)  # only DOC can do a document
        assert sample.task == Task.DOC and int(sample.target.sum()) == pipe.vq.tokens_per_image
        assert int(sample.target.nonzero()[0]) > int((sample.ids == pipe.vocab.sep).nonzero()[0])
    # a group of targets (several answers of one document) is generated together: every answer a target
    record = {"segments": [{"codes": codes}, {"codes": codes}, {"text": "what changed?"}, {"text": "color"},
                           {"text": "where did the color change?"}, {"text": "top left"}], "targets": [[3, 5]]}
    sample = builder.build(record, rng=rng)
    assert int(sample.target.sum()) == 2 * pipe.layout.segment_len
    assert not bool(sample.target[sample.image_index >= 0].any())


def test_edits_are_evaluated_and_compared_by_mode(doc_model_dir, tmp_path: Path, capsys) -> None:
    """`mmdlm evaluate --tasks edit,what_changed` on the edits world's val documents, and `benchmarks.edit_modes`:
    every edit is scored by the oracle (an untrained model gets few right), every question answered."""
    from benchmarks import edit_modes
    from mmdlm.commands.evaluate import main as evaluate_main
    from mmdlm.worlds.edits import EditsConfig, write_edits

    write_edits(tmp_path / "edits", EditsConfig(train=4, val=12, seed=3), progress=False)
    shards = str(tmp_path / "edits" / "val" / "*.tar")
    evaluate_main(["--model", doc_model_dir, "--shards", shards, "--tasks", "edit,what_changed",
                   "--out", str(tmp_path / "m.json"), "--report", str(tmp_path / "r.md"), "--steps", "2"])
    metrics = json.loads((tmp_path / "m.json").read_text())
    report = (tmp_path / "r.md").read_text()
    assert "## Image editing" in report and "## What changed?" in report, report[:400]
    edit, asked = metrics["edit"], metrics["what_changed"]
    assert edit["n"] + asked["n"] == 12 and edit["n"] > 0 and asked["n"] > 0
    assert sum(v["n"] for v in edit["per_kind"].values()) == edit["n"] and 0 <= edit["all_correct"] <= 1
    assert 0 <= asked["accuracy"] <= 1 and len(asked["examples"]) == min(6, asked["n"])
    capsys.readouterr()
    edit_modes.main(["--model", doc_model_dir, "--shards", shards, "--revision", "4,1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["mode"] for line in lines] == ["from masks", "revision 4 tokens x 1"]
    assert all(line["n"] == edit["n"] for line in lines)
    from benchmarks import edit_probe

    edit_probe.main(["--model", doc_model_dir, "--shards", shards, "--ratio", "1.0", "--ratio", "0.5"])
    probes = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [p["ratio"] for p in probes] == [1.0, 0.5] and all(p["edits"] == edit["n"] for p in probes)
    assert all(0 <= p["unchanged_right"] <= 1 for p in probes)
