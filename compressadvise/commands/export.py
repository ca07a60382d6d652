"""`compressadvise export`: a plan as the library's own configuration (coremltools YAML, torchao Python)."""
from __future__ import annotations

from enum import Enum
from typing import Optional

import typer

from compressadvise.commands.common import FORCE, INPUT_SHAPE, JSON, TRUST_PICKLE, parse_shape


class ExportTo(str, Enum):
    """The libraries a plan exports to (backends.export.TARGETS)."""
    coremltools = "coremltools"
    torchao = "torchao"


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)


def export_cmd(
    plan: str = typer.Argument(..., metavar="PLAN", help="Plan file from `compressadvise recommend --out` or "
                               "`search --out` (or hand-written)."),
    to: ExportTo = typer.Option(..., "--to", help="coremltools: an OptimizationConfig YAML for "
                                "coremltools.optimize.coreml; torchao: a Python file whose compress(model) runs "
                                "quantize_ per group of layers."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the file here (atomically); omit to print it."),
    model: Optional[str] = typer.Option(
        None, "--model", metavar="MODEL",
        help="The model the plan is for (file, module:function, which imports and runs that code, or omit for "
        "the bundled example): its layers give the Core ML op names and torch module names the file uses."),
    input_shape: Optional[str] = INPUT_SHAPE,
    force: bool = FORCE,
    trust_pickle: bool = TRUST_PICKLE,
    json_out: bool = JSON,
) -> None:
    """Export a plan as coremltools or torchao configuration, to reproduce it with the library alone.

    The plan is resolved as `apply` resolves it and the configs are the ones apply's backends build;
    what the library cannot express (layers kept as they are, calibration- or training-time steps, a
    technique only the other library has) is listed in the file's header and in the notes."""
    import sys

    from compressadvise.backends.export import export_plan
    from compressadvise.fsutil import check_output, write_text_atomic

    if out is not None:  # before any work: an existing file needs --force, an input is never replaced
        check_output(out, force=force, inputs={"plan": plan, "model": model}, kind="file")
    result = export_plan(plan, to.value, model, input_shape=parse_shape(input_shape), trust_pickle=trust_pickle,
                         filename=out)
    if out is not None:
        write_text_atomic(out, result.text)
    if json_out:
        from compressadvise.ui.render import emit_json

        calls = [{"step": p.step, "technique": p.technique, "function": p.function, "joint_compression": p.joint,
                  "ops": list(p.configs)} for p in result.passes]  # coremltools: one per optimize call
        emit_json({"to": result.to, "path": out, "text": result.text, "notes": result.notes, "names": result.names,
                   **({"calls": calls} if calls else {})})
        return
    if out is None:
        sys.stdout.write(result.text)  # the file itself, so it pipes; notes are in its header too
        return
    _show(result, out)


def _show(result, out: str) -> None:
    from rich.markup import escape

    from compressadvise.ui.render import out as console

    what = {"coremltools": "coremltools OptimizationConfig YAML", "torchao": "torchao Python recipe"}[result.to]
    console.print(f"[bold]wrote[/] {escape(out)}: {what}, {len(result.names)} layer(s) compressed"
                  + (f" in {len(result.passes)} optimize call(s)" if result.passes else ""))
    for note in result.notes:
        console.print(f"[yellow]not in the file:[/] {escape(note)}")
