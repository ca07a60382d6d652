"""Sensitivity results: the result models, the ranking of layers and the scoring of proxies."""
from __future__ import annotations

import math
from typing import Any, Callable

from pydantic import Field

from compressadvise.model.analysis import ModelReport
from compressadvise.measure.metrics import ResultModel, count_text

PROXIES = ("weight_rel_error", "hessian_output", "fisher_labels")


# ------------------------------------------------------------------ results
class Measurement(ResultModel):
    layer: str
    setting: str = Field(description="setting key, technique:param=value,...")
    label: str
    technique: str
    params: dict[str, Any]
    bytes: int = Field(description="estimate: whole-layer bytes under this setting (technique formula)")
    metrics: dict[str, float] = Field(description="measured on the samples, this layer alone compressed")
    proxies: dict[str, float] = Field(description="cheap predictions (weight error, Hessian/Fisher x error)")
    seconds: float = 0.0
    cached: bool = False
    samples: int | None = Field(None, description="samples this measurement used (fewer than the report's when "
                                "the search measured on a first subset: adaptive samples)")


class LayerRank(ResultModel):
    layer: str
    type: str
    params: int
    score: float = Field(description="geometric mean over its settings of the measured output MSE / the median "
                               "layer's at the same setting")
    vs_median: float = Field(description="score / median layer score")
    rank: int


class ProxyQuality(ResultModel):
    proxy: str
    layer_rank_spearman: float | None = Field(description="rank correlation of per-layer scores with the measured ones")
    per_setting_spearman: float | None = Field(description="mean over settings of the rank correlation across layers")
    top1_match: bool | None = Field(description="the proxy's most sensitive layer is the measured one")
    pairs_spearman: float | None = Field(description="rank correlation over all (layer, setting) pairs")


class SensitivityReport(ResultModel):
    source: str
    model_sha256: str
    samples: str
    samples_used: int
    samples_hash: str
    output_dim: int
    logits: bool
    reference: dict[str, float] = Field(description="measured on the original model (accuracy with labels)")
    peak: float = Field(description="max |reference output|, the PSNR peak")
    baseline_bytes_per_param: float
    layers: list[str]
    settings: list[str]
    measurements: list[Measurement]
    ranking: list[LayerRank]
    proxies: list[ProxyQuality]
    evaluations: int = Field(description="single-layer evaluations run now (not from the cache)")
    forward_passes: float = Field(0.0, description="forward-pass equivalents run now: a pass over all samples = 1, "
                                  "a suffix-only pass its share of the model's MACs, each layer's prefix 1")
    suffix_evaluations: int = Field(0, description="evaluations that reran only the layer's suffix")
    cache_hits: int
    cache_dir: str | None
    executor: str
    workers: int
    wall_s: float
    notes: list[str] = []

    def table(self) -> dict[str, dict[str, Measurement]]:
        out: dict[str, dict[str, Measurement]] = {}
        for m in self.measurements:
            out.setdefault(m.layer, {})[m.setting] = m
        return out

    def _summary(self) -> tuple[str, list[tuple[str, str]]]:
        """What was measured, the most sensitive layers and what it cost."""
        top = sorted(self.ranking, key=lambda r: r.rank)[:3]
        return "SensitivityReport", [
            ("model", self.source), ("samples", f"{self.samples_used} ({self.samples})"),
            ("measured", f"{count_text(len(self.layers), 'layer')} x {count_text(len(self.settings), 'setting')}"),
            ("most sensitive", ", ".join(f"{r.layer} (x{r.vs_median:.3g} median)" for r in top) or "-"),
            ("evaluations", f"{self.evaluations} run, {self.cache_hits} cached"),
            ("time", f"{self.wall_s:.1f} s")]


# ------------------------------------------------------------------ ranking and proxy quality
def layer_scores(meas: list[Measurement], value: Callable[[Measurement], float]) -> dict[str, float]:
    """Per-layer sensitivity relative to the other layers, comparable when layers were measured
    with different settings (a playbook can allow 8 bits only on one layer, 4 on another).

    For each setting measured on 2+ layers, a layer's `value` is divided by the median layer's
    at that setting; a layer's score is the geometric mean of those ratios. Comparing raw
    values across different settings would call a layer insensitive just because it was only
    tried at 8 bits. When every layer shares every setting, the order is that of the geometric
    mean of the raw values.
    """
    by_setting: dict[str, list[Measurement]] = {}
    for m in meas:
        v = value(m)
        if v == v:  # NaN: not computed for this pair
            by_setting.setdefault(m.setting, []).append(m)
    ratios: dict[str, list[float]] = {}
    for group in by_setting.values():
        if len({m.layer for m in group}) < 2:
            continue
        med = _median([max(value(m), 1e-30) for m in group])
        for m in group:
            ratios.setdefault(m.layer, []).append(max(value(m), 1e-30) / med)
    # A layer measured only at settings no other layer was has nothing to be compared with: left out.
    return {layer: _geomean(v) for layer, v in ratios.items()}


def _geomean(xs: list[float]) -> float:
    xs = [max(x, 1e-30) for x in xs if x == x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else 0.0


def rank_layers(meas: list[Measurement], report: ModelReport) -> list[LayerRank]:
    scores = layer_scores(meas, lambda m: m.metrics["output_mse"])
    if not scores:
        return []
    med = _median(list(scores.values())) or 1e-30
    info = {x.name: x for x in report.layers}
    ordered = sorted(scores.items(), key=lambda kv: -kv[1])
    return [LayerRank(layer=name, type=info[name].type, params=info[name].params, score=s,
                      vs_median=s / med if med > 0 else float("inf"), rank=i + 1)
            for i, (name, s) in enumerate(ordered)]


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    if not ys:
        return 0.0
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else 0.5 * (ys[mid - 1] + ys[mid])


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for kk in range(i, j + 1):
            ranks[order[kk]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 pairs."""
    pairs = [(x, y) for x, y in zip(a, b) if x == x and y == y]
    if len(pairs) < 3:
        return None
    ra, rb = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else None


def proxy_quality(meas: list[Measurement], ranking: list[LayerRank]) -> list[ProxyQuality]:
    truth = {r.layer: r.score for r in ranking}
    out = []
    for proxy in PROXIES:
        if not any(m.proxies.get(proxy) == m.proxies.get(proxy) for m in meas):
            continue  # not available (e.g. no labels for the Fisher proxy)
        scores = layer_scores(meas, lambda m: m.proxies.get(proxy, float("nan")))
        layers = [x for x in truth if x in scores]
        rho = spearman([truth[x] for x in layers], [scores[x] for x in layers])
        per: list[float] = []
        by_setting: dict[str, list[Measurement]] = {}
        for m in meas:
            by_setting.setdefault(m.setting, []).append(m)
        for group in by_setting.values():
            r = spearman([m.metrics["output_mse"] for m in group], [m.proxies.get(proxy, float("nan")) for m in group])
            if r is not None:
                per.append(r)
        top = max(scores, key=scores.get) == ranking[0].layer if scores and ranking else None
        pairs = spearman([m.metrics["output_mse"] for m in meas], [m.proxies.get(proxy, float("nan")) for m in meas])
        out.append(ProxyQuality(proxy=proxy, layer_rank_spearman=rho,
                                per_setting_spearman=sum(per) / len(per) if per else None,
                                top1_match=top, pairs_spearman=pairs))
    return out
