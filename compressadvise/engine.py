"""The rule engine: playbooks + model facts + target + budgets -> an ordered, explained plan.

Semantics (documented in docs/guides/writing-playbooks.md):
- model-scope `compress` rules propose a step for their technique's slot (sparsity, weights,
  activations); per slot the highest priority wins, then the more specific condition (more
  `&&` terms), then the lower code. A step whose technique needs a mode the target does not
  support at the chosen OS is set aside ("unsupported") and the next candidate is tried.
- layer-scope rules run for every (step, layer) pair with `step.*` facts: `keep` leaves the
  layer out, `override` changes its parameters (a per-name override), `advise` notes it.
  On one layer the highest priority wins, with the same tie-breaks.
- the backend's own behaviour (weight_threshold, indivisible group/block sizes) is applied
  last and every such skip is listed, so nothing is skipped silently.
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable

from pydantic import ValidationError

from .analysis import LayerInfo, ModelReport, analyze
from .errors import InvalidKnowledge
from .expressions import cel
from .facts import step_facts
from .knowledge import CompiledRule, Knowledge, builtin, load_knowledge
from .schema import (COMPRESSIBLE, SLOTS, Advisory, Constraints, LayerPrediction, Plan, PlanModel,
                     PlanTarget, Prediction, Skip, Step, Target, TraceEntry)
from .sizing import NotApplicable, layer_bytes, pruned_fraction, weight_bytes

MB = 1e6


def model_facts(r: ModelReport) -> dict[str, Any]:
    share = lambda *types: sum(r.layer_types[t].share for t in types if t in r.layer_types)  # noqa: E731
    kurts = [x.stats.kurtosis for x in r.layers if x.stats and x.stats.kurtosis == x.stats.kurtosis]
    return {
        "params": r.total_params, "size_mb": r.total_bytes_fp16 / MB, "family": r.family,
        "format": r.format, "has_graph": r.has_graph, "num_layers": len(r.layers),
        "depthwise_layers": sum(1 for x in r.layers if x.type == "depthwise_conv"),
        "conv_share": share("conv", "depthwise_conv"), "linear_share": share("linear", "attention"),
        "embedding_share": r.embedding_share,
        "largest_layer_share": max((x.share for x in r.layers), default=0.0),
        "tied": bool(r.tied_groups), "max_kurtosis": max(kurts, default=0.0),
        "nonfinite_layers": sum(1 for x in r.layers if x.stats and x.stats.nonfinite),
        "macs": r.macs_total or 0,
    }


def layer_facts(x: LayerInfo, n_layers: int) -> dict[str, Any]:
    s = x.stats
    return {
        "name": x.name, "type": x.type, "params": x.params, "share": x.share,
        "elements": x.weight_elements, "out_channels": x.out_channels, "in_channels": x.in_channels,
        "groups": x.groups, "depth": x.index / max(n_layers - 1, 1), "is_first": x.is_first,
        "is_last": x.is_last, "is_boundary": x.is_boundary, "is_classifier": x.is_classifier,
        "is_embedding": x.is_embedding, "is_tied": x.tied_to is not None,
        "kurtosis": s.kurtosis if s and s.kurtosis == s.kurtosis else 0.0,
        "outlier_fraction": s.outlier_fraction if s else 0.0,
        "absmax_over_std": s.absmax_over_std if s and s.absmax_over_std == s.absmax_over_std else 0.0,
        "zero_fraction": s.zero_fraction if s else 0.0, "nonfinite": s.nonfinite if s else 0,
    }


def target_facts(t: Target, os: int) -> dict[str, Any]:
    return {
        "name": t.name, "vendor": t.vendor, "kind": t.kind, "os": os, "coreml": t.coreml,
        "supports": t.supports(os), "accelerates": t.accelerates(os),
        "jit_decompression": t.coreml and os >= 17, "has_cuda": t.kind == "nvidia_gpu",
        "int8_compute": _int8_compute(t),
    }


def _int8_compute(t: Target) -> bool:
    """A real int8 fast path (e.g. A17 Pro/M4 Neural Engine, tensor cores), from the figures."""
    i8, f16 = t.figures.get("peak_int8_tops"), t.figures.get("peak_fp16_tops")
    return bool(i8 and f16 and f16.value > 0 and i8.value >= 1.5 * f16.value)


def constraint_facts(c: Constraints, r: ModelReport) -> dict[str, Any]:
    return {
        "max_size_mb": float(c.max_size_mb), "max_latency_ms": float(c.max_latency_ms),
        "max_accuracy_drop": float(c.max_accuracy_drop), "data": c.data,
        "required_ratio": (r.total_bytes_fp16 / MB) / c.max_size_mb if c.max_size_mb else 0.0,
    }


def _constraints(values: dict[str, Any]) -> Constraints:
    """Budgets as given by a caller; NaN or inf (refused by the schema) is a one-line error."""
    try:
        return Constraints(**values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise InvalidKnowledge(f"constraints: '{key}': {err['msg']} (got {err.get('input')!r})") from None


def _rank(cr: CompiledRule) -> tuple:
    return (-cr.rule.priority, -cr.specificity(), cr.code)


@dataclass
class _Candidate:
    rule: CompiledRule
    params: dict[str, Any]


def _missing_modes(k: Knowledge, technique: str, params: dict[str, Any], supported: list[str]) -> list[str]:
    facts = {"step": step_facts(params, technique, k.techniques[technique].slot)}
    need = [mode for mode, cond in k.requirement_programs.get(technique, []) if cond is None or cond(facts)]
    return [m for m in need if m not in supported]


def _selected(cr: CompiledRule | None, layers: list[LayerInfo], ctx_for) -> list[LayerInfo]:
    sel = cr.rule.action.layers if cr else None
    types = (sel.types if sel and sel.types else COMPRESSIBLE)
    out = []
    for x in layers:
        if x.type not in types or len(x.weight_shape) < 2:
            continue
        if sel and sel.names and not any(fnmatch.fnmatchcase(x.name, p) for p in sel.names):
            continue
        if cr and cr.where and not cr.where(ctx_for(x)):
            continue
        out.append(x)
    return out


def recommend(
    model: ModelReport | Any = None,
    *,
    target: str = "ane-a17",
    os: int | None = None,
    constraints: Constraints | dict | None = None,
    knowledge: Knowledge | None = None,
    playbooks: Iterable[str] = (),
) -> Plan:
    """Evaluate the playbooks against a model's facts and return an explained plan."""
    k = knowledge or (load_knowledge(playbooks) if playbooks else builtin())
    report = model if isinstance(model, ModelReport) else analyze(model)
    tgt = k.target(target)
    os_major = tgt.default_os if os is None else int(os)
    if tgt.coreml and os_major and os_major < tgt.min_os:
        raise InvalidKnowledge(f"target {tgt.name} needs OS {tgt.min_os} or later (got {os_major})")
    c = constraints if isinstance(constraints, Constraints) else _constraints(constraints or {})
    base = {"model": model_facts(report), "target": target_facts(tgt, os_major),
            "constraints": constraint_facts(c, report)}
    trace: list[TraceEntry] = []
    advisories: list[Advisory] = []
    candidates: dict[str, list[_Candidate]] = defaultdict(list)

    base_ctx = _context(base)
    for cr in sorted((r for r in k.rules.values() if r.rule.scope == "model"), key=_rank):
        if not cr.condition(base_ctx):
            trace.append(TraceEntry(code=cr.code, status="not_matched",
                                    detail="false: " + " && ".join(cr.condition.failing(base))))
            continue
        a = cr.rule.action
        if a.kind == "advise":
            advisories.append(Advisory(code=cr.code, title=cr.rule.title, message=a.message or "",
                                       why=cr.rule.why))
            trace.append(TraceEntry(code=cr.code, status="fired", detail="advice added"))
        else:
            slot = k.techniques[a.technique].slot
            candidates[slot].append(_Candidate(cr, {**k.techniques[a.technique].defaults(), **a.params}))

    steps: list[tuple[Step, CompiledRule]] = []
    supported = tgt.supports(os_major)
    for slot in SLOTS:
        winner = None
        for cand in candidates.get(slot, []):
            tech = cand.rule.rule.action.technique
            if winner is not None:
                trace.append(TraceEntry(code=cand.rule.code, status="outranked",
                                        detail=f"{slot} step already chosen by {winner.rule.code} "
                                        f"(priority {winner.rule.rule.priority} vs {cand.rule.rule.priority})"))
                continue
            missing = _missing_modes(k, tech, cand.params, supported)
            if missing:
                trace.append(TraceEntry(code=cand.rule.code, status="unsupported",
                                        detail=f"{tech} needs {', '.join(missing)}, which {tgt.name} "
                                        f"does not support at OS {os_major}"))
                continue
            winner = cand
            trace.append(TraceEntry(code=cand.rule.code, status="fired",
                                    detail=f"{slot} step: {tech} {_fmt(cand.params)}"))
        if winner:
            a = winner.rule.rule.action
            steps.append((Step(technique=a.technique, slot=slot, params=winner.params,
                               rules=[winner.rule.code], why=winner.rule.rule.why), winner.rule))

    layer_rules = sorted((r for r in k.rules.values() if r.rule.scope == "layer"), key=_rank)
    n_layers = len(report.layers)
    lfacts = {x.name: layer_facts(x, n_layers) for x in report.layers}
    fired_on: dict[str, list[str]] = defaultdict(list)
    outranked_on: dict[str, list[str]] = defaultdict(list)
    layer_advice: dict[str, list[str]] = defaultdict(list)
    # Advice that does not depend on a step runs once over every weight layer, so it is given
    # even when no compression step fired.
    stepless = [r for r in layer_rules if r.rule.action.kind == "advise" and not _uses_step(r)]
    neutral = step_facts({}, "", "")
    for x in report.layers:
        ctx = _context({**base, "layer": lfacts[x.name], "step": neutral})
        for r in stepless:
            if r.condition(ctx):
                layer_advice[r.code].append(x.name)
    for step, cr in steps:
        sf = step_facts(step.params, step.technique, step.slot)
        ctx_for = lambda x, sf=sf: _context({**base, "layer": lfacts[x.name], "step": sf})  # noqa: E731
        contexts: dict[str, Any] = {}

        def ctx_for_cached(x, ctx_for=ctx_for, contexts=contexts):
            contexts[x.name] = ctx_for(x)
            return contexts[x.name]

        chosen = _selected(cr, report.layers, ctx_for_cached)
        applicable = [r for r in layer_rules if _applies(r, step) and r not in stepless]
        decided_here: set[str] = set()
        for x in chosen:
            ctx = contexts[x.name] if x.name in contexts else ctx_for(x)
            decided: CompiledRule | None = None
            for r in applicable:
                if not r.condition(ctx):
                    continue
                kind = r.rule.action.kind
                if kind == "advise":
                    if x.name not in layer_advice[r.code]:
                        layer_advice[r.code].append(x.name)
                    continue
                if decided is None:
                    decided = r
                    fired_on[r.code].append(x.name)
                    decided_here.add(r.code)
                else:
                    outranked_on[r.code].append(x.name)
            if decided is None:
                step.layers.append(x.name)
            elif decided.rule.action.kind == "keep":
                step.skipped.append(Skip(layer=x.name, reason=decided.rule.why, code=decided.code))
            else:
                step.layers.append(x.name)
                step.op_name_params[x.name] = dict(decided.rule.action.params)
        step.rules += sorted(decided_here - set(step.rules))

    for r in layer_rules:
        if r.code in fired_on or r.code in layer_advice:
            names = fired_on.get(r.code) or layer_advice.get(r.code, [])
            trace.append(TraceEntry(code=r.code, status="fired", layers=_uniq(names),
                                    detail=f"{r.rule.action.kind} on {len(_uniq(names))} layer(s)"))
        elif r.code in outranked_on:
            trace.append(TraceEntry(code=r.code, status="outranked", layers=_uniq(outranked_on[r.code]),
                                    detail="matched, but a higher-priority layer rule decided these layers"))
        else:
            trace.append(TraceEntry(code=r.code, status="not_matched",
                                    detail="no layer of any step matched: " + r.rule.when))
    for code, names in layer_advice.items():
        rr = k.rules[code].rule
        advisories.append(Advisory(code=code, title=rr.title, message=rr.action.message or "",
                                   why=rr.why, layers=names))

    plan_steps = [s for s, _ in steps]
    layers, before, after = _predict(k, report, plan_steps, tgt.baseline_bytes_per_param)
    meets = None if not c.max_size_mb else after / MB <= c.max_size_mb
    return Plan(
        model=PlanModel(source=report.source, sha256=report.sha256, format=report.format,
                        total_params=report.total_params),
        target=PlanTarget(name=tgt.name, os=os_major), constraints=c,
        playbooks={name: pb.version for name, pb in k.playbooks.items()},
        steps=plan_steps, advisories=advisories,
        prediction=Prediction(bytes_before=before, bytes_after=after,
                              ratio=before / after if after else 0.0, meets_size_budget=meets),
        layers=layers, trace=trace,
    )


