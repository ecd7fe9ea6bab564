"""The VQ image tokenizer (vision/): shapes and dtypes, agreement with diffusers' own quantizer and decoder,
folders (ours, diffusers', broken), codebook restarts, a tiny training run, and pre-tokenized shards."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from diffusers import VQModel
from PIL import Image

from vision.lightning import VQLitModule, perplexity, psnr, restart_dead_codes
from vision.tokenizer import VQConfig, VQTokenizer

TINY = dict(image_size=16, codebook_size=32, downsample=4, channels=8, max_channels=16, embed_dim=4,
            norm_groups=4)  # a few thousand parameters: every test runs in well under a second


@pytest.fixture
def tiny() -> VQTokenizer:
    torch.manual_seed(0)
    return VQTokenizer.new(**TINY).eval()


def shapes_images(n: int, image_size: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[list[dict]]]:
    """n shapes scenes rendered by mmdlm/worlds/shapes.py: (n, 3, S, S) in [0, 1] and their scene graphs."""
    from mmdlm.worlds.shapes import render, sample_scene

    rng = random.Random(seed)
    scenes = [sample_scene(rng, 1, 2) for _ in range(n)]
    arrays = [np.asarray(render(s, image_size), dtype=np.float32) / 255 for s in scenes]  # (S, S, 3)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), scenes


# ------------------------------------------------------------------------------------------- encode/decode
def test_encode_decode_shapes_and_dtypes(tiny: VQTokenizer) -> None:
    x = torch.rand(3, 3, 16, 16)
    codes = tiny.encode(x)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < tiny.codebook_size
    images = tiny.decode(codes)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert tiny.grid == (4, 4) and tiny.tokens_per_image == 16 and tiny.image_size == 16
    assert tiny.codebook_size == 32
    vectors = tiny.codebook_vectors()
    assert vectors.shape == (32, 4) and not vectors.requires_grad


def test_new_builds_the_requested_architecture() -> None:
    tok = VQTokenizer.new(image_size=32, codebook_size=512, downsample=4, channels=16, max_channels=32)
    assert tok.grid == (8, 8) and tok.tokens_per_image == 64 and tok.codebook_size == 512
    assert tuple(tok.model.config.block_out_channels) == (16, 32, 32)
    assert VQTokenizer.new(image_size=32, downsample=8, channels=8, max_channels=16).grid == (4, 4)
    with pytest.raises(ValueError, match="power of two"):
        VQConfig(downsample=3).block_channels()


def test_codes_are_diffusers_quantizer_indices(tiny: VQTokenizer) -> None:
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        latents = tiny.model.encode(x * 2 - 1).latents  # diffusers' own path, images in [-1, 1]
        _, _, (_, _, indices) = tiny.model.quantize(latents)
    assert torch.equal(tiny.encode(x), indices.reshape(2, 4, 4))


def test_decode_equals_diffusers_decode_of_codebook_vectors(tiny: VQTokenizer) -> None:
    codes = torch.randint(0, 32, (2, 4, 4))
    vectors = tiny.model.quantize.embedding.weight[codes].permute(0, 3, 1, 2)  # (B, e, h, w) by hand
    with torch.no_grad():
        expected = tiny.model.decode(vectors, force_not_quantize=True).sample
    torch.testing.assert_close(tiny.decode(codes), ((expected + 1) / 2).clamp(0, 1))


def test_decode_of_a_lookup_from_codebook_model_matches_diffusers(tmp_path: Path) -> None:
    """aMUSEd-style folders set `lookup_from_codebook`: diffusers' decode then takes ids and a shape."""
    torch.manual_seed(0)
    kwargs = VQConfig(**TINY).vqmodel_kwargs() | {"lookup_from_codebook": True}
    VQModel(**kwargs).save_pretrained(tmp_path / "amused")
    tok = VQTokenizer.from_pretrained(tmp_path / "amused")
    codes = torch.randint(0, 32, (2, 4, 4))
    with torch.no_grad():
        expected = tok.model.decode(codes.flatten(), force_not_quantize=True, shape=(2, 4, 4, 4)).sample
    torch.testing.assert_close(tok.decode(codes), ((expected + 1) / 2).clamp(0, 1))


