"""The visual report: one self-contained HTML file (and PNG charts) showing the model, its hot
spots and the trade-offs of the plan, before anyone commits to it.

Inputs, all optional but the model or run folder:
- a model (analyze + recommend for a target, or a saved plan with `plan=`), or an `apply`
  output folder (manifest.json naming the plan; the original model from `model=`, else from the
  plan/manifest when it names an existing file or the bundled example: a module:function there
  is never imported, since files the tool writes are data, never code references);
- a `verify` result (`verify.json` in the run folder, or `verify=`): measured accuracy per
  class/slice, per-layer drift, latency on this machine, budget verdicts;
- sensitivity results (`sensitivity.json` in the run folder, or `sensitivity=`), read by
  `load_sensitivity` (format documented there): per-layer sensitivity and measured
  size-vs-fidelity points such as the uniform baselines.

A section whose data is absent is left out with a note saying what to run. Figures are
labelled "estimate" (formulas, roofline) or "measured" (run on real samples or a device).

Charts are Vega-Lite specs built with Altair and compiled to Vega in Python (vl-convert), so
the page inlines the Vega runtime bundled offline by vl-convert (~0.9 MB; Plotly's runtime alone
is ~4.5 MB, most of the 5 MB budget); vl-convert also renders the PNGs offline, without a browser.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import html
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from .errors import BadModel, CompressAdviseError, InputNotFound, InvalidKnowledge, OutputExists, Unavailable
from .fsutil import write_text_atomic
from .render import human_bytes

DOCS_BASE = "docs/reference/rules/"
RUN_FILES = {"manifest": "manifest.json", "verify": "verify.json", "sensitivity": "sensitivity.json"}
TOP_BARS = 25  # layers per bar chart; the table always lists every layer
MISSING_WITHOUT_MODEL = "layer types and latency estimates are missing"
FP16_BYTES = 2.0
Basis = Literal["measured", "estimate"]


# ------------------------------------------------------------------ sensitivity input
class SensitivityLayer(BaseModel):
    name: str
    value: float = Field(description="metric lost when only this layer is compressed (higher = more sensitive)")
    setting: str = ""


class ParetoPoint(BaseModel):
    name: str
    bytes: float = Field(description="model size in bytes for this configuration")
    value: float = Field(description="fidelity metric of this configuration")
    kind: Literal["original", "uniform", "candidate", "chosen"] = "candidate"
    size_basis: Basis = "estimate"
    value_basis: Basis = "measured"


class Sensitivity(BaseModel):
    label: Basis = "measured"
    metric: str = "top-1 accuracy"
    unit: str = "%"
    higher_is_better: bool = Field(True, description="for the points' values; layer values: higher = more sensitive")
    setting: str = Field("", description="the compression each layer was probed with")
    layers: list[SensitivityLayer] = []
    points: list[ParetoPoint] = []
    # From `sensitivity` results: each layer compressed alone, per setting label (the plan's
    # per-layer wording), so whole-model fidelity can be predicted for the plan and uniform settings.
    peak: float | None = Field(None, description="max |reference output|, the PSNR peak")
    single_mse: dict[str, dict[str, float]] = Field({}, description="layer -> setting key -> measured output MSE")
    single_bytes: dict[str, dict[str, float]] = Field({}, description="layer -> setting key -> bytes (estimate)")
    labels: dict[str, str] = Field({}, description="setting key -> readable label")
    settings: dict[str, dict[str, Any]] = Field({}, description="setting key -> {technique, params}")


PSNR_METRIC = "output PSNR vs the original"


def load_sensitivity(path: str | os.PathLike) -> Sensitivity:
    """Read sensitivity results (JSON): the output of `compressadvise.sensitivity` (a
    SensitivityReport), of `compressadvise.search` (a SearchResult), or this simple form:

        {"metric": "top-1 accuracy", "unit": "%", "setting": "4-bit palettization",
         "layers": [{"name": "conv", "value": 1.4}],          # drop when only this layer is compressed
         "points": [{"name": "uniform 8-bit", "bytes": 77716, "value": 99.1, "kind": "uniform"}]}

    `layers` may also be a {name: value} mapping; point sizes may be given as `size_bytes`.
    """
    data = _read_json(path, "sensitivity results")
    try:
        if "measurements" in data and "ranking" in data:
            return _from_sensitivity_report(data)
        if "candidates" in data and "frontier_size" in data:
            return _from_search_result(data)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidKnowledge(f"{path}: unreadable sensitivity/search result ({type(e).__name__}: {e})") from None
    if isinstance(data.get("layers"), dict):
        data["layers"] = [{"name": k, "value": v} for k, v in data["layers"].items()]
    for p in data.get("points", []) or []:
        if isinstance(p, dict) and "bytes" not in p and "size_bytes" in p:
            p["bytes"] = p.pop("size_bytes")
    try:
        return Sensitivity.model_validate(data)
    except ValueError as e:
        raise InvalidKnowledge(f"{path}: not valid sensitivity results: {_first_error(e)}") from None


def _from_sensitivity_report(d: dict[str, Any]) -> Sensitivity:
    """`sensitivity` results: layers ranked by measured output MSE (x the median layer)."""
    mse: dict[str, dict[str, float]] = {}
    size: dict[str, dict[str, float]] = {}
    labels: dict[str, str] = {}
    settings: dict[str, dict[str, Any]] = {}
    for m in d["measurements"]:
        if "output_mse" in m.get("metrics", {}):
            key = m["setting"]  # the measured Setting's key; re-keyed against the knowledge in build()
            mse.setdefault(m["layer"], {})[key] = float(m["metrics"]["output_mse"])
            size.setdefault(m["layer"], {})[key] = float(m["bytes"])
            labels[key] = m["label"]
            settings[key] = {"technique": m["technique"], "params": m.get("params", {})}
    return Sensitivity(
        metric="output MSE when compressed alone", unit="x the median layer", higher_is_better=False,
        setting=f"geometric mean over {len(d.get('settings', []))} settings",
        layers=[SensitivityLayer(name=r["layer"], value=float(r["vs_median"])) for r in d["ranking"]],
        peak=float(d["peak"]), single_mse=mse, single_bytes=size, labels=labels, settings=settings)


def keyed(s: Sensitivity | None, k: Any) -> Sensitivity | None:
    """Measurements keyed by the normalised Setting key (technique defaults filled in), the key
    the plan's rows carry: the join never compares label text."""
    if s is None or not s.settings:
        return s
    from .setting import Setting

    new = {old: Setting.normalised(k, d["technique"], d.get("params", {})).key for old, d in s.settings.items()}
    rk = lambda per: {new.get(key, key): v for key, v in per.items()}  # noqa: E731
    return s.model_copy(update={
        "single_mse": {n: rk(v) for n, v in s.single_mse.items()},
        "single_bytes": {n: rk(v) for n, v in s.single_bytes.items()},
        "labels": rk(s.labels), "settings": rk(s.settings)})


