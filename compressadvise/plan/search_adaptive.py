"""Measure only what the budget can choose (issue 23): predict, prune, measure the knapsack's picks.

A uniform sweep pays for every configuration on the whole model; measuring every (layer,
setting) alone is no cheaper. Most of those pairs can never be chosen, so the search:
1. predicts every pair's output MSE without a forward pass (`sensitivity_proxy`: the weight
   error times the Hessian diagonal);
2. skips pairs another setting of the same layer dominates: no larger and predicted clearly less
   damaging (DOMINANCE_MARGIN, since palettization's prediction is an upper estimate);
3. solves the knapsack on the predictions calibrated per layer (measured / predicted of the
   layer's measured pairs; the median layer's ratio before any), measures the pairs the candidate
   plans chose and each one's neighbours in size (where the knapsack moves next), and repeats
   until the plans choose measured pairs only (less the least damaging picks that together hold
   at most NEGLIGIBLE of the plan's predicted noise: at 8 bits most layers add next to nothing,
   and their k-means costs seconds each). Where a layer's measurements contradict the
   predicted order beyond noise, every kept setting of the layer is measured; where predicted and
   measured rank poorly overall (Spearman < TRUST_SPEARMAN), every kept pair is;
4. measures on the first samples only (adaptive samples) and measures again on all samples the
   chosen pairs whose score is within noise of the next measured setting in size.
The confirmation that follows measures whole candidate plans on all samples, as before.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from compressadvise.errors import CompressionFailed
from compressadvise.measure.sensitivity import FP16, Measurement, Prepared, SensitivityReport, Setting, sensitivity
from compressadvise.measure.sensitivity_results import proxy_quality, rank_layers, spearman
from compressadvise.plan.search_results import Budget, Pruning
from compressadvise.plan.search_space import Estimates, LatencyMemo, Option, _candidate_plans, _space, _Space

if TYPE_CHECKING:
    from compressadvise.knowledge.base import Knowledge
    from compressadvise.measure.device_profile import ProfileFit
    from compressadvise.measure.executors import Executor
    from compressadvise.measure.sensitivity import Cache
    from compressadvise.model.analysis import LayerInfo

DOMINANCE_MARGIN = 1.5  # dominated: another setting no larger with at most 1/1.5 of the predicted damage
TRUST_SPEARMAN = 0.5  # below it (over TRUST_MIN pairs) the predictions do not rank: measure every kept pair
TRUST_MIN = 8
MIN_FIRST_SAMPLES = 8  # adaptive samples: the first measurement uses max(this, a third of the samples)
MAX_ROUNDS = 6
CLOSE_SIGMAS = 2.0
NEGLIGIBLE = 0.05  # unmeasured picks holding at most this share of a plan's predicted noise stay predicted
SMALL_ROUND = 4  # fewer pairs than this per worker: measured in this process  # two scores closer than this many standard errors cannot be ranked


@dataclass
class Scope:
    """What the rounds need besides the measurements: how to build the space and the budget."""

    prep: Prepared
    k: "Knowledge"
    layers: list["LayerInfo"]
    target: str
    os: int
    baseline: float
    budget: Budget
    buckets: int
    grid: list[Setting]
    cache: "Cache | None"
    executor: "Executor | None"
    progress: Callable[[str, int, int], None] | None
    latency_fit: "ProfileFit | None" = None  # a device profile's factors: calibrated latency costs
    latency_memo: LatencyMemo = field(default_factory=dict)  # every round's space reuses the roofline figures


@dataclass
class _State:
    predicted: dict[str, dict[str, tuple[Setting, float]]]  # layer -> key -> (setting, predicted MSE)
    kept: dict[str, list[Setting]]
    measured: dict[tuple[str, str], Measurement] = field(default_factory=dict)
    reports: list[SensitivityReport] = field(default_factory=list)
    widened: set[str] = field(default_factory=set)
    trusted: bool = True
    rounds: int = 0
    remeasured: int = 0


def adaptive_sensitivities(scope: Scope, allowed: dict[str, list[Setting]]
                           ) -> tuple[SensitivityReport, Estimates, Pruning]:
    """The measurements the search needs for this budget, calibrated predictions for the rest,
    and the account of what was skipped."""
    t0 = time.perf_counter()
    predicted = predict(scope, allowed)
    predict_s = time.perf_counter() - t0
    kept = {x.name: undominated(scope, x, predicted.get(x.name, {})) for x in scope.layers}
    st = _State(predicted=predicted, kept=kept)
    n, first = scope.prep.n, _first_samples(scope.prep.n)
    space, plans = _rounds(scope, st, first)
    if first < n:
        again = _too_close(scope, st, space, plans)
        if again:
            st.remeasured = len(again)
            _measure(scope, st, again, None)
            _rounds(scope, st, first)  # new values can move the picks onto unmeasured pairs
    sens = _report(scope, st)
    candidates = sum(len([s for s in v if not s.is_fp16]) for v in allowed.values())
    kept_n = sum(len(v) for v in kept.values())
    pruning = Pruning(candidates=candidates, predicted=sum(len(v) for v in predicted.values()),
                      dominated=sum(len(v) for v in predicted.values()) - kept_n, measured=len(st.measured),
                      not_needed=kept_n - len(st.measured), first_samples=first, all_samples=n,
                      remeasured=st.remeasured, rounds=st.rounds, widened=sorted(st.widened),
                      proxy_spearman=_rho(_pairs(st)), trusted=st.trusted, predict_wall_s=round(predict_s, 2))
    return sens, estimates(scope, st), pruning


# ------------------------------------------------------------------ predictions and pruning
def predict(scope: Scope, allowed: dict[str, list[Setting]]) -> dict[str, dict[str, tuple[Setting, float]]]:
    """Predicted output MSE of every allowed (layer, setting) pair, no forward pass."""
    from compressadvise.measure.sensitivity_eval import seed_of
    from compressadvise.measure.sensitivity_proxy import predicted_mse, squared_error

    prep = scope.prep
    hess = prep.hessian()
    params = dict(prep.model.named_parameters())
    pairs = [(x.name, s) for x in scope.layers for s in allowed.get(x.name, []) if not s.is_fp16]
    out: dict[str, dict[str, tuple[Setting, float]]] = {}
    for i, (layer, s) in enumerate(pairs):
        if scope.progress:
            scope.progress("predicting", i, len(pairs))
        if (layer, s.key) not in prep.predictions:
            w = params[prep.weights[layer]].detach()
            try:
                d2 = squared_error(w, s, seed_of(layer, s))
            except CompressionFailed as e:  # the library leaves this weight alone: not a candidate
                prep.predictions[(layer, s.key)] = None
                prep.notes.append(f"{layer}: {s.label} left out of the search: {e}")
                continue
            prep.predictions[(layer, s.key)] = predicted_mse(d2, hess.get(layer), w)
        if prep.predictions[(layer, s.key)] is not None:
            out.setdefault(layer, {})[s.key] = (s, prep.predictions[(layer, s.key)])
    if scope.progress:
        scope.progress("predicting", len(pairs), len(pairs))
    return out


def undominated(scope: Scope, layer: "LayerInfo", predicted: dict[str, tuple[Setting, float]]) -> list[Setting]:
    """The layer's settings no other setting (fp16 included: no damage) dominates."""
    from compressadvise.measure.sensitivity import setting_bytes

    rows = [(s, setting_bytes(scope.k, layer, s, scope.baseline), p) for s, p in predicted.values()]
    fp16 = setting_bytes(scope.k, layer, FP16, scope.baseline) if rows else 0
    kept = []
    for s, b, p in rows:
        if b >= fp16:
            continue  # fp16 is no larger and does no damage
        if any(b2 <= b and p2 * DOMINANCE_MARGIN <= p and s2 != s for s2, b2, p2 in rows):
            continue
        kept.append(s)
    return kept


