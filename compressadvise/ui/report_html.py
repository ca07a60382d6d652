"""The report's HTML page: the Vega runtime, inlined assets and the page's sections."""
from __future__ import annotations

import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from compressadvise.fsutil import write_text_atomic
from compressadvise.ui.render import human_bytes
from compressadvise.ui.report_built import built_html
from compressadvise.ui.report_charts import _alt, _changed, _vlc
from compressadvise.ui.report_data import LayerRow, ReportData, SummaryRow
from compressadvise.ui.report_whatif import whatif_html
from compressadvise.ui.report_markup import _badge, _e, _qty
from compressadvise.ui.report_rules import link_codes, rule_link, rules_html


# ------------------------------------------------------------------ HTML
def vl_version() -> str:
    """The Vega-Lite version Altair writes, as vl-convert names it (e.g. '6.4')."""
    alt, vlc = _alt(), _vlc()
    want = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    known = vlc.get_vegalite_versions()
    return want if want in known else known[-1]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "compressadvise"


def vega_runtime() -> str:
    """Vega, Vega-Lite and Vega-Embed as one script, bundled offline by vl-convert (cached:
    building it takes a few seconds). vl-convert's Vega-only bundle leaves `vega` null, so the
    page carries the full bundle (~0.9 MB) and draws the precompiled Vega specs with Vega-Embed."""
    import importlib.metadata

    vlc = _vlc()
    key = (f"vega-{vlc.get_vega_version()}-embed-{vlc.get_vega_embed_version()}"
           f"-vlc-{importlib.metadata.version('vl-convert-python')}.js")
    path = cache_dir() / key
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        pass
    js = vlc.javascript_bundle()
    try:
        write_text_atomic(path, js)
    except OSError:
        pass  # a read-only home only costs the rebuild next time
    return js


def _asset(name: str) -> str:
    return resources.files("compressadvise.ui").joinpath("report_assets", name).read_text(encoding="utf-8")


def _json_in_script(text: str) -> str:
    """JSON inside <script> must not close it early: '<' only occurs inside JSON strings,
    where the escape '\\u003c' means the same character."""
    return text.replace("<", "\\u003c")


def _js_in_script(text: str) -> str:
    """Code inside <script>: only a literal '</script' or '<!--' could end or confuse the
    element. A blanket '</' escape would corrupt regular expressions such as /</g."""
    text = re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE)
    return text.replace("<!--", "<\\!--")


def _num(v: float | None, digits: int = 4) -> str:
    if v is None:
        return "—"
    if abs(v) >= 1e8:
        return "identical" if v > 0 else "−∞"
    return f"{v:,.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"


def render_html(data: ReportData, *, runtime: str | None = None) -> str:
    """The self-contained page: styles, the Vega runtime, chart specs and the table inlined."""
    vlc = _vlc()
    version = vl_version()
    specs = {c.id: vlc.vegalite_to_vega(c.spec, vl_version=version) for c in data.charts}
    runtime = vega_runtime() if runtime is None and specs else (runtime or "")
    body = [
        _header(data),
        built_html(data.built),
        _summary_html(data),
        _charts_html(data, specs),
        _plan_html(data),
        whatif_html(data),
        _placement_html(data),
        _table_html(data),
        _notes_html(data),
        rules_html(data),
    ]
    spec_json = _json_in_script(json.dumps(specs, separators=(",", ":"), allow_nan=False))
    csp = ("default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; style-src 'unsafe-inline'; "
           "img-src data:; font-src data:; connect-src 'none'; base-uri 'none'; form-action 'none'")
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(data.title)}</title>", f"<style>{_asset('report.css')}</style>", "</head>",
        "<body>", *body,
        f'<script type="application/json" id="chart-specs">{spec_json}</script>',
        # Inert until report.js runs it after DOMContentLoaded: the table is usable at once and
        # ~1 MB of chart code does not delay the page opening.
        f'<script type="text/plain" id="vega-runtime">{_js_in_script(runtime)}</script>' if runtime else "",
        f"<script>{_js_in_script(_asset('report.js'))}</script>",
        "</body>", "</html>", ""])


def _header(d: ReportData) -> str:
    target = f"{d.target} (OS {d.os})" if d.target else "no target"
    read = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in d.inputs.items())
    model = d.model or d.source
    run = f" · apply folder <code>{_e(d.source)}</code>" if "manifest" in d.inputs else ""
    return (f'<header><h1>{_e(d.title)}</h1><p class="meta">model <code>{_e(model)}</code>{run} · target '
            f"<b>{_e(target)}</b> · {len(d.layers)} layers · generated {_e(d.generated)} by compressadvise "
            f"{_e(d.version)}</p>"
            '<p class="legend"><span class="badge measured">measured</span> run on real samples or a device · '
            '<span class="badge estimate">estimate</span> from formulas or a roofline model, not run</p>'
            + (f'<details class="inputs"><summary>inputs</summary><ul>{read}</ul></details>' if read else "")
            + "</header>")


