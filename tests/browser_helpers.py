"""Headless Chromium for the report's page tests (test_report.py, test_report_whatif.py)."""
from __future__ import annotations

import os
import shutil
from typing import Any

import pytest

# Networking off: the page must never reach out (the tests also record every request it makes).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--host-resolver-rules=MAP * ~NOTFOUND"]


def _browser_or_skip() -> tuple[Any, str]:
    """Playwright driving the distribution's Chromium; skipped on a developer machine without
    it, but CI must run these tests (scripts/setup.sh installs chromium)."""
    exe = os.environ.get("COMPRESSADVISE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = "playwright is not installed" if sync_playwright is None else None
    missing = missing or (None if exe else "no chromium on PATH (apt-get install chromium)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    return sync_playwright, exe