def test_wrong_inputs_are_clear_errors(tiny: VQTokenizer) -> None:
    with pytest.raises(ValueError, match="16x16"):
        tiny.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.encode(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        tiny.decode(torch.full((1, 4, 4), 32))
    with pytest.raises(ValueError, match="integer codes"):
        tiny.decode(torch.zeros(1, 4, 4))


# ------------------------------------------------------------------------------------------------ folders
def test_save_load_round_trip_gives_identical_codes(tiny: VQTokenizer, tmp_path: Path) -> None:
    tiny.save_pretrained(tmp_path / "vq")
    assert (tmp_path / "vq" / "config.json").is_file()
    assert (tmp_path / "vq" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = VQTokenizer.from_pretrained(tmp_path / "vq")
    x = torch.rand(4, 3, 16, 16)
    assert torch.equal(loaded.encode(x), tiny.encode(x))
    assert torch.equal(loaded.decode(tiny.encode(x)), tiny.decode(tiny.encode(x)))
    assert torch.equal(loaded.codebook_vectors(), tiny.codebook_vectors())
    assert (loaded.image_size, loaded.grid, loaded.codebook_size) == (16, (4, 4), 32)


def test_a_folder_saved_by_diffusers_itself_loads(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = VQModel(**VQConfig(**TINY).vqmodel_kwargs())
    model.save_pretrained(tmp_path / "plain")  # no mmdlm_vq.json: image size from the config's sample_size
    tok = VQTokenizer.from_pretrained(tmp_path / "plain")
    assert tok.image_size == 16 and tok.grid == (4, 4)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        _, _, (_, _, indices) = model.quantize(model.encode(x * 2 - 1).latents)
    assert torch.equal(tok.encode(x), indices.reshape(2, 4, 4))
    assert VQTokenizer.from_pretrained(tmp_path / "plain", image_size=32).grid == (8, 8)  # override
    model.save_pretrained(tmp_path / "pipeline" / "vqvae")  # a pipeline folder (aMUSEd layout)
    assert torch.equal(VQTokenizer.from_pretrained(tmp_path / "pipeline").encode(x), tok.encode(x))


def test_missing_or_foreign_folders_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        VQTokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*config.json"):
        VQTokenizer.from_pretrained(tmp_path / "empty")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="unet.*UNet2DModel.*not a diffusers VQModel"):
        VQTokenizer.from_pretrained(tmp_path / "unet")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="garbage"):
        VQTokenizer.from_pretrained(tmp_path / "garbage")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "VQModel"}))
    with pytest.raises(OSError, match="noweights"):
        VQTokenizer.from_pretrained(tmp_path / "noweights")


# ----------------------------------------------------------------------------------------- codebook restart
def test_restart_revives_dead_codes_where_the_codebook_is_worst() -> None:
    g = torch.Generator().manual_seed(0)
    near = torch.randn(500, 4, generator=g) * 0.1  # a cluster the live codes cover
    far = torch.randn(500, 4, generator=g) * 0.1 + 5  # a cluster no code covers
    data = torch.cat([near, far])  # (1000, 4)
    codebook = torch.cat([near[:8].clone(), torch.full((8, 4), -100.0)])  # 8 live codes, 8 far-off dead ones
    before = torch.cdist(data, codebook).argmin(1).unique().numel()
    dead = torch.tensor([False] * 8 + [True] * 8)
    assert restart_dead_codes(codebook, dead, data, g) == 8
    after = torch.cdist(data, codebook).argmin(1)
    assert before == 8 and after.unique().numel() == 16  # every revived code is used now
    assert bool((after[500:] >= 8).all())  # and they cover the cluster that had no code
    assert int(((codebook[8:] - 5).abs().amax(1) < 1).sum()) >= 1  # k-means++: the uncovered cluster first
    assert torch.equal(codebook[:8], near[:8])  # live codes untouched


