"""Markdown for rules, techniques and targets: the one text behind `explain` and the docs site.

`link_prefix` is the path from the page to the reference folder (e.g. "../" for
docs/reference/rules/CODE.md). Empty means no links: the terminal has no pages to link to,
so `explain` gets the same words without the cross references.
"""
from __future__ import annotations

from compressadvise.knowledge.base import SIZE_VARIABLES, CompiledRule, Knowledge
from compressadvise.knowledge.schema import Citation, ModeSupport, Target, Technique

BEHAVIOUR_LEGEND = (
    "*accelerated*: the runtime computes on the compressed form, so it runs faster as well as "
    "smaller; *decompressed*: smaller on disk, expanded before compute (no speed-up, may cost "
    "load time); *unsupported*: the runtime cannot load it at any OS."
)


def cell(text: object) -> str:
    """Table-cell safe text: one line, pipes escaped (a raw `|` would split the cell)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "(technique defaults)"


def _link(name: str, kind: str, link_prefix: str) -> str:
    return f"[{name}]({link_prefix}{kind}/{name}.md)" if link_prefix else f"**{name}**"


def _citations(cites: list[Citation]) -> list[str]:
    return [f"- {c.text()}" + (f" ({c.note})" if c.note else "") for c in cites]


def _selection(rule_layers) -> str:
    parts = []
    if rule_layers.types:
        parts.append("types " + ", ".join(rule_layers.types))
    if rule_layers.names:
        parts.append("names " + ", ".join(rule_layers.names))
    if rule_layers.where:
        parts.append(f"where `{rule_layers.where}`")
    return " on " + "; ".join(parts) if parts else ""


def _action_text(cr: CompiledRule, link_prefix: str) -> str:
    a = cr.rule.action
    tech = _link(a.technique, "techniques", link_prefix) if a.technique else ""
    if a.kind == "compress":
        sel = _selection(a.layers) if a.layers else ""
        return f"Proposes a {tech} step ({_params(a.params)}){sel}."
    if a.kind == "override":
        return f"On matching layers, overrides the {tech or 'step'} settings: {_params(a.params)}."
    if a.kind == "keep":
        slots = ", ".join(a.slots) if a.slots else "every"
        return (f"Keeps matching layers out of {slots} compression step(s)"
                + (f" of technique {tech}" if tech else "") + ".")
    return f"Advises: {a.message}"


def rule_markdown(k: Knowledge, cr: CompiledRule, *, link_prefix: str = "") -> str:
    r = cr.rule
    lines = [f"# {r.code}: {r.title}", ""]
    lines += [f"**Playbook:** `{cr.playbook}` · **Scope:** {r.scope} · **Action:** {r.action.kind} · "
              f"**Priority:** {r.priority}", ""]
    lines += ["## What it does", "", _action_text(cr, link_prefix), ""]
    lines += ["## Why", "", r.why, "", r.rationale.strip(), ""]
    lines += ["## When it fires", "", "```cel", r.when, "```", ""]
    if r.example:
        lines += ["## Example", "", r.example.strip(), ""]
    lines += ["## Sources", ""] + _citations(r.citation)
    lines += ["", f"Defined in `{'/'.join(cr.file.split('/')[-2:])}`, line {cr.line}."]
    return "\n".join(lines) + "\n"


def _allowed(p) -> str:
    if p.choices:
        return ", ".join(map(str, p.choices))
    if p.min is None and p.max is None:
        return ""
    lo = f"{p.min:g}" if p.min is not None else ""
    hi = f"{p.max:g}" if p.max is not None else ""
    return f"{lo}..{hi}"


def _behaviour(t: Target, m: ModeSupport) -> str:
    """A mode's behaviour, with the OS versions whose runtime expands weights at load anyway
    (iOS 16 on the Neural Engine): 'accelerated' alone would contradict the decompression table."""
    if m.behaviour != "accelerated" or not t.decompression:
        return m.behaviour
    family = t.os_family or "OS"
    steps = sorted(t.decompression, key=lambda d: d.min_os)
    at_load = [d for d in steps if d.at == "load"]
    later = [d.min_os for d in steps if d.at != "load" and d.min_os > m.min_os]
    if not at_load or not later or max(d.min_os for d in at_load) >= later[0] or m.min_os >= later[0]:
        return m.behaviour
    first = max(m.min_os, t.min_os or 0)
    span = f"{family} {first}" if later[0] - 1 <= first else f"{family} {first}-{later[0] - 1}"
    return f"decompressed at load on {span}; accelerated from {family} {later[0]}"


def _support_cell(t: Target, mode: str) -> str:
    m = t.mode(mode)
    if m is None or m.behaviour == "unsupported":
        return "unsupported"
    since = f", {t.os_family or 'OS'} {m.min_os}+" if m.min_os else ""
    behaviour = _behaviour(t, m)
    return behaviour if behaviour != m.behaviour else m.behaviour + since


def _support_table(k: Knowledge, t: Technique, link_prefix: str) -> list[str]:
    modes = list(dict.fromkeys(r.mode for r in t.requires))
    lines = ["## Support by target and OS", "", BEHAVIOUR_LEGEND, ""]
    lines += ["| target | " + " | ".join(f"`{m}`" for m in modes) + " |",
              "| --- |" + " --- |" * len(modes)]
    for tgt in sorted(k.targets.values(), key=lambda x: x.name):
        cells = [cell(_support_cell(tgt, m)) for m in modes]
        lines.append(f"| {_link(tgt.name, 'targets', link_prefix)} | " + " | ".join(cells) + " |")
    return lines + [""]


def technique_markdown(k: Knowledge, t: Technique, *, link_prefix: str = "") -> str:
    lines = [f"# {t.title}", "", f"`{t.name}` · slot: {t.slot} · data needed: {t.data}"
             + (" · guidance only" if t.guidance_only else ""), "", t.summary.strip(), ""]
    if t.parameters:
        lines += ["## Parameters", "", "| name | type | default | allowed | meaning |",
                  "| --- | --- | --- | --- | --- |"]
        for name, p in t.parameters.items():
            lines.append(f"| `{name}` | {p.type} | {cell(p.default)} | {cell(_allowed(p))} | {cell(p.description)} |")
        lines.append("")
    if t.size:
        lines += ["## Size formula (estimate)", "", "Bytes of one weight tensor:", "", "```cel",
                  t.size.formula, "```", ""]
        if t.size.note:
            lines += [t.size.note, ""]
        lines += ["| variable | meaning |", "| --- | --- |"]
        lines += [f"| `{v}` | {cell(d)} |" for v, d in SIZE_VARIABLES.items() if v in t.size.formula]
        lines.append("")
    if t.requires:
        lines += ["## Runtime modes it needs", ""]
        lines += [f"- `{r.mode}`" + (f" when `{r.when}`" if r.when else " always") for r in t.requires]
        lines.append("")
        lines += _support_table(k, t, link_prefix)
    if t.backends:
        lines += ["## Backends", ""]
        lines += [f"- **{b.backend}**: `{b.config}`" + (f" ({b.note})" if b.note else "") for b in t.backends]
        lines.append("")
    if t.risks:
        lines += ["## Risks", ""] + [f"- {x}" for x in t.risks] + [""]
    lines += ["## Sources", ""] + _citations(t.citation)
    return "\n".join(lines) + "\n"


def _mode_users(k: Knowledge, mode: str, link_prefix: str) -> str:
    users = sorted(t.name for t in k.techniques.values() if any(r.mode == mode for r in t.requires))
    return ", ".join(_link(u, "techniques", link_prefix) if link_prefix else u for u in users)


def _runtime_facts(t: Target) -> list[str]:
    """When weights are decompressed (what the roofline streams) and whether int8 math is fast."""
    fam = t.os_family or "OS"
    lines = ["", "## Weight decompression", ""]
    if not t.decompression:
        lines.append("None listed: compressed weights are taken to be expanded at load, so the latency "
                     "estimate streams them at full size (no memory-traffic credit).")
    else:
        lines += ["| from | expanded | what it means | source |", "| --- | --- | --- | --- |"]
        for d in sorted(t.decompression, key=lambda d: d.min_os):
            since = f"{fam} {d.min_os}" if d.min_os else "any"
            at = "just in time (compressed bytes streamed)" if d.at == "just_in_time" else "at load (full size streamed)"
            lines.append(f"| {since} | {at} | {cell(d.summary)} | {cell(d.source)} |")
    fast = t.int8_compute
    lines += ["", "Int8 compute: " + (f"{'a fast path' if fast.value else 'no fast path'} ({fast.source})."
                                      if fast else "not stated (taken as no int8 fast path).")]
    return lines


def target_markdown(k: Knowledge, t: Target, *, link_prefix: str = "") -> str:
    lines = [f"# {t.title}", "", f"`{t.name}` · vendor: {t.vendor} · kind: {t.kind} · compute units: "
             f"{', '.join(t.compute_units)} · backends: {', '.join(t.backends)}", ""]
    if t.os_family:
        lines += [f"OS: {t.os_family} {t.min_os}+ (default for planning: {t.default_os}). "
                  f"Uncompressed weights cost {t.baseline_bytes_per_param:g} bytes each.", ""]
    else:
        lines += [f"Uncompressed weights cost {t.baseline_bytes_per_param:g} bytes each.", ""]
    lines += ["## Compression modes", "", BEHAVIOUR_LEGEND, "",
              "| mode | min OS | behaviour | used by | note |", "| --- | --- | --- | --- | --- |"]
    for m in t.modes:
        os_txt = f"{t.os_family or 'OS'} {m.min_os}" if m.min_os else "any"
        lines.append(f"| `{m.mode}` | {os_txt} | {_behaviour(t, m)} | {_mode_users(k, m.mode, link_prefix)} "
                     f"| {cell(m.note or '')} |")
    lines += _runtime_facts(t)
    if t.storage:
        lines += ["", "## Stored wider", "", "Uncompressed layers of these module classes cost more on older OS versions "
                  "(the size prediction counts it):", "", "| modules | before OS | bytes per weight | source |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {', '.join(x.module_types)} | {t.os_family or 'OS'} {x.before_os} | {x.bytes_per_param:g} | {cell(x.source)} |"
                  for x in t.storage]
    lines += ["", "## Figures", "", "| figure | value | source |", "| --- | --- | --- |"]
    for name, f in t.figures.items():
        lines.append(f"| {name} | {f.value:g} {cell(f.unit)} | {cell(f.source)}"
                     f"{cell(' (' + f.note + ')') if f.note else ''} |")
    lines += _placement_table(t)
    if t.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in t.notes]
    lines += ["", "## Sources", ""] + _citations(t.citation)
    return "\n".join(lines) + "\n"


def _placement_table(t: Target) -> list[str]:
    """The ops the accelerator lacks (what `analyze --target` and `recommend` check a graph against)."""
    if t.placement is None:
        return []
    p = t.placement
    lines = ["", f"## Ops the {p.accelerator} lacks", "",
             "Core ML runs these on another unit; `analyze --target`, `recommend` and `report` match a model's op "
             "graph (the converted Core ML program when there is one) against this table (rule TGT010).", "",
             "| entry | Core ML ops | torch ops | only when | runs on | confidence | source |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in p.fallback_ops:
        when = f.condition() or "always"
        src = f"[{cell(f.source)}]({f.url})" if f.url else cell(f.source)
        lines.append(f"| {f.name} | {', '.join(f'`{m}`' for m in f.mil)} | {', '.join(f'`{x}`' for x in f.torch) or '-'} "
                     f"| {when} | {f.runs_on} | {f.confidence} | {src} |")
    return lines + ["", f"Switching units: {cell(p.switch)} ({cell(p.switch_source)})"]