# ------------------------------------------------------------------ rounds
def _rounds(scope: Scope, st: _State, first: int) -> tuple[_Space, list[tuple[str, str, list[int]]]]:
    """Solve on calibrated predictions, measure the unmeasured picks, until the picks are all
    measured; the last space solved and its candidate plans."""
    for _ in range(MAX_ROUNDS):
        space = _space_of(scope, st)
        plans = _candidate_plans(space, scope.budget, scope.prep.logits, scope.buckets)
        need = _unmeasured_picks(space, plans, st)
        for _, _, picks in plans if need else []:
            need |= _neighbours(space, picks, st, {layer for layer, _ in need})
        need |= {(layer, s.key) for layer in st.widened for s in st.kept.get(layer, [])}
        if not st.trusted:
            need |= {(layer, s.key) for layer, v in st.kept.items() for s in v}
        need -= set(st.measured)
        if not need:
            return space, plans
        st.rounds += 1
        _measure(scope, st, need, first)
        _widen_and_trust(st)
    space = _space_of(scope, st)
    return space, _candidate_plans(space, scope.budget, scope.prep.logits, scope.buckets)


def _space_of(scope: Scope, st: _State) -> _Space:
    return _space(scope.k, scope.prep.report, _report(scope, st), scope.layers, scope.target, scope.os,
                  scope.baseline, estimates(scope, st), scope.latency_fit, scope.latency_memo)


