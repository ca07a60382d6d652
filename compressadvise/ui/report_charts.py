"""The report's charts: Vega-Lite specs built with Altair, and the points they plot."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from compressadvise.errors import Unavailable
from compressadvise.ui.render import byte_unit, human_bytes, human_ms, time_unit
from compressadvise.ui.report_data import Chart, LayerRow, Omitted, ReportData
from compressadvise.ui.report_sensitivity import PSNR_METRIC, ParetoPoint, Sensitivity, _sens_label
from compressadvise.ui.report_summary import _target_label, _verify_hint

if TYPE_CHECKING:
    from compressadvise.ui.report import Inputs

TOP_BARS = 25  # layers per bar chart; the table always lists every layer
SELECTION = "sel"  # the Vega signal report.js sets to the selected layer's name ('' = none)
IS_SELECTED = f"datum.layer === {SELECTION}"


# ------------------------------------------------------------------ charts (Vega-Lite via Altair)
def _add_charts(data: ReportData, inp: Inputs, est: tuple[Any, Any] | None) -> None:
    builders = [
        ("size", "Size by layer", lambda: _size_chart(data)),
        ("latency", "Latency by layer on the target", lambda: _latency_chart(data, est)),
        ("sensitivity", "Sensitivity by layer", lambda: _sensitivity_chart(data, inp)),
        ("drift", "Output drift by layer", lambda: _drift_chart(data, inp)),
        ("pareto", "Size vs fidelity", lambda: _pareto_chart(data, inp)),
        ("accuracy", "Accuracy per class / slice", lambda: _accuracy_charts(data, inp)),
    ]
    for chart_id, title, make in builders:
        made = make()
        if isinstance(made, str):
            data.omitted.append(Omitted(id=chart_id, title=title, reason=made))
        else:
            data.charts.extend(made)


def _alt():
    try:
        import altair as alt
    except ImportError:
        raise Unavailable("the report needs Altair and vl-convert-python",
                          hint="pip install altair vl-convert-python") from None
    return alt


def _vlc():
    try:
        import vl_convert as vlc
    except ImportError:
        raise Unavailable("the report needs vl-convert-python (it bundles the chart runtime offline)",
                          hint="pip install vl-convert-python") from None
    return vlc


def _top(rows: list[LayerRow], key, n: int = TOP_BARS) -> tuple[list[LayerRow], list[LayerRow]]:
    ranked = sorted(rows, key=key, reverse=True)
    return ranked[:n], ranked[n:]


def _paired_bars(alt: Any, values: list[dict], order: list[str], x_title: str, title: str,
                 subtitle: str | list[str], states: tuple[str, str]) -> dict[str, Any]:
    """Grouped horizontal bars: one row per layer, 'before' and 'after' side by side."""
    enc_y = alt.Y("layer:N", sort=order, title=None, axis=alt.Axis(labelLimit=220))
    chart = alt.Chart(alt.Data(values=values)).mark_bar().encode(
        y=enc_y, yOffset=alt.YOffset("state:N", sort=list(states)),
        x=alt.X("value:Q", title=x_title),
        color=alt.Color("state:N", sort=list(states), scale=alt.Scale(range=["#9aa5b1", "#2f6fdf"]),
                        legend=alt.Legend(orient="bottom", title=None)),
        tooltip=[alt.Tooltip("layer:N"), alt.Tooltip("state:N"), alt.Tooltip("value:Q", format=",.4g", title=x_title),
                 alt.Tooltip("setting:N")],
    ).properties(width=440, height=alt.Step(9), title=alt.Title(title, subtitle=subtitle))
    return _linked_bars(chart.to_dict())


def _linked(spec: dict[str, Any]) -> dict[str, Any]:
    """The page's selected layer as a Vega-Lite variable: report.js sets it, the marks react."""
    spec.setdefault("params", []).append({"name": SELECTION, "value": ""})
    return spec


