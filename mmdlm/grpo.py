"""`LitGRPO`: group-relative policy optimisation of an mmdlm model from verifiable rewards (issue 19, first cut).

Per step, for each of the batch's prompts: `group_size` completions from the model's own sampler (the task's
default `SamplerConfig`, or `sampler`), a reward for each (`mmdlm.rewards`), advantages relative to the group
(reward minus the group's mean, over its std: GRPO, DeepSeekMath), and one policy-gradient update on the
completions' log-likelihood with a KL penalty to the frozen starting model:

    loss = -mean_i( A_i * r_i ) + beta * mean_i( KL_i ),   r_i = exp((ll_i - sg(ll_i)) / L_i)

`ll_i` is the completion's log-likelihood given its prompt: exact for the AR twin (ordinary GRPO), the coupled ELBO
estimate for a masked-diffusion model (`mmdlm.likelihood`, coupled-GRPO; `full_mask`: diffu-GRPO's one-step
estimate), the policy and the reference scored on the same masks. When the rollouts are drawn with classifier-free
guidance, the per-token terms are those of the guided distribution, softmax(cond + w (cond - uncond)): trained on
the conditional likelihood alone, the policy improved its unguided samples (all-correct +5.25 points) and lost 6.5
points of guided ones (BENCHMARKS.md, issue 19). Dividing by the completion's length L_i is GSPO's sequence-level
ratio: a 64-token image's log-likelihood would otherwise swing the ratio by e^(tens) for a small update. One update
per rollout batch, so the ratio is 1 in value and PPO's clipping would never act; it is left out. KL_i is the k3
estimate exp(d) - d - 1 with d = (ll_ref - ll) / L_i.

The model is trained as it samples: the rollouts run in eval mode under `torch.inference_mode`, the update in
train mode. At the end of fit the model is exported as a model folder (`export_dir`).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from mmdlm.errors import UserError
from mmdlm.likelihood import ar_log_likelihood, elbo, full_mask_log_likelihood
from mmdlm.rewards import load_reward
from mmdlm.sampling import scheduler_for
from mmdlm.sampling.config import DEFAULT_SAMPLERS
from mmdlm.sequence import Sample, collate, t2i_prompt, vqa_prompt

TASKS = {"t2i": "text_to_image", "vqa": "answer"}  # RL task -> its DEFAULT_SAMPLERS entry


class PromptData(L.LightningDataModule):
    """Prompts for RL: the records of webdataset shards (`mmdlm.evaluate.load_records`: images decoded, captions,
    QA and the scene in `meta`), `prompts_per_step` per batch, reshuffled every epoch. What a record prompts is the
    task's (`LitGRPO.task`): its first caption, or one of its questions."""

    def __init__(self, shards: str, limit: int = 2000, prompts_per_step: int = 4, image_size: int = 32,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.items: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        from mmdlm.evaluate import load_records

        if self.items is None:
            self.items = load_records(self.hparams.shards, self.hparams.image_size, self.hparams.limit)
        if not self.items:
            raise UserError(f"no records in {self.hparams.shards!r}")

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.items, batch_size=self.hparams.prompts_per_step, shuffle=True, generator=g,
                          collate_fn=list, drop_last=True)


