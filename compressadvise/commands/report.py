"""`compressadvise report`: one self-contained HTML page (and PNG charts) for a model or a run."""
from __future__ import annotations

from typing import List, Optional

import typer

from compressadvise.commands.common import (BITS_PER_WEIGHT, DATA, FORCE, INPUT_SHAPE, JSON, MAX_ACCURACY_DROP, MAX_LATENCY_MS,
                                            MAX_SIZE_MB, OS, SIZE_FRACTION, TARGET, TRUST_PICKLE, Data, parse_shape,
                                            size_budget_mb, value_of)
from compressadvise.commands.knowledge import PLAYBOOKS_OPT


def register(app: typer.Typer) -> None:
    app.command("report")(report_cmd)


# Over 60 lines only because its signature declares the command's options (Typer reads them there).
def report_cmd(
    source: Optional[str] = typer.Argument(
        None, metavar="[RUN_DIR_OR_MODEL]",
        help="An `apply` output folder (reads its plan, verify.json and sensitivity.json), or a model "
        "(analyzed and planned now); omit for the bundled example."),
    model: Optional[str] = typer.Option(
        None, "--model", metavar="MODEL",
        help="The original model of an `apply` output folder (file, module:function or 'bundled'). "
        "Without it the folder's manifest is read for a model file; a module:function it names is never imported."),
    out: str = typer.Option("report.html", "--out", "-o", help="The HTML file to write."),
    png: Optional[str] = typer.Option(None, "--png", help="Also write each chart as DIR/<chart>.png."),
    target: Optional[str] = TARGET,
    os: Optional[int] = OS,
    plan: Optional[str] = typer.Option(None, "--plan", help="Use this plan file instead of recommending one."),
    verify: Optional[str] = typer.Option(None, "--verify", help="A `compressadvise verify --json` result."),
    sensitivity: Optional[str] = typer.Option(
        None, "--sensitivity", help="Sensitivity or search results (JSON): per-layer sensitivity, size-vs-fidelity points."),
    max_size_mb: Optional[float] = MAX_SIZE_MB,
    size_fraction: Optional[float] = SIZE_FRACTION,
    bits_per_weight: Optional[float] = BITS_PER_WEIGHT,
    max_latency_ms: Optional[float] = MAX_LATENCY_MS,
    max_accuracy_drop: Optional[float] = MAX_ACCURACY_DROP,
    data: Optional[Data] = DATA,
    input_shape: Optional[str] = INPUT_SHAPE,
    docs_base: str = typer.Option("", "--docs-base", metavar="URL",
                                  help="Where rule pages live (e.g. a docs site or repository URL): rule "
                                  "entries then link to <docs-base><CODE>.md. Without it the page links nowhere "
                                  "outside itself: each rule's explanation is embedded."),
    title: Optional[str] = typer.Option(None, "--title", help="Page title."),
    force: bool = FORCE,
    playbooks: Optional[List[str]] = PLAYBOOKS_OPT,
    trust_pickle: bool = TRUST_PICKLE,
    json_out: bool = JSON,
) -> None:
    """Write a self-contained HTML report: layer table, hot-spot charts, the plan and its reasons.

    --target, --os, the budgets, --data and --input-shape are used when planning now (a model
    without --plan)."""
    from pathlib import Path

    from compressadvise.fsutil import check_output
    from compressadvise.knowledge.base import builtin, load_knowledge
    from compressadvise.ui.render import err
    from compressadvise.ui.report import write_report

    size_budget_mb(0, 0, max_size_mb=max_size_mb, size_fraction=size_fraction, bits_per_weight=bits_per_weight)
    if model is not None and not (source and Path(source).is_dir()):
        raise typer.BadParameter("--model names the original model of an `apply` output folder; "
                                 "to report on a model, pass it as the argument")
    check_output(out, force=force, inputs={"model or run folder": source, "plan": plan, "verify result": verify,
                                           "sensitivity result": sensitivity, "original model": model})
    k = load_knowledge(playbooks) if playbooks else builtin()
    with err.status("building the report"):
        result = write_report(
            source, out, png_dir=png, force=force, docs_base=docs_base, title=title, target=target,
            os_version=os, plan=plan, verify=verify, sensitivity=sensitivity, knowledge=k,
            input_shape=parse_shape(input_shape), trust_pickle=trust_pickle,
            model=model,
            constraints={"max_size_mb": max_size_mb or 0.0, "max_latency_ms": max_latency_ms or 0.0,
                         "max_accuracy_drop": max_accuracy_drop or 0.0, "data": value_of(data, "none"),
                         "size_fraction": size_fraction, "bits_per_weight": bits_per_weight})
    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json(result.model_dump(mode="json"))
        return
    show_result(result)


def show_result(result) -> None:
    from compressadvise.ui.render import human_bytes, human_quantity, out

    out.print(f"report written to [bold]{result.html}[/] ({human_bytes(result.bytes)}, {result.layers} layers, "
              f"charts: {', '.join(result.charts) or 'none'})")
    for row in result.summary:
        if (row.before is None and row.after is None) or row.group == "internal":  # internal: in --json
            continue
        before = human_quantity(row.before, row.unit) if row.before is not None else "-"
        after = human_quantity(row.after, row.unit) if row.after is not None else "-"
        out.print(f"  {row.metric}: {before} -> {after} [dim]({row.basis})[/]")
    from rich.markup import escape

    for note in result.notes:
        out.print(f"[yellow]note:[/] {escape(note)}")
    for chart, why in result.omitted.items():
        out.print(f"[dim]not shown: {chart}: {why}[/]")
    if result.png:
        out.print(f"PNG charts: {', '.join(result.png)}")
