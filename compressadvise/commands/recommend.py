"""`compressadvise recommend`: run the playbooks and print/save an explained plan."""
from __future__ import annotations

from typing import List, Optional

import typer

from compressadvise.commands.common import (BITS_PER_WEIGHT, DATA, DEFAULT_TARGET, DEVICE_PROFILE, FORCE, INPUT_SHAPE, JSON,
                     MAX_ACCURACY_DROP, MAX_LATENCY_MS, MAX_SIZE_MB, MODEL_ARG, OS, SAMPLES, SIZE_FRACTION, TARGET,
                     TRUST_PICKLE, Data, parse_shape, profile_target, replay_hint, size_budget_mb, value_of)
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
    device_profile: Optional[str] = DEVICE_PROFILE,
    context_length: Optional[int] = typer.Option(
        None, "--context-length", min=1, metavar="TOKENS",
        help="For a causal language model: the context it runs at, for its KV cache in the runtime memory "
        "(default: the model's position limit)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the plan file (YAML) here."),
    force: bool = FORCE,
    input_shape: Optional[str] = INPUT_SHAPE,
    trace: bool = typer.Option(False, "--trace", help="Also list the rules that did not fire, and why."),
    playbooks: Optional[List[str]] = PLAYBOOKS_OPT,
    trust_pickle: bool = TRUST_PICKLE,
    measure: bool = typer.Option(True, "--measure/--no-measure", help=(
        "Apply the plan in memory to the deployable weights and measure its output fidelity on --samples "
        "before printing it; under the floor, try the next wider nbits the technique accepts. "
        "--no-measure prints the rules' plan only (faster; fidelity unknown).")),
    samples: Optional[str] = SAMPLES,
    min_psnr: Optional[float] = typer.Option(None, "--min-psnr", help=(
        "Fidelity floor in dB of output PSNR for the measured plan (default: top-1 agreement for classifiers, "
        "the min_output_psnr_db threshold otherwise).")),
    json_out: bool = JSON,
) -> None:
    """Recommend an ordered, explained compression plan for a target and budgets, measured on samples."""
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import recommend
    from compressadvise.fsutil import check_output
    from compressadvise.knowledge.base import builtin, load_knowledge
    from compressadvise.model.loading import load_model

    target = target or profile_target(device_profile) or DEFAULT_TARGET
    size_budget_mb(0, 0, max_size_mb=max_size_mb, size_fraction=size_fraction,
                   bits_per_weight=bits_per_weight)  # one size budget: refused before any work
    if out:  # before any work: never the model, never an existing file without --force
        check_output(out, force=force, inputs={"model": model})
    k = load_knowledge(playbooks) if playbooks else builtin()
    k.target(target)  # fail fast on a bad name, before loading the model
    loaded = load_model(model, trust_pickle=trust_pickle)
    report = analyze(loaded, input_shape=parse_shape(input_shape))
    from compressadvise.plan.decoder_facts import with_memory_rules
    from compressadvise.plan.memory import check_context

    check_context(report, context_length)  # before the plan is made and measured
    # A fraction or bits per weight becomes MB of this model; the plan records that MB budget.
    size_mb = size_budget_mb(report.total_bytes_fp16, report.total_params, max_size_mb=max_size_mb,
                             size_fraction=size_fraction, bits_per_weight=bits_per_weight)
    plan = recommend(report, target=target, os=os, knowledge=k, constraints={  # 0 = none for the engine
        "max_size_mb": size_mb or 0.0, "max_latency_ms": max_latency_ms or 0.0,
        "max_accuracy_drop": max_accuracy_drop or 0.0, "data": value_of(data, "none")}, device_profile=device_profile)
    if measure:
        plan = _measured(plan, loaded, report, k, samples, min_psnr)
    if device_profile and measure:  # measuring may change the settings: the latency follows the final plan
        from compressadvise.measure.device_profile import plan_latency

        plan = plan_latency(plan, report, k, device_profile)
    plan = with_memory_rules(plan, report, context_length, k)  # after measuring: the weights it settled on
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

        console.print(replay_hint(out, model, trust_pickle=trust_pickle, input_shape=input_shape),
                      markup=False, soft_wrap=True)


def _measured(plan, loaded, report, k, samples, min_psnr):
    from compressadvise.plan.measured import measure_plan
    from compressadvise.ui.render import err

    with err.status("measuring the plan on samples", spinner="dots") as status:
        return measure_plan(plan, loaded, report, k, samples=samples, min_psnr=min_psnr,
                            progress=lambda text: status.update(text))


def show_fidelity(fid) -> None:
    from compressadvise.plan.measured import metric_text
    from compressadvise.ui.render import human_bytes, out

    out.print(f"\n[bold]Fidelity[/] [dim]({fid.label})[/]")
    if not fid.measured:
        out.print(f"   {fid.note or 'not measured'}")
    floor = ", ".join(f"{k} >= {v:.3g}" for k, v in fid.floor.items())
    for m in fid.measured:
        mark = "[green]passes[/]" if m.passed else "[red]under the floor[/]"
        out.print(f"   {m.settings}: {metric_text(m.metrics)}; {human_bytes(m.bytes_after)} [dim](estimate)[/] "
                  f"{mark} [dim](floor {floor})[/]")
    for u in fid.unmeasured[:6]:
        out.print(f"   [yellow]not measured[/] {u}")