def _summary_html(d: ReportData) -> str:
    shown = [r for r in d.summary if r.group == "main" or (r.group == "built" and d.built is None)]
    internal = [r for r in d.summary if r.group == "internal"]
    head = ("<thead><tr><th>what</th><th class=num>before</th><th class=num>after</th><th class=num>change</th>"
            "<th>basis</th><th>note</th></tr></thead>")
    folded = ""
    if internal:
        folded = (f'<details class="internal"><summary>{len(internal)} intermediate size estimate(s) from apply'
                  f'</summary><table class="summary">{head}<tbody>{"".join(map(_summary_row, internal))}'
                  "</tbody></table></details>")
    return (f'<section id="summary"><h2>Before / after</h2><table class="summary">{head}'
            f"<tbody>{''.join(map(_summary_row, shown))}</tbody></table>{folded}{_budgets_html(d)}</section>")


def _summary_row(r: SummaryRow) -> str:
    change = ""
    if r.before not in (None, 0) and r.after is not None:
        change = f"{(r.after - r.before) / abs(r.before):+.1%}"
    basis = _badge(r.basis)
    if r.before_basis and r.before is not None:
        basis = f"before {_badge(r.before_basis)} after {basis}"
    return (f"<tr><td>{_e(r.metric)}</td><td class=num>{_qty(r.before, r.unit)}</td>"
            f"<td class=num>{_qty(r.after, r.unit)}</td><td class=num>{change}</td><td>{basis}</td>"
            f"<td class=note>{_e(r.note)}</td></tr>")


def _budgets_html(d: ReportData) -> str:
    if not d.budgets:
        return ""
    items = "".join(
        f'<li class="{"pass" if b.get("passed") else "fail"}"><b>{_e(b.get("name"))}</b>: '
        f'{"met" if b.get("passed") else "MISSED"} — {_qty(b.get("value"), b.get("unit", ""))} '
        f'vs limit {_qty(b.get("limit"), b.get("unit", ""))} ({_e(b.get("basis", ""))}) {_e(b.get("detail", ""))}</li>'
        for b in d.budgets)
    return f'<h3>Budgets</h3><ul class="budgets">{items}</ul>'


def _charts_html(d: ReportData, specs: dict[str, Any]) -> str:
    figs = [f'<figure class="chart" id="fig-{_e(c.id)}"><div class="vega" data-chart="{_e(c.id)}" '
            f'role="img" aria-label="{_e(c.title)}"></div><figcaption>{_e(c.title)} {_badge(c.basis)}</figcaption>'
            "</figure>" for c in d.charts if c.id in specs]
    missing = "".join(f'<li data-omitted="{_e(o.id)}"><b>{_e(o.title)}</b>: {_e(o.reason)}</li>' for o in d.omitted)
    omitted = f'<div class="omitted"><h3>Not shown</h3><ul>{missing}</ul></div>' if missing else ""
    return (f'<section id="charts"><h2>Hot spots and trade-offs</h2><p class="hint">Click a layer in a chart or '
            'a row of the table: it is selected in both and highlighted in every layer chart.</p>'
            '<p id="selection" class="selection" aria-live="polite" hidden>selected: <code id="selected-name"></code> '
            '<button type="button" id="show-selected">show in the table</button> '
            '<button type="button" id="clear-selection">clear</button></p>'
            f"<div class=grid>{''.join(figs)}</div>{omitted}</section>")