def row_key(row: Any, k: Any) -> str:
    """A plan row's setting key (stacked steps joined by ' + '); '' for fp16 or an older plan
    whose rows carry only a label."""
    from .setting import Setting, stacked_key

    per = [Setting.normalised(k, d["technique"], d.get("params", {})) for d in getattr(row, "settings", None) or []]
    return stacked_key(per)


def _from_search_result(d: dict[str, Any]) -> Sensitivity:
    """`search` results: measured candidates and the predicted size-vs-PSNR frontier."""
    points = []
    chosen = d.get("chosen", {}).get("name")
    for c in d["candidates"]:
        psnr = c.get("measured", {}).get("psnr_db")
        if psnr is not None and math.isfinite(psnr):
            points.append(ParetoPoint(name=f"search: {c['name']}", bytes=float(c["estimate"]["bytes"]), value=psnr,
                                      kind="chosen" if c["name"] == chosen else "candidate"))
    for i, f in enumerate(d["frontier_size"]):
        if math.isfinite(f["predicted_psnr_db"]):
            points.append(ParetoPoint(name=f"frontier {i + 1} ({f['compressed_layers']} layers)", bytes=float(f["bytes"]),
                                      value=float(f["predicted_psnr_db"]), value_basis="estimate"))
    layers = [SensitivityLayer(name=x["layer"], value=float(x["vs_median"]), setting=x.get("setting", ""))
              for x in d.get("layers", []) if x.get("vs_median") is not None]
    return Sensitivity(metric=PSNR_METRIC, unit="dB", setting="as searched", layers=layers, points=points)


def _read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"{p}: no such {what} file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidKnowledge(f"{p}: unreadable {what} ({e})") from None
    if not isinstance(data, dict):
        raise InvalidKnowledge(f"{p}: {what} must be a JSON object")
    return data


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg')}"
    return str(e).splitlines()[0]


# ------------------------------------------------------------------ the report's data
class LayerRow(BaseModel):
    index: int
    name: str
    type: str
    params: int
    bytes_before: int
    bytes_after: int
    setting: str
    setting_key: str = Field("", description="the plan row's Setting key: joins sensitivity results")
    latency_ms_before: float | None = Field(None, description="estimate on the target")
    latency_ms_after: float | None = Field(None, description="estimate on the target")
    applied: str | None = Field(None, description="what `apply` did to the layer (its manifest)")
    sensitivity: float | None = Field(None, description="measured, from sensitivity results")
    drift_snr_db: float | None = Field(None, description="measured by verify: layer output SNR")


class SummaryRow(BaseModel):
    metric: str
    before: float | None = None
    after: float | None = None
    unit: str = ""
    basis: str = Field(description="measured or estimate, and where")
    note: str = ""


class RuleRef(BaseModel):
    code: str
    title: str = ""
    why: str = ""
    url: str
    explain: str = Field("", description="`compressadvise explain CODE` text (Markdown)")


class StepView(BaseModel):
    technique: str
    slot: str
    params: dict[str, Any]
    why: str
    layers: list[str]
    skipped: list[dict[str, Any]]
    overrides: dict[str, dict[str, Any]]
    predicted_bytes_after: int | None
    rules: list[RuleRef]


class AdviceView(BaseModel):
    rule: RuleRef
    message: str
    layers: list[str]


class Chart(BaseModel):
    id: str
    title: str
    basis: str
    spec: dict[str, Any] = Field(description="Vega-Lite specification")


class Omitted(BaseModel):
    id: str
    title: str
    reason: str


class ReportData(BaseModel):
    title: str
    source: str
    target: str | None
    os: int | None
    generated: str
    version: str
    inputs: dict[str, str]
    summary: list[SummaryRow]
    budgets: list[dict[str, Any]] = []
    layers: list[LayerRow]
    steps: list[StepView] = []
    advice: list[AdviceView] = []
    trace: list[dict[str, Any]] = []
    charts: list[Chart] = []
    omitted: list[Omitted] = []
    notes: list[str] = []
    sensitivity_metric: str = ""

    def chart(self, chart_id: str) -> Chart | None:
        return next((c for c in self.charts if c.id == chart_id), None)


