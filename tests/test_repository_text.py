"""The repository's text describes the project as it is: no Python, YAML, markdown, shell or build file names
the work periods it was written in or the tracker numbers of its tasks (see WORDS). The files checked are the
ones git tracks plus the untracked ones it does not ignore (so not .venv/, runs/, data/shards/ ...); without
git, the tree is walked, skipping those folders.

    python -m pytest -q tests/test_repository_text.py
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".yaml", ".yml", ".md", ".sh", ".toml"}
NAMES = {"Makefile"}  # checked whatever their suffix, as is every file under FOLDERS
FOLDERS = {".ci"}
# what a walk without git skips: .gitignore's folders, and git's own
SKIPPED = {".git", ".venv", "runs", "shards", "lightning_logs", "__pycache__", ".pytest_cache", ".ruff_cache",
           "build", "dist", ".whl", ".gl"}
# the words, case-insensitive, built from pieces so that this file does not hold them itself
WORDS = ("ses" + "sion", "iss" + r"ue ?#?[0-9]", r"\b" + "lea" + "se")
PATTERN = re.compile("|".join(WORDS), re.IGNORECASE)


def checked(path: str) -> bool:
    parts = Path(path).parts
    return Path(path).suffix in SUFFIXES or parts[-1] in NAMES or (len(parts) > 1 and parts[0] in FOLDERS)


def repository_files() -> list[str]:
    """Paths relative to the root: git's tracked and untracked-not-ignored files, else a walk of the tree."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode()
        files = [p for p in listed.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIPPED and not d.endswith(".egg-info")]
            files += [str((Path(folder) / n).relative_to(ROOT)) for n in names]
    return sorted(p for p in set(files) if checked(p) and (ROOT / p).is_file())  # a deleted file: not there


def offending_lines(paths: list[str]) -> list[str]:
    """`path:line: text` of every line PATTERN matches."""
    found = []
    for path in paths:
        text = (ROOT / path).read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if PATTERN.search(line):
                found.append(f"{path}:{number}: {line.strip()[:160]}")
    return found


def test_the_pattern_finds_each_word_and_spares_its_neighbours() -> None:
    for line in ("a Ses" + "sion log", "see iss" + "ue 21", "iss" + "ue #7", "iss" + "ue12", "one lea" + "se"):
        assert PATTERN.search(line), line
    for line in ("the issues list", "a release", "please", "an issue with the cache", "sessile"):
        assert not PATTERN.search(line), line


def test_the_files_checked_are_the_repository_s_own() -> None:
    files = repository_files()
    assert "tests/test_repository_text.py" in files and "README.md" in files and "Makefile" in files
    assert any(p.startswith("configs/") and p.endswith(".yaml") for p in files)
    assert not any(p.startswith((".venv/", ".git/", "runs/", "data/shards/")) for p in files)
    assert not offending_lines(["tests/test_repository_text.py"])  # its own words are built from pieces


def test_no_file_names_the_words() -> None:
    found = offending_lines(repository_files())
    shown = "\n".join(found[:200]) + (f"\n... and {len(found) - 200} more" if len(found) > 200 else "")
    assert not found, f"{len(found)} lines name a word of WORDS (describe what the code does instead):\n{shown}"
