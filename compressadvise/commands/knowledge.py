"""`rules`, `explain`, `techniques`, `targets`, `playbooks validate`: read the knowledge base.

These commands must not import torch (they start in well under half a second).
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from compressadvise.commands.common import JSON, TARGET, check_name
from compressadvise.ui.cli_help import complete_explainable, complete_target, complete_technique

PLAYBOOKS_OPT = typer.Option(None, "--playbooks", help="Extra playbook folder or file (repeatable), validated like the built-in ones.")
playbooks_app = typer.Typer(help="Tools for playbook authors.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("rules")(rules_cmd)
    app.command("explain")(explain_cmd)
    app.command("techniques")(techniques_cmd)
    app.command("targets")(targets_cmd)
    app.add_typer(playbooks_app, name="playbooks")


def _knowledge(extra: list[str] | None):
    from compressadvise.knowledge.base import builtin, load_knowledge

    return load_knowledge(extra) if extra else builtin()


def rules_cmd(
    playbook: Optional[str] = typer.Option(None, "--playbook", help="Only rules of this playbook."),
    technique: Optional[str] = typer.Option(None, "--technique", autocompletion=complete_technique, help="Only rules acting with this technique."),
    target: Optional[str] = TARGET,
    playbooks: Optional[List[str]] = PLAYBOOKS_OPT,
    json_out: bool = JSON,
) -> None:
    """List the expert rules (code, title, scope, action).

    With --target, only the rules that can fire on it (no condition on target facts alone is
    false there at any OS it supports)."""
    k = _knowledge(playbooks)
    rows = list(k.rules.values())
    if playbook:
        check_name("playbook", playbook, list(k.playbooks))
        rows = [r for r in rows if r.playbook == playbook]
    if technique:
        check_name("technique", technique, list(k.techniques))
        rows = [r for r in rows if r.rule.action.technique == technique]
    if target:
        rows = [r for r in rows if _possible_on(r, k.target(target))]
    rows.sort(key=lambda r: r.code)
    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json([{"code": r.code, "title": r.rule.title, "playbook": r.playbook, "scope": r.rule.scope,
                    "action": r.rule.action.kind, "technique": r.rule.action.technique,
                    "priority": r.rule.priority, "when": r.rule.when, "why": r.rule.why} for r in rows])
        return
    from rich.table import Table

    from compressadvise.ui.render import out

    t = Table(show_edge=False)
    for col in ("code", "playbook", "scope", "action", "title"):
        t.add_column(col, overflow="fold")
    for r in rows:
        act = r.rule.action.kind + (f" {r.rule.action.technique}" if r.rule.action.technique else "")
        t.add_row(r.code, r.playbook, r.rule.scope, act, r.rule.title)
    out.print(t)
    out.print(f"[dim]{len(rows)} rule(s); `compressadvise explain CODE` for the full text[/]")


def _possible_on(cr, target) -> bool:
    """False when a condition term that reads only target facts is false for this target
    (at any OS it supports), i.e. the rule can never fire there."""
    import re

    from compressadvise.plan.engine import target_facts

    oses = sorted({target.default_os, target.min_os, *(m.min_os for m in target.modes)}) or [0]
    for text, program in cr.condition.conjuncts:
        spaces = set(re.findall(r"\b(model|layer|target|constraints|step)\.", text))
        if spaces != {"target"}:
            continue
        if not any(program.execute({"target": target_facts(target, os)}) is True for os in oses):
            return False
    return True


def explain_cmd(
    code: str = typer.Argument(..., metavar="NAME", autocompletion=complete_explainable, help="Rule code (e.g. WGT001, case-insensitive), technique name "
                               "(e.g. palettization) or target name (e.g. ane-a17)."),
    playbooks: Optional[List[str]] = PLAYBOOKS_OPT,
    json_out: bool = JSON,
) -> None:
    """Explain one rule (what it does, why, when it fires, an example and its sources), one
    technique (parameters, size formula, where it runs) or one target (modes by OS, when it
    decompresses weights, figures with sources): the same text as its docs page."""
    from compressadvise.knowledge.textdocs import rule_markdown, target_markdown, technique_markdown

    k = _knowledge(playbooks)
    if code.upper() not in k.rules:
        check_name("rule, technique or target", code, [*k.rules, *k.techniques, *k.targets],
                   listing="`compressadvise rules`, `techniques` and `targets` list them")
    if code in k.techniques or code in k.targets:
        item = k.techniques.get(code) or k.targets[code]
        kind = "technique" if code in k.techniques else "target"
        md = technique_markdown(k, item) if kind == "technique" else target_markdown(k, item)
        data = {"explains": kind, **item.model_dump(mode="json"), "markdown": md}
    else:
        cr = k.rule(code)
        md = rule_markdown(k, cr)
        data = {"explains": "rule", "playbook": cr.playbook, "file": cr.file, "line": cr.line,
                **cr.rule.model_dump(mode="json"), "markdown": md}
    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json(data)
        return
    from rich.markdown import Markdown

    from compressadvise.ui.render import is_tty, out

    if not is_tty(out):  # a pipe or a file gets the page's Markdown itself (`explain X > x.md`)
        out.file.write(md if md.endswith("\n") else md + "\n")
        return
    out.print(Markdown(md))


def techniques_cmd(json_out: bool = JSON) -> None:
    """List the compression techniques the knowledge base describes."""
    k = _knowledge(None)
    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json([t.model_dump(mode="json") for t in k.techniques.values()])
        return
    from rich.table import Table

    from compressadvise.ui.render import out

    t = Table(show_edge=False)
    for col in ("name", "slot", "data", "title"):
        t.add_column(col, overflow="fold")
    for tech in sorted(k.techniques.values(), key=lambda x: x.name):
        t.add_row(tech.name, tech.slot + (" (guidance)" if tech.guidance_only else ""), tech.data, tech.title)
    out.print(t)


def targets_cmd(
    name: Optional[str] = typer.Argument(None, autocompletion=complete_target, metavar="[NAME]",
                                         help="One target profile to show in full (modes by OS, figures, the ops "
                                         "its accelerator lacks), each with its source."),
    json_out: bool = JSON,
) -> None:
    """List the target profiles (devices and what they accelerate), or show one in full."""
    k = _knowledge(None)
    check_name("target", name, list(k.targets))
    if name is not None:
        _show_target(k.targets[name], json_out)
        return
    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json([t.model_dump(mode="json") for t in k.targets.values()])
        return
    from rich.table import Table

    from compressadvise.ui.render import out

    t = Table(show_edge=False)
    for col in ("name", "kind", "OS", "accelerated (at default OS)", "title"):
        t.add_column(col, overflow="fold")
    for tgt in sorted(k.targets.values(), key=lambda x: x.name):
        os_txt = f"{tgt.os_family} {tgt.default_os}" if tgt.os_family else "-"
        t.add_row(tgt.name, tgt.kind, os_txt, ", ".join(tgt.accelerates(tgt.default_os)), tgt.title)
    out.print(t)


def _show_target(tgt, json_out: bool) -> None:
    """One profile: its modes, figures and fallback table, each with the source it rests on."""
    from rich.table import Table

    from compressadvise.ui.render import emit_json, out

    if json_out:
        emit_json(tgt.model_dump(mode="json"))
        return
    os_txt = f", {tgt.os_family} {tgt.min_os}+ (default {tgt.default_os})" if tgt.os_family else ""
    out.print(f"[bold]{tgt.name}[/]: {tgt.title} ({tgt.kind}{os_txt})")
    modes = Table(title="Compression modes", show_edge=False)
    for col in ("mode", "from OS", "behaviour", "note"):
        modes.add_column(col)
    for m in tgt.modes:
        modes.add_row(m.mode, str(m.min_os or "-"), m.behaviour, m.note or "")
    out.print(modes)
    figs = Table(title="Figures", show_edge=False)
    for col in ("figure", "value", "source"):
        figs.add_column(col)
    for fname, f in tgt.figures.items():
        figs.add_row(fname, f"{f.value:g} {f.unit}", f.source)
    out.print(figs)
    if tgt.placement is None:
        out.print("ops off the accelerator: none listed for this target (every op is assumed to run on it)")
        return
    p = tgt.placement
    ops = Table(title=f"Ops the {p.accelerator} lacks (they fall back)", show_edge=False)
    for col in ("entry", "Core ML ops", "torch ops", "only when", "runs on", "confidence", "source"):
        ops.add_column(col)
    for f in p.fallback_ops:
        ops.add_row(f.name, ", ".join(f.mil), ", ".join(f.torch) or "-", f.condition() or "-", f.runs_on, f.confidence,
                    f.source)
    out.print(ops)
    out.print(f"switching units: {p.switch} ({p.switch_source})")


@playbooks_app.command("validate")
def validate_cmd(
    paths: Optional[List[Path]] = typer.Argument(None, help="Playbook files or folders; none = the built-in knowledge."),
    json_out: bool = JSON,
) -> None:
    """Validate playbooks (schema, conditions, techniques, duplicate codes) with file:line errors."""
    from compressadvise.knowledge.base import load_knowledge

    k = load_knowledge([str(p) for p in paths or []])
    user = [c for c in k.rules.values() if k.sources.get("origin:" + c.playbook) == "user"] if paths else list(k.rules.values())
    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json({"ok": True, "rules": len(user), "playbooks": sorted({c.playbook for c in user})})
        return
    from compressadvise.ui.render import out

    out.print(f"[green]ok[/]: {len(user)} rule(s) in {len({c.playbook for c in user})} playbook(s) valid")