def test_restart_with_no_live_code_initialises_from_data() -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.randn(200, 3, generator=g)
    codebook = torch.zeros(16, 3)
    assert restart_dead_codes(codebook, torch.ones(16, dtype=torch.bool), data, g) == 16
    assert (codebook[:, None] - data[None]).abs().sum(-1).min(1).values.max() == 0  # every code is a data point
    assert torch.unique(codebook, dim=0).shape[0] == 16  # and no two are the same


def test_first_training_step_initialises_the_whole_codebook_from_latents() -> None:
    """Step 0 is a restart of every code: a collapsed codebook comes back to life."""
    torch.manual_seed(0)
    module = VQLitModule(vq=VQConfig(**TINY), restart_every=10)
    weight = module.tokenizer.model.quantize.embedding.weight
    with torch.no_grad():
        weight.zero_()  # collapsed: one vector for every code
    x, _ = shapes_images(16, image_size=16)
    assert module.tokenizer.encode(x).unique().numel() == 1
    module._maybe_restart(module.tokenizer.latents(x).detach())
    assert module.tokenizer.encode(x).unique().numel() >= 16


def test_metrics() -> None:
    x = torch.rand(2, 3, 8, 8)
    assert torch.allclose(psnr(x, (x + 0.1).clamp(max=2)), torch.full((2,), 20.0), atol=1e-3)  # MSE 0.01
    assert perplexity(torch.tensor([5, 5, 0, 0])) == pytest.approx(2.0)


# ----------------------------------------------------------------------------------------------- training
def fit_tiny(images: torch.Tensor, steps: int, tmp_path: Path, **overrides) -> VQLitModule:
    import lightning as L
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    module = VQLitModule(vq=VQConfig(**{**TINY, "image_size": images.shape[-1], **overrides}), lr=3e-3,
                         warmup_steps=5, restart_every=20, export_dir=str(tmp_path / "export"))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(images, batch_size=len(images), shuffle=True))
    return module


def test_a_few_seconds_of_training_reconstructs_shapes_far_better_than_untrained(tmp_path: Path) -> None:
    x, _ = shapes_images(8, image_size=16)
    torch.manual_seed(0)
    untrained = psnr(VQTokenizer.new(**TINY).decode(VQTokenizer.new(**TINY).encode(x)), x).mean()
    module = fit_tiny(x, steps=150, tmp_path=tmp_path)
    exported = VQTokenizer.from_pretrained(tmp_path / "export")  # on_fit_end wrote the folder
    trained = psnr(exported.decode(exported.encode(x)), x).mean()
    assert torch.equal(exported.encode(x), module.tokenizer.encode(x))
    assert trained > 18.0, f"trained tiny tokenizer reconstructs at {trained:.1f} dB"  # measured 19.9-21
    assert trained > untrained + 8, f"trained {trained:.1f} dB vs untrained {untrained:.1f} dB"


