"""Resuming and starting runs through the real `train.py` CLI: a SIGKILLed fit resumed with `--ckpt_path last`
equals an uninterrupted one bit for bit, `last.ckpt` holds the final step and exports from any directory, and
`--model.init_from` starts from a model folder's weights (or says in one sentence why it cannot)."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from safetensors.torch import load_file

from mmdlm.errors import UserError
from mmdlm.model import ModelConfig
from mmdlm.training import LitMDM, MDMDataModule

ROOT = Path(__file__).resolve().parents[1]
STEPS = 26  # not a multiple of EVERY: without the final save, last.ckpt would hold step 24
EVERY = 4
RUN = f"""\
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: {EVERY}, save_last: true, save_top_k: -1}}
  max_steps: {STEPS}
  enable_progress_bar: false
  enable_model_summary: false
  log_every_n_steps: 1
  val_check_interval: 12
  limit_val_batches: 1
  num_sanity_val_steps: 0
"""


@pytest.fixture(scope="module")
def code_shards(tiny_model_dir: str, tiny_shards: str, tmp_path_factory) -> str:
    """`tiny_shards` pre-tokenized with the tiny VQ (`mmdlm.pretokenize`): no VQ encoder in the training loops."""
    from mmdlm.pretokenize import pretokenize

    root = tmp_path_factory.mktemp("codes")
    for split in ("train", "val"):
        pretokenize(f"{tiny_model_dir}/vq", f"{tiny_shards}/{split}/*.tar", str(root / split))
    return str(root)


def fit_command(root: Path, text_tokenizer: str, vq: str, shards: str, *extra: str) -> list[str]:
    """`python train.py fit` with the shipped MDM config, shrunk to a tiny model and a few steps."""
    override = root.parent / f"{root.name}-run.yaml"
    override.write_text(RUN)
    return [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "mdm-shapes.yaml"),
            "--config", str(override),
            "--data.train_shards", f"{shards}/train/*.tar", "--data.val_shards", f"{shards}/val/*.tar",
            "--data.text_tokenizer", text_tokenizer, "--data.vq", vq, "--data.batch_size", "4",
            "--model.compile", "false",  # a few steps: compiling would cost more than it saves
            "--data.shuffle_buffer", "16", "--model.config.n_layer", "1", "--model.config.n_head", "2",
            "--model.config.n_embd", "32",
            "--model.warmup_steps", "2", "--model.samples_at_val", "0", "--model.export_dir", str(root / "model"),
            "--trainer.default_root_dir", str(root), *extra]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def logged_steps(version_dir: Path) -> list[int]:
    """The steps at which a run logged train/loss to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(version_dir))
    events.Reload()
    return [e.step for e in events.Scalars("train/loss")]


