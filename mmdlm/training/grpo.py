"""`LitGRPO`: group-relative policy optimisation of an mmdlm model from verifiable rewards.

Per step, for each of the batch's prompts: `group_size` completions from the model's own sampler (the task's
default `SamplerConfig`, or `sampler`), a reward for each (`mmdlm.training.rewards`), advantages relative to the group
(reward minus the group's mean, over its std: GRPO, DeepSeekMath), and one policy-gradient update on the
completions' log-likelihood with a KL penalty to the frozen starting model. Only groups whose rewards differ are
scored and updated on (DAPO's dynamic sampling, as a filter): the guided sampler draws the same image for most
prompts (of 8 train prompts x 8 rollouts of the quickstart model, 7 groups had one reward), and a group of equal
rewards has zero advantage everywhere, so its likelihood would cost a backward pass for nothing:

    loss = -mean_i( A_i * r_i ) + beta * mean_i( KL_i ),   r_i = exp((ll_i - sg(ll_i)) / L_i)

`ll_i` is the completion's log-likelihood given its prompt: exact for the AR twin (ordinary GRPO); for a
masked-diffusion model one of `mmdlm.likelihood`'s (`likelihood`): `trajectory`, the log-probability of each token
where and when the sampler committed it (TraceRL / MaskGRPO: the rollout's own choices, one forward per sampler
step), `elbo`, the coupled ELBO estimate (coupled-GRPO; the policy and the reference on the same masks), or
`full_mask`, diffu-GRPO's one-step estimate. When the rollouts are drawn with classifier-free
guidance, the per-token terms are those of the guided distribution, softmax(cond + w (cond - uncond)): trained on
the conditional likelihood alone, the policy improved its unguided samples and lost on its guided ones
(BENCHMARKS.md). Dividing by the completion's length L_i is GSPO's sequence-level
ratio: a 64-token image's log-likelihood would otherwise swing the ratio by e^(tens) for a small update. One update
per rollout batch, so the ratio is 1 in value and PPO's clipping would never act; it is left out. KL_i is the k3
estimate exp(d) - d - 1 with d = (ll_ref - ll) / L_i.

`explore` draws the rollouts from another sampler than the one trained for (hotter, or unguided): the guided
sampler's groups are mostly one image, so they teach nothing. The rollouts are then scored under the target
sampler's distribution all the same: without an importance correction (an advantage-weighted likelihood), or,
with the trajectory likelihood and `importance_clip`, each token weighted by min(p_target / p_explore, clip), so the
update aims at the target sampler's distribution and not the explorer's (whose failures, such as the spurious objects
of unconstrained guidance, the target sampler would not make).

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
from mmdlm.likelihood import (
    ar_log_likelihood,
    elbo,
    full_mask_log_likelihood,
    trajectory_log_likelihood,
    trajectory_token_log_probs,
)
from mmdlm.sampling import scheduler_for
from mmdlm.sampling.config import DEFAULT_SAMPLERS
from mmdlm.sequence import Sample, collate, t2i_prompt, vqa_prompt
from mmdlm.training.rewards import load_reward

TASKS = {"t2i": "text_to_image", "vqa": "answer"}  # RL task -> its DEFAULT_SAMPLERS entry
LIKELIHOODS = ("elbo", "trajectory", "full_mask")  # a masked-diffusion model's sequence log-likelihood (above)


class PromptData(L.LightningDataModule):
    """Prompts for RL: the records of webdataset shards (`mmdlm.eval.records.load_records`: images decoded, captions,
    QA and the scene in `meta`), `prompts_per_step` per batch, reshuffled every epoch. What a record prompts is the
    task's (`LitGRPO.task`): its first caption, or one of its questions."""

    def __init__(self, shards: str, limit: int = 2000, prompts_per_step: int = 4, image_size: int = 32,
                 seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.items: list[dict] | None = None

    def setup(self, stage: str | None = None) -> None:
        from mmdlm.eval.records import load_records

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
        reward: a built-in reward (`mmdlm.training.rewards.REWARDS`) or `module:function`.
        group_size: completions per prompt (G).
        lr: AdamW learning rate.
        beta: weight of the KL penalty to the starting model (0: no penalty, and no reference forward).
        likelihood: a masked-diffusion model's log-likelihood of a rollout, one of `LIKELIHOODS` (module docstring).
            `elbo` peaks early, then falls back; `trajectory`, exact for the sampler's choices
            (tests/test_likelihood.py), keeps its gain, and more of it with `importance_clip`, the other tasks
            unchanged (BENCHMARKS.md; the recipe's choice).
        likelihood_draws: coupled mask pairs per ELBO estimate (`likelihood: elbo`).
        sampler: `SamplerConfig` fields overriding the task's default: the sampler the policy is trained for (its
            guidance defines the likelihood's distribution) and, without `explore`, the one drawing the rollouts.
        explore: `SamplerConfig` fields overriding `sampler` for drawing the rollouts only, e.g.
            `{"guidance_scale": 0.0}`: the guided sampler draws the same image again and again for most prompts, so
            most groups carry no advantage (BENCHMARKS.md); an exploring sampler's rollouts are scored under the
            target sampler's distribution all the same (off-policy, uncorrected: advantage-weighted likelihood).
        negative_weight: the weight of the below-average rollouts' (negative) advantages against the above-average
            ones' (1: GRPO; 0: only the better rollouts are pushed up, as rejection-sampling fine-tuning does;
            W-REINFORCE, Zhu et al. 2025, weighs the two sides apart the same way).
        importance_clip: with `explore` and the `trajectory` likelihood, weigh each token's term by its importance
            ratio p_target / p_explore (the two samplers' probabilities of the drawn token where it was committed),
            truncated at this value (truncated importance sampling): the update then aims at the target sampler's
            distribution, and a token the target sampler could not have drawn (outside its plausibility constraint)
            gets no weight. None: unweighted. The AR twin's exact likelihood is never weighted (it has no trajectory).
        export_dir: where the model folder is written at the end of fit.
    """

    def __init__(self, init_from: str, task: str = "t2i", reward: str = "t2i_all_correct", group_size: int = 8,
                 lr: float = 1e-5, beta: float = 0.02, likelihood: str = "elbo", likelihood_draws: int = 1,
                 sampler: dict[str, Any] | None = None, explore: dict[str, Any] | None = None,
                 negative_weight: float = 1.0, importance_clip: float | None = None, export_dir: str | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        from mmdlm.pipeline import MMDLMPipeline

        if task not in TASKS:
            raise UserError(f"--model.task must be one of {', '.join(TASKS)}, got {task!r}")
        if likelihood not in LIKELIHOODS:
            raise UserError(f"--model.likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
        if not 0 <= negative_weight <= 1:
            raise UserError(f"--model.negative_weight must be in [0, 1], got {negative_weight}")
        if importance_clip is not None and (importance_clip <= 0 or likelihood != "trajectory" or explore is None):
            raise UserError("--model.importance_clip must be > 0 and needs --model.likelihood trajectory and "
                            f"--model.explore (it weighs the explorer's tokens to the target sampler), got "
                            f"{importance_clip} with likelihood {likelihood!r} and explore {explore!r}")
        if group_size < 2:
            raise UserError(f"--model.group_size must be >= 2 (advantages are relative to the group), got {group_size}")
        self.save_hyperparameters()
        try:
            pipe = MMDLMPipeline.from_pretrained(init_from, device="cpu")
        except (OSError, ValueError, KeyError) as err:
            raise UserError(f"cannot load --model.init_from {init_from!r}: {err}") from err
        if pipe.model.config.block_diffusion:  # its likelihoods are per-block ELBOs, which GRPO does not compute
            raise UserError(f"--model.init_from {init_from!r} is a block-diffusion model: GRPO trains a "
                            f"masked-diffusion model or an AR twin (mmdlm quickstart --adapt mdm makes one)")
        self.model, self.processor = pipe.model.train(), pipe.processor
        self.reference = copy.deepcopy(pipe.model).eval().requires_grad_(False)
        self.scheduler = scheduler_for(self.model.config, self.processor.vocab)
        try:
            self.config = replace(DEFAULT_SAMPLERS[TASKS[task]], **(sampler or {}))
            self.rollout_config = replace(self.config, **(explore or {}))  # draws the rollouts
        except (TypeError, ValueError) as err:  # an unknown field, or a value SamplerConfig refuses
            raise UserError(f"--model.sampler / --model.explore: {err}") from err
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

    def log_likelihood(self, model: torch.nn.Module, batch, history: list[torch.Tensor] | None,
                       seed: int) -> torch.Tensor:
        """Float[N]: the completions' log-likelihood (`batch`: the prompts with the completions filled in; `history`:
        the rollouts' canvas after each step), exact for the AR twin, else `likelihood`'s (the ELBO's masks drawn
        from `seed`, the same for the policy and the reference)."""
        vocab, w = self.processor.vocab, self.config.guidance_scale  # the distribution the rollouts were drawn from
        if model.config.causal:
            return ar_log_likelihood(model, batch)
        if self.hparams.likelihood == "trajectory":
            prompts = replace(batch, ids=batch.ids.masked_fill(batch.target, vocab.mask))
            return trajectory_log_likelihood(model, prompts, history, vocab, self.config)
        if self.hparams.likelihood == "full_mask":
            return full_mask_log_likelihood(model, batch, vocab, w)
        g = torch.Generator(device=batch.ids.device).manual_seed(seed)
        return elbo(model, batch, vocab, draws=self.hparams.likelihood_draws, generator=g, guidance=w)

    def policy_log_likelihood(self, batch, history: list[torch.Tensor] | None, seed: int
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ll Float[N], weighted Float[N]): the policy's `log_likelihood` of the completions (for the KL term) and the
        term the policy gradient is taken on: the same, or with `importance_clip` the sum of each committed token's
        log p weighted by its truncated importance ratio (detached)."""
        if self.hparams.importance_clip is None or self.model.config.causal:
            ll = self.log_likelihood(self.model, batch, history, seed)
            return ll, ll
        vocab = self.processor.vocab
        prompts = replace(batch, ids=batch.ids.masked_fill(batch.target, vocab.mask))
        log_p, row, log_ratio = trajectory_token_log_probs(self.model, prompts, history, vocab, self.config,
                                                           self.rollout_config)  # (M,), (M,), (M,)
        weight = log_ratio.exp().clamp(max=self.hparams.importance_clip)  # (M,) 0 where the target could not draw
        self.log_dict({"importance/weight": weight.mean(), "importance/zero": (weight == 0).float().mean()},
                      batch_size=batch.ids.shape[0])
        zeros = torch.zeros(batch.ids.shape[0], device=log_p.device)
        return zeros.index_add(0, row, log_p), zeros.index_add(0, row, weight * log_p)

    def training_step(self, items: list[dict], batch_idx: int) -> torch.Tensor | None:
        samples, records = self.prompts(items)
        self.log("rollout/skipped", float(self.skipped), batch_size=len(items))
        if not samples:
            return None  # every prompt of the batch was too long: no update
        batch = collate(samples, self.processor.vocab).to(self.device)
        g = torch.Generator(device=self.device).manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        self.model.eval()
        record = self.hparams.likelihood == "trajectory" and not self.model.config.causal
        out = self.scheduler.sample(self.model, batch, self.rollout_config, generator=g, history=record)
        self.model.train()
        rewards = self.reward(self.completions(out.ids, samples), records).to(self.device).float()  # (N,)
        grouped = rewards.view(-1, self.hparams.group_size)  # (P, G)
        advantage = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
        # a group whose rollouts all scored alike has no advantage: only the others are scored and updated on
        informative = (grouped.std(1) > 0).repeat_interleave(self.hparams.group_size)  # (N,)
        self.log_dict({"reward/mean": rewards.mean(), "reward/std": rewards.std(), "rollout/nfe": float(out.nfe),
                       "rollout/informative": informative.float().mean()}, prog_bar=True, batch_size=len(items))
        if not bool(informative.any()):
            return None  # nothing to learn from this batch: no update
        keep = informative.nonzero().squeeze(1)  # (K,)
        done = replace(batch, ids=out.ids).select(keep)
        history = None if out.history is None else [h[keep] for h in out.history]
        advantage = advantage[keep]  # (K,)
        advantage = torch.where(advantage < 0, self.hparams.negative_weight * advantage, advantage)  # (K,)
        length = (done.target & ~done.pad).sum(1).clamp_min(1)  # (K,)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g, device=self.device))
        ll, weighted = self.policy_log_likelihood(done, history, seed)  # (K,), (K,)
        ratio = torch.exp((weighted - weighted.detach()) / length)  # (K,) 1 in value, grad(weighted) / L
        kl = torch.zeros_like(ll)
        if self.hparams.beta > 0:
            with torch.no_grad():
                ll_ref = self.log_likelihood(self.reference, done, history, seed)  # (K,)
            d = (ll_ref - ll) / length
            kl = torch.exp(d) - d - 1  # (K,) k3, >= 0
        loss = -(advantage * ratio).mean() + self.hparams.beta * kl.mean()
        self.log_dict({"kl": kl.mean(), "loss": loss.detach()}, prog_bar=True, batch_size=len(items))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.hparams.lr, weight_decay=0.0)

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            from mmdlm.folder import write_model_folder

            write_model_folder(self.model, self.processor, self.hparams.export_dir)
