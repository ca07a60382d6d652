"""The report's What-if section: per layer a choice among the settings search would consider,
totals that update as you choose, and a plan file for `apply`, all inside the page (no server).

Python does the sizing: every option of every layer is sized by the code that sizes the plan
(`plan.whatif.sized_options`, i.e. `engine.predict_layers`), its latency is the roofline on the
plan's target (`estimate_layer`, as search's latency table, times the report's per-layer
calibration factor when its estimate is calibrated), and where sensitivity results hold
per-setting measurements, its single-layer output MSE. The page (report_assets/whatif.js) only
adds these up: predicted fidelity the way search predicts it (independent noise adds, PSNR =
10 log10(peak^2 / sum of MSEs)), and writes the plan exactly as `plan_for_choices` would.

The data is one JSON script (#whatif-data), compact for 1,000-layer models:
  before, plan_bytes, budget_mb   bytes before / after the plan, the plan's size budget (MB, 0: none)
  opts     [{k: key, l: label, st: [[technique, slot rank, params, setting key]], r: plan-row settings}]
           (index 0: keep fp16)
  sets     lists of option indices; a layer points at one
  layers   every layer in model order: {n: name, y: type, f: fp16 bytes, u: unchanged-label index}
           and, for the what-if's layers, s: set, c: the plan's choice (position in the set),
           b: bytes per option (a list of bytes after each stage for a stacked option),
           t: latency ms per option, e: output MSE per option (null: not measured), k: [rule, why]
  latency  {basis, fixed: ms of the layers no choice changes} or null
  fidelity {peak, label, basis} or {note}
  slots    technique -> its slot (a step's `slot`)
  templates, why, keep, detail: the plan file's fixed parts, so page and Python write the same file
"""
from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from compressadvise.errors import CompressAdviseError

if TYPE_CHECKING:
    from compressadvise.plan.whatif import Options
    from compressadvise.ui.report import Inputs
    from compressadvise.ui.report_data import ReportData

WHATIF_FORMAT = 1
NOT_PREDICTED = "not predicted: no sensitivity data"


def whatif_data(inp: Inputs, k: Any, est: tuple[Any, Any] | None) -> dict[str, Any] | None:
    """The embedded data, {"unavailable": why} when the page cannot offer it, None without a plan."""
    from compressadvise.plan.whatif import layer_options, sized_options

    if inp.plan is None:
        return None
    if inp.report is None:
        return {"unavailable": "What if needs the model itself (layer shapes): pass the model, or --model for a run folder"}
    try:
        opts = layer_options(k, inp.report, inp.plan)
        before, rows0, sized = sized_options(k, inp.report, inp.plan, opts)
    except (CompressAdviseError, KeyError) as e:  # a plan naming layers this model lacks, an unknown target
        why = e.one_line() if isinstance(e, CompressAdviseError) else f"the plan names layer {e} the model lacks"
        return {"unavailable": f"What if is not available: {why}"}
    payload = _skeleton(inp.plan, before)
    index = _option_table(k, payload["opts"], payload["slots"], opts, sized)
    ms = _option_ms(k, inp, opts, sized, est)
    payload["latency"] = _latency(est, opts) if ms is not None else None
    payload["fidelity"] = _fidelity(inp.sensitivity)
    mse = payload["fidelity"].get("peak") is not None
    sets: dict[tuple[int, ...], int] = {}
    texts: dict[str, int] = {}
    for x in inp.report.layers:
        row = rows0[x.name]
        entry: dict[str, Any] = {"n": x.name, "y": x.type, "f": row.bytes_before}
        if (u := texts.setdefault(row.setting, len(texts))) != 0:
            entry["u"] = u
        if x.name in sized:
            entry.update(_layer_entry(x.name, opts, sized[x.name], index, sets, ms, inp.sensitivity if mse else None))
        payload["layers"].append(entry)
    payload["sets"], payload["texts"] = [list(s) for s in sets], list(texts)
    return payload