def _linked_bars(spec: dict[str, Any]) -> dict[str, Any]:
    """Bars of the selected layer stay opaque and outlined; the others fade while one is selected."""
    enc = spec["encoding"]
    enc["opacity"] = {"condition": {"test": f"{SELECTION} === '' || {IS_SELECTED}", "value": 1}, "value": 0.3}
    enc["stroke"] = {"condition": {"test": IS_SELECTED, "value": "#1f2933"}, "value": None}
    enc["strokeWidth"] = {"condition": {"test": IS_SELECTED, "value": 1.5}, "value": 0}
    return _linked(spec)


def _size_chart(data: ReportData) -> list[Chart] | str:
    if not data.layers:
        return "no layers to show"
    alt = _alt()
    shown, rest = _top(data.layers, lambda r: r.bytes_before)
    states = ("now (fp16)", "after the plan")
    unit, size = byte_unit(max(r.bytes_before for r in shown))  # the axis in the unit its bars read best in
    values = []
    for r in shown:
        values += [{"layer": r.name, "state": states[0], "value": r.bytes_before / size, "setting": r.setting},
                   {"layer": r.name, "state": states[1], "value": r.bytes_after / size, "setting": r.setting}]
    before = sum(r.bytes_before for r in data.layers)
    after = sum(r.bytes_after for r in data.layers)
    sub = [f"estimate from the plan: {human_bytes(before)} -> {human_bytes(after)}; the largest {len(shown)} layers"]
    if rest:  # a summed bar would dwarf the rest: state it instead
        sub.append(f"the other {len(rest)} layers: {human_bytes(sum(r.bytes_before for r in rest))} -> "
                   f"{human_bytes(sum(r.bytes_after for r in rest))} (all in the table)")
    spec = _paired_bars(alt, values, [r.name for r in shown], unit, "Size by layer: now vs after the plan", sub, states)
    return [Chart(id="size", title="Size by layer", basis="estimate", spec=spec)]


def _latency_chart(data: ReportData, est: tuple[Any, Any] | None) -> list[Chart] | str:
    rows = [r for r in data.layers if r.latency_ms_before is not None]
    if est is None or not rows:
        return ("no latency estimate: needs a target profile with memory_bandwidth_gbs and per-layer MACs "
                "(a runnable model: TorchScript, .pt2 or module:function, with --input-shape if it has no example input)")
    alt = _alt()
    shown, _ = _top(rows, lambda r: r.latency_ms_before or 0.0)
    states = ("before", "after the plan")
    unit, per_ms = time_unit(max(r.latency_ms_before or 0.0 for r in shown))
    values = []
    for r in shown:
        values += [{"layer": r.name, "state": states[0], "value": r.latency_ms_before * per_ms, "setting": r.setting},
                   {"layer": r.name, "state": states[1], "value": (r.latency_ms_after or 0) * per_ms,
                    "setting": r.setting}]
    b, a = est
    how = "estimate (roofline)" if getattr(a, "basis", "estimate") == "estimate" else a.basis_label()
    sub = [f"{how} on {_target_label(b)}: {human_ms(b.total_ms)} -> {human_ms(a.total_ms)}"
           + ("; calibrated" if a.calibrated and how.startswith("estimate") else "")]
    if len(rows) > len(shown):
        sub.append(f"the {len(shown)} slowest of {len(rows)} estimated layers (all in the table)")
    spec = _paired_bars(alt, values, [r.name for r in shown], unit, "Latency by layer on the target",
                        sub, states)
    return [Chart(id="latency", title="Latency by layer on the target", basis="estimate", spec=spec)]


