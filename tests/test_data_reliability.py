"""Bad training data through the real entry points: data with nothing usable stops in seconds
with one sentence, text that is not valid Unicode is skipped and counted, a shard pattern that matches nothing
is one sentence, skip counts reach TensorBoard and the end-of-run summaries, and DDP validates with a single
val shard (samples, not shards, shared out between the ranks in equal numbers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from mmdlm.data import NoUsableSamples, ShardLoader, ShardsNotFound, collate_records, record_pipeline
from tests.test_data import write_tar

ROOT = Path(__file__).resolve().parents[1]
SURROGATE = "\ud800"  # a lone surrogate: valid JSON ("\ud800"), not valid Unicode


# --- helpers ----------------------------------------------------------------------------------------


def read_samples(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of a tar shard, in order: (key, {ext: bytes})."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, _, ext = member.name.partition(".")
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return list(samples.items())


def with_meta(members: dict[str, bytes], **changes) -> dict[str, bytes]:
    """A copy of a sample whose json has `changes` applied (json.dumps escapes a lone surrogate as \\ud800)."""
    meta = json.loads(members["json"]) | changes
    return {**members, "json": json.dumps(meta).encode()}


def train_cli(model_dir: str, root: Path, train: str, val: str, *extra: str) -> list[str]:
    """`python train.py fit --config configs/mdm-shapes.yaml` with a tiny model on the given shards."""
    return [sys.executable, "train.py", "fit", "--config", "configs/mdm-shapes.yaml",
            "--data.train_shards", train, "--data.val_shards", val,
            "--data.text_tokenizer", f"{model_dir}/text_tokenizer", "--data.vq", f"{model_dir}/vq",
            "--data.batch_size", "4", "--data.num_workers", "0", "--model.config.n_layer", "1",
            "--model.config.n_embd", "32",
            "--model.compile", "false",  # a few steps: compiling would cost more than it saves
            "--model.config.n_head", "2", "--model.warmup_steps", "2", "--model.samples_at_val", "0",
            "--model.export_dir", str(root / "model"), "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", *extra]


def run(cmd: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)
    return result, time.perf_counter() - start


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# --- item 2: nothing usable -> one sentence, in seconds ------------------------------------------------


@pytest.mark.parametrize("case", ["not_a_tar_resampled", "no_captions_one_pass"])
def test_fit_on_data_with_nothing_usable_stops_with_one_sentence(case, tiny_model_dir, tiny_shards,
                                                                 tmp_path) -> None:
    if case == "not_a_tar_resampled":  # the config's endless resampled stream: stopped by the in-a-row limit
        bad = tmp_path / "bad" / "notes.tar"
        bad.parent.mkdir()
        bad.write_text("this is a text file, not a tar archive\n" * 50)
        extra: tuple[str, ...] = ()
        expected = ["the last 1000 samples read from training shards", "were all unusable", "open 1000"]
    else:  # every sample lacks a caption, one pass per epoch: stopped by the empty pass
        bad = tmp_path / "bad" / "nocaptions.tar"
        samples = read_samples(next((Path(tiny_shards) / "train").glob("*.tar")))
        write_tar(bad, [(key, with_meta(m, captions=[])) for key, m in samples])
        extra = ("--data.resampled", "false")
        expected = ["a full pass over", "gave no batch", f"caption {len(samples)}"]
    result, seconds = run(train_cli(tiny_model_dir, tmp_path / "run", str(bad), f"{tiny_shards}/val/*.tar",
                                    "--trainer.max_steps", "5", *extra), timeout=240)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert str(bad) in errors[0] and all(part in errors[0] for part in expected), errors[0]
    assert seconds < 120  # it used to spin for ever (and ignore SIGTERM)


def test_in_a_row_limit_from_dataloader_workers_keeps_the_sentence(tmp_path) -> None:
    bad = tmp_path / "notes.tar"
    bad.write_text("not a tar")
    pipeline = record_pipeline([str(bad)], resampled=True)
    pipeline.bad_samples.max_bad_in_a_row = 50
    loader = ShardLoader(pipeline, batch_size=2, num_workers=2, collate_fn=collate_records)
    with pytest.raises(NoUsableSamples) as caught:
        next(iter(loader))
    message = str(caught.value)
    assert message.startswith("the last 50 samples read from the shards were all unusable")
    assert "\n" not in message


# --- item 3: text that is not valid Unicode is a bad sample; item 7: counts logged and printed --------------


def test_captions_that_are_not_valid_unicode_are_skipped_counted_and_the_rest_trained_on(
        tiny_model_dir, tiny_shards, tmp_path) -> None:
    samples = read_samples(next((Path(tiny_shards) / "train").glob("*.tar")))
    bad_keys = {key for i, (key, _) in enumerate(samples) if i % 6 == 1}
    rewritten = []
    for i, (key, members) in enumerate(samples):
        if key in bad_keys and i % 12 == 1:  # a caption with a lone surrogate
            members = with_meta(members, captions=[f"a red {SURROGATE}circle"])
        elif key in bad_keys:  # a question with one (captions fine)
            qa = json.loads(members["json"])["qa"]
            members = with_meta(members, qa=[{**qa[0], "question": f"what {SURROGATE}?"}, *qa[1:]])
        rewritten.append((key, members))
    shard = write_tar(tmp_path / "shards" / "unicode-000000.tar", rewritten)
    good = len(samples) - len(bad_keys)
    assert bad_keys and good > 0

    result, _ = run(train_cli(tiny_model_dir, tmp_path / "run", str(shard), f"{tiny_shards}/val/*.tar",
                              "--data.resampled", "false", "--trainer.max_steps", "-1", "--trainer.max_epochs", "1",
                              "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "1"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = [line for line in result.stdout.splitlines() if line.startswith("[data]")]
    assert len(summary) == 1, result.stdout[-2000:]
    # every good sample was used in the one epoch, every bad one skipped and counted as "text"
    assert f"train: {good} samples used, {len(bad_keys)} skipped: text {len(bad_keys)}" in summary[0], summary
    assert "not valid Unicode" in result.stderr  # the (rate-limited) warnings say why

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "run").rglob("events.out.tfevents*")).parent))
    events.Reload()
    logged = events.Scalars("data/skipped_text")
    assert logged and logged[-1].value == len(bad_keys)
    assert events.Scalars("data/skipped")[-1].value == len(bad_keys)


def test_tokenizer_names_text_that_is_not_valid_unicode(tiny_model_dir) -> None:
    from mmdlm.errors import UserError
    from mmdlm.text_tokenizer import load_text_tokenizer

    tok = load_text_tokenizer(f"{tiny_model_dir}/text_tokenizer")
    with pytest.raises(UserError, match="not valid Unicode"):
        tok.encode(f"a red {SURROGATE}circle")
    assert tok.decode(tok.encode("a red circle")) == "a red circle"


# --- item 6: a shard pattern that matches nothing ---------------------------------------------------


@pytest.mark.parametrize("which", ["train", "val"])
def test_fit_with_a_shard_pattern_that_matches_nothing_is_one_sentence(which, tiny_model_dir, tiny_shards,
                                                                       tmp_path) -> None:
    missing = str(tmp_path / "nowhere" / "*.tar")
    train, val = f"{tiny_shards}/train/*.tar", f"{tiny_shards}/val/*.tar"
    train, val = (missing, val) if which == "train" else (train, missing)
    result, _ = run(train_cli(tiny_model_dir, tmp_path / "run", train, val, "--trainer.max_steps", "2"), timeout=180)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result.stderr) == [f"error: shard pattern {missing!r} matches no files"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    with pytest.raises(FileNotFoundError):  # still a FileNotFoundError for code that catches those
        raise ShardsNotFound("x")


# --- item 7: pretokenize prints its skip counts -----------------------------------------------------


def test_pretokenize_prints_skips_by_reason_and_refuses_shards_with_nothing_usable(tiny_model_dir, tiny_shards,
                                                                                   tmp_path) -> None:
    samples = read_samples(next((Path(tiny_shards) / "val").glob("*.tar")))[:5]
    broken = [*samples[:3], ("broken", {**samples[3][1], "png": b"not a png"}),
              ("imageless", {"json": samples[4][1]["json"]})]
    shard = write_tar(tmp_path / "in" / "a.tar", broken)
    cmd = [sys.executable, "-m", "mmdlm.commands.pretokenize", "--vq", f"{tiny_model_dir}/vq",
           "--out", str(tmp_path / "out")]
    result, _ = run([*cmd, "--shards", str(shard)], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 samples in 1 shards" in result.stdout and "2 skipped: image 1, no_image 1" in result.stdout
    assert json.loads((tmp_path / "out" / "DONE").read_text())["skipped"] == 2

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "j.tar").write_text("not a tar")
    for pattern, message in [(str(tmp_path / "junk" / "*.tar"), "could be pre-tokenized"),
                             (str(tmp_path / "nowhere" / "*.tar"), "matches no files")]:
        result, _ = run([*cmd, "--shards", pattern], timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert len(error_lines(result.stderr)) == 1 and message in result.stderr and pattern in result.stderr


# --- item 9: DDP with a single val shard ------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_val_shards(tmp_path_factory) -> str:
    """Shapes shards whose val split is a single shard of an odd number of samples (25)."""
    from mmdlm.worlds.shapes import ShapesConfig, write_shapes

    root = tmp_path_factory.mktemp("odd_val")
    write_shapes(root, ShapesConfig(train=64, val=25, seed=2, shard_size=32), progress=False)
    assert len(list((root / "val").glob("*.tar"))) == 1
    return str(root)


def test_validation_samples_are_shared_out_in_equal_numbers(odd_val_shards, monkeypatch) -> None:
    keys: dict[int, list[str]] = {}
    for rank in (0, 1):  # webdataset reads the rank from the environment first, as under torchrun
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        pipeline = record_pipeline(f"{odd_val_shards}/val/*.tar", load_images=False, split="samples")
        keys[rank] = [r["__key__"] for r in pipeline]
    assert len(keys[0]) == len(keys[1]) == 13  # ceil(25 / 2): rank 1 repeats one of its samples
    assert len(set(keys[0]) | set(keys[1])) == 25 and not set(keys[0]) & set(keys[1])


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_validates_with_a_single_val_shard(tiny_model_dir, odd_val_shards,
                                                                    tmp_path) -> None:
    result, _ = run(train_cli(tiny_model_dir, tmp_path / "ddp", f"{odd_val_shards}/train/*.tar",
                                    f"{odd_val_shards}/val/*.tar", "--trainer.max_steps", "4",
                                    "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1.0",
                                    "--trainer.strategy", "ddp", "--trainer.devices", "2",
                                    "--trainer.accelerator", "cpu"), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "ddp" / "model" / "config.json").is_file()
    summaries = sorted(line for line in result.stdout.splitlines() if line.startswith("[data"))
    assert [line.split("]")[0] for line in summaries] == ["[data, rank 0", "[data, rank 1"], result.stdout
    # both ranks finished fit (a hang would hit the timeout) and validated on as many samples: 25 = 13 + 12 + 1 repeat
    assert summaries[0].split("val: ")[1] == summaries[1].split("val: ")[1]
