"""Options shared by several commands."""
from __future__ import annotations

import typer

MODEL_ARG = typer.Argument(
    None, metavar="[MODEL]",
    help="Model file (TorchScript, .pt2, state dict, .safetensors) or module:function; "
    "omit for the bundled example.",
)
TRUST_PICKLE = typer.Option(
    False, "--trust-pickle",
    help="Allow loading a full pickled nn.Module. This EXECUTES CODE stored in the file: "
    "only for files from people you trust.",
)
JSON = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")


def parse_shape(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.replace("x", ",").split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"--input-shape must look like 1,3,224,224 (got {text!r})") from None


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
