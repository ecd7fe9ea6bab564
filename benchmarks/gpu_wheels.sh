#!/usr/bin/env bash
# The wheels benchmarks/gpu_session.sh installs on the GPU machine, whose Python 3.12 has torch, lightning,
# tensorboard, matplotlib, tokenizers ... but not these, and which reaches no package index. Run it once where PyPI
# is reachable; .whl/ is git-ignored: carry it (run(carry=[".whl"], ...)). The versions are this checkout's .venv's,
# so the GPU machine runs the code as it was tested here. All are pure-Python wheels (~6 MB together).
#
#   bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# mmdlm's own needs the GPU image lacks, and theirs: diffusers -> importlib_metadata -> lazy-importer, zipp;
# jsonargparse[signatures] -> docstring_parser, typeshed_client; webdataset -> braceexpand
PACKAGES="webdataset braceexpand diffusers importlib_metadata lazy-importer zipp jsonargparse docstring_parser
typeshed_client"
# shellcheck disable=SC2086
SPECS=$("$PY" -c 'import sys; from importlib.metadata import version
print(" ".join(f"{p}=={version(p)}" for p in sys.argv[1:]))' $PACKAGES)
mkdir -p .whl
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $SPECS
ls -l .whl
