"""The search space: per-layer options with their cost and damage, candidate optima, frontiers."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from compressadvise.model.analysis import LayerInfo, ModelReport
from compressadvise.knowledge.base import Knowledge
from compressadvise.plan.search_knapsack import MultipleChoiceKnapsack, solve_mckp, solve_two_budgets
from compressadvise.plan.search_results import Budget, FrontierPoint
from compressadvise.measure.sensitivity import FP16, SensitivityReport, Setting, setting_bytes

if TYPE_CHECKING:
    from compressadvise.measure.device_profile import ProfileFit

ROOFLINE = "estimate (roofline)"


@dataclass
class Option:
    setting: Setting
    bytes: int
    latency_ms: float
    mse: float = 0.0
    kl: float = 0.0
    cos: float = 0.0  # 1 - cosine
    measured: bool = True  # False: damage from the calibrated prediction (the adaptive search left it unmeasured)


LatencyMemo = dict[tuple[str, Setting], "float | None"]  # (layer, setting) -> ms, for one model, target, OS and fit


def _latency_table(report: ModelReport, k: Knowledge, target: str, os: int, layer: LayerInfo,
                   settings: list[Setting], baseline: float, fit: ProfileFit | None = None,
                   memo: LatencyMemo | None = None) -> dict[Setting, float] | None:
    """Roofline ms per setting for one layer (estimate), times its op type's factor when a device
    profile calibrates it; None when the layer has no MACs (or a setting has no estimate). `memo`
    keeps the figures across the spaces one search builds (every round solves again over the
    same layers)."""
    memo = {} if memo is None else memo
    for s in settings:
        if (layer.name, s) not in memo:
            memo[(layer.name, s)] = _latency_ms(k, target, os, layer, s, baseline, fit)
    got = {s: memo[(layer.name, s)] for s in settings}
    return None if any(v is None for v in got.values()) else got  # type: ignore[return-value]


def _latency_ms(k: Knowledge, target: str, os: int, layer: LayerInfo, s: Setting, baseline: float,
                fit: ProfileFit | None) -> float | None:
    """One setting's roofline ms on this layer (calibrated by the fit), None without an estimate."""
    from compressadvise.measure.estimate import LayerCompression, estimate_layer

    if not layer.macs:
        return None
    comp = None
    if not s.is_fp16:
        norm = Setting.normalised(k, s.technique, s.p)  # modes from the technique's requires
        comp = LayerCompression(bytes=float(setting_bytes(k, layer, s, baseline)), setting=s.label,
                                mode=norm.primary_mode(k), modes=norm.modes(k))
    est = estimate_layer(layer, k.target(target), os, comp, baseline)
    return None if est is None else est.ms * (fit.factor(layer.type) if fit is not None else 1.0)


def _fixed_latency(report: ModelReport, k: Knowledge, target: str, os: int, searched: set[str],
                   fit: ProfileFit | None = None) -> float:
    """Roofline ms of the layers the search does not decide (estimate); calibrated by a device
    profile, plus the time it measured in ops the roofline does not cover."""
    from compressadvise.measure.estimate import estimate_layer

    tgt = k.target(target)
    total = fit.other_ms if fit is not None else 0.0
    for x in report.layers:
        if x.name not in searched and (e := estimate_layer(x, tgt, os, None, tgt.baseline_bytes_per_param)):
            total += e.ms * (fit.factor(x.type) if fit is not None else 1.0)
    return total


@dataclass
class _Space:
    """The search space: per layer (in model order) its options, plus what no choice changes."""

    names: list[str]
    groups: list[list[Option]]
    fixed: int  # bytes of everything the search does not decide
    fixed_ms: float  # roofline ms of layers the search does not decide
    lat_ok: bool
    peak: float
    latency_basis: str = ROOFLINE  # or "calibrated from DEVICE profile"

    def size(self, picks: list[int]) -> int:
        return self.fixed + sum(self.groups[i][j].bytes for i, j in enumerate(picks))

    def latency(self, picks: list[int]) -> float | None:
        return self.fixed_ms + sum(_ms(self.groups[i][j]) for i, j in enumerate(picks)) if self.lat_ok else None

    def psnr(self, picks: list[int]) -> float:
        """Estimate: independent errors add, so the plan's output MSE is the sum of the layers'."""
        total = sum(self.groups[i][j].mse for i, j in enumerate(picks))
        return 10 * math.log10(self.peak ** 2 / total) if total > 0 and self.peak > 0 else math.inf

    def settings(self, picks: list[int]) -> list[Setting]:
        return [self.groups[i][j].setting for i, j in enumerate(picks)]


Estimates = dict[str, dict[str, tuple[Setting, dict[str, float]]]]  # layer -> key -> (setting, predicted metrics)


