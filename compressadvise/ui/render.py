"""Shared terminal rendering: Rich consoles, share bars, JSON output."""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.errors import MarkupError
from rich.table import Table
from rich.text import Text

# stdout that is not a terminal (a pipe, a CI log, a file) has no width: tables print every
# column in full and prose is not wrapped, whatever COLUMNS says (COMPRESSADVISE_WIDTH sets a
# width on purpose). A bound keeps a stray full-width renderable finite.
PIPE_WIDTH = 4096
WIDTH_ENV = "COMPRESSADVISE_WIDTH"  # set: stdout is that wide, terminal or not
PIPE_BLOCK_WIDTH = 100  # what a renderable that fills its width (Markdown, a rule) gets in a pipe


def is_tty(console: Console) -> bool:
    """The stream itself, not Rich's is_terminal: FORCE_COLOR (common in CI) asks for colour, not width."""
    isatty = getattr(console.file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def _longest_word(cell: Any) -> int:
    if isinstance(cell, Text):
        text = cell.plain
    elif isinstance(cell, str):
        try:
            text = Text.from_markup(cell).plain
        except MarkupError:  # a name like 'x[/y]' printed with markup off
            text = cell
    else:
        return 0
    return max((len(w) for w in text.split()), default=0)


def _keep_words(table: Table) -> None:
    """No column narrower than its longest word, so Rich never splits an identifier
    ('joint_compressio n') or cuts it to 'la…': a table too wide for the terminal is printed
    wider than it (the terminal wraps the line) rather than altered."""
    for column in table.columns:
        if column.width is None:
            longest = max([_longest_word(column.header), *map(_longest_word, column.cells)])
            column.min_width = max(column.min_width or 0, longest)


class _Stdout(Console):
    """stdout: at its terminal's width on a terminal, unbounded in a pipe; tables keep words whole."""

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)  # type: ignore[attr-defined]
        forced = os.environ.get(WIDTH_ENV, "")
        if forced.isdigit() and int(forced) > 0:  # render as a terminal this wide would (the docs do)
            return ConsoleDimensions(int(forced), size.height)
        return size if is_tty(self) else ConsoleDimensions(PIPE_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]

    def print(self, *objects: Any, **kwargs: Any) -> None:
        tables = [o for o in objects if isinstance(o, Table)]
        for table in tables:
            _keep_words(table)
        if tables:
            kwargs.setdefault("crop", False)
        if not is_tty(self) and not all(isinstance(o, (str, Text, Table)) for o in objects):
            kwargs.setdefault("width", PIPE_BLOCK_WIDTH)  # it would pad every line to PIPE_WIDTH
        super().print(*objects, **kwargs)


out = _Stdout(highlight=False, soft_wrap=False)
err = Console(stderr=True, highlight=False)

BLOCKS = " ▏▎▍▌▋▊▉█"


def bar(fraction: float, width: int = 12) -> str:
    """A compact horizontal bar for a share in 0..1 (eighth-block resolution)."""
    fraction = max(0.0, min(1.0, fraction))
    eighths = int(round(fraction * width * 8))
    full, rest = divmod(eighths, 8)
    return ("█" * full + (BLOCKS[rest] if rest else "")).ljust(width)


def ratio_text(before: float | None, after: float | None, better: str, worse: str) -> str:
    """'2.00x smaller' when after < before, '1.25x larger' otherwise (never '0.8x smaller');
    'same' when equal, '' when either is missing or zero."""
    if not before or not after:
        return ""
    if abs(before - after) <= 1e-9 * max(abs(before), abs(after)):
        return "same"
    return f"{before / after:.2f}x {better}" if after <= before else f"{after / before:.2f}x {worse}"


def byte_unit(n: float) -> tuple[str, float]:
    """(unit, bytes per unit) that shows `n` bytes with at most 3 digits before the point."""
    for unit, size in (("B", 1.0), ("KB", 1e3), ("MB", 1e6)):
        if abs(n) < size * 1000:
            return unit, size
    return "GB", 1e9


def human_bytes(n: float) -> str:
    unit, size = byte_unit(n)
    return f"{n:.0f} B" if unit == "B" else f"{n / size:.2f} {unit}"


def time_unit(ms: float) -> tuple[str, float]:
    """(unit, units per ms) that keeps 3 significant digits of a duration in ms readable."""
    if abs(ms) < 0.9995:  # 0.9996 ms is "1 ms", not "1e+03 µs"
        return "µs", 1000.0
    return ("ms", 1.0) if abs(ms) < 999.5 else ("s", 0.001)


def human_ms(ms: float) -> str:
    """A duration given in ms, in the unit that keeps 3 significant digits readable."""
    unit, per_ms = time_unit(ms)
    return f"{ms * per_ms:.3g} {unit}"


def human_quantity(value: float, unit: str) -> str:
    """One formatter for a figure and its unit: sizes (B/KB/MB/GB) and durations (ms) scale to
    the unit that reads best; the rest keep 4 significant digits ('99.17 %')."""
    scale = {"B": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9}.get(unit)
    if scale is not None:
        return human_bytes(value * scale)
    if unit == "ms":
        return human_ms(value)
    return f"{value:,.4g} {unit}".rstrip() if abs(value) < 1e4 else f"{value:,.0f} {unit}".rstrip()


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return str(n)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