def _sensitivity_chart(data: ReportData, inp: Inputs) -> list[Chart] | str:
    s = inp.sensitivity
    if s is None or not s.layers:
        return ("not measured yet: per-layer sensitivity comes from sensitivity results "
                "(pass --sensitivity FILE or save sensitivity.json in the run folder)")
    alt = _alt()
    planned = {r.name: r.setting for r in data.layers}
    ranked = sorted(s.layers, key=lambda x: x.value, reverse=True)[:TOP_BARS * 2]  # higher = more sensitive
    values = [{"layer": x.name, "value": x.value, "setting": planned.get(x.name, ""),
               "plan": "compressed by the plan" if _changed(planned.get(x.name, "")) else "kept by the plan"}
              for x in ranked]
    chart = alt.Chart(alt.Data(values=values)).mark_bar().encode(
        y=alt.Y("layer:N", sort=[v["layer"] for v in values], title=None, axis=alt.Axis(labelLimit=220)),
        x=alt.X("value:Q", title=_sens_label(s)),
        color=alt.Color("plan:N", scale=alt.Scale(domain=["compressed by the plan", "kept by the plan"],
                                                  range=["#d9822b", "#9aa5b1"]),
                        legend=alt.Legend(orient="bottom", title=None)),
        tooltip=["layer:N", alt.Tooltip("value:Q", format=",.4g"), "setting:N"],
    ).properties(width=440, height=alt.Step(14), title=alt.Title(
        "Sensitivity by layer", subtitle=f"{s.label}: each layer compressed alone; higher = more sensitive"
        + (f" ({s.setting})" if s.setting else "")))
    return [Chart(id="sensitivity", title="Sensitivity by layer", basis=s.label, spec=_linked_bars(chart.to_dict()))]


def _changed(setting: str) -> bool:
    return bool(setting) and not setting.endswith("(unchanged)")


def _drift_chart(data: ReportData, inp: Inputs) -> list[Chart] | str:
    ver = inp.verify
    if ver is None or ver.drift is None or not ver.drift.layers:
        return _verify_hint(inp) + " (per-layer drift is part of the verify result)"
    alt = _alt()
    d = ver.drift
    cap = 120.0  # identical outputs have infinite SNR: draw them at the cap
    values = [{"layer": x.name, "order": i, "snr": min(x.snr_db, cap) if math.isfinite(x.snr_db) else cap,
               "cosine": x.cosine, "shown": "identical" if not math.isfinite(x.snr_db) else f"{x.snr_db:.1f} dB"}
              for i, x in enumerate(d.layers)]
    base = alt.Chart(alt.Data(values=values))
    line = base.mark_line(point=True, color="#2f6fdf").encode(
        x=alt.X("layer:N", sort=[v["layer"] for v in values], title="layer (execution order)",
                axis=alt.Axis(labelAngle=-45, labelLimit=120, labelOverlap=True)),
        y=alt.Y("snr:Q", title="output SNR vs original (dB)"),
        tooltip=["layer:N", alt.Tooltip("shown:N", title="SNR"), alt.Tooltip("cosine:Q", format=".5f")])
    rule = alt.Chart(alt.Data(values=[{"t": d.threshold_db}])).mark_rule(color="#c23030", strokeDash=[4, 3]).encode(
        y="t:Q")
    sub = [f"measured on {d.samples} samples; below the dashed {d.threshold_db:g} dB line = degraded",
           f"identical outputs drawn at {cap:g} dB" + (f"; first degraded: {d.first_degraded}" if d.first_degraded else "")]
    # The page's selected layer: every point drawn, only the selected one visible (a filtered, empty
    # layer would make Vega warn about an infinite extent).
    picked = base.mark_point(size=220, filled=True, color="#d9822b").encode(
        x=alt.X("layer:N", sort=[v["layer"] for v in values]), y="snr:Q",
        opacity={"condition": {"test": IS_SELECTED, "value": 1}, "value": 0})
    chart = (line + rule + picked).properties(width=440, height=220, title=alt.Title("Output drift by layer",
                                                                                      subtitle=sub))
    return [Chart(id="drift", title="Output drift by layer", basis="measured", spec=_linked(chart.to_dict()))]


def _primary_metric(ver: Any, wanted: str | None) -> tuple[str, str, float, float] | None:
    """(name, unit, original, compressed) of the verify metric that matches the Pareto axis."""
    rows = [*ver.evaluator, *ver.accuracy]
    for m in rows:
        if wanted is None or m.name == wanted:
            return m.name, m.unit, m.original, m.compressed
    for f in ver.fidelity:
        if "top1_agreement" in f.metrics and wanted in (None, "top-1 agreement"):
            return "top-1 agreement", "%", 100.0, 100.0 * f.metrics["top1_agreement"]
    return None