# ------------------------------------------------------------------ gathering the inputs
@dataclass
class Inputs:
    source: str
    report: Any = None  # analysis.ModelReport
    plan: Any = None  # schema.Plan
    verify: Any = None  # verify.VerifyResult
    sensitivity: Sensitivity | None = None
    manifest: dict[str, Any] | None = None
    run_dir: Path | None = None
    read: dict[str, str] = field(default_factory=dict)  # what was read from where
    notes: list[str] = field(default_factory=list)


def gather(
    source: Any = None,
    *,
    target: str | None = None,
    os_version: int | None = None,
    plan: Any = None,
    verify: Any = None,
    sensitivity: Any = None,
    constraints: dict[str, Any] | None = None,
    input_shape: list[int] | None = None,
    knowledge: Any = None,
    trust_pickle: bool = False,
    model: Any = None,
) -> Inputs:
    """Collect what the report shows. `source`: an `apply` output folder, a model path or spec,
    a LoadedModel, an analysis.ModelReport, or None for the bundled example. `model`: the
    original model of an `apply` folder, given by the user (else read from its manifest)."""
    from .knowledge import builtin

    k = knowledge or builtin()
    if target is not None:
        k.target(target)  # fail fast on a bad name, before loading anything
    # Result files first: a bad one fails before the (slower) model analysis.
    ver = _load_verify(verify) if verify is not None else None
    sens = None
    if sensitivity is not None:
        sens = sensitivity if isinstance(sensitivity, Sensitivity) else load_sensitivity(sensitivity)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        inp = _from_run_dir(Path(source), trust_pickle, input_shape, model)
    elif model is not None:
        raise ValueError("`model` names the original model of an `apply` output folder; pass a model as `source`")
    else:
        inp = Inputs(source="bundled example" if source is None else str(getattr(source, "source", source)))
        inp.report = _analyze(source, trust_pickle, input_shape)
    if plan is not None:
        inp.plan = _load_plan_arg(plan)
        inp.read["plan"] = str(plan) if not hasattr(plan, "steps") else "in memory"
    if inp.plan is None and inp.report is not None:
        inp.plan = _recommend(inp.report, k, target, os_version, constraints)
        inp.read["plan"] = f"recommended now for {inp.plan.target.name}"
    if ver is not None:
        inp.verify = ver
        inp.read["verify"] = str(verify) if isinstance(verify, (str, os.PathLike)) else "in memory"
    if sens is not None:
        inp.sensitivity = sens
        inp.read["sensitivity"] = str(sensitivity) if isinstance(sensitivity, (str, os.PathLike)) else "in memory"
    if inp.report is None and inp.plan is None:
        raise BadModel(f"{inp.source}: nothing to report: no model could be analyzed and no plan was found")
    return inp


def _analyze(source: Any, trust_pickle: bool, input_shape: list[int] | None) -> Any:
    """A ModelReport as is; a LoadedModel, path or spec analyzed now."""
    from .analysis import ModelReport, analyze
    from .loading import LoadedModel, load_model

    if isinstance(source, ModelReport):
        return source
    model = source if isinstance(source, LoadedModel) else load_model(source, trust_pickle=trust_pickle)
    return analyze(model, input_shape=input_shape)


def _recommend(report: Any, k: Any, target: str | None, os_version: int | None,
               constraints: dict[str, Any] | None) -> Any:
    from .engine import recommend

    return recommend(report, target=target or "ane-a17", os=os_version, knowledge=k,
                     constraints=constraints or {})


def _load_plan_arg(plan: Any) -> Any:
    from .plan import load_plan

    if hasattr(plan, "steps"):
        return plan
    if not Path(plan).is_file():
        raise InputNotFound(f"{plan}: no such plan file")
    return load_plan(plan)


def _load_verify(verify: Any) -> Any:
    from .verify import VerifyResult

    if isinstance(verify, VerifyResult):
        return verify
    data = _read_json(verify, "verify result")
    try:
        return VerifyResult.model_validate(data)
    except ValueError as e:
        raise InvalidKnowledge(f"{verify}: not a `compressadvise verify --json` result: {_first_error(e)}") from None


def _from_run_dir(run: Path, trust_pickle: bool, input_shape: list[int] | None, model: Any = None) -> Inputs:
    """An `apply` output folder: its plan, the original model (`model`, else the file it names),
    verify/sensitivity beside it."""
    mpath = run / RUN_FILES["manifest"]
    if not mpath.is_file():
        raise InputNotFound(f"{run} is a directory without manifest.json (not an `apply` output)",
                            hint="pass a model file or an apply output folder")
    manifest = _read_json(mpath, "apply manifest")
    inp = Inputs(source=str(run), manifest=manifest, run_dir=run, read={"manifest": str(mpath)})
    inp.plan = _manifest_plan(run, manifest, inp)
    original, refused = (model, None) if model is not None else _original_source(manifest, inp.plan)
    if refused:
        inp.notes.append(refused)
    else:
        try:
            inp.report = _analyze(original, trust_pickle, input_shape)
            inp.read["model"] = str(getattr(original, "source", original) or "bundled example")
        except CompressAdviseError as e:
            inp.notes.append(f"the original model ({original}) could not be analyzed ({e.one_line()}): "
                             f"{MISSING_WITHOUT_MODEL}")
    for key in ("verify", "sensitivity"):
        p = run / RUN_FILES[key]
        if p.is_file():
            if key == "verify":
                inp.verify = _load_verify(p)
            else:
                inp.sensitivity = load_sensitivity(p)
            inp.read[key] = str(p)
    return inp


def _manifest_plan(run: Path, manifest: dict[str, Any], inp: Inputs) -> Any:
    from .schema import Plan

    ref = manifest.get("plan")
    if isinstance(ref, dict):
        try:
            return Plan.model_validate(ref)
        except ValueError as e:
            raise InvalidKnowledge(f"{run / 'manifest.json'}: its plan is invalid: {_first_error(e)}") from None
    candidates = [run / ref] if isinstance(ref, str) else []
    candidates.append(run / "plan.yaml")
    for p in candidates:
        if p.is_file():
            inp.read["plan"] = str(p)
            return _load_plan_arg(p)
    return None


