"""The manifest of apply: input, versions, per-layer outcome on each side, and labelled sizes."""
from __future__ import annotations

import platform
import time
from typing import Any

from compressadvise import backends as B
from compressadvise.model.analysis import ModelReport
from compressadvise.backends.apply_coreml import MLPACKAGE
from compressadvise.backends.apply_resolve import Route
from compressadvise.backends.apply_torch import _target_sparsity
from compressadvise.knowledge.base import Knowledge
from compressadvise.model.loading import LoadedModel
from compressadvise.knowledge.schema import Plan, Step, Target

MANIFEST_VERSION = 1
SIZE_TOLERANCE = 0.02  # measured weight file vs estimate; beyond it the manifest carries a note


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("compressadvise", "torch", "coremltools", "torchao", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _predict_applied(k: Knowledge, report: ModelReport, jobs: list[B.StepJob], outcome: dict, side: str,
                     baseline: float, target: Target | None = None, os: int = 0) -> int:
    """The size formulas over the layers really compressed on one side (estimate)."""
    from compressadvise.plan.engine import predict_layers

    steps = []
    for job in jobs:
        done = [lj for lj in job.layers if outcome.get((job.index, lj.name, side), {}).get("status") == "applied"]
        steps.append(Step(technique=job.technique, slot=job.slot, params=job.params,
                          layers=[lj.name for lj in done], op_name_params={lj.name: _sized(lj.params) for lj in done}))
    try:
        _, _, after = predict_layers(k, report, steps, baseline, target, os)
    except Exception:  # a technique without a size formula
        return 0
    return after


def _sized(p: dict[str, Any]) -> dict[str, Any]:
    """Parameters as the size formulas read them: an n:m pattern's sparsity is n/m."""
    if p.get("pattern") == "n_m" and "sparsity" in p:
        return {**p, "sparsity": _target_sparsity(p)}
    return p
def _manifest(plan: Plan, k: Knowledge, loaded: LoadedModel, report: ModelReport, jobs: list[B.StepJob],
              route: Route, outcome: dict, torch_info: dict[str, Any], torch_bytes: int | None,
              ml: dict[str, Any]) -> dict[str, Any]:
    target = k.target(plan.target.name)
    layers = _layer_records(report, jobs, outcome)
    sizes = _sizes(plan, k, report, jobs, route, outcome, torch_info, torch_bytes, ml, target)
    used = sorted({b for j in jobs for b in (j.torch_backend if route.torch_side else None,
                                             j.coreml_backend if route.coreml == "native" else None) if b})
    if route.coreml == "convert":
        used.append("coremltools (ct.convert)")
    return {
        "manifest_version": MANIFEST_VERSION,
        "input": {"source": loaded.source, "format": loaded.format, "sha256": loaded.sha256},
        "input_sha256": loaded.sha256,
        "plan": "plan.yaml",
        "target": {"name": target.name, "os": plan.target.os, "coreml": target.coreml},
        "versions": _versions(),
        "torch_artifact": torch_info["file"],
        "torch_format": torch_info["format"],
        "torch_note": torch_info["note"],
        "mlpackage": MLPACKAGE if ml else None,
        "coreml": ({k2: v for k2, v in ml.items() if k2 not in ("package_bytes", "weight_file_bytes")} if ml else None),
        "backends_used": used,
        # BatchNorms folded before compressing (model.deploy): a state-dict artefact is rebuilt the same way.
        "folded": [{"layer": f.layer, "bn": f.bn, "scale_min": f.scale_min, "scale_max": f.scale_max}
                   for f in loaded.folds],
        "steps": _step_records(jobs, route, outcome),
        "notes": route.notes,
        "layers": layers,
        "sizes": sizes,
    }


def _layer_records(report: ModelReport, jobs: list[B.StepJob], outcome: dict) -> list[dict[str, Any]]:
    """One record per layer of the model: what each step did to it on each side, and its status."""
    layers = []
    in_steps: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        for lj in job.layers:
            entry = {"step": job.index + 1, "technique": job.technique, "params": lj.params}
            if lj.setting is not None:  # the same key sizing, search and the report join on
                entry["setting"] = {"key": lj.setting.key, "label": lj.setting.label}
            for side in ("torch", "coreml"):
                rec = outcome.get((job.index, lj.name, side))
                if rec:
                    entry[side] = rec
            in_steps.setdefault(lj.name, []).append(entry)
        for s in job.skipped:
            in_steps.setdefault(s["layer"], []).append({"step": job.index + 1, "technique": job.technique,
                                                        "status": "skipped", "reason": s["reason"], "code": s["code"]})
    for x in report.layers:
        entries = in_steps.get(x.name, [])
        layers.append({"name": x.name, "type": x.type, "shape": x.weight_shape, "params": x.params,
                       "status": _layer_status(entries), "steps": entries})
    return layers


def _sizes(plan: Plan, k: Knowledge, report: ModelReport, jobs: list[B.StepJob], route: Route, outcome: dict,
           torch_info: dict[str, Any], torch_bytes: int | None, ml: dict[str, Any], target: Target) -> dict[str, Any]:
    """Sizes, each labelled estimate or measured, with its basis."""
    baseline = target.baseline_bytes_per_param
    sizes: dict[str, Any] = {}
    if plan.prediction:
        sizes["plan_estimate_bytes"] = {"value": plan.prediction.bytes_after, "label": "estimate",
                                        "basis": "the plan's prediction (technique size formulas, layers as planned)"}
    side = "coreml" if ml else "torch"
    applied = _predict_applied(k, report, jobs, outcome, side, baseline, target, plan.target.os or target.default_os)
    if applied:
        sizes["applied_estimate_bytes"] = {"value": applied, "label": "estimate",
                                           "basis": f"size formulas over the layers compressed on the {side} side, "
                                           f"{baseline:g} B per uncompressed weight"}
    if ml:
        _coreml_sizes(sizes, ml, applied, route)
    if torch_bytes is not None:
        sizes["torch_artifact_bytes"] = {"value": torch_bytes, "label": "measured",
                                         "basis": f"{torch_info['file']} on disk"
                                         + ("" if target.coreml is False else " (float weights snapped to the "
                                            "compressed values: for accuracy checks, not for size)")}
    return sizes


def _coreml_sizes(sizes: dict[str, Any], ml: dict[str, Any], applied: int, route: Route) -> None:
    """The .mlpackage's measured sizes and the weight file against its estimate (a note when far off)."""
    est = applied + ml["overhead_estimate"] if applied else None
    sizes["mlpackage_bytes"] = {"value": ml["package_bytes"], "label": "measured",
                                "basis": "whole .mlpackage on disk (weights + program + manifest)"}
    sizes["weight_file_bytes"] = {"value": ml["weight_file_bytes"], "label": "measured",
                                  "basis": "Data/com.apple.CoreML/weights/weight.bin on disk"}
    if est:
        sizes["weight_file_estimate_bytes"] = {
            "value": est, "label": "estimate",
            "basis": f"applied estimate + container overhead for {ml['blobs']} blobs (64 B file header, "
            "64 B per blob, 32 B average alignment padding)"}
        err = (ml["weight_file_bytes"] - est) / est
        sizes["weight_file_error"] = {"value": round(err, 4), "label": "measured vs estimate"}
        if abs(err) > SIZE_TOLERANCE:
            route.notes.append(f"the weight file is {err:+.1%} off the size estimate (tolerance "
                               f"{SIZE_TOLERANCE:.0%}): a technique's size formula does not match what "
                               "the backend stores for this model")


def _step_records(jobs: list[B.StepJob], route: Route, outcome: dict) -> list[dict[str, Any]]:
    """One record per step: its backends on each side and the layers it compressed."""
    return [{"step": j.index + 1, "technique": j.technique, "slot": j.slot, "params": j.params,
             "torch_backend": j.torch_backend if route.torch_side else None,
             "coreml_backend": j.coreml_backend if route.coreml == "native" else
             ("ct.convert of the torch-side result" if route.coreml else None),
             "layers_applied": sorted({n for (s, n, _), r in outcome.items() if s == j.index and r.get("status") == "applied"}),
             "layers_skipped": len(j.skipped), "notes": j.notes} for j in jobs]


def _layer_status(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "unchanged (not in the plan)"
    states = set()
    for e in entries:
        if e.get("status") == "skipped":
            states.add("skipped")
        for side in ("torch", "coreml"):
            if side in e:
                states.add(e[side]["status"])
    if "applied" in states:
        return "applied" if states == {"applied"} else "partly applied"
    return "skipped"


class Resources:
    """This process's memory and time by apply stage, measured: the peak RSS is the kernel's
    high-water mark (resource.getrusage ru_maxrss), which counts everything the process held since
    it started (loading the model included); `rss_mb` is what it still held when the stage ended."""

    def __init__(self, first: str) -> None:
        self.label, self.started, self.cpu = first, time.perf_counter(), cpu_seconds()
        self.by_stage: dict[str, dict[str, float]] = {}
        self.path = ""  # which of apply's memory paths ran

    def stage(self, label: str) -> None:
        """Close the running stage (a label seen again adds up) and start `label`."""
        now = time.perf_counter()
        rec = self.by_stage.setdefault(self.label, {"seconds": 0.0})
        cpu = cpu_seconds()
        rec["seconds"] = round(rec["seconds"] + now - self.started, 2)
        rec["cpu_seconds"] = round(rec.get("cpu_seconds", 0.0) + cpu - self.cpu, 2)
        rec.update(peak_rss_mb=peak_rss_mb(), rss_mb=current_rss_mb())
        self.label, self.started, self.cpu = label, now, cpu

    def record(self) -> dict[str, Any]:
        self.stage("")
        self.by_stage.pop("", None)
        return {"peak_rss_mb": peak_rss_mb(), "label": "measured", "path": self.path,
                "basis": "MiB; resource.getrusage(RUSAGE_SELF).ru_maxrss of the apply process: its high-water mark "
                "since it started, loading included; by stage: the high-water mark and the resident set "
                "when the stage ended, wall and CPU seconds (user + system, all threads)",
                "by_stage": self.by_stage}


def cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mb() -> float:
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20) if sys.platform == "darwin" else peak / 1024, 1)  # bytes on macOS, KiB on Linux


def current_rss_mb() -> float | None:
    """Resident set now (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os

    return round(pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20), 1)
