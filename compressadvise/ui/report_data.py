"""The report's data: the tables, chart specs and notes that the HTML and JSON are made from."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, Field


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
    unit: str = Field("", description="sizes in B and durations in ms: the page scales them to read well")
    basis: str = Field(description="measured or estimate, and where")
    before_basis: str = Field("", description="the basis of `before` when it differs from `after`'s")
    note: str = ""
    group: Literal["main", "internal", "built"] = Field(
        "main", description="internal: an intermediate estimate, folded away on the page; built: planned vs built")


class RuleRef(BaseModel):
    code: str
    title: str = ""
    why: str = ""
    url: str = Field("", description="the rule's page on a docs site; empty: no link (the text is embedded)")
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


class BuiltLayer(BaseModel):
    """One layer of the plan against what `apply` built (its manifest)."""
    name: str
    planned: str = Field(description="the plan's setting")
    planned_bytes: int = Field(description="estimate: the plan's size for the layer")
    built: str = Field(description="what apply did (manifest status, and why when not built)")
    built_setting: str = ""
    built_bytes: int = Field(description="estimate: the plan's size when built, else the uncompressed size")
    differs: bool = False


class BuiltTotal(BaseModel):
    name: str
    planned: float | None = None
    built: float | None = None
    planned_basis: str = "estimate"
    built_basis: str = "measured"
    note: str = ""
    differs: bool = Field(False, description="outside apply's size tolerance")


class BuiltView(BaseModel):
    """The planned-vs-built gate of an `apply` folder, per layer and in total."""
    ok: bool
    verdict: str
    side: str = ""
    layers: list[BuiltLayer] = []
    totals: list[BuiltTotal] = []
    unchanged: int = Field(0, description="layers the plan leaves as they are and apply left as they are")


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
    model: str = Field("", description="the model reported on (an apply folder's original), not the folder")
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
    placement: dict[str, Any] | None = Field(None, description=(
        "estimate: ops the target's accelerator lacks and the unit switches (PlacementReport)"))
    placement_rule: RuleRef | None = Field(None, description="the rule that explains the fallbacks")
    whatif: dict[str, Any] | None = Field(None, description="the What-if section's data (ui/report_whatif.py)")
    built: BuiltView | None = Field(None, description="an apply folder's planned vs built, per layer")
    rules: dict[str, RuleRef] = Field({}, description="every rule the page mentions, with its text")

    def chart(self, chart_id: str) -> Chart | None:
        return next((c for c in self.charts if c.id == chart_id), None)


def _finite(v: float | None) -> float | None:
    """JSON has no inf: an identical layer output (SNR = +inf) is shown as 'identical'."""
    return v if v is None or math.isfinite(v) else (1e9 if v > 0 else -1e9)