def _original_source(manifest: dict[str, Any], plan: Any) -> tuple[str | None, str | None]:
    """(the model the run started from, None) with None for the bundled example; or (spec, why
    not) when the manifest or plan names a Python factory: written files choose no code to run."""
    spec = _named_original(manifest, plan)
    if spec is None:
        return None, None
    if _names_code(spec):
        return spec, (f"the original model is not analyzed: the manifest names a Python factory ({spec}); "
                      f"pass the model on the command line (--model {spec}) to import it. {MISSING_WITHOUT_MODEL}")
    return spec, None  # a path: loading a file runs no code (pickles need --trust-pickle)


def _named_original(manifest: dict[str, Any], plan: Any) -> str | None:
    for key in ("input", "original", "model", "source"):
        v = manifest.get(key)
        if isinstance(v, dict):
            v = v.get("source") or v.get("path")
        if isinstance(v, str) and v:
            return None if v.startswith("bundled") else v
    src = plan.model.source if plan is not None else ""
    return None if not src or src.startswith("bundled") else src


def _names_code(spec: str) -> bool:
    """A module:function spec, which loading imports (the rule of loading.load_model), not a file."""
    return (not Path(spec).exists() and ":" in spec and not spec.startswith(("/", "."))
            and "/" not in spec.split(":")[0])


# ------------------------------------------------------------------ building the report
def build(inp: Inputs, *, docs_base: str = DOCS_BASE, knowledge: Any = None,
          title: str | None = None) -> ReportData:
    """Turn the inputs into tables, chart specs and notes (no HTML yet)."""
    from . import __version__
    from .knowledge import builtin

    k = knowledge or builtin()
    inp = dataclasses.replace(inp, sensitivity=keyed(inp.sensitivity, k))
    plan, ver = inp.plan, inp.verify
    est = _latency_estimates(inp, k)
    layers = _layer_rows(inp, est, k)
    data = ReportData(
        title=title or f"Compression report: {_model_name(inp)}",
        source=inp.source, target=plan.target.name if plan else None, os=plan.target.os if plan else None,
        generated=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), version=__version__,
        inputs=dict(inp.read), summary=_summary(inp, est), layers=layers, notes=list(inp.notes),
        sensitivity_metric=_sens_label(inp.sensitivity),
    )
    if plan is not None:
        data.steps = [_step_view(s, k, docs_base) for s in plan.steps]
        data.advice = [AdviceView(rule=_rule_ref(a.code, k, docs_base, a.title, a.why), message=a.message,
                                  layers=a.layers) for a in plan.advisories]
        data.trace = [e.model_dump(mode="json") for e in plan.trace if e.status != "not_matched"]
    if ver is not None:
        data.budgets = [b.model_dump(mode="json") for b in ver.budgets]
        data.notes += [f"verify: {w}" for w in ver.warnings]
    if est is not None:
        data.notes += [f"latency estimate: {n}" for n in est[1].notes]
    _add_charts(data, inp, est)
    return data


def _model_name(inp: Inputs) -> str:
    if inp.report is not None:
        return inp.report.source
    return inp.plan.model.source if inp.plan is not None and inp.plan.model.source else inp.source


def _sens_label(s: Sensitivity | None) -> str:
    if s is None:
        return ""
    if s.single_mse or s.metric == PSNR_METRIC:  # sensitivity/search results: a ratio
        return "output MSE compressed alone (x the median layer)"
    return f"{s.metric} lost ({s.unit})"


def _latency_estimates(inp: Inputs, k: Any) -> tuple[Any, Any] | None:
    """(before, after) roofline estimates: verify's (maybe calibrated) or computed from the plan."""
    ver = inp.verify
    if ver is not None and ver.estimate and "original" in ver.estimate and "compressed" in ver.estimate:
        return ver.estimate["original"], ver.estimate["compressed"]
    if inp.report is None or inp.plan is None:
        return None
    from .estimate import from_plan, roofline

    tgt = k.targets.get(inp.plan.target.name)
    if tgt is None:
        return None
    before = roofline(inp.report, tgt, inp.plan.target.os)
    after = roofline(inp.report, tgt, inp.plan.target.os, from_plan(inp.plan.layers, k))
    if not before.layers:
        inp.notes.append("no latency estimate: " + "; ".join(before.notes))
        return None
    return before, after


def _layer_rows(inp: Inputs, est: tuple[Any, Any] | None, k: Any = None) -> list[LayerRow]:
    plan_rows = {x.name: x for x in (inp.plan.layers if inp.plan is not None else [])}
    ms_before = {r.name: r.ms for r in est[0].layers} if est else {}
    ms_after = {r.name: r.ms for r in est[1].layers} if est else {}
    sens = {x.name: x.value for x in inp.sensitivity.layers} if inp.sensitivity else {}
    drift = {}
    if inp.verify is not None and inp.verify.drift is not None:
        drift = {d.name: d.snr_db for d in inp.verify.drift.layers}
    applied = {x["name"]: str(x.get("status", "")) for x in (inp.manifest or {}).get("layers", [])
               if isinstance(x, dict) and "name" in x}
    baseline = FP16_BYTES  # only for layers the plan does not list
    rows: list[LayerRow] = []
    if inp.report is not None:
        for x in inp.report.layers:
            p = plan_rows.get(x.name)
            before = p.bytes_before if p else int(x.params * baseline)
            rows.append(LayerRow(
                index=x.index, name=x.name, type=x.type, params=x.params, bytes_before=before,
                bytes_after=p.bytes_after if p else before, setting=p.setting if p else "fp16 (no plan)",
                setting_key=row_key(p, k) if p and k else "",
                latency_ms_before=ms_before.get(x.name), latency_ms_after=ms_after.get(x.name),
                sensitivity=sens.get(x.name), drift_snr_db=_finite(drift.get(x.name)), applied=applied.get(x.name)))
    else:  # plan only: no types or parameter counts without the model
        for i, p in enumerate(plan_rows.values()):
            rows.append(LayerRow(index=i, name=p.name, type="?", params=int(p.bytes_before / baseline),
                                 bytes_before=p.bytes_before, bytes_after=p.bytes_after, setting=p.setting,
                                 setting_key=row_key(p, k) if k else "",
                                 sensitivity=sens.get(p.name), drift_snr_db=_finite(drift.get(p.name)),
                                 applied=applied.get(p.name)))
    return rows


