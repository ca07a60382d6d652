"""Budget-driven mixed-precision search over measured per-layer sensitivities.

1. Candidates: every compressible layer gets fp16 plus the settings its target runs at the
   chosen OS (the techniques' `requires` modes) that the backend can apply; playbook layer
   rules restrict them as `recommend` would (a `keep` drops the setting, an `override`
   replaces it), unless `lessons="advise"`, which only reports where a lesson and the
   measurement disagree.
2. Sensitivities: each (layer, setting) is measured alone (compressadvise.sensitivity, cached).
3. Choice: a multiple-choice knapsack. Each layer takes one setting; the cost is its size from
   the technique's formula (or its roofline latency on the target); the damage is the output
   MSE that setting caused alone. Independent errors add, so the plan's predicted output MSE
   is the sum, and its predicted PSNR is 10 log10(peak^2 / sum). Dynamic programming over the
   budget finds the least total damage that fits (exact for integer costs; otherwise costs
   are rounded up, so the chosen plan always fits); a size and a latency budget together use
   a Lagrange multiplier on latency.
4. Confirmation: a few distinct candidate plans (the optimum for output MSE, for KL or
   cosine, and at a slightly tighter budget) are applied in memory and measured on the
   samples; the best measured one becomes the plan. Every figure says whether it is an
   estimate or measured.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Sequence

from pydantic import Field

from ._callable import callable_module
from .analysis import LayerInfo, ModelReport
from .errors import BudgetMissed, InvalidKnowledge
from .knowledge import Knowledge
from .metrics import ResultModel
from .schema import Advisory, Constraints, Plan, PlanModel, PlanTarget, Prediction, Skip, Step, TraceEntry
from .sensitivity import (FP16, Cache, Prepared, SensitivityReport, Setting, applicable, candidate_layers,
                          default_grid, measure, prepare, sensitivity, setting_bytes, supported_settings)

if TYPE_CHECKING:
    from .executors import Executor

MB = 1e6
SEARCH_CODE = "SEARCH"
DEFAULT_BUCKETS = 8192


# ------------------------------------------------------------------ the knapsack
@dataclass
class Choice:
    picks: list[int]  # option index per group
    damage: float
    cost: float


class MultipleChoiceKnapsack:
    """Pick one option per group minimising total damage with total cost <= capacity.

    Dynamic programming over a cost grid: `best[c]` is the least damage with cost at most c
    units. Each group's costs are taken relative to its cheapest option (so the grid spans only
    what choices change), then rounded up to whole units: a pick that fits on the grid fits in
    reality. Integer costs with a small enough capacity use 1-unit cells, which is exact.
    """

    def __init__(self, costs: Sequence[Sequence[float]], damages: Sequence[Sequence[float]],
                 capacity: float, buckets: int = DEFAULT_BUCKETS):
        import numpy as np

        if len(costs) != len(damages) or any(len(c) != len(d) or not c for c, d in zip(costs, damages)):
            raise ValueError("every group needs as many costs as damages, and at least one option")
        self.costs = [list(map(float, c)) for c in costs]
        self.damages = [list(map(float, d)) for d in damages]
        self.base = sum(min(c) for c in self.costs)
        room = capacity - self.base
        self.feasible = room >= -1e-9
        room = max(room, 0.0)
        integral = all(float(x).is_integer() for c in self.costs for x in c) and float(capacity).is_integer()
        if integral and room <= 4 * buckets:
            self.unit, self.cells = 1.0, int(round(room))
        else:
            self.unit = room / buckets if room > 0 else 1.0
            self.cells = buckets if room > 0 else 0
        inf = float("inf")
        best = np.zeros(self.cells + 1)
        self._picks = []
        for c, d in zip(self.costs, self.damages):
            lo = min(c)
            units = [int(math.ceil((x - lo) / self.unit - 1e-9)) for x in c]
            new = np.full(self.cells + 1, inf)
            pick = np.full(self.cells + 1, -1, dtype=np.int32)
            for j, (u, dj) in enumerate(zip(units, d)):
                if u > self.cells:
                    continue
                cand = np.full(self.cells + 1, inf)
                cand[u:] = best[: self.cells + 1 - u] + dj
                better = cand < new
                new[better] = cand[better]
                pick[better] = j
            best = new
            self._picks.append((pick, units))
        self.best = best

    def solve(self, cells: int | None = None) -> Choice | None:
        """The optimum using at most `cells` grid cells (default: the whole capacity)."""
        if not self.feasible:
            return None
        c = self.cells if cells is None else min(cells, self.cells)
        if not math.isfinite(float(self.best[c])):
            return None
        picks = []
        for pick, units in reversed(self._picks):
            j = int(pick[c])
            if j < 0:
                return None
            picks.append(j)
            c -= units[j]
        picks.reverse()
        return self._choice(picks)

    def _choice(self, picks: list[int]) -> Choice:
        return Choice(picks, sum(d[j] for d, j in zip(self.damages, picks)),
                      sum(c[j] for c, j in zip(self.costs, picks)))

    def frontier(self, points: int = 12) -> list[Choice]:
        """Optimal picks at evenly spaced capacities: the cost-vs-damage Pareto frontier."""
        out: list[Choice] = []
        if not self.feasible:
            return out
        seen = set()
        for i in range(points):
            cells = round(self.cells * i / max(points - 1, 1))
            ch = self.solve(cells)
            if ch is not None and tuple(ch.picks) not in seen:
                seen.add(tuple(ch.picks))
                out.append(ch)
        # keep only non-dominated points
        out.sort(key=lambda c: c.cost)
        pareto: list[Choice] = []
        for ch in out:
            if not pareto or ch.damage < pareto[-1].damage - 1e-15:
                pareto.append(ch)
        return pareto


def solve_mckp(costs: Sequence[Sequence[float]], damages: Sequence[Sequence[float]], capacity: float,
               buckets: int = DEFAULT_BUCKETS) -> Choice | None:
    """One option per group, least total damage with total cost <= capacity (None: infeasible)."""
    return MultipleChoiceKnapsack(costs, damages, capacity, buckets).solve()


def solve_two_budgets(costs: Sequence[Sequence[float]], lat: Sequence[Sequence[float]],
                      damages: Sequence[Sequence[float]], capacity: float, max_latency: float,
                      buckets: int = DEFAULT_BUCKETS) -> Choice | None:
    """Size budget by DP, latency budget by a Lagrange multiplier found by bisection."""
    def attempt(mu: float) -> Choice | None:
        d = [[dj + mu * lj for dj, lj in zip(dg, lg)] for dg, lg in zip(damages, lat)]
        ch = solve_mckp(costs, d, capacity, buckets)
        if ch is None:
            return None
        return Choice(ch.picks, sum(dg[j] for dg, j in zip(damages, ch.picks)), ch.cost)

    def latency(ch: Choice) -> float:
        return sum(lg[j] for lg, j in zip(lat, ch.picks))

    first = attempt(0.0)
    if first is None or latency(first) <= max_latency:
        return first
    scale = max((dj for dg in damages for dj in dg), default=1.0) / max(
        (lj for lg in lat for lj in lg), default=1.0) or 1.0
    lo, hi = 0.0, scale
    best = None
    for _ in range(60):  # grow until the latency budget is met
        ch = attempt(hi)
        if ch is not None and latency(ch) <= max_latency:
            best = ch
            break
        lo, hi = hi, hi * 4
    if best is None:
        return None
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        ch = attempt(mid)
        if ch is not None and latency(ch) <= max_latency:
            best, hi = ch, mid
        else:
            lo = mid
    return best


# ------------------------------------------------------------------ results
class Budget(ResultModel):
    max_bytes: float | None = Field(None, description="whole-model size budget in bytes")
    max_latency_ms: float | None = Field(None, description="estimate: roofline latency budget on the target")
    basis: str = ""

    @classmethod
    def of(cls, *, max_size_mb: float | None = None, bits_per_weight: float | None = None,
           max_latency_ms: float | None = None, size_fraction: float | None = None,
           report: ModelReport | None = None, baseline: float = 2.0) -> "Budget":
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
            max_bytes = bits_per_weight * report.total_params / 8.0
            basis.append(f"{bits_per_weight:g} bits per weight ({report.total_params} parameters)")
        elif size_fraction:
            if report is None:
                raise ValueError("size_fraction needs the model report")
            max_bytes = size_fraction * report.total_params * baseline
            basis.append(f"{size_fraction:g} of the uncompressed size")
        if max_latency_ms:
            basis.append(f"{max_latency_ms:g} ms (estimate)")
        return cls(max_bytes=max_bytes, max_latency_ms=max_latency_ms or None, basis=" and ".join(basis))


class FrontierPoint(ResultModel):
    bytes: int = Field(description="estimate (technique formulas)")
    latency_ms: float | None = Field(None, description="estimate (roofline)")
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
    sensitivity_wall_s: float
    wall_s: float
    lessons: Literal["apply", "advise"]
    notes: list[str] = []


# ------------------------------------------------------------------ candidates and lessons
@dataclass
class Option:
    setting: Setting
    bytes: int
    latency_ms: float
    mse: float = 0.0
    kl: float = 0.0
    cos: float = 0.0  # 1 - cosine


def lesson_candidates(k: Knowledge, report: ModelReport, target: str, os: int, constraints: Constraints,
                      layers: list[LayerInfo], grid: list[Setting]
                      ) -> tuple[dict[str, list[Setting]], dict[str, list[tuple[str, str]]]]:
    """Per layer: the settings left after the playbooks' layer rules, and what each rule did.

    The engine decides (`engine.LayerRules`, the decision `recommend` makes): `keep` drops the
    setting, `override` merges its parameters in.
    """
    from .engine import LayerRules
    from .sensitivity import normalise

    rules = LayerRules.of(k, report, target, os, constraints)
    allowed: dict[str, list[Setting]] = {}
    notes: dict[str, list[tuple[str, str]]] = {}
    for x in layers:
        kept: list[Setting] = []
        for s in grid:
            decided = rules.decide(x, s.technique, s.p)
            if decided is None:
                kept.append(s)
            elif decided.rule.action.kind == "keep":
                notes.setdefault(x.name, []).append((decided.code, f"keeps {x.name} out of {s.label}: {decided.rule.why}"))
            else:
                merged = Setting.of(s.technique, **normalise({**s.p, **decided.rule.action.params}))
                kept.append(merged)
                if merged != s:
                    notes.setdefault(x.name, []).append((decided.code, f"turns {s.label} into {merged.label}: "
                                                         f"{decided.rule.why}"))
        allowed[x.name] = list(dict.fromkeys(kept))
    return allowed, notes


def _latency_table(report: ModelReport, k: Knowledge, target: str, os: int, layer: LayerInfo,
                   settings: list[Setting], baseline: float) -> dict[Setting, float] | None:
    """Roofline ms per setting for one layer (estimate); None when the layer has no MACs."""
    from .estimate import LayerCompression, estimate_layer

    tgt = k.target(target)
    if not layer.macs:
        return None
    out = {}
    for s in settings:
        comp = None
        if not s.is_fp16:
            norm = Setting.normalised(k, s.technique, s.p)  # modes from the technique's requires
            comp = LayerCompression(bytes=float(setting_bytes(k, layer, s, baseline)), setting=s.label,
                                    mode=norm.primary_mode(k), modes=norm.modes(k))
        est = estimate_layer(layer, tgt, os, comp, baseline)
        if est is None:
            return None
        out[s] = est.ms
    return out


def _fixed_latency(report: ModelReport, k: Knowledge, target: str, os: int, searched: set[str]) -> float:
    """Roofline ms of the layers the search does not decide (estimate)."""
    from .estimate import estimate_layer

    tgt = k.target(target)
    total = 0.0
    for x in report.layers:
        if x.name not in searched and (e := estimate_layer(x, tgt, os, None, tgt.baseline_bytes_per_param)):
            total += e.ms
    return total


# ------------------------------------------------------------------ search
def search(
    model: Any = None,
    samples: Any = None,
    *,
    budget: Budget | None = None,
    max_size_mb: float | None = None,
    bits_per_weight: float | None = None,
    size_fraction: float | None = None,
    max_latency_ms: float | None = None,
    target: str = "ane-a17",
    os: int | None = None,
    knowledge: Knowledge | None = None,
    playbooks: Iterable[str] = (),
    settings: list[Setting] | None = None,
    lessons: Literal["apply", "advise"] = "apply",
    confirm: int = 3,
    cache: Cache | None = None,
    executor: "Executor | None" = None,
    progress: Callable[[str, int, int], None] | None = None,
    prepared: Prepared | None = None,
    max_samples: int = 512,
    buckets: int = DEFAULT_BUCKETS,
    trust_pickle: bool = False,
) -> SearchResult:
    """Choose a setting per layer that meets the budget with the least predicted damage,
    confirm the best few candidates by measurement, and return an explained plan."""
    from .knowledge import builtin, load_knowledge

    t0 = time.perf_counter()
    k = knowledge or (load_knowledge(playbooks) if playbooks else builtin())
    from .deployment import Deployment

    # resolved once; no min-OS refusal here (search never raised it: its advice call swallows it)
    dep = Deployment.resolve(k, target, os, check=False)
    tgt, os_major = dep.target, dep.os
    baseline = tgt.baseline_bytes_per_param
    prep = prepared or prepare(model, samples, max_samples=max_samples, trust_pickle=trust_pickle)
    report = prep.report
    budget = budget or Budget.of(max_size_mb=max_size_mb, bits_per_weight=bits_per_weight,
                                 size_fraction=size_fraction, max_latency_ms=max_latency_ms,
                                 report=report, baseline=baseline)
    constraints = Constraints(max_size_mb=(budget.max_bytes or 0.0) / MB, max_latency_ms=budget.max_latency_ms or 0.0)
    notes: list[str] = []
    grid, dropped = supported_settings(k, settings or default_grid(k=k), target, os_major)
    if dropped:
        notes.append(f"{len(dropped)} candidate setting(s) need modes {tgt.name} does not support at OS "
                     f"{os_major} (e.g. {dropped[0].label}): left out")
    layers = candidate_layers(report)
    allowed, lesson_notes = lesson_candidates(k, report, target, os_major, constraints, layers, grid)
    if lessons == "advise":
        allowed = {x.name: grid for x in layers}
    allowed = {x.name: applicable(k, x, allowed[x.name], baseline) for x in layers}

    sens_progress = (lambda d, t: progress("sensitivity", d, t)) if progress else None
    sens = sensitivity(prepared=prep, knowledge=k, candidates=allowed, cache=cache, executor=executor,
                       progress=sens_progress, settings=grid)
    space = _space(k, report, sens, layers, target, os_major, baseline)
    if space.lat_ok and (no_macs := [x.name for x in layers if not x.macs]):
        notes.append(f"{len(no_macs)} layer(s) without MACs (e.g. {no_macs[0]}) are not in the latency estimates")
    if budget.max_latency_ms and not space.lat_ok:
        raise InvalidKnowledge(f"no latency estimate for {tgt.name}: the target profile needs "
                               "memory_bandwidth_gbs and the model an example input (MACs)")
    plans = _candidate_plans(space, budget, prep.logits, buckets)
    if not plans:
        smallest = space.fixed + sum(min(o.bytes for o in g) for g in space.groups)
        raise BudgetMissed(f"no plan meets the budget ({budget.basis}): the smallest candidate plan is "
                           f"{smallest / MB:.4f} MB (estimate)",
                           hint="loosen the budget or allow more aggressive settings (--techniques)")
    conf_progress = (lambda d, t: progress("confirming", d, t)) if progress else None
    candidates, ran_full = _confirm(prep, space, plans[:max(1, confirm)], budget, cache,
                                    executor if confirm > 1 else None, conf_progress)
    best_i = max(range(len(candidates)), key=lambda i: (candidates[i].fits, _score(candidates[i].measured)))
    chosen, chosen_picks = candidates[best_i], plans[best_i][2]
    ranks = {r.layer: r.vs_median for r in sens.ranking}
    layer_choices = _explain(space, chosen_picks, ranks, lesson_notes, lessons, budget, buckets)
    plan = _build_plan(k, report, prep, tgt.name, os_major, constraints, space, chosen_picks,
                       layer_choices, lesson_notes, lessons, budget, chosen, baseline)
    frontier_size = _frontier(space, by="bytes", buckets=buckets) + [
        _point(space, picks, measured=c.measured.get("psnr_db")) for c, (_, _, picks) in zip(candidates, plans)]
    frontier_size.sort(key=lambda f: (f.bytes, f.measured_psnr_db is None))
    frontier_lat = _frontier(space, by="latency", buckets=buckets) if space.lat_ok else []
    if not plan.steps:
        notes.append("the budget is met without compressing anything: the plan has no steps")
    if not space.lat_ok:
        notes.append("latency vs fidelity not estimated: it needs per-layer MACs (a runnable model with an "
                     "example input) and the target's memory_bandwidth_gbs")
    notes.extend(sens.notes)
    return SearchResult(
        plan=plan, budget=budget, chosen=chosen, candidates=candidates, frontier_size=frontier_size,
        frontier_latency=frontier_lat, layers=layer_choices, reference=sens.reference,
        evaluations={"single_layer": sens.evaluations, "single_layer_cached": sens.cache_hits,
                     "full_model": len(candidates), "full_model_run_now": ran_full},
        sensitivity_wall_s=sens.wall_s, wall_s=time.perf_counter() - t0, lessons=lessons, notes=notes)


def _score(m: dict[str, float]) -> tuple:
    psnr = m.get("psnr_db", -math.inf)
    return (psnr if psnr == psnr else -math.inf, m.get("accuracy", 0.0))


@dataclass
class _Space:
    """The search space: per layer (in model order) its options, plus what no choice changes."""

    names: list[str]
    groups: list[list[Option]]
    fixed: int  # bytes of everything the search does not decide
    fixed_ms: float  # roofline ms of layers the search does not decide
    lat_ok: bool
    peak: float

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


def _space(k: Knowledge, report: ModelReport, sens: SensitivityReport, layers: list[LayerInfo], target: str,
           os: int, baseline: float) -> _Space:
    options = _options(k, report, sens, layers, target, os, baseline)
    fixed = int(round(report.total_params * baseline)) - sum(setting_bytes(k, x, FP16, baseline) for x in layers)
    lat_ok = any(o.latency_ms == o.latency_ms for opts in options.values() for o in opts)
    fixed_ms = _fixed_latency(report, k, target, os, {x.name for x in layers}) if lat_ok else 0.0
    return _Space([x.name for x in layers], [options[x.name] for x in layers], fixed, fixed_ms, lat_ok, sens.peak)


def _options(k: Knowledge, report: ModelReport, sens: SensitivityReport, layers: list[LayerInfo],
             target: str, os: int, baseline: float) -> dict[str, list[Option]]:
    """fp16 plus every measured setting, per layer, with cost and damage."""
    table = sens.table()
    out: dict[str, list[Option]] = {}
    for x in layers:
        measured = table.get(x.name, {})
        settings = [FP16] + [Setting.of(m.technique, **m.params) for m in measured.values()]
        lat = _latency_table(report, k, target, os, x, settings, baseline) or {}
        opts = []
        for s in settings:
            m = measured.get(s.key)
            mse = m.metrics["output_mse"] if m else 0.0
            if m and not math.isfinite(mse):
                continue  # a setting that produced NaN/inf outputs is never a candidate
            opts.append(Option(setting=s, bytes=setting_bytes(k, x, s, baseline), latency_ms=lat.get(s, float("nan")),
                               mse=mse, kl=m.metrics.get("kl_divergence", 0.0) if m else 0.0,
                               cos=max(0.0, 1.0 - m.metrics.get("cosine", 1.0)) if m else 0.0))
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


def _confirm(prep: Prepared, space: _Space, plans: list[tuple[str, str, list[int]]], budget: Budget,
             cache: Cache | None, executor: "Executor | None", progress: Callable[[int, int], None] | None
             ) -> tuple[list[Candidate], int]:
    """Apply each candidate plan in memory and measure it on the samples (cached like single layers)."""
    items = [dict(zip(space.names, space.settings(picks))) for _, _, picks in plans]
    measured, ran, _ = measure(prep, items, cache=cache, executor=executor, progress=progress, proxies=False)
    out = []
    for (name, objective, picks), res in zip(plans, measured):
        size, lat = space.size(picks), space.latency(picks)
        fits = (budget.max_bytes is None or size <= budget.max_bytes + 1e-6) and (
            budget.max_latency_ms is None or (lat is not None and lat <= budget.max_latency_ms + 1e-12))
        settings = space.settings(picks)
        out.append(Candidate(
            name=name, objective=objective, assignment={n: s.label for n, s in zip(space.names, settings)},
            settings={n: s.to_dict() for n, s in zip(space.names, settings) if not s.is_fp16},
            estimate={"bytes": float(size), "latency_ms": lat, "psnr_db": space.psnr(picks)},
            measured=res["metrics"], fits=fits))
    return out, ran


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


# ------------------------------------------------------------------ explanations and the plan
def _human(n: float) -> str:
    from .render import human_bytes

    return human_bytes(n)


def _times(x: float) -> str:
    """A ratio as people say it: 1.4x, 14x, over 1,000x (beyond that the digits are noise)."""
    return f"{x:.1f}x" if x < 10 else f"{x:.0f}x" if x < 1000 else "over 1,000x"


def _pct(share: float) -> str:
    return "<1%" if 0 < share < 0.005 else f"{share:.0%}"


def _noise(mse: float, total: float) -> str:
    """Extra predicted output noise, relative to the plan's own when it has any."""
    if total <= 0:
        return f"output MSE {mse:.3g}"
    ratio = mse / total
    return f"{ratio:.1f}x the plan's predicted output noise" if ratio >= 1 else f"{_pct(ratio)} more predicted output noise"


