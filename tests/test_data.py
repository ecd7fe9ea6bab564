"""Shard reading: shard patterns, every sample once per epoch (0 and 2 workers), bad input skipped and
counted, img2dataset-style shards, pre-computed codes, resampling, the DataModules, digits shards."""

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmdlm.data import (
    BadSample,
    BadSampleCounter,
    LengthBuckets,
    collate_records,
    expand_shards,
    record_pipeline,
)
from mmdlm.training import ImageDataModule, ShardDataModule
from mmdlm.worlds.digits import write_digits
from mmdlm.worlds.shapes import ShapesConfig, render, write_shapes

N_TRAIN, N_VAL = 60, 12


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_shapes(out, ShapesConfig(train=N_TRAIN, val=N_VAL, shard_size=12, seed=1), progress=False)
    return out  # 5 train shards of 12, 1 val shard


def tar_keys(folder: Path) -> list[str]:
    keys = []
    for path in sorted(folder.glob("*.tar")):
        with tarfile.open(path) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good(key: str) -> tuple[str, dict[str, bytes]]:
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    return key, {"png": png_bytes(image), "json": json.dumps({"captions": [f"caption of {key}"]}).encode()}


# --- shard patterns ------------------------------------------------------------------------------


def test_expand_shards_patterns(shapes: Path) -> None:
    train = sorted(str(p) for p in (shapes / "train").glob("*.tar"))
    assert len(train) == 5
    assert expand_shards(f"{shapes}/train/*.tar") == train
    assert expand_shards(f"{shapes}/train/shapes-train-{{000000..000004}}.tar") == train
    assert expand_shards(f"{shapes}/train/shapes-train-{{000000,000001}}.tar") == train[:2]
    assert expand_shards(f"{shapes}/train") == train
    both = expand_shards(f"{shapes}/train/shapes-train-00000{{0..1}}.tar,{shapes}/val/*.tar")
    assert both == train[:2] + [str(shapes / "val" / "shapes-val-000000.tar")]
    assert expand_shards([train[1], train[0], train[1]]) == [train[1], train[0]]


def test_expand_shards_missing_raises_naming_the_pattern(shapes: Path) -> None:
    pattern = f"{shapes}/nowhere/*.tar"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        expand_shards(pattern)
    with pytest.raises(FileNotFoundError, match="000009"):  # one shard of a brace range is missing
        expand_shards(f"{shapes}/train/shapes-train-{{000000..000009}}.tar")
    with pytest.raises(FileNotFoundError, match="nowhere"):  # one bad part of a list
        expand_shards(f"{shapes}/val/*.tar,{pattern}")
    with pytest.raises(FileNotFoundError):
        record_pipeline(pattern)


# --- every sample once per epoch -------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("shuffle", [0, 16])
def test_every_sample_once_per_epoch(shapes: Path, num_workers: int, shuffle: int) -> None:
    pipeline = record_pipeline(f"{shapes}/train/*.tar", shuffle=shuffle, load_images=False, load_codes=False)
    loader = DataLoader(pipeline, batch_size=5, num_workers=num_workers, collate_fn=collate_records)
    expected = sorted(tar_keys(shapes / "train"))
    assert len(expected) == N_TRAIN
    for _ in range(2):  # two epochs
        keys = [k for batch in loader for k in batch["__key__"]]
        assert sorted(keys) == expected  # none lost, no duplicates
    if shuffle:
        assert keys != expected


def test_records_follow_the_contract(shapes: Path) -> None:
    records = list(record_pipeline(f"{shapes}/val/*.tar"))
    assert [r["__key__"] for r in records] == tar_keys(shapes / "val")
    for record in records:
        meta = record["meta"]
        assert record["image"].shape == (3, 32, 32) and record["image"].dtype == torch.float32
        rendered = torch.from_numpy(np.array(render(meta["objects"]))).permute(2, 0, 1).float() / 255
        assert torch.equal(record["image"], rendered)  # exact colours: no resize at the native size
        assert record["captions"] == meta["captions"] and len(record["captions"]) >= 1
        assert record["qa"] == meta["qa"] and {"question", "answer", "type"} <= set(record["qa"][0])
        assert "codes" not in record