def _finite(v: float | None) -> float | None:
    """JSON has no inf: an identical layer output (SNR = +inf) is shown as 'identical'."""
    return v if v is None or math.isfinite(v) else (1e9 if v > 0 else -1e9)


# ------------------------------------------------------------------ summary and plan
def _summary(inp: Inputs, est: tuple[Any, Any] | None) -> list[SummaryRow]:
    rows: list[SummaryRow] = []
    plan, ver = inp.plan, inp.verify
    if plan is not None and plan.prediction is not None:
        p = plan.prediction
        rows.append(SummaryRow(metric="size: weights on the target", before=p.bytes_before / 1e6,
                               after=p.bytes_after / 1e6, unit="MB",
                               basis="estimate", note=f"plan formulas, {p.ratio:.2f}x smaller"))
    rows += _manifest_sizes(inp.manifest)
    if ver is not None:
        rows += _verify_rows(ver)
    if est is not None:
        b, a = est
        basis = "estimate" + (" (calibrated with device figures)" if a.calibrated else "")
        rows.append(SummaryRow(metric=f"latency on {_target_label(b)}", before=b.total_ms, after=a.total_ms,
                               unit="ms", basis=basis, note="roofline over layers with known MACs"))
    if ver is None:
        rows.append(SummaryRow(metric="accuracy", basis="not measured yet", note=_verify_hint(inp)))
    return rows


def _target_label(est: Any) -> str:
    """'ane-a17 (OS 18)'; targets without an OS version (x86, CUDA) have os 0."""
    return f"{est.target} (OS {est.os})" if est.os else est.target


def _manifest_sizes(manifest: dict[str, Any] | None) -> list[SummaryRow]:
    """`apply`'s sizes: {"torch_artifact_bytes": {"value": ..., "label": "measured", "basis": ...}}."""
    sizes = (manifest or {}).get("sizes")
    if not isinstance(sizes, dict):
        return []
    out = []
    for key, val in sizes.items():
        if not key.endswith("_bytes") or not isinstance(val, dict) or not isinstance(val.get("value"), (int, float)):
            continue
        name = key[: -len("_bytes")].replace("_", " ")
        out.append(SummaryRow(metric=f"size: {name} (apply)", after=val["value"] / 1e6, unit="MB",
                              basis=str(val.get("label") or "measured"), note=str(val.get("basis") or "")))
    return out


FIDELITY_ROWS = {  # verify's fidelity metric -> (label, unit, scale)
    "top1_agreement": ("top-1 agreement with the original", "%", 100.0),
    "snr_db": ("SNR vs the original", "dB", 1.0),
    "psnr_db": ("PSNR vs the original", "dB", 1.0),
    "iou": ("IoU vs the original", "", 1.0),
}


def _verify_rows(ver: Any) -> list[SummaryRow]:
    rows: list[SummaryRow] = []
    o, c = ver.original, ver.compressed
    if o.size_bytes is not None and c.size_bytes is not None:
        rows.append(SummaryRow(metric="size: file on disk", before=o.size_bytes / 1e6, after=c.size_bytes / 1e6,
                               unit="MB", basis="measured", note=c.size_basis))
    samples = f"{ver.samples.count} {ver.samples.kind} samples"
    for m in [*ver.accuracy, *ver.evaluator]:
        rows.append(SummaryRow(metric=m.name, before=m.original, after=m.compressed, unit=m.unit,
                               basis="measured", note=samples))
    for f in ver.fidelity:
        for name, v in f.metrics.items():
            if name in FIDELITY_ROWS:
                label, unit, scale = FIDELITY_ROWS[name]
                rows.append(SummaryRow(metric=f"{f.name}: {label}", after=_finite(v * scale), unit=unit,
                                       basis="measured", note=f"compressed vs original, {samples}"))
    if ver.latency is not None:
        for mode in ("eager", "compile"):
            a, b = ver.latency.get("original", mode), ver.latency.get("compressed", mode)
            if a is not None and b is not None:
                rows.append(SummaryRow(metric=f"latency on this machine ({mode})", before=a.median_ms,
                                       after=b.median_ms, unit="ms", basis="measured",
                                       note=f"median of {a.reps}, {ver.latency.device}, batch {ver.latency.batch_size}"))
    if ver.coreml is not None and ver.coreml.timing is not None:
        rows.append(SummaryRow(metric=f"Core ML latency ({ver.coreml.compute_units})",
                               after=ver.coreml.timing.median_ms, unit="ms", basis="measured", note=ver.coreml.note))
    return rows