def _unmeasured_picks(space: _Space, plans: list[tuple[str, str, list[int]]], st: _State) -> set[tuple[str, str]]:
    """The plans' unmeasured picks, less the least damaging ones that together hold at most
    NEGLIGIBLE of the plan's predicted noise: their prediction cannot move the plan much, and the
    confirmation measures the whole plan anyway."""
    need = set()
    for _, _, picks in plans:
        rows = [(o.mse, name, o.setting) for name, o in zip(space.names, (space.groups[i][j] for i, j in enumerate(picks)))]
        total = sum(r[0] for r in rows) or 1.0
        left = NEGLIGIBLE * total
        for mse, name, s in sorted(r for r in rows if not r[2].is_fp16 and (r[1], r[2].key) not in st.measured):
            if mse <= left:
                left -= mse
                continue
            need.add((name, s.key))
    return need


def _neighbours(space: _Space, picks: list[int], st: _State, layers: set[str]) -> set[tuple[str, str]]:
    """Per layer (of these), the kept settings just smaller and just larger than the pick: where
    the knapsack moves when the budget or the other layers' values shift."""
    out = set()
    for i, (name, j) in enumerate(zip(space.names, picks)):
        if name not in layers:
            continue
        kept = {s.key for s in st.kept.get(name, [])}
        pick = space.groups[i][j]
        for o in [pick] + _beside(pick, [o for o in space.groups[i] if o.setting.key in kept or o is pick]):
            # a neighbour a tenth as damaging as the pick: the choice between them turns on the
            # pick's value and the bytes, not on the neighbour's (often a costly 8-bit k-means)
            if not o.setting.is_fp16 and (o is pick or o.mse >= pick.mse / 10):
                out.add((name, o.setting.key))
    return out


def _beside(pick: Option, options: list[Option]) -> list[Option]:
    """The options just smaller and just larger than the pick among these (which hold the pick)."""
    by_size = sorted(options, key=lambda o: o.bytes)
    at = next(n for n, o in enumerate(by_size) if o is pick)
    return by_size[max(0, at - 1):at] + by_size[at + 1:at + 2]