COUNTERFACTUAL_MAX_LAYERS = 200  # above this, explanations skip the re-solved alternatives


def _forced_psnr(space: _Space, budget: Budget, layer: int, option: int, buckets: int) -> float | None:
    """Predicted PSNR of the best plan that meets the budget with one layer forced to one option."""
    groups = [g if i != layer else [g[option]] for i, g in enumerate(space.groups)]
    costs = [[o.bytes for o in g] for g in groups]
    dmg = [[o.mse for o in g] for g in groups]
    lat_cap = budget.max_latency_ms - space.fixed_ms if budget.max_latency_ms else None
    if budget.max_bytes is not None and lat_cap is not None:
        ch = solve_two_budgets(costs, [[_ms(o) for o in g] for g in groups], dmg, budget.max_bytes - space.fixed,
                               lat_cap, buckets)
    elif budget.max_bytes is not None:
        ch = solve_mckp(costs, dmg, budget.max_bytes - space.fixed, buckets)
    else:
        ch = solve_mckp([[_ms(o) for o in g] for g in groups], dmg, lat_cap, buckets)
    if ch is None:
        return None
    return 10 * math.log10(space.peak ** 2 / ch.damage) if ch.damage > 0 and space.peak > 0 else math.inf


def _explain(space: _Space, picks: list[int], ranks: dict[str, float], lesson_notes: dict[str, list[tuple[str, str]]],
             lessons: str, budget: Budget, buckets: int) -> list[LayerChoice]:
    """Per layer, in words: why it got its setting. Its measured sensitivity against the median
    layer, its share of the plan's predicted noise, and the counterfactual: the best plan within
    the same budget if this layer took its least damaging smaller setting instead."""
    names, groups = space.names, space.groups
    total = sum(groups[i][j].mse for i, j in enumerate(picks)) or 0.0
    plan_psnr = space.psnr(picks)
    counterfactual = len(names) <= COUNTERFACTUAL_MAX_LAYERS
    out = []
    for i, (name, j) in enumerate(zip(names, picks)):
        o = groups[i][j]
        r = ranks.get(name)
        rel = "" if r is None else (f"{_times(r)} more sensitive than the median layer" if r >= 1
                                    else f"{_times(1 / r)} less sensitive than the median layer" if r > 0 else "insensitive")
        cheaper = [(jj, c) for jj, c in enumerate(groups[i]) if c.bytes < o.bytes]
        nxt_j, nxt = min(cheaper, key=lambda t: t[1].mse) if cheaper else (None, None)
        codes = [c for c, _ in lesson_notes.get(name, [])]
        alt = ""
        if nxt is not None:
            alt = (f"{'its' if o.setting.is_fp16 else 'the'} least damaging smaller setting ({nxt.setting.label}) "
                   f"would save {_human(o.bytes - nxt.bytes)} and add {_noise(nxt.mse - o.mse, total)}")
            cf = _forced_psnr(space, budget, i, nxt_j, buckets) if counterfactual else None
            if cf is not None:
                alt += f"; the best plan with it predicts {cf:.2f} dB vs {plan_psnr:.2f} dB"
        rules = ", ".join(dict.fromkeys(codes))
        if rel:
            rel += "; "
        elif r is None and lessons == "apply" and codes:
            rel = f"candidates restricted by playbook rule(s) {rules}; "
        if o.setting.is_fp16 and lessons == "apply" and len(groups[i]) == 1 and codes:
            why = f"kept at fp16: playbook rule(s) {rules} leave no candidate setting"
        elif o.setting.is_fp16:
            why = f"kept at fp16: {rel}" + (alt or "no candidate setting is smaller")
        else:
            why = (f"{o.setting.label}: {rel}{_pct(o.mse / total if total > 0 else 0.0)} of the plan's predicted "
                   f"output noise, saves {_human(groups[i][0].bytes - o.bytes)} vs fp16; "
                   + (alt or "the smallest candidate for this layer"))
        if lessons == "advise" and codes:
            why += f" (playbook {', '.join(dict.fromkeys(codes))} would restrict this layer; measured instead)"
        out.append(LayerChoice(layer=name, setting=o.setting.label, bytes=o.bytes, vs_median=r,
                               noise_share=(o.mse / total if total > 0 else 0.0), why=why,
                               restricted_by=list(dict.fromkeys(codes))))
    return out


