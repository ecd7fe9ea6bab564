"""The Lightning module of the masked-diffusion model and its autoregressive twin (thin: logic lives elsewhere).

- `LitMDM`: AdamW with warmup + cosine, EMA weights swapped in for validation and export, per-task loss,
  ELBO NLL and tokens/s logged to TensorBoard, a few samples shown at each validation, LoRA fine-tuning
  (`lora_rank`, `mmdlm.lora`), and an export of a self-contained model folder (`MMDLMPipeline.from_pretrained`;
  LoRA adapters merged in) at the end of fit.

    python train.py fit --config configs/mdm-shapes.yaml
"""

from __future__ import annotations

import io
import os
import shutil
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info

from mmdlm.blocks import model_blocks
from mmdlm.diffusion import ImageSchedule, LossOutput, Weighting, ar_loss, cond_dropout, masked_diffusion_loss
from mmdlm.errors import UserError
from mmdlm.lora import DEFAULT_TARGETS, add_lora, lora_report, merged_copy
from mmdlm.model import ModelConfig, Transformer
from mmdlm.processor import MMDLMProcessor
from mmdlm.sequence import Batch, Task
from mmdlm.text_tokenizer import TextTokenizer
from mmdlm.training.samples import decode_targets, fill_targets, image_grid
from mmdlm.vocab import Vocab
from vision.schedule import warmup_cosine

# the ModelConfig fields that LitMDM's hyper-parameters held one by one before `config` (`migrate_hparams`)
ARCHITECTURE = ("n_layer", "n_head", "n_embd", "causal", "qk_norm", "tie_head", "head_codebook", "mask_positions",
                "shift_logits", "prefix_attention", "dropout")


def _text_vocabulary(tokenizer: TextTokenizer) -> Any:
    """What a text tokenizer's ids mean: a HF tokenizer's token -> id table, else its class (CLIP's is fixed)."""
    inner = getattr(tokenizer, "tok", None)
    if hasattr(inner, "get_vocab"):
        return inner.get_vocab(with_added_tokens=True)
    return type(tokenizer).__name__


def incompatibility(pipe: Any, data: MMDLMProcessor) -> str | None:
    """Why a model folder's weights (an `MMDLMPipeline`) cannot be trained on sequences of the data's processor;
    None if they can.

    Token ids must mean the same on both sides: the same vocabulary sizes, the same text tokens and the same
    image codes (codebook vectors); and the data's longest sequence must fit the model's positions.
    """
    ours, theirs = data.vocab, pipe.vocab
    if (ours.text_size, ours.codebook_size) != (theirs.text_size, theirs.codebook_size):
        return (f"its vocabulary has {theirs.text_size} text ids and {theirs.codebook_size} image codes, the data's "
                f"tokenizers have {ours.text_size} and {ours.codebook_size}")
    if type(pipe.tokenizer) is not type(data.tokenizer) or _text_vocabulary(pipe.tokenizer) != _text_vocabulary(
            data.tokenizer):
        return "its text tokenizer maps tokens to different ids than the data's --data.text_tokenizer"
    if tuple(pipe.vq.grid) != tuple(data.vq.grid):
        return f"its images are {tuple(pipe.vq.grid)} codes, the data's --data.vq gives {tuple(data.vq.grid)}"
    with torch.no_grad():
        a, b = pipe.vq.codebook_vectors().float().cpu(), data.vq.codebook_vectors().float().cpu()
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
        return "its image codebook differs from the data's --data.vq, so image ids would mean other pictures"
    if data.max_seq_len > pipe.model.config.max_seq_len:
        return (f"the data's longest sequence is {data.max_seq_len} tokens, the model's limit is "
                f"{pipe.model.config.max_seq_len} (shorten --data.layout)")
    return None