def _plan_html(d: ReportData) -> str:
    if not d.steps and not d.advice:
        return '<section id="plan"><h2>The plan</h2><p>No compression step fired for this model and target.</p></section>'
    parts = ['<section id="plan"><h2>The plan and its reasons</h2><ol class="steps">']
    for s in d.steps:
        params = ", ".join(f"{k}={v}" for k, v in s.params.items())
        size = f" · size after this step {human_bytes(s.predicted_bytes_after)} {_badge('estimate')}" \
            if s.predicted_bytes_after is not None else ""
        skipped = "".join(f"<li><code>{_e(x['layer'])}</code>: {_e(x['reason'])}"
                          + (f" [{rule_link(str(x['code']), d.rules)}]" if x.get("code") else "") + "</li>"
                          for x in s.skipped)
        overrides = "".join(f"<li><code>{_e(n)}</code>: {_e(', '.join(f'{k}={v}' for k, v in o.items()))}</li>"
                            for n, o in s.overrides.items())
        parts.append(
            f"<li><h3>{_e(s.technique)} <small>({_e(s.slot)})</small></h3><p><code>{_e(params)}</code></p>"
            f"<p>why: {_e(s.why)}</p><p>compresses {len(s.layers)} layer(s){size}</p>"
            + (f"<details><summary>{len(s.skipped)} layer(s) left out</summary><ul>{skipped}</ul></details>" if skipped else "")
            + (f"<details><summary>{len(s.overrides)} per-layer override(s)</summary><ul>{overrides}</ul></details>"
               if overrides else "")
            + f"<ul class=rules>{''.join(_rule_item(r.code, r.title, d) for r in s.rules)}</ul></li>")
    parts.append("</ol>")
    if d.advice:
        parts.append('<h3>Advice</h3><ul class="advice">')
        for a in d.advice:
            where = f" <small>({_e(', '.join(a.layers[:6]))}{'…' if len(a.layers) > 6 else ''})</small>" if a.layers else ""
            rule = _rule_item(a.rule.code, a.rule.title, d, "span")
            parts.append(f"<li>{link_codes(a.message, d.rules)}{where}<br>{rule}</li>")
        parts.append("</ul>")
    if d.trace:
        rows = "".join(f"<li>{rule_link(str(t['code']), d.rules)} {_e(t['status'])}: "
                       f"{link_codes(str(t['detail']), d.rules)}</li>" for t in d.trace)
        parts.append(f"<details><summary>rule trace</summary><ul>{rows}</ul></details>")
    parts.append("</section>")
    return "".join(parts)


def _rule_item(code: str, title: str, d: ReportData, tag: str = "li") -> str:
    """A cited rule: its link to the embedded explanation, and its title."""
    return f"<{tag} class=ruleitem>rule {rule_link(code, d.rules)} {_e(title)}</{tag}>"


COLUMNS: list[tuple[str, str, str]] = [
    # (key, header, type) -- type "num" sorts numerically, "str" alphabetically
    ("index", "#", "num"), ("name", "layer", "str"), ("type", "type", "str"), ("params", "params", "num"),
    ("before", "size now", "num"), ("after", "after plan", "num"), ("saved", "saved", "num"),
    ("time", "time share (est.)", "num"), ("sens", "sensitivity", "num"), ("drift", "drift SNR dB", "num"),
    ("setting", "setting", "str"), ("applied", "applied", "str"),
]


def _placement_html(d: ReportData) -> str:
    """The ops that leave the accelerator and the unit switches (an estimate, with its rule)."""
    p = d.placement
    if not p:
        return ""
    head = (f'<section id="placement"><h2>Placement on {_e(p["target"])}</h2><p>{_badge("estimate")} '
            f'from the {_e(p["basis"])}, {p["ops_total"]} ops. ')
    if not p["fallback"]:
        return head + f'No op of the target\'s fallback table: every op is expected on the {_e(p["accelerator"])}.</p></section>'
    rows = "".join(f'<tr class="hot"><td><code>{_e(f["op"])}</code></td><td>{_e(f["layer"] or "-")}</td>'
                   f'<td>{_e(f["runs_on"])}</td><td>{_e(f["reason"])}</td><td>{_e(f["confidence"])}</td>'
                   f'<td>{_e(f["source"])}</td></tr>' for f in p["fallback"])
    switches = "".join(f'<li>{_e(b["from_unit"])} &rarr; {_e(b["to_unit"])}: <code>{_e(b["producer"])}</code> '
                       f'&rarr; <code>{_e(b["consumer"])}</code></li>' for b in p["boundaries"][:20])
    notes = "".join(f"<li>{_e(n)}</li>" for n in p["notes"])
    return (head + f'{len(p["fallback"])} op(s) the {_e(p["accelerator"])} lacks fall back, with '
            f'{len(p["boundaries"])} switch(es) between units (rule {rule_link(str(p["rule"]), d.rules)}).</p>'
            '<table class="placement"><thead><tr><th>op</th><th>layer</th><th>runs on</th><th>why</th>'
            f'<th>confidence</th><th>source</th></tr></thead><tbody>{rows}</tbody></table>'
            + (f'<h3>Switches</h3><ul>{switches}</ul>' if switches else "")
            + (f'<ul class="notes">{notes}</ul>' if notes else "")
            + (_rule_item(d.placement_rule.code, d.placement_rule.title, d, "p") if d.placement_rule else "")
            + "</section>")


