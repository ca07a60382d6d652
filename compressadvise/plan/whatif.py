"""What-if edits of a plan: change a step's parameters or kept layers and re-predict its size.

Used by the walkthrough to show the predicted size change as the user edits each step. Every
figure here is an estimate from the technique size formulas (the same ones `recommend` uses).
"""
from __future__ import annotations

from typing import Any

from compressadvise.model.analysis import ModelReport
from compressadvise.errors import InvalidKnowledge
from compressadvise.knowledge.base import Knowledge, builtin
from compressadvise.knowledge.schema import Plan, Prediction, Skip

USER_KEEP = "user"  # Skip.code of layers the user chose to keep uncompressed
MB = 1e6


def predict(plan: Plan, report: ModelReport, knowledge: Knowledge | None = None) -> Plan:
    """A copy of `plan` with every step's layers and sizes recomputed for its current params.

    Layers the backend skipped under the old parameters (e.g. a group size that did not divide
    the channels) are tried again, since the new parameters may suit them.
    """
    from compressadvise.plan.engine import predict_layers

    k = knowledge or builtin()
    tgt = k.target(plan.target.name)
    new = plan.model_copy(deep=True)
    order = {x.name: x.index for x in report.layers}
    for step in new.steps:
        retry = [s.layer for s in step.skipped if s.code == "backend"]
        step.skipped = [s for s in step.skipped if s.code != "backend"]
        step.layers = sorted(set(step.layers) | set(retry), key=lambda n: order.get(n, 1 << 30))
    layers, before, after = predict_layers(k, report, new.steps, tgt.baseline_bytes_per_param, tgt,
                                           plan.target.os or tgt.default_os)
    new.layers = layers
    budget = new.constraints.max_size_mb
    new.prediction = Prediction(bytes_before=before, bytes_after=after,
                                ratio=before / after if after else 0.0,
                                meets_size_budget=None if not budget else after / MB <= budget)
    return new


def check_param(plan: Plan, index: int, name: str, value: Any, knowledge: Knowledge | None = None) -> str | None:
    """An error message when `name=value` does not fit the step's technique or target, else None."""
    from compressadvise.plan.engine import missing_modes

    k = knowledge or builtin()
    step = plan.steps[index]
    tech = k.technique(step.technique)
    spec = tech.parameters.get(name)
    if spec is None:
        return f"{tech.name} has no parameter {name!r} (has: {', '.join(tech.parameters)})"
    if msg := spec.check(name, value):
        return msg
    tgt = k.target(plan.target.name)
    missing = missing_modes(k, step.technique, {**step.params, name: value}, tgt.supports(plan.target.os))
    if missing:
        return f"{tgt.name} at OS {plan.target.os} does not support {', '.join(missing)}"
    return None


def set_param(plan: Plan, index: int, name: str, value: Any, report: ModelReport,
              knowledge: Knowledge | None = None) -> Plan:
    """Set one parameter of step `index` (all its layers) and re-predict; raises InvalidKnowledge."""
    if msg := check_param(plan, index, name, value, knowledge):
        raise InvalidKnowledge(msg)
    new = plan.model_copy(deep=True)
    step = new.steps[index]
    step.params[name] = value
    # A per-layer override of the same parameter would silently win over the user's choice.
    for ov in step.op_name_params.values():
        ov.pop(name, None)
    step.op_name_params = {k: v for k, v in step.op_name_params.items() if v}
    return predict(new, report, knowledge)


def keep_layers(plan: Plan, index: int, names: list[str], report: ModelReport,
                knowledge: Knowledge | None = None) -> Plan:
    """Leave `names` out of step `index` (kept at full precision) and re-predict."""
    new = plan.model_copy(deep=True)
    step = new.steps[index]
    unknown = [n for n in names if n not in step.layers]
    if unknown:
        raise InvalidKnowledge(f"step {index + 1} does not compress {', '.join(unknown)}",
                               hint=f"it compresses: {', '.join(step.layers) or 'nothing'}")
    step.layers = [n for n in step.layers if n not in names]
    step.skipped += [Skip(layer=n, reason="kept at full precision by the user", code=USER_KEEP) for n in names]
    for n in names:
        step.op_name_params.pop(n, None)
    return predict(new, report, knowledge)


def drop_step(plan: Plan, index: int, report: ModelReport, knowledge: Knowledge | None = None) -> Plan:
    """Remove step `index` from the plan and re-predict."""
    new = plan.model_copy(deep=True)
    del new.steps[index]
    return predict(new, report, knowledge)