# --- bad input --------------------------------------------------------------------------------------


@pytest.fixture()
def corrupt_shards(tmp_path: Path) -> tuple[list[str], list[str], dict[str, int]]:
    """Two shards full of trouble; returns (urls, keys of the good samples, expected bad counts)."""
    red = Image.new("RGB", (32, 32), (255, 0, 0))
    truncated_png = png_bytes(red)[:40]
    first = write_tar(tmp_path / "a.tar", [
        good("a0"),
        ("garbage", {"png": b"\x89PNG not really an image", "txt": b"a caption"}),
        ("cut", {"png": truncated_png, "txt": b"a caption"}),
        good("a1"),
        ("latin1", {"png": png_bytes(red), "txt": "caf\xe9".encode("latin-1")}),
        ("nocaption", {"png": png_bytes(red)}),
        ("badjson", {"png": png_bytes(red), "json": b"{not json"}),
        ("noimage", {"txt": b"a caption without its image"}),
        ("badcodes", {"png": png_bytes(red), "txt": b"x", "npy": b"\x93NUMPY garbage"}),
        good("a2"),
        ("dup", {"png": png_bytes(red)}),
        ("dup", {"png": png_bytes(red), "txt": b"two pngs for one key: which one?"}),
        good("a3"),
    ])
    second = write_tar(tmp_path / "b.tar", [good("b0"), good("b1"), good("b2"), good("b3")])
    raw = second.read_bytes()
    with tarfile.open(second) as tar:
        member = tar.getmember("b3.png")
    second.write_bytes(raw[:member.offset_data + 30])  # truncated inside b3.png: b3 is lost
    third = write_tar(tmp_path / "c.tar", [good("c0"), good("c1"), good("c2")])
    raw = bytearray(third.read_bytes())
    with tarfile.open(third) as tar:
        member = tar.getmember("c1.json")
    raw[member.offset:member.offset + 512] = b"\x07" * 512  # garbage over c1.json's header: c1 loses it
    third.write_bytes(bytes(raw))
    urls = [str(first), str(second), str(third), str(tmp_path / "missing.tar")]
    expected = {"open": 1, "tar": 2, "image": 3, "text": 1, "caption": 2, "json": 1, "codes": 1, "transform": 0}
    return urls, ["a0", "a1", "a2", "a3", "b0", "b1", "b2", "c0", "c2"], expected


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_are_skipped_and_counted(corrupt_shards, num_workers: int, caplog) -> None:
    urls, good_keys, expected = corrupt_shards
    pipeline = record_pipeline(urls)
    loader = DataLoader(pipeline, batch_size=2, num_workers=num_workers, collate_fn=collate_records)
    with caplog.at_level(logging.WARNING, logger="mmdlm.data"):
        keys = [k for batch in loader for k in batch["__key__"]]
    assert sorted(keys) == good_keys  # every good sample, the rest of each shard still read
    counter = pipeline.bad_samples
    assert counter.counts == expected  # summed over the workers, visible in the main process
    assert counter.total == sum(expected.values()) and counter.good == len(good_keys)
    if num_workers == 0:
        assert "skipping a bad sample" in caplog.text
    counter.reset()
    assert counter.total == 0 and counter.good == 0


def test_programming_errors_are_not_swallowed(shapes: Path) -> None:
    def buggy(record: dict) -> dict:
        raise KeyError("a bug, not bad data")

    with pytest.raises(KeyError):
        next(iter(record_pipeline(f"{shapes}/val/*.tar", transform=buggy)))
    counter = BadSampleCounter()
    with pytest.raises(ZeroDivisionError):
        counter(ZeroDivisionError())
    with pytest.raises(ValueError, match="unknown bad-sample reason"):
        BadSample("weird", "x")


# --- other layouts ----------------------------------------------------------------------------------


