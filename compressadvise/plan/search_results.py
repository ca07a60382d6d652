"""Search results: the budget, the candidate plans, the frontiers and the per-layer choices."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from compressadvise.model.analysis import ModelReport
from compressadvise.errors import InvalidKnowledge
from compressadvise.measure.metrics import ResultModel, size_text
from compressadvise.knowledge.schema import Plan
from compressadvise.plan.budgets import budget_bytes

MB = 1e6
_KEY_MEASURES = ("psnr_db", "top1_agreement", "accuracy")  # a candidate's figures worth a summary line


class Budget(ResultModel):
    max_bytes: float | None = Field(None, description="whole-model size budget in bytes")
    max_latency_ms: float | None = Field(None, description="latency budget on the target, checked against latency_basis")
    max_accuracy_drop: float | None = Field(None, description=(
        "points of top-1 accuracy a confirmed candidate may lose, measured on labelled samples"))
    basis: str = ""
    latency_basis: str = Field("estimate (roofline)", description=(
        "what the latency budget is checked against: 'estimate (roofline)' or 'calibrated from DEVICE profile'"))

    @classmethod
    def of(cls, *, max_size_mb: float | None = None, bits_per_weight: float | None = None,
           max_latency_ms: float | None = None, size_fraction: float | None = None,
           max_accuracy_drop: float | None = None,
           report: ModelReport | None = None, baseline: float = 2.0,
           latency_basis: str = "estimate (roofline)") -> "Budget":
        given = [x for x in (max_size_mb, bits_per_weight, size_fraction) if x]
        if len(given) > 1:
            raise InvalidKnowledge("give one size budget: --max-size-mb, --bits-per-weight or --size-fraction")
        if not given and not max_latency_ms:
            raise InvalidKnowledge("search needs a budget", hint="--max-size-mb, --bits-per-weight, "
                                   "--size-fraction or --max-latency-ms")
        max_bytes, basis = None, []
        if max_size_mb:
            max_bytes = max_size_mb * MB
            basis.append(f"{max_size_mb:g} MB")
        elif bits_per_weight:
            if report is None:
                raise ValueError("bits_per_weight needs the model report")
            max_bytes = budget_bytes(report.total_bytes_fp16, report.total_params, bits_per_weight=bits_per_weight)
            basis.append(f"{bits_per_weight:g} bits per weight ({report.total_params} parameters)")
        elif size_fraction:
            if report is None:
                raise ValueError("size_fraction needs the model report")
            max_bytes = budget_bytes(report.total_bytes_fp16, report.total_params, size_fraction=size_fraction)
            basis.append(f"{size_fraction:g} of the fp16 size")
        if max_latency_ms:  # "(estimate)" for the roofline, as budgets always read
            basis.append(f"{max_latency_ms:g} ms ({'estimate' if latency_basis.startswith('estimate') else latency_basis})")
        if max_accuracy_drop is not None:
            basis.append(f"at most {max_accuracy_drop:g} points of accuracy (measured)")
        return cls(max_bytes=max_bytes, max_latency_ms=max_latency_ms or None, max_accuracy_drop=max_accuracy_drop,
                   basis=" and ".join(basis), latency_basis=latency_basis)


class FrontierPoint(ResultModel):
    bytes: int = Field(description="estimate (technique formulas)")
    latency_ms: float | None = Field(None, description="estimate (roofline, or calibrated: SearchResult.latency_basis)")
    predicted_psnr_db: float = Field(description="estimate: from the summed single-layer output MSEs")
    measured_psnr_db: float | None = Field(None, description="measured, when this plan was confirmed")
    compressed_layers: int


class Candidate(ResultModel):
    name: str
    objective: str
    assignment: dict[str, str] = Field(description="layer -> setting label")
    settings: dict[str, dict[str, Any]] = Field(description="layer -> {technique, params} (fp16 layers omitted)")
    estimate: dict[str, float | None] = Field(description="bytes, latency_ms, psnr_db: estimates")
    measured: dict[str, float] = Field(description="the plan applied in memory, run on the samples")
    fits: bool


class LayerChoice(ResultModel):
    layer: str
    setting: str
    bytes: int = Field(description="estimate")
    vs_median: float | None = Field(description="measured sensitivity / median layer's")
    noise_share: float = Field(description="share of the plan's predicted output noise (estimate)")
    why: str
    restricted_by: list[str] = []


class Pruning(ResultModel):
    """What the search measured and what it did not, and why (issue 23: measure what can win)."""

    candidates: int = Field(description="(layer, setting) pairs the target, the playbooks and the backend allow")
    predicted: int = Field(description="pairs given a cheap prediction (weight error x Hessian diagonal; no pass)")
    dominated: int = Field(description="pairs skipped: another setting of the layer is no larger and predicted "
                           "clearly less damaging")
    measured: int = Field(description="pairs measured (each a single-layer evaluation, run now or cached)")
    not_needed: int = Field(description="pairs not measured: no candidate plan chose them, or chose them with a "
                            "negligible share of its predicted noise; the knapsack used their calibrated prediction")
    first_samples: int = Field(description="samples a pair is first measured on (adaptive samples)")
    all_samples: int
    remeasured: int = Field(description="pairs measured again on all samples: too close to a rival to rank")
    rounds: int = Field(description="measure-and-resolve rounds until the candidate plans chose measured pairs only")
    widened: list[str] = Field(description="layers where prediction and measurement disagreed: every kept "
                               "setting measured")
    proxy_spearman: float | None = Field(description="rank correlation of predicted vs measured output MSE "
                                         "over the measured pairs")
    trusted: bool = Field(description="False: the correlation was too low to rank by, so every kept pair was "
                          "measured")
    predict_wall_s: float


class SearchResult(ResultModel):
    plan: Plan
    budget: Budget
    chosen: Candidate
    candidates: list[Candidate]
    frontier_size: list[FrontierPoint]
    frontier_latency: list[FrontierPoint]
    layers: list[LayerChoice]
    reference: dict[str, float] = Field(description="measured on the original model")
    evaluations: dict[str, int] = Field(description="single_layer (run now), single_layer_cached, full_model")
    forward_passes: float = Field(0.0, description="forward-pass equivalents run now (sensitivity's, suffix-only "
                                  "passes at their share of the MACs, plus one per full-model candidate run)")
    pruning: Pruning | None = Field(None, description="None when every candidate was measured (measure_all)")
    sensitivity_wall_s: float
    wall_s: float
    lessons: Literal["apply", "advise"]
    latency_basis: str | None = Field(None, description=(
        "what the latencies are: 'estimate (roofline)' or 'calibrated from DEVICE profile'; None: not estimated"))
    notes: list[str] = []

    def _summary(self) -> tuple[str, list[tuple[str, str]]]:
        """The budget, the chosen plan's size and measured fidelity, and what the search cost."""
        c = self.chosen
        size = c.estimate.get("bytes")
        compressed = sum(1 for x in self.layers if not x.setting.endswith("(unchanged)"))
        ev = self.evaluations
        return "SearchResult", [
            ("budget", self.budget.basis), ("fits", "yes" if c.fits else "no"),
            ("chosen", f"{c.name}: {size_text(size) if size is not None else '-'} (estimate)"),
            ("measured", ", ".join(f"{k} {c.measured[k]:.4g}" for k in _KEY_MEASURES if k in c.measured) or "-"),
            ("layers", f"{compressed} of {len(self.layers)} compressed"),
            ("candidates", f"{len(self.candidates)} confirmed by measurement"),
            ("evaluations", f"{ev.get('single_layer', 0)} single-layer run, {ev.get('single_layer_cached', 0)} cached"),
            ("time", f"{self.wall_s:.1f} s")]
