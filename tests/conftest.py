"""Shared fixtures: a real (tiny) mmdlm model folder built from real components in seconds."""

from __future__ import annotations

import random

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def shapes_texts(n: int = 300, seed: int = 0) -> list[str]:
    """Captions, questions and answers of `n` random shapes scenes (a BPE training corpus)."""
    from mmdlm.worlds.shapes import caption, make_questions, sample_scene

    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        objects = sample_scene(rng, 1, 2)
        texts.append(caption(objects))
        for qa in make_questions(objects, rng):
            texts += [qa["question"], qa["answer"]]
    return texts


# scope "package": tests/ is no Python package, so pytest builds each of these once for the whole run
@pytest.fixture(scope="package")
def tiny_model_dir(tmp_path_factory) -> str:
    """A self-contained model folder: BPE trained on shapes text, an untrained tiny VQ, a random MDM."""
    from mmdlm.folder import write_model_folder
    from mmdlm.model import ModelConfig, Transformer
    from mmdlm.processor import MMDLMProcessor
    from mmdlm.text_tokenizer import BPETokenizer
    from vision.tokenizer import VQTokenizer

    root = tmp_path_factory.mktemp("tiny_model")
    tok = BPETokenizer.train(shapes_texts(), vocab_size=300)
    tok.save(root / "tok")
    torch.manual_seed(0)
    vq = VQTokenizer.new(image_size=32, codebook_size=64, channels=16, max_channels=32, norm_groups=4)
    vq.save_pretrained(root / "vq")
    processor = MMDLMProcessor.from_paths(root / "tok", root / "vq")  # the default Layout
    vocab = processor.vocab
    cfg = ModelConfig(vocab_size=vocab.size, n_layer=2, n_head=2, n_embd=32, max_seq_len=256,
                      image_grid=vq.grid, codebook_size=vq.codebook_size, image_offset=vocab.image_offset,
                      codebook_dim=vq.embed_dim, tie_head=True)  # tied: the weights the tests were written on
    model = Transformer(cfg)
    model.set_codebook(vq.codebook_vectors().detach())
    return str(write_model_folder(model, processor, root / "model"))


@pytest.fixture(scope="package")
def tiny_shards(tmp_path_factory) -> str:
    """A few small shapes shards (train 96 / val 24 scenes) with png + json; no pre-computed codes."""
    from mmdlm.worlds.shapes import ShapesConfig, write_shapes

    root = tmp_path_factory.mktemp("shapes")
    write_shapes(root, ShapesConfig(train=96, val=24, seed=1, shard_size=32), progress=False)
    return str(root)
