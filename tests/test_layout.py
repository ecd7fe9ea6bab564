"""The package layout (issue 16): no package named plain `data` installed, `vision` importing nothing of `mmdlm`,
and the recipes' two command forms (`python -m data.shapes` from the repository root, `python -m
mmdlm.worlds.shapes` anywhere) writing the same shards.

    python -m pytest -q tests/test_layout.py
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import setuptools

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_the_install_holds_mmdlm_and_vision_and_no_data_package() -> None:
    find = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(where=str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert {"mmdlm", "mmdlm.worlds", "vision"} <= set(packages)
    assert not [p for p in packages if p.split(".")[0] not in ("mmdlm", "vision")], packages


def test_vision_imports_nothing_of_mmdlm() -> None:
    for path in sorted((REPO / "vision").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):  # function-level imports included
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "mmdlm"], f"{path.name}:{node.lineno} imports {names}"
    code = ("import sys, vision.images, vision.load, vision.patch_tokenizer, vision.tokenizer, vision.lightning; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mmdlm'))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENV,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def tar_members(folder: Path) -> dict[str, bytes]:
    members = {}
    for shard in sorted(folder.glob("*/*.tar")):
        with tarfile.open(shard) as tar:
            members |= {f"{shard.name}/{m.name}": tar.extractfile(m).read() for m in tar.getmembers()}
    return members


def test_data_shapes_from_the_root_and_mmdlm_worlds_shapes_elsewhere_write_the_same_shards(tmp_path: Path) -> None:
    args = ["--train", "6", "--val", "2", "--seed", "3", "--shard-size", "4", "--quiet"]
    root = subprocess.run([sys.executable, "-m", "data.shapes", "--out", str(tmp_path / "a"), *args],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=300)
    assert root.returncode == 0, root.stderr
    elsewhere = subprocess.run([sys.executable, "-m", "mmdlm.worlds.shapes", "--out", str(tmp_path / "b"), *args],
                               capture_output=True, text=True, cwd=tmp_path, env=ENV | {"PYTHONPATH": str(REPO)},
                               timeout=300)
    assert elsewhere.returncode == 0, elsewhere.stderr
    a, b = tar_members(tmp_path / "a"), tar_members(tmp_path / "b")
    assert len(a) == 2 * (6 + 2) and a == b  # png + json per sample, byte for byte


def test_the_root_recipes_find_data_before_another_installed_data_package(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("raise ImportError('the other data package')\n")
    env = ENV | {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    for recipe, module in (("data.shapes", "mmdlm.worlds.shapes"), ("data.digits", "mmdlm.worlds.digits")):
        helped = subprocess.run([sys.executable, "-m", recipe, "--help"], capture_output=True, text=True, cwd=REPO,
                                env=env, timeout=300)
        assert helped.returncode == 0, helped.stderr
        assert f"python -m {module}" in helped.stdout and "--out" in helped.stdout


def test_every_module_says_what_it_is() -> None:
    """Each source file outside tests/ opens with a docstring (docs/ARCHITECTURE.md points into them)."""
    folders = ("mmdlm", "vision", "data", "benchmarks")
    files = [p for folder in folders for p in (REPO / folder).rglob("*.py")] + [REPO / "train.py"]
    missing = [str(p.relative_to(REPO)) for p in files
               if len((ast.get_docstring(ast.parse(p.read_text(encoding="utf-8"))) or "").split()) < 5]
    assert not missing, f"modules without a docstring of a sentence: {missing}"
