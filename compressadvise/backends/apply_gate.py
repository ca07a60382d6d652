"""Planned vs built: the artefact checked against the plan, not against a re-estimate of itself.

Each layer a plan step lists must come out compressed on the side that ships (Core ML for an
Apple target, else the torch artefact), and the shipped weights must be within BUILT_TOLERANCE of
the plan's predicted size. A plan that "meets the size budget" and is built 2x larger is the
worst defect this tool can have, so a gap fails apply (exit 8) unless the user accepts it.
"""
from __future__ import annotations

from typing import Any

from compressadvise import backends as B
from compressadvise.errors import CompressionFailed
from compressadvise.knowledge.schema import Plan

BUILT_TOLERANCE = 0.02  # built weight bytes vs the plan's predicted bytes


class PlanNotBuilt(CompressionFailed):
    """The artefact differs from the plan (exit 8); `gate` holds the planned-vs-built record."""

    def __init__(self, message: str, gate: dict[str, Any], *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.gate = gate


def planned_vs_built(plan: Plan, jobs: list[B.StepJob], outcome: dict, side: str,
                     built_bytes: int | None, built_basis: str) -> dict[str, Any]:
    """The gate's record: planned/built layer counts, the layers that differ and why, the sizes."""
    rows = []
    planned = 0
    for job in jobs:
        skipped = {s["layer"]: s["reason"] for s in job.skipped}
        by_name = {lj.name: lj for lj in job.layers}
        for name in plan.steps[job.index].layers:
            planned += 1
            lj = by_name.get(name)
            rec = outcome.get((job.index, name, side), {})
            if lj is not None and rec.get("status") == "applied":
                continue
            rows.append({"step": job.index + 1, "technique": job.technique, "layer": name,
                         "planned": lj.setting.label if lj is not None and lj.setting is not None else job.technique,
                         "built": rec.get("status", "skipped") if lj is not None else "skipped",
                         "reason": _reason(job, name, side, outcome, skipped)})
    gate: dict[str, Any] = {"side": side, "layers_planned": planned, "layers_built": planned - len(rows),
                            "rows": rows, "tolerance": BUILT_TOLERANCE}
    predicted = plan.prediction.bytes_after if plan.prediction else None
    gate["planned_bytes"] = predicted
    gate["built_bytes"] = built_bytes
    gate["built_basis"] = built_basis
    if predicted and built_bytes is not None:
        gate["size_error"] = round((built_bytes - predicted) / predicted, 4)
        size_ok = abs(gate["size_error"]) <= BUILT_TOLERANCE
        gate["size"] = "within tolerance" if size_ok else "outside tolerance"
    else:
        size_ok = True
        gate["size"] = ("not gated: the plan carries no predicted size" if not predicted
                        else f"not gated: {built_basis}")
    gate["ok"] = not rows and size_ok
    return gate


def _reason(job: B.StepJob, name: str, side: str, outcome: dict, skipped: dict[str, str]) -> str:
    if name in skipped:
        return skipped[name]
    for s in (side, "torch", "coreml"):
        rec = outcome.get((job.index, name, s), {})
        if rec.get("reason"):
            return f"{s}: {rec['reason']}" if s != side else rec["reason"]
    return "not compressed (no backend reported it)"


def enforce(gate: dict[str, Any], allow_partial: bool, notes: list[str]) -> None:
    """Raise PlanNotBuilt on a gap, unless the user passed --allow-partial (then a note)."""
    if gate["ok"]:
        return
    summary = summarize(gate)
    if allow_partial:
        notes.insert(0, f"planned vs built differ (accepted with --allow-partial): {summary}")
        return
    raise PlanNotBuilt(f"planned vs built: {summary}", gate,
                       hint="the table above says why per layer; --allow-partial keeps such a build (exit 0)")


def summarize(gate: dict[str, Any]) -> str:
    parts = [f"{gate['layers_built']} of {gate['layers_planned']} planned layer(s) built"]
    if gate.get("size_error") is not None:
        parts.append(f"{gate['built_bytes'] / 1e6:.3f} MB built vs {gate['planned_bytes'] / 1e6:.3f} MB planned "
                     f"({gate['size_error']:+.1%}, tolerance {gate['tolerance']:.0%})")
    else:
        parts.append(f"size {gate['size']}")
    return "; ".join(parts)


def parity_summary(manifest: dict[str, Any]) -> tuple[int, float | None]:
    """(layers compared, max |Core ML - torch| over them) from an apply manifest's layer records."""
    diffs = [e["coreml"]["parity_max_abs_diff"] for x in manifest.get("layers", []) if isinstance(x, dict)
             for e in x.get("steps", []) if isinstance(e, dict) and isinstance(e.get("coreml"), dict)
             and isinstance(e["coreml"].get("parity_max_abs_diff"), (int, float))]
    return len(diffs), (max(diffs) if diffs else None)