def _uniq(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items() if k != "weight_threshold")


def _context(facts: dict[str, Any]) -> Any:
    """Convert the facts to CEL values once and reuse them for every rule on this layer:
    passing a plain dict converts all of it again on each evaluation (10x slower)."""
    ctx = cel.Context()
    ctx.update(facts)
    return ctx


def _uses_step(r: CompiledRule) -> bool:
    return any(f.startswith("step.") for f in r.condition.facts_used)


def _applies(r: CompiledRule, step: Step) -> bool:
    a = r.rule.action
    if a.technique and a.technique != step.technique:
        return False
    if a.slots and step.slot not in a.slots:
        return False
    return True


def effective_params(step: Step, layer: str) -> dict[str, Any]:
    return {**step.params, **step.op_name_params.get(layer, {})}


def _predict(k: Knowledge, report: ModelReport, steps: list[Step], baseline: float
             ) -> tuple[list[LayerPrediction], int, int]:
    """Per-layer bytes after all steps; fills each step's cumulative estimate and backend skips."""
    settings: dict[str, list[str]] = defaultdict(list)
    weight: dict[str, float] = {}
    sparsity: dict[str, float] = {}
    before = int(round(report.total_params * baseline))
    after = before
    by_name = {x.name: x for x in report.layers}
    for step in steps:
        kept = []
        for name in step.layers:
            x = by_name[name]
            params = effective_params(step, name)
            try:
                if step.slot == "sparsity":
                    s = pruned_fraction(params)
                    w = weight_bytes(k, step.technique, x, params, baseline, s)
                    sparsity[name] = s
                elif step.slot == "activations" and name in weight:
                    kept.append(name)  # weights already compressed by an earlier step
                    continue
                else:
                    w = weight_bytes(k, step.technique, x, params, baseline, sparsity.get(name, 0.0))
            except NotApplicable as e:
                step.skipped.append(Skip(layer=name, reason=str(e), code="backend"))
                step.op_name_params.pop(name, None)
                continue
            prev = weight.get(name)
            weight[name] = w
            old = layer_bytes(x, prev, baseline)
            new = layer_bytes(x, w, baseline)
            after += new - old
            settings[name].append(_describe(step, params))
            kept.append(name)
        step.layers = kept
        step.predicted_bytes_after = after
    preds = [
        LayerPrediction(name=x.name, setting=" + ".join(settings[x.name]) or "fp16 (unchanged)",
                        bytes_before=layer_bytes(x, None, baseline),
                        bytes_after=layer_bytes(x, weight.get(x.name), baseline))
        for x in report.layers
    ]
    return preds, before, after


def _describe(step: Step, p: dict[str, Any]) -> str:
    bits = f"{p['nbits']}-bit " if "nbits" in p else ""
    gran = p.get("granularity", "")
    extra = ""
    if gran == "per_grouped_channel":
        extra = f" gs={p.get('group_size')}"
    elif gran == "per_block":
        extra = f" bs={p.get('block_size')}"
    if step.slot == "sparsity":
        if p.get("pattern") == "n_m":
            return f"{step.technique} {p.get('n', 2)}:{p.get('m', 4)}"
        return f"{step.technique} {pruned_fraction(p):.0%}"
    return f"{bits}{step.technique} {gran}{extra}".strip()
