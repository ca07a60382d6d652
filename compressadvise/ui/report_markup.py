"""Small HTML pieces the report's sections share: escaping, basis badges, formatted figures."""
from __future__ import annotations

import html
from typing import Any

from compressadvise.ui.render import human_quantity


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _badge(basis: str) -> str:
    kind = "measured" if basis.startswith("measured") else "estimate" if basis.startswith("estimate") else "missing"
    return f'<span class="badge {kind}">{_e(basis)}</span>'


def _qty(value: float | None, unit: str) -> str:
    """A figure in its unit, scaled to read well ('79.25 KB', '3.25 µs'); '—' when missing."""
    if value is None:
        return "—"
    if abs(value) >= 1e8 and unit not in ("B", "KB", "MB", "GB", "ms"):
        return "identical" if value > 0 else "−∞"  # an infinite SNR, stored finite for JSON
    return _e(human_quantity(value, unit))


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
