"""The report's summary rows (plan, apply, verify, latency) and its plan and rule views."""
from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from compressadvise.ui.report_data import RuleRef, StepView, SummaryRow, _finite

if TYPE_CHECKING:
    from compressadvise.ui.report import Inputs


def _summary(inp: Inputs, est: tuple[Any, Any] | None) -> list[SummaryRow]:
    rows: list[SummaryRow] = _built_rows(inp.manifest)  # an apply folder leads with planned vs built
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
        basis = ("estimate" + (" (calibrated with device figures)" if a.calibrated else "")
                 if getattr(a, "basis", "estimate") == "estimate" else a.basis_label())
        rows.append(SummaryRow(metric=f"latency on {_target_label(b)}", before=b.total_ms, after=a.total_ms,
                               unit="ms", basis=basis, note="roofline over layers with known MACs"))
    if ver is None:
        rows.append(SummaryRow(metric="accuracy", basis="not measured yet", note=_verify_hint(inp)))
    return rows


def _built_rows(manifest: dict[str, Any] | None) -> list[SummaryRow]:
    """The planned-vs-built gate `apply` recorded: planned MB against built MB (measured)."""
    gate = (manifest or {}).get("planned_vs_built")
    if not isinstance(gate, dict) or "layers_planned" not in gate:
        return []
    from compressadvise.backends.apply_gate import summarize

    planned, built = gate.get("planned_bytes"), gate.get("built_bytes")
    verdict = "built as planned" if gate.get("ok") else "DIFFERS from the plan"
    return [SummaryRow(metric=f"planned vs built: {verdict}",
                       before=planned / 1e6 if isinstance(planned, (int, float)) else None,
                       after=built / 1e6 if isinstance(built, (int, float)) else None, unit="MB",
                       basis="measured (apply read-back) vs the plan's estimate", note=summarize(gate))]


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
    words = shlex.join(["compressadvise", "verify", orig, comp, "--json"])
    return (f"not measured yet: run `{words} > verify.json` "
            "and pass it with --verify (or save it in the run folder)")


def _rule_ref(code: str, k: Any, docs_base: str, title: str = "", why: str = "") -> RuleRef:
    from compressadvise.knowledge.textdocs import rule_markdown

    cr = k.rules.get(code)
    text = rule_markdown(k, cr) if cr is not None else ""
    return RuleRef(code=code, title=title or (cr.rule.title if cr else ""), why=why or (cr.rule.why if cr else ""),
                   url=f"{docs_base}{code}.md", explain=text)


def _step_view(s: Any, k: Any, docs_base: str) -> StepView:
    return StepView(technique=s.technique, slot=s.slot, params=dict(s.params), why=s.why, layers=list(s.layers),
                    skipped=[x.model_dump() for x in s.skipped], overrides=dict(s.op_name_params),
                    predicted_bytes_after=s.predicted_bytes_after,
                    rules=[_rule_ref(c, k, docs_base) for c in s.rules])
