"""The `mmdlm` command (mmdlm/commands): its help lists the subcommands, each subcommand's `--help` is its own,
an unknown subcommand is one sentence and exit 2, and `mmdlm vqa` / `mmdlm train` behave exactly as
`python -m mmdlm.commands.vqa` / `python train.py` (same output, errors and exit statuses) on the tiny model.

    OMP_NUM_THREADS=1 python -m pytest -q tests/test_cli.py
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

# train imports Lightning here, not inside a test: its log handler keeps the stderr of the moment, and a test's
# captured stderr is closed after it
import train
from mmdlm import commands as cli
from mmdlm.commands import train as train_cmd
from mmdlm.commands import vqa

REPO = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["train", "vqa", "generate", "evaluate", "export", "demo", "quickstart",  # the documented list
               "caption", "infill", "pretokenize"]  # the sampler's other tasks, and the data step
CONSOLE_SCRIPT = Path(sys.executable).parent / "mmdlm"  # what `pip install -e .` writes beside the venv's python
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, cwd=cwd, env=ENV, timeout=120)


def assert_lists_subcommands(text: str) -> None:
    listed = {line.split()[0] for line in text.split("subcommands:\n")[1].split("\n\n")[0].splitlines()
              if line.startswith("  ") and not line.startswith("   ")}
    assert listed == set(SUBCOMMANDS), text
    assert "Visual question answering" in text and "Lightning CLI" in text  # each module's docstring summary


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from mmdlm.worlds.shapes import render, sample_scene

    path = tmp_path_factory.mktemp("scene") / "scene.png"
    render(sample_scene(random.Random(3), 2, 2), image_size=32).save(path)
    return path


# ---- the top level ---------------------------------------------------------------------------------------
def test_help_lists_every_subcommand_with_its_summary() -> None:
    helped = run(sys.executable, "-m", "mmdlm", "--help")
    assert helped.returncode == 0 and helped.stderr == ""
    assert helped.stdout.startswith("usage: mmdlm SUBCOMMAND")
    assert_lists_subcommands(helped.stdout)
    bare = run(sys.executable, "-m", "mmdlm.commands")  # no subcommand: the same help, as a usage error
    assert bare.returncode == 2 and bare.stdout == "" and bare.stderr == helped.stdout


@pytest.mark.skipif(not CONSOLE_SCRIPT.is_file(), reason="the `mmdlm` script is not installed: pip install -e .")
def test_installed_console_script(tmp_path: Path) -> None:
    helped = run(str(CONSOLE_SCRIPT), "--help", cwd=tmp_path)  # works from any directory
    assert helped.returncode == 0
    assert_lists_subcommands(helped.stdout)
    unknown = run(str(CONSOLE_SCRIPT), "trian", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr.count("\n") == 1 and "'trian' is not a subcommand (did you mean 'train'?)" in unknown.stderr


@pytest.mark.parametrize("args, hint", [(["nope"], ""), (["vq"], " (did you mean 'vqa'?)"),
                                         (["--model", "x"], " (options go after the subcommand)"),
                                         (["help", "nope"], "")])
def test_an_unknown_subcommand_is_one_sentence_and_exit_2(args: list[str], hint: str, capsys) -> None:
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    name = args[1] if args[0] == "help" else args[0]
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"mmdlm: error: {name!r} is not a subcommand{hint}; the subcommands are ")
    assert all(sub in captured.err for sub in SUBCOMMANDS)


# ---- each subcommand's own help ----------------------------------------------------------------------------
@pytest.mark.parametrize("sub, option", [("train", "{fit,validate,test,predict}"), ("vqa", "--questions"),
                                         ("generate", "--inpaint"), ("evaluate", "--shards"), ("export", "--no-ema"),
                                         ("demo", "--allow-host"), ("quickstart", "--ar-steps")])
def test_each_subcommand_help_is_its_own(sub: str, option: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([sub, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith(f"usage: mmdlm {sub} ") and option in out, out[:2000]


def test_help_subcommand_is_its_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["help", "export"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: mmdlm export ")


def test_train_fit_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "fit", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("usage: mmdlm train [options] fit ")
    assert "--trainer.max_steps" in out and "--ckpt_path" in out and "--model CONFIG" in out


# ---- the subcommands are the old entry points ---------------------------------------------------------------
def test_train_keeps_the_one_sentence_errors_and_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    """`mmdlm train fit` runs train.py's CLI: a missing tokenizer folder is one sentence, exit 2, no training."""
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "no-tokenizer"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "fit", "--config", str(REPO / "configs" / "mdm-shapes.yaml"),
                  "--data.text_tokenizer", str(missing), "--data.train_shards", str(tmp_path / "*.tar"),
                  "--trainer.default_root_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"error: text tokenizer path {str(missing)!r} does not exist"
    assert not (tmp_path / "run").exists()


def test_train_py_is_the_same_cli() -> None:
    assert train.main is train_cmd.main


