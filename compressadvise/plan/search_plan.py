"""Search explanations and the searched plan file: why each layer got its setting, steps, trace."""
from __future__ import annotations

import math

from compressadvise.model.analysis import ModelReport
from compressadvise.knowledge.base import Knowledge
from compressadvise.knowledge.schema import Advisory, Constraints, Plan, PlanModel, PlanTarget, Prediction, Skip, Step, TraceEntry
from compressadvise.plan.search_knapsack import solve_mckp, solve_two_budgets
from compressadvise.plan.search_results import MB, Budget, Candidate, LayerChoice
from compressadvise.plan.search_space import ROOFLINE, _ms, _Space
from compressadvise.measure.sensitivity import Prepared, Setting

SEARCH_CODE = "SEARCH"


def _human(n: float) -> str:
    from compressadvise.ui.render import human_bytes

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
                   f"would save {_human(o.bytes - nxt.bytes)} and add {_noise(nxt.mse - o.mse, total)}"
                   + ("" if nxt.measured else " (predicted, not measured: the search never needed it)"))
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
    from compressadvise.plan.engine import predict_layers, recommend

    steps = _plan_steps(k, space, picks, choices, lesson_notes, lessons, budget)
    pred_layers, before, after = predict_layers(k, report, steps, baseline, k.target(target), os)
    trace = _plan_trace(prep, choices, lesson_notes, lessons, chosen)
    advisories: list[Advisory] = []
    try:
        advisories = recommend(report, target=target, os=os, constraints=constraints, knowledge=k).advisories
    except Exception:  # advice is a courtesy here: never let it block the searched plan
        advisories = []
    meets = None if budget.max_bytes is None else after <= budget.max_bytes + 1e-6
    lat: dict = {}
    if space.lat_ok and (budget.max_latency_ms or space.latency_basis != ROOFLINE):  # what the plan was chosen on
        lat = {"latency_ms_before": space.latency([0] * len(space.groups)), "latency_ms_after": space.latency(picks),
               "latency_basis": space.latency_basis}
    return Plan(
        model=PlanModel(source=report.source, sha256=report.sha256, format=report.format,
                        total_params=report.total_params),
        target=PlanTarget(name=target, os=os), constraints=constraints,
        playbooks={name: pb.version for name, pb in k.playbooks.items()}, steps=steps, advisories=advisories,
        prediction=Prediction(bytes_before=before, bytes_after=after, ratio=before / after if after else 0.0,
                              meets_size_budget=meets, **lat),
        layers=pred_layers, trace=trace)


def _plan_steps(k: Knowledge, space: _Space, picks: list[int], choices: list[LayerChoice],
                lesson_notes: dict[str, list[tuple[str, str]]], lessons: str, budget: Budget) -> list[Step]:
    """One step per technique (its most common setting, the others as per-layer overrides); fp16 layers
    are recorded as skips of the first step."""
    names, groups = space.names, space.groups
    members = [(name, groups[i][j].setting) for i, (name, j) in enumerate(zip(names, picks))
               if not groups[i][j].setting.is_fp16]
    why_of = {c.layer: c.why for c in choices}
    steps = technique_steps(k, members, f"budget search ({budget.basis}): per-layer settings chosen on measured "
                            "sensitivities")
    for step in steps:
        step.rules = sorted({c for n in step.layers for c, _ in lesson_notes.get(n, [])
                             if lessons == "apply" and c in k.rules})
    kept = [(n, why_of[n]) for i, (n, j) in enumerate(zip(names, picks)) if groups[i][j].setting.is_fp16]
    if kept and steps:
        for n, why in kept:
            codes = [c for c, _ in lesson_notes.get(n, []) if lessons == "apply"]
            steps[0].skipped.append(Skip(layer=n, reason=why, code=codes[0] if codes and len(
                groups[names.index(n)]) == 1 else SEARCH_CODE.lower()))
    return steps


def technique_steps(k: Knowledge, members: list[tuple[str, Setting]], why: str) -> list[Step]:
    """One step per technique in order of first use: its most common setting (the first of equals)
    as params, the others as per-layer overrides; weight_threshold 0, so every chosen layer is
    compressed whatever its size. Search and the what-if (plan.whatif) build their plans here."""
    by_tech: dict[str, list[tuple[str, Setting]]] = {}
    for name, s in members:
        by_tech.setdefault(s.technique, []).append((name, s))
    steps: list[Step] = []
    for tech, group in by_tech.items():
        counts: dict[Setting, int] = {}
        for _, s in group:
            counts[s] = counts.get(s, 0) + 1
        common = max(counts, key=lambda s: counts[s])
        steps.append(Step(technique=tech, slot=k.techniques[tech].slot, params={**common.p, "weight_threshold": 0},
                          layers=[n for n, _ in group], op_name_params={n: s.p for n, s in group if s != common},
                          why=why))
    return steps


def _plan_trace(prep: Prepared, choices: list[LayerChoice], lesson_notes: dict[str, list[tuple[str, str]]],
                lessons: str, chosen: Candidate) -> list[TraceEntry]:
    """The explained trace: each layer's choice, what each playbook rule restricted, the chosen candidate."""
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
    return trace