# ------------------------------------------------------------------------------------------- pretokenize
def write_shard(path: Path, images: torch.Tensor, broken: int | None = None, start: int = 0) -> list[str]:
    """A shapes-like shard: png + json per sample; sample `broken` gets bytes that are no image."""
    keys = []
    with wds.TarWriter(str(path)) as sink:
        for i, image in enumerate(images):
            buf = io.BytesIO()
            Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, "PNG")
            png = b"not a png" if i == broken else buf.getvalue()
            keys.append(f"sample-{start + i:04d}")
            sink.write({"__key__": keys[-1], "png": png, "json": json.dumps({"i": i}).encode()})
    return keys


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_pretokenize_writes_the_codes_of_encode_beside_the_original_members(tiny: VQTokenizer,
                                                                            tmp_path: Path) -> None:
    from mmdlm.commands.pretokenize import main

    tiny.save_pretrained(tmp_path / "vq")
    x = torch.rand(7, 3, 16, 16)
    x = (x * 255).round() / 255  # exactly representable in a png
    (tmp_path / "in" / "train").mkdir(parents=True)
    keys_a = write_shard(tmp_path / "in" / "train" / "a.tar", x[:4], broken=1)
    keys_b = write_shard(tmp_path / "in" / "train" / "b.tar", x[4:], start=4)
    main(["--vq", str(tmp_path / "vq"), "--shards", str(tmp_path / "in" / "train" / "*.tar"),
          "--out", str(tmp_path / "out"), "--batch-size", "2"])
    expected = tiny.encode(x).numpy()  # (7, 4, 4)
    original = {**read_tar(tmp_path / "in" / "train" / "a.tar"), **read_tar(tmp_path / "in" / "train" / "b.tar")}
    written = {**read_tar(tmp_path / "out" / "a.tar"), **read_tar(tmp_path / "out" / "b.tar")}
    assert sorted(written) == sorted(k for k in keys_a + keys_b if k != keys_a[1])  # the broken one skipped
    for i, key in enumerate(keys_a + keys_b):
        if key == keys_a[1]:
            continue
        sample = written[key]
        codes = np.load(io.BytesIO(sample["npy"]))
        assert codes.dtype == np.int16 and codes.shape == (4, 4)
        np.testing.assert_array_equal(codes, expected[i])
        assert sample["png"] == original[key]["png"] and sample["json"] == original[key]["json"]
    done = json.loads((tmp_path / "out" / "DONE").read_text())
    assert done["written"] == 6 and done["skipped"] == 1 and done["shards"] == 2


def test_pretokenized_codes_read_back_through_the_data_reader(tiny: VQTokenizer, tmp_path: Path) -> None:
    from mmdlm.data import record_pipeline
    from mmdlm.pretokenize import pretokenize

    tiny.save_pretrained(tmp_path / "vq")
    x = (torch.rand(3, 3, 16, 16) * 255).round() / 255
    for split in ("train", "val"):
        (tmp_path / "in" / split).mkdir(parents=True)
        write_shard(tmp_path / "in" / split / "s.tar", x)
    pretokenize(str(tmp_path / "vq"), str(tmp_path / "in" / "*" / "*.tar"), str(tmp_path / "out"))
    assert (tmp_path / "out" / "train" / "s.tar").is_file() and (tmp_path / "out" / "val" / "s.tar").is_file()
    records = list(record_pipeline(str(tmp_path / "out" / "val" / "*.tar"), 16, load_images=False,
                                   require_captions=False))
    assert torch.equal(torch.stack([r["codes"] for r in records]), tiny.encode(x))


def test_pretokenize_names_a_pattern_that_matches_nothing(tiny: VQTokenizer, tmp_path: Path) -> None:
    from mmdlm.pretokenize import pretokenize

    tiny.save_pretrained(tmp_path / "vq")
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        pretokenize(str(tmp_path / "vq"), str(tmp_path / "nothing-here" / "*.tar"), str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------------- CLI
@pytest.mark.slow
def test_train_cli_fits_and_exports_with_the_shipped_config(tmp_path: Path) -> None:
    """`python train.py fit --config configs/vq-shapes.yaml` (a few steps of a tiny model) exports a folder."""
    from mmdlm.training.cli import cli_main

    x, _ = shapes_images(24)
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        write_shard(tmp_path / split / "s.tar", x)
    cli_main(["fit", "--config", "configs/vq-shapes.yaml",
              "--data.train_shards", str(tmp_path / "train" / "*.tar"),
              "--data.val_shards", str(tmp_path / "val" / "*.tar"), "--data.batch_size", "8",
              "--model.vq.channels", "8", "--model.vq.max_channels", "16", "--model.vq.norm_groups", "4",
              "--model.export_dir", str(tmp_path / "vq"), "--trainer.max_steps", "4",
              "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path)])
    tok = VQTokenizer.from_pretrained(tmp_path / "vq")
    assert tok.grid == (8, 8) and tok.encode(x[:2]).shape == (2, 8, 8)
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))  # TensorBoard got the validation