def _pareto_points(data: ReportData, inp: Inputs) -> tuple[list[ParetoPoint], str, str, bool]:
    """(points, metric, unit, higher is better) for the size-vs-fidelity chart, one metric only."""
    s, ver = inp.sensitivity, inp.verify
    if s is not None and (s.single_mse or s.metric == PSNR_METRIC):
        points = list(s.points) + _predicted_points(data, s)
        psnr = _verify_psnr(ver)
        if psnr is not None and inp.plan is not None:
            points.append(ParetoPoint(name="the plan (verify)", bytes=_plan_bytes(data, ver)[1], value=psnr, kind="chosen"))
        return points, PSNR_METRIC, "dB", True
    if s is not None and s.points:
        points = list(s.points)
        found = _primary_metric(ver, s.metric) if ver is not None else None
        if found is not None:
            points += _verify_points(data, inp, found, {p.kind for p in points})
        return points, s.metric, s.unit, s.higher_is_better
    found = _primary_metric(ver, None) if ver is not None else None
    if found is None:
        return [], "", "", True
    return _verify_points(data, inp, found, set()), found[0], found[1], True


def _plan_bytes(data: ReportData, ver: Any) -> tuple[float, float]:
    before = float(sum(r.bytes_before for r in data.layers))
    after = float(sum(r.bytes_after for r in data.layers))
    if ver is not None and ver.target_size_bytes:
        before = ver.target_size_bytes.get("original", before)
        after = ver.target_size_bytes.get("compressed", after)
    return before, after


def _verify_points(data: ReportData, inp: Inputs, found: tuple[str, str, float, float],
                   kinds: set[str]) -> list[ParetoPoint]:
    """The original and the plan, at verify's measured figure for the chart's metric."""
    _, _, orig, comp = found
    before, after = _plan_bytes(data, inp.verify)
    out = []
    if "original" not in kinds:
        out.append(ParetoPoint(name="original (fp16)", bytes=before, value=orig, kind="original"))
    if "chosen" not in kinds and inp.plan is not None:
        out.append(ParetoPoint(name="the plan", bytes=after, value=comp, kind="chosen"))
    return out


def _verify_psnr(ver: Any) -> float | None:
    if ver is None:
        return None
    return next((f.metrics["psnr_db"] for f in ver.fidelity
                 if math.isfinite(f.metrics.get("psnr_db", math.nan))), None)


def _psnr(peak: float, mse: float) -> float:
    return 10 * math.log10(peak * peak / mse) if mse > 0 and peak > 0 else math.inf


def _predicted_points(data: ReportData, s: Sensitivity) -> list[ParetoPoint]:
    """Whole-model PSNR predicted from single-layer output MSEs (they add up as independent
    noise, the model `search` uses): every setting on every layer it was measured on, and the
    plan when each layer it changes was measured at the plan's setting. Estimates."""
    rows = {r.name: r for r in data.layers}
    measured = [n for n in s.single_mse if n in rows]
    if not measured or not s.peak:
        return []
    out = []
    label_of = lambda key: s.labels.get(key, key)  # noqa: E731
    for key in sorted({key for n in measured for key in s.single_mse[n]}, key=label_of):
        have = [n for n in measured if key in s.single_mse[n]]
        size = sum(s.single_bytes[n][key] if n in have else r.bytes_before for n, r in rows.items())
        value = _psnr(s.peak, sum(s.single_mse[n][key] for n in have))
        part = "" if len(have) == len(measured) else f" ({len(have)}/{len(measured)} layers)"
        if math.isfinite(value):
            out.append(ParetoPoint(name=f"uniform {label_of(key)}{part}", bytes=size, value=value, kind="uniform",
                                   value_basis="estimate"))
    # Join by setting key; a row of an older plan (label only) matches a measurement's own label.
    by_label = {lab: key for key, lab in s.labels.items()}
    key_of = {r.name: r.setting_key or by_label.get(r.setting, r.setting) for r in data.layers}
    changed = [r for r in data.layers if _changed(r.setting)]
    if changed and all(key_of[r.name] in s.single_mse.get(r.name, {}) for r in changed):
        value = _psnr(s.peak, sum(s.single_mse[r.name][key_of[r.name]] for r in changed))
        if math.isfinite(value):
            out.append(ParetoPoint(name="the plan (predicted)", bytes=sum(r.bytes_after for r in data.layers),
                                   value=value, kind="chosen", value_basis="estimate"))
    return out


