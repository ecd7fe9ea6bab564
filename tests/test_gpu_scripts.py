"""The GPU session's scripts (issue 21) on the CPU: benchmarks/gpu_session.py and the options it relies on in
benchmarks/train_speed.py (model sizes, the profiler), and the whole session at toy size (a dry run, DDP included).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_gpu_scripts.py

No GPU here: these check the plumbing (files, keys, the budget's arithmetic), not a GPU's numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_session, train_speed

ROOT = Path(__file__).resolve().parents[1]


def test_model_size_parses_layers_width_and_heads() -> None:
    assert train_speed.model_size("12x768") == (12, 768, 12)
    assert train_speed.model_size("24X1024") == (24, 1024, 16)
    assert train_speed.model_size("1x32x2") == (1, 32, 2)
    assert train_speed.model_size("1x32") == (1, 32, 1)  # at least one head
    for bad in ("12", "12x", "ax768", "0x768", "2x64x3", "2x30x10"):  # 64 / 3 heads; head dimension 3 (odd)
        with pytest.raises(argparse.ArgumentTypeError):
            train_speed.model_size(bad)


def test_resized_replaces_only_what_is_given() -> None:
    recipe = train_speed.Recipe("r.yaml", {"n_layer": 4, "n_embd": 128, "n_head": 4, "compile": True},
                                {"batch_size": 32}, {})
    same = train_speed.resized(recipe, None, None, None)
    assert same.model == recipe.model and same.data == recipe.data
    big = train_speed.resized(recipe, 256, (24, 1024, 16), False)
    assert big.model == {"n_layer": 24, "n_embd": 1024, "n_head": 16, "compile": False}
    assert big.data == {"batch_size": 256} and recipe.data == {"batch_size": 32}  # the original is untouched
    assert train_speed.run_name(big) == "r_24x1024_b256"


def test_kernel_kinds() -> None:
    kind = train_speed.kernel_kind
    assert kind("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64") == "matmul"
    assert kind("nvjet_hsh_128x256_64x4_2x1_v_bz_coopB_NTN") == "matmul"
    assert kind("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64>>") == "attention"
    assert kind("fmha_cutlassF_bf16_aligned_64x64_rf_sm80") == "attention"  # attention before cutlass matmuls
    assert kind("triton_per_fused__to_copy_add_mean_mul_pow_rsqrt_0") == "compiled (triton)"
    assert kind("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<AdamW>") == "optimizer and EMA"
    assert kind("Memcpy HtoD (Pageable -> Device)") == "copies and fills"
    assert kind("void at::native::vectorized_elementwise_kernel<4, silu>") == "other elementwise"


def test_train_speed_sizes_and_profile_on_cpu(tmp_path: Path) -> None:
    """The GPU recipes at two toy sizes, profiled: a trace and operator tables per run, profiled steps not timed."""
    out = tmp_path / "ts"
    result = train_speed.main(["--config", "configs/mdm-shapes-gpu.yaml", "--size", "1x32x2", "--size", "2x32x2",
                               "--device", "cpu", "--precision", "32-true", "--no-compile", "--batch-size", "4",
                               "--steps", "4", "--warmup", "1", "--profile", str(out / "profile"),
                               "--profile-steps", "2", "--shapes-sizes", "--out", str(out), "--quiet"])
    assert [(r["n_layer"], r["n_embd"], r["n_head"]) for r in result["runs"]] == [(1, 32, 2), (2, 32, 2)]
    for run in result["runs"]:
        assert run["compile"] is False and run["steps_timed"] == 1  # 4 steps - 1 warm-up - 2 profiled
        profile = run["profile"]
        assert profile["steps"] == 2 and profile["wall_ms_per_step"] > 0 and profile["top_ops"]
        assert "gpu_busy_fraction" not in profile  # no CUDA activity on a CPU
        assert Path(profile["trace"]).stat().st_size > 0 and Path(profile["trace"]).name.endswith(".trace.json.gz")
        assert "self_cpu_time_total" in Path(profile["table"]).read_text()
    assert sorted(p.name for p in (out / "profile").iterdir()) == [
        "mdm-shapes-gpu_1x32_b4.ops.txt", "mdm-shapes-gpu_1x32_b4.trace.json.gz",
        "mdm-shapes-gpu_2x32_b4.ops.txt", "mdm-shapes-gpu_2x32_b4.trace.json.gz"]
    md = (out / "train_speed.md").read_text()
    assert "Where the step goes" in md and "| 2 x 32 |" in md
    with pytest.raises(SystemExit):  # no step left to time
        train_speed.main(["--config", "configs/mdm-shapes-gpu.yaml", "--steps", "3", "--warmup", "1", "--profile",
                          str(out), "--profile-steps", "2", "--shapes-sizes", "--out", str(out)])


def test_schedule_fits_the_budget_and_the_checkpoints() -> None:
    plan = gpu_session.LEASE
    steps, every = gpu_session.schedule(4.0, 0.075, plan)  # 3 minutes of steps after 1 of overhead, at 90%
    assert steps == every * plan.checkpoints and steps <= 3 * 60 * 0.9 / 0.075 < steps + plan.checkpoints
    assert gpu_session.schedule(0.5, 0.075, plan)[0] == 0  # nothing left after the overhead
    assert gpu_session.schedule(99.0, 1.0, gpu_session.DRY_RUN) == (4, 2)  # the dry run's fixed steps


def test_training_minutes_share_what_the_budget_leaves() -> None:
    args = argparse.Namespace(train_minutes=None, budget_minutes=9.0)
    session = gpu_session.Session(gpu_session.LEASE, args, Path("."), Path("."), log=None)
    chosen = ["data", "train-mdm", "train-ar", "curve", "sampling"]
    minutes = gpu_session.training_minutes(session, chosen, "train-mdm")
    assert minutes == pytest.approx((9.0 - session.elapsed_minutes() - 2.0 - 1.5) / 2, abs=0.01)
    assert gpu_session.training_minutes(session, chosen, "train-ar") == minutes  # the AR run gets the same
    args.train_minutes = 15.0
    assert gpu_session.training_minutes(session, chosen, "train-mdm") == 15.0


def test_a_stage_still_running_when_the_budget_ends_is_killed(tmp_path: Path) -> None:
    args = argparse.Namespace(train_minutes=None, budget_minutes=0.01)  # 0.6 s
    with open(tmp_path / "log", "w") as log:
        session = gpu_session.Session(gpu_session.LEASE, args, tmp_path, tmp_path, log=log)
        assert session.run([sys.executable, "-c", "print('hello')"]) == 0
        started = time.perf_counter()
        with pytest.raises(gpu_session.StageError, match="budget ran out"):
            session.run([sys.executable, "-c", "import time; time.sleep(60)"])
        assert time.perf_counter() - started < 30
    assert "hello" in (tmp_path / "log").read_text()


def test_stage_list(tmp_path: Path) -> None:
    assert gpu_session.stage_list("ddp, data") == ["ddp", "data"]
    with pytest.raises(argparse.ArgumentTypeError):
        gpu_session.stage_list("data,train")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):  # no GPU here, and no --dry-run: refused before anything is written
            gpu_session.main(["--out", str(tmp_path / "out")])
        assert not (tmp_path / "out").exists()


@pytest.mark.slow  # ~4 min on 2 cores: a dozen processes, each importing torch and Lightning
def test_dry_run_runs_every_stage_end_to_end(tmp_path: Path) -> None:
    """`gpu_session.sh --dry-run`: data, throughput with profiles, both recipes trained with checkpoints and a
    wall clock, the curve against minutes, the sampling sweep, DDP on 2 CPU processes; the outputs a lease
    returns (at most 8 files)."""
    out, work = tmp_path / "out", tmp_path / "work"
    run = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--dry-run", "--out", str(out), "--work", str(work)],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    session = json.loads((out / "session.json").read_text())
    assert [(s["stage"], s["status"]) for s in session["stages"]] == [(s, "ok") for s in gpu_session.STAGES], \
        session["stages"]
    assert sorted(p.name for p in out.iterdir()) == ["learning_curve.png", "results.tar.gz", "session.json",
                                                    "session.log", "session.md"]
    md = (out / "session.md").read_text()
    for heading in ("Training throughput", "Where the step goes", "Learning curves", "Targets (issues 20 and 21)",
                    "Sampling speed and quality"):
        assert heading in md
    with tarfile.open(out / "results.tar.gz") as tar:
        names = tar.getnames()
    assert "runs/mdm/wallclock.json" in names and any(n.endswith(".trace.json.gz") for n in names)
    curve = json.loads((work / "results" / "curve" / "learning_curve.json").read_text())
    for kind in ("mdm", "ar"):
        points = curve["curves"][kind]
        assert [p["step"] for p in points] == [2, 4] and all(0 < p["minutes"] < 30 for p in points)
    sweep = json.loads((work / "results" / "sampling" / "sampling_speed.json").read_text())
    assert {(r["variant"], r["task"]) for r in sweep["rows"]} == {
        (v, t) for v in ("MDM fast (all)", "AR + KV cache") for t in ("t2i", "vqa")}
    assert (work / "ddp" / "model" / "config.json").is_file()