def _skeleton(plan: Any, before: int) -> dict[str, Any]:
    """The fixed parts: sizes, the plan file's templates (every field, defaults included) and texts."""
    from compressadvise.knowledge.schema import LayerPrediction, Plan, Prediction, Skip, Step, TraceEntry
    from compressadvise.plan.whatif import KEEP_REASON, USER_KEEP, WHATIF_CODE, WHATIF_DETAIL, WHATIF_WHY

    head = Plan(model=plan.model, target=plan.target, constraints=plan.constraints, playbooks=plan.playbooks,
                placement=plan.placement)
    templates = {
        "plan": head.model_dump(mode="json"), "step": Step(technique="", slot="").model_dump(mode="json"),
        "skip": Skip(layer="", reason="").model_dump(mode="json"),
        "row": LayerPrediction(name="", setting="", bytes_before=0, bytes_after=0).model_dump(mode="json"),
        "prediction": Prediction(bytes_before=0, bytes_after=0, ratio=0.0).model_dump(mode="json"),
        "trace": TraceEntry(code=WHATIF_CODE, status="fired", detail="").model_dump(mode="json")}
    return {"v": WHATIF_FORMAT, "before": before,
            "plan_bytes": plan.prediction.bytes_after if plan.prediction else None,
            "budget_mb": plan.constraints.max_size_mb, "templates": templates, "why": WHATIF_WHY,
            "keep": [USER_KEEP, KEEP_REASON], "detail": WHATIF_DETAIL, "opts": [], "slots": {}, "layers": []}


def _option_table(k: Any, table: list[dict[str, Any]], slots: dict[str, str], opts: Options,
                  sized: dict[str, dict[str, list[Any]]]) -> dict[str, int]:
    """The options of every layer, once each (key, label, stages, the plan row's settings), and each
    technique's slot; returns key -> index."""
    from compressadvise.plan.whatif import KEEP, SLOT_RANK

    table.append({"k": KEEP, "l": "keep fp16", "st": [], "r": []})
    index = {KEEP: 0}
    for x in opts.layers:
        for key, rows in sized.get(x.name, {}).items():
            if key in index:
                continue
            stack = opts.stacks[x.name][key]
            index[key] = len(table)
            table.append({"k": key, "l": rows[-1].setting, "r": rows[-1].settings,
                          "st": [[s.technique, SLOT_RANK.get(k.techniques[s.technique].slot, 1), s.p, s.key]
                                 for s in stack]})
    slots.update({s.technique: k.techniques[s.technique].slot for o in opts.stacks.values() for st in o.values()
                  for s in st})
    return index


def _layer_entry(name: str, opts: Options, rows: dict[str, list[Any]], index: dict[str, int],
                 sets: dict[tuple[int, ...], int], ms: dict[str, dict[str, float]] | None, sens: Any) -> dict[str, Any]:
    """One what-if layer: its option set, the plan's choice, and bytes, ms and MSE per option."""
    keys = list(rows)
    members = tuple(index[key] for key in keys)
    cur = opts.current[name]
    entry: dict[str, Any] = {"s": sets.setdefault(members, len(sets)), "c": keys.index(cur) if cur in rows else 0,
                             "b": [r[-1].bytes_after if len(r) == 1 else [x.bytes_after for x in r]
                                   for r in rows.values()]}
    if ms is not None and name in ms:
        entry["t"] = [ms[name][key] for key in keys]
    if sens is not None:
        entry["e"] = [_mse(sens, name, key, opts.stacks[name][key]) for key in keys]
    if name in opts.kept_why:
        entry["k"] = list(opts.kept_why[name])
    return entry


def _mse(sens: Any, name: str, key: str, stack: tuple) -> float | None:
    """The option's measured single-layer output MSE (0 for keep); None where not measured."""
    if not stack:
        return 0.0
    v = sens.single_mse.get(name, {}).get(key) if len(stack) == 1 else None
    return float(f"{v:.6g}") if v is not None and math.isfinite(v) else None


def _option_ms(k: Any, inp: Inputs, opts: Options, sized: dict[str, dict[str, list[Any]]],
               est: tuple[Any, Any] | None) -> dict[str, dict[str, float]] | None:
    """Roofline ms per layer and option on the target (search's latency table: the option's
    compression as `from_plan` reads a plan row), times the report's per-layer calibration."""
    from compressadvise.measure.estimate import estimate_layer, from_plan

    tgt = k.targets.get(inp.plan.target.name)
    if est is None or tgt is None:
        return None
    os = inp.plan.target.os or tgt.default_os
    scale = {r.name: r.scale for r in est[0].layers}
    by_name = {x.name: x for x in opts.layers}
    out: dict[str, dict[str, float]] = {}
    modes: dict[str, Any] = {}  # option key -> its compression on one layer: the modes are the option's
    for name, per in sized.items():
        x = by_name[name]
        if not x.macs:
            continue
        out[name] = {}
        for key, rows in per.items():
            row, comp = rows[-1], None
            if row.bytes_after < row.bytes_before:  # as from_plan: a layer no smaller streams as fp16
                if key not in modes:
                    modes[key] = from_plan([row], k)[name]
                comp = modes[key].model_copy(update={"bytes": float(row.bytes_after)})
            e = estimate_layer(x, tgt, os, comp, tgt.baseline_bytes_per_param)
            if e is None:
                del out[name]
                break
            out[name][key] = float(f"{e.ms * scale.get(name, 1.0):.6g}")
    return out


