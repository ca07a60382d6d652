"""Walkthrough stage 4: the recommended plan, reviewed step by step (accept, skip or change)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compressadvise.errors import CompressAdviseError, InvalidKnowledge
from compressadvise.ui.walkthrough_session import PLAN_FILE, StepDecision
from compressadvise.ui.walkthrough_ui import Context, _esc

if TYPE_CHECKING:
    from compressadvise.knowledge.schema import Plan


# ------------------------------------------------------------------ 4. recommendations
def _plan_line(plan: "Plan", budget_mb: float) -> str:
    from compressadvise.ui.render import human_bytes

    p = plan.prediction
    if p is None:
        return ""
    verdict = ""
    if budget_mb:
        ok = p.bytes_after / 1e6 <= budget_mb
        verdict = f"  [{'green' if ok else 'red'}]{'meets' if ok else 'misses'} the {budget_mb:g} MB budget[/]"
    return (f"predicted size: {human_bytes(p.bytes_before)} -> {human_bytes(p.bytes_after)} "
            f"({p.ratio:.2f}x) [dim](estimate)[/]{verdict}")


def _show_step(ctx: Context, i: int) -> None:
    from rich.markup import escape as e

    from compressadvise.ui.render import human_bytes

    ui, k, step = ctx.ui, ctx.knowledge, ctx.plan.steps[i]
    tech = k.techniques.get(step.technique)
    params = ", ".join(f"{a}={b}" for a, b in step.params.items() if a != "weight_threshold")
    ui.say(f"\n[bold]Step {i + 1} of {len(ctx.plan.steps)}: {tech.title if tech else step.technique}[/] ({step.slot})")
    ui.say(f"  settings: {params}")
    ui.say(f"  why: {e(step.why)}")
    for code in step.rules:
        cr = k.rules.get(code)
        if cr is None:
            continue
        cites = "; ".join(c.text() for c in cr.rule.citation)
        ui.say(f"  lesson [bold]{code}[/] {e(cr.rule.title)}\n    [dim]source: {e(cites)}[/]")
    ui.say(f"  compresses {len(step.layers)} layer(s): {', '.join(step.layers) or 'none'}")
    for name, ov in step.op_name_params.items():
        ui.say(f"  override {name}: " + ", ".join(f"{a}={b}" for a, b in ov.items()))
    for sk in step.skipped:
        ui.say(f"  [yellow]keeps[/] {sk.layer}: {e(sk.reason)} [dim]\\[{sk.code}][/]")
    ui.say(f"  size after this step: {human_bytes(step.predicted_bytes_after or 0)} [dim](estimate)[/]")


def _change_step(ctx: Context, i: int) -> list[str]:
    """Let the user edit bits, granularity, group/block size and kept layers; re-predict live."""
    from compressadvise.plan import whatif

    ui, k, s = ctx.ui, ctx.knowledge, ctx.session
    changes: list[str] = []
    while True:
        step = ctx.plan.steps[i]
        spec = k.technique(step.technique).parameters
        options = [(name, f"now {step.params.get(name, spec[name].default)}") for name in _editable(step.params, spec)]
        options.append(("keep", "keep layers at full precision: " + (", ".join(step.layers) or "none left")))
        options.append(("done", "finish changing this step"))
        what = ui.choose("Change what", "", options, "done")
        if what == "done":
            return changes
        try:
            if what == "keep":
                names = ui.text("Layers to keep (comma-separated)", "they stay at fp16; the size estimate updates", "")
                chosen = [n.strip() for n in names.split(",") if n.strip()]
                if not chosen:
                    continue
                ctx.plan = whatif.keep_layers(ctx.plan, i, chosen, ctx.report, k)
                changes.append(f"keep {', '.join(chosen)}")
            else:
                p = spec[what]
                current = step.params.get(what, p.default)
                if p.choices:
                    raw = ui.choose(what, p.description, [(str(c), "") for c in p.choices], str(current))
                else:
                    raw = ui.text(what, p.description, str(current))
                value = _typed(raw, p.type)
                ctx.plan = whatif.set_param(ctx.plan, i, what, value, ctx.report, k)
                changes.append(f"{what}={value}")
        except (InvalidKnowledge, ValueError) as e:
            ui.say(f"  [red]{_esc(e.one_line() if isinstance(e, CompressAdviseError) else str(e))}[/]")
            continue
        ui.say(f"  {_plan_line(ctx.plan, s.max_size_mb)}")
        skipped = [sk for sk in ctx.plan.steps[i].skipped if sk.code == "backend"]
        for sk in skipped:
            ui.say(f"  [yellow]backend skips[/] {sk.layer}: {_esc(sk.reason)}")


def _editable(params: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """The parameters a newcomer may change; group/block size only with their granularity."""
    needs = {"group_size": "per_grouped_channel", "block_size": "per_block"}
    return [name for name in ("nbits", "granularity", "group_size", "block_size", "sparsity")
            if name in spec and (name not in needs or params.get("granularity") == needs[name])]


def _typed(raw: str, kind: str) -> Any:
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return raw.lower() in ("1", "true", "yes", "y")
    return raw


def stage_plan(ctx: Context) -> None:
    from compressadvise.plan.engine import recommend
    from compressadvise.plan.planfile import save_plan
    from compressadvise.knowledge.schema import Plan

    ui, s = ctx.ui, ctx.session
    ui.heading(4, "Recommendations")
    if s.plan is None:
        ctx.plan = recommend(ctx.report, target=s.target, os=s.os, knowledge=ctx.knowledge, constraints={
            "max_size_mb": s.max_size_mb, "max_latency_ms": s.max_latency_ms,
            "max_accuracy_drop": s.max_accuracy_drop, "data": s.data})
        s.plan, s.reviewed = ctx.plan.model_dump(mode="json"), 0
        ctx.save()
    else:
        ctx.plan = Plan.model_validate(s.plan)
        ui.say(f"(continuing the review at step {s.reviewed + 1})")
    ui.say(f"{len(ctx.plan.steps)} step(s) for {ctx.plan.target.name} (OS {ctx.plan.target.os}); "
           + _plan_line(ctx.plan, s.max_size_mb))
    if not ctx.plan.steps:
        ui.say("[yellow]no compression step fired for these answers[/]: see the advice below")
    i = s.reviewed
    while i < len(ctx.plan.steps):
        _show_step(ctx, i)
        tech = ctx.plan.steps[i].technique
        action = ui.choose("Accept, skip or change this step", "skip drops it from the plan; change edits its settings",
                           [("accept", ""), ("skip", ""), ("change", "")], "accept")
        changes: list[str] = []
        if action == "skip":
            from compressadvise.plan.whatif import drop_step

            ctx.plan = drop_step(ctx.plan, i, ctx.report, ctx.knowledge)
            ui.say(f"  step dropped; {_plan_line(ctx.plan, s.max_size_mb)}")
        elif action == "change":
            changes = _change_step(ctx, i)
            i += 1
        else:
            i += 1
        s.decisions.append(StepDecision(step=len(s.decisions) + 1, technique=tech, action=action, changes=changes))
        s.plan, s.reviewed = ctx.plan.model_dump(mode="json"), i
        ctx.save()
    if ctx.plan.advisories:
        from rich.markup import escape

        ui.say("\n[bold]Advice from the playbooks[/]")
        for a in ctx.plan.advisories[:8]:
            where = f" ({', '.join(a.layers[:3])}{'...' if len(a.layers) > 3 else ''})" if a.layers else ""
            ui.say(f" • [bold]{a.code}[/] {escape(a.message)}{where}")
    save_plan(ctx.plan, ctx.out / PLAN_FILE)
    ui.say(f"\nplan written to [bold]{ctx.out / PLAN_FILE}[/]; " + _plan_line(ctx.plan, s.max_size_mb))