def test_img2dataset_layout_any_size_and_mode(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (50, 37), (0, 0, 255, 255))
    rgba.paste((255, 255, 255, 0), (0, 0, 50, 37 // 2))  # top half transparent
    grey = Image.new("L", (37, 50), 200)
    palette = Image.new("P", (64, 64), 3)
    split = Image.new("RGB", (64, 32), (255, 0, 0))
    split.paste((0, 255, 0), (32, 0, 64, 32))  # left red, right green
    samples = [
        ("000000", {"png": png_bytes(rgba), "txt": b"a blue half", "json": b'{"url": "http://x", "caption": null}'}),
        ("000001", {"jpg": png_bytes(grey, "JPEG"), "txt": "une image grise \u00e9".encode()}),
        ("000002", {"png": png_bytes(palette), "txt": b"palette", "json": b'{"caption": "from json"}'}),
        ("000003", {"jpg": png_bytes(split, "JPEG"), "txt": b"red and green"}),
    ]
    url = str(write_tar(tmp_path / "img2dataset-00000.tar", samples))
    records = {r["__key__"]: r for r in record_pipeline(url, image_size=32)}
    assert sorted(records) == ["000000", "000001", "000002", "000003"]
    for record in records.values():
        assert record["image"].shape == (3, 32, 32)
        assert 0 <= record["image"].min() and record["image"].max() <= 1
    assert records["000000"]["captions"] == ["a blue half"]
    assert records["000000"]["meta"]["url"] == "http://x" and records["000000"]["qa"] == []
    top, bottom = records["000000"]["image"][:, 2], records["000000"]["image"][:, -3]
    assert top.max() < 0.05 and torch.allclose(bottom[2], torch.ones(32), atol=0.05)  # alpha -> black
    assert torch.allclose(records["000001"]["image"], torch.full((3, 32, 32), 200 / 255), atol=0.03)
    assert records["000001"]["captions"] == ["une image grise \u00e9"]
    assert records["000002"]["captions"] == ["from json", "palette"]
    centre = records["000003"]["image"]  # 64x32 -> centre crop 32x32: red left of the middle, green right
    assert centre[0, 16, 4] > 0.8 and centre[1, 16, 27] > 0.8


def test_precomputed_codes(tmp_path: Path) -> None:
    codes = np.arange(64, dtype=np.int16).reshape(8, 8)
    buffer = io.BytesIO()
    np.save(buffer, codes)
    with_codes = ("k0", {**good("k0")[1], "npy": buffer.getvalue()})
    url = str(write_tar(tmp_path / "codes.tar", [with_codes, good("k1")]))
    records = list(record_pipeline(url, load_images=False))
    assert records[0]["codes"].dtype == torch.long and torch.equal(records[0]["codes"], torch.from_numpy(codes).long())
    assert "image" not in records[0]  # codes present, images not requested
    assert "codes" not in records[1] and records[1]["image"].shape == (3, 32, 32)  # no codes: the image
    both = list(record_pipeline(url))
    assert "image" in both[0] and "codes" in both[0]
    neither = list(record_pipeline(url, load_images=False, load_codes=False))
    assert all("image" not in r and "codes" not in r for r in neither)


def test_pretokenize_and_the_datamodule_encode_alpha_and_non_square_images_alike(tiny_model_dir, tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """Non-square images with transparency (RGBA; palette with a transparent index) get the same codes from
    `mmdlm.pretokenize` as from the DataModule's on-the-fly encoding: both decode with the data path's
    `load_image` (alpha onto black, bicubic resize, centre crop)."""
    from mmdlm.pretokenize import pretokenize
    from mmdlm.training import MDMDataModule

    rgba = Image.new("RGBA", (50, 37), (0, 0, 255, 255))
    rgba.paste((255, 255, 255, 0), (0, 0, 50, 18))  # top transparent, white underneath
    rgba.paste((255, 0, 0, 128), (30, 20, 45, 37))  # half-transparent red
    palette = Image.new("P", (40, 64), 1)
    palette.putpalette([255, 255, 255, 0, 200, 0, 255, 0, 0])
    palette.paste(2, (5, 30, 35, 60))
    palette.info["transparency"] = 0  # index 0 (white) transparent
    palette.paste(0, (0, 0, 40, 20))
    caption = json.dumps({"captions": ["a picture"]}).encode()
    url = str(write_tar(tmp_path / "in" / "alpha.tar", [("rgba", {"png": png_bytes(rgba), "json": caption}),
                                                          ("palette", {"png": png_bytes(palette), "json": caption})]))
    pretokenize(f"{tiny_model_dir}/vq", url, str(tmp_path / "out"))
    with tarfile.open(tmp_path / "out" / "alpha.tar") as tar:
        assert {"rgba.npy", "palette.npy"} <= set(tar.getnames())  # the codes are read, not encoded again
    dm = MDMDataModule(url, text_tokenizer=f"{tiny_model_dir}/text_tokenizer", vq=f"{tiny_model_dir}/vq",
                       image_size=32)
    monkeypatch.setattr(dm.builder, "build", lambda record: (record["__key__"], record["codes"]))

    def codes(shards: str) -> dict[str, torch.Tensor]:  # what `transform` hands the sequence builder
        return dict(dm.dataset(shards, train=False))

    on_the_fly, stored = codes(url), codes(str(tmp_path / "out" / "alpha.tar"))
    assert sorted(on_the_fly) == sorted(stored) == ["palette", "rgba"]
    for key in on_the_fly:
        assert torch.equal(stored[key], on_the_fly[key]), key


def test_resampled_epoch_length(shapes: Path) -> None:
    urls = f"{shapes}/train/*.tar"
    pipeline = record_pipeline(urls, resampled=True, epoch_length=30, shuffle=8, load_images=False, seed=5)
    first = [r["__key__"] for r in pipeline]
    second = [r["__key__"] for r in pipeline]
    assert len(first) == len(second) == 30 and first != second  # a new draw each epoch
    again = [r["__key__"] for r in record_pipeline(urls, resampled=True, epoch_length=30, shuffle=8,
                                                    load_images=False, seed=5)]
    assert again == first  # deterministic by seed
    loader = DataLoader(record_pipeline(urls, resampled=True, epoch_length=31, load_images=False),
                        batch_size=4, num_workers=2, collate_fn=collate_records)
    assert sum(len(b["__key__"]) for b in loader) == 31  # per process, split over the workers


def test_length_buckets_batch_similar_lengths_and_keep_every_sample() -> None:
    lengths = [25, 87, 118, 88, 84, 101, 25, 87, 118, 87, 84, 88, 101, 87]  # a mixed-task stream
    samples = [[i] * n for i, n in enumerate(lengths)]  # each sample: its index, n times
    stage = LengthBuckets(batch_size=3, pool=2, seed=0)
    batches = list(stage(iter(samples)))
    assert sorted(s[0] for b in batches for s in b) == list(range(len(samples)))  # each sample once
    assert [len(b) for b in batches].count(3) == 4  # two full pools of 6, then a partial pool of 2
    for start in (0, 6):  # within a pool, batches are cut from the length-sorted samples
        pool = [b for b in batches if b[0][0] in range(start, start + 6)]
        assert sorted(len(s) for b in pool for s in b) == sorted(lengths[start : start + 6])
        assert max(len(s) for s in pool[0]) <= min(len(s) for s in pool[1]) or \
            max(len(s) for s in pool[1]) <= min(len(s) for s in pool[0])
    assert list(LengthBuckets(3, 2, seed=0)(iter(samples))) == batches  # deterministic by seed


# --- DataModules ------------------------------------------------------------------------------------


def test_shard_datamodule(shapes: Path) -> None:
    dm = ShardDataModule(train_shards=f"{shapes}/train/*.tar", val_shards=f"{shapes}/val/*.tar", batch_size=8,
                         shuffle_buffer=10)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and len(batch["captions"]) == 8
    val = [k for b in dm.val_dataloader() for k in b["__key__"]]
    assert val == tar_keys(shapes / "val")
    assert dm.bad_samples.total == 0 and dm.bad_samples.good >= N_VAL + 8
    assert ShardDataModule(train_shards=f"{shapes}/train/*.tar").val_dataloader() == []


def test_subclass_transform_and_collate(shapes: Path) -> None:
    class Captions(ShardDataModule):
        def transform(self, record: dict) -> str:
            if record["meta"]["objects"][0]["cell"] == 0:
                raise BadSample("transform", "skip scenes with an object at the top left")
            return record["captions"][0]

        def collate(self, samples: list[str]) -> list[str]:
            return samples

    dm = Captions(train_shards=f"{shapes}/val/*.tar", batch_size=4, shuffle_buffer=0)
    captions = [c for batch in dm.train_dataloader() for c in batch]
    skipped = dm.bad_samples.counts["transform"]
    assert skipped > 0 and len(captions) + skipped == N_VAL
    assert not any("at the top left" in c for c in captions)


def test_image_datamodule(shapes: Path, tmp_path: Path) -> None:
    image_only = write_tar(tmp_path / "images.tar", [(f"i{i}", {"png": png_bytes(Image.new("L", (40, 40), 9))})
                                                     for i in range(3)])
    dm = ImageDataModule(train_shards=f"{shapes}/train/*.tar,{image_only}", val_shards=f"{shapes}/val/*.tar",
                         image_size=32, batch_size=16, num_workers=2, epoch_length=40, resampled=True)
    batches = list(dm.train_dataloader())
    assert sum(len(b) for b in batches) == 40
    assert all(b.dtype == torch.float32 and b.shape[1:] == (3, 32, 32) for b in batches)
    val = torch.cat(list(dm.val_dataloader()))
    assert val.shape == (N_VAL, 3, 32, 32) and 0 <= val.min() and val.max() == 1
    assert dm.bad_samples.total == 0  # image-only samples are fine here


# --- digits -----------------------------------------------------------------------------------------


def test_digits_shards_have_the_right_labels(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    stats = write_digits(tmp_path, image_size=32, val_fraction=0.1, seed=0)
    assert stats["train"]["samples"] + stats["val"]["samples"] == 1797 and stats["val"]["samples"] == 180
    digits = load_digits()
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    train = {r["__key__"] for r in record_pipeline(f"{tmp_path}/train/*.tar", load_images=False)}
    val = list(record_pipeline(f"{tmp_path}/val/*.tar"))
    assert len(val) == 180 and not train & {r["__key__"] for r in val}
    for record in val:
        index = int(record["__key__"].split("-")[1])
        label = int(digits.target[index])
        assert record["meta"]["source"] == "digits" and record["meta"]["label"] == label
        assert record["captions"][0] == f"a handwritten digit {words[label]}"
        answers = {qa["type"]: qa["answer"] for qa in record["qa"]}
        assert answers == {"digit": words[label], "parity": "yes" if label % 2 == 0 else "no"}
        pixels = record["image"][:, ::4, ::4] * 255  # nearest 8 -> 32: 4x4 blocks, white ink on black, grey
        expected = torch.from_numpy(np.round(digits.images[index] * 255 / 16)).float()
        assert torch.equal(pixels[0], expected) and torch.equal(pixels[0], pixels[2])


def test_lightning_fit_with_image_datamodule(shapes: Path) -> None:
    import lightning as L

    class AutoEncoder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Conv2d(3, 3, 1)
            self.seen: list[tuple[int, ...]] = []

        def training_step(self, batch: torch.Tensor, _) -> torch.Tensor:
            self.seen.append(tuple(batch.shape))
            self.log("bad_samples", float(self.trainer.datamodule.bad_samples.total))
            return torch.nn.functional.mse_loss(self.net(batch), batch)

        def validation_step(self, batch: torch.Tensor, _) -> None:
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(batch), batch))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    for val_shards in (f"{shapes}/val/*.tar", None):
        model = AutoEncoder()
        dm = ImageDataModule(train_shards=f"{shapes}/train/*.tar", val_shards=val_shards, batch_size=8)
        trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                            val_check_interval=2)
        trainer.fit(model, datamodule=dm)
        assert model.seen == [(8, 3, 32, 32)] * 3
        assert ("val_loss" in trainer.callback_metrics) == (val_shards is not None)