def _latency(est: tuple[Any, Any] | None, opts: Options) -> dict[str, Any] | None:
    """The basis, and the ms of everything no choice changes (its other layers, a profile's other_ms)."""
    if est is None:
        return None
    before = est[0]
    mine = {x.name for x in opts.layers}
    fixed = before.total_ms - sum(r.ms for r in before.layers if r.name in mine)
    basis = before.basis_label()  # per option the roofline times the page's factors: never "measured"
    return {"basis": "estimate (roofline, scaled as the page's latency)" if basis.startswith("measured") else basis,
            "fixed": fixed}


def _fidelity(sens: Any) -> dict[str, Any]:
    if sens is None or not sens.single_mse or not sens.peak:
        more = "" if sens is None else " (these results have no per-setting output MSE: `compressadvise sensitivity` measures it)"
        return {"note": NOT_PREDICTED + more}
    return {"peak": sens.peak, "label": "predicted output PSNR vs the original",
            "basis": "estimate: each layer's output MSE measured alone, added as independent noise (as search predicts)"}


# ------------------------------------------------------------------ HTML
def whatif_html(data: ReportData) -> str:
    """The What-if section: controls, totals and a table the page fills from #whatif-data."""
    from compressadvise.ui.report_html import _asset, _badge, _e, _js_in_script, _json_in_script

    w = getattr(data, "whatif", None)
    if not w:
        return ""
    head = '<section id="whatif"><h2>What if</h2>'
    if "unavailable" in w:
        return head + f'<p class="note">{_e(w["unavailable"])}</p></section>'
    payload = _json_in_script(json.dumps(w, separators=(",", ":"), allow_nan=False))
    target = f"{data.target} (OS {data.os})" if data.os else str(data.target)
    return (f'<section id="whatif"><style>{_asset("whatif.css")}</style><h2>What if</h2>'
            f'<p class="hint">Pick a setting per layer, or one for many layers at once, and see the prediction '
            f'change {_badge("estimate")}: size from the technique formulas (as the plan), latency from the '
            f'roofline on {_e(target)}. The choices are the settings search would consider on each layer '
            '(target, OS, backend and playbook rules). Download them as a plan file for '
            '<code>compressadvise apply</code>.</p>' + _controls_html() +
            '<div class="wi-wrap"><table id="whatif-table"><thead><tr><th>#</th><th>layer</th><th>type</th>'
            '<th>setting</th><th class=num>size</th><th class=num>vs plan</th><th class=num>latency</th>'
            '</tr></thead><tbody></tbody></table></div>'
            f'<script type="application/json" id="whatif-data">{payload}</script>'
            f'<script>{_js_in_script(_asset("whatif.js"))}</script></section>')


def _controls_html() -> str:
    return ('<dl class="wi-totals"><dt>size</dt><dd id="wi-size" data-bytes=""></dd>'
            '<dt>latency</dt><dd id="wi-latency" data-ms=""></dd>'
            '<dt>fidelity</dt><dd id="wi-fidelity" data-psnr=""></dd>'
            '<dt>changed</dt><dd id="wi-changed"></dd></dl>'
            '<div class="controls wi-bulk"><span>select layers:</span>'
            '<select id="wi-type" aria-label="layer type"><option value="">all types</option></select>'
            '<input id="wi-name" type="search" placeholder="name contains" aria-label="name contains">'
            '<input id="wi-prefix" type="search" placeholder="block prefix, e.g. blocks.3." list="wi-blocks" '
            'aria-label="block prefix"><datalist id="wi-blocks"></datalist>'
            '<span id="wi-selected" aria-live="polite"></span>'
            '<label>set them to <select id="wi-option" aria-label="setting for the selected layers"></select></label>'
            '<button id="wi-apply" type="button">Set</button>'
            '<label><input id="wi-only" type="checkbox"> show only the selected layers</label></div>'
            '<div class="controls"><button id="wi-reset" type="button">Back to the plan</button>'
            '<button id="wi-download" type="button">Download plan.yaml</button>'
            '<span id="wi-status" aria-live="polite"></span></div>')
