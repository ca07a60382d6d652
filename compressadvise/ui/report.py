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
is ~4.5 MB, over the 3 MB budget); vl-convert also renders the PNGs offline, without a browser.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from compressadvise.errors import BadModel, CompressAdviseError, InputNotFound, InvalidKnowledge, OutputExists
from compressadvise.fsutil import write_text_atomic
from compressadvise.ui.report_built import built_view
from compressadvise.ui.report_charts import _add_charts, _vlc
from compressadvise.ui.report_data import AdviceView, LayerRow, ReportData, SummaryRow, _finite
from compressadvise.ui.report_html import render_html, vl_version
from compressadvise.ui.report_rules import collect_rules
from compressadvise.ui.report_sensitivity import (Sensitivity, _first_error, _read_json, _sens_label, keyed, load_sensitivity,
                                 row_key)
from compressadvise.ui.report_summary import _rule_ref, _step_view, _summary
from compressadvise.ui.report_whatif import whatif_data

# The report's names as they were before the split into report_*.py:
from compressadvise.ui.report_charts import TOP_BARS, _changed, _predicted_points, frontier  # re-exported
from compressadvise.ui.report_data import Chart, Omitted, RuleRef, StepView  # re-exported
from compressadvise.ui.report_html import cache_dir, vega_runtime  # re-exported
from compressadvise.ui.report_sensitivity import PSNR_METRIC, Basis, ParetoPoint, SensitivityLayer  # re-exported
from compressadvise.ui.report_summary import FIDELITY_ROWS  # re-exported

DOCS_BASE = ""  # no link off the page unless a docs site is named: each rule's text is embedded
RUN_FILES = {"manifest": "manifest.json", "verify": "verify.json", "sensitivity": "sensitivity.json"}
MISSING_WITHOUT_MODEL = "layer types and latency estimates are missing"
FP16_BYTES = 2.0


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
    from compressadvise.knowledge.base import builtin

    k = knowledge or builtin()
    if target is not None:
        k.target(target)  # fail fast on a bad name, before loading anything
    # Result files first: a bad one fails before the (slower) model analysis.
    ver = _load_verify(verify) if verify is not None else None
    sens = None
    if sensitivity is not None:
        sens = sensitivity if isinstance(sensitivity, Sensitivity) else load_sensitivity(sensitivity)
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and not _is_hf_folder(Path(source)):
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
    from compressadvise.model.analysis import ModelReport, analyze
    from compressadvise.model.loading import LoadedModel, load_model

    if isinstance(source, ModelReport):
        return source
    model = source if isinstance(source, LoadedModel) else load_model(source, trust_pickle=trust_pickle)
    return analyze(model, input_shape=input_shape)


def _recommend(report: Any, k: Any, target: str | None, os_version: int | None,
               constraints: dict[str, Any] | None) -> Any:
    from compressadvise.plan.engine import recommend

    c = dict(constraints or {})
    relative = {n: c.pop(n, None) for n in ("size_fraction", "bits_per_weight")}  # keywords, not Constraints
    return recommend(report, target=target or "ane-a17", os=os_version, knowledge=k, constraints=c, **relative)


def _load_plan_arg(plan: Any) -> Any:
    from compressadvise.plan.planfile import load_plan

    if hasattr(plan, "steps"):
        return plan
    if not Path(plan).is_file():
        raise InputNotFound(f"{plan}: no such plan file")
    return load_plan(plan)


