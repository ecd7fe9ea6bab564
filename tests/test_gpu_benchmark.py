"""The GPU benchmark driver on the CPU: benchmarks/gpu.py (its recipes, schedules, command lists, argument errors
and reports) and the options of benchmarks/train_speed.py it relies on (model sizes, the profiler), and every
stage at toy size (a dry run, DDP included).

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_gpu_benchmark.py

No GPU here: these check the plumbing (commands, files, keys, the schedule's arithmetic), not a GPU's numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu, train_speed

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
    recipe = train_speed.Recipe("r.yaml", {"config": {"n_layer": 4, "n_embd": 128, "n_head": 4, "causal": True},
                                           "compile": True}, {"batch_size": 32}, {})
    same = train_speed.resized(recipe, None, None, None)
    assert same.model == recipe.model and same.data == recipe.data
    big = train_speed.resized(recipe, 256, (24, 1024, 16), False)
    assert big.model == {"config": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "causal": True}, "compile": False}
    assert big.data == {"batch_size": 256} and recipe.data == {"batch_size": 32}  # the original is untouched
    assert recipe.model["config"]["n_layer"] == 4
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
    """A recipe at two toy sizes, profiled: a trace and operator tables per run, profiled steps not timed."""
    out = tmp_path / "ts"
    result = train_speed.main(["--config", "configs/mdm-shapes.yaml", "--size", "1x32x2", "--size", "2x32x2",
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
        "mdm-shapes_1x32_b4.ops.txt", "mdm-shapes_1x32_b4.trace.json.gz",
        "mdm-shapes_2x32_b4.ops.txt", "mdm-shapes_2x32_b4.trace.json.gz"]
    md = (out / "train_speed.md").read_text()
    assert "Where the step goes" in md and "| 2 x 32 |" in md
    with pytest.raises(SystemExit):  # no step left to time
        train_speed.main(["--config", "configs/mdm-shapes.yaml", "--steps", "3", "--warmup", "1", "--profile",
                          str(out), "--profile-steps", "2", "--shapes-sizes", "--out", str(out)])


# ---------------------------------------------------------------------------------------------
# benchmarks/gpu.py


def test_merged_recipe_is_the_overlays_over_the_base(tmp_path: Path) -> None:
    base, over, other = tmp_path / "base.yaml", tmp_path / "over.yaml", tmp_path / "other.yaml"
    base.write_text("trainer: {precision: 32-true, max_steps: 10, callbacks: [{class_path: A}, {class_path: B}]}\n"
                    "model: {class_path: m.Lit, init_args: {lr: 0.1, config: {n_layer: 4, n_embd: 64}}}\n")
    over.write_text("trainer: {precision: bf16-mixed, callbacks: [{class_path: C}]}\n"
                    "model: {init_args: {config: {n_layer: 12}}}\n")
    other.write_text("model: {class_path: m.Other, init_args: {x: 1}}\n")
    recipe = gpu.merged([str(base), str(over)])
    assert recipe["trainer"] == {"precision": "bf16-mixed", "max_steps": 10, "callbacks": [{"class_path": "C"}]}
    assert recipe["model"] == {"class_path": "m.Lit", "init_args": {"lr": 0.1, "config": {"n_layer": 12,
                                                                                           "n_embd": 64}}}
    assert gpu.architecture(recipe) == {"lr": 0.1, "config": {"n_layer": 12, "n_embd": 64}, "n_layer": 12,
                                        "n_embd": 64}
    assert gpu.merged([str(base), str(other)])["model"] == {"class_path": "m.Other", "init_args": {"x": 1}}
    assert gpu.architecture({"model": {"init_args": {"n_layer": 2}}})["n_layer"] == 2  # given one by one


def test_the_recipes_exist_and_the_twin_is_causal() -> None:
    for configs in gpu.RECIPES.values():
        assert all((ROOT / path).is_file() for path in configs), configs
    mdm, ar = (gpu.architecture(gpu.merged([str(ROOT / p) for p in gpu.RECIPES[k]])) for k in ("mdm", "ar"))
    assert not mdm.get("causal", False) and ar["causal"] is True
    assert (mdm["n_layer"], mdm["n_embd"]) == (ar["n_layer"], ar["n_embd"])  # the same backbone


def test_schedule_fits_the_minutes_and_the_checkpoints() -> None:
    plan = gpu.GPU
    steps, every = gpu.schedule(4.0, 0.075, plan)  # 3 minutes of steps after 1 of start-up, at 90%
    assert steps == every * plan.checkpoints and steps <= 3 * 60 * 0.9 / 0.075 < steps + plan.checkpoints
    assert gpu.schedule(0.5, 0.075, plan)[0] == 0  # nothing left after the start-up
    assert gpu.schedule(99.0, 1.0, gpu.DRY_RUN) == (4, 2)  # the dry run's fixed steps


def test_stage_list() -> None:
    assert gpu.stage_list("ddp, data") == ["ddp", "data"]
    for bad in ("data,train", "", " , "):
        with pytest.raises(argparse.ArgumentTypeError, match="comma-separated subset"):
            gpu.stage_list(bad)


def option(command: list[str], name: str) -> str:
    """The value after `name` in a command."""
    return command[command.index(name) + 1]


def configs_of(command: list[str]) -> list[str]:
    return [command[i + 1] for i, a in enumerate(command) if a == "--config"]


def test_list_gives_every_gpu_stage_its_hardware_minutes_and_commands(tmp_path: Path, capsys) -> None:
    """--list on the GPU plan runs nothing (no GPU needed) and writes nothing."""
    out = tmp_path / "out"
    listed = gpu.main(["--out", str(out), "--list", "--train-minutes", "4"])
    assert not out.exists()
    stages = {s["stage"]: s for s in listed["stages"]}
    assert list(stages) == ["data", "throughput", "train-mdm", "train-ar", "sampling", "curve"]  # ddp: CPU only
    assert stages["throughput"]["hardware"] == "1 GPU" and stages["data"]["hardware"] == "CPU cores"
    assert stages["train-mdm"]["minutes"] == 4.0 and stages["throughput"]["minutes"] == gpu.GPU.expected["throughput"]
    assert [c[2] for c in stages["data"]["commands"]] == ["mmdlm.worlds.shapes", "mmdlm.text_tokenizer",
                                                          "vision.patch_tokenizer", "mmdlm.commands.pretokenize",
                                                          "mmdlm.commands.pretokenize"]
    assert option(stages["data"]["commands"][0], "--train") == "20000"
    [mdm], [ar] = stages["train-mdm"]["commands"], stages["train-ar"]["commands"]
    assert configs_of(mdm) == [*gpu.RECIPES["mdm"], str(out / "mdm" / "checkpoints.yaml")]
    assert configs_of(ar) == ["configs/mdm-shapes.yaml", "configs/ar.yaml", "configs/gpu.yaml",
                              str(out / "ar" / "checkpoints.yaml")]
    steps, _ = gpu.schedule(4.0, gpu.GPU.s_per_step, gpu.GPU)  # no throughput result yet: the plan's guess
    assert option(mdm, "--trainer.max_steps") == str(steps) and option(mdm, "--trainer.max_time") == "00:00:04:00"
    assert option(mdm, "--trainer.default_root_dir") == str(out / "mdm")
    assert option(mdm, "--data.train_shards") == "data/shards/shapes-codes/train/*.tar"
    assert option(mdm, "--trainer.limit_val_batches") == "0"
    [throughput] = stages["throughput"]["commands"]
    assert configs_of(throughput) == ["configs/mdm-shapes.yaml+configs/gpu.yaml",
                                      "configs/mdm-shapes.yaml+configs/ar.yaml+configs/gpu.yaml"]
    assert "--compile" in throughput and option(throughput, "--precision") == "bf16-mixed"
    [sampling], [curve] = stages["sampling"]["commands"], stages["curve"]["commands"]
    assert option(sampling, "--ar") == str(out / "ar" / "model") and option(sampling, "--batch-sizes") == "1,8,32"
    assert [curve[i + 1] for i, a in enumerate(curve) if a == "--run"] == [f"mdm={out / 'mdm'}", f"ar={out / 'ar'}"]
    printed = capsys.readouterr().out
    assert "throughput: 1 GPU, ~3.5 min" in printed and "train.py fit --config configs/mdm-shapes.yaml" in printed
    assert f"total: ~{sum(s['minutes'] for s in listed['stages']):g} min" in printed


def test_a_measured_step_time_scales_the_training_run(tmp_path: Path) -> None:
    """The throughput stage's seconds per step, at the recipe's own size and batch, set max_steps (read at 90%)."""
    out = tmp_path / "out"
    bench = gpu.Bench(gpu.GPU, argparse.Namespace(train_minutes=11.0), out, out)
    recipe = gpu.merged(gpu.RECIPES["ar"])
    arch, batch = gpu.architecture(recipe), recipe["data"]["init_args"]["batch_size"]
    run = {"config": gpu.joined("ar"), "device": "cuda", "n_layer": arch["n_layer"],
           "n_embd": arch["n_embd"], "batch_size": batch, "seconds_per_step": {"median": 0.09}}
    other = {**run, "n_layer": arch["n_layer"] + 12, "seconds_per_step": {"median": 0.5}}  # another size
    (out / "results" / "throughput").mkdir(parents=True)
    (out / "results" / "throughput" / "train_speed.json").write_text(json.dumps({"runs": [other, run]}))
    assert gpu.measured_step_seconds(bench, "ar") == 0.09
    assert gpu.measured_step_seconds(bench, "mdm") is None  # only the AR recipe was measured
    ar, mdm = gpu.training(bench, "ar"), gpu.training(bench, "mdm")
    assert ar.measured and ar.s_per_step == pytest.approx(0.1)
    assert (ar.steps, ar.every) == gpu.schedule(11.0, 0.1, gpu.GPU) and ar.steps == 5400
    assert not mdm.measured and mdm.steps == gpu.schedule(11.0, gpu.GPU.s_per_step, gpu.GPU)[0]
    assert option(ar.command, "--model.warmup_steps") == str(min(int(recipe["model"]["init_args"].get(
        "warmup_steps", 100)), 540))
    assert option(ar.command, "--model.ema_decay") == "0.998148"  # 1 - 1 / 540: about the run's last tenth


def test_dry_run_list_has_toy_sizes_ddp_and_its_own_data(tmp_path: Path) -> None:
    work = tmp_path / "work"
    listed = gpu.main(["--dry-run", "--list", "--out", str(tmp_path / "out"), "--work", str(work)])
    stages = {s["stage"]: s["commands"] for s in listed["stages"]}
    assert list(stages) == list(gpu.STAGES)
    assert option(stages["data"][0], "--out") == str(work / "data" / "shapes")
    assert option(stages["data"][0], "--train") == "64"
    [mdm], [ddp] = stages["train-mdm"], stages["ddp"]
    assert option(mdm, "--trainer.max_steps") == "4" and "--trainer.max_time" not in mdm
    assert option(mdm, "--trainer.accelerator") == "cpu" and option(mdm, "--model.config.n_embd") == "32"
    assert option(mdm, "--data.text_tokenizer") == str(work / "data" / "quickstart" / "text_tokenizer")
    assert configs_of(ddp) == list(gpu.RECIPES["mdm"])
    assert (option(ddp, "--trainer.strategy"), option(ddp, "--trainer.devices")) == ("ddp", "2")
    assert option(ddp, "--trainer.default_root_dir") == str(work / "ddp")
    assert not (tmp_path / "out").exists() and not work.exists()


def test_argument_errors(tmp_path: Path, capsys) -> None:
    for argv, message in ((["--stages", "data,train"], "unknown: train"),
                          (["--train-minutes", "0"], "--train-minutes must be > 0"),
                          (["--dry-run", "--stages", ""], "comma-separated subset")):
        with pytest.raises(SystemExit):
            gpu.main(["--out", str(tmp_path / "out"), *argv])
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):  # no GPU here, and neither --dry-run nor --list: refused, nothing written
            gpu.main(["--out", str(tmp_path / "out")])
        assert "no CUDA device here" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failed_stage_is_recorded_and_the_later_ones_still_run(tmp_path: Path) -> None:
    """Sampling without model folders and the curve without checkpoints: both fail, each says why, both reported."""
    out = tmp_path / "out"
    result = gpu.main(["--dry-run", "--stages", "curve,sampling", "--out", str(out)])
    assert [(s["stage"], s["status"]) for s in result["stages"]] == [("sampling", "failed"), ("curve", "failed")]
    sampling, curve = (s["note"] for s in result["stages"])
    assert "no model folder" in sampling and "no checkpoints of mdm, ar" in curve
    assert result["dry_run"] and result["machine"]["device"] == "cpu"
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.log", "gpu.md"]
    md = (out / "gpu.md").read_text()
    assert md.startswith("# GPU benchmark: dry run") and "| sampling | 1 GPU | failed |" in md
    assert "[sampling] failed" in (out / "gpu.log").read_text()


def test_commands_stream_to_the_log_and_a_failure_names_its_exit_status(tmp_path: Path) -> None:
    with open(tmp_path / "log", "w") as log:
        bench = gpu.Bench(gpu.DRY_RUN, argparse.Namespace(train_minutes=None), tmp_path, tmp_path, log)
        assert bench.run([sys.executable, "-c", "print('hello')"], "data") == 0
        with pytest.raises(gpu.StageError, match="exited 3"):
            bench.check([sys.executable, "-c", "import sys; sys.exit(3)"], "data")
    assert "[data] hello" in (tmp_path / "log").read_text()


@pytest.mark.slow  # ~4 min on 2 cores: a dozen processes, each importing torch and Lightning
def test_dry_run_runs_every_stage_end_to_end(tmp_path: Path) -> None:
    """`python -m benchmarks.gpu --dry-run`: data, throughput with profiles, both recipes trained with checkpoints
    and a wall clock, the curve against minutes, the sampling sweep, DDP on 2 CPU processes; the reports."""
    out, work = tmp_path / "out", tmp_path / "work"
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--dry-run", "--out", str(out), "--work",
                          str(work)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "gpu.json").read_text())
    assert [(s["stage"], s["status"]) for s in report["stages"]] == [(s, "ok") for s in gpu.STAGES], \
        report["stages"]
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "gpu.log", "gpu.md", "learning_curve.png",
                                                    "results"]
    md = (out / "gpu.md").read_text()
    for heading in ("Training throughput", "Where the step goes", "Learning curves", "Targets: where each was "
                    "first met", "Sampling speed and quality"):
        assert heading in md
    assert (work / "mdm" / "wallclock.json").is_file()
    assert any(p.name.endswith(".trace.json.gz") for p in (out / "results" / "throughput" / "profile").iterdir())
    curve = json.loads((out / "results" / "curve" / "learning_curve.json").read_text())
    for kind in ("mdm", "ar"):
        points = curve["curves"][kind]
        assert [p["step"] for p in points] == [2, 4] and all(0 < p["minutes"] < 30 for p in points)
    sweep = json.loads((out / "results" / "sampling" / "sampling_speed.json").read_text())
    assert {(r["variant"], r["task"]) for r in sweep["rows"]} == {
        (v, t) for v in ("MDM fast (all)", "AR + KV cache") for t in ("t2i", "vqa")}
    assert (work / "ddp" / "model" / "config.json").is_file()
