"""Planned vs built: an `apply` folder's manifest against its plan, per layer and in total. The
report shows it first: a plan that is not what shipped makes every other figure on the page moot."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from compressadvise.ui.report_charts import _changed
from compressadvise.ui.report_data import BuiltLayer, BuiltTotal, BuiltView
from compressadvise.ui.report_markup import _badge, _e, _qty
from compressadvise.ui.report_sensitivity import row_key
from compressadvise.ui.report_summary import gate_text

if TYPE_CHECKING:
    from compressadvise.ui.report import Inputs

SHOWN_ROWS = 25  # more planned layers than this: the ones that differ up front, all in a details


def built_view(inp: Inputs, k: Any) -> BuiltView | None:
    """The gate `apply` recorded, joined with the plan's rows; None without a gate (not an apply folder)."""
    gate = (inp.manifest or {}).get("planned_vs_built")
    if not isinstance(gate, dict) or "layers_planned" not in gate or inp.plan is None:
        return None
    side = str(gate.get("side") or "")
    missed = {str(r["layer"]): str(r.get("reason", "")) for r in gate.get("rows", [])
              if isinstance(r, dict) and "layer" in r}
    records = {x["name"]: x for x in (inp.manifest or {}).get("layers", []) if isinstance(x, dict) and "name" in x}
    view = BuiltView(ok=bool(gate.get("ok")), verdict=gate_text(gate), side=side)
    for p in inp.plan.layers:
        row = _layer(p, records.get(p.name, {}), missed.get(p.name), side, k)
        if row is None:
            view.unchanged += 1
        else:
            view.layers.append(row)
    view.layers.sort(key=lambda r: not r.differs)  # stable: plan order within each group
    view.totals = _totals(gate, (inp.manifest or {}).get("sizes") or {}, view.layers)
    return view


def _layer(p: Any, rec: dict[str, Any], missed: str | None, side: str, k: Any) -> BuiltLayer | None:
    """One plan row against its manifest record; None when both leave the layer as it was."""
    status = str(rec.get("status", "not in the manifest"))
    applied = status in ("applied", "partly applied") and missed is None
    planned_changed = _changed(p.setting)
    if not planned_changed and not applied and missed is None:
        return None
    steps = [s for s in rec.get("steps", []) if isinstance(s, dict)
             and isinstance(s.get(side), dict) and s[side].get("status") == "applied"]
    built_key = " + ".join(str((s.get("setting") or {}).get("key", "")) for s in steps)
    built_label = " + ".join(str((s.get("setting") or {}).get("label") or s.get("technique", "")) for s in steps)
    want_key = row_key(p, k) if k is not None else ""
    other_setting = bool(want_key and built_key and want_key != built_key)
    differs = missed is not None or planned_changed != applied or other_setting
    built = f"not built: {missed}" if missed is not None else status
    return BuiltLayer(name=p.name, planned=p.setting, planned_bytes=p.bytes_after, built=built,
                      built_setting=built_label if applied else "(uncompressed)",
                      built_bytes=p.bytes_after if applied else p.bytes_before, differs=differs)


def _totals(gate: dict[str, Any], sizes: dict[str, Any], layers: list[BuiltLayer]) -> list[BuiltTotal]:
    def value(key: str) -> float | None:
        v = (sizes.get(key) or {}).get("value") if isinstance(sizes.get(key), dict) else None
        return v if isinstance(v, (int, float)) else None

    err = gate.get("size_error")
    out = [BuiltTotal(name="weights", planned=gate.get("planned_bytes"), built=gate.get("built_bytes"),
                      note=(f"{gate.get('built_basis', '')}; " if gate.get("built_basis") else "")
                      + (f"{err:+.2%} vs the plan, tolerance {gate.get('tolerance', 0):.0%}: " if err is not None else "")
                      + str(gate.get("size", "")), differs=gate.get("size") == "outside tolerance")]
    if value("weight_file_bytes") is not None:
        werr = value("weight_file_error")
        out.append(BuiltTotal(name="weight file", planned=value("weight_file_estimate_bytes"),
                              built=value("weight_file_bytes"), note=str((sizes["weight_file_bytes"] or {}).get("basis", ""))
                              + (f"; {werr:+.2%} vs the estimate" if werr is not None else "")))
    if layers:
        out.append(BuiltTotal(name=f"the {len(layers)} layer(s) below", planned=sum(r.planned_bytes for r in layers),
                              built=sum(r.built_bytes for r in layers), built_basis="estimate",
                              note="the plan's per-layer formulas, uncompressed size for a layer not built"))
    return out


# ------------------------------------------------------------------ HTML
def built_html(view: BuiltView | None) -> str:
    if view is None:
        return ""
    verdict = "built as planned" if view.ok else "DIFFERS from the plan"
    totals = "".join(
        f'<tr{" class=differs" if t.differs else ""}><td>{_e(t.name)}</td>'
        f"<td class=num>{_qty(t.planned, 'B')} {_badge(t.planned_basis)}</td>"
        f"<td class=num>{_qty(t.built, 'B')} {_badge(t.built_basis)}</td><td class=note>{_e(t.note)}</td></tr>"
        for t in view.totals)
    rows = [_row(r) for r in view.layers]
    head = ('<thead><tr><th>layer</th><th>planned setting</th><th class=num>planned size</th><th>built</th>'
            '<th class=num>built size</th></tr></thead>')
    if len(rows) <= SHOWN_ROWS:
        layers = f'<table class="built">{head}<tbody>{"".join(rows)}</tbody></table>' if rows else ""
    else:
        bad = [x for r, x in zip(view.layers, rows) if r.differs]
        layers = ((f'<table class="built">{head}<tbody>{"".join(bad)}</tbody></table>' if bad else "")
                  + f'<details class="built-all"><summary>all {len(rows)} layers the plan or apply changed</summary>'
                  f'<table class="built">{head}<tbody>{"".join(rows)}</tbody></table></details>')
    kept = (f"<p class=\"note\">{view.unchanged} other layer(s): unchanged in the plan and in the build.</p>"
            if view.unchanged else "")
    return (f'<section id="built"><h2>Planned vs built</h2><p class="verdict {"ok" if view.ok else "bad"}">'
            f"<b>{verdict}</b> ({_e(view.side)} side): {_e(view.verdict)}</p>"
            '<table class="summary built-totals"><thead><tr><th>total</th><th class=num>planned</th>'
            f'<th class=num>built</th><th>note</th></tr></thead><tbody>{totals}</tbody></table>'
            f'<p class="hint">Per layer, sizes are the plan\'s estimates {_badge("estimate")}; '
            f"layers that differ from the plan are red.</p>{layers}{kept}</section>")


def _row(r: BuiltLayer) -> str:
    mark = ' class="differs"' if r.differs else ""
    built = f"DIFFERS: {r.built}" if r.differs else r.built
    return (f"<tr{mark}><td class=name>{_e(r.name)}</td><td>{_e(r.planned)}</td>"
            f"<td class=num>{_qty(r.planned_bytes, 'B')}</td><td>{_e(built)} <small>{_e(r.built_setting)}</small></td>"
            f"<td class=num>{_qty(r.built_bytes, 'B')}</td></tr>")
