"""Would the libraries' EMA and LR schedule replace `LitMDM`'s own? The numbers that said no.

    python -m benchmarks.library_equivalence          # CPU, a few seconds

1. EMA: `mmdlm.training.module.EMA` against torch's `AveragedModel` with the EMA functions that Lightning's
   `EMAWeightAveraging` callback uses (`get_ema_avg_fn`) or could use (`get_ema_multi_avg_fn`). A tiny
   transformer takes 20 AdamW steps, and every average is updated after each step. The callback builds its
   `AveragedModel` at setup (`n_averaged = 0`), so the first update copies the weights after step 1. Ours
   starts at the weights before step 1. The "seeded" rows call `update_parameters` once at build to start
   where ours does. Then, an old checkpoint (`checkpoint["ema"]`) loaded by the callback: which weights does
   its average resume from?
2. LR: `LitMDM.configure_optimizers`' warmup + cosine multiplier against transformers'
   `get_cosine_with_min_lr_schedule_with_warmup` (warmup 100, total 1,000, min ratio 0.1), step by step.

Prints the differences; a replacement needs max |difference| < 1e-6 (EMA) and 1e-9 (LR).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

from mmdlm.model import ModelConfig, Transformer
from mmdlm.training.module import EMA, LitMDM
from mmdlm.vocab import Vocab

DECAY, STEPS = 0.995, 20  # the recipes' ema_decay


def tiny_model() -> Transformer:
    torch.manual_seed(0)
    vocab = Vocab(text_size=40, codebook_size=16)
    model = Transformer(ModelConfig(vocab_size=vocab.size, n_layer=2, n_head=2, n_embd=32, max_seq_len=32,
                                    image_grid=(2, 2), codebook_size=16, image_offset=vocab.image_offset,
                                    codebook_dim=4, head_codebook=True))  # the recipes' head
    model.set_codebook(torch.randn(16, 4))
    return model


def compare_ema() -> None:
    model = tiny_model()
    ours = EMA(model, DECAY)  # as LitMDM.build makes it
    averages = {name: AveragedModel(model, use_buffers=True, **{kind: fn(DECAY)})  # as WeightAveraging.setup does
                for name, kind, fn in [("avg_fn (EMAWeightAveraging)", "avg_fn", get_ema_avg_fn),
                                       ("multi_avg_fn (foreach lerp)", "multi_avg_fn", get_ema_multi_avg_fn),
                                       ("avg_fn, seeded at build", "avg_fn", get_ema_avg_fn),
                                       ("multi_avg_fn, seeded at build", "multi_avg_fn", get_ema_multi_avg_fn)]}
    for name, average in averages.items():
        if "seeded" in name:
            average.update_parameters(model)
    before = {k: v.clone() for k, v in ours.shadow.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / 100)  # the recipes' warmup
    ids = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(1))
    for step in range(STEPS):
        logits = model(ids)  # (4, 16, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step == 0:
            first_step = max((model.state_dict()[k] - before[k]).abs().max().item() for k in before)
        ours.update(model)
        for average in averages.values():
            average.update_parameters(model)
    print(f"EMA, decay {DECAY}, {STEPS} AdamW steps: max |ours - library| over the averaged weights")
    for name, average in averages.items():
        state = average.module.state_dict()
        gap = max((ours.shadow[k] - state[k]).abs().max().item() for k in ours.shadow)
        rope = max((getattr(average.module, b) - getattr(model, b)).abs().max().item()
                   for b in ("rope_cos", "rope_sin"))  # non-persistent buffers: ours leaves them alone
        print(f"  {name:32s} {gap:.3e}   its copy of the constant RoPE tables moved by {rope:.1e}")
    print(f"  (unseeded: the library drops the weights before step 1; decay**{STEPS} * max|W1 - W0| = "
          f"{DECAY ** STEPS:.4f} * {first_step:.3e} = {DECAY ** STEPS * first_step:.3e})")


def old_checkpoint_resume() -> None:
    """An mmdlm checkpoint of before ({"state_dict": raw weights, "ema": average}) loaded by the callback."""

    class Lit(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_model()

    lit = Lit()
    raw = {f"model.{k}": v.clone() for k, v in lit.model.state_dict().items()}
    stored = {k: v + 0.01 for k, v in lit.model.state_dict().items() if v.dtype.is_floating_point}
    callback = EMAWeightAveraging(decay=DECAY)
    callback._average_model = AveragedModel(lit, avg_fn=get_ema_avg_fn(DECAY), use_buffers=True)  # its setup
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback.on_load_checkpoint(None, lit, {"state_dict": raw, "ema": stored})
    average = callback._average_model.module.model.state_dict()
    print("EMA, an old checkpoint resumed by EMAWeightAveraging: average == its checkpoint['ema']:",
          all(torch.equal(average[k], stored[k]) for k in stored), "| == the raw weights:",
          all(torch.equal(average[k], raw[f"model.{k}"]) for k in stored), "| n_averaged:",
          int(callback._average_model.n_averaged), "| warned:", "; ".join(str(w.message)[:60] for w in caught))


def compare_lr(warmup: int = 100, total: int = 1000, min_ratio: float = 0.1) -> None:
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    lit = LitMDM(warmup_steps=warmup, min_lr_ratio=min_ratio)
    lit.model = tiny_model()
    lit._trainer = SimpleNamespace(max_steps=total)  # all configure_optimizers reads of the trainer
    ours = lit.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=min_ratio).lr_lambdas[0]
    differ = [s for s in range(total + 1) if abs(ours(s) - theirs(s)) > 1e-9]
    print(f"LR multiplier, warmup {warmup}, total {total}, min ratio {min_ratio}: {len(differ)} of {total + 1} steps "
          f"differ by > 1e-9 (steps {differ[0]}..{differ[-1]}), max |diff| "
          f"{max(abs(ours(s) - theirs(s)) for s in differ):.3g}" if differ else "identical at every step")
    cosine = max(abs(ours(s) - theirs(s)) for s in range(warmup, total + 1))
    print(f"  steps {warmup}..{total} (the cosine): max |diff| {cosine:.3g}")
    for s in [0, 1, warmup - 1, warmup, total, total + 100]:
        print(f"  step {s:5d}: ours {ours(s):.6f}   transformers {theirs(s):.6f}")


if __name__ == "__main__":
    compare_ema()
    old_checkpoint_resume()
    compare_lr()
