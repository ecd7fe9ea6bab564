"""LoRA fine-tuning (`mmdlm.lora`, `LitMDM(lora_rank=...)`, `configs/lora.yaml`): only the adapters train, the
base weights stay bit-identical, merged weights give the adapted model's logits, every export (end of fit,
`export_checkpoint`) holds plain weights that `MMDLMPipeline.from_pretrained` loads, a resumed run equals an
uninterrupted one, and bad options are one-sentence `UserError`s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from conftest import Crash
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from mmdlm.errors import UserError
from mmdlm.lora import DEFAULT_TARGETS, add_lora, lora_report, merge_lora, merged_copy
from mmdlm.model import ModelConfig, Transformer
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.training import LitMDM, MDMDataModule
from mmdlm.training.checkpoint import export_checkpoint
from mmdlm.vocab import Vocab

ROOT = Path(__file__).resolve().parents[1]
SMALL = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=32, max_seq_len=32, tie_head=False)


def datamodule(model_dir: str, shards: str) -> MDMDataModule:
    return MDMDataModule(train_shards=f"{shards}/train/*.tar", val_shards=f"{shards}/val/*.tar",
                         text_tokenizer=f"{model_dir}/text_tokenizer", vq=f"{model_dir}/vq", batch_size=4,
                         num_workers=0, resampled=True, shuffle_buffer=16, seed=3)


def lora_module(model_dir: str, **kw) -> LitMDM:
    """A LoRA fine-tune of the tiny folder; lr high enough that a few steps move the adapters visibly."""
    return LitMDM(**(dict(init_from=model_dir, lora_rank=4, lr=1e-2, warmup_steps=1, samples_at_val=0) | kw))


def trainer(root: Path, steps: int, callbacks: list, **kw) -> L.Trainer:
    return L.Trainer(**(dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                             callbacks=callbacks, deterministic=True) | kw))


def logits(model: Transformer, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(batch.ids, pad=batch.pad, image_index=batch.image_index, prefix=batch.prefix)


def base_key(key: str, state: dict) -> str:
    """A plain mmdlm key's name in an adapted model's state dict (`...qkv.weight` -> `...qkv.base_layer.weight`)."""
    module, _, leaf = key.rpartition(".")
    return key if key in state else f"{module}.base_layer.{leaf}"


# ------------------------------------------------------------------------------------------- the library
def test_add_lora_freezes_the_base_counts_the_adapters_and_merges_to_the_same_logits() -> None:
    torch.manual_seed(0)
    model = Transformer(SMALL)
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    trained, total = add_lora(model, rank=4, alpha=8.0)
    hidden = SMALL.mlp_hidden
    per_block = 4 * ((32 + 96) + (32 + 32) + (32 + 2 * hidden) + (hidden + 32))  # r * (in + out) per Linear
    assert trained == SMALL.n_layer * per_block and total == sum(plain[k].numel() for k in plain) + trained
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert lora_report(model) == (f"LoRA rank 4 on {', '.join(sorted(DEFAULT_TARGETS))}: training {trained:,} of "
                                  f"{total:,} parameters ({100 * trained / total:.2f}%)")

    batch = SimpleNamespace(ids=torch.randint(0, SMALL.vocab_size, (2, 16)), pad=None, image_index=None,
                            prefix=None)
    base = Transformer(SMALL)
    base.load_state_dict(plain)
    before = logits(model, batch)
    assert torch.equal(before, logits(base, batch))  # B starts at zero: the adapted model starts as the base
    with torch.no_grad():  # move the adapters as training would
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.05)
    adapted = logits(model, batch)
    assert not torch.allclose(before, adapted, atol=1e-3)
    copy = merged_copy(model)
    assert copy.state_dict().keys() == plain.keys() and all(p.requires_grad for p in copy.parameters())
    assert torch.allclose(logits(copy, batch), adapted, atol=1e-5)
    assert any(".lora_A." in k for k in model.state_dict())  # the copy left the original its adapters
    merge_lora(model)
    assert model.state_dict().keys() == plain.keys()
    assert torch.allclose(logits(model, batch), adapted, atol=1e-5)

    fully = Transformer(SMALL)
    add_lora(fully, rank=2, targets=["mlp.fc"], train_also=["tok_emb", "lm_head"])
    names = {n for n, p in fully.named_parameters() if p.requires_grad}
    assert names == {"tok_emb.weight", "lm_head.weight"} | {
        f"blocks.{i}.mlp.fc.lora_{ab}.default.weight" for i in range(SMALL.n_layer) for ab in "AB"}


@pytest.mark.parametrize(("kw", "message"), [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(targets=["attn.nope"]), "LoRA target 'attn.nope' matches no layer"),
    (dict(targets=["lm_head"]), "not a Linear layer of the blocks"),  # read as a table: an adapter never runs
    (dict(targets=[]), "at least one target"),
    (dict(train_also=["nope"]), "'nope' matches no module"),
    (dict(dropout=1.0), "dropout must be in [0, 1)"),
])
def test_bad_lora_options_are_one_sentence_user_errors(kw: dict, message: str) -> None:
    with pytest.raises(UserError) as err:
        add_lora(Transformer(SMALL), **kw)
    text = str(err.value)
    assert message in text and "\n" not in text and ". " not in text
    with pytest.raises(UserError, match=r"--model.lora_rank must be 0 \(no LoRA\) or a positive rank, got -1"):
        LitMDM(lora_rank=-1, ema_decay=0.0).build(SMALL, Vocab(text_size=30, codebook_size=8))


# ------------------------------------------------------------------------------------------- training
def test_a_lora_fit_keeps_the_base_weights_and_exports_them_merged(tiny_model_dir, tiny_shards, tmp_path) -> None:
    folder = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    L.seed_everything(0)
    module = lora_module(tiny_model_dir, export_dir=str(tmp_path / "model"))
    dm = datamodule(tiny_model_dir, tiny_shards)
    fit = trainer(tmp_path, 4, [ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)], limit_val_batches=1,
                  val_check_interval=2, num_sanity_val_steps=0)  # a validation: the EMA swapped in and out
    fit.fit(module, datamodule=dm)

    state = module.model.state_dict()
    for name, value in folder.items():  # every base weight as the folder holds it, bit for bit
        assert torch.equal(state[base_key(name, state)], value), name
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(state[n].abs().sum() > 0 for n in trainable if ".lora_B." in n)  # B started at zero: it trained
    assert set(module.ema.shadow) == trainable  # frozen weights need no average
    assert sum(p.numel() for g in fit.optimizers[0].param_groups for p in g["params"]) == sum(
        state[n].numel() for n in trainable)

    batch = next(iter(dm.val_dataloader()))
    base = logits(MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu").model, batch)
    module.ema.swap(module.model)  # the export holds the EMA weights (the averaged adapters)
    adapted, merged = logits(module.model, batch), logits(merged_copy(module.model), batch)
    module.ema.swap(module.model)
    assert not torch.allclose(adapted, base, atol=1e-4)
    assert torch.allclose(merged, adapted, atol=1e-5)
    pipe = MMDLMPipeline.from_pretrained(tmp_path / "model", device="cpu")
    assert pipe.model.state_dict().keys() == folder.keys()  # plain mmdlm keys
    assert torch.allclose(logits(pipe.model, batch), merged, atol=1e-6)

    exported = load_file(str(export_checkpoint(tmp_path / "ck" / "last.ckpt", tmp_path / "exported")
                             / "model.safetensors"))  # `mmdlm export --ckpt` merges too
    written = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert exported.keys() == written.keys() and all(torch.equal(v, written[k]) for k, v in exported.items())

    loaded = LitMDM.load_from_checkpoint(tmp_path / "ck" / "last.ckpt", map_location="cpu")
    assert loaded.model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())


def test_a_resumed_lora_run_equals_an_uninterrupted_one(tiny_model_dir, tiny_shards, tmp_path) -> None:
    L.seed_everything(0)
    full = lora_module(tiny_model_dir)
    trainer(tmp_path / "a", 4, []).fit(full, datamodule=datamodule(tiny_model_dir, tiny_shards))

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=2, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "b", 4, [ckpt, Crash(at=3)]).fit(lora_module(tiny_model_dir),
                                                             datamodule=datamodule(tiny_model_dir, tiny_shards))
    resumed = lora_module(tiny_model_dir)
    trainer(tmp_path / "b", 4, []).fit(resumed, datamodule=datamodule(tiny_model_dir, tiny_shards),
                                       ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert resumed.global_step == full.global_step == 4
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and any(".lora_B." in k for k in a)
    for name, value in a.items():
        assert torch.allclose(value, b[name], atol=1e-6), name
    assert full.ema.shadow.keys() == resumed.ema.shadow.keys()
    for name, value in full.ema.shadow.items():
        assert torch.allclose(value, resumed.ema.shadow[name], atol=1e-6), name


# ------------------------------------------------------------------------------------------- the CLI
def test_the_lora_recipe_says_what_it_trains_and_resumes(tiny_model_dir, tiny_shards, tmp_path, capsys) -> None:
    from mmdlm.commands.train import main

    def args(*extra: str) -> list[str]:
        return ["fit", "--config", str(ROOT / "configs" / "mdm-shapes.yaml"), "--config",
                str(ROOT / "configs" / "lora.yaml"), "--model.init_from", tiny_model_dir,
                "--data.train_shards", f"{tiny_shards}/train/*.tar", "--data.val_shards",
                f"{tiny_shards}/val/*.tar", "--data.text_tokenizer", f"{tiny_model_dir}/text_tokenizer",
                "--data.vq", f"{tiny_model_dir}/vq", "--data.batch_size", "4", "--model.compile", "false",
                "--model.samples_at_val", "0", "--trainer.num_sanity_val_steps", "0",
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path), *extra]

    def fit(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "train.py", *args(*extra)], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)

    first = fit("--trainer.max_steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    said = [x for x in (first.stdout + first.stderr).splitlines() if "parameters (" in x]
    base = MMDLMPipeline.from_pretrained(tiny_model_dir, device="cpu").model
    add_lora(base, rank=8)
    assert said == [lora_report(base)], said  # once: "LoRA rank 8 on ...: training N of M parameters (x%)"
    pipe = MMDLMPipeline.from_pretrained(tmp_path / "model", device="cpu")  # merged: plain keys
    assert pipe.model.state_dict().keys() == load_file(str(Path(tiny_model_dir) / "model.safetensors")).keys()

    again = fit("--trainer.max_steps", "4", "--ckpt_path", "last")
    assert again.returncode == 0, again.stderr[-3000:]
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 4 and state["hyper_parameters"]["lora_rank"] == 8

    with pytest.raises(SystemExit) as exit_info:  # in this process: the same CLI, without a second start-up
        main(args("--trainer.max_steps", "1", "--model.lora_targets", "[attn.nope]"))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: LoRA target 'attn.nope' matches no layer"), err[-2000:]
