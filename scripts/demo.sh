#!/usr/bin/env bash
# The main job on the bundled example (a real CNN trained on scikit-learn digits, with 360
# held-out labelled samples): analyze, recommend a plan, apply it, verify it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-demo-out}
rm -rf "$OUT"
mkdir -p "$OUT"
set -x
compressadvise analyze
compressadvise recommend --target ane-a17 --max-size-mb 0.1 --out "$OUT/plan.yaml"
if compressadvise apply --help >/dev/null 2>&1; then
  compressadvise apply --plan "$OUT/plan.yaml" --out "$OUT/compressed"
fi
if compressadvise verify --help >/dev/null 2>&1; then
  compressadvise verify bundled "$OUT/compressed" --samples bundled
fi