def _verify_hint(inp: Inputs) -> str:
    """What to run to measure: verify writes the JSON this report reads."""
    orig = "ORIGINAL"
    if inp.report is not None:
        orig = "bundled" if inp.report.format == "bundled" else inp.report.source
    comp = str(inp.run_dir) if inp.run_dir else "COMPRESSED"
    return (f"not measured yet: run `compressadvise verify {orig} {comp} --json > verify.json` "
            "and pass it with --verify (or save it in the run folder)")


def _rule_ref(code: str, k: Any, docs_base: str, title: str = "", why: str = "") -> RuleRef:
    from .textdocs import rule_markdown

    cr = k.rules.get(code)
    text = rule_markdown(k, cr) if cr is not None else ""
    return RuleRef(code=code, title=title or (cr.rule.title if cr else ""), why=why or (cr.rule.why if cr else ""),
                   url=f"{docs_base}{code}.md", explain=text)


def _step_view(s: Any, k: Any, docs_base: str) -> StepView:
    return StepView(technique=s.technique, slot=s.slot, params=dict(s.params), why=s.why, layers=list(s.layers),
                    skipped=[x.model_dump() for x in s.skipped], overrides=dict(s.op_name_params),
                    predicted_bytes_after=s.predicted_bytes_after,
                    rules=[_rule_ref(c, k, docs_base) for c in s.rules])


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
    return chart.to_dict()


def _size_chart(data: ReportData) -> list[Chart] | str:
    if not data.layers:
        return "no layers to show"
    alt = _alt()
    shown, rest = _top(data.layers, lambda r: r.bytes_before)
    states = ("now (fp16)", "after the plan")
    values = []
    for r in shown:
        values += [{"layer": r.name, "state": states[0], "value": r.bytes_before / 1e3, "setting": r.setting},
                   {"layer": r.name, "state": states[1], "value": r.bytes_after / 1e3, "setting": r.setting}]
    before = sum(r.bytes_before for r in data.layers)
    after = sum(r.bytes_after for r in data.layers)
    sub = [f"estimate from the plan: {before / 1e6:.3g} MB -> {after / 1e6:.3g} MB; the largest {len(shown)} layers"]
    if rest:  # a summed bar would dwarf the rest: state it instead
        sub.append(f"the other {len(rest)} layers: {sum(r.bytes_before for r in rest) / 1e6:.3g} MB -> "
                   f"{sum(r.bytes_after for r in rest) / 1e6:.3g} MB (all in the table)")
    spec = _paired_bars(alt, values, [r.name for r in shown], "KB", "Size by layer: now vs after the plan", sub, states)
    return [Chart(id="size", title="Size by layer", basis="estimate", spec=spec)]