def _space(k: Knowledge, report: ModelReport, sens: SensitivityReport, layers: list[LayerInfo], target: str,
           os: int, baseline: float, estimates: Estimates | None = None, fit: ProfileFit | None = None,
           memo: LatencyMemo | None = None) -> _Space:
    options = _options(k, report, sens, layers, target, os, baseline, estimates or {}, fit, memo)
    fixed = int(round(report.stored() * baseline)) - sum(setting_bytes(k, x, FP16, baseline) for x in layers)
    lat_ok = any(o.latency_ms == o.latency_ms for opts in options.values() for o in opts)
    fixed_ms = _fixed_latency(report, k, target, os, {x.name for x in layers}, fit) if lat_ok else 0.0
    return _Space([x.name for x in layers], [options[x.name] for x in layers], fixed, fixed_ms, lat_ok, sens.peak,
                  fit.label if fit is not None else ROOFLINE)


def _options(k: Knowledge, report: ModelReport, sens: SensitivityReport, layers: list[LayerInfo],
             target: str, os: int, baseline: float, estimates: Estimates,
             fit: ProfileFit | None = None, memo: LatencyMemo | None = None) -> dict[str, list[Option]]:
    """fp16 plus every measured setting (and every estimated one not measured), per layer, with cost and damage."""
    table = sens.table()
    out: dict[str, list[Option]] = {}
    for x in layers:
        measured = {key: (Setting.of(m.technique, **m.params), m.metrics, True) for key, m in table.get(x.name, {}).items()}
        guessed = {key: (s, metrics, False) for key, (s, metrics) in estimates.get(x.name, {}).items()
                   if key not in measured}
        rows = [(FP16, {}, True)] + list(measured.values()) + list(guessed.values())
        lat = _latency_table(report, k, target, os, x, [r[0] for r in rows], baseline, fit, memo) or {}
        opts = []
        for s, metrics, was_measured in rows:
            mse = metrics.get("output_mse", 0.0)
            if not math.isfinite(mse):
                continue  # a setting that produced NaN/inf outputs is never a candidate
            opts.append(Option(setting=s, bytes=setting_bytes(k, x, s, baseline), latency_ms=lat.get(s, float("nan")),
                               mse=mse, kl=metrics.get("kl_divergence", 0.0),
                               cos=max(0.0, 1.0 - metrics.get("cosine", 1.0)), measured=was_measured))
        out[x.name] = opts
    return out


def _ms(o: Option) -> float:
    """Roofline ms of an option; 0 for layers the estimate cannot cover (no MACs)."""
    return o.latency_ms if o.latency_ms == o.latency_ms else 0.0


def _candidate_plans(space: _Space, budget: Budget, logits: bool, buckets: int) -> list[tuple[str, str, list[int]]]:
    """Distinct knapsack optima to confirm by measurement, in order of preference."""
    costs = [[o.bytes for o in g] for g in space.groups]
    lats = [[_ms(o) for o in g] for g in space.groups]
    variants = [("mse", "output MSE", "mse", 1.0),
                ("kl" if logits else "cosine", "KL divergence" if logits else "1 - cosine", "kl" if logits else "cos", 1.0),
                ("mse@97%", "output MSE at 97% of the budget", "mse", 0.97),
                ("mse@93%", "output MSE at 93% of the budget", "mse", 0.93)]
    out: list[tuple[str, str, list[int]]] = []
    for name, objective, attr, frac in variants:
        dmg = [[getattr(o, attr) for o in g] for g in space.groups]
        lat_cap = None if not budget.max_latency_ms else budget.max_latency_ms * frac - space.fixed_ms
        if budget.max_bytes is not None and lat_cap is not None:
            ch = solve_two_budgets(costs, lats, dmg, budget.max_bytes * frac - space.fixed, lat_cap, buckets)
        elif budget.max_bytes is not None:
            ch = solve_mckp(costs, dmg, budget.max_bytes * frac - space.fixed, buckets)
        else:
            ch = solve_mckp(lats, dmg, lat_cap, buckets)
        if ch is not None and all(ch.picks != p for _, _, p in out):
            out.append((name, objective, ch.picks))
    return out


def _point(space: _Space, picks: list[int], measured: float | None = None) -> FrontierPoint:
    return FrontierPoint(bytes=space.size(picks), latency_ms=space.latency(picks), predicted_psnr_db=space.psnr(picks),
                         measured_psnr_db=measured,
                         compressed_layers=sum(1 for s in space.settings(picks) if not s.is_fp16))


def _frontier(space: _Space, *, by: str, buckets: int, points: int = 12) -> list[FrontierPoint]:
    """Least predicted damage at evenly spaced sizes (or latencies): the Pareto frontier."""
    costs = [[(o.bytes if by == "bytes" else _ms(o)) for o in g] for g in space.groups]
    dmg = [[o.mse for o in g] for g in space.groups]
    knap = MultipleChoiceKnapsack(costs, dmg, sum(max(c) for c in costs), min(buckets, 4096))
    return [_point(space, ch.picks) for ch in knap.frontier(points)]
