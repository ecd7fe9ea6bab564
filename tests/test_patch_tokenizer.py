"""The patch-dictionary tokenizer (vision/patch_tokenizer.py) and the folder loader (vision/load.py):
exact round trips of dictionary patches, nearest-patch encoding, the no-collapse fit, folders, the CLI,
and pre-tokenizing with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_vision import TINY, shapes_images, write_shard
from vision.load import load_image_tokenizer
from vision.patch_tokenizer import PatchTokenizer, fit_dictionary, patchify, unpatchify
from vision.tokenizer import VQTokenizer


@pytest.fixture(scope="module")
def fitted() -> PatchTokenizer:
    images, _ = shapes_images(300, seed=0)
    return PatchTokenizer.fit(images.split(64), codebook_size=1024)


def test_patchify_inverts_and_orders_patches_in_raster_order() -> None:
    x = torch.rand(2, 3, 8, 12)
    p = patchify(x, 4)  # (2, 2, 3, 48)
    assert p.shape == (2, 2, 3, 48)
    assert torch.equal(p[1, 1, 2].reshape(3, 4, 4), x[1, :, 4:8, 8:12])
    assert torch.equal(unpatchify(p, 3, 4), x)


def test_encode_decode_shapes_dtypes_and_exact_round_trip_of_seen_images(fitted: PatchTokenizer) -> None:
    images, _ = shapes_images(40, seed=0)  # among the fitted images: every patch is in the dictionary
    codes = fitted.encode(images)
    assert codes.shape == (40, 8, 8) and codes.dtype == torch.int64
    assert fitted.grid == (8, 8) and fitted.tokens_per_image == 64 and fitted.codebook_size == 1024
    recon = fitted.decode(codes)
    assert recon.shape == images.shape and recon.dtype == torch.float32
    assert torch.allclose(recon, images, atol=1e-6)


def test_unseen_images_decode_to_the_nearest_dictionary_patches(fitted: PatchTokenizer) -> None:
    images, _ = shapes_images(50, seed=99)
    codes = fitted.encode(images)
    patches = patchify(images, 4).reshape(-1, 48)  # (N, 48)
    chosen = fitted.codebook_vectors()[codes.reshape(-1)]  # (N, 48)
    best = torch.cdist(patches, fitted.codebook_vectors()).min(1).values  # (N,)
    assert torch.allclose((patches - chosen).pow(2).sum(1), best.pow(2), atol=1e-4)  # squared: no sqrt(0) noise
    mse = (fitted.decode(codes) - images).pow(2).mean()
    assert 10 * torch.log10(1 / mse) > 25  # 300 fitting scenes already cover most patches of new ones


def test_the_fit_does_not_collapse_onto_the_background() -> None:
    # 90% black patches: k-means on all points would spend its codes near black; counting distinct ones does not
    patches = torch.cat([torch.zeros(900, 4), torch.eye(4).repeat(25, 1)])  # 4 distinct non-black patches
    uniq, counts = patches.unique(dim=0, return_counts=True)
    book = fit_dictionary(uniq, counts, codebook_size=5)
    assert sorted(map(tuple, book.tolist())) == sorted(map(tuple, uniq.tolist()))  # every pattern is a code


def test_kmeans_rounds_move_codes_to_weighted_means() -> None:
    patches = torch.tensor([[0.0], [1.0], [1.2], [5.0]])
    counts = torch.tensor([10, 3, 1, 2])
    # init {0, 1} (the most frequent): 0 wins {0}, 1 wins {1, 1.2, 5} -> (3*1 + 1.2 + 2*5) / 6
    one = fit_dictionary(patches, counts, codebook_size=2, kmeans_iters=1)
    assert torch.allclose(one.flatten(), torch.tensor([0.0, 14.2 / 6]), atol=1e-5)
    # then 1 and 1.2 are nearer 0: (3*1 + 1.2) / 14 = 0.3 and 5, where Lloyd's iterations stop moving
    book = fit_dictionary(patches, counts, codebook_size=2, kmeans_iters=5)
    assert torch.allclose(book.flatten(), torch.tensor([0.3, 5.0]), atol=1e-5)


def test_too_few_distinct_patches_repeat_the_most_frequent_and_encode_picks_the_first() -> None:
    images = torch.zeros(4, 3, 8, 8)
    images[:, 0, :4, :4] = 1.0
    tok = PatchTokenizer.fit([images], codebook_size=8, patch_size=4)
    codes = tok.encode(images)
    assert set(codes.unique().tolist()) == {0, 1}  # black (most frequent) is 0, the red patch 1
    assert torch.equal(tok.decode(codes), images)


def test_save_load_round_trip_is_a_diffusers_folder_with_identical_codes(fitted: PatchTokenizer,
                                                                        tmp_path: Path) -> None:
    fitted.save_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert config["_class_name"] == "PatchTokenizer" and config["codebook_size"] == 1024
    assert (tmp_path / "tok" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_image_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, PatchTokenizer)
    images, _ = shapes_images(20, seed=5)
    assert torch.equal(loaded.encode(images), fitted.encode(images))
    assert torch.equal(loaded.codebook_vectors(), fitted.codebook_vectors())


def test_the_loader_picks_the_class_from_the_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    VQTokenizer.new(**TINY).save_pretrained(tmp_path / "vq")
    assert isinstance(load_image_tokenizer(tmp_path / "vq"), VQTokenizer)
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="unet.*UNet2DModel.*PatchTokenizer"):
        load_image_tokenizer(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_image_tokenizer(tmp_path / "nowhere")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps({"_class_name": "PatchTokenizer"}))
    with pytest.raises(OSError, match="noweights"):
        load_image_tokenizer(tmp_path / "noweights")


def test_wrong_inputs_are_clear_errors(fitted: PatchTokenizer) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        fitted.encode(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="integer codes"):
        fitted.decode(torch.rand(2, 8, 8))
    with pytest.raises(ValueError, match=r"\[0, 1024\)"):
        fitted.decode(torch.full((1, 8, 8), 1024))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        PatchTokenizer(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="no images"):
        PatchTokenizer.fit([], codebook_size=4)


def test_cli_fits_on_shards_and_pretokenize_uses_the_folder(tmp_path: Path, capsys) -> None:
    from mmdlm.data import record_pipeline
    from mmdlm.pretokenize import pretokenize
    from vision.patch_tokenizer import main

    images, _ = shapes_images(30, seed=1)
    images = (images * 255).round() / 255
    (tmp_path / "in").mkdir()
    write_shard(tmp_path / "in" / "a.tar", images, broken=3)
    main(["--shards", str(tmp_path / "in" / "*.tar"), "--out", str(tmp_path / "tok"), "--codebook-size", "64"])
    assert "fitted 64 codes" in capsys.readouterr().out
    tok = load_image_tokenizer(tmp_path / "tok")
    pretokenize(str(tmp_path / "tok"), str(tmp_path / "in" / "*.tar"), str(tmp_path / "out"))
    records = list(record_pipeline(str(tmp_path / "out" / "*.tar"), 32, load_images=False, require_captions=False))
    kept = torch.cat([images[:3], images[4:]])  # the broken sample is skipped
    assert torch.equal(torch.stack([r["codes"] for r in records]), tok.encode(kept))


def test_cli_names_shards_that_match_nothing(tmp_path: Path, capsys) -> None:
    from vision.patch_tokenizer import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--shards", str(tmp_path / "none-*.tar"), "--out", str(tmp_path / "tok")])
    assert exit_info.value.code == 2 and "none-*.tar" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_the_binding_probe_reads_each_codes_palette_colour() -> None:
    from benchmarks.binding_probe import code_colours
    from mmdlm.worlds.shapes import COLORS

    tok = PatchTokenizer(image_size=8, patch_size=4, codebook_size=4)
    patches = torch.zeros(4, 3, 4, 4)
    patches[1, 0] = 1.0  # a red patch
    patches[2, 1, :2] = 1.0  # half green
    patches[3, :2, 1:3, 1:3] = torch.tensor([1.0, 0.5])[:, None, None]  # an orange square in black
    tok.codebook.data.copy_(patches.reshape(4, -1))
    names = list(COLORS)
    assert code_colours(tok).tolist() == [-1, names.index("red"), names.index("green"), names.index("orange")]