def test_a_sigkilled_fit_resumes_with_ckpt_path_last_and_ends_bit_identical(tiny_model_dir, code_shards,
                                                                           tmp_path) -> None:
    tok, vq = f"{tiny_model_dir}/text_tokenizer", f"{tiny_model_dir}/vq"
    # the uninterrupted run and the one to be killed, side by side (same thread counts, so the same arithmetic)
    full = subprocess.Popen(fit_command(tmp_path / "full", tok, vq, code_shards), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    killed = subprocess.Popen(fit_command(tmp_path / "run", tok, vq, code_shards), cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step_at_kill, deadline = None, time.monotonic() + 90
    while killed.poll() is None and time.monotonic() < deadline:
        try:
            step_at_kill = load(last)["global_step"]  # the first checkpoint, once it can be read
            break
        except (FileNotFoundError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):
            time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    assert step_at_kill is not None and 0 < step_at_kill < STEPS and not (tmp_path / "run" / "model").exists()
    _, full_err = full.communicate(timeout=120)
    assert full.returncode == 0, full_err[-3000:]

    resumed = subprocess.run(fit_command(tmp_path / "run", tok, vq, code_shards, "--ckpt_path", "last"), cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no last checkpoint available" not in resumed.stderr
    # the step counter continues: the resumed process (a new TensorBoard version) logs from the checkpoint on
    versions = sorted((tmp_path / "run" / "tb").glob("version_*"))
    assert len(versions) == 2
    steps = logged_steps(versions[-1])
    assert min(steps) >= step_at_kill > 0 and max(steps) == STEPS - 1, (step_at_kill, steps[:3])

    a, b = load(tmp_path / "full" / "checkpoints" / "last.ckpt"), load(last)
    assert a["global_step"] == b["global_step"] == STEPS  # the final step, not the last multiple of EVERY
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    for name, value in a["ema"].items():
        assert torch.equal(value, b["ema"][name]), name
    exported = [load_file(str(tmp_path / run / "model" / "model.safetensors")) for run in ("full", "run")]
    assert all(torch.equal(v, exported[1][k]) for k, v in exported[0].items())


def test_last_ckpt_holds_the_final_step_and_exports_from_another_directory(tiny_model_dir, code_shards,
                                                                          tmp_path) -> None:
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    for part in ("text_tokenizer", "vq"):  # the run names its tokenizers by relative paths
        (work / part).symlink_to(Path(tiny_model_dir) / part, target_is_directory=True)
    run = subprocess.run(fit_command(work / "run", "text_tokenizer", "vq", code_shards, "--trainer.max_steps", "6"),
                         cwd=work, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    ckpt = work / "run" / "checkpoints" / "last.ckpt"
    state = load(ckpt)
    assert state["global_step"] == 6  # saved at the end of fit, not only at step 4
    assert Path(state["mmdlm"]["text_tokenizer"]).is_absolute() and Path(state["mmdlm"]["vq"]).is_absolute()

    export = subprocess.run([sys.executable, "-m", "mmdlm.commands.export", "--ckpt", str(ckpt), "--out", "exported"],
                            cwd=elsewhere, capture_output=True, text=True, timeout=120,
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert export.returncode == 0, export.stderr[-3000:]
    final = load_file(str(work / "run" / "model" / "model.safetensors"))  # written by fit itself, at the end
    got = load_file(str(elsewhere / "exported" / "model.safetensors"))
    assert final.keys() == got.keys() and all(torch.equal(v, got[k]) for k, v in final.items())


# ------------------------------------------------------------------------------------ --model.init_from
def datamodule(model_dir: str, shards: str, **kw) -> MDMDataModule:
    args = dict(train_shards=f"{shards}/train/*.tar", val_shards=f"{shards}/val/*.tar",
                text_tokenizer=f"{model_dir}/text_tokenizer", vq=f"{model_dir}/vq", batch_size=4,
                num_workers=0, resampled=True, shuffle_buffer=16, seed=3)
    return MDMDataModule(**(args | kw))


def test_init_from_starts_at_the_folder_weights_with_a_fresh_optimizer(tiny_model_dir, code_shards,
                                                                       tmp_path) -> None:
    folder = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    at_start: dict = {}

    class FirstStep(Callback):
        def on_train_start(self, trainer, module) -> None:
            at_start["model"] = {k: v.clone() for k, v in module.model.state_dict().items()}
            at_start["ema"] = {k: v.clone() for k, v in module.ema.shadow.items()}
            at_start["step"], at_start["lr"] = trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]

    L.seed_everything(0)
    module = LitMDM(config=ModelConfig(n_layer=4, n_embd=128), warmup_steps=2, samples_at_val=0, lr=1e-3,
                    init_from=tiny_model_dir)  # the folder's shape wins
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)
    L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
              callbacks=[FirstStep(), ckpt]).fit(module, datamodule=datamodule(tiny_model_dir, code_shards))

    assert at_start["step"] == 0 and at_start["lr"] == pytest.approx(1e-3 / 2)  # warmup from its first step
    assert at_start["model"].keys() == folder.keys()
    for name, value in folder.items():
        assert torch.equal(at_start["model"][name], value), name
        if name in at_start["ema"]:
            assert torch.equal(at_start["ema"][name], value), name
    assert module.hparams.config["n_layer"] == 2 and module.hparams.config["n_embd"] == 32  # what was built
    assert module.global_step == 3
    assert any(not torch.equal(v, folder[k]) for k, v in module.model.state_dict().items())  # it trained
    assert load(tmp_path / "ck" / "last.ckpt")["mmdlm"]["model_config"]["n_layer"] == 2


def test_init_from_other_tokenizers_is_refused_in_one_sentence(tiny_model_dir, code_shards, tmp_path) -> None:
    from conftest import shapes_texts

    from mmdlm.text_tokenizer import BPETokenizer
    from vision.tokenizer import VQTokenizer

    same_size = BPETokenizer.train(shapes_texts(300, seed=7) + ["zebra quokka"] * 50, vocab_size=300)
    same_size.save(tmp_path / "tok")
    torch.manual_seed(1)
    VQTokenizer.new(image_size=32, codebook_size=64, channels=16, max_channels=32,
                    norm_groups=4).save_pretrained(tmp_path / "vq")
    own_tok, own_vq = f"{tiny_model_dir}/text_tokenizer", f"{tiny_model_dir}/vq"
    cases = {"text tokenizer maps tokens to different ids": dict(text_tokenizer=str(tmp_path / "tok")),
             "image codebook differs": dict(vq=str(tmp_path / "vq"))}
    for message, kw in cases.items():
        dm = datamodule(tiny_model_dir, code_shards, **kw)
        assert dm.processor.vocab.text_size == 300 and dm.processor.vocab.codebook_size == 64  # sizes alone pass
        with pytest.raises(UserError, match=message):
            LitMDM(init_from=tiny_model_dir).init_from_folder(tiny_model_dir, dm.processor)
    with pytest.raises(UserError, match="cannot be loaded"):
        LitMDM().init_from_folder(tmp_path / "no-model-here", datamodule(tiny_model_dir, code_shards).processor)

    # through the CLI: a text tokenizer of another size, one sentence on stderr and exit status 2
    BPETokenizer.train(shapes_texts(100), vocab_size=280).save(tmp_path / "small")
    run = subprocess.run(fit_command(tmp_path / "cli", str(tmp_path / "small"), own_vq, code_shards,
                                     "--model.init_from", tiny_model_dir, "--trainer.max_steps", "1"),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr[-3000:]
    last_line = run.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: --model.init_from") and "vocabulary has 300 text ids" in last_line
    assert f"--data.text_tokenizer {own_tok}" in last_line and "Traceback" not in run.stderr


def test_a_ckpt_path_that_cannot_resume_is_refused_in_one_sentence(tiny_model_dir, code_shards, tmp_path,
                                                                     capsys) -> None:
    from mmdlm.commands.train import main

    args = fit_command(tmp_path / "run", f"{tiny_model_dir}/text_tokenizer", f"{tiny_model_dir}/vq", code_shards)[2:]
    cases = {f"{tiny_model_dir}/model.safetensors": f"use --model.init_from {tiny_model_dir}",
             tiny_model_dir: f"use --model.init_from {tiny_model_dir}",
             str(tmp_path / "nope.ckpt"): "nope.ckpt' does not exist"}
    for ckpt_path, message in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(args + ["--ckpt_path", ckpt_path])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err.strip().splitlines()[-1], err[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any training


def test_a_missing_tokenizer_folder_is_one_sentence_not_a_wrapped_traceback(tiny_model_dir, code_shards, tmp_path,
                                                                            capsys) -> None:
    from mmdlm.commands.train import main

    args = fit_command(tmp_path / "run", str(tmp_path / "no-tokenizer"), f"{tiny_model_dir}/vq", code_shards)[2:]
    with pytest.raises(SystemExit) as exit_info:  # raised inside jsonargparse's instantiation of the data module
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and "Union subtypes" not in err
    missing = str(tmp_path / "no-tokenizer")
    assert err.strip().splitlines()[-1] == f"error: text tokenizer path {missing!r} does not exist"


def test_a_checkpoint_with_the_architecture_given_field_by_field_loads(tiny_model_dir, code_shards, tmp_path) -> None:
    """Checkpoints whose hyper-parameters hold the architecture as separate fields (n_layer, causal, ...) beside
    the training options load: `LitMDM.migrate_hparams` gathers them into `config` once, on load."""
    L.seed_everything(0)
    module = LitMDM(config=ModelConfig(n_layer=1, n_head=2, n_embd=32), warmup_steps=2, samples_at_val=0)
    L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
              callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", save_last=True)]
              ).fit(module, datamodule=datamodule(tiny_model_dir, code_shards))
    state = torch.load(tmp_path / "ck" / "last.ckpt", map_location="cpu", weights_only=True)
    hp = dict(state["hyper_parameters"])
    config = hp.pop("config")
    fields = ("n_layer", "n_head", "n_embd", "causal", "qk_norm", "tie_head", "head_codebook", "mask_positions",
              "shift_logits", "prefix_attention", "dropout")
    old = {**hp, **{k: config[k] for k in fields},  # and the class path LightningCLI recorded for it
           "_class_path": "mmdlm.lightning.LitMDM", "_instantiator": "lightning.pytorch.cli.instantiate_module"}
    assert "config" not in old and old["n_layer"] == 1
    torch.save({**state, "hyper_parameters": old}, tmp_path / "old.ckpt")

    loaded = LitMDM.load_from_checkpoint(tmp_path / "old.ckpt", map_location="cpu")
    assert loaded.architecture == ModelConfig(**{**asdict(ModelConfig()), **{k: config[k] for k in fields}})
    assert loaded.architecture.n_layer == 1 and loaded.architecture.n_embd == 32
    for name, value in module.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    with pytest.raises(TypeError):  # without the migration the old fields are not LitMDM arguments
        LitMDM(**old)


def test_init_from_adapts_a_folder_to_block_diffusion(tiny_model_dir, code_shards, tmp_path) -> None:
    """`config.block_diffusion` with `init_from`: the folder's weights train as block diffusion with this run's
    block sizes; the loss is the block loss of `mmdlm.blocks`' blocks; the block scheduler decodes it."""
    from mmdlm.blocks import token_blocks
    from mmdlm.diffusion import masked_diffusion_loss
    from mmdlm.sampling import scheduler_for

    L.seed_everything(0)
    arch = ModelConfig(block_diffusion=True, block_size=4, image_block_rows=2)
    module = LitMDM(config=arch, warmup_steps=2, samples_at_val=2, init_from=tiny_model_dir)
    dm = datamodule(tiny_model_dir, code_shards)
    L.Trainer(max_steps=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=1, val_check_interval=2, default_root_dir=tmp_path,
              enable_checkpointing=False).fit(module, datamodule=dm)
    config = module.model.config
    assert config.block_diffusion and (config.block_size, config.image_block_rows) == (4, 2)
    batch = next(iter(dm.train_dataloader()))
    block = token_blocks(batch.target, batch.pad, batch.image_index, batch.prefix, block_size=4, image_block_rows=2,
                         grid_width=config.image_grid[1])
    assert int(block.max()) > 1
    module.model.eval()
    with torch.no_grad():
        got = module._loss(batch, torch.Generator().manual_seed(4))
        want = module.objective(module.model, batch, generator=torch.Generator().manual_seed(4), block=block)
        plain = masked_diffusion_loss(module.model, batch, module.vocab, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got.loss, want.loss) and not torch.equal(got.loss, plain.loss)
    assert type(scheduler_for(config, module.vocab)).__name__ == "BlockScheduler"