def _latency_chart(data: ReportData, est: tuple[Any, Any] | None) -> list[Chart] | str:
    rows = [r for r in data.layers if r.latency_ms_before is not None]
    if est is None or not rows:
        return ("no latency estimate: needs a target profile with memory_bandwidth_gbs and per-layer MACs "
                "(a runnable model: TorchScript, .pt2 or module:function, with --input-shape if it has no example input)")
    alt = _alt()
    shown, _ = _top(rows, lambda r: r.latency_ms_before or 0.0)
    states = ("before", "after the plan")
    values = []
    for r in shown:
        values += [{"layer": r.name, "state": states[0], "value": r.latency_ms_before * 1e3, "setting": r.setting},
                   {"layer": r.name, "state": states[1], "value": (r.latency_ms_after or 0) * 1e3, "setting": r.setting}]
    b, a = est
    sub = [f"estimate (roofline) on {_target_label(b)}: {b.total_ms * 1e3:.4g} us -> {a.total_ms * 1e3:.4g} us"
           + ("; calibrated" if a.calibrated else "")]
    if len(rows) > len(shown):
        sub.append(f"the {len(shown)} slowest of {len(rows)} estimated layers (all in the table)")
    spec = _paired_bars(alt, values, [r.name for r in shown], "microseconds", "Latency by layer on the target",
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
    return [Chart(id="sensitivity", title="Sensitivity by layer", basis=s.label, spec=chart.to_dict())]


def _changed(setting: str) -> bool:
    return bool(setting) and not setting.startswith("fp16")


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
    chart = (line + rule).properties(width=440, height=220, title=alt.Title("Output drift by layer", subtitle=sub))
    return [Chart(id="drift", title="Output drift by layer", basis="measured", spec=chart.to_dict())]


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
    values = [{"name": p.name, "mb": p.bytes / 1e6, "value": p.value, "kind": p.kind, "frontier": id(p) in front,
               "size": p.size_basis, "fidelity": p.value_basis} for p in points]
    kinds = ["original", "uniform", "candidate", "chosen"]
    base = alt.Chart(alt.Data(values=values))
    enc = dict(
        x=alt.X("mb:Q", title="model size (MB)", scale=alt.Scale(zero=False)),
        y=alt.Y("value:Q", title=f"{metric} ({unit})" if unit else metric, scale=alt.Scale(zero=False)),
        color=alt.Color("kind:N", scale=alt.Scale(domain=kinds, range=["#52606d", "#9aa5b1", "#7fb3e6", "#d9822b"]),
                        legend=alt.Legend(orient="bottom")),
        shape=alt.Shape("kind:N", scale=alt.Scale(domain=kinds, range=["square", "circle", "circle", "diamond"])),
        tooltip=["name:N", "kind:N", alt.Tooltip("mb:Q", format=".4g"), alt.Tooltip("value:Q", format=".4g"),
                 alt.Tooltip("fidelity:N", title="fidelity is"), alt.Tooltip("size:N", title="size is")])
    layers = []  # only layers with data: an empty layer makes Vega warn about infinite extents
    if len(front) > 1:
        layers.append(base.transform_filter("datum.frontier").mark_line(color="#2f6fdf", strokeDash=[5, 3]).encode(
            x="mb:Q", y="value:Q", order="mb:Q"))
    if any(p.value_basis == "measured" for p in points):
        layers.append(base.transform_filter("datum.fidelity == 'measured'").mark_point(filled=True, size=110)
                      .encode(**enc))
    if any(p.value_basis != "measured" for p in points):
        layers.append(base.transform_filter("datum.fidelity != 'measured'").mark_point(
            filled=False, size=110, strokeWidth=2).encode(**enc))
    layers.append(base.transform_filter("datum.frontier || datum.kind == 'chosen' || datum.kind == 'original'")
                  .mark_text(align="left", dx=8, dy=-6, fontSize=10).encode(x="mb:Q", y="value:Q", text="name:N"))
    sub = ["filled: fidelity measured; hollow: predicted (estimate); dashed: the Pareto frontier"]
    if not any(p.kind == "uniform" for p in points):
        sub.append("uniform baselines not measured yet (sensitivity results)")
    if metric == PSNR_METRIC:
        sub.append("the original is exact (infinite PSNR) and not drawn")
    chart = alt.layer(*layers).properties(width=440, height=300, title=alt.Title(
        "Size vs fidelity", subtitle=sub))
    basis = "measured" if all(p.value_basis == "measured" for p in points) else "measured and estimate"
    return [Chart(id="pareto", title="Size vs fidelity", basis=basis, spec=chart.to_dict())]


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
    return resources.files("compressadvise").joinpath("report_assets", name).read_text(encoding="utf-8")


def _json_in_script(text: str) -> str:
    """JSON inside <script> must not close it early: '<' only occurs inside JSON strings,
    where the escape '\\u003c' means the same character."""
    return text.replace("<", "\\u003c")


def _js_in_script(text: str) -> str:
    """Code inside <script>: only a literal '</script' or '<!--' could end or confuse the
    element. A blanket '</' escape would corrupt regular expressions such as /</g."""
    text = re.sub(r"</(script)", r"<\\/\1", text, flags=re.IGNORECASE)
    return text.replace("<!--", "<\\!--")


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


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
        _summary_html(data),
        _charts_html(data, specs),
        _plan_html(data),
        _table_html(data),
        _notes_html(data),
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


def _badge(basis: str) -> str:
    kind = "measured" if basis.startswith("measured") else "estimate" if basis.startswith("estimate") else "missing"
    return f'<span class="badge {kind}">{_e(basis)}</span>'


def _header(d: ReportData) -> str:
    target = f"{d.target} (OS {d.os})" if d.target else "no target"
    read = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in d.inputs.items())
    return (f'<header><h1>{_e(d.title)}</h1><p class="meta">model <code>{_e(d.source)}</code> · target '
            f"<b>{_e(target)}</b> · {len(d.layers)} layers · generated {_e(d.generated)} by compressadvise "
            f"{_e(d.version)}</p>"
            '<p class="legend"><span class="badge measured">measured</span> run on real samples or a device · '
            '<span class="badge estimate">estimate</span> from formulas or a roofline model, not run</p>'
            + (f'<details class="inputs"><summary>inputs</summary><ul>{read}</ul></details>' if read else "")
            + "</header>")


def _summary_html(d: ReportData) -> str:
    rows = []
    for r in d.summary:
        before = _num(r.before) if r.before is not None else "—"
        after = _num(r.after) if r.after is not None else "—"
        change = ""
        if r.before not in (None, 0) and r.after is not None:
            change = f"{(r.after - r.before) / abs(r.before):+.1%}"
        rows.append(f"<tr><td>{_e(r.metric)}</td><td class=num>{before}</td><td class=num>{after}</td>"
                    f"<td>{_e(r.unit)}</td><td class=num>{change}</td><td>{_badge(r.basis)}</td>"
                    f"<td class=note>{_e(r.note)}</td></tr>")
    budgets = ""
    if d.budgets:
        items = "".join(
            f'<li class="{"pass" if b.get("passed") else "fail"}"><b>{_e(b.get("name"))}</b>: '
            f'{"met" if b.get("passed") else "MISSED"} — {_e(_num(b.get("value")))} {_e(b.get("unit", ""))} '
            f'vs limit {_e(_num(b.get("limit")))} ({_e(b.get("basis", ""))}) {_e(b.get("detail", ""))}</li>'
            for b in d.budgets)
        budgets = f'<h3>Budgets</h3><ul class="budgets">{items}</ul>'
    return (f'<section id="summary"><h2>Before / after</h2><table class="summary"><thead><tr><th>what</th>'
            f"<th>before</th><th>after</th><th>unit</th><th>change</th><th>basis</th><th>note</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{budgets}</section>")


def _charts_html(d: ReportData, specs: dict[str, Any]) -> str:
    figs = [f'<figure class="chart" id="fig-{_e(c.id)}"><div class="vega" data-chart="{_e(c.id)}" '
            f'role="img" aria-label="{_e(c.title)}"></div><figcaption>{_e(c.title)} {_badge(c.basis)}</figcaption>'
            "</figure>" for c in d.charts if c.id in specs]
    missing = "".join(f'<li data-omitted="{_e(o.id)}"><b>{_e(o.title)}</b>: {_e(o.reason)}</li>' for o in d.omitted)
    omitted = f'<div class="omitted"><h3>Not shown</h3><ul>{missing}</ul></div>' if missing else ""
    return (f'<section id="charts"><h2>Hot spots and trade-offs</h2><p class="hint">Click a layer in a chart '
            f"to find it in the table.</p><div class=grid>{''.join(figs)}</div>{omitted}</section>")


