"""The report's data: the tables, chart specs and notes that the HTML and JSON are made from."""
from __future__ import annotations

import math
from typing import Any

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
    unit: str = ""
    basis: str = Field(description="measured or estimate, and where")
    note: str = ""


class RuleRef(BaseModel):
    code: str
    title: str = ""
    why: str = ""
    url: str
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

    def chart(self, chart_id: str) -> Chart | None:
        return next((c for c in self.charts if c.id == chart_id), None)


def _finite(v: float | None) -> float | None:
    """JSON has no inf: an identical layer output (SNR = +inf) is shown as 'identical'."""
    return v if v is None or math.isfinite(v) else (1e9 if v > 0 else -1e9)
