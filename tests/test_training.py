"""Lightning training of the MDM / AR model: CLI, export -> from_pretrained, exact resume, DDP on CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import Crash
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from mmdlm.model import ModelConfig
from mmdlm.pipeline import MMDLMPipeline
from mmdlm.training import LitMDM, MDMDataModule

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(config=ModelConfig(n_layer=2, n_head=2, n_embd=32), warmup_steps=2, samples_at_val=0)


def datamodule(model_dir: str, shards: str, **kw) -> MDMDataModule:
    args = dict(train_shards=f"{shards}/train/*.tar", val_shards=f"{shards}/val/*.tar",
                text_tokenizer=f"{model_dir}/text_tokenizer", vq=f"{model_dir}/vq", batch_size=4,
                num_workers=0, resampled=True, shuffle_buffer=16, seed=3)
    return MDMDataModule(**(args | kw))


def trainer(root: Path, max_steps: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
                     callbacks=callbacks or [], deterministic=True)


def test_resume_after_crash_matches_uninterrupted(tiny_model_dir, tiny_shards, tmp_path) -> None:
    L.seed_everything(0)
    full = LitMDM(**TINY)
    trainer(tmp_path / "a", 8).fit(full, datamodule=datamodule(tiny_model_dir, tiny_shards))

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b", every_n_train_steps=4, save_last=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "b", 8, [ckpt, Crash(at=6)]).fit(LitMDM(**TINY),
                                                             datamodule=datamodule(tiny_model_dir, tiny_shards))
    assert (tmp_path / "b" / "last.ckpt").is_file()
    L.seed_everything(123)  # a different global seed: the resumed run must not depend on it
    resumed = LitMDM(**TINY)
    trainer(tmp_path / "b", 8).fit(resumed, datamodule=datamodule(tiny_model_dir, tiny_shards),
                                   ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert resumed.global_step == full.global_step == 8
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    for name, a in full.ema.shadow.items():
        assert torch.allclose(a, resumed.ema.shadow[name], atol=1e-6), name


def test_loss_falls_and_export_gives_identical_logits(tiny_model_dir, tiny_shards, tmp_path) -> None:
    L.seed_everything(0)
    module = LitMDM(**(TINY | dict(lr=3e-3, export_dir=str(tmp_path / "export"), ema_decay=0.0)))
    dm = datamodule(tiny_model_dir, tiny_shards)
    losses: list[float] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer(tmp_path, 40, [Record()]).fit(module, datamodule=dm)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8

    pipe = MMDLMPipeline.from_pretrained(tmp_path / "export", device="cpu")
    batch = next(iter(dm.val_dataloader()))
    module.model.eval()
    with torch.no_grad():
        expected = module.model(batch.ids, pad=batch.pad, image_index=batch.image_index)
        got = pipe.model(batch.ids, pad=batch.pad, image_index=batch.image_index)
    assert torch.equal(expected, got)


def test_bucket_pool_cuts_padding_and_a_resumed_stream_repeats_itself(tiny_model_dir, tiny_shards) -> None:
    """`bucket_pool`: training batches of similar length (less padding than plain batching of the same
    stream), still the DataModule's seeded, resumable stream (the loader skips what it had yielded)."""
    def width(dm: MDMDataModule, n: int = 12) -> float:
        it = iter(dm.train_dataloader())
        return sum(next(it).ids.shape[1] for _ in range(n)) / n

    weights = {"t2i": 1.0, "vqa": 1.0, "text": 1.0}
    plain = datamodule(tiny_model_dir, tiny_shards, task_weights=weights)
    assert width(datamodule(tiny_model_dir, tiny_shards, task_weights=weights, bucket_pool=4)) < 0.9 * width(plain)
    it = iter(datamodule(tiny_model_dir, tiny_shards, task_weights=weights, bucket_pool=4).train_dataloader())
    first = [next(it) for _ in range(5)]
    loader = datamodule(tiny_model_dir, tiny_shards, task_weights=weights, bucket_pool=4).train_dataloader()
    loader.load_state_dict({"batches": 3})  # a resumed run: a new DataModule, the loader's saved position
    again = next(iter(loader))
    assert torch.equal(again.ids, first[3].ids)


