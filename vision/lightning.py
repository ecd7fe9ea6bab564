"""Training the VQ image tokenizer with Lightning: `python train.py fit --config configs/vq-shapes.yaml`.

The VQ-VAE objective (van den Oord et al. 2017): reconstruction (L1 and/or L2; no perceptual or adversarial
term: no LPIPS weights can be downloaded here) + codebook loss ||sg[z] - e||^2 + beta * commitment
||z - sg[e]||^2, with a straight-through gradient. One more reconstruction term, the squared error of only
the worst 10% of pixel values (online hard-example mining, as OHEM, Shrivastava et al. 2016): on images
that are mostly background (87% of shapes patches are black) the mean error is drowned by pixels already
right, and the decoder sits for hundreds of steps on blurry blobs; the hard term goes to the edges.
Against codebook collapse (BENCHMARKS.md, founding measurements: k-means kept 80 live codes of 512):
- small code vectors (e = 8) and, optionally, l2-normalised codes and latents (ViT-VQGAN, Yu et al. 2022),
- codebook restart: every `restart_every` steps the codes unused over that window are re-initialised from
  the current batch's encoder outputs, drawn k-means++ style (probability ~ squared distance to the nearest
  live code), so new codes land where the codebook is worst, not on the 87% black background (as the
  restarts of Jukebox, Dhariwal et al. 2020, and "improved VQGAN"); step 0 is a restart of every code,
  i.e. a k-means++ initialisation from data.
Validation runs the inference path (`encode` then `decode`) and logs PSNR, codebook usage and perplexity,
and a grid of originals over reconstructions to TensorBoard. The trained tokenizer is exported as a
diffusers `VQModel` folder at the end of fit (`export_dir`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger

from vision.schedule import warmup_cosine
from vision.tokenizer import VQConfig, VQTokenizer


def images_of(batch: Any) -> torch.Tensor:
    """The (B, 3, H, W) images of a batch: a tensor, a record dict with "image", or a (images, ...) tuple."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        return batch["image"]
    return batch[0]


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1]: (B, 3, H, W) x2 -> (B,), capped at 100 dB for exact copies."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)  # (B,)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram (K,): the effective number of codes in use."""
    p = counts.double() / counts.sum().clamp_min(1)
    return float(torch.exp(-(p * p.clamp_min(1e-30).log()).sum()))


@torch.no_grad()
def restart_dead_codes(codebook: torch.Tensor, dead: torch.Tensor, candidates: torch.Tensor,
                       generator: torch.Generator | None = None, noise: float = 0.0) -> int:
    """Re-initialise the `dead` rows of `codebook` (K, e) in place from `candidates` (N, e) encoder outputs.

    Each new code is drawn with probability proportional to the squared distance of a candidate to the
    nearest code kept so far (the live ones and those already drawn: k-means++), so the new codes cover
    the latents the codebook represents worst. Returns the number of codes re-initialised.
    """
    dead_ids = dead.nonzero().flatten()  # (D,)
    if dead_ids.numel() == 0:
        return 0
    cand = candidates.detach().to(codebook.dtype)  # (N, e)
    live = codebook[~dead]  # (L, e)
    if live.shape[0]:
        d2 = torch.cdist(cand, live).pow(2).min(1).values  # (N,) squared distance to the nearest live code
    else:
        d2 = torch.full((cand.shape[0],), float("inf"), device=cand.device, dtype=cand.dtype)
    for k in dead_ids.tolist():
        weights = d2.clamp_min(0) if bool(torch.isfinite(d2).all()) else torch.ones_like(d2)  # no code yet
        if float(weights.sum()) <= 0:  # every candidate is already a code: draw uniformly
            weights = torch.ones_like(d2)
        i = int(torch.multinomial(weights.float().cpu(), 1, generator=generator))
        codebook[k] = cand[i] + noise * torch.randn(cand.shape[1], generator=generator).to(cand)
        d2 = torch.minimum(d2, (cand - codebook[k]).pow(2).sum(1))  # (N,)
    return int(dead_ids.numel())


