"""Shared fixtures: a real (tiny) mmdlm model folder built from real components in seconds."""

from __future__ import annotations

import random

import pytest
import torch
from lightning.pytorch.callbacks import Callback

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


class Crash(Callback):
    """Kill a training run (an exception) when it reaches a step: the resume tests' crash."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


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


# the three transformers causal-LM families mmdlm imports (`mmdlm.hf_import`), each with what sets it apart:
# Llama untied with llama3 RoPE scaling and another base; Qwen2 with q/k/v biases, tied, its vocab padded past the
# tokenizer (as Qwen's are); Qwen3 with q/k norms and a head dim apart from hidden / heads. All use GQA.
HF_FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False, rope_theta=500000.0, rms_norm_eps=1e-5, extra_rows=0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64})),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e6, extra_rows=12)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=32, extra_rows=0)),
}


def tiny_hf_causal_lm(path, family: str, tokenizer=None, shards: str | None = None, seed: int = 0):
    """Save a tiny random transformers causal LM of `family` ("llama", "qwen2", "qwen3"; see HF_FAMILIES) to the
    folder `path` with `save_pretrained` (safetensors; `shards`, e.g. "40KB", splits it), beside a tokenizer.json:
    `tokenizer` (a `BPETokenizer`), or one trained here on shapes texts (300 ids). Hidden 64, 2 layers, 4 query and
    2 key/value heads, weights N(0, 0.1) (sharp attention), norm weights and biases randomised too, so a mapping
    that misplaces any of them shows. Returns the folder (a Path)."""
    from pathlib import Path

    import transformers

    from mmdlm.text_tokenizer import BPETokenizer

    path = Path(path)
    tokenizer = tokenizer or BPETokenizer.train(shapes_texts(), vocab_size=300)
    config_class, model_class, extra = HF_FAMILIES[family]
    extra = dict(extra)
    vocab_size = tokenizer.vocab_size + extra.pop("extra_rows")
    config = getattr(transformers, config_class)(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path, **({"max_shard_size": shards} if shards else {}))
    tokenizer.tok.save(str(path / "tokenizer.json"))
    return path