def test_export_from_checkpoint_cli(tiny_model_dir, tiny_shards, tmp_path) -> None:
    L.seed_everything(0)
    module = LitMDM(**TINY)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    trainer(tmp_path, 3, [ckpt]).fit(module, datamodule=datamodule(tiny_model_dir, tiny_shards))
    out = tmp_path / "exported"
    export = [sys.executable, "-m", "mmdlm.commands.export"]
    result = subprocess.run([*export, "--ckpt", str(tmp_path / "ck" / "last.ckpt"),
                             "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    pipe = MMDLMPipeline.from_pretrained(out, device="cpu")
    module.ema.swap(module.model)  # the export holds the EMA weights
    for name, value in module.model.state_dict().items():
        assert torch.equal(value, pipe.model.state_dict()[name]), name
    bad = subprocess.run([sys.executable, "-m", "mmdlm.commands.export", "--ckpt", str(tmp_path / "nope.ckpt"),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "nope.ckpt" in bad.stderr


def _cli(model_dir: str, shards: str, root: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", "fit", "--config", "configs/mdm-shapes.yaml",
            "--data.train_shards", f"{shards}/train/*.tar", "--data.val_shards", f"{shards}/val/*.tar",
            "--data.text_tokenizer", f"{model_dir}/text_tokenizer", "--data.vq", f"{model_dir}/vq",
            "--data.batch_size", "4", "--data.num_workers", "0", "--model.config.n_layer", "1",
            "--model.config.n_embd", "32",
            "--model.compile", "false",  # a few steps: compiling would cost more than it saves
            "--model.config.n_head", "2", "--model.export_dir", str(root / "model"), "--trainer.default_root_dir",
            str(root), "--trainer.enable_progress_bar", "false",
            *extra]


@pytest.mark.slow
def test_cli_fit_and_ddp_on_two_cpu_processes(tiny_model_dir, tiny_shards, tmp_path) -> None:
    run = subprocess.run(_cli(tiny_model_dir, tiny_shards, tmp_path / "one", "--trainer.max_steps", "4",
                              "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"),
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "one" / "model" / "config.json").is_file()
    assert list((tmp_path / "one").rglob("last.ckpt"))
    assert list((tmp_path / "one").rglob("events.out.tfevents*"))  # TensorBoard logs

    ddp = subprocess.run(_cli(tiny_model_dir, tiny_shards, tmp_path / "ddp", "--trainer.max_steps", "3",
                              "--trainer.limit_val_batches", "0", "--trainer.strategy", "ddp",
                              "--trainer.devices", "2", "--trainer.accelerator", "cpu"),
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert (tmp_path / "ddp" / "model" / "config.json").is_file()


def test_bad_cli_argument_exits_nonzero_with_a_sentence(tmp_path) -> None:
    run = subprocess.run([sys.executable, "train.py", "fit", "--config", "configs/mdm-shapes.yaml",
                          "--model.config.n_layer", "four"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode != 0
    assert "n_layer" in run.stderr


@pytest.mark.slow  # compiles (~15 s on 2 cores)
def test_compile_speeds_the_training_forward_only_and_keeps_numbers_and_parameter_names() -> None:
    """`compile`: the blocks are compiled for the training forward (same logits and gradients as eager, to
    float32 rounding); eval calls run the eager blocks; the state_dict is the plain model's."""
    from mmdlm.model import ModelConfig
    from mmdlm.vocab import Vocab

    vocab = Vocab(text_size=40, codebook_size=16)
    config = ModelConfig(vocab_size=vocab.size, n_layer=2, n_head=2, n_embd=16, max_seq_len=32)
    plain, compiled = LitMDM(**TINY), LitMDM(**TINY, compile=True)
    torch.manual_seed(0)
    plain.build(config, vocab)
    compiled.build(config, vocab)
    compiled.model.load_state_dict(plain.model.state_dict())
    assert type(compiled.model) is type(plain.model)  # no OptimizedModule wrapper: checkpoints unchanged
    assert compiled.model.state_dict().keys() == plain.model.state_dict().keys()
    assert not plain.model._compiled_blocks and len(compiled.model._compiled_blocks) == 2
    ids = torch.randint(0, vocab.size, (3, 20))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=False):
        for lit in (plain, compiled):
            lit.model.train()
        out_plain, out_compiled = plain.model(ids), compiled.model(ids)
        torch.testing.assert_close(out_compiled, out_plain, rtol=1e-4, atol=1e-5)
        out_plain.square().mean().backward()
        out_compiled.square().mean().backward()
        for (name, a), b in zip(plain.model.named_parameters(), compiled.model.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-6, msg=name)
        frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        with torch.no_grad():  # eval / sampling: eager, no new graph
            torch.testing.assert_close(compiled.model.eval()(ids), plain.model.eval()(ids))
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames


@pytest.mark.parametrize("causal", [False, True])
def test_validation_logs_text_samples_and_an_image_grid_to_tensorboard(tiny_model_dir, tiny_shards, tmp_path,
                                                                       causal) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    module = LitMDM(**(TINY | {"samples_at_val": 16, "config": ModelConfig(n_layer=2, n_head=2, n_embd=32,
                                                                           causal=causal)}))
    logger = TensorBoardLogger(tmp_path, name="tb")
    L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False,
              enable_model_summary=False, enable_checkpointing=False, limit_val_batches=1, val_check_interval=2,
              num_sanity_val_steps=0).fit(module, datamodule=datamodule(tiny_model_dir, tiny_shards, batch_size=16))
    events = EventAccumulator(str(Path(logger.log_dir)), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert "val/images" in events.Tags()["images"]  # 16 mixed-task rows always hold a text-to-image or joint one
    image = events.Images("val/images")[-1]
    assert image.height > 32 and image.width >= 32  # truth row over prediction row of 32-px images
    assert any(tag.startswith("val/samples") for tag in events.Tags()["tensors"])
