"""Pre-flight placement check: which ops leave the target's accelerator, and where units switch.

Core ML runs each operation on the Neural Engine, the GPU or the CPU; an op the accelerator
lacks falls back to another unit, and every edge between ops on different units is a switch
(the activations are copied and the units synchronise). The table of ops each accelerator
lacks is target data (`placement` in targets/*.yaml, every entry cited); this module matches
a model's op graph (model.ops) against it. It is an estimate of what Core ML decides at load:
only a device profile (MLComputePlan, Xcode's performance report) says what really ran where.

Boundary cost, a lower bound: the crossing tensor at fp16 is written by one unit and read by the
other at the target's memory bandwidth; the synchronisation cost is not known without a profile.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from compressadvise.knowledge.schema import Boundary, FallbackOp, PlacedOp, PlacementReport, Target
from compressadvise.model.ops import OpGraph, OpRecord

ACT_BYTES = 2  # fp16 activations cross the boundary


def _matches(entry: FallbackOp, op: OpRecord, mil: bool) -> bool:
    if op.op not in (entry.mil if mil else entry.torch):
        return False
    if entry.min_dilation is not None and (op.dilation or 1) < entry.min_dilation:
        return False
    return entry.dtype is None or op.dtype == entry.dtype


def _unit(op: OpRecord, target: Target, mil: bool) -> tuple[str | None, FallbackOp | None]:
    """The unit an op runs on: a matching table entry's, else the accelerator; a source op
    (a constant, zeros for a hidden state) runs wherever its reader is."""
    table = target.placement
    for entry in table.fallback_ops if table else []:
        if _matches(entry, op, mil):
            return entry.runs_on, entry
    return (None if not op.inputs else table.accelerator if table else None), None


def check(graph: OpGraph, target: Target) -> PlacementReport:
    """Match the ops against the target's fallback table; count the unit switches."""
    rep = PlacementReport(target=target.name, basis=graph.source, ops_total=len(graph.ops),
                          switches_counted=graph.ordered)
    if target.placement is None:
        rep.notes.append(f"{target.name} lists no ops its hardware lacks: every op is assumed to run on it")
        return rep
    rep.accelerator = target.placement.accelerator
    mil = graph.source.startswith("Core ML")
    units: dict[int, str | None] = {}
    for op in graph.ops:
        if op.inside is not None:  # a loop or branch body runs where its loop runs
            units[op.id] = units.get(op.inside)
            continue
        unit, entry = _unit(op, target, mil)
        units[op.id] = unit
        if entry is not None:
            rep.fallback.append(PlacedOp(id=op.id, op=op.op, layer=op.layer, runs_on=entry.runs_on, entry=entry.name,
                                         confidence=entry.confidence, reason=entry.reason, source=entry.source))
    if graph.ordered:
        rep.boundaries = _boundaries(graph, units, target)
        costs = [b.ms for b in rep.boundaries if b.ms is not None]
        rep.switch_ms = sum(costs) if costs and len(costs) == len(rep.boundaries) else None
    rep.notes += _notes(rep, graph)
    return rep


def _boundaries(graph: OpGraph, units: dict[int, str | None], target: Target) -> list[Boundary]:
    """One boundary per producer and consumer unit: a tensor is copied once to each unit reading it."""
    from compressadvise.measure.estimate import figure

    bandwidth = figure(target, "memory_bandwidth_gbs")
    by_id = {o.id: o for o in graph.ops}
    seen: set[tuple[int, str]] = set()
    out: list[Boundary] = []
    for op in graph.ops:
        to = units[op.id]
        for src in op.inputs:
            frm = units.get(src)
            if to is None or frm is None or frm == to or (src, to) in seen:
                continue
            seen.add((src, to))
            p = by_id[src]
            nbytes = p.out_elements * ACT_BYTES if p.out_elements is not None else None
            ms = 2 * nbytes / (bandwidth * 1e9) * 1e3 if nbytes is not None and bandwidth else None
            out.append(Boundary(producer=_name(p), consumer=_name(op), from_unit=frm, to_unit=to, bytes=nbytes, ms=ms))
    return out


def _name(op: OpRecord) -> str:
    return f"{op.op} ({op.layer})" if op.layer else op.op