def _load_verify(verify: Any) -> Any:
    from compressadvise.measure.verify import VerifyResult

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
    from compressadvise.knowledge.schema import Plan

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
    from compressadvise import __version__
    from compressadvise.knowledge.base import builtin

    k = knowledge or builtin()
    inp = dataclasses.replace(inp, sensitivity=keyed(inp.sensitivity, k))
    plan, ver = inp.plan, inp.verify
    est = _latency_estimates(inp, k)
    layers = _layer_rows(inp, est, k)
    data = ReportData(
        title=title or f"Compression report: {_model_name(inp)}",
        source=inp.source, model=_model_name(inp),
        target=plan.target.name if plan else None, os=plan.target.os if plan else None,
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
    placed = _placement(inp, k)
    data.placement = placed.model_dump(mode="json") if placed is not None else None
    data.placement_rule = _rule_ref(placed.rule, k, docs_base) if placed is not None and placed.fallback else None
    data.built = built_view(inp, k)
    data.rules = collect_rules(data, k, docs_base)
    data.whatif = whatif_data(inp, k, est)
    _add_charts(data, inp, est)
    return data


def _placement(inp: Inputs, k: Any) -> Any:
    """Placement on the plan's target: from the built .mlpackage (the ops Core ML is handed) when
    the input is an apply folder with one, else from the model's op graph."""
    from compressadvise.measure.placement import check, for_mlpackage

    tgt = k.targets.get(inp.plan.target.name) if inp.plan is not None else None
    if tgt is None or tgt.placement is None:
        return None
    name = (inp.manifest or {}).get("mlpackage")
    plain = isinstance(name, str) and name == Path(name).name and name not in ("", ".", "..")  # never outside the folder
    package = inp.run_dir / name if inp.run_dir is not None and plain else None
    if package is not None and package.is_dir():
        try:
            return for_mlpackage(str(package), tgt)
        except Exception as e:  # an unreadable package: say so, fall back to the graph
            inp.notes.append(f"placement: {package.name} could not be read ({type(e).__name__}); from the graph instead")
    if inp.report is not None and inp.report.ops is not None:
        return check(inp.report.ops, tgt)
    return inp.plan.placement


def _model_name(inp: Inputs) -> str:
    """The model itself (an apply folder's original, or its plan's model), never the folder's name."""
    if inp.report is not None:
        return inp.report.source
    if inp.plan is not None and inp.plan.model.source:
        return inp.plan.model.source
    original = (inp.manifest or {}).get("input")
    return str(original["source"]) if isinstance(original, dict) and original.get("source") else inp.source


def _latency_estimates(inp: Inputs, k: Any) -> tuple[Any, Any] | None:
    """(before, after) roofline estimates: verify's (maybe calibrated) or computed from the plan."""
    ver = inp.verify
    if ver is not None and ver.estimate and "original" in ver.estimate and "compressed" in ver.estimate:
        return ver.estimate["original"], ver.estimate["compressed"]
    if inp.report is None or inp.plan is None:
        return None
    from compressadvise.measure.estimate import from_plan, roofline

    tgt = k.targets.get(inp.plan.target.name)
    if tgt is None:
        return None
    before = roofline(inp.report, tgt, inp.plan.target.os)
    after = roofline(inp.report, tgt, inp.plan.target.os, from_plan(inp.plan.layers, k))
    if not before.layers:
        inp.notes.append("no latency estimate: " + "; ".join(before.notes))
        return None
    return before, after


NOT_BUILT = "planned, not built"


def _not_built(manifest: dict[str, Any] | None) -> dict[str, str]:
    """Layer -> why, for each planned layer the apply manifest's planned-vs-built gate lists."""
    gate = (manifest or {}).get("planned_vs_built")
    rows = gate.get("rows", []) if isinstance(gate, dict) else []
    return {str(r["layer"]): str(r.get("reason", "")) for r in rows if isinstance(r, dict) and "layer" in r}


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
    missed = _not_built(inp.manifest)
    applied.update({name: f"{NOT_BUILT}: {why}" for name, why in missed.items()})
    baseline = FP16_BYTES  # only for layers the plan does not list
    rows: list[LayerRow] = []
    if inp.report is not None:
        for x in inp.report.layers:
            p = plan_rows.get(x.name)
            before = p.bytes_before if p else int(x.params * baseline)
            rows.append(LayerRow(  # a planned layer apply did not build is drawn as it shipped: uncompressed
                index=x.index, name=x.name, type=x.type, params=x.params, bytes_before=before,
                bytes_after=p.bytes_after if p and x.name not in missed else before,
                setting=p.setting if p else "fp16 (no plan)",
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


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder is a model to report on, not an `apply` output folder."""
    from compressadvise.model.hf import is_hf_folder

    return is_hf_folder(path)
