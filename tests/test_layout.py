"""The package layout: no package named plain `data` installed, `vision` importing nothing of `mmdlm`,
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


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, function-level ones included; not those under `if TYPE_CHECKING:`,
    which never run."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph(packages: tuple[str, ...] = ("mmdlm", "vision")) -> dict[str, set[str]]:
    """module -> the project modules it imports when it runs (function-level imports included).
    `from pkg import name` counts as importing `pkg.name` when that is a module, else `pkg`."""
    paths = {module_name(p): p for pkg in packages for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in paths}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                for a in node.names:
                    target = f"{base}.{a.name}"
                    edges.add(target if target in paths else base)
        graph[name] = {e for e in edges if e in paths and e != name}
    return graph


def is_command(module: str) -> bool:
    """A command module: the `mmdlm` dispatcher and its subcommands (`mmdlm.commands`), or `python -m mmdlm`."""
    return module in ("mmdlm.commands", "mmdlm.__main__") or module.startswith("mmdlm.commands.")


def test_no_library_module_imports_a_command_module() -> None:
    graph = import_graph()
    bad = sorted(f"{m} -> {t}" for m, targets in graph.items() if not is_command(m) for t in targets if is_command(t))
    assert not bad, f"library modules import command modules: {bad}"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_there_is_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_benchmarks_import_library_modules_only() -> None:
    """A benchmark script imports mmdlm's library (never a command module) and no other benchmark script."""
    bad = []
    for path in sorted((REPO / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad += [f"{path.name}:{node.lineno} {n}" for n in names
                    if is_command(n) or (n.split(".")[0] == "benchmarks" and n != "benchmarks")
                    or (isinstance(node, ast.ImportFrom) and node.level)]
    assert not bad, f"benchmarks importing commands or each other: {bad}"
