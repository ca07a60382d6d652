"""`compressadvise recommend`: run the playbooks and print/save an explained plan."""
from __future__ import annotations

from typing import List, Optional

import typer

from compressadvise.commands.common import (BITS_PER_WEIGHT, DATA, DEFAULT_TARGET, FORCE, INPUT_SHAPE, JSON, MAX_ACCURACY_DROP,
                     MAX_LATENCY_MS, MAX_SIZE_MB, MODEL_ARG, OS, SIZE_FRACTION, TARGET, TRUST_PICKLE, Data,
                     parse_shape, size_budget_mb, value_of)
from compressadvise.commands.knowledge import PLAYBOOKS_OPT


def register(app: typer.Typer) -> None:
    app.command("recommend")(recommend_cmd)


def recommend_cmd(
    model: Optional[str] = MODEL_ARG,
    target: Optional[str] = TARGET,
    os: Optional[int] = OS,
    max_size_mb: Optional[float] = MAX_SIZE_MB,
    size_fraction: Optional[float] = SIZE_FRACTION,
    bits_per_weight: Optional[float] = BITS_PER_WEIGHT,
    max_latency_ms: Optional[float] = MAX_LATENCY_MS,
    max_accuracy_drop: Optional[float] = MAX_ACCURACY_DROP,
    data: Optional[Data] = DATA,
    out: Optional[str] = typer.Option(None, "--out", help="Write the plan file (YAML) here."),
    force: bool = FORCE,
    input_shape: Optional[str] = INPUT_SHAPE,
    trace: bool = typer.Option(False, "--trace", help="Also list the rules that did not fire, and why."),
    playbooks: Optional[List[str]] = PLAYBOOKS_OPT,
    trust_pickle: bool = TRUST_PICKLE,
    json_out: bool = JSON,
) -> None:
    """Recommend an ordered, explained compression plan for a target and budgets."""
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import recommend
    from compressadvise.fsutil import check_output
    from compressadvise.knowledge.base import builtin, load_knowledge
    from compressadvise.model.loading import load_model

    target = target or DEFAULT_TARGET
    size_budget_mb(0, 0, max_size_mb=max_size_mb, size_fraction=size_fraction,
                   bits_per_weight=bits_per_weight)  # one size budget: refused before any work
    if out:  # before any work: never the model, never an existing file without --force
        check_output(out, force=force, inputs={"model": model})
    k = load_knowledge(playbooks) if playbooks else builtin()
    k.target(target)  # fail fast on a bad name, before loading the model
    report = analyze(load_model(model, trust_pickle=trust_pickle), input_shape=parse_shape(input_shape))
    # A fraction or bits per weight becomes MB of this model; the plan records that MB budget.
    size_mb = size_budget_mb(report.total_bytes_fp16, report.total_params, max_size_mb=max_size_mb,
                             size_fraction=size_fraction, bits_per_weight=bits_per_weight)
    plan = recommend(report, target=target, os=os, knowledge=k, constraints={  # 0 = none for the engine
        "max_size_mb": size_mb or 0.0, "max_latency_ms": max_latency_ms or 0.0,
        "max_accuracy_drop": max_accuracy_drop or 0.0, "data": value_of(data, "none")})
    if out:
        from compressadvise.plan.planfile import save_plan

        save_plan(plan, out)
    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json(plan.model_dump(mode="json"))
        return
    show_plan(plan, show_trace=trace)
    if out:
        from compressadvise.ui.render import out as console

        console.print(f"plan written to [bold]{out}[/]: replay with `compressadvise apply {model or ''} --plan {out}`".replace("  ", " "))


def show_plan(plan, *, show_trace: bool = False) -> None:
    from rich.table import Table

    from compressadvise.ui.render import bar, human_bytes, out

    p = plan.prediction
    out.print(f"[bold]Plan[/] for {plan.model.source} on [bold]{plan.target.name}[/] (OS {plan.target.os})")
    if not plan.steps:
        out.print("[yellow]no compression step fired[/]: see the advice below and `--trace`")
    for i, s in enumerate(plan.steps, 1):
        params = ", ".join(f"{k}={v}" for k, v in s.params.items())
        out.print(f"\n[bold]{i}. {s.technique}[/] ({s.slot}) {params}")
        out.print(f"   why: {s.why}  [dim][{', '.join(s.rules)}][/]")
        out.print(f"   compresses {len(s.layers)} layer(s); size after this step: "
                  f"{human_bytes(s.predicted_bytes_after or 0)} [dim](estimate)[/]")
        for name, ov in s.op_name_params.items():
            out.print(f"   override {name}: " + ", ".join(f"{k}={v}" for k, v in ov.items()))
        for sk in s.skipped:
            out.print(f"   [yellow]skip[/] {sk.layer}: {sk.reason} [dim][{sk.code}][/]")
    if p:
        budget = ""
        if p.meets_size_budget is not None:
            budget = "  [green]meets the size budget[/]" if p.meets_size_budget else "  [red]misses the size budget[/]"
        out.print(f"\nsize: {human_bytes(p.bytes_before)} -> {human_bytes(p.bytes_after)} "
                  f"({p.ratio:.2f}x) [dim](estimate)[/]{budget}")
    big = sorted(plan.layers, key=lambda x: -x.bytes_before)[:12]
    if big:
        total = max(p.bytes_before if p else 1, 1)
        t = Table(title="Largest layers", show_edge=False)
        for col in ("layer", "setting", "before", "after", "share of model"):
            t.add_column(col, justify="right" if col in ("before", "after") else "left", overflow="fold")
        for x in big:
            t.add_row(x.name, x.setting, human_bytes(x.bytes_before), human_bytes(x.bytes_after),
                      bar(x.bytes_before / total, 10) + f" {x.bytes_before / total:.0%}")
        out.print(t)
    if plan.advisories:
        out.print("\n[bold]Advice[/]")
        for a in plan.advisories:
            where = f" ({', '.join(a.layers[:4])}{'...' if len(a.layers) > 4 else ''})" if a.layers else ""
            out.print(f" • [bold]{a.code}[/] {a.message}{where}\n   [dim]{a.why}[/]")
    fired = [e for e in plan.trace if e.status == "fired"]
    other = [e for e in plan.trace if e.status in ("outranked", "unsupported")]
    out.print(f"\n[dim]rules fired: {', '.join(e.code for e in fired) or 'none'}[/]")
    for e in other:
        out.print(f"[dim]{e.code} {e.status}: {e.detail}[/]")
    if show_trace:
        for e in plan.trace:
            if e.status == "not_matched":
                out.print(f"[dim]{e.code} not matched: {e.detail}[/]")
