"""The report's summary rows (plan, apply, verify, latency) and its plan and rule views."""
from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from compressadvise.ui.render import human_bytes
from compressadvise.ui.report_data import RuleRef, StepView, SummaryRow, _finite

if TYPE_CHECKING:
    from compressadvise.ui.report import Inputs


def _summary(inp: Inputs, est: tuple[Any, Any] | None) -> list[SummaryRow]:
    rows: list[SummaryRow] = _built_rows(inp.manifest)  # an apply folder leads with planned vs built
    ver = inp.verify
    rows += _size_rows(inp)
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
    """The planned-vs-built gate `apply` recorded: planned bytes against built bytes (measured)."""
    gate = (manifest or {}).get("planned_vs_built")
    if not isinstance(gate, dict) or "layers_planned" not in gate:
        return []
    planned, built = gate.get("planned_bytes"), gate.get("built_bytes")
    verdict = "built as planned" if gate.get("ok") else "DIFFERS from the plan"
    return [SummaryRow(metric=f"planned vs built: {verdict}",
                       before=planned if isinstance(planned, (int, float)) else None,
                       after=built if isinstance(built, (int, float)) else None, unit="B",
                       basis="measured (apply read-back)", before_basis="estimate (the plan)",
                       note=gate_text(gate), group="built")]


def gate_text(gate: dict[str, Any]) -> str:
    """apply's planned-vs-built summary in the page's units ('79.12 KB built vs 79.25 KB planned')."""
    parts = [f"{gate.get('layers_built', '?')} of {gate.get('layers_planned', '?')} planned layer(s) built"]
    built, planned, err = gate.get("built_bytes"), gate.get("planned_bytes"), gate.get("size_error")
    if isinstance(built, (int, float)) and isinstance(planned, (int, float)) and err is not None:
        parts.append(f"{human_bytes(built)} built vs {human_bytes(planned)} planned "
                     f"({err:+.2%}, tolerance {gate.get('tolerance', 0):.0%})")
    else:
        parts.append(f"size {gate.get('size', 'not gated')}")
    return "; ".join(parts)


def _target_label(est: Any) -> str:
    """'ane-a17 (OS 18)'; targets without an OS version (x86, CUDA) have os 0."""
    return f"{est.target} (OS {est.os})" if est.os else est.target


SHIPPED_WEIGHTS = "weight_file_bytes"  # apply's measured Core ML weight file: the weights that ship


def _size_rows(inp: Inputs) -> list[SummaryRow]:
    """One row per meaningful size: the weights on the target (the measured weight file once
    built, else the plan's estimate) and the file on disk; apply's other sizes are folded away."""
    sizes = _sizes_of(inp.manifest)
    p = inp.plan.prediction if inp.plan is not None else None
    fp16 = float(p.bytes_before) if p is not None else None
    rows: list[SummaryRow] = []
    shipped = sizes.get(SHIPPED_WEIGHTS)
    if shipped is not None:
        planned = f"; the plan estimated {human_bytes(p.bytes_after)}" if p is not None else ""
        rows.append(SummaryRow(metric="size: weights on the target", before=fp16, after=shipped["value"], unit="B",
                               basis="measured", before_basis="estimate (fp16)" if fp16 is not None else "",
                               note=f"{shipped['basis']}{planned}"))
    elif p is not None:
        rows.append(SummaryRow(metric="size: weights on the target", before=fp16, after=float(p.bytes_after), unit="B",
                               basis="estimate", note=f"plan formulas, {p.ratio:.2f}x smaller"))
    on_disk, used = _file_on_disk(inp.verify, inp.manifest, sizes)
    rows += [on_disk] if on_disk is not None else []
    error = ((inp.manifest or {}).get("sizes") or {}).get("weight_file_error") or {}
    rows += [_internal_row(key, val, error.get("value")) for key, val in sizes.items()
             if key not in (SHIPPED_WEIGHTS, used)]
    return rows


def _sizes_of(manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """`apply`'s sizes: {"torch_artifact_bytes": {"value": ..., "label": "measured", "basis": ...}}."""
    sizes = (manifest or {}).get("sizes")
    if not isinstance(sizes, dict):
        return {}
    return {key: val for key, val in sizes.items() if key.endswith("_bytes") and isinstance(val, dict)
            and isinstance(val.get("value"), (int, float))}


def _file_on_disk(ver: Any, manifest: dict[str, Any] | None,
                  sizes: dict[str, dict[str, Any]]) -> tuple[SummaryRow | None, str]:
    """(verify's measured files, both sides, else the file apply wrote that ships; the manifest
    size key that row stands for, so it is not repeated among the internal rows)."""
    if ver is not None and ver.original.size_bytes is not None and ver.compressed.size_bytes is not None:
        return SummaryRow(metric="size: file on disk", before=ver.original.size_bytes, after=ver.compressed.size_bytes,
                          unit="B", basis="measured", note=ver.compressed.size_basis), ""
    key = "mlpackage_bytes" if (manifest or {}).get("mlpackage") else "torch_artifact_bytes"
    val = sizes.get(key)
    if val is None:
        return None, ""
    return SummaryRow(metric="size: file on disk", after=val["value"], unit="B",
                      basis=str(val.get("label") or "measured"), note=str(val.get("basis") or "")), key


def _internal_row(key: str, val: dict[str, Any], weight_file_error: Any) -> SummaryRow:
    name = key[: -len("_bytes")].replace("_", " ")
    note = str(val.get("basis") or "")
    if key == "weight_file_estimate_bytes" and isinstance(weight_file_error, (int, float)):
        note += f"; the weight file measured {weight_file_error:+.2%} off it"
    return SummaryRow(metric=f"size: {name} (apply)", after=val["value"], unit="B", group="internal",
                      basis=str(val.get("label") or "measured"), note=note)


FIDELITY_ROWS = {  # verify's fidelity metric -> (label, unit, scale)
    "top1_agreement": ("top-1 agreement with the original", "%", 100.0),
    "snr_db": ("SNR vs the original", "dB", 1.0),
    "psnr_db": ("PSNR vs the original", "dB", 1.0),
    "iou": ("IoU vs the original", "", 1.0),
}


def _verify_rows(ver: Any) -> list[SummaryRow]:
    rows: list[SummaryRow] = []
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
                   url=f"{docs_base}{code}.md" if docs_base else "", explain=text)


def _step_view(s: Any, k: Any, docs_base: str) -> StepView:
    return StepView(technique=s.technique, slot=s.slot, params=dict(s.params), why=s.why, layers=list(s.layers),
                    skipped=[x.model_dump() for x in s.skipped], overrides=dict(s.op_name_params),
                    predicted_bytes_after=s.predicted_bytes_after,
                    rules=[_rule_ref(c, k, docs_base) for c in s.rules])