def _notes(rep: PlacementReport, graph: OpGraph) -> list[str]:
    notes = []
    if not graph.ordered:
        notes.append("no graph (weights only): fallback layers are found by type; the switches between units "
                     "are not counted")
    reported = Counter(p.confidence for p in rep.fallback)
    if reported.get("reported"):
        notes.append(f"{reported['reported']} fallback(s) rest on practitioners' reports, not vendor documentation: "
                     "confirm them with a device profile (MLComputePlan or Xcode's Core ML performance report)")
    if rep.boundaries and rep.switch_ms is None:
        notes.append("some crossing tensors have no known shape: their copy cost is not estimated")
    if rep.boundaries:
        notes.append("switch cost counts the copy only (a lower bound): synchronising the units costs more, "
                     "measured only on the device")
    return notes


# ------------------------------------------------------------------ entry points
def ops_for(model: Any, report: Any) -> OpGraph:
    """The model's op graph, or its layer inventory when no graph can be read."""
    from compressadvise.model.ops import from_layers, model_ops

    graph = model_ops(model) if model is not None else None
    return graph if graph is not None and graph.ops else from_layers(report)


def for_model(model: Any, report: Any, target: Target) -> PlacementReport:
    return check(ops_for(model, report), target)


def for_mlpackage(path: str, target: Target) -> PlacementReport:
    """Placement of a converted program: the MIL ops the device is handed."""
    from compressadvise.model.ops import from_mlpackage

    return check(from_mlpackage(path), target)


def for_report(report: Any, target: Target) -> PlacementReport | None:
    """A report's ops against the target's table (None: the target has no table, or the report
    no op list)."""
    if target.placement is None or getattr(report, "ops", None) is None:
        return None
    return check(report.ops, target)


def placement_namespace(rep: PlacementReport | None) -> dict[str, Any]:
    """The `placement` facts rules read, from a placement check."""
    from compressadvise.knowledge.facts import extract

    return extract("placement", facts(rep))


def placement_facts(report: Any, target: Any) -> dict[str, Any]:
    """The `placement` facts for a report on a target (a Target or a Deployment)."""
    return placement_namespace(for_report(report, getattr(target, "target", target)))


def facts(rep: PlacementReport | None) -> dict[str, Any]:
    """The raw values behind the `placement` namespace."""
    if rep is None:
        return {"known": False, "fallback_ops": 0, "fallback_preview": "", "fallback_units": "",
                "unit_switches": 0, "accelerator": "", "basis": ""}
    return {"known": rep.accelerator is not None, "fallback_ops": len(rep.fallback), "fallback_preview": rep.preview(),
            "fallback_units": " / ".join(rep.units()), "unit_switches": len(rep.boundaries),
            "accelerator": rep.accelerator or "", "basis": rep.basis}


# ------------------------------------------------------------------ checked against a device
def against_profile(rep: PlacementReport, profile: Any) -> list[str]:
    """The prediction checked against what a device profile measured: op types that ran off the
    accelerator (Core ML program op types on both sides), predicted or not."""
    if rep.accelerator is None or not profile.ops:
        return []
    if rep.accelerator == "NE" and profile.compute_units not in ("ALL", "CPU_AND_NE"):
        return [f"placement not checked against the {profile.device} profile: measured with "
                f"{profile.compute_units}, which excludes the Neural Engine"]
    if not rep.basis.startswith("Core ML"):
        return ["placement not checked against the device profile: the prediction comes from the "
                f"{rep.basis}, whose op names differ from the converted program's (check an apply output)"]
    measured = Counter(_mil_type(o.type) for o in profile.ops
                       if o.device != rep.accelerator and not _mil_type(o.type).startswith("const"))
    predicted = Counter(p.op for p in rep.fallback)
    both = sorted(set(measured) & set(predicted))
    notes = [f"placement checked against the {profile.device} profile: predicted off the {rep.accelerator}: "
             f"{_counts(predicted) or 'none'}; measured off it: {_counts(measured) or 'none'}"]
    missed = {t: n for t, n in measured.items() if t not in predicted}
    wrong = {t: n for t, n in predicted.items() if t not in measured}
    if missed:
        notes.append(f"ran off the {rep.accelerator} on {profile.device} but not in {rep.target}'s table: "
                     f"{_counts(missed)}")
    if wrong:
        notes.append(f"predicted off the {rep.accelerator} but ran on it on {profile.device}: {_counts(wrong)} "
                     "(a table entry that does not hold on this device)")
    if both and not missed and not wrong:
        notes.append("the prediction matches the device")
    return notes


def _mil_type(op_type: str) -> str:
    return op_type.split(".")[-1]  # 'ios18.conv' -> 'conv'


def _counts(c: Counter | dict) -> str:
    return ", ".join(f"{t} x{n}" for t, n in sorted(c.items()))
