"""GRPO: on a tiny model, a few dozen updates raise the mean reward of its own samples; the AR twin
runs the same recipe (ordinary GRPO); bad arguments are one sentence."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from mmdlm.errors import UserError
from mmdlm.training.grpo import LitGRPO, PromptData


def brightness(images: torch.Tensor, records) -> torch.Tensor:
    """A user's image reward (module:function): the mean pixel value of each generated image."""
    return images.mean(dim=(1, 2, 3))


def letter_e(answers: list[str], records) -> torch.Tensor:
    """A user's text reward that a random model's answers already spread over: the share of e's in the answer."""
    return torch.tensor([a.count("e") / max(len(a), 1) for a in answers])


@pytest.fixture(scope="module")
def roomy(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny folder with a caption region that fits the tiny BPE's long spellings of shapes captions."""
    import shutil

    out = tmp_path_factory.mktemp("roomy") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["layout"].update(caption_len=64)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def run(init_from: str, shards: str, steps: int, export_dir=None, task: str = "t2i",
        reward: str = "tests.test_grpo:brightness", likelihood: str = "elbo") -> tuple[LitGRPO, list[float]]:
    L.seed_everything(0)
    sampler = {"steps": 4, "guidance_scale": 0.0} if task == "t2i" else {"temperature": 1.0}
    module = LitGRPO(init_from, task=task, reward=reward, group_size=4, lr=3e-3, beta=0.0, sampler=sampler,
                     export_dir=export_dir, likelihood=likelihood)
    seen: list[float] = []
    reward = module.reward

    def recording(images, records):
        r = reward(images, records)
        seen.append(float(r.mean()))
        return r

    module.reward = recording
    data = PromptData(shards, limit=32, prompts_per_step=4)
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=data)
    return module, seen


@pytest.mark.slow
def test_grpo_raises_the_mean_reward_of_a_tiny_mdm(roomy, tiny_shards, tmp_path) -> None:
    module, seen = run(roomy, f"{tiny_shards}/train/*.tar", 40, export_dir=str(tmp_path / "rl"), task="vqa",
                       reward="tests.test_grpo:letter_e")
    first, last = sum(seen[:10]) / 10, sum(seen[-10:]) / 10
    assert last > first + 0.05, seen  # rewards in [0, 1]
    assert json.loads((tmp_path / "rl" / "config.json").read_text())["model"]["causal"] is False


@pytest.mark.parametrize("likelihood", ["elbo", "trajectory", "full_mask"])
def test_text_to_image_rollouts_are_drawn_decoded_and_rewarded(roomy, tiny_shards, likelihood) -> None:
    before = {k: v.clone() for k, v in LitGRPO(roomy).model.state_dict().items()}
    module, seen = run(roomy, f"{tiny_shards}/train/*.tar", 2, likelihood=likelihood)
    assert len(seen) == 2 and all(0 < r < 1 for r in seen)  # brightness: every group's rewards differ
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())  # it was updated


def test_explore_draws_the_rollouts_the_target_sampler_defines_the_likelihood(roomy, tiny_shards) -> None:
    """`explore` overrides the sampler for the rollouts only: the guidance of the scored distribution stays."""
    module = LitGRPO(roomy, sampler={"steps": 3, "guidance_scale": 2.0}, explore={"guidance_scale": 0.0,
                                                                                  "temperature": 1.5})
    assert (module.config.guidance_scale, module.config.temperature) == (2.0, 1.0)
    assert (module.rollout_config.guidance_scale, module.rollout_config.temperature, module.rollout_config.steps) \
        == (0.0, 1.5, 3)
    drawn = []
    sample = module.scheduler.sample

    def recording(model, batch, config, **kwargs):
        drawn.append(config)
        return sample(model, batch, config, **kwargs)

    module.scheduler.sample = recording
    data = PromptData(f"{tiny_shards}/train/*.tar", limit=4, prompts_per_step=2)
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=data)
    assert drawn == [module.rollout_config]
    # weighed to the target sampler: every committed token's weight is in [0, clip], logged with the update
    module = LitGRPO(roomy, sampler={"steps": 3, "guidance_scale": 2.0}, likelihood="trajectory", importance_clip=2.0,
                     explore={"guidance_scale": 2.0, "guidance_plausibility": 0.0, "temperature": 1.5},
                     reward="tests.test_grpo:brightness", group_size=4)
    logged = {}
    module.log_dict = lambda values, **kwargs: logged.update(
        {k: float(torch.as_tensor(v).detach()) for k, v in values.items()})
    L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=data)
    assert 0 < logged["importance/weight"] <= 2.0 and 0 <= logged["importance/zero"] < 1
    assert torch.isfinite(torch.tensor(logged["loss"]))
    with pytest.raises(UserError, match="explore"):
        LitGRPO(roomy, explore={"heat": 2.0})
    with pytest.raises(UserError, match="explore"):
        LitGRPO(roomy, explore={"temperature": -1.0})