def frontier(points: list[ParetoPoint], higher_is_better: bool = True) -> list[ParetoPoint]:
    """Points no other point beats on both size (smaller) and fidelity, by size."""
    sign = 1.0 if higher_is_better else -1.0
    best = -math.inf
    out = []
    for p in sorted(points, key=lambda p: (p.bytes, -sign * p.value)):
        if sign * p.value > best:
            out.append(p)
            best = sign * p.value
    return out


def _pareto_chart(data: ReportData, inp: Inputs) -> list[Chart] | str:
    points, metric, unit, hib = _pareto_points(data, inp)
    if len(points) < 2:
        return ("not measured yet: the size-vs-fidelity chart needs fidelity for the plan and for the uniform "
                "baselines (a verify result, and sensitivity or search results)")
    alt = _alt()
    front = {id(p) for p in frontier(points, hib)}
    size_unit, scale = byte_unit(max(p.bytes for p in points))  # the x axis; `unit` is the metric's
    values = [{"name": p.name, "mb": p.bytes / 1e6, "x": p.bytes / scale, "value": p.value, "kind": p.kind,
               "frontier": id(p) in front, "size": p.size_basis, "fidelity": p.value_basis} for p in points]
    _place_labels(values, PARETO_SIZE)
    kinds = ["original", "uniform", "candidate", "chosen"]
    base = alt.Chart(alt.Data(values=values))
    enc = dict(
        x=alt.X("x:Q", title=f"model size ({size_unit})", scale=alt.Scale(zero=False)),
        y=alt.Y("value:Q", title=f"{metric} ({unit})" if unit else metric, scale=alt.Scale(zero=False)),
        color=alt.Color("kind:N", scale=alt.Scale(domain=kinds, range=["#52606d", "#9aa5b1", "#7fb3e6", "#d9822b"]),
                        legend=alt.Legend(orient="bottom")),
        shape=alt.Shape("kind:N", scale=alt.Scale(domain=kinds, range=["square", "circle", "circle", "diamond"])),
        tooltip=["name:N", "kind:N", alt.Tooltip("x:Q", format=".4g", title=size_unit), alt.Tooltip("value:Q", format=".4g"),
                 alt.Tooltip("fidelity:N", title="fidelity is"), alt.Tooltip("size:N", title="size is")])
    layers = []  # only layers with data: an empty layer makes Vega warn about infinite extents
    if len(front) > 1:
        layers.append(base.transform_filter("datum.frontier").mark_line(color="#2f6fdf", strokeDash=[5, 3]).encode(
            x="x:Q", y="value:Q", order="x:Q"))
    if any(p.value_basis == "measured" for p in points):
        layers.append(base.transform_filter("datum.fidelity == 'measured'").mark_point(filled=True, size=110)
                      .encode(**enc))
    if any(p.value_basis != "measured" for p in points):
        layers.append(base.transform_filter("datum.fidelity != 'measured'").mark_point(
            filled=False, size=110, strokeWidth=2).encode(**enc))
    for side, dx in (("right", 8), ("left", -8)):  # labels placed in Python so that none overlap
        if any(v["label"] == side for v in values):
            layers.append(base.transform_filter(f"datum.label == '{side}'").mark_text(
                align="left" if side == "right" else "right", dx=dx, dy=-6, fontSize=10).encode(
                x="x:Q", y="value:Q", text="name:N"))
    sub = ["filled: fidelity measured; hollow: predicted (estimate); dashed: the Pareto frontier"]
    if not any(p.kind == "uniform" for p in points):
        sub.append("uniform baselines not measured yet (sensitivity results)")
    if metric == PSNR_METRIC:
        sub.append("the original is exact (infinite PSNR) and not drawn")
    if any(not v["label"] for v in values):
        sub.append("unlabelled points: hover for their names")
    chart = alt.layer(*layers).properties(width=PARETO_SIZE[0], height=PARETO_SIZE[1], title=alt.Title(
        "Size vs fidelity", subtitle=sub))
    basis = "measured" if all(p.value_basis == "measured" for p in points) else "measured and estimate"
    return [Chart(id="pareto", title="Size vs fidelity", basis=basis, spec=chart.to_dict())]