def _measure(scope: Scope, st: _State, need: set[tuple[str, str]], samples: int | None) -> None:
    """Measure these pairs (on the first `samples` samples; None: all) and keep the results."""
    cands: dict[str, list[Setting]] = {x.name: [] for x in scope.layers}  # a layer left out would get the grid
    for layer, key in sorted(need):
        cands.setdefault(layer, []).append(st.predicted[layer][key][0])
    prog = scope.progress
    executor = scope.executor
    if executor is not None and len(need) < SMALL_ROUND * executor.workers:
        from compressadvise.measure.executors import SerialExecutor

        executor = SerialExecutor()  # a pool's start-up costs more than a few evaluations
    rep = sensitivity(prepared=scope.prep, knowledge=scope.k, candidates=cands, settings=scope.grid,
                      cache=scope.cache, executor=executor, samples_used=samples, keep_weights=True,
                      progress=(lambda d, t: prog("sensitivity", d, t)) if prog else None)
    st.reports.append(rep)
    for m in rep.measurements:
        st.measured[(m.layer, m.setting)] = m


def _widen_and_trust(st: _State) -> None:
    """Widen layers whose measurements contradict the predicted order (beyond noise); stop
    trusting the predictions when they rank the measured pairs poorly overall."""
    by_layer: dict[str, list[tuple[float, Measurement]]] = {}
    for (layer, key), m in st.measured.items():
        if (p := st.predicted.get(layer, {}).get(key)) is not None:
            by_layer.setdefault(layer, []).append((p[1], m))
    for layer, rows in by_layer.items():
        if any(pa < pb and _worse(ma, mb) for pa, ma in rows for pb, mb in rows):
            st.widened.add(layer)
    pairs = _pairs(st)
    rho = _rho(pairs)
    if rho is not None and len(pairs) >= TRUST_MIN and rho < TRUST_SPEARMAN:
        st.trusted = False


def _worse(a: Measurement, b: Measurement) -> bool:
    """a measured more damaging than b beyond noise (and by more than the predictions' slack)."""
    gap = a.metrics["output_mse"] - b.metrics["output_mse"] * DOMINANCE_MARGIN
    return gap > 0 and not _close(a, b)


def _pairs(st: _State) -> list[tuple[float, float]]:
    """(predicted, measured) output MSE of every measured pair."""
    return [(p[1], m.metrics["output_mse"]) for (layer, key), m in st.measured.items()
            if (p := st.predicted.get(layer, {}).get(key)) is not None]


def _rho(pairs: list[tuple[float, float]]) -> float | None:
    if len(pairs) < 3:
        return None
    r = spearman([a for a, _ in pairs], [b for _, b in pairs])
    return None if r is None or not math.isfinite(r) else round(r, 3)


