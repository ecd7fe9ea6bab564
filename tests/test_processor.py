"""`MMDLMProcessor` on the tiny model folder: save/load round trip, what the DataModule and the pipeline get from
it, and the one-sentence errors of a folder without its tokenizers."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mmdlm.folder import CONFIG_FILE, WEIGHTS_FILE
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.processor import MMDLMProcessor
from mmdlm.sequence import Layout, vqa_prompt
from mmdlm.training import MDMDataModule
from mmdlm.vocab import Vocab


@pytest.fixture(scope="module")
def processor(tiny_model_dir) -> MMDLMProcessor:
    torch.set_num_threads(1)
    return MMDLMProcessor.from_pretrained(tiny_model_dir)


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # (n, 3, 32, 32)


def same(a: MMDLMProcessor, b: MMDLMProcessor) -> None:
    """Two processors that turn the same inputs into the same ids and back."""
    assert a.vocab == b.vocab and a.layout == b.layout and a.image_grid == b.image_grid
    text = "what color is the large circle?"
    assert a.encode_text(text) == b.encode_text(text) and a.decode_text(a.encode_text(text)) == text
    assert torch.equal(a.vq.codebook_vectors(), b.vq.codebook_vectors())
    assert torch.equal(a.encode_images(images()), b.encode_images(images()))


def test_from_pretrained_reads_the_folder_and_derives_the_vocabulary(processor, tiny_model_dir) -> None:
    config = json.loads((Path(tiny_model_dir) / CONFIG_FILE).read_text())
    assert processor.layout == Layout(**config["layout"])
    assert processor.vocab == Vocab(processor.tokenizer.vocab_size, processor.vq.codebook_size)
    assert processor.vocab.to_dict() == config["vocab"]
    assert processor.sources() == {"text_tokenizer": str(Path(tiny_model_dir, "text_tokenizer").resolve()),
                                   "vq": str(Path(tiny_model_dir, "vq").resolve())}


def test_save_pretrained_round_trip(processor, tmp_path) -> None:
    processor.save_pretrained(tmp_path / "p")
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["text_tokenizer", "vq"]
    for name in ("config.json", "diffusion_pytorch_model.safetensors", "mmdlm_vq.json"):  # copied as it was
        assert (tmp_path / "p" / "vq" / name).read_bytes() == (Path(processor.vq_path) / name).read_bytes()
    same(processor, MMDLMProcessor.from_paths(tmp_path / "p" / "text_tokenizer", tmp_path / "p" / "vq",
                                              processor.layout))

    built = MMDLMProcessor(processor.tokenizer, processor.vq, processor.layout)  # in memory: no paths
    assert built.sources() == {}
    built.save_pretrained(tmp_path / "q")  # the image tokenizer saves itself
    same(processor, MMDLMProcessor.from_paths(tmp_path / "q" / "text_tokenizer", tmp_path / "q" / "vq",
                                              processor.layout))


def test_a_pipeline_round_trip_keeps_the_folder_format(tiny_model_dir, tmp_path) -> None:
    pipe = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    pipe.save_pretrained(tmp_path / "again")
    files = sorted(str(p.relative_to(tmp_path / "again")) for p in (tmp_path / "again").rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(tiny_model_dir)) for p in Path(tiny_model_dir).rglob("*") if p.is_file())
    assert (tmp_path / "again" / CONFIG_FILE).read_text() == (Path(tiny_model_dir) / CONFIG_FILE).read_text()
    same(pipe.processor, MMDLMPipeline.from_pretrained(tmp_path / "again", device="cpu").processor)


def test_the_pipeline_holds_the_processor_and_reads_its_parts_from_it(tiny_model_dir) -> None:
    pipe = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu")
    p = pipe.processor
    assert isinstance(p, MMDLMProcessor)
    assert (pipe.tokenizer, pipe.vq, pipe.vocab, pipe.layout) == (p.tokenizer, p.vq, p.vocab, p.layout)
    assert torch.equal(pipe.encode_images(images()), p.encode_images(images()))
    assert pipe.image_tensor(images(1)).device == pipe.device == p.device
    text = "a large red circle at the top"
    n = len(p.tokenizer.encode(text))
    for encode in (pipe._encode_text, p.encode_text):
        with pytest.raises(ValueError, match=f"prompt is {n} tokens, longer than the model's limit of 2"):
            encode(text, 2, "prompt")
    assert p.encode_text(text, n, "prompt") == p.tokenizer.encode(text)


def test_the_datamodule_builds_one_processor_from_its_paths(processor, tiny_model_dir, tmp_path) -> None:
    layout = Layout(caption_len=20, question_len=12, answer_len=6, text_len=32, qa_per_sample=2)
    dm = MDMDataModule(train_shards=str(tmp_path / "*.tar"), text_tokenizer=f"{tiny_model_dir}/text_tokenizer",
                       vq=f"{tiny_model_dir}/vq", layout=layout)
    p = dm.processor
    assert isinstance(p, MMDLMProcessor) and p.layout == layout and p.vocab == processor.vocab
    assert p.sources() == processor.sources()
    assert p.image_grid == tuple(p.vq.grid) == (8, 8)
    codes = torch.zeros(p.image_grid, dtype=torch.long)  # (h, w)
    longest = vqa_prompt(codes, [[0]] * layout.qa_per_sample, p.vocab, layout)  # the longest template here
    assert p.max_seq_len == len(longest)
    features = p.code_features()  # (K, e + 3*f*f)
    e, f = p.vq.embed_dim, 32 // 8
    assert features.shape == (p.vocab.codebook_size, e + 3 * f * f)
    assert torch.equal(features[:, :e], p.vq.codebook_vectors().float())


def test_checkpoints_record_the_processor(processor) -> None:
    """What `mmdlm.commands.export --ckpt` rebuilds the processor from: absolute tokenizer paths and the layout."""
    from mmdlm.training import LitMDM

    @dataclass
    class Config:  # stands in for the ModelConfig: only the processor's part is checked here
        n_layer: int = 1

    lit = LitMDM(ema_decay=0.0)
    lit.config, lit.vocab = Config(), processor.vocab
    lit._trainer = SimpleNamespace(datamodule=SimpleNamespace(processor=processor))
    checkpoint: dict = {}
    lit.on_save_checkpoint(checkpoint)
    assert checkpoint["mmdlm"] == {"model_config": {"n_layer": 1}, "vocab": processor.vocab.to_dict(),
                                   **processor.sources(), "layout": asdict(processor.layout)}


def test_a_folder_without_its_tokenizers_is_refused_in_one_sentence(tiny_model_dir, tmp_path) -> None:
    for missing in ("text_tokenizer", "vq"):
        folder = tmp_path / f"no-{missing}"
        shutil.copytree(tiny_model_dir, folder)
        shutil.rmtree(folder / missing)
        expected = f"model folder {str(folder)!r} has no {missing}/ (a model folder holds its tokenizers beside "
        for load in (MMDLMProcessor.from_pretrained, lambda f: MMDLMPipeline.from_pretrained(f, device="cpu")):
            with pytest.raises(FileNotFoundError) as err:
                load(folder)
            assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="is not an mmdlm model folder \\(no config.json\\)"):
        MMDLMProcessor.from_pretrained(tmp_path)


def test_a_folder_whose_config_disagrees_with_its_tokenizers_is_refused(tiny_model_dir, tmp_path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns(WEIGHTS_FILE))
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["vocab"]["text_size"] += 1
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="records a vocabulary of 301 text ids and 64 image codes, but the "
                                         "folder's tokenizers have 300 and 64"):
        MMDLMProcessor.from_pretrained(folder)


def test_user_images_are_decoded_as_the_data_path_decodes_them(processor, tmp_path) -> None:
    """A non-square RGBA photo: transparency onto black, bicubic resize and centre crop, as in training."""
    import io

    import numpy as np
    from PIL import Image

    from vision.images import load_image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (30, 50, 4), dtype=np.uint8)
    pixels[:, :10, 3] = 0  # a transparent band
    path = tmp_path / "photo.png"
    Image.fromarray(pixels, "RGBA").save(path)
    size = processor.vq.image_size
    expected = load_image(path.read_bytes(), size)  # (3, S, S): what pretokenize and the DataModule see
    for given in (str(path), Image.open(path)):
        torch.testing.assert_close(processor.image_tensor([given])[0].cpu(), expected)
    buffer = io.BytesIO()
    Image.fromarray(pixels[:, :, :3], "RGB").save(buffer, format="PNG")
    assert not torch.allclose(load_image(buffer.getvalue(), size), expected)  # the alpha band matters here
