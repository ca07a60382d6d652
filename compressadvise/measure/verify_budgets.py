"""Budgets and verdicts for verify: target estimates, the accuracy/latency/size verdicts and the judge."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from compressadvise.measure.estimate import LayerCompression, ModelEstimate
from compressadvise.measure.metrics import ResultModel
from compressadvise.model.samples import Samples

if TYPE_CHECKING:
    from compressadvise.measure.verify import VerifyResult
    from compressadvise.measure.verify_resolve import _Side

ACCURACY_KEY = "accuracy"


class Budgets(ResultModel):
    max_accuracy_drop: float | None = Field(None, description="points (percentage points of accuracy)")
    max_latency_ms: float | None = None
    max_size_mb: float | None = Field(None, description="MB = 10^6 bytes")
    size_fraction: float | None = Field(None, description="of the original's fp16 size (as recommend and search read it)")
    bits_per_weight: float | None = Field(None, description="average bits per parameter of the original")
    size_from: str = Field("", description="how max_size_mb was derived from size_fraction or bits_per_weight")

    def relative(self) -> bool:
        return self.size_fraction is not None or self.bits_per_weight is not None

    def resolved(self, fp16_bytes: int, params: int) -> Budgets:
        """One size budget in MB: a fraction is of the fp16 size, bits are per parameter (the
        sizes recommend and search plan with, so a plan's budget checks the same way here)."""
        given = [n for n in ("max_size_mb", "size_fraction", "bits_per_weight") if getattr(self, n) is not None]
        if len(given) > 1:
            from compressadvise.errors import BadArgument

            raise BadArgument(f"give one size budget, not {' and '.join(given)}")
        from compressadvise.plan.budgets import MB, budget_bytes

        rel = budget_bytes(fp16_bytes, params, size_fraction=self.size_fraction, bits_per_weight=self.bits_per_weight)
        if rel is None:
            return self
        how = (f"{self.size_fraction:g} of the original's fp16 size" if self.size_fraction is not None
               else f"{self.bits_per_weight:g} bits x {params:,} parameters")
        return self.model_copy(update={"max_size_mb": rel / MB, "size_fraction": None, "bits_per_weight": None,
                                       "size_from": how})


class BudgetVerdict(ResultModel):
    name: str
    limit: float | None = None
    value: float | None = None
    unit: str = ""
    basis: str = Field(description="what the value is: measured here, measured on device, estimate, proxy")
    passed: bool
    detail: str = ""


def _estimates(orig: _Side, comp: _Side, samples: Samples, target: str, os_version: int | None,
               calibration: Any, plan: Any, profile: Any = None
               ) -> tuple[dict[str, ModelEstimate], dict[str, float], list[str]]:
    from compressadvise.model.analysis import analyze
    from compressadvise.measure.estimate import calibrate, detect_compression, from_plan, load_calibration, roofline
    from compressadvise.knowledge.base import builtin

    k = builtin()
    tgt = k.target(target)
    shape = [1, *samples.inputs[0].shape[1:]]
    report = analyze(orig.loaded, input_shape=shape, stats=False)
    notes = []
    plan = plan or comp.plan
    if plan is not None and getattr(plan, "layers", None):
        comp_layers = from_plan(plan.layers, k)
        notes.append("compressed weight bytes per layer from the plan (estimates)")
    else:
        comp_layers = detect_compression(comp.graph, report, tgt.baseline_bytes_per_param)
        if not comp_layers:
            notes.append("no compression detected in the compressed model's weights: "
                         "its target estimate equals the original's")
    e_orig = roofline(report, tgt, os_version)
    e_comp = roofline(report, tgt, os_version, comp_layers)
    if calibration is not None:
        cal = calibration if not isinstance(calibration, (str, os.PathLike)) else load_calibration(calibration)
        e_orig, e_comp = calibrate(e_orig, e_comp, cal)
    if profile is not None:
        e_orig, e_comp = _with_profile(e_orig, e_comp, profile, comp)
        notes += _placement_vs_profile(comp, tgt, profile)
    sizes = {"original": _target_bytes(report, {}, tgt.baseline_bytes_per_param),
             "compressed": _target_bytes(report, comp_layers, tgt.baseline_bytes_per_param)}
    return {"original": e_orig, "compressed": e_comp}, sizes, notes


def _with_profile(e_orig: ModelEstimate, e_comp: ModelEstimate, profile: Any, comp: _Side
                  ) -> tuple[ModelEstimate, ModelEstimate]:
    """Both estimates calibrated by a device profile; measured when it profiled this very build."""
    from compressadvise.measure.device_profile import calibrate_with_profile

    hashes = [comp.loaded.sha256]
    if comp.mlpackage and profile.model.sha256:  # hashing a package folder costs a read: only to compare
        from compressadvise.fsutil import sha256_path

        hashes.append(sha256_path(comp.mlpackage))
    o, c = calibrate_with_profile(e_orig, e_comp, profile, compressed_sha256=hashes)
    return o, c if c is not None else e_comp


def _placement_vs_profile(comp: _Side, tgt: Any, profile: Any) -> list[str]:
    """The placement predicted for the built program, checked against the ops the profile saw off the accelerator."""
    if comp.mlpackage is None or tgt.placement is None:
        return []
    from compressadvise.measure.placement import against_profile, for_mlpackage

    try:
        placed = for_mlpackage(str(comp.mlpackage), tgt)
    except Exception as e:  # a package coremltools cannot read: the latency figures stand without the check
        return [f"placement not checked against the profile: {Path(comp.mlpackage).name} could not be read "
                f"({type(e).__name__})"]
    return against_profile(placed, profile)


def _target_bytes(report: Any, comp: dict[str, LayerCompression], baseline: float) -> float:
    in_layers = sum(x.params for x in report.layers)
    total = (report.stored() - in_layers) * baseline
    for x in report.layers:
        if not x.is_dead:  # stored() leaves out what the converter drops
            total += comp[x.name].bytes if x.name in comp else x.params * baseline
    return total


def _accuracy_verdict(limit: float, result: VerifyResult) -> BudgetVerdict:
    primary = next((r for r in result.evaluator if r.name == ACCURACY_KEY), result.evaluator[0] if result.evaluator else None)
    if primary is not None:
        drop = primary.original - primary.compressed
        return BudgetVerdict(name="accuracy drop", limit=limit, value=drop, unit="points",
                             basis=f"measured: evaluator metric {primary.name!r}", passed=drop <= limit)
    top1 = next((r for r in result.accuracy if r.name == "top-1 accuracy"), None)
    if top1 is not None:
        drop = top1.original - top1.compressed
        return BudgetVerdict(name="accuracy drop", limit=limit, value=drop, unit="points",
                             basis="measured: top-1 on the labelled samples", passed=drop <= limit)
    agree = next((f for f in result.fidelity if "top1_agreement" in f.metrics), None)
    if agree is not None:
        drop = 100.0 * (1.0 - agree.metrics["top1_agreement"])
        return BudgetVerdict(name="accuracy drop", limit=limit, value=drop, unit="points",
                             basis="proxy: top-1 disagreement with the original (no labels)", passed=drop <= limit,
                             detail="an upper bound on the top-1 drop; pass labels or --eval for the real figure")
    return BudgetVerdict(name="accuracy drop", limit=limit, basis="not measurable", passed=False,
                         detail="no labels, no evaluator and no classification output: pass --eval module:function")


def _latency_verdict(limit: float, result: VerifyResult) -> BudgetVerdict:
    if result.coreml is not None and result.coreml.timing is not None:
        v = result.coreml.timing.median_ms
        basis = f"measured: Core ML {result.coreml.compute_units} median on this Mac"
    elif result.estimate is not None and result.estimate["compressed"].total_ms > 0:
        e = result.estimate["compressed"]
        label = e.basis_label()
        v, basis = e.total_ms, label if label.startswith("measured") else f"{label} for {e.target} (iOS {e.os})"
    elif result.latency is not None and result.latency.best("compressed") is not None:
        t = result.latency.best("compressed")
        v, basis = t.median_ms, f"measured: {t.mode} median on this machine ({result.latency.device}, {result.latency.threads} threads)"
    else:
        return BudgetVerdict(name="latency", limit=limit, unit="ms", basis="not measured", passed=False,
                             detail="latency was not measured (--no-latency) and no target estimate exists")
    return BudgetVerdict(name="latency", limit=limit, value=v, unit="ms", basis=basis, passed=v <= limit)


def _size_verdict(limit: float, result: VerifyResult, from_: str = "") -> BudgetVerdict:
    side = result.compressed
    if side.mlpackage is None and result.target_size_bytes is not None:
        v, basis = result.target_size_bytes["compressed"] / 1e6, "estimate: weights on the target"
    elif side.size_bytes is not None:
        v, basis = side.size_bytes / 1e6, side.size_basis
    else:
        return BudgetVerdict(name="size", limit=limit, unit="MB", basis="not measured", passed=False,
                             detail="the compressed model's size is unknown")
    return BudgetVerdict(name="size", limit=limit, value=v, unit="MB", basis=basis, passed=v <= limit,
                         detail=f"limit: {from_}" if from_ else "")


def judge(result: VerifyResult, budgets: Budgets) -> VerifyResult:
    """Fill the verdicts and `passed` from the measured/estimated figures."""
    verdicts = []
    if budgets.max_accuracy_drop is not None:
        verdicts.append(_accuracy_verdict(budgets.max_accuracy_drop, result))
    if budgets.max_latency_ms is not None:
        verdicts.append(_latency_verdict(budgets.max_latency_ms, result))
    if budgets.max_size_mb is not None:
        verdicts.append(_size_verdict(budgets.max_size_mb, result, budgets.size_from))
    bad = [f for f in result.fidelity if f.nonfinite]
    if bad:
        verdicts.append(BudgetVerdict(name="finite outputs", value=float(sum(f.nonfinite for f in bad)),
                                      unit="NaN/inf values", basis="measured", passed=False,
                                      detail=f"the compressed model outputs NaN/inf in {', '.join(f.name for f in bad)}"))
    result.budgets = verdicts
    result.passed = all(v.passed for v in verdicts)
    return result
