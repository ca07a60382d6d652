"""Expert observations on a model (largest, fragile, skipped layers) and the next moves after a missed budget."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

if TYPE_CHECKING:
    from compressadvise.model.analysis import ModelReport
    from compressadvise.knowledge.base import Knowledge
    from compressadvise.knowledge.schema import Plan

# ------------------------------------------------------------------ expert observations
class ExpertNotes(BaseModel):
    largest: list[str]
    fragile: list[str]
    skipped: list[str]


def _fragile_reasons(x: Any, heavy_kurtosis: float, outlier_std: float) -> list[str]:
    s = x.stats
    why = []
    if s and s.nonfinite:
        why.append(f"{s.nonfinite} NaN/inf weights")
    if s and s.kurtosis > heavy_kurtosis:
        why.append(f"heavy-tailed weights (kurtosis {s.kurtosis:.1f}; 3 is normal)")
    if s and s.absmax_over_std > outlier_std:
        why.append(f"an outlier {s.absmax_over_std:.0f} std from the mean sets any per-tensor scale")
    if x.is_first:
        why.append("first layer: its error flows through every later layer")
    if x.is_classifier or x.is_last:
        why.append("last layer: writes the outputs directly")
    if x.type == "depthwise_conv":
        why.append("depthwise: few weights per channel, little redundancy")
    if x.tied_to:
        why.append(f"tied to {x.tied_to}: compressing one changes both")
    return why


def expert_notes(report: "ModelReport", plan: "Plan | None", knowledge: "Knowledge | None" = None) -> ExpertNotes:
    """The three things an expert looks at first: where the bytes are, what looks fragile,
    and what the plan will leave alone (and why). "Heavy-tailed" is the knowledge's cited
    `threshold.heavy_kurtosis` and an outlier is over `threshold.outlier_absmax_std`: the values
    the playbooks' rules compare with."""
    from compressadvise.knowledge.base import builtin
    from compressadvise.ui.render import human_bytes

    thresholds = (knowledge or builtin()).thresholds
    heavy, outlier = thresholds["heavy_kurtosis"], thresholds["outlier_absmax_std"]

    weights = [x for x in report.layers if len(x.weight_shape) >= 2]
    largest = [f"{x.name} ({x.type}, {x.weight_shape}): {x.share:.0%} of the weights, "
               f"{human_bytes(x.bytes_fp16)} at fp16" for x in sorted(weights, key=lambda x: -x.params)[:3]]
    scored = [(x, _fragile_reasons(x, heavy, outlier)) for x in weights]
    scored = sorted((t for t in scored if t[1]), key=lambda t: (-len(t[1]), t[0].index))
    fragile = [f"{x.name}: {'; '.join(why)}" for x, why in scored[:5]]
    skipped: dict[str, str] = {}
    for step in plan.steps if plan else []:
        for sk in step.skipped:
            skipped.setdefault(sk.layer, f"{sk.layer}: {sk.reason}" + (f" [{sk.code}]" if sk.code else ""))
    small = [x.name for x in report.layers if len(x.weight_shape) < 2]
    lines = list(skipped.values())
    if small:
        lines.append(f"{', '.join(small[:4])}{'...' if len(small) > 4 else ''}: 1-D parameters "
                     "(normalization, biases) are tiny and stay fp16")
    if plan is not None and not plan.steps:
        lines.append("no compression step applies with the default target and no budgets yet")
    return ExpertNotes(largest=largest, fragile=fragile or ["nothing stands out in the weight statistics"],
                       skipped=lines or ["nothing: every weight layer is in scope"])


# ------------------------------------------------------------------ what to try after a miss
def next_moves(plan: "Plan", missed: list[str], report: "ModelReport", knowledge: "Knowledge",
               *, data: str = "none", worst_layer: str | None = None) -> list[str]:
    """The next recommended moves for the budgets that were missed, most promising first: the
    playbooks' cited `outcome` rules (playbooks/next_moves.yaml), evaluated by the engine."""
    from compressadvise.plan.engine import next_moves as evaluate

    return evaluate(plan, report, missed, knowledge, data=data, worst_layer=worst_layer).messages()