PARETO_SIZE = (440, 300)  # plot width, height in px
LABEL_PX = (5.6, 12.0)  # approximate px per character and line height of a 10 px label


def _place_labels(values: list[dict[str, Any]], size: tuple[int, int]) -> None:
    """Set each point's "label" to "right", "left" or "" (none): the plan and the original first,
    then the frontier by size, each label beside its point where it overlaps no label or other
    point. Positions are approximate (data range to plot pixels, before Vega's nice rounding),
    so boxes keep a margin."""
    xs, ys = [v["x"] for v in values], [v["value"] for v in values]
    spans = ((max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0) if values else (1.0, 1.0)
    at = [((v["x"] - min(xs)) / spans[0] * size[0], (1 - (v["value"] - min(ys)) / spans[1]) * size[1])
          for v in values]
    dots = [(x - 5, y - 5, x + 5, y + 5) for x, y in at]
    labels: list[tuple[float, float, float, float]] = []
    rank = {"chosen": 0, "original": 1}
    order = sorted((i for i, v in enumerate(values) if v["kind"] in rank or v["frontier"]),
                   key=lambda i: (rank.get(values[i]["kind"], 2), values[i]["x"]))
    for v in values:
        v["label"] = ""
    for i in order:
        (x, y), w = at[i], LABEL_PX[0] * len(values[i]["name"])
        for side, x0 in (("right", x + 8), ("left", x - 8 - w)):
            box = (x0, y - 6 - LABEL_PX[1], x0 + w, y - 6)
            others = labels + dots[:i] + dots[i + 1:]
            if box[0] >= 0 and box[2] <= size[0] + 60 and not any(_overlap(box, b) for b in others):
                values[i]["label"] = side
                labels.append(box)
                break


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """Boxes (x0, y0, x1, y1) overlap, with 2 px to spare."""
    return a[0] < b[2] + 2 and b[0] < a[2] + 2 and a[1] < b[3] + 2 and b[1] < a[3] + 2


def _accuracy_charts(data: ReportData, inp: Inputs) -> list[Chart] | str:
    ver = inp.verify
    if ver is None or not ver.slices:
        if ver is not None:
            return "verify measured no per-class or per-slice figures (needs labels or slice ids in the samples)"
        return _verify_hint(inp)
    alt = _alt()
    charts = []
    for rep in ver.slices:
        rows = sorted(rep.rows, key=lambda r: r.change)[:40]  # the worst first when there are many
        values = []
        for r in rows:
            values += [{"slice": r.name, "state": "original", "value": r.original, "n": r.count, "change": r.change},
                       {"slice": r.name, "state": "compressed", "value": r.compressed, "n": r.count,
                        "change": r.change}]
        order = [r.name for r in sorted(rows, key=lambda r: _natural(r.name))]
        chart = alt.Chart(alt.Data(values=values)).mark_bar().encode(
            x=alt.X("slice:N", sort=order, title=rep.by, axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("state:N", sort=["original", "compressed"]),
            y=alt.Y("value:Q", title=rep.metric, scale=alt.Scale(zero=False)),
            color=alt.Color("state:N", sort=["original", "compressed"],
                            scale=alt.Scale(range=["#9aa5b1", "#2f6fdf"]), legend=alt.Legend(orient="bottom", title=None)),
            tooltip=["slice:N", "state:N", alt.Tooltip("value:Q", format=".2f"), alt.Tooltip("change:Q", format="+.2f"),
                     alt.Tooltip("n:Q", title="samples")],
        ).properties(width=alt.Step(22), height=220, title=alt.Title(
            f"{rep.metric} per {rep.by}: original vs compressed",
            subtitle=f"measured on {ver.samples.count} samples"
            + (f"; worst: {rep.worst} ({rep.worst_change:+.2f})" if rep.worst else "; no {0} dropped".format(rep.by))))
        charts.append(Chart(id=f"accuracy-{rep.by}", title=f"Accuracy per {rep.by}", basis="measured",
                            spec=chart.to_dict()))
    return charts


def _natural(name: str) -> tuple:
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
