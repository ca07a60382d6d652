"""Markdown for rules, techniques and targets: the one text behind `explain` and the docs site."""
from __future__ import annotations

from .knowledge import SIZE_VARIABLES, CompiledRule, Knowledge
from .schema import Target, Technique


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "(technique defaults)"


def rule_markdown(k: Knowledge, cr: CompiledRule, *, link_prefix: str = "") -> str:
    r = cr.rule
    a = r.action
    lines = [f"# {r.code}: {r.title}", ""]
    lines += [f"**Playbook:** `{cr.playbook}` · **Scope:** {r.scope} · **Priority:** {r.priority}", ""]
    lines += ["## What it does", ""]
    if a.kind == "compress":
        sel = ""
        if a.layers:
            parts = []
            if a.layers.types:
                parts.append("types " + ", ".join(a.layers.types))
            if a.layers.names:
                parts.append("names " + ", ".join(a.layers.names))
            if a.layers.where:
                parts.append(f"where `{a.layers.where}`")
            sel = " on " + "; ".join(parts)
        lines.append(f"Proposes a **{a.technique}** step ({_params(a.params)}){sel}.")
    elif a.kind == "override":
        lines.append(f"On matching layers, overrides the {a.technique or 'step'} settings: {_params(a.params)}.")
    elif a.kind == "keep":
        slots = ", ".join(a.slots) if a.slots else "every"
        lines.append(f"Keeps matching layers out of {slots} compression step(s)"
                     + (f" of technique {a.technique}" if a.technique else "") + ".")
    else:
        lines.append(f"Advises: {a.message}")
    lines += ["", "## Why", "", r.why, "", r.rationale.strip(), ""]
    lines += ["## When it fires", "", "```cel", r.when, "```", ""]
    if r.example:
        lines += ["## Example", "", r.example.strip(), ""]
    lines += ["## Sources", ""]
    for c in r.citation:
        lines.append(f"- {c.text()}" + (f" ({c.note})" if c.note else ""))
    lines += ["", f"Defined in `{cr.file.split('/')[-2]}/{cr.file.split('/')[-1]}`, line {cr.line}."]
    return "\n".join(lines) + "\n"


def technique_markdown(k: Knowledge, t: Technique) -> str:
    lines = [f"# {t.title}", "", f"`{t.name}` · slot: {t.slot} · data needed: {t.data}"
             + (" · guidance only" if t.guidance_only else ""), "", t.summary.strip(), ""]
    if t.parameters:
        lines += ["## Parameters", "", "| name | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
        for name, p in t.parameters.items():
            allowed = ", ".join(map(str, p.choices)) if p.choices else (
                f"{p.min if p.min is not None else ''}..{p.max if p.max is not None else ''}")
            lines.append(f"| `{name}` | {p.type} | {p.default} | {allowed} | {p.description} |")
        lines.append("")
    if t.size:
        lines += ["## Size formula (estimate)", "", "Bytes of one weight tensor:", "", "```cel", t.size.formula, "```", ""]
        if t.size.note:
            lines += [t.size.note, ""]
        lines += ["| variable | meaning |", "| --- | --- |"]
        lines += [f"| `{v}` | {d} |" for v, d in SIZE_VARIABLES.items() if v in t.size.formula]
        lines.append("")
    if t.requires:
        lines += ["## Runtime modes it needs", ""]
        lines += [f"- `{r.mode}`" + (f" when `{r.when}`" if r.when else " always") for r in t.requires]
        lines.append("")
        lines += ["## Support by target", "", "| target | mode | min OS | behaviour |", "| --- | --- | --- | --- |"]
        for tgt in sorted(k.targets.values(), key=lambda x: x.name):
            for req in t.requires:
                m = tgt.mode(req.mode)
                if m is None:
                    lines.append(f"| {tgt.name} | `{req.mode}` | - | unsupported |")
                else:
                    os_txt = f"{tgt.os_family or 'OS'} {m.min_os}" if m.min_os else "any"
                    lines.append(f"| {tgt.name} | `{req.mode}` | {os_txt} | {m.behaviour} |")
        lines.append("")
    if t.backends:
        lines += ["## Backends", ""]
        lines += [f"- **{b.backend}**: `{b.config}`" + (f" ({b.note})" if b.note else "") for b in t.backends]
        lines.append("")
    if t.risks:
        lines += ["## Risks", ""] + [f"- {x}" for x in t.risks] + [""]
    lines += ["## Sources", ""] + [f"- {c.text()}" for c in t.citation]
    return "\n".join(lines) + "\n"


def target_markdown(k: Knowledge, t: Target) -> str:
    lines = [f"# {t.title}", "", f"`{t.name}` · vendor: {t.vendor} · kind: {t.kind} · compute units: "
             f"{', '.join(t.compute_units)} · backends: {', '.join(t.backends)}", ""]
    if t.os_family:
        lines += [f"OS: {t.os_family} {t.min_os}+ (default for planning: {t.default_os}). "
                  f"Uncompressed weights cost {t.baseline_bytes_per_param:g} bytes each.", ""]
    lines += ["## Compression modes", "", "| mode | min OS | behaviour | note |", "| --- | --- | --- | --- |"]
    for m in t.modes:
        lines.append(f"| `{m.mode}` | {m.min_os or 'any'} | {m.behaviour} | {m.note or ''} |")
    lines += ["", "## Figures", "", "| figure | value | source |", "| --- | --- | --- |"]
    for name, f in t.figures.items():
        lines.append(f"| {name} | {f.value:g} {f.unit} | {f.source}{' (' + f.note + ')' if f.note else ''} |")
    if t.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in t.notes]
    lines += ["", "## Sources", ""] + [f"- {c.text()}" for c in t.citation]
    return "\n".join(lines) + "\n"