def test_vqa_gives_what_python_m_mmdlm_vqa_gives(tiny_model_dir: str, scene: Path, tmp_path: Path, capsys) -> None:
    cases = [
        ["--image", str(scene), "--question", "what color is the circle?"],  # an answer (or exit 4: none)
        ["--image", str(tmp_path / "nope.png"), "--question", "what?"],  # exit 2, one sentence
    ]
    for case in cases:
        args = ["--model", tiny_model_dir, "--device", "cpu", *case]
        expected = vqa.main(args), capsys.readouterr()
        got = cli.main(["vqa", *args]), capsys.readouterr()
        assert got == expected, (case, got, expected)
    assert expected[0] == vqa.EXIT_USAGE
    assert expected[1].err.strip() == f"error: image '{tmp_path / 'nope.png'}' does not exist"
    for main in (vqa.main, lambda argv: cli.main(["vqa", *argv])):  # argparse's usage errors: exit 2 from both
        with pytest.raises(SystemExit) as exit_info:
            main(["--model", tiny_model_dir, "--image", "x.png"])
        assert exit_info.value.code == 2 and "--image needs --question" in capsys.readouterr().err


def test_vqa_process_matches_python_m(tiny_model_dir: str, scene: Path) -> None:
    """The real process: the installed `mmdlm` (else `python -m mmdlm.commands`) vs `python -m mmdlm.commands.vqa`."""
    mmdlm = [str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.is_file() else [sys.executable, "-m", "mmdlm.commands"]
    args = ["--model", tiny_model_dir, "--device", "cpu", "--image", str(scene), "--question", "what shape?"]
    old = run(sys.executable, "-m", "mmdlm.commands.vqa", *args)
    new = run(*mmdlm, "vqa", *args)
    assert old.returncode in (vqa.EXIT_OK, vqa.EXIT_NO_ANSWER), old.stderr[-2000:]
    assert (new.returncode, new.stdout, new.stderr) == (old.returncode, old.stdout, old.stderr)


BASE = "mdm-shapes.yaml"
EDITS = [BASE, "edits.yaml"]


@pytest.mark.parametrize("configs", [
    [BASE], ["grpo-shapes.yaml"], ["vq-shapes.yaml"], ["mdm-from-hf.yaml"],  # the bases
    ["mdm-from-hf.yaml", "lora.yaml"],  # a pretrained LM, LoRA
    [BASE, "ar.yaml"], [BASE, "gpu.yaml"], [BASE, "ar.yaml", "gpu.yaml"],  # the AR twin, one GPU
    [BASE, "block.yaml"], [BASE, "block.yaml", "gpu.yaml"],  # block diffusion
    [BASE, "lora.yaml"],  # LoRA fine-tuning
    EDITS, [*EDITS, "ar.yaml"], [*EDITS, "edits-wc.yaml"], [*EDITS, "edits-wc.yaml", "ar.yaml"],  # editing stages
    [*EDITS, "edits-wc.yaml", "edits-pairs.yaml"], [*EDITS, "edits-wc.yaml", "edits-pairs.yaml", "ar.yaml"],
])
def test_the_shipped_configs_parse(configs: list[str], capsys) -> None:
    """Each training recipe (a base and its overlays) is a valid LightningCLI config: `--print_config`
    resolves it without instantiating anything; the overlay's values win."""
    args = [a for name in configs for a in ("--config", str(REPO / "configs" / name))]
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: " in printed and "max_steps: " in printed
    if configs[-1].endswith("-wc.yaml"):
        assert "what-changed-codes" in printed and "max_steps: 4000" in printed
    if configs[-1].endswith("-pairs.yaml"):  # stage 4: no shapes shards, and it starts from stage 3's folder
        assert "what-changed-codes" in printed and "shapes-codes" not in printed and "max_steps: 2500" in printed
        assert "-edits-wc/model" in printed
    if configs[-1] == "ar.yaml":  # the AR twin: causal, whatever stage it follows
        assert "causal: true" in printed and "ar_rows: 0.0" in printed and "task_balanced: false" in printed
    if "gpu.yaml" in configs:
        assert "n_layer: 12" in printed and "precision: bf16-mixed" in printed
    if "lora.yaml" in configs:
        assert "lora_rank: 8" in printed and "- attn.qkv" in printed and "lr: 0.001" in printed
    if "block.yaml" in configs or "mdm-from-hf.yaml" in configs:
        assert "block_diffusion: true" in printed and "block_size: 8" in printed and "image_block_rows: 4" in printed
    if configs[0] == "mdm-from-hf.yaml":  # the tokenizer is the init_from folder's; a large backbone's memory savers
        assert "text_tokenizer: null" in printed and "activation_checkpointing: true" in printed


def test_every_config_is_a_base_or_an_overlay_and_every_base_is_tested() -> None:
    tested = {name for case in test_the_shipped_configs_parse.pytestmark[0].args[1] for name in case}
    assert tested == {p.name for p in (REPO / "configs").glob("*.yaml")}
