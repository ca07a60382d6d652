"""`compressadvise analyze`: the per-layer inventory."""
from __future__ import annotations

from enum import Enum
from typing import Optional

import typer

from compressadvise.commands.common import INPUT_SHAPE, JSON, MODEL_ARG, TARGET, TRUST_PICKLE, parse_shape, progress_bar


class Sort(str, Enum):
    """Orders of the layer table."""
    size = "size"
    index = "index"
    name = "name"
    kurtosis = "kurtosis"
    macs = "macs"



def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze_cmd)


def analyze_cmd(
    model: Optional[str] = MODEL_ARG,
    input_shape: Optional[str] = INPUT_SHAPE,
    top: int = typer.Option(20, "--top", help="Rows in the layer table (0 = all)."),
    sort: Sort = typer.Option(Sort.size, "--sort", help="Order of the layer table."),
    no_stats: bool = typer.Option(False, "--no-stats", help="Skip weight statistics (faster on huge files)."),
    target: Optional[str] = TARGET,
    trust_pickle: bool = TRUST_PICKLE,
    json_out: bool = JSON,
) -> None:
    """Inventory a model: layers, sizes, weight statistics, structure and findings.

    With --target, also the placement check: the ops the target's accelerator lacks (they fall
    back to another unit) and the switches between units, from the model's op graph (an estimate;
    the table and its sources: `compressadvise targets NAME`).
    """
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import load_model

    loaded = load_model(model, trust_pickle=trust_pickle)
    prog, update = progress_bar("analyzing")
    with prog:
        report = analyze(loaded, input_shape=parse_shape(input_shape), stats=not no_stats, progress=update)
    placed = _placement(report, target)
    if json_out:
        from compressadvise.ui.render import emit_json

        data = report.model_dump(mode="json")
        if target is not None:
            data["placement"] = placed.model_dump(mode="json") if placed is not None else None
        emit_json(data)
        return
    show_report(report, top=top, sort=sort.value)
    if target is not None:
        from compressadvise.ui.placement_view import show_placement

        show_placement(placed)


def _placement(report, target: Optional[str]):
    """The placement check for --target (its table may be empty: the report then says so)."""
    if target is None:
        return None
    from compressadvise.knowledge.base import builtin
    from compressadvise.measure.placement import check
    from compressadvise.model.ops import from_layers

    return check(report.ops or from_layers(report), builtin().target(target))


def show_report(report, *, top: int = 20, sort: str = "size") -> None:
    from rich.table import Table

    from compressadvise.ui.render import bar, human_bytes, human_count, out

    out.print(f"[bold]{report.source}[/]  format: {report.format}  family: [bold]{report.family}[/]"
              f" ({'; '.join(report.family_evidence)})")
    out.print(f"parameters: {human_count(report.total_params)}  fp32: {human_bytes(report.total_bytes_fp32)}"
              f"  fp16: {human_bytes(report.total_bytes_fp16)}"
              + (f"  MACs: {human_count(report.macs_total)} (input {report.input_shape})" if report.macs_total else ""))
    for note in report.notes:
        out.print(f"[yellow]note:[/] {note}")
    types = Table(title="Layer types", show_edge=False)
    for col in ("type", "layers", "params", "share", ""):
        types.add_column(col, justify="right" if col in ("layers", "params", "share") else "left")
    for name, b in sorted(report.layer_types.items(), key=lambda kv: -kv[1].params):
        types.add_row(name, str(b.count), human_count(b.params), f"{b.share:.1%}", bar(b.share))
    out.print(types)
    key = {
        "size": lambda x: -x.params, "index": lambda x: x.index, "name": lambda x: x.name,
        "kurtosis": lambda x: -(x.stats.kurtosis if x.stats else 0), "macs": lambda x: -(x.macs or 0),
    }[sort]
    rows = sorted(report.layers, key=key)
    shown = rows if top == 0 else rows[:top]
    cols: dict[str, list[str]] = {"layer": [], "type": [], "shape": [], "params": [], "share": [],
                                  "fp16": [], "MACs": [], "kurt": [], "pos": [], "div o/i": []}
    for x in shown:
        cols["layer"].append(x.name)
        cols["type"].append(x.type)
        cols["shape"].append("x".join(map(str, x.weight_shape)))
        cols["params"].append(human_count(x.params))
        cols["share"].append(f"{bar(x.share, 6)}{x.share:6.1%}")
        cols["fp16"].append(human_bytes(x.bytes_fp16))
        cols["MACs"].append(human_count(x.macs) if x.macs else "-")
        cols["kurt"].append(f"{x.stats.kurtosis:.1f}" if x.stats else "-")
        cols["pos"].append(",".join(p for p, f in (
            ("first", x.is_first), ("last", x.is_last),
            ("edge", x.is_boundary and not (x.is_first or x.is_last)), ("tied", bool(x.tied_to))) if f))
        cols["div o/i"].append(f"{max(x.out_divisible_by, default=1)}/{max(x.in_divisible_by, default=1)}")
    if not report.macs_total:
        del cols["MACs"]
    # Drop the least essential columns until the table fits the terminal.
    width = lambda c: max([len(c), *map(len, cols[c])]) + 3  # noqa: E731
    for optional in ("div o/i", "MACs", "kurt", "shape", "fp16", "pos"):
        if sum(width(c) for c in cols) <= out.width:
            break
        cols.pop(optional, None)
    t = Table(title=f"Layers ({len(shown)} of {len(rows)}, by {sort})", show_edge=False, pad_edge=False)
    for c in cols:
        right = c in ("params", "share", "fp16", "MACs", "kurt")
        t.add_column(c, justify="right" if right else "left", overflow="fold", no_wrap=c != "layer",
                     min_width=min(width(c) - 3, 24) if c == "layer" else None)
    for i in range(len(shown)):
        t.add_row(*(cols[c][i] for c in cols))
    out.print(t)
    if len(rows) > len(shown):
        out.print(f"[dim]{len(rows) - len(shown)} more layer(s): --top 0 shows all[/]")
    for f in report.findings[:20]:
        out.print(f"[yellow]finding:[/] {f}")