class VQLitModule(LightningModule):
    """Trains a `VQTokenizer` (diffusers `VQModel`) and exports it as a folder at the end of fit.

    Args:
        vq: architecture of a new tokenizer (ignored when `init_from` is given).
        init_from: a VQModel folder to fine-tune instead of a new tokenizer.
        lr: peak AdamW learning rate (linear warmup, cosine decay to `lr * min_lr_ratio` at max_steps).
        min_lr_ratio: final learning rate as a fraction of `lr`.
        warmup_steps: steps of linear warmup.
        weight_decay: AdamW weight decay (not applied to the codebook).
        l1_weight: weight of the L1 reconstruction loss (sharp edges).
        l2_weight: weight of the L2 reconstruction loss (what PSNR measures).
        hard_weight: weight of the squared error averaged over only the worst `hard_fraction` of pixel
            values (online hard-example mining): object edges, which the mean over a mostly empty image
            drowns; it lifts the early plateau where the decoder paints background and blurry blobs.
        hard_fraction: the share of pixel values (of the batch) that `hard_weight` averages over.
        codebook_weight: weight of ||sg[z] - e||^2, which moves codes toward the latents.
        commitment_beta: weight of ||z - sg[e]||^2, which keeps the encoder near its codes.
        l2_codes: l2-normalise latents and codes (lookup by cosine similarity). A unit-norm codebook gives
            the same ids under diffusers' Euclidean quantizer, so the exported folder stays standard.
        ema_decay: update the codes as exponential moving averages of the latents assigned to them
            (VQ-VAE-2, Razavi et al. 2019) instead of by the codebook loss; None: gradient updates.
        restart_every: re-initialise the codes unused over the last this-many steps (0: never).
        dead_below: a code used fewer times than this over the window counts as dead.
        restart_until: no restarts after this fraction of max_steps, so the decoder settles on the final codes.
        export_dir: where to save the trained tokenizer at the end of fit (None: do not export).
        log_images: originals and reconstructions shown in TensorBoard at each validation.
        seed: seed of the restart draws.
    """

    def __init__(
        self,
        vq: VQConfig | None = None,
        init_from: str | None = None,
        lr: float = 2e-3,
        min_lr_ratio: float = 0.05,
        warmup_steps: int = 20,
        weight_decay: float = 0.0,
        l1_weight: float = 1.0,
        l2_weight: float = 1.0,
        hard_weight: float = 1.0,
        hard_fraction: float = 0.1,
        codebook_weight: float = 1.0,
        commitment_beta: float = 0.25,
        l2_codes: bool = False,
        ema_decay: float | None = None,
        restart_every: int = 25,
        dead_below: int = 1,
        restart_until: float = 0.8,
        export_dir: str | None = None,
        log_images: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.vq_config = vq or VQConfig()
        self.tokenizer = VQTokenizer.from_pretrained(init_from) if init_from else VQTokenizer.new(self.vq_config)
        if init_from:
            self.tokenizer.train()
        K = self.tokenizer.codebook_size
        self.register_buffer("window_counts", torch.zeros(K, dtype=torch.long), persistent=True)  # (K,)
        self.register_buffer("val_counts", torch.zeros(K, dtype=torch.long), persistent=False)  # (K,)
        self._generator = torch.Generator().manual_seed(seed)
        self._val: dict[str, float] = {}
        self._val_images: torch.Tensor | None = None
        if l2_codes:
            self._normalise_codebook()
        if ema_decay is not None:  # the codes move by moving averages, not by the optimizer
            weight = self.tokenizer.model.quantize.embedding.weight  # (K, e)
            weight.requires_grad_(False)
            self.register_buffer("ema_count", torch.ones(K))  # (K,) smoothed assignments per code
            self.register_buffer("ema_sum", weight.detach().clone())  # (K, e) smoothed sum of their latents

    # ------------------------------------------------------------------------------------------- training
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        codebook = self.tokenizer.model.quantize.embedding.weight
        rest = [p for p in self.parameters() if p is not codebook and p.requires_grad]
        groups = [{"params": rest, "weight_decay": hp.weight_decay}]
        if codebook.requires_grad:
            groups.append({"params": [codebook], "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.99))
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer else 10_000

        def schedule(step: int) -> float:  # a plain function: LambdaLR keeps it out of the checkpoint
            return warmup_cosine(step, hp.warmup_steps, total, hp.min_lr_ratio)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        x = images_of(batch)  # (B, 3, H, W) in [0, 1]
        tok = self.tokenizer
        z = tok.latents(x)  # (B, e, h, w)
        if hp.l2_codes:
            z = F.normalize(z, dim=1)  # (B, e, h, w) on the unit sphere, as the codes
        self._maybe_restart(z)
        codes, e = tok.quantize(z)  # (B, h, w), (B, e, h, w)
        z_q = z + (e - z).detach()  # (B, e, h, w) straight-through
        recon = tok.decode_vectors(z_q)  # (B, 3, H, W)
        err = (recon - x).pow(2)  # (B, 3, H, W)
        l1 = (recon - x).abs().mean()
        l2 = err.mean()
        hard = err.flatten().topk(max(1, int(err.numel() * hp.hard_fraction))).values.mean()
        codebook_loss = (e - z.detach()).pow(2).mean()
        commitment = (z - e.detach()).pow(2).mean()
        loss = hp.l1_weight * l1 + hp.l2_weight * l2 + hp.hard_weight * hard + \
            hp.codebook_weight * codebook_loss + hp.commitment_beta * commitment
        counts = torch.bincount(codes.flatten(), minlength=tok.codebook_size)  # (K,)
        self.window_counts += counts
        if hp.ema_decay is not None:
            self._ema_update(z.detach(), codes, counts)
        self.log_dict({"train/loss": loss, "train/l1": l1, "train/l2": l2, "train/hard": hard,
                       "train/codebook": codebook_loss,
                       "train/commitment": commitment}, prog_bar=False)
        self.log("train/psnr", 10 * torch.log10(1 / l2.detach().clamp_min(1e-10)), prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.hparams.l2_codes:  # keep the codes on the unit sphere after the optimizer moved them
            self._normalise_codebook()

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """Move each code to the moving average of the latents z (B, e, h, w) assigned to it."""
        d = self.hparams.ema_decay
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, e)
        sums = torch.zeros_like(self.ema_sum).index_add_(0, codes.flatten(), flat)  # (K, e)
        counts = counts.to(flat.dtype)  # (K,)
        if self._trainer and self.trainer.world_size > 1:  # the averages see every rank's latents
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        self.ema_count.mul_(d).add_(counts, alpha=1 - d)
        self.ema_sum.mul_(d).add_(sums, alpha=1 - d)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + 1e-5) / (n + self.ema_count.numel() * 1e-5) * n  # (K,) Laplace smoothing
        self.tokenizer.model.quantize.embedding.weight.copy_(self.ema_sum / smoothed[:, None])

    @torch.no_grad()
    def _normalise_codebook(self) -> None:
        weight = self.tokenizer.model.quantize.embedding.weight  # (K, e)
        weight.copy_(F.normalize(weight, dim=1))

    @torch.no_grad()
    def _maybe_restart(self, z: torch.Tensor) -> None:
        """At window ends, re-initialise the dead codes from this batch's latents z (B, e, h, w)."""
        hp = self.hparams
        step = self.global_step
        max_steps = self.trainer.max_steps if self._trainer and self.trainer.max_steps > 0 else None
        if hp.restart_every <= 0 or step % hp.restart_every:
            return
        if max_steps is not None and step > hp.restart_until * max_steps:
            return
        counts = self.trainer.strategy.reduce(self.window_counts.clone(), reduce_op="sum") \
            if self._trainer else self.window_counts
        if step > 0:
            self.log("train/window_usage", (counts > 0).float().mean())
        dead = counts < hp.dead_below  # (K,); every code at step 0: a k-means++ initialisation from data
        weight = self.tokenizer.model.quantize.embedding.weight  # (K, e)
        candidates = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # (B*h*w, e)
        n = restart_dead_codes(weight.data, dead, candidates, self._generator)
        if hp.l2_codes:
            self._normalise_codebook()
        if self._trainer and self.trainer.world_size > 1:  # every rank keeps rank 0's codebook
            weight.data.copy_(self.trainer.strategy.broadcast(weight.data, src=0))
        if hp.ema_decay is not None:  # a restarted code starts its average afresh at its new vector
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = weight.data[dead]
        self.window_counts.zero_()
        self.log("train/restarted", float(n))

    # ----------------------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self.val_counts.zero_()
        self._val = {"psnr_sum": 0.0, "sse": 0.0, "pixels": 0.0, "images": 0.0}
        self._val_images = None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = images_of(batch).to(self.device)  # (B, 3, H, W)
        codes = self.tokenizer.encode(x)  # (B, h, w): the inference path, as users will run it
        recon = self.tokenizer.decode(codes)  # (B, 3, H, W) in [0, 1]
        self.val_counts += torch.bincount(codes.flatten(), minlength=self.tokenizer.codebook_size)
        self._val["psnr_sum"] += float(psnr(recon, x).sum())
        self._val["sse"] += float((recon - x).pow(2).sum())
        self._val["pixels"] += x.numel()
        self._val["images"] += x.shape[0]
        if self._val_images is None and self.hparams.log_images > 0:
            n = self.hparams.log_images
            self._val_images = torch.cat([x[:n], recon[:n]]).detach().cpu()  # (2n, 3, H, W)

    def on_validation_epoch_end(self) -> None:
        reduce = self.trainer.strategy.reduce if self._trainer else (lambda t, reduce_op: t)
        sums = reduce(torch.tensor([self._val[k] for k in ("psnr_sum", "sse", "pixels", "images")],
                                   device=self.device, dtype=torch.float64), reduce_op="sum")
        counts = reduce(self.val_counts.clone(), reduce_op="sum")  # (K,)
        if float(sums[3]) == 0:
            return
        metrics = {
            "val/psnr": float(sums[0] / sums[3]),  # mean over images of the per-image PSNR
            "val/psnr_global": float(10 * torch.log10(sums[2] / sums[1].clamp_min(1e-12))),  # of the mean MSE
            "val/usage": float((counts > 0).float().mean()),  # fraction of the codebook used on val
            "val/perplexity": perplexity(counts),
        }
        self.log_dict(metrics, prog_bar=True, sync_dist=False)
        self._log_grid()

    def _log_grid(self) -> None:
        if self._val_images is None or not isinstance(self.logger, TensorBoardLogger):
            return
        import torchvision

        n = self._val_images.shape[0] // 2
        big = F.interpolate(self._val_images, scale_factor=4, mode="nearest")  # (2n, 3, 4H, 4W)
        grid = torchvision.utils.make_grid(big, nrow=n, padding=2, pad_value=0.5)  # originals over recons
        self.logger.experiment.add_image("val/originals_over_reconstructions", grid, self.global_step)

    # --------------------------------------------------------------------------------------------- export
    def on_fit_end(self) -> None:
        if self.hparams.export_dir and self.trainer.is_global_zero:
            if self.hparams.l2_codes:
                self._normalise_codebook()
            Path(self.hparams.export_dir).mkdir(parents=True, exist_ok=True)
            self.tokenizer.save_pretrained(self.hparams.export_dir)
            print(f"[vq] exported the tokenizer to {self.hparams.export_dir}")