def _bar_cell(value: float, share: float, text: str, cls: str) -> str:
    """A number with an inline bar: one element (a CSS gradient), so 1,000 rows stay light."""
    width = max(0.0, min(100.0, share * 100))
    return f'<td class="num {cls}" data-v="{value:.6g}" style="--w:{width:.1f}%">{text}</td>'


def _table_html(d: ReportData) -> str:
    total_b = sum(r.bytes_before for r in d.layers) or 1
    total_t = sum(r.latency_ms_before or 0.0 for r in d.layers) or 0.0
    has_drift = any(r.drift_snr_db is not None for r in d.layers)
    has_applied = any(r.applied is not None for r in d.layers)
    cols = [c for c in COLUMNS if (c[0] != "drift" or has_drift) and (c[0] != "applied" or has_applied)]
    head = "".join(f'<th data-key="{k}" data-type="{t}" tabindex="0" aria-sort="none"'
                   f'{_col_title(k, d)}>{_e(h)}</th>' for k, h, t in cols)
    body = [_row_html(r, total_b, total_t, has_drift, has_applied) for r in d.layers]
    types = sorted({r.type for r in d.layers})
    options = "".join(f'<option value="{_e(t)}">{_e(t)}</option>' for t in types)
    return (
        '<section id="layers-section"><h2>Layers</h2><div class="controls">'
        '<input id="q" type="search" placeholder="search layer or setting" aria-label="search layers">'
        f'<select id="type-filter" aria-label="layer type"><option value="">all types</option>{options}</select>'
        '<label><input id="changed-only" type="checkbox"> only layers the plan changes</label>'
        f'<span id="count" aria-live="polite">{len(d.layers)} of {len(d.layers)} layers</span></div>'
        f'<div class="tablewrap"><table id="layers"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody>'
        "</table></div></section>")


def _col_title(key: str, d: ReportData) -> str:
    titles = {
        "before": "fp16 bytes now (estimate); bar: share of the model",
        "after": "bytes after the plan (estimate); bar: share of the model now",
        "time": "share of the estimated target latency before the plan (roofline estimate)",
        "sens": (f"measured: {d.sensitivity_metric}" if d.sensitivity_metric else "not measured yet"),
        "drift": "measured by verify: SNR of this layer's output vs the original (higher is closer)",
        "applied": "what `apply` did to this layer (from its manifest)",
    }
    return f' title="{_e(titles[key])}"' if key in titles else ""


def _row_html(r: LayerRow, total_b: int, total_t: float, has_drift: bool, has_applied: bool) -> str:
    """One table row; text cells sort by their text, number cells by data-v ('' = no value)."""
    saved = r.bytes_before - r.bytes_after
    time = r.latency_ms_before
    cells = [
        f'<td class=num data-v="{r.index}">{r.index}</td>',
        f"<td class=name>{_e(r.name)}</td>",
        f"<td>{_e(r.type)}</td>",
        f'<td class=num data-v="{r.params}">{r.params:,}</td>',
        _bar_cell(r.bytes_before, r.bytes_before / total_b, human_bytes(r.bytes_before), "b"),
        _bar_cell(r.bytes_after, r.bytes_after / total_b, human_bytes(r.bytes_after), "b after"),
        f'<td class=num data-v="{saved}">{human_bytes(saved) if saved else "—"}</td>',
        _bar_cell(time / total_t, time / total_t, f"{time / total_t:.1%}", "b time") if time is not None and total_t
        else '<td class=num data-v="">—</td>',
        _num_cell(r.sensitivity, 4),
    ]
    if has_drift:
        cells.append(_num_cell(r.drift_snr_db, 3))
    cells.append(f"<td class=setting>{_e(r.setting)}</td>")
    if has_applied:
        missed = (r.applied or "").startswith("planned, not built")
        cells.append(f"<td class=notbuilt>{_e(r.applied)}</td>" if missed else f"<td>{_e(r.applied or '—')}</td>")
    return f'<tr data-changed="{int(_changed(r.setting))}">{"".join(cells)}</tr>'


def _num_cell(v: float | None, digits: int) -> str:
    return f'<td class=num data-v="{"" if v is None else f"{v:.6g}"}">{_num(v, digits)}</td>'


def _notes_html(d: ReportData) -> str:
    if not d.notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in d.notes)
    return f'<section id="notes"><h2>Notes</h2><ul>{items}</ul></section>'
