#!/usr/bin/env bash
# Install everything from scratch (idempotent) and run the whole test suite, then check the docs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
# Docs: the generated pages must match the code and knowledge base (no drift), and the site must
# build with --strict (a broken link or anchor, or a page missing from the nav, fails).
python -m compressadvise.ui.docsgen --check
# (Not --quiet: mkdocs then stops counting warnings and --strict passes broken links.)
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
NO_MKDOCS_2_WARNING=1 mkdocs build --strict -d "$site/html" >"$site/log" 2>&1 || { cat "$site/log"; exit 1; }
echo "docs: generated pages current, site builds with --strict"
