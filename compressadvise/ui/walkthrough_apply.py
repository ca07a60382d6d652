"""Helpers of walkthrough stages 5 and 6: running apply and verify, showing their results, writing the report."""
from __future__ import annotations

from typing import Any

from compressadvise.errors import CompressAdviseError
from compressadvise.fsutil import write_text_atomic
from compressadvise.ui.walkthrough_session import APPLY_DIR, REPORT_FILE, VERIFY_FILE
from compressadvise.ui.walkthrough_ui import Context, _esc


def _run_apply(ctx: Context) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from compressadvise.backends import apply as apply_mod

    s = ctx.session
    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    console=ctx.ui.console, transient=True)
    task = prog.add_task("applying", total=None)

    def progress(label: str, done: int, total: int) -> None:
        prog.update(task, description=label, completed=done, total=total or None)

    out = ctx.out / APPLY_DIR
    with prog:
        # force: the folder is this session's own output (a rerun after an interrupted apply).
        return apply_mod.apply(ctx.loaded, ctx.plan, out, force=True, samples=s.samples, progress=progress,
                               input_shape=s.input_shape, knowledge=ctx.knowledge)


def _show_apply(ctx: Context, result: Any) -> None:
    m = result.manifest
    applied = sum(len(st.get("layers_applied", [])) for st in m.get("steps", []))
    ctx.ui.say(f"applied {len(m.get('steps', []))} step(s), {applied} layer compression(s) in "
               f"{result.seconds:.1f} s -> [bold]{result.out_dir}[/]")
    for note in m.get("notes", [])[:4]:
        ctx.ui.say(f"  [yellow]note:[/] {_esc(note)}")


def _run_verify(ctx: Context) -> None:
    from compressadvise.measure.verify import Budgets, verify

    ui, s = ctx.ui, ctx.session
    budgets = Budgets(max_accuracy_drop=s.max_accuracy_drop or None, max_latency_ms=s.max_latency_ms or None,
                      max_size_mb=s.max_size_mb or None)
    with ui.console.status("verifying") as status:
        result = verify(ctx.loaded, s.apply_dir, samples=s.samples, evaluator=s.evaluator, target=s.target,
                        os=s.os, budgets=budgets, plan=ctx.plan, reps=10, warmup=2,
                        trust_pickle=s.trust_pickle, progress=lambda msg: status.update(msg))
    write_text_atomic(ctx.out / VERIFY_FILE, result.to_json() + "\n")
    s.verify_file = str(ctx.out / VERIFY_FILE)
    s.passed = result.passed
    s.verdicts = [v.model_dump(mode="json") for v in result.budgets]
    ctx.verify_result = result
    _show_before_after(ctx, result)
    if not result.passed:
        worst = result.drift.first_degraded or result.drift.worst if result.drift else None
        from compressadvise.plan.engine import next_moves as evaluate

        moves = evaluate(ctx.plan, ctx.report, [v.name for v in result.missed()], ctx.knowledge,
                         data=s.data, worst_layer=worst).moves
        s.next_moves = [f"{m.message} [{m.code}]" for m in moves]  # the code: `compressadvise explain` it
        ui.say("\n[bold red]A budget was missed.[/] Next recommended moves:")
        for move in s.next_moves:
            ui.say(f" • {_esc(move)}")
        ui.say(f"[dim]rerun `compressadvise walkthrough --resume {ctx.out}` after editing, or start a new session[/]")
    else:
        s.next_moves = []
        ui.say("[bold green]every budget met[/]")


def _show_before_after(ctx: Context, r: Any) -> None:
    from rich.table import Table

    from compressadvise.ui.render import human_bytes

    t = Table(title="Before / after", show_edge=False)
    for col in ("", "original", "compressed", "basis"):
        t.add_column(col, justify="right" if col in ("original", "compressed") else "left")
    if r.original.size_bytes and r.compressed.size_bytes:
        t.add_row("size", human_bytes(r.original.size_bytes), human_bytes(r.compressed.size_bytes),
                  f"{r.original.size_basis} / {r.compressed.size_basis}")
    if r.target_size_bytes:
        t.add_row(f"weights on {r.estimate['compressed'].target if r.estimate else 'the target'}",
                  human_bytes(r.target_size_bytes.get("original", 0)), human_bytes(r.target_size_bytes.get("compressed", 0)),
                  "estimate")
    for row in r.accuracy + r.evaluator:
        t.add_row(row.name, f"{row.original:.2f}", f"{row.compressed:.2f}", "measured")
    for f in r.fidelity[:1]:
        for key in ("top1_agreement", "snr_db", "cosine"):
            if key in f.metrics:
                t.add_row(f"{f.name} {key}", "", f"{f.metrics[key]:.4g}", "measured vs original")
    if r.latency is not None:
        o, c = r.latency.best("original"), r.latency.best("compressed")
        if o is not None and c is not None:
            t.add_row("latency here (ms)", f"{o.median_ms:.3f}", f"{c.median_ms:.3f}",
                      f"measured on this machine ({o.mode})")
    if r.estimate:
        e_o, e_c = r.estimate.get("original"), r.estimate.get("compressed")
        if e_o is not None and e_c is not None and e_c.total_ms > 0:
            t.add_row(f"latency on {e_c.target} (ms)", f"{e_o.total_ms:.4f}", f"{e_c.total_ms:.4f}", "estimate (roofline)")
    ctx.ui.say(t)
    for v in r.budgets:
        mark = "[green]PASS[/]" if v.passed else "[red]MISS[/]"
        value = f"{v.value:.4g} {v.unit}" if v.value is not None else "-"
        limit = f"{v.limit:g} {v.unit}" if v.limit is not None else ""
        ctx.ui.say(f"  {mark} {v.name}: {value} (limit {limit}) [dim]{_esc(v.basis)}[/]")
    for w in r.warnings[:3]:
        ctx.ui.say(f"  [yellow]warning:[/] {_esc(w)}")


def _write_report(ctx: Context) -> None:
    from compressadvise.ui.report import write_report

    s, out = ctx.session, ctx.out
    # This session's own apply folder (not a path read back from session.json); the original is the
    # model analyzed here, so the report never resolves it from the manifest.
    applied = out / APPLY_DIR
    source = applied if s.apply_dir and (applied / "manifest.json").is_file() else None
    original = ctx.report if ctx.report is not None else s.model
    verify = out / VERIFY_FILE if (out / VERIFY_FILE).is_file() else None
    try:
        with ctx.ui.console.status("writing the HTML report"):
            write_report(source if source is not None else original, out / REPORT_FILE, force=True,
                         model=original if source is not None else None, plan=ctx.plan, verify=verify,
                         target=s.target, os_version=s.os, knowledge=ctx.knowledge, trust_pickle=s.trust_pickle)
        s.report_file = str(out / REPORT_FILE)
    except CompressAdviseError as e:
        ctx.ui.say(f"[yellow]the HTML report could not be written:[/] {_esc(e.one_line())}")