class EMA:
    """Exponential moving average of a module's floating-point parameters (swapped in for eval/export).

    With `trainable_only` it shadows only the parameters that require grad (LoRA's adapters and the modules
    trained beside them): frozen weights equal their average.

    Kept over Lightning's `EMAWeightAveraging`: that callback's average starts after the first step (ours at
    the initial weights), and it ignores the `checkpoint["ema"]` of our checkpoints on resume (BENCHMARKS.md,
    `benchmarks/library_equivalence.py`)."""

    def __init__(self, module: torch.nn.Module, decay: float, trainable_only: bool = False) -> None:
        self.decay = decay
        state = module.state_dict()
        keys = [n for n, p in module.named_parameters() if p.requires_grad] if trainable_only else list(state)
        self.shadow = {k: state[k].detach().clone() for k in keys if state[k].dtype.is_floating_point}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, v in module.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def swap(self, module: torch.nn.Module) -> None:
        """Exchange the module's weights with the EMA ones (call twice to restore)."""
        state = module.state_dict()
        for k, v in self.shadow.items():
            tmp = state[k].detach().clone()
            state[k].copy_(v)
            v.copy_(tmp)


class LitMDM(LightningModule):
    """The masked-diffusion transformer (or, with `config.causal`, its autoregressive twin).

    Args:
        config: the architecture (`ModelConfig`: layers, width, heads, causal, heads and attention options).
            Its run-time fields (vocab size, sequence length, image grid, codebook) are filled from the data
            module's processor in `configure_model`; values given for them are replaced. With `init_from`, the
            folder's architecture is used instead (see there).
        codebook_embeddings: add a projection of the VQ codebook vector to each image token's embedding (fills
            `config.codebook_dim` from the data's codebook).
        lr: peak AdamW learning rate.
        min_lr_ratio: final learning rate as a fraction of `lr` (cosine decay).
        weight_decay: AdamW weight decay on matrices (not on norms, biases and embeddings).
        warmup_steps: linear warmup steps.
        p_uncond: probability of dropping the caption for classifier-free guidance.
        p_uncond_text: probability of dropping only the condition's text (an edit's instruction; its source image
            kept), for an edit's separate image guidance (`SamplerConfig.image_guidance_scale`).
        image_schedule: `elbo` (1/t-weighted CE, MDLM) or `maskgit` (cosine ratio, unweighted CE) for images.
        weighting: training loss `elbo` (1/t-weighted, the bound) or `masked_mean` (mean CE of masked tokens:
            lower variance); the logged NLL is the ELBO either way.
        task_balanced: average the per-task losses, so small target regions (VQA answers) weigh as much
            as large ones (images). The AR twin's loss too (`ar_loss(task_balanced=)`); `ar_rows`' AR half
            keeps the token mean.
        modality_balanced: with `task_balanced`, each task's share is split evenly between its image and its
            text target tokens (the document task holds edits, 64 image tokens, and "what changed?" answers,
            a 10-token region, whose share a token mean would set by their mix).
        paired_masks: train each sequence with two complementary masks (LaViDa, DiffuCoder), so every
            target token is supervised once per pair; the forward runs on 2x the batch (halve batch_size
            for equal compute). Validation uses single masks.
        task_t: per-task interval of the training mask ratio t, e.g. `{vqa: [0.5, 1.0]}`: understanding is
            decoded from a fully masked answer, so its training can favour high t. Unlisted tasks: U(0, 1).
            Validation always uses U(0, 1), so `val/nll` stays the ELBO.
        corrupt: correction training: the share of the clean target tokens replaced by a random token of their
            modality and scored (`masked_diffusion_loss(corrupt=)`), so the model learns to spot and fix a wrong
            committed token; training only (validation's NLL stays the ELBO). 0 = off.
        ar_rows: share of each batch trained with the AR objective (causal attention, same weights) beside
            the masked-diffusion rows: one model on both objectives. Needs `config.shift_logits`; sampling stays
            masked diffusion.
        ema_decay: EMA of the weights for validation and export; 0 disables it.
        export_dir: write a self-contained model folder here at the end of fit (the CLI's default:
            `<trainer.default_root_dir>/model`; "" writes none).
        init_from: start from the weights of a model folder (`mmdlm.folder`, `MMDLMPipeline.from_pretrained`):
            fine-tuning. Its architecture replaces `config`'s, except `dropout` and `prefix_attention` (turned on
            if either asks); a causal folder with `config.causal` false is adapted to masked diffusion
            (`shift_logits`, as Dream / DiffuLLaMA), and with `config.block_diffusion` to block diffusion with
            this run's block sizes (SDAR, Fast-dLLM v2). The optimizer, schedule and step count start fresh; the
            data's tokenizers must be the folder's (checked, `UserError` if not). A transformers causal-LM folder
            (Llama, Qwen2, Qwen3; `mmdlm.hf_import`) works too, as an AR folder: its weights exactly, the image
            rows and embeddings new, this run's `codebook_embeddings`; the data's text tokenizer must be its
            tokenizer.json (`--data.text_tokenizer DIR`).
        max_seq_len: the model's longest sequence, when the data's is longer than the layout's templates
            (interleaved documents: an edit is ~150 tokens); the larger of the two is built, and a model loaded
            with `init_from` grows to it (RoPE positions extend; not with learned `mask_positions`).
        samples_at_val: how many val sequences to decode and log as text at each validation.
        seed: seeds the masking noise, per step, so a resumed run repeats an uninterrupted one.
        compile: `torch.compile` the transformer's blocks for the training forward (`compile_for_training`;
            sampling and validation stay eager); parameter names and checkpoints are unchanged. Needs a C++
            compiler (g++).
        activation_checkpointing: recompute each block's activations in the backward pass instead of keeping them
            (`Transformer.activation_checkpointing`): less memory for a large backbone, about a third more compute.
        lora_rank: LoRA fine-tuning (`mmdlm.lora`, peft; Hu et al. 2021) when above 0: the starting weights
            (usually `init_from`'s) stay frozen and rank-r adapters on `lora_targets` train, with `lora_train`'s
            modules; the EMA averages only what trains; the exported model folder holds the adapters merged into
            plain weights. 0 = off (every weight trains). `configs/lora.yaml`.
        lora_alpha: the adapters' scale: each adapted layer adds (alpha / rank) B A x to its output.
        lora_targets: the layers to adapt, as module-name suffixes of the blocks' Linear layers (`attn.qkv`,
            `attn.proj`, `mlp.fc`, `mlp.proj`; `blocks.0.mlp.fc` names one layer).
        lora_dropout: dropout on the adapters' input (training only).
        lora_train: modules trained fully beside the adapters (module-name suffixes), e.g. `norm`; from a
            transformers LM (`mmdlm.hf_import`), whose image rows and image embeddings start untrained:
            `[tok_emb, lm_head, modality_emb, row_emb, col_emb, code_proj]` (`lm_head` only for an untied head).
    """

    def __init__(
        self,
        config: ModelConfig | None = None,
        codebook_embeddings: bool = True,
        lr: float = 2e-3,
        min_lr_ratio: float = 0.1,
        weight_decay: float = 0.05,
        warmup_steps: int = 100,
        p_uncond: float = 0.1,
        p_uncond_text: float = 0.0,
        image_schedule: str = "elbo",
        weighting: str = "elbo",
        task_balanced: bool = False,
        modality_balanced: bool = False,
        paired_masks: bool = False,
        task_t: dict[str, list[float]] | None = None,
        corrupt: float = 0.0,
        ar_rows: float = 0.0,
        ema_decay: float = 0.995,
        export_dir: str | None = None,
        init_from: str | None = None,
        max_seq_len: int | None = None,
        samples_at_val: int = 4,
        seed: int = 0,
        compile: bool = False,
        activation_checkpointing: bool = False,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        lora_targets: tuple[str, ...] = DEFAULT_TARGETS,
        lora_dropout: float = 0.0,
        lora_train: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if isinstance(config, dict):  # from a checkpoint's hyper-parameters
            config = ModelConfig(**config)
        self.architecture = config or ModelConfig()
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = asdict(self.architecture)  # plain values: checkpoints load with weights_only
        self.model: Transformer | None = None
        self.ema: EMA | None = None
        self._tokens_seen = 0
        self._t_last: float | None = None

    @classmethod
    def migrate_hparams(cls, hparams: dict[str, Any]) -> dict[str, Any]:
        """The hyper-parameters of a checkpoint in today's form: architecture fields given one by one beside
        the training options (the form before `config`) are gathered into `config`, and the class path the
        LightningCLI recorded names this module (`mmdlm.lightning.LitMDM` before the training package)."""
        hparams = dict(hparams)
        if hparams.get("_class_path") == "mmdlm.lightning.LitMDM":
            hparams["_class_path"] = f"{cls.__module__}.{cls.__qualname__}"
        flat = {name: hparams.pop(name) for name in ARCHITECTURE if name in hparams}
        if flat:
            hparams["config"] = {**asdict(ModelConfig()), **hparams.get("config", {}), **flat}
        return hparams

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> LitMDM:  # noqa: D102
        checkpoint = checkpoint_path
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(checkpoint_path, map_location=kwargs.get("map_location", "cpu"),
                                    weights_only=True)
        checkpoint = {**checkpoint, "hyper_parameters": cls.migrate_hparams(checkpoint.get("hyper_parameters", {}))}
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        buffer.seek(0)
        return super().load_from_checkpoint(buffer, *args, **kwargs)

    # ---- building from the data's run-time values --------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None or self._trainer is None:  # load_from_checkpoint: on_load_checkpoint builds it
            return
        processor = self.trainer.datamodule.processor  # an MMDLMProcessor (train_speed: a stand-in of sizes)
        hp = self.hparams
        if hp.init_from:
            self.init_from_folder(hp.init_from, processor)
            return
        vocab: Vocab = processor.vocab
        codebook = processor.code_features() if hp.codebook_embeddings else None
        config = replace(  # the run-time fields, from the data
            self.architecture, vocab_size=vocab.size, max_seq_len=max(processor.max_seq_len, hp.max_seq_len or 0),
            mask_id=vocab.mask, image_tokens=0, image_grid=processor.image_grid, codebook_size=vocab.codebook_size,
            image_offset=vocab.image_offset, codebook_dim=0 if codebook is None else codebook.shape[1])
        self.build(config, vocab, codebook)

    def build(self, config: ModelConfig, vocab: Vocab, codebook: torch.Tensor | None = None,
              state: dict[str, torch.Tensor] | None = None) -> None:
        """Build the transformer for `config` and `vocab`: its codebook, or a full `state` dict (weights to start
        from), then the LoRA adapters (`lora_rank`), compilation, the objectives and the EMA (which starts at the
        built weights). With LoRA the model's state dict has peft's keys, so a checkpoint of a LoRA run loads into
        a module built here."""
        self.config, self.vocab = config, vocab
        if self.hparams.lora_rank < 0:
            raise UserError(f"--model.lora_rank must be 0 (no LoRA) or a positive rank, got {self.hparams.lora_rank}")
        if self.hparams.ar_rows > 0 and (config.causal or not config.shift_logits):
            raise UserError("--model.ar_rows trains a masked-diffusion model on the AR objective too: it needs "
                            "--model.config.causal false and --model.config.shift_logits true (one head for both "
                            "objectives)")
        self.model = Transformer(config)
        self.model.activation_checkpointing = self.hparams.activation_checkpointing
        if codebook is not None:
            self.model.set_codebook(codebook)
        if state is not None:
            self.model.load_state_dict(state)
        if self.hparams.lora_rank > 0:  # after the starting weights: adapters start at zero on top of them
            hp = self.hparams
            add_lora(self.model, hp.lora_rank, hp.lora_alpha, hp.lora_targets, hp.lora_dropout, hp.lora_train)
        if self.hparams.compile:
            if not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "clang++") if c):
                raise UserError("--model.compile true needs a C++ compiler (g++ or clang++, or $CXX) on the PATH; "
                                "install one or pass --model.compile false")
            self.model.compile_for_training()
        hp = self.hparams
        balance = {"task_balanced": hp.task_balanced, "modality_balanced": hp.modality_balanced}
        self.objective = (partial(ar_loss, **balance) if config.causal else partial(
            masked_diffusion_loss, vocab=vocab, image_schedule=ImageSchedule(hp.image_schedule),
            weighting=Weighting(hp.weighting), **balance))
        t_ranges = {Task[name.upper()]: tuple(r) for name, r in (hp.task_t or {}).items()}
        if balance["modality_balanced"] and not hp.task_balanced:
            raise UserError("--model.modality_balanced true splits each task's share of a task-balanced loss; "
                            "it needs --model.task_balanced true")
        if not 0.0 <= hp.corrupt < 1.0:
            raise UserError(f"--model.corrupt must be in [0, 1), got {hp.corrupt}")
        self.train_objective = (self.objective if config.causal else partial(
            self.objective, paired=hp.paired_masks, t_ranges=t_ranges, corrupt=hp.corrupt))
        if self.hparams.ema_decay > 0:
            self.ema = EMA(self.model, self.hparams.ema_decay, trainable_only=hp.lora_rank > 0)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.model(batch.ids, pad=batch.pad, image_index=batch.image_index, prefix=batch.prefix)

    # ---- training ----------------------------------------------------------------------------------
    def _generator(self, salt: int) -> torch.Generator:
        g = torch.Generator(device=self.device)
        g.manual_seed(self.hparams.seed * 1_000_003 + self.global_step * 7919 + salt)
        return g

    def _loss(self, batch: Batch, generator: torch.Generator, train: bool = False) -> LossOutput:
        objective = self.train_objective if train else self.objective
        if self.config.causal:
            return objective(self.model, batch)
        # a block-diffusion model's blocks from each row's template (`mmdlm.blocks`); None for any other
        return objective(self.model, batch, generator=generator, block=model_blocks(self.config, batch))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        g = self._generator(salt=0)
        if self.hparams.p_uncond > 0 or self.hparams.p_uncond_text > 0:
            batch = cond_dropout(batch, self.hparams.p_uncond, generator=g, p_uncond_text=self.hparams.p_uncond_text)
        k = round(self.hparams.ar_rows * len(batch))  # rows for the AR objective
        out = self._loss(batch.select(slice(k, None)) if k else batch, g, train=True)
        bs = len(batch)
        if k:
            ar = ar_loss(self.model, batch.select(slice(0, k)), force_causal=True)  # token mean (BENCHMARKS.md)
            self.log("train/loss_ar", ar.loss, batch_size=k)
            out = replace(out, loss=out.loss + ar.loss)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("train/nll", out.nll, batch_size=bs)
        for task, value in out.per_task.items():
            self.log(f"train/loss_{Task(task).name.lower()}", value, batch_size=bs)
        self._log_throughput(batch)
        return out.loss

    def _log_throughput(self, batch: Batch) -> None:
        self._tokens_seen += int((~batch.pad).sum())
        now = time.perf_counter()
        if self._t_last is not None and self.global_step % 20 == 0 and now > self._t_last:
            self.log("train/tokens_per_s", self._tokens_seen / (now - self._t_last), prog_bar=True)
            self._tokens_seen, self._t_last = 0, now
        elif self._t_last is None:
            self._tokens_seen, self._t_last = 0, now

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:  # here, not in on_train_batch_end: checkpoint callbacks run before that hook
            self.ema.update(self.model)

    # ---- validation (EMA weights) ------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        if self.ema is not None:
            self.ema.swap(self.model)
        self._val_shown = False

    def on_validation_epoch_end(self) -> None:
        if self.ema is not None:
            self.ema.swap(self.model)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(batch_idx)  # fixed noise: comparable across vals
        out = self._loss(batch, g)
        bs = len(batch)
        self.log("val/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("val/nll", out.nll, batch_size=bs)
        for task, value in out.per_task.items():
            self.log(f"val/loss_{Task(task).name.lower()}", value, batch_size=bs)
        if not self._val_shown and self.hparams.samples_at_val > 0:
            self._val_shown = True
            self._log_samples(batch)

    def _log_samples(self, batch: Batch) -> None:
        """Decode the targets of a few val rows (greedy, 8 steps) and log them next to the truth: texts
        (captions, answers) as `val/samples`, generated images (text-to-image, joint) as the grid
        `val/images`, truth above prediction, as a diffusion trainer's validation images."""
        n = self.hparams.samples_at_val
        sub = batch.select(slice(0, n))
        pred = fill_targets(self.model, sub, self.vocab, steps=8)
        processor = self.trainer.datamodule.processor
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            lines = decode_targets(sub, pred, self.vocab, processor.tokenizer)
            experiment.add_text("val/samples", "\n\n".join(lines), self.global_step)
        if hasattr(experiment, "add_image"):
            grid = image_grid(sub, pred, self.vocab, processor.vq)
            if grid is not None:
                experiment.add_image("val/images", grid, self.global_step)

    # ---- optimisation ------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        trained = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]  # all but LoRA's frozen base
        decay = [p for n, p in trained if p.dim() >= 2 and "emb" not in n]
        no_decay = [p for n, p in trained if not (p.dim() >= 2 and "emb" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr, betas=(0.9, 0.95), fused=False,
        )
        total = max(self.trainer.max_steps, hp.warmup_steps + 1)

        def schedule(step: int) -> float:  # a plain function: LambdaLR keeps it out of the checkpoint
            return warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self) -> None:
        if self.hparams.lora_rank > 0:  # what trains, once, on the console
            rank_zero_info(lora_report(self.model))

    # ---- checkpoints and export --------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mmdlm"] = {"model_config": asdict(self.config), "vocab": self.vocab.to_dict()}
        processor = getattr(getattr(self.trainer, "datamodule", None), "processor", None)
        if isinstance(processor, MMDLMProcessor):  # what `mmdlm export --ckpt` rebuilds it from (absolute paths)
            checkpoint["mmdlm"].update(processor.sources(), layout=asdict(processor.layout))
        if self.ema is not None:
            checkpoint["ema"] = self.ema.shadow

    def init_from_folder(self, folder: str | Path, data: MMDLMProcessor) -> None:
        """Build the model from a model folder's config and weights (fine-tuning): the folder's architecture,
        this run's dropout, EMA restarted from the loaded weights. The data's tokenizers must be the folder's.
        A transformers causal-LM folder (Llama, Qwen2, Qwen3: `mmdlm.hf_import`) is an AR model folder whose
        image rows and image embeddings start as built (`_causal_lm_start`)."""
        from mmdlm.hf_import import is_transformers_folder
        from mmdlm.pipeline import MMDLMPipeline

        if is_transformers_folder(folder):
            (config, state), vocab = self._causal_lm_start(folder, data), data.vocab
        else:
            try:
                pipe = MMDLMPipeline.from_pretrained(folder, device="cpu")
            except (OSError, ValueError) as err:  # no such folder, not a model folder, damaged weights
                raise UserError(f"--model.init_from {str(folder)!r} cannot be loaded: {err}") from err
            problem = incompatibility(pipe, data)
            if problem:
                raise UserError(f"--model.init_from {str(folder)!r} does not fit this data: {problem} (train on "
                                f"the folder's own tokenizers: --data.text_tokenizer "
                                f"{Path(folder) / 'text_tokenizer'} --data.vq {Path(folder) / 'vq'})")
            prefix_attention = pipe.model.config.prefix_attention or self.architecture.prefix_attention
            longest = max(pipe.model.config.max_seq_len, self.hparams.max_seq_len or 0)
            if longest > pipe.model.config.max_seq_len and pipe.model.config.mask_positions:
                raise UserError(f"--model.max_seq_len {longest} exceeds the --model.init_from folder's "
                                f"{pipe.model.config.max_seq_len}, whose learned mask positions cannot grow")
            config = replace(pipe.model.config, dropout=self.architecture.dropout,
                             prefix_attention=prefix_attention, max_seq_len=longest)  # RoPE extends to any length
            vocab, state = pipe.vocab, pipe.model.state_dict()  # the folder's codebook is in its weights
        if config.causal and not self.architecture.causal:  # adapt an AR checkpoint to masked diffusion (Dream)
            config = replace(config, causal=False, shift_logits=True)
        if self.architecture.block_diffusion:  # adapt it to block diffusion: this run's blocks
            arch = self.architecture
            config = replace(config, block_diffusion=True, block_size=arch.block_size,
                             image_block_rows=arch.image_block_rows)
        self.build(config, vocab, state=state)
        self.hparams["config"] = asdict(config)  # what was built, logged

    def _causal_lm_start(self, folder: str | Path, data: MMDLMProcessor) -> tuple[ModelConfig, dict]:
        """(config, state dict) of a transformers causal-LM folder on this data: its architecture, causal, with the
        data's run-time fields, this run's dropout and prefix attention; its weights mapped exactly
        (`mmdlm.hf_import.transformer_state`), the rest as built (the data's codebook set)."""
        from mmdlm.hf_import import read_causal_lm, transformer_state
        from mmdlm.text_tokenizer import BPETokenizer

        where = f"--model.init_from {str(folder)!r}"
        try:
            fields, weights, tokenizer = read_causal_lm(folder)
        except UserError as err:
            raise UserError(f"{where} cannot be loaded: {err}") from err
        if tokenizer is None:
            raise UserError(f"{where} has no tokenizer.json, so what its token ids mean is unknown (save the "
                            "model's tokenizer into the folder and pass it as --data.text_tokenizer)")
        try:
            theirs = _text_vocabulary(BPETokenizer.from_file(tokenizer))
        except ValueError as err:  # a tokenizer.json the tokenizers library cannot read
            raise UserError(f"{where} cannot be loaded: {err}") from err
        if theirs != _text_vocabulary(data.tokenizer):
            raise UserError(f"{where} does not fit this data: the data's text tokenizer maps tokens to other ids "
                            f"than the folder's tokenizer.json (pass --data.text_tokenizer {folder})")
        hp, vocab = self.hparams, data.vocab
        codebook = data.code_features() if hp.codebook_embeddings else None
        config = ModelConfig(**fields | dict(dropout=self.architecture.dropout,
                                             prefix_attention=self.architecture.prefix_attention),
                             vocab_size=vocab.size, max_seq_len=max(data.max_seq_len, hp.max_seq_len or 0),
                             mask_id=vocab.mask, image_grid=data.image_grid, codebook_size=vocab.codebook_size,
                             image_offset=vocab.image_offset, codebook_dim=0 if codebook is None else codebook.shape[1])
        try:
            return config, transformer_state(weights, config, vocab.text_size, codebook)
        except UserError as err:
            raise UserError(f"{where} cannot be loaded: {err}") from err

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.model is None:  # loading outside of fit: rebuild from the stored config
            meta = checkpoint["mmdlm"]
            self.build(ModelConfig(**meta["model_config"]), Vocab(**meta["vocab"]))
        if self.ema is not None and "ema" in checkpoint:
            self.ema.shadow = {k: v.clone() for k, v in checkpoint["ema"].items()}

    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            from mmdlm.folder import write_model_folder

            if self.ema is not None:
                self.ema.swap(self.model)
            try:  # LoRA: the adapters merged into a copy, so the folder holds plain weights; ours keep them
                model = merged_copy(self.model) if self.hparams.lora_rank > 0 else self.model
                write_model_folder(model, self.trainer.datamodule.processor, self.hparams.export_dir)
            finally:
                if self.ema is not None:
                    self.ema.swap(self.model)
