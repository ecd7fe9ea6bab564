"""The quickstart's plan: which commands it runs for each image tokenizer, and its argument errors.
(The whole quickstart is timed in BENCHMARKS.md; its stages are tested end to end in their own files.)"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mmdlm.commands.quickstart import main
from mmdlm.quickstart import steps


def plan(tmp_path: Path, **overrides) -> list:
    args = dict(out=str(tmp_path / "qs"), world="shapes", data=str(tmp_path / "shapes"), train=100, val=10, seed=0,
                text_vocab=300, tokenizer="patch", codebook_size=None, vq_steps=5, ar_steps=0, mdm_steps=7,
                ar_rows=0.5, ar_args="", mdm_args="", eval_limit=3, adapt="mdm")
    return steps(argparse.Namespace(**{**args, **overrides}))


def test_the_default_plan_fits_the_patch_tokenizer_and_feeds_its_folder_to_every_later_stage(tmp_path: Path) -> None:
    plan_ = plan(tmp_path)
    names = [s.name for s in plan_]
    assert names == ["make the shapes shards", "train the text BPE", "fit the patch image tokenizer",
                     "pre-tokenize the train shards", "pre-tokenize the val shards",
                     "train the masked-diffusion model", "evaluate"]
    fit = plan_[2].command
    assert fit[1:3] == ["-m", "vision.patch_tokenizer"] and fit[fit.index("--codebook-size") + 1] == "1024"
    vq = str(tmp_path / "qs" / "vq")
    assert plan_[3].command[plan_[3].command.index("--vq") + 1] == vq
    mdm = plan_[5].command
    assert mdm[mdm.index("--data.vq") + 1] == vq and mdm[mdm.index("--trainer.max_steps") + 1] == "7"
    assert "--ckpt_path" not in mdm  # nothing to resume yet


def test_the_warm_start_plan_trains_the_ar_twin_and_adapts_its_folder(tmp_path: Path) -> None:
    plan_ = plan(tmp_path, ar_steps=11, ar_args="--model.lr 0.003")
    assert [s.name for s in plan_][-3:] == ["train the AR warm start", "adapt it to masked diffusion", "evaluate"]
    ar, mdm = plan_[5].command, plan_[6].command
    configs = [ar[i + 1] for i, arg in enumerate(ar) if arg == "--config"]
    assert configs == ["configs/mdm-shapes.yaml", "configs/ar.yaml"] and ar[ar.index("--trainer.max_steps") + 1] == "11"
    assert ar[-2:] == ["--model.lr", "0.003"] and plan_[5].done_when == tmp_path / "qs" / "ar" / "config.json"
    assert ar[ar.index("--model.min_lr_ratio") + 1] == "1.0"  # the warm start's rate holds; the adaptation anneals
    assert mdm[mdm.index("--config") + 1] == "configs/mdm-shapes.yaml"
    assert mdm[mdm.index("--model.init_from") + 1] == str(tmp_path / "qs" / "ar")
    assert mdm[mdm.index("--trainer.max_steps") + 1] == "7" and "--ckpt_path" not in mdm
    assert mdm[mdm.index("--model.ar_rows") + 1] == "0.5"


def test_adapt_block_adds_the_block_overlay_and_the_seed_reaches_every_stage(tmp_path: Path) -> None:
    plan_ = plan(tmp_path, ar_steps=11, adapt="block", seed=3)
    assert [s.name for s in plan_][-2] == "adapt it to block diffusion"
    ar, block = plan_[5].command, plan_[6].command
    assert [block[i + 1] for i, arg in enumerate(block) if arg == "--config"] == ["configs/mdm-shapes.yaml",
                                                                                  "configs/block.yaml"]
    for command in (plan_[0].command, ar, block):
        assert command[command.index("--seed") + 1 if "--seed" in command else command.index("--model.seed") + 1] == "3"
    assert block[block.index("--seed_everything") + 1] == "3"


def test_the_vq_plan_trains_the_vqvae_and_extra_mdm_arguments_are_passed_on(tmp_path: Path) -> None:
    (tmp_path / "qs" / "mdm-run").mkdir(parents=True)  # a killed run: the MDM resumes from last.ckpt
    plan_ = plan(tmp_path, tokenizer="vq", codebook_size=256, mdm_args="--trainer.accelerator gpu")
    vq = plan_[2].command
    assert vq[2:4] == ["fit", "--config"] and vq[vq.index("--model.vq.codebook_size") + 1] == "256"
    mdm = plan_[5].command
    assert mdm[-4:] == ["--trainer.accelerator", "gpu", "--ckpt_path", "last"]


def test_the_digits_world_writes_its_own_shards_and_a_small_exact_codebook(tmp_path: Path) -> None:
    plan_ = plan(tmp_path, world="digits", data=None)
    data = plan_[0].command
    assert plan_[0].name == "make the digits shards" and data[1:3] == ["-m", "mmdlm.worlds.digits"]
    assert data[data.index("--out") + 1] == "data/shards/digits" and "--train" not in data
    fit = plan_[2].command
    assert fit[fit.index("--codebook-size") + 1] == "32"
    codes = plan_[3].command
    assert codes[codes.index("--out") + 1] == "data/shards/digits-codes/train"
    assert plan(tmp_path, world="digits", codebook_size=64)[2].command[-1] == "64"  # an explicit size wins


def test_a_bad_argument_exits_with_a_sentence(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--tokenizer", "jpeg"])
    assert exit_info.value.code == 2 and "jpeg" in capsys.readouterr().err


def test_an_unknown_world_or_a_codebook_of_one_exits_with_a_sentence(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--world", "mnist"])
    assert exit_info.value.code == 2 and "mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--codebook-size", "1"])
    assert exit_info.value.code == 2 and "--codebook-size must be at least 2" in capsys.readouterr().err