def _build_plan(k: Knowledge, report: ModelReport, prep: Prepared, target: str, os: int, constraints: Constraints,
                space: _Space, picks: list[int], choices: list[LayerChoice],
                lesson_notes: dict[str, list[tuple[str, str]]], lessons: str, budget: Budget,
                chosen: Candidate, baseline: float) -> Plan:
    """A normal plan file: one step per technique, per-layer overrides, an explained trace."""
    from .engine import _predict, recommend

    names, groups = space.names, space.groups
    by_tech: dict[str, list[tuple[str, Setting]]] = {}
    for i, (name, j) in enumerate(zip(names, picks)):
        s = groups[i][j].setting
        if not s.is_fp16:
            by_tech.setdefault(s.technique, []).append((name, s))
    why_of = {c.layer: c.why for c in choices}
    steps: list[Step] = []
    for tech, members in by_tech.items():
        counts: dict[Setting, int] = {}
        for _, s in members:
            counts[s] = counts.get(s, 0) + 1
        common = max(counts, key=lambda s: counts[s])
        step = Step(technique=tech, slot=k.techniques[tech].slot, params={**common.p, "weight_threshold": 0},
                    layers=[n for n, _ in members],
                    op_name_params={n: s.p for n, s in members if s != common},
                    rules=sorted({c for n, _ in members for c, _ in lesson_notes.get(n, [])
                                  if lessons == "apply" and c in k.rules}),
                    why=f"budget search ({budget.basis}): per-layer settings chosen on measured sensitivities")
        steps.append(step)
    kept = [(n, why_of[n]) for i, (n, j) in enumerate(zip(names, picks)) if groups[i][j].setting.is_fp16]
    if kept and steps:
        for n, why in kept:
            codes = [c for c, _ in lesson_notes.get(n, []) if lessons == "apply"]
            steps[0].skipped.append(Skip(layer=n, reason=why, code=codes[0] if codes and len(
                groups[names.index(n)]) == 1 else SEARCH_CODE.lower()))
    pred_layers, before, after = _predict(k, report, steps, baseline)
    trace = [TraceEntry(code=SEARCH_CODE, status="fired", detail=c.why, layers=[c.layer]) for c in choices]
    if lessons == "apply":  # one entry per rule: which layers it restricted, with an example
        by_code: dict[str, list[tuple[str, str]]] = {}
        for name, items in lesson_notes.items():
            for code, text in items:
                by_code.setdefault(code, []).append((name, text))
        for code, hits in by_code.items():
            layers = list(dict.fromkeys(n for n, _ in hits))
            trace.append(TraceEntry(code=code, status="fired", layers=layers,
                                    detail=f"restricted the search on {len(layers)} layer(s) ({len(hits)} setting(s)), "
                                    f"e.g. {hits[0][1]}"))
    trace.append(TraceEntry(code=SEARCH_CODE, status="fired",
                            detail=(f"chose candidate '{chosen.name}' (objective: {chosen.objective}); measured PSNR "
                                    f"{chosen.measured.get('psnr_db', float('nan')):.2f} dB on {prep.n} samples; "
                                    f"estimate {chosen.estimate['bytes'] / MB:.4f} MB")))
    advisories: list[Advisory] = []
    try:
        advisories = recommend(report, target=target, os=os, constraints=constraints, knowledge=k).advisories
    except Exception:  # advice is a courtesy here: never let it block the searched plan
        advisories = []
    meets = None if budget.max_bytes is None else after <= budget.max_bytes + 1e-6
    return Plan(
        model=PlanModel(source=report.source, sha256=report.sha256, format=report.format,
                        total_params=report.total_params),
        target=PlanTarget(name=target, os=os), constraints=constraints,
        playbooks={name: pb.version for name, pb in k.playbooks.items()}, steps=steps, advisories=advisories,
        prediction=Prediction(bytes_before=before, bytes_after=after, ratio=before / after if after else 0.0,
                              meets_size_budget=meets),
        layers=pred_layers, trace=trace)


callable_module(__name__)  # `compressadvise.search(...)` works even once this module is imported
