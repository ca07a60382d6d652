"""`compressadvise apply`: carry out a plan through coremltools / torchao, with read-back checks."""
from __future__ import annotations

from typing import Optional

import typer

from compressadvise.commands.common import FORCE, INPUT_SHAPE, JSON, MODEL_ARG, SAMPLES, TRUST_PICKLE, parse_shape


def register(app: typer.Typer) -> None:
    app.command("apply")(apply_cmd)


def apply_cmd(
    model: Optional[str] = MODEL_ARG,
    plan: str = typer.Option(..., "--plan", help="Plan file from `compressadvise recommend --out` (or hand-written)."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (written atomically): model.pt2, model.mlpackage, manifest.json."),
    force: bool = FORCE,
    samples: Optional[str] = SAMPLES,
    input_shape: Optional[str] = INPUT_SHAPE,
    trust_pickle: bool = TRUST_PICKLE,
    allow_partial: bool = typer.Option(
        False, "--allow-partial",
        help="Keep a build that differs from the plan (a planned layer left uncompressed, or weights over 2% "
             "off the predicted size): exit 0 with the planned-vs-built table instead of exit 8."),
    train: Optional[str] = typer.Option(
        None, "--train", metavar="module:function|bundled",
        help="Training data for training-aware steps (dkm, qat, gradual_pruning). module:function IMPORTS AND "
             "RUNS YOUR CODE: it returns {'loader': batches of (inputs, target), 'loss': fn, optional "
             "'optimizer': params -> optimizer, 'steps': N}. 'bundled' is the bundled digits model's training split."),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted training step from its last checkpoint (kept beside --out "
                                "as .OUT.resume/ until the run succeeds)."),
    json_out: bool = JSON,
) -> None:
    """Apply a compression plan: compressed torch model, .mlpackage for Apple targets, and a manifest.

    --samples are the calibration data of techniques that need it; --input-shape shapes the example
    input for export and conversion. The build is checked against the plan: every planned layer
    compressed as planned and the weights within 2% of the predicted size, else exit 8."""
    from compressadvise import backends
    from compressadvise.backends.apply import apply, check_out
    from compressadvise.ui.cli import STATE

    backends.DEBUG["on"] = bool(STATE.get("debug"))
    check_out(out, model, force=force)  # before the progress bar: a refusal stays one line
    prog, progress = _progress()
    from compressadvise.backends.apply_gate import PlanNotBuilt

    try:
        with prog:
            result = apply(model, plan, out, force=force, samples=samples, progress=progress,
                           input_shape=parse_shape(input_shape), trust_pickle=trust_pickle,
                           allow_partial=allow_partial, train=train, resume=resume)
    except PlanNotBuilt as e:
        if json_out:
            from compressadvise.ui.render import emit_json

            emit_json({"out_dir": None, "planned_vs_built": e.gate})
        else:
            show_gate(e.gate, err=True)
        raise
    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json({"out_dir": str(result.out_dir), "torch_artifact": str(result.torch_artifact) if result.torch_artifact else None,
                   "mlpackage": str(result.mlpackage) if result.mlpackage else None, "manifest": result.manifest})
        return
    show_result(result)


def _progress():
    """A Rich progress bar per stage on stderr, bound to the real stderr: library calls run with
    stderr redirected (to swallow their own progress bars) and must not swallow ours."""
    import sys

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr, highlight=False)
    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)
    task = prog.add_task("applying", total=None)

    def progress(label: str, done: int, total: int) -> None:
        prog.update(task, description=label, completed=done, total=total or None)

    return prog, progress


def show_result(result) -> None:
    from rich.table import Table

    from compressadvise.ui.render import human_bytes, out

    m = result.manifest
    show_gate(m["planned_vs_built"])
    out.print(f"[bold]applied[/] {len(m['steps'])} step(s) to {m['input']['source']} for {m['target']['name']} "
              f"in {result.seconds:.1f} s -> [bold]{result.out_dir}[/]")
    for s in m["steps"]:
        sides = ", ".join(x for x in (s["torch_backend"], s["coreml_backend"]) if x)
        out.print(f"  step {s['step']}: {s['technique']} via {sides or 'no backend'}: "
                  f"{len(s['layers_applied'])} layer(s) compressed, {s['layers_skipped']} skipped")
    t = Table(show_edge=False)
    for col in ("layer", "status", "evidence / reason"):
        t.add_column(col, overflow="fold")
    for layer in m["layers"]:
        if not layer["steps"]:
            continue
        detail = []
        for e in layer["steps"]:
            if e.get("status") == "skipped":
                detail.append(f"skip: {e['reason']}")
            for side in ("torch", "coreml"):
                rec = e.get(side)
                if rec:
                    detail.append(f"{side}: {rec.get('evidence') or rec.get('reason') or rec['status']}")
        style = {"applied": "green", "skipped": "yellow"}.get(layer["status"], "")
        t.add_row(layer["name"], f"[{style}]{layer['status']}[/]" if style else layer["status"], "\n".join(detail))
    out.print(t)
    sizes = m["sizes"]
    for key, entry in sizes.items():
        if isinstance(entry.get("value"), int):
            out.print(f"  {key.replace('_', ' ')}: {human_bytes(entry['value'])} [dim]({entry['label']})[/]")
    if "weight_file_error" in sizes:
        out.print(f"  weight file vs estimate: {sizes['weight_file_error']['value']:+.2%}")
    for note in m.get("notes", []):
        out.print(f"[yellow]note:[/] {note}")
    _show_placement(m.get("placement"))
    out.print(f"[dim]manifest: {result.out_dir / 'manifest.json'}[/]")


def _show_placement(p: dict | None) -> None:
    """One line from the built program's placement (the report shows the full table)."""
    from compressadvise.ui.render import out

    if not p:
        return
    b = p["built"]
    if not b["fallback"]:
        out.print(f"  placement (built program): every op expected on the {b['accelerator']} [dim](estimate)[/]")
    else:
        ops = ", ".join(dict.fromkeys(f["op"] for f in b["fallback"]))
        out.print(f"  placement (built program): {len(b['fallback'])} op(s) fall back ({ops}), "
                  f"{len(b['boundaries'])} switch(es) between units [dim](estimate; {b['rule']})[/]")
    if p.get("note"):
        out.print(f"[yellow]note:[/] placement: {p['note']}")


def show_gate(gate: dict, err: bool = False) -> None:
    """Planned vs built first: the counts, the sizes, and a row per layer that differs."""
    from rich.console import Console
    from rich.table import Table

    from compressadvise.backends.apply_gate import summarize
    from compressadvise.ui.render import out

    console = Console(stderr=True, highlight=False) if err else out
    style = "green" if gate["ok"] else "red"
    console.print(f"[bold {style}]planned vs built[/] ({gate['side']} side): {summarize(gate)}")
    if not gate["rows"]:
        return
    t = Table(show_edge=False)
    for col in ("step", "layer", "planned", "built", "why"):
        t.add_column(col, overflow="fold")
    for r in gate["rows"]:
        t.add_row(str(r["step"]), r["layer"], r["planned"], f"[red]{r['built']}[/]", r["reason"])
    console.print(t)
