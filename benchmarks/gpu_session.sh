#!/usr/bin/env bash
# One GPU lease, every measurement of issue 21: the shell around benchmarks/gpu_session.py (its --help says what
# each stage does and how long it takes). It picks the Python (.venv's where there is one, else python3: the GPU
# image's, with torch and lightning), installs from .whl/ the packages that Python lacks (nothing is downloaded:
# benchmarks/gpu_wheels.sh fetches them beforehand where PyPI is reachable), puts the checkout on PYTHONPATH
# (mmdlm is not installed on the GPU machine) and runs the session with the arguments given.
#
#   bash benchmarks/gpu_session.sh --out "$OUT" --stages data,train-mdm,train-ar,curve,sampling --budget-minutes 9
#   bash benchmarks/gpu_session.sh --out "$OUT" --stages throughput --budget-minutes 4
#   flock /tmp/mmdlm-cpu.lock bash benchmarks/gpu_session.sh --dry-run --out /tmp/gpu-session   # CPU, toy sizes
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
NEEDED="webdataset,braceexpand,diffusers,jsonargparse,docstring_parser,typeshed_client"
if ! "$PY" -c "import $NEEDED" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_session.sh: $PY lacks some of $NEEDED and there is no .whl/ to install them from: run" \
         "'bash benchmarks/gpu_wheels.sh' where PyPI is reachable and carry .whl" >&2
    exit 2
  fi
  SITE=/tmp/gpu-session-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$PY" -m benchmarks.gpu_session "$@"