class LitGRPO(L.LightningModule):
    """GRPO on a model folder's model (masked diffusion or the AR twin): see the module docstring.

    Args:
        init_from: the model folder to start from (and to keep as the KL reference).
        task: "t2i" (prompts: the records' first caption) or "vqa" (the record's image and question).
        reward: a built-in reward (`mmdlm.rewards.REWARDS`) or `module:function`.
        group_size: completions per prompt (G).
        lr: AdamW learning rate.
        beta: weight of the KL penalty to the starting model.
        likelihood_draws: coupled mask pairs per ELBO estimate (masked diffusion).
        full_mask: masked diffusion: score the completion with all of it masked (diffu-GRPO's one-step estimate)
            instead of the coupled ELBO.
        sampler: `SamplerConfig` fields overriding the task's default for the rollouts.
        export_dir: where the model folder is written at the end of fit.
    """

    def __init__(self, init_from: str, task: str = "t2i", reward: str = "t2i_all_correct", group_size: int = 8,
                 lr: float = 1e-5, beta: float = 0.02, likelihood_draws: int = 1, full_mask: bool = False,
                 sampler: dict[str, Any] | None = None, export_dir: str | None = None, seed: int = 0) -> None:
        super().__init__()
        from mmdlm.pipeline import MMDLMPipeline

        if task not in TASKS:
            raise UserError(f"--model.task must be one of {', '.join(TASKS)}, got {task!r}")
        if group_size < 2:
            raise UserError(f"--model.group_size must be >= 2 (advantages are relative to the group), got {group_size}")
        self.save_hyperparameters()
        try:
            pipe = MMDLMPipeline.from_pretrained(init_from, device="cpu")
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"cannot load --model.init_from {init_from!r}: {err}") from err
        self.model, self.processor = pipe.model.train(), pipe.processor
        self.reference = copy.deepcopy(pipe.model).eval().requires_grad_(False)
        self.scheduler = scheduler_for(self.model.config, self.processor.vocab)
        self.config = replace(DEFAULT_SAMPLERS[TASKS[task]], **(sampler or {}))
        self.skipped = 0  # prompts too long for the model's regions
        try:
            self.reward = load_reward(reward)
        except ValueError as err:
            raise UserError(str(err)) from err

    # ---- rollouts ----------------------------------------------------------------------------------------
    def prompts(self, items: list[dict]) -> tuple[list[Sample], list[dict]]:
        """Each item's prompt, `group_size` times, and the record each completion is rewarded against. A prompt
        longer than the model's region (or a VQA record without questions) is skipped, and counted
        (`rollout/skipped`)."""
        vocab, layout, p = self.processor.vocab, self.processor.layout, self.processor
        samples, records = [], []
        for item in items:
            try:
                if self.hparams.task == "t2i":
                    ids = p.encode_text(item["captions"][0], layout.caption_len, "prompt")
                    sample = t2i_prompt(ids, vocab, layout, p.vq.tokens_per_image)
                else:  # one of the record's questions, drawn by the step
                    if not item.get("qa"):
                        raise ValueError("a record without questions")
                    item = {**item, "qa_asked": item["qa"][(self.global_step + len(samples)) % len(item["qa"])]}
                    question = p.encode_text(item["qa_asked"]["question"], layout.question_len, "question")
                    sample = vqa_prompt(p.encode_images(item["image"][None]).cpu()[0], question, vocab, layout)
            except ValueError:
                self.skipped += 1
                continue
            samples += [sample] * self.hparams.group_size
            records += [item] * self.hparams.group_size
        return samples, records

    def completions(self, ids: torch.Tensor, samples: list[Sample]) -> Any:
        """The rollouts as the reward reads them: images Float[N, 3, H, W], or the answers' texts."""
        from mmdlm.pipeline import image_codes

        vocab, p = self.processor.vocab, self.processor
        if self.hparams.task == "t2i":
            return p.decode_images(image_codes(ids, samples, vocab, p.vq.grid).cpu()).cpu()
        return [p.decode_text(row[: len(s)][s.target.to(ids.device)].cpu()) for row, s in zip(ids, samples)]

    def log_likelihood(self, model: torch.nn.Module, batch, seed: int) -> torch.Tensor:
        """Float[N]: the completions' log-likelihood (AR) or its coupled ELBO estimate (masked diffusion), on masks
        drawn from `seed` (the same for the policy and the reference)."""
        if model.config.causal:
            return ar_log_likelihood(model, batch)
        w = self.config.guidance_scale  # the distribution the rollouts were drawn from
        if self.hparams.full_mask:
            return full_mask_log_likelihood(model, batch, self.processor.vocab, w)
        g = torch.Generator(device=batch.ids.device).manual_seed(seed)
        return elbo(model, batch, self.processor.vocab, draws=self.hparams.likelihood_draws, generator=g, guidance=w)

    def training_step(self, items: list[dict], batch_idx: int) -> torch.Tensor | None:
        samples, records = self.prompts(items)
        self.log("rollout/skipped", float(self.skipped), batch_size=len(items))
        if not samples:
            return None  # every prompt of the batch was too long: no update
        batch = collate(samples, self.processor.vocab).to(self.device)
        g = torch.Generator(device=self.device).manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        self.model.eval()
        out = self.scheduler.sample(self.model, batch, self.config, generator=g)
        self.model.train()
        rewards = self.reward(self.completions(out.ids, samples), records).to(self.device).float()  # (N,)
        grouped = rewards.view(-1, self.hparams.group_size)  # (P, G)
        advantage = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()

        done = replace(batch, ids=out.ids)
        length = (batch.target & ~batch.pad).sum(1).clamp_min(1)  # (N,)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=self.device))
        ll = self.log_likelihood(self.model, done, seed)  # (N,)
        with torch.no_grad():
            ll_ref = self.log_likelihood(self.reference, done, seed)  # (N,)
        ratio = torch.exp((ll - ll.detach()) / length)  # (N,) 1 in value, grad(ll) / L
        d = (ll_ref - ll) / length
        kl = torch.exp(d) - d - 1  # (N,) k3, >= 0
        loss = -(advantage * ratio).mean() + self.hparams.beta * kl.mean()
        self.log_dict({"reward/mean": rewards.mean(), "reward/std": rewards.std(), "kl": kl.mean(),
                       "rollout/nfe": float(out.nfe), "loss": loss.detach()}, prog_bar=True, batch_size=len(items))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=0.0)

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            from mmdlm.export import write_model_folder

            write_model_folder(self.model, self.processor, self.hparams.export_dir)