def _rule_html(r: RuleRef) -> str:
    body = _markdown(r.explain) if r.explain else "<p>(rule text not available in this knowledge base)</p>"
    return (f'<details class="rule"><summary><a href="{_e(r.url)}"><code>{_e(r.code)}</code></a> '
            f"{_e(r.title)}</summary><div class=explain>{body}</div></details>")


def _markdown(text: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": False}).enable("table").render(text)


def _plan_html(d: ReportData) -> str:
    if not d.steps and not d.advice:
        return '<section id="plan"><h2>The plan</h2><p>No compression step fired for this model and target.</p></section>'
    parts = ['<section id="plan"><h2>The plan and its reasons</h2><ol class="steps">']
    for s in d.steps:
        params = ", ".join(f"{k}={v}" for k, v in s.params.items())
        size = f" · size after this step {human_bytes(s.predicted_bytes_after)} {_badge('estimate')}" \
            if s.predicted_bytes_after is not None else ""
        skipped = "".join(f"<li><code>{_e(x['layer'])}</code>: {_e(x['reason'])} [{_e(x.get('code') or '')}]</li>"
                          for x in s.skipped)
        overrides = "".join(f"<li><code>{_e(n)}</code>: {_e(', '.join(f'{k}={v}' for k, v in o.items()))}</li>"
                            for n, o in s.overrides.items())
        parts.append(
            f"<li><h3>{_e(s.technique)} <small>({_e(s.slot)})</small></h3><p><code>{_e(params)}</code></p>"
            f"<p>why: {_e(s.why)}</p><p>compresses {len(s.layers)} layer(s){size}</p>"
            + (f"<details><summary>{len(s.skipped)} layer(s) left out</summary><ul>{skipped}</ul></details>" if skipped else "")
            + (f"<details><summary>{len(s.overrides)} per-layer override(s)</summary><ul>{overrides}</ul></details>"
               if overrides else "")
            + f"<div class=rules>rules: {''.join(_rule_html(r) for r in s.rules)}</div></li>")
    parts.append("</ol>")
    if d.advice:
        parts.append('<h3>Advice</h3><ul class="advice">')
        for a in d.advice:
            where = f" <small>({_e(', '.join(a.layers[:6]))}{'…' if len(a.layers) > 6 else ''})</small>" if a.layers else ""
            parts.append(f"<li>{_e(a.message)}{where}{_rule_html(a.rule)}</li>")
        parts.append("</ul>")
    if d.trace:
        rows = "".join(f"<li><code>{_e(t['code'])}</code> {_e(t['status'])}: {_e(t['detail'])}</li>" for t in d.trace)
        parts.append(f"<details><summary>rule trace</summary><ul>{rows}</ul></details>")
    parts.append("</section>")
    return "".join(parts)


COLUMNS: list[tuple[str, str, str]] = [
    # (key, header, type) -- type "num" sorts numerically, "str" alphabetically
    ("index", "#", "num"), ("name", "layer", "str"), ("type", "type", "str"), ("params", "params", "num"),
    ("before", "size now", "num"), ("after", "after plan", "num"), ("saved", "saved", "num"),
    ("time", "time share (est.)", "num"), ("sens", "sensitivity", "num"), ("drift", "drift SNR dB", "num"),
    ("setting", "setting", "str"), ("applied", "applied", "str"),
]


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
        cells.append(f"<td>{_e(r.applied or '—')}</td>")
    return f'<tr data-changed="{int(_changed(r.setting))}">{"".join(cells)}</tr>'


def _num_cell(v: float | None, digits: int) -> str:
    return f'<td class=num data-v="{"" if v is None else f"{v:.6g}"}">{_num(v, digits)}</td>'


def _notes_html(d: ReportData) -> str:
    if not d.notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in d.notes)
    return f'<section id="notes"><h2>Notes</h2><ul>{items}</ul></section>'


# ------------------------------------------------------------------ PNG and writing
def write_pngs(data: ReportData, folder: str | os.PathLike, *, scale: float = 2.0) -> list[Path]:
    """Each chart as `<id>.png` (rendered offline by vl-convert), written atomically."""
    vlc = _vlc()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    version = vl_version()
    written = []
    for c in data.charts:
        png = vlc.vegalite_to_png(c.spec, vl_version=version, scale=scale)
        written.append(_write_bytes_atomic(folder / f"{c.id}.png", png))
    return written


def _write_bytes_atomic(path: Path, payload: bytes) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class ReportResult(BaseModel):
    html: str
    bytes: int
    layers: int
    charts: list[str]
    omitted: dict[str, str]
    png: list[str] = []
    summary: list[SummaryRow] = []
    notes: list[str] = []  # about the inputs: what could not be read or analyzed, and why


def write_report(
    source: Any = None,
    out: str | os.PathLike = "report.html",
    *,
    png_dir: str | os.PathLike | None = None,
    force: bool = False,
    docs_base: str = DOCS_BASE,
    title: str | None = None,
    **gather_args: Any,
) -> ReportResult:
    """Gather, build and write the report (and optional PNGs); the input model is only read."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExists(f"{out} already exists", hint="pass --force to replace it")
    inp = gather(source, **gather_args)
    notes = list(inp.notes)
    data = build(inp, docs_base=docs_base, knowledge=gather_args.get("knowledge"), title=title)
    page = render_html(data)
    write_text_atomic(out, page)
    pngs = [str(p) for p in write_pngs(data, png_dir)] if png_dir is not None else []
    return ReportResult(html=str(out), bytes=len(page.encode("utf-8")), layers=len(data.layers),
                        charts=[c.id for c in data.charts], omitted={o.id: o.reason for o in data.omitted},
                        png=pngs, summary=data.summary, notes=notes)