def test_the_ar_twin_runs_the_same_recipe(roomy, tiny_shards, tmp_path) -> None:
    import shutil

    ar = tmp_path / "ar"
    shutil.copytree(roomy, ar)
    config = json.loads((ar / "config.json").read_text())
    config["model"]["causal"] = True
    (ar / "config.json").write_text(json.dumps(config))
    module, seen = run(str(ar), f"{tiny_shards}/train/*.tar", 3)
    assert len(seen) == 3 and module.model.config.causal


def test_bad_arguments_are_one_sentence(tiny_model_dir, tmp_path) -> None:
    with pytest.raises(UserError, match="task"):
        LitGRPO(tiny_model_dir, task="draw")
    with pytest.raises(UserError, match="group_size"):
        LitGRPO(tiny_model_dir, group_size=1)
    with pytest.raises(UserError, match="reward"):
        LitGRPO(tiny_model_dir, reward="no_such_reward")
    with pytest.raises(UserError, match="likelihood"):
        LitGRPO(tiny_model_dir, likelihood="exact")
    with pytest.raises(UserError, match="negative_weight"):
        LitGRPO(tiny_model_dir, negative_weight=-1.0)
    with pytest.raises(UserError, match="importance_clip"):  # needs the trajectory likelihood and an explorer
        LitGRPO(tiny_model_dir, importance_clip=2.0, explore={"temperature": 1.5})
    with pytest.raises(UserError, match="importance_clip"):
        LitGRPO(tiny_model_dir, importance_clip=0.0, likelihood="trajectory", explore={"temperature": 1.5})
    with pytest.raises(UserError, match="init_from"):
        LitGRPO(str(tmp_path / "none"))


def test_the_recipe_runs_through_the_lightning_cli(roomy, tiny_shards, tmp_path) -> None:
    """`python train.py fit --config configs/grpo-shapes.yaml --model.init_from DIR` (one step, the tiny model)."""
    from mmdlm.training.cli import cli_main

    out = tmp_path / "run"
    cli_main(["fit", "--config", "configs/grpo-shapes.yaml", "--model.init_from", roomy,
              "--model.reward", "tests.test_grpo:brightness", "--model.group_size", "2",
              "--model.sampler", '{"steps": 2}', "--model.export_dir", str(out / "model"),
              "--data.shards", f"{tiny_shards}/train/*.tar", "--data.limit", "8", "--data.prompts_per_step", "2",
              "--trainer.max_steps", "1", "--trainer.default_root_dir", str(out),
              "--trainer.enable_progress_bar", "false"])
    assert list((out / "tb").rglob("events.out.tfevents.*"))  # the logger follows the run folder
    assert (out / "model" / "model.safetensors").is_file()
    assert list((out / "checkpoints").glob("*.ckpt"))


def test_rl_curves_reads_the_events_and_scores_the_checkpoints(roomy, tiny_shards, tmp_path) -> None:
    """Reward and KL from a run's TensorBoard events; the held-out score at step 0 and at its checkpoints."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from benchmarks import rl_curves

    out = tmp_path / "run"
    L.seed_everything(0)
    module = LitGRPO(roomy, reward="tests.test_grpo:brightness", group_size=2, lr=3e-3, sampler={"steps": 2})
    L.Trainer(max_steps=2, accelerator="cpu", logger=TensorBoardLogger(str(out), name="tb"), log_every_n_steps=1,
              callbacks=[ModelCheckpoint(str(out / "checkpoints"), every_n_train_steps=1, save_top_k=-1)],
              enable_progress_bar=False, enable_model_summary=False
              ).fit(module, datamodule=PromptData(f"{tiny_shards}/train/*.tar", limit=8, prompts_per_step=2))
    rl_curves.main(["--run", f"tiny={out}", "--out", str(tmp_path / "curves"), "--eval-shards",
                    f"{tiny_shards}/val/*.tar", "--limit", "2", "--every", "1", "--window", "2"])
    curves = json.loads((tmp_path / "curves.json").read_text())["tiny"]
    assert (tmp_path / "curves.png").is_file() and len(curves["reward/mean"]) == 2
    assert [p["step"] for p in curves["held_out"]][:2] == [0, 1]


def test_rollout_diversity_counts_the_groups_that_can_teach(roomy, tiny_shards, capsys) -> None:
    from benchmarks import rollout_diversity

    rollout_diversity.main(["--model", roomy, "--shards", f"{tiny_shards}/train/*.tar", "--prompts", "2", "--group",
                            "3", "--reward", "tests.test_grpo:brightness", "--setting", '{"steps": 2}'])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["groups"] == 2 and line["informative_groups"] == 2  # brightness differs between any two images
    assert sum(line["distinct_images_and_rewards_differ"].values()) == 2


def test_a_block_diffusion_model_is_refused_in_one_sentence(tiny_model_dir, tmp_path) -> None:
    import shutil

    out = tmp_path / "block"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["model"].update(block_diffusion=True, block_size=4, image_block_rows=2, shift_logits=True)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="block-diffusion model"):
        LitGRPO(str(out))
