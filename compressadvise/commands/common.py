"""Options shared by several commands."""
from __future__ import annotations

import math
import re

import typer

MODEL_ARG = typer.Argument(
    None, metavar="[MODEL]",
    help="Model file (TorchScript, .pt2, state dict, .safetensors), or module:function, which "
    "imports and runs that Python code (a factory returning an nn.Module): only your own code; "
    "omit for the bundled example.",
)
TRUST_PICKLE = typer.Option(
    False, "--trust-pickle",
    help="Allow loading a full pickled nn.Module. This EXECUTES CODE stored in the file: "
    "only for files from people you trust.",
)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


MAX_SHAPE_ELEMENTS = 2 ** 28  # 1 GiB of float32 for one example input: beyond that it is a typo
_SHAPE = re.compile(r"\s*\d+(?:\s*(?:,|(?<=\d)x(?=\d))\s*\d+)*\s*", re.ASCII)
_SEPARATOR = re.compile(r"\s*[,x]\s*")


def parse_shape(text: str | None) -> list[int] | None:
    """`1,3,224,224` (or `1x3x224x224`) -> [1, 3, 224, 224]: positive integers only, and small
    enough to allocate. `x` only separates digits: `1,x,3` is refused, not read as [1, 3]."""
    if not text:
        return None
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    if not _SHAPE.fullmatch(text):
        raise typer.BadParameter(f"--input-shape must be positive integers separated by ',' like 1,3,224,224 "
                                 f"(got {shown})")
    parts = _SEPARATOR.split(text.strip())
    if any(len(p) > 12 for p in parts):  # int() refuses over 4300 digits; no dimension needs 13
        raise typer.BadParameter(f"--input-shape {shown} has a dimension of {max(map(len, parts))} digits: "
                                 "far too large to allocate")
    dims = [int(p) for p in parts]
    if 0 in dims:
        raise typer.BadParameter(f"--input-shape dimensions must be > 0 (got {shown})")
    n = math.prod(dims)
    if n > MAX_SHAPE_ELEMENTS:
        raise typer.BadParameter(f"--input-shape {shown} would allocate {n:,} floats ({n * 4 / 1e9:,.1f} GB); "
                                 f"at most {MAX_SHAPE_ELEMENTS:,} elements (one example input is enough)")
    return dims


def progress_bar(description: str):
    """A Rich progress bar on stderr (so --json stdout stays clean); returns (ctx, callback)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..render import err

    prog = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=err, transient=True)
    task = prog.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        prog.update(task, completed=done, total=total or None)

    return prog, update
