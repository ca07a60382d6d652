"""Budget-driven mixed-precision search over measured per-layer sensitivities.

1. Candidates: every compressible layer gets fp16 plus the settings its target runs at the
   chosen OS (the techniques' `requires` modes) that the backend can apply; playbook layer
   rules restrict them as `recommend` would (a `keep` drops the setting, an `override`
   replaces it), unless `lessons="advise"`, which only reports where a lesson and the
   measurement disagree.
2. Sensitivities: (layer, setting) pairs are measured alone (compressadvise.measure.sensitivity,
   cached); by default only those the budget can choose (plan.search_adaptive: every pair
   predicted without a forward pass, dominated ones skipped, the knapsack's picks measured on the
   first samples, close calls on all); `measure_all` measures every pair on all samples.
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
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal

from compressadvise.model.analysis import LayerInfo, ModelReport
from compressadvise.errors import BudgetMissed, InvalidKnowledge
from compressadvise.knowledge.base import Knowledge
from compressadvise.knowledge.schema import Constraints, Plan
from compressadvise.plan.budgets import SIZE_KEYS, plan_constraints, search_request
from compressadvise.plan.search_knapsack import (DEFAULT_BUCKETS, Choice, MultipleChoiceKnapsack, solve_mckp,  # re-exported
                              solve_two_budgets)
from compressadvise.plan.search_adaptive import Scope, adaptive_sensitivities
from compressadvise.plan.search_plan import COUNTERFACTUAL_MAX_LAYERS, SEARCH_CODE, _build_plan, _explain, _pct  # re-exported
from compressadvise.plan.search_results import MB, Budget, Candidate, FrontierPoint, LayerChoice, SearchResult  # re-exported
from compressadvise.plan.search_space import ROOFLINE, Option, _candidate_plans, _frontier, _point, _space, _Space  # re-exported
from compressadvise.measure.sensitivity import (Cache, Prepared, SensitivityReport, Setting, applicable, candidate_layers, default_grid,
                          measure, prepare, sensitivity, supported_settings)

if TYPE_CHECKING:
    from compressadvise.measure.device_profile import DeviceProfile, ProfileFit
    from compressadvise.measure.executors import Executor


def lesson_candidates(k: Knowledge, report: ModelReport, target: str, os: int, constraints: Constraints,
                      layers: list[LayerInfo], grid: list[Setting]
                      ) -> tuple[dict[str, list[Setting]], dict[str, list[tuple[str, str]]]]:
    """Per layer: the settings left after the playbooks' layer rules, and what each rule did.

    The engine decides (`engine.LayerRules`, the decision `recommend` makes): `keep` drops the
    setting, `override` merges its parameters in.
    """
    from compressadvise.plan.engine import LayerRules
    from compressadvise.measure.sensitivity import normalise

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
                merged = Setting.of(s.technique, **normalise({**s.p, **rules.params(decided, x, s.technique, s.p)}))
                kept.append(merged)
                if merged != s:
                    notes.setdefault(x.name, []).append((decided.code, f"turns {s.label} into {merged.label}: "
                                                         f"{decided.rule.why}"))
        allowed[x.name] = list(dict.fromkeys(kept))
    return allowed, notes


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
    max_accuracy_drop: float | None = None,
    data: str | None = None,
    constraints: Constraints | dict | None = None,
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
    measure_all: bool = False,
    device_profile: Any = None,
) -> SearchResult:
    """Choose a setting per layer that meets the budget with the least predicted damage,
    confirm the best few candidates by measurement, and return an explained plan.

    By default only what the budget can choose is measured (`search_adaptive`: predicted,
    dominated pairs skipped, the knapsack's picks measured on the first samples, close calls on
    all); `measure_all` measures every allowed (layer, setting) pair on all samples.
    Budgets are the keywords `recommend` takes (plan.budgets): one size budget and/or a latency one.
    device_profile (a path, dict or DeviceProfile for this target) calibrates the latency costs per
    op type; the result and the plan record the latency basis."""
    given = search_request(budget, constraints, max_size_mb=max_size_mb, bits_per_weight=bits_per_weight,
                           size_fraction=size_fraction, max_latency_ms=max_latency_ms,
                           max_accuracy_drop=max_accuracy_drop, data=data)  # before any work
    from compressadvise.knowledge.deployment import Deployment
    from compressadvise.knowledge.base import builtin, load_knowledge

    t0 = time.perf_counter()
    k = knowledge or (load_knowledge(playbooks) if playbooks else builtin())
    # resolved once; no min-OS refusal here (search never raised it: its advice call swallows it)
    dep = Deployment.resolve(k, target, os, check=False)
    tgt, os_major = dep.target, dep.os
    baseline = tgt.baseline_bytes_per_param
    profile = _profile(device_profile, target)  # before the measuring: a bad file fails fast
    prep = prepared or prepare(model, samples, max_samples=max_samples, trust_pickle=trust_pickle)
    report = prep.report
    fit, notes = _latency_fit(profile, report, tgt, os_major)
    budget = budget or Budget.of(**{n: given.get(n) for n in (*SIZE_KEYS, "max_latency_ms", "max_accuracy_drop")},
                                 report=report, baseline=baseline, latency_basis=fit.label if fit else ROOFLINE)
    limits = plan_constraints(given, (budget.max_bytes or 0.0) / MB, budget.max_latency_ms)
    grid, grid_notes = _target_grid(k, settings or default_grid(k=k), target, tgt.name, os_major)
    notes += grid_notes
    layers = candidate_layers(report)
    allowed, lesson_notes = _allowed(k, report, target, os_major, limits, layers, grid, lessons, baseline)
    pruning, guesses, memo = None, None, {}
    if measure_all:
        sens = _sensitivities(prep, k, allowed, grid, cache, executor, progress)
    else:
        scope = Scope(prep, k, layers, target, os_major, baseline, budget, buckets, grid, cache, executor, progress,
                      latency_fit=fit, latency_memo=memo)
        sens, guesses, pruning = adaptive_sensitivities(scope, allowed)
    space = _space(k, report, sens, layers, target, os_major, baseline, guesses, fit, memo)
    notes += _latency_notes(space, layers, budget, tgt.name) + _accuracy_notes(prep, budget)
    plans = _plans(space, budget, prep.logits, buckets)
    candidates, ran_full, chosen, picks = _confirm_best(prep, space, plans, budget, cache, executor, confirm, progress)
    ranks = {r.layer: r.vs_median for r in sens.ranking}
    layer_choices = _explain(space, picks, ranks, lesson_notes, lessons, budget, buckets)
    plan = _build_plan(k, report, prep, tgt.name, os_major, limits, space, picks,
                       layer_choices, lesson_notes, lessons, budget, chosen, baseline)
    frontier_size, frontier_lat = _frontiers(space, candidates, plans, buckets)
    notes += _closing_notes(plan, space) + sens.notes
    return SearchResult(
        plan=plan, budget=budget, chosen=chosen, candidates=candidates, frontier_size=frontier_size,
        frontier_latency=frontier_lat, layers=layer_choices, reference=sens.reference,
        evaluations={"single_layer": sens.evaluations, "single_layer_cached": sens.cache_hits,
                     "full_model": len(candidates), "full_model_run_now": ran_full},
        forward_passes=round(sens.forward_passes + ran_full, 2), pruning=pruning,
        sensitivity_wall_s=sens.wall_s, wall_s=time.perf_counter() - t0, lessons=lessons,
        latency_basis=space.latency_basis if space.lat_ok else None, notes=notes)


def _profile(device_profile: Any, target: str) -> "DeviceProfile | None":
    """The device profile, loaded and checked against the target (None without one)."""
    if device_profile is None:
        return None
    from compressadvise.measure.device_profile import checked_profile

    return checked_profile(device_profile, target)[0]


def _latency_fit(profile: "DeviceProfile | None", report: ModelReport, tgt: Any, os: int
                 ) -> tuple["ProfileFit | None", list[str]]:
    """The profile's per-op-type factors on the original's roofline, and what the fit noted."""
    if profile is None:
        return None, []
    from compressadvise.measure.device_profile import fit_for_planning

    fit = fit_for_planning(report, tgt, os, profile)
    if fit is None:
        return None, [f"the {profile.device} profile is not applied: the model has no roofline estimate on {tgt.name}"]
    return fit, [*fit.notes, f"latency costs {fit.label}: roofline scaled per op type, plus {fit.other_ms:.4g} ms "
                 "in ops the roofline does not cover"]


def _target_grid(k: Knowledge, grid: list[Setting], target: str, name: str, os: int) -> tuple[list[Setting], list[str]]:
    """The candidate settings the target runs at this OS, and a note when any were left out."""
    notes: list[str] = []
    grid, dropped = supported_settings(k, grid, target, os)
    if dropped:
        notes.append(f"{len(dropped)} candidate setting(s) need modes {name} does not support at OS "
                     f"{os} (e.g. {dropped[0].label}): left out")
    return grid, notes


def _allowed(k: Knowledge, report: ModelReport, target: str, os: int, constraints: Constraints,
             layers: list[LayerInfo], grid: list[Setting], lessons: str, baseline: float
             ) -> tuple[dict[str, list[Setting]], dict[str, list[tuple[str, str]]]]:
    """Per layer, the settings to measure (restricted by the lessons unless advising, then to what the
    backend can apply), and what each lesson did."""
    allowed, lesson_notes = lesson_candidates(k, report, target, os, constraints, layers, grid)
    if lessons == "advise":
        allowed = {x.name: grid for x in layers}
    allowed = {x.name: applicable(k, x, allowed[x.name], baseline) for x in layers}
    return allowed, lesson_notes


def _sensitivities(prep: Prepared, k: Knowledge, allowed: dict[str, list[Setting]], grid: list[Setting],
                   cache: Cache | None, executor: "Executor | None",
                   progress: Callable[[str, int, int], None] | None) -> SensitivityReport:
    """Each allowed (layer, setting) measured alone, with progress reported as "sensitivity"."""
    sens_progress = (lambda d, t: progress("sensitivity", d, t)) if progress else None
    return sensitivity(prepared=prep, knowledge=k, candidates=allowed, cache=cache, executor=executor,
                       progress=sens_progress, settings=grid)


def _latency_notes(space: _Space, layers: list[LayerInfo], budget: Budget, name: str) -> list[str]:
    """A note on layers the latency estimate leaves out; refuses a latency budget it cannot estimate."""
    notes: list[str] = []
    if space.lat_ok and (no_macs := [x.name for x in layers if not x.macs]):
        notes.append(f"{len(no_macs)} layer(s) without MACs (e.g. {no_macs[0]}) are not in the latency estimates")
    if budget.max_latency_ms and not space.lat_ok:
        raise InvalidKnowledge(f"no latency estimate for {name}: the target profile needs "
                               "memory_bandwidth_gbs and the model an example input (MACs)")
    return notes


def _plans(space: _Space, budget: Budget, logits: bool, buckets: int) -> list[tuple[str, str, list[int]]]:
    """The candidate plans to confirm; BudgetMissed when none fits."""
    plans = _candidate_plans(space, budget, logits, buckets)
    if not plans:
        smallest = space.fixed + sum(min(o.bytes for o in g) for g in space.groups)
        raise BudgetMissed(f"no plan meets the budget ({budget.basis}): the smallest candidate plan is "
                           f"{smallest / MB:.4f} MB (estimate)",
                           hint="loosen the budget or allow more aggressive settings (--techniques)")
    return plans


def _frontiers(space: _Space, candidates: list[Candidate], plans: list[tuple[str, str, list[int]]], buckets: int
               ) -> tuple[list[FrontierPoint], list[FrontierPoint]]:
    """The size frontier (with the confirmed candidates' measured points) and the latency frontier."""
    frontier_size = _frontier(space, by="bytes", buckets=buckets) + [
        _point(space, picks, measured=c.measured.get("psnr_db")) for c, (_, _, picks) in zip(candidates, plans)]
    frontier_size.sort(key=lambda f: (f.bytes, f.measured_psnr_db is None))
    frontier_lat = _frontier(space, by="latency", buckets=buckets) if space.lat_ok else []
    return frontier_size, frontier_lat


def _confirm_best(prep: Prepared, space: _Space, plans: list[tuple[str, str, list[int]]], budget: Budget,
                  cache: Cache | None, executor: "Executor | None", confirm: int,
                  progress: Callable[[str, int, int], None] | None
                  ) -> tuple[list[Candidate], int, Candidate, list[int]]:
    """Measure the first `confirm` candidate plans; the best one (fits first, then measured PSNR) and its picks."""
    conf_progress = (lambda d, t: progress("confirming", d, t)) if progress else None
    candidates, ran_full = _confirm(prep, space, plans[:max(1, confirm)], budget, cache,
                                    executor if confirm > 1 else None, conf_progress)
    best_i = max(range(len(candidates)), key=lambda i: (candidates[i].fits, _score(candidates[i].measured)))
    return candidates, ran_full, candidates[best_i], plans[best_i][2]


def _accuracy_notes(prep: Prepared, budget: Budget) -> list[str]:
    if budget.max_accuracy_drop is None or "accuracy" in prep.ref_metrics:
        return []
    return ["the accuracy budget is recorded in the plan, not checked here: the samples have no labels "
            "(`verify --max-accuracy-drop` with labels or --eval judges the build)"]


def _accuracy_ok(prep: Prepared, budget: Budget, measured: dict[str, float]) -> bool:
    """A candidate within the accuracy budget, where labels make it measurable (else: not refused)."""
    ref = prep.ref_metrics.get("accuracy")
    if budget.max_accuracy_drop is None or ref is None or "accuracy" not in measured:
        return True
    return ref - measured["accuracy"] <= budget.max_accuracy_drop + 1e-9


def _closing_notes(plan: Plan, space: _Space) -> list[str]:
    """Notes on an empty plan and on a missing latency estimate."""
    notes: list[str] = []
    if not plan.steps:
        notes.append("the budget is met without compressing anything: the plan has no steps")
    if not space.lat_ok:
        notes.append("latency vs fidelity not estimated: it needs per-layer MACs (a runnable model with an "
                     "example input) and the target's memory_bandwidth_gbs")
    return notes


def _score(m: dict[str, float]) -> tuple:
    psnr = m.get("psnr_db", -math.inf)
    return (psnr if psnr == psnr else -math.inf, m.get("accuracy", 0.0))


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
            budget.max_latency_ms is None or (lat is not None and lat <= budget.max_latency_ms + 1e-12)) and (
            _accuracy_ok(prep, budget, res["metrics"]))
        settings = space.settings(picks)
        out.append(Candidate(
            name=name, objective=objective, assignment={n: s.label for n, s in zip(space.names, settings)},
            settings={n: s.to_dict() for n, s in zip(space.names, settings) if not s.is_fp16},
            estimate={"bytes": float(size), "latency_ms": lat, "psnr_db": space.psnr(picks)},
            measured=res["metrics"], fits=fits))
    return out, ran



