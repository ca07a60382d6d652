#!/usr/bin/env bash
# Create .venv and install everything: torch 2.13.0 (CPU) first, then the rest.
# Installing torch first matters: a bare `torch` requirement resolved by another tool can pull a
# multi-GB CUDA build. numpy stays below 2.4 (ct.convert fails with numpy 2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[compress,dev]"
