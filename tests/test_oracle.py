"""The shapes oracle: exact on ground-truth renders at 32 and 64 px, robust to decoder-like noise,
and a scorer that tells right images from wrong ones."""

import random

import numpy as np
import pytest
import torch
from PIL import Image

from mmdlm.worlds.oracle import main, read_scene, score_image, validate
from mmdlm.worlds.shapes import COLORS, SHAPES, SIZES, cell_bounds, make_object, render, sample_scene


@pytest.mark.parametrize("image_size", [32, 64])
def test_validate_on_ground_truth(image_size: int) -> None:
    assert validate(n=200, seed=1, image_size=image_size) >= 0.99


def test_reads_every_colour_shape_size_in_every_cell() -> None:
    for image_size in (32, 64):
        for cell in range(9):
            for color in COLORS:
                objects = [make_object(color, shape, size, cell) for shape in SHAPES for size in SIZES]
                for obj in objects:
                    assert read_scene(render([obj], image_size)) == [obj]


def test_pil_and_tensor_inputs_agree() -> None:
    objects = sample_scene(random.Random(0), 3, 3)
    image = render(objects)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (3, H, W)
    assert read_scene(image) == read_scene(tensor) == objects
    big = render(objects, 64)
    assert read_scene(big) == objects
    with pytest.raises(ValueError):
        read_scene(torch.zeros(32, 32))


def decoder_like(image: Image.Image, rng: np.random.Generator, jitter: int = 40, noise: float = 12.0) -> torch.Tensor:
    """A render with what a VQ decoder gets wrong: per-object colour shifts, pixel noise, soft edges."""
    pixels = np.array(image).astype(np.float32)  # (H, W, 3)
    pixels += rng.uniform(-jitter, jitter, size=3) * (pixels > 0)  # colour shift of the objects
    pixels += rng.normal(0, noise, size=pixels.shape)
    tensor = torch.from_numpy(pixels.clip(0, 255) / 255).permute(2, 0, 1).float()  # (3, H, W)
    soft = torch.nn.functional.avg_pool2d(tensor[None], 3, 1, 1, count_include_pad=False)[0]
    return 0.7 * tensor + 0.3 * soft


@pytest.mark.parametrize("image_size", [32, 64])
def test_robust_to_decoder_errors(image_size: int) -> None:
    rng, scenes = np.random.default_rng(0), random.Random(0)
    right = total = 0
    for _ in range(150):
        objects = sample_scene(scenes, 1, 3)
        score = score_image(objects, decoder_like(render(objects, image_size), rng))
        right += score["object"] * len(objects)
        total += len(objects)
    assert right / total >= 0.97


def test_score_image() -> None:
    truth = [make_object("red", "circle", "large", 0), make_object("blue", "square", "small", 4)]
    score = score_image(truth, render(truth))
    assert score["all_correct"] and score["count_correct"] and score["object"] == 1 and score["extra"] == 0

    wrong_color = [make_object("green", "circle", "large", 0), truth[1]]
    score = score_image(truth, render(wrong_color))
    assert not score["all_correct"] and score["color"] == 0.5 and score["shape"] == 1 and score["cell"] == 1

    wrong_shape_size = [make_object("red", "triangle", "large", 0), make_object("blue", "square", "large", 4)]
    score = score_image(truth, render(wrong_shape_size))
    assert not score["all_correct"] and score["shape"] == 0.5 and score["size"] == 0.5 and score["color"] == 1

    moved = [truth[0], make_object("blue", "square", "small", 5)]
    score = score_image(truth, render(moved))
    assert not score["all_correct"] and score["cell"] == 0.5 and score["extra"] == 1 and score["count_correct"]

    extra = [*truth, make_object("white", "cross", "small", 8)]
    score = score_image(truth, render(extra))
    assert not score["all_correct"] and not score["count_correct"] and score["object"] == 1

    score = score_image(truth, Image.new("RGB", (32, 32)))
    assert not score["all_correct"] and score["cell"] == 0 and score["read"] == []


def test_blobs_and_specks_are_not_shapes() -> None:
    pixels = np.zeros((32, 32, 3), np.uint8)
    x0, y0, x1, y1 = cell_bounds(0, 32)
    rng = np.random.default_rng(0)
    pixels[y0:y1, x0:x1][rng.random((y1 - y0, x1 - x0)) < 0.35] = COLORS["cyan"]  # scattered noise
    x0, y0, _, _ = cell_bounds(8, 32)
    pixels[y0 + 4, x0 + 4] = COLORS["red"]  # one stray pixel: no object
    read = read_scene(Image.fromarray(pixels))
    assert [(o["cell"], o["color"], o["shape"]) for o in read] == [(0, "cyan", "unknown")]


def test_cli(capsys) -> None:
    main(["--validate", "--n", "20", "--image-size", "32"])
    assert "oracle accuracy at 32 px: 1.0000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([])