# ------------------------------------------------------------------ adaptive samples
def _first_samples(n: int) -> int:
    return n if n < 2 * MIN_FIRST_SAMPLES else max(MIN_FIRST_SAMPLES, n // 3)


def _too_close(scope: Scope, st: _State, space: _Space, plans: list[tuple[str, str, list[int]]]
               ) -> set[tuple[str, str]]:
    """Chosen pairs measured on the first samples whose score the next measured setting in size
    (smaller or larger, same layer) matches within CLOSE_SIGMAS standard errors: both measured
    again on all samples."""
    out: set[tuple[str, str]] = set()
    for _, _, picks in plans:
        for i, (name, j) in enumerate(zip(space.names, picks)):
            pick = space.groups[i][j]
            m = st.measured.get((name, pick.setting.key))
            if m is None or (m.samples or scope.prep.n) >= scope.prep.n:
                continue
            for o in _beside(pick, [o for o in space.groups[i] if (name, o.setting.key) in st.measured]):
                q = st.measured[(name, o.setting.key)]
                if _close(m, q):
                    out |= {(name, pick.setting.key), (name, o.setting.key)}
    return out


def _close(a: Measurement, b: Measurement) -> bool:
    sa, sb = a.metrics.get("output_mse_se", math.inf), b.metrics.get("output_mse_se", math.inf)
    gap = abs(a.metrics["output_mse"] - b.metrics["output_mse"])
    return gap < CLOSE_SIGMAS * math.sqrt(sa ** 2 + sb ** 2)


# ------------------------------------------------------------------ results
def estimates(scope: Scope, st: _State) -> Estimates:
    """Calibrated predictions for the kept pairs not measured: predicted MSE x the layer's
    measured/predicted ratio (the median layer's where the layer has none), per metric."""
    ratios = _ratios(st)
    fallback = {m: _median([r[m] for r in ratios.values() if m in r]) for m in ("mse", "kl", "cos")}
    out: Estimates = {}
    for layer, settings in st.kept.items():
        r = ratios.get(layer, {})
        for s in settings:
            if (layer, s.key) in st.measured:
                continue
            p = st.predicted[layer][s.key][1]
            mse = p * r.get("mse", fallback["mse"] or 1.0)
            out.setdefault(layer, {})[s.key] = (s, {
                "output_mse": mse, "kl_divergence": p * r.get("kl", fallback["kl"] or 1.0),
                "cosine": 1.0 - p * r.get("cos", fallback["cos"] or 0.0)})
    return out


def _ratios(st: _State) -> dict[str, dict[str, float]]:
    """Per layer, the geometric mean of measured / predicted for MSE, KL and 1 - cosine."""
    logs: dict[str, dict[str, list[float]]] = {}
    for (layer, key), m in st.measured.items():
        p = st.predicted.get(layer, {}).get(key)
        if not p or p[1] <= 0:
            continue
        got = {"mse": m.metrics.get("output_mse", 0.0), "kl": m.metrics.get("kl_divergence", 0.0),
               "cos": 1.0 - m.metrics.get("cosine", 1.0)}
        for metric, v in got.items():
            if v > 0 and math.isfinite(v):
                logs.setdefault(layer, {}).setdefault(metric, []).append(math.log(v / p[1]))
    return {layer: {mm: math.exp(sum(v) / len(v)) for mm, v in d.items()} for layer, d in logs.items()}


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def _report(scope: Scope, st: _State) -> SensitivityReport:
    """One report over every round: the latest measurement per pair, costs summed."""
    if not st.reports:
        return sensitivity_shell(scope)
    last = st.reports[-1]
    meas = list(st.measured.values())
    ranking = rank_layers(meas, scope.prep.report)
    return last.model_copy(update=dict(
        layers=[x.name for x in scope.layers], settings=list(dict.fromkeys(m.setting for m in meas)),
        measurements=meas, ranking=ranking, proxies=proxy_quality(meas, ranking),
        evaluations=sum(r.evaluations for r in st.reports), cache_hits=sum(r.cache_hits for r in st.reports),
        forward_passes=round(sum(r.forward_passes for r in st.reports), 2),
        suffix_evaluations=sum(r.suffix_evaluations for r in st.reports),
        wall_s=sum(r.wall_s for r in st.reports), notes=list(dict.fromkeys(n for r in st.reports for n in r.notes))))


def sensitivity_shell(scope: Scope) -> SensitivityReport:
    """A report with no measurement yet (the first round solves on predictions alone)."""
    prep = scope.prep
    return SensitivityReport(
        source=prep.loaded.source, model_sha256=prep.loaded.sha256, samples=prep.samples.source,
        samples_used=prep.n, samples_hash=prep.shash, output_dim=int(prep.reference.shape[1]), logits=prep.logits,
        reference=prep.ref_metrics, peak=float(prep.reference.abs().max()), baseline_bytes_per_param=scope.baseline,
        layers=[x.name for x in scope.layers], settings=[], measurements=[], ranking=[], proxies=[],
        evaluations=0, forward_passes=0.0, suffix_evaluations=0, cache_hits=0, cache_dir=None, executor="cache",
        workers=0, wall_s=0.0, notes=[])