def show_advice(plan, k) -> None:
    from compressadvise.ui.render import out

    if not plan.advisories:
        return
    out.print("\n[bold]Advice[/]")
    lessons = [a for a in plan.advisories if _generic_lesson(k, a.code)]
    for a in plan.advisories:
        if a in lessons:
            continue
        where = f" ({', '.join(a.layers[:4])}{'...' if len(a.layers) > 4 else ''})" if a.layers else ""
        out.print(f" • [bold]{a.code}[/] {a.message}{where}\n   [dim]{a.why}[/]")
    if lessons:  # the workflow lessons every plan without an evaluation gets: one line each
        out.print("[dim]Workflow: " + "; ".join(f"{a.title.lower()} [{a.code}]" for a in lessons)
                  + " (`compressadvise explain CODE`)[/]")


def _generic_lesson(k, code: str) -> bool:
    """A workflow lesson whose text is the same for every model (no facts in it): print it compactly."""
    from compressadvise.knowledge.base import PLACEHOLDER

    cr = k.rules.get(code)
    return bool(cr and "workflow" in cr.rule.tags and not PLACEHOLDER.search(cr.rule.action.message or ""))


def _bits(after: float, before: float, plan, k) -> float:
    """Bits per weight as stored, scales, LUTs and masks included: the target's baseline bits
    (16 for fp16) times the compressed share (`before` is the layer at the baseline)."""
    tgt = k.targets.get(plan.target.name)
    baseline = tgt.baseline_bytes_per_param if tgt is not None else 2.0
    return 8 * baseline * after / before if before else 0.0


def _show_size(plan, k) -> None:
    """The predicted size against the budget, and a decoder's runtime memory with its KV cache."""
    from compressadvise.ui.render import human_bytes, out

    p = plan.prediction
    if p:
        budget = ""
        if p.meets_size_budget is not None:
            budget = "  [green]meets the size budget[/]" if p.meets_size_budget else "  [red]misses the size budget[/]"
        bits = _bits(p.bytes_after, p.bytes_before, plan, k)
        out.print(f"\nsize: {human_bytes(p.bytes_before)} -> {human_bytes(p.bytes_after)} "
                  f"({p.ratio:.2f}x, {bits:.2f} bits per weight with scales and LUTs) [dim](estimate)[/]{budget}")
    if plan.memory is not None:
        m = plan.memory
        out.print(f"runtime memory at {m.context_length:,} tokens: weights {human_bytes(m.weights_bytes)} + KV cache "
                  f"{human_bytes(m.kv_cache_bytes)} = {human_bytes(m.total_bytes)} [dim](estimate; {m.basis})[/]")


def show_plan(plan, *, show_trace: bool = False) -> None:
    from rich.table import Table

    from compressadvise.knowledge.base import builtin
    from compressadvise.plan.engine import step_text

    from compressadvise.ui.render import bar, human_bytes, out

    p = plan.prediction
    out.print(f"[bold]Plan[/] for {plan.model.source} on [bold]{plan.target.name}[/] (OS {plan.target.os})")
    if not plan.steps:
        out.print("[yellow]no compression step fired[/]: see the advice below and `--trace`")
    k = builtin()
    for i, s in enumerate(plan.steps, 1):
        params = step_text(k, s)
        out.print(f"\n[bold]{i}. {s.technique}[/] ({s.slot}) {params}")
        out.print(f"   why: {s.why}  [dim][{', '.join(s.rules)}][/]")
        out.print(f"   compresses {len(s.layers)} layer(s); size after this step: "
                  f"{human_bytes(s.predicted_bytes_after or 0)} [dim](estimate)[/]")
        for name, ov in s.op_name_params.items():
            out.print(f"   override {name}: " + ", ".join(f"{k}={v}" for k, v in ov.items()))
        for sk in s.skipped:
            out.print(f"   [yellow]skip[/] {sk.layer}: {sk.reason} [dim][{sk.code}][/]")
    _show_size(plan, k)
    if plan.ways_forward:
        out.print("\n[bold]Ways forward[/] [dim](to the size budget; ranked: those that reach it first)[/]")
        for w in plan.ways_forward:
            size = f" -> {human_bytes(w.predicted_bytes)} [dim](estimate)[/]" if w.predicted_bytes else ""
            out.print(f" • [bold]{w.code}[/] {w.message}{size}" + (f" [dim]({w.cost})[/]" if w.cost else ""))
    if plan.fidelity is not None:
        show_fidelity(plan.fidelity)
    big = sorted(plan.layers, key=lambda x: -x.bytes_before)[:12]
    if big:
        total = max(p.bytes_before if p else 1, 1)
        t = Table(title="Largest layers", show_edge=False)
        for col in ("layer", "setting", "before", "after", "bits/w", "share of model"):
            t.add_column(col, justify="right" if col in ("before", "after", "bits/w") else "left", overflow="fold")
        for x in big:
            t.add_row(x.name, x.setting, human_bytes(x.bytes_before), human_bytes(x.bytes_after),
                      f"{_bits(x.bytes_after, x.bytes_before, plan, k):.2f}",
                      bar(x.bytes_before / total, 10) + f" {x.bytes_before / total:.0%}")
        out.print(t)
    show_advice(plan, k)
    from compressadvise.ui.placement_view import show_placement

    show_placement(plan.placement)
    fired = [e for e in plan.trace if e.status == "fired"]
    other = [e for e in plan.trace if e.status in ("outranked", "unsupported")]
    out.print(f"\n[dim]rules fired: {', '.join(e.code for e in fired) or 'none'}[/]")
    for e in other:
        out.print(f"[dim]{e.code} {e.status}: {e.detail}[/]")
    if show_trace:
        for e in plan.trace:
            if e.status == "not_matched":
                out.print(f"[dim]{e.code} not matched: {e.detail}[/]")
