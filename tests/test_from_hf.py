"""The pretrained-LM recipe end to end, as a user runs it: a transformers Qwen2 folder (tiny, random, written here
with `save_pretrained`) goes through `python train.py fit --config configs/mdm-from-hf.yaml --model.init_from DIR` to
a model folder that `mmdlm evaluate` scores and `mmdlm vqa` answers with; and `--data.text_tokenizer null` takes the
init_from folder's tokenizer."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_hf_causal_lm

from mmdlm.training.cli import cli_main, model_text_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)


@pytest.mark.slow
def test_qwen2_folder_trains_to_a_model_that_evaluate_and_vqa_use(tiny_model_dir, tiny_shards, tmp_path) -> None:
    from mmdlm.hf_import import read_causal_lm
    from mmdlm.pipeline import MMDLMPipeline
    from mmdlm.worlds.shapes import render, sample_scene

    qwen = tiny_hf_causal_lm(tmp_path / "qwen2", "qwen2")
    root = tmp_path / "run"
    fit = run("train.py", "fit", "--config", "configs/mdm-from-hf.yaml", "--model.init_from", str(qwen),
              "--data.train_shards", f"{tiny_shards}/train/*.tar", "--data.val_shards", f"{tiny_shards}/val/*.tar",
              "--data.vq", f"{tiny_model_dir}/vq", "--data.batch_size", "4", "--data.num_workers", "0",
              "--trainer.precision", "32-true", "--trainer.accelerator", "cpu", "--trainer.max_steps", "3",
              "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
              "--trainer.default_root_dir", str(root), "--model.warmup_steps", "1", "--model.samples_at_val", "0")
    assert fit.returncode == 0, fit.stderr[-3000:]
    model = root / "model"
    pipe = MMDLMPipeline.from_pretrained(model, device="cpu")
    config = pipe.model.config
    assert config.block_diffusion and config.shift_logits and not config.causal  # the recipe's adaptation
    fields, hf_state, _ = read_causal_lm(qwen)
    assert config.n_kv_head == fields["n_kv_head"] == 2 and config.attn_bias and config.tie_head  # Qwen2's shape
    assert pipe.vocab.text_size == pipe.tokenizer.vocab_size == 300  # the folder's tokenizer; padded rows dropped
    assert pipe.tokenizer.encode("a red circle") == pipe.tokenizer.encode("a red circle")
    assert not pipe.model.tok_emb.weight[:300].equal(hf_state["model.embed_tokens.weight"][:300])  # it trained

    metrics = tmp_path / "metrics.json"
    scored = run("-m", "mmdlm", "evaluate", "--model", str(model), "--shards", f"{tiny_shards}/val/*.tar",
                 "--limit", "4", "--tasks", "vqa,caption", "--device", "cpu", "--quiet", "--out", str(metrics))
    assert scored.returncode == 0, scored.stderr[-3000:]
    tasks = json.loads(metrics.read_text())
    assert 0.0 <= tasks["vqa"]["accuracy"] <= 1.0 and tasks["vqa"]["n"] > 0 and "per_attribute" in tasks["caption"]

    scene = tmp_path / "scene.png"
    render(sample_scene(random.Random(3), 2, 2), image_size=32).save(scene)
    answered = run("-m", "mmdlm", "vqa", "--model", str(model), "--device", "cpu", "--image", str(scene),
                   "--question", "what color is the circle?")
    assert answered.returncode in (0, 4), answered.stderr  # 4: a 3-step model may put <eos> before any word
    assert answered.returncode == 4 or answered.stdout.strip(), answered


def test_null_text_tokenizer_takes_the_init_from_folders(tiny_model_dir, tiny_shards, tmp_path) -> None:
    assert model_text_tokenizer(tiny_model_dir) == str(Path(tiny_model_dir) / "text_tokenizer")
    assert model_text_tokenizer(str(tmp_path)) == str(tmp_path)  # a transformers folder: its tokenizer.json
    assert model_text_tokenizer(None) is None
    cli = cli_main(["--config", "configs/mdm-shapes.yaml", "--model.init_from", tiny_model_dir,
                    "--data.text_tokenizer", "null", "--data.vq", f"{tiny_model_dir}/vq",
                    "--data.train_shards", f"{tiny_shards}/train/*.tar",
                    "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    assert cli.datamodule.processor.tokenizer_path == str(Path(tiny_model_dir) / "text_tokenizer")
