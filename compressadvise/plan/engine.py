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
- `outcome` rules are not part of a plan: `next_moves` evaluates them after a verify run missed a
  budget; `LayerRules` decides one layer and candidate setting for search, as `recommend` does.
"""
from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

from compressadvise.model.analysis import LayerInfo, ModelReport, analyze
from compressadvise.errors import BadModel
from compressadvise.knowledge.expressions import cel, only_used
from compressadvise.knowledge.deployment import Deployment
from compressadvise.knowledge.facts import extract, step_facts
from compressadvise.knowledge.base import PLACEHOLDER, CompiledRule, Knowledge, builtin, load_knowledge
from compressadvise.knowledge.schema import (COMPRESSIBLE, SLOTS, UNSUPPORTED_KINDS, Advisory, Constraints, LayerPrediction, Plan, PlanModel,
                     PlanTarget, Skip, Step, Target, TraceEntry)
from compressadvise.measure.placement import for_report, placement_facts, placement_namespace
from compressadvise.measure.device_profile import checked_profile, plan_latency
from compressadvise.plan.decoder_facts import reads_plan_memory, with_memory_rules
from compressadvise.plan.budgets import budget_request, plan_constraints, size_mb
from compressadvise.plan.setting import Setting, stacked_label, unchanged_label
from compressadvise.plan.sizing import NotApplicable, layer_bytes, prediction, pruned_fraction

MB = 1e6


def model_facts(r: ModelReport) -> dict[str, Any]:
    return extract("model", r)


def layer_facts(x: LayerInfo, n_layers: int) -> dict[str, Any]:
    return extract("layer", x, n_layers)


def for_step(lf: dict[str, Any], sf: dict[str, Any]) -> dict[str, Any]:
    """Layer facts that depend on the step being decided: `out_group_divisor` for the step's group
    size (its extractor assumes 16, for rules evaluated outside a step)."""
    from compressadvise.knowledge.facts import group_divisor

    gs = int(sf.get("group_size") or 0)
    return {**lf, "out_group_divisor": group_divisor(int(lf.get("out_channels") or 0), gs) if gs else
            lf["out_group_divisor"]}


def override_params(params: dict[str, Any], facts: dict[str, Any]) -> dict[str, Any]:
    """An override's parameters with `{namespace.fact}` values read from the facts (a group size
    that divides this layer's channels, say); literal values as written."""
    def value(v: Any) -> Any:
        m = PLACEHOLDER.fullmatch(v) if isinstance(v, str) else None
        return facts[m.group(1)][m.group(2)] if m else v

    return {name: value(v) for name, v in params.items()}


def target_facts(t: Target | Deployment, os: int | None = None) -> dict[str, Any]:
    """Target facts of a deployment (or of a profile at an OS, resolved without the min-OS check)."""
    d = t if isinstance(t, Deployment) else Deployment.resolve(None, t, os, check=False)
    return extract("target", d)


def constraint_facts(c: Constraints, r: ModelReport) -> dict[str, Any]:
    return extract("constraints", c, r)


def rule_rank(cr: CompiledRule) -> tuple:
    return (-cr.rule.priority, -cr.specificity(), cr.code)


@dataclass
class _Candidate:
    rule: CompiledRule
    params: dict[str, Any]


def missing_modes(k: Knowledge, technique: str, params: dict[str, Any], supported: list[str]) -> list[str]:
    facts = {"step": step_facts(params, technique, k.techniques[technique].slot)}
    need = [mode for mode, cond in k.requirement_programs.get(technique, []) if cond is None or cond(facts)]
    return [m for m in need if m not in supported]


DEAD_REASON = "no output depends on it (the graph never reads it into an output): nothing to gain"


def _selected(cr: CompiledRule | None, layers: list[LayerInfo], ctx_for) -> list[LayerInfo]:
    sel = cr.rule.action.layers if cr else None
    types = (sel.types if sel and sel.types else COMPRESSIBLE)
    out = []
    for x in layers:
        if x.type not in types or len(x.weight_shape) < 2 or x.is_dead:
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
    max_size_mb: float | None = None, size_fraction: float | None = None, bits_per_weight: float | None = None,
    max_latency_ms: float | None = None, max_accuracy_drop: float | None = None, data: str | None = None,
    knowledge: Knowledge | None = None,
    playbooks: Iterable[str] = (),
    measure: bool = False,
    samples: Any = None,
    min_psnr: float | None = None,
    device_profile: Any = None, context_length: int | None = None,
) -> Plan:
    """Evaluate the playbooks against a model's facts and return an explained plan.

    Budgets are keywords, as `search` takes them (plan.budgets); `constraints` (a dict or a
    Constraints, 0 = none) still works. measure=True applies the plan in memory to the deployable
    weights and measures it on `samples` (random inputs when None: weak evidence), choosing a
    gentler setting when it misses the fidelity floor (`plan.fidelity` says what was measured);
    it needs the model, not a report. device_profile (a path, dict or DeviceProfile) adds the plan's
    latency before/after on the target, calibrated per op type (`prediction.latency_basis`); a causal LM's
    KV cache at `context_length` tokens (default: its position limit) joins the weights in `plan.memory`."""
    given = budget_request(constraints, max_size_mb=max_size_mb, size_fraction=size_fraction,  # before any work
                           bits_per_weight=bits_per_weight, max_latency_ms=max_latency_ms,
                           max_accuracy_drop=max_accuracy_drop, data=data)
    k = knowledge or (load_knowledge(playbooks) if playbooks else builtin())
    if device_profile is not None:  # a bad file, or one for another target, fails before any work
        device_profile, _ = checked_profile(device_profile, target)
    if measure and isinstance(model, ModelReport):
        raise BadModel("measuring a plan needs the model itself, not its analysis report",
                       hint="pass the loaded model (or its path) to recommend")
    from compressadvise.plan.ways import ways_forward
    from compressadvise.model.loading import LoadedModel, load_model

    loaded = (model if isinstance(model, LoadedModel) else load_model(model)) if measure else None
    report = analyze(loaded) if loaded is not None else model if isinstance(model, ModelReport) else analyze(model)
    plan = _recommend(report, target, os, plan_constraints(given, size_mb(given, report)), k)
    if loaded is not None:
        from compressadvise.plan.measured import measure_plan

        plan = measure_plan(plan, loaded, report, k, samples=samples, min_psnr=min_psnr)
    if device_profile is not None:  # last: measuring may change the settings the latency depends on
        plan = plan_latency(plan, report, k, device_profile)
    plan = with_memory_rules(plan, report, context_length, k)  # a decoder's KV cache, and the rules on it
    return plan.model_copy(update={"ways_forward": ways_forward(plan, report, k)})


def _recommend(report: ModelReport, target: str, os: int | None, c: Constraints, k: Knowledge) -> Plan:
    dep = Deployment.resolve(k, target, os)  # default OS and min-OS check, once
    placed = for_report(report, dep.target)
    base = {"model": model_facts(report), "target": target_facts(dep),
            "constraints": constraint_facts(c, report), "placement": placement_namespace(placed)}
    trace: list[TraceEntry] = []
    advisories: list[Advisory] = []
    candidates = _model_rules(k, base, trace, advisories)
    steps = _choose_steps(k, candidates, dep, trace, eager=has_code(report))
    _layer_rules(k, report, base, steps, trace, advisories)
    plan_steps = [s for s, _ in steps]
    layers, before, after = predict_layers(k, report, plan_steps, dep.target.baseline_bytes_per_param,
                                           dep.target, dep.os)
    return Plan(
        model=PlanModel(source=report.source, sha256=report.sha256, format=report.format,
                        total_params=report.total_params),
        target=PlanTarget(name=dep.target.name, os=dep.os), constraints=c,
        playbooks={name: pb.version for name, pb in k.playbooks.items()},
        steps=plan_steps, advisories=advisories,
        prediction=prediction(before, after, c),
        layers=layers, trace=trace, placement=placed,
    )


def _model_rules(k: Knowledge, base: dict[str, Any], trace: list[TraceEntry],
                 advisories: list[Advisory]) -> dict[str, list[_Candidate]]:
    """Model-scope rules: advice is added at once; compress rules become candidates per slot."""
    candidates: dict[str, list[_Candidate]] = defaultdict(list)
    base_ctx = _context(base)
    for cr in sorted((r for r in k.rules.values() if r.rule.scope == "model" and not reads_plan_memory(r)), key=rule_rank):
        if not cr.condition(base_ctx):
            trace.append(TraceEntry(code=cr.code, status="not_matched",
                                    detail="false: " + " && ".join(cr.condition.failing(base))))
            continue
        a = cr.rule.action
        if a.kind == "advise":
            advisories.append(Advisory(code=cr.code, title=cr.rule.title, message=fill(a.message or "", base),
                                       why=cr.rule.why))
            trace.append(TraceEntry(code=cr.code, status="fired", detail="advice added"))
        else:
            slot = k.techniques[a.technique].slot
            candidates[slot].append(_Candidate(cr, {**k.techniques[a.technique].defaults(), **a.params}))
    return candidates


NO_CODE_FORMATS = ("exported", "torchscript", "state_dict", "safetensors")  # programs and weights, no nn.Modules


def has_code(report: ModelReport) -> bool:
    """The model comes as eager code (nn.Modules): what torch-side backends (torchao) compress."""
    return report.format not in NO_CODE_FORMATS and (report.format != "hf_folder" or report.has_graph)


def _choose_steps(k: Knowledge, candidates: dict[str, list[_Candidate]], dep: Deployment,
                  trace: list[TraceEntry], *, eager: bool = True) -> list[tuple[Step, CompiledRule]]:
    """Per slot, the best-ranked candidate whose modes the deployment supports (and, on a target
    that ships the torch model, that the input's form lets a torch backend compress)."""
    steps: list[tuple[Step, CompiledRule]] = []
    tgt, os_major = dep.target, dep.os
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
            if not tgt.coreml and not eager:
                trace.append(TraceEntry(code=cand.rule.code, status="unsupported", detail=(
                    f"{tech} on {tgt.name} runs a torch backend on the model's nn.Modules; the input is a program or "
                    "weights without them: pass the model as module:function, or compress before exporting")))
                continue
            missing = missing_modes(k, tech, cand.params, supported)
            if missing:
                trace.append(TraceEntry(code=cand.rule.code, status="unsupported",
                                        detail=f"{tech} needs {', '.join(missing)}, which {tgt.name} "
                                        f"does not support at OS {os_major}"))
                continue
            winner = cand
            trace.append(TraceEntry(code=cand.rule.code, status="fired",
                                    detail=f"{slot} step: {tech} {_fmt(_shown(k, tech, cand.params))}"))
        if winner:
            a = winner.rule.rule.action
            steps.append((Step(technique=a.technique, slot=slot, params=winner.params,
                               rules=[winner.rule.code], why=winner.rule.rule.why), winner.rule))
    return steps


@dataclass
class _LayerTally:
    """Which layers each layer rule decided, lost or advised on, for the trace and advisories."""

    fired_on: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    outranked_on: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    advice: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))


def _layer_rules(k: Knowledge, report: ModelReport, base: dict[str, Any],
                 steps: list[tuple[Step, CompiledRule]], trace: list[TraceEntry],
                 advisories: list[Advisory]) -> None:
    """Layer-scope rules: keep/override decide each (step, layer); advice is collected."""
    layer_rules = sorted((r for r in k.rules.values() if r.rule.scope == "layer"), key=rule_rank)
    n_layers = len(report.layers)
    lfacts = {x.name: layer_facts(x, n_layers) for x in report.layers}
    tally = _LayerTally()
    # Advice that does not depend on a step runs once over every weight layer, so it is given
    # even when no compression step fired.
    stepless = [r for r in layer_rules if r.rule.action.kind == "advise" and not _uses_step(r)]
    neutral = step_facts({}, "", "")
    for x in report.layers:
        ctx = _context({**base, "layer": for_step(lfacts[x.name], neutral), "step": neutral})
        for r in stepless:
            if r.condition(ctx):
                tally.advice[r.code].append(x.name)
    for step, cr in steps:
        applicable = [r for r in layer_rules if _applies(r, step) and r not in stepless]
        _decide_step_layers(step, cr, report, base, lfacts, applicable, tally)
    _trace_layer_rules(layer_rules, tally, trace)
    for code, names in tally.advice.items():
        rr = k.rules[code].rule
        advisories.append(Advisory(code=code, title=rr.title, message=rr.action.message or "",
                                   why=rr.why, layers=names))


def _match(applicable: list[CompiledRule], ctx: Any
           ) -> tuple[CompiledRule | None, list[CompiledRule], list[CompiledRule]]:
    """The one layer-rule decision (recommend's and `LayerRules.decide`'s): of the rules that
    match, in rank order, the first keep/override decides, later ones are outranked, and every
    matching advise rule is advice."""
    decided: CompiledRule | None = None
    outranked: list[CompiledRule] = []
    advice: list[CompiledRule] = []
    for r in applicable:
        if not r.condition(ctx):
            continue
        if r.rule.action.kind == "advise":
            advice.append(r)
        elif decided is None:
            decided = r
        else:
            outranked.append(r)
    return decided, outranked, advice


def _decide_step_layers(step: Step, cr: CompiledRule, report: ModelReport, base: dict[str, Any],
                        lfacts: dict[str, dict[str, Any]], applicable: list[CompiledRule],
                        tally: _LayerTally) -> None:
    """Fill the step's layers, skips and per-layer overrides from the highest-ranked rule per layer."""
    sf = step_facts(step.params, step.technique, step.slot)
    contexts: dict[str, Any] = {}

    def facts_for(x: LayerInfo) -> dict[str, Any]:
        return {**base, "layer": for_step(lfacts[x.name], sf), "step": sf}

    def ctx_for(x: LayerInfo) -> Any:
        if x.name not in contexts:
            contexts[x.name] = _context(facts_for(x))
        return contexts[x.name]

    decided_here: set[str] = set()
    sel = cr.rule.action.layers if cr else None
    if not (sel and sel.types):  # a layer kind no backend compresses: said per layer, not left out silently
        step.skipped += [Skip(layer=x.name, reason=UNSUPPORTED_KINDS[x.type], code="backend")
                         for x in report.layers if x.type in UNSUPPORTED_KINDS and len(x.weight_shape) >= 2]
    step.skipped += [Skip(layer=x.name, reason=DEAD_REASON, code="graph") for x in report.layers
                     if x.is_dead and x.type in COMPRESSIBLE and len(x.weight_shape) >= 2]
    for x in _selected(cr, report.layers, ctx_for):
        decided, outranked, advice = _match(applicable, ctx_for(x))
        for r in advice:
            if x.name not in tally.advice[r.code]:
                tally.advice[r.code].append(x.name)
        for r in outranked:
            tally.outranked_on[r.code].append(x.name)
        if decided is not None:
            tally.fired_on[decided.code].append(x.name)
            decided_here.add(decided.code)
        if decided is None:
            step.layers.append(x.name)
        elif decided.rule.action.kind == "keep":
            step.skipped.append(Skip(layer=x.name, reason=decided.rule.why, code=decided.code))
        else:
            step.layers.append(x.name)
            step.op_name_params[x.name] = override_params(decided.rule.action.params, facts_for(x))
    step.rules += sorted(decided_here - set(step.rules))


def _trace_layer_rules(layer_rules: list[CompiledRule], tally: _LayerTally, trace: list[TraceEntry]) -> None:
    for r in layer_rules:
        if r.code in tally.fired_on or r.code in tally.advice:
            names = tally.fired_on.get(r.code) or tally.advice.get(r.code, [])
            trace.append(TraceEntry(code=r.code, status="fired", layers=_uniq(names),
                                    detail=f"{r.rule.action.kind} on {len(_uniq(names))} layer(s)"))
        elif r.code in tally.outranked_on:
            trace.append(TraceEntry(code=r.code, status="outranked", layers=_uniq(tally.outranked_on[r.code]),
                                    detail="matched, but a higher-priority layer rule decided these layers"))
        else:
            trace.append(TraceEntry(code=r.code, status="not_matched",
                                    detail="no layer of any step matched: " + r.rule.when))


def _uniq(xs: list[str]) -> list[str]:
    return list(dict.fromkeys(xs))


def _shown(k: Knowledge, technique: str, params: dict[str, Any]) -> dict[str, Any]:
    """Only the parameters that matter (no group_size on a per-tensor step), in the step's order."""
    keep = Setting.resolve(k.techniques[technique], params).p
    return {name: v for name, v in params.items() if name in keep}


KEY_PARAMS = ("nbits", "granularity", "group_size", "block_size", "sparsity", "mode")


def step_text(k: Knowledge, step: Step) -> str:
    """A step's parameters as a person reads them: those its setting uses, without the defaults
    nobody chose (lut_dtype=fp16, weight_threshold...), the key ones always."""
    defaults = k.techniques[step.technique].defaults() if step.technique in k.techniques else {}
    shown = _shown(k, step.technique, step.params) if step.technique in k.techniques else dict(step.params)
    return _fmt({n: v for n, v in shown.items() if n in KEY_PARAMS or defaults.get(n) != v})


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


def effective_params(k: Knowledge, step: Step, layer: LayerInfo) -> dict[str, Any]:
    """What the backend gets on this layer: the resolved setting plus backend parameters."""
    return step.setting_for(layer, k.techniques[step.technique]).all_params


def predict_layers(k: Knowledge, report: ModelReport, steps: list[Step], baseline: float,
                   target: Target | None = None, os: int = 0) -> tuple[list[LayerPrediction], int, int]:
    """Per-layer bytes after all steps; fills each step's cumulative estimate and backend skips.
    With a target: layer types it stores wider on this OS (its `storage`) count at their width."""
    settings: dict[str, list[Setting]] = defaultdict(list)
    weight: dict[str, float] = {}
    sparsity: dict[str, float] = {}
    width = {x.name: target.stored_bytes(x.module_type, os) for x in report.layers} if target is not None else {}
    width = {n: b for n, b in width.items() if b != baseline}
    before = int(round(report.stored() * baseline + sum((width[x.name] - baseline) * x.params for x in report.layers
                                                         if x.name in width and not x.is_dead)))
    after = before
    by_name = {x.name: x for x in report.layers}
    for step in steps:
        kept = []
        tech = k.techniques[step.technique]
        for name in step.layers:
            x = by_name[name]
            s = step.setting_for(x, tech)
            try:
                if step.slot == "sparsity":
                    frac = pruned_fraction(s.p)
                    w = s.weight_bytes(k, x, baseline, frac)
                    sparsity[name] = frac
                elif step.slot == "activations" and name in weight:
                    kept.append(name)  # weights already compressed by an earlier step
                    continue
                else:
                    w = s.weight_bytes(k, x, baseline, sparsity.get(name, 0.0))
            except NotApplicable as e:
                step.skipped.append(Skip(layer=name, reason=str(e), code="backend"))
                step.op_name_params.pop(name, None)
                continue
            prev = weight.get(name)
            weight[name] = w
            old = layer_bytes(x, prev, width.get(name, baseline))
            new = layer_bytes(x, w, width.get(name, baseline))
            after += new - old
            settings[name].append(s)
            kept.append(name)
        step.layers = kept
        step.predicted_bytes_after = after
    preds = [
        LayerPrediction(name=x.name, setting=(stacked_label(settings[x.name]) if settings[x.name]
                                              else unchanged_label(width.get(x.name, baseline))),
                        settings=[s.to_dict() for s in settings[x.name]],
                        bytes_before=layer_bytes(x, None, width.get(x.name, baseline)),
                        bytes_after=layer_bytes(x, weight.get(x.name), width.get(x.name, baseline)))
        for x in report.layers
    ]
    return preds, before, after


def _describe(k: Knowledge, step: Step, layer: LayerInfo) -> str:
    """A step's label on one layer: the resolved Setting's (the one label builder)."""
    return step.setting_for(layer, k.techniques[step.technique]).label


# ---------------------------------------------------------------- next moves after a miss
@dataclass(frozen=True)
class Move:
    """One recommended next move, from an `outcome` rule (cited like any other rule)."""
    code: str
    message: str
    step: int = 0  # 1-based plan step it changes; 0: the plan as a whole


@dataclass(frozen=True)
class NextMoves:
    moves: tuple[Move, ...]
    trace: tuple[TraceEntry, ...]

    def messages(self) -> list[str]:
        return [m.message for m in self.moves]


def next_moves(plan: Plan, report: ModelReport, missed: Iterable[str], knowledge: Knowledge | None = None,
               *, data: str = "none", worst_layer: str | None = None) -> NextMoves:
    """Evaluate the `outcome` rules for the budgets a verify run missed, in code order; a rule
    whose condition reads step facts runs once per plan step (its message names the step)."""
    k = knowledge or builtin()
    tgt = k.target(plan.target.name)
    missed = list(missed)
    rules = sorted((r for r in k.rules.values() if r.rule.scope == "outcome"), key=lambda r: r.code)
    if not missed:
        return NextMoves((), tuple(TraceEntry(code=r.code, status="not_matched", detail="no budget was missed")
                                   for r in rules))
    base = {"model": model_facts(report), "target": target_facts(tgt, plan.target.os),
            "constraints": constraint_facts(plan.constraints, report), "placement": placement_facts(report, tgt)}
    outcome = _outcome_facts(plan, report, missed, data, worst_layer)
    moves: list[Move] = []
    trace: list[TraceEntry] = []
    for r in rules:
        views = ([(i, s) for i, s in enumerate(plan.steps, 1)] if _uses_step(r) else [(0, None)])
        fired = [m for i, s in views if (m := _move(k, r, base, outcome, i, s))]
        moves += fired
        trace.append(TraceEntry(code=r.code, status="fired", detail=f"{len(fired)} move(s)") if fired else
                     TraceEntry(code=r.code, status="not_matched", detail="false: " + r.rule.when))
    return NextMoves(tuple(moves), tuple(trace))


def fill(message: str, facts: dict[str, Any]) -> str:
    """A rule message with its `{namespace.fact}` placeholders replaced by the facts' values."""
    def value(m: Any) -> str:
        v = facts[m.group(1)][m.group(2)]
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    return " ".join(PLACEHOLDER.sub(value, message).split())


def _move(k: Knowledge, r: CompiledRule, base: dict[str, Any], outcome: dict[str, Any], number: int,
          step: Step | None) -> Move | None:
    sf = step_facts(step.params, step.technique, step.slot) if step else step_facts({}, "", "")
    facts = {**base, "step": sf, "outcome": {**outcome, "step": number, **nbits_ladder(k, step)}}
    if not r.condition(_context(facts)):
        return None
    return Move(code=r.code, message=fill(r.rule.action.message or "", facts), step=number)


def nbits_ladder(k: Knowledge, step: Step | None) -> dict[str, int]:
    """The neighbouring nbits the step's technique accepts (its YAML choices; 0 when none)."""
    spec = k.techniques[step.technique].parameters.get("nbits") if step and step.technique in k.techniques else None
    nbits = int(step.params.get("nbits", 0) or 0) if step else 0
    choices = sorted(spec.choices or []) if spec and nbits else []
    lower = [c for c in choices if c < nbits]
    higher = [c for c in choices if c > nbits]
    return {"nbits_lower": lower[-1] if lower else 0, "nbits_higher": higher[0] if higher else 0}


def _outcome_facts(plan: Plan, report: ModelReport, missed: list[str], data: str,
                   worst_layer: str | None) -> dict[str, Any]:
    aliases = {x.name for x in report.layers if x.tied_to}  # stored once, at the owner: not left out
    kept = sorted({sk.layer for s in plan.steps for sk in s.skipped} - aliases)
    return {
        "missed": missed, "data": data, "step": 0,
        "weight_steps": sum(1 for s in plan.steps if s.slot == "weights"),
        "activation_steps": sum(1 for s in plan.steps if s.slot == "activations"),
        "sensitive_layer": worst_layer or _most_kurtotic(plan, report) or "",
        "kept_layers": len(kept), "kept_preview": ", ".join(kept[:4]), "nbits_lower": 0, "nbits_higher": 0}


def _most_kurtotic(plan: Plan, report: ModelReport) -> str | None:
    """Without a measurement, the compressed layer with the heaviest tails looks most sensitive."""
    compressed = {n for s in plan.steps for n in s.layers}
    ranked = sorted((x for x in report.layers if x.name in compressed and x.stats),
                    key=lambda x: -(x.stats.kurtosis if x.stats.kurtosis == x.stats.kurtosis else 0.0))
    return ranked[0].name if ranked else None


# ---------------------------------------------------------------- layer decisions, one layer at a time
@dataclass(frozen=True)
class LayerRules:
    """The playbooks' per-layer decision for one model, deployment and budget, as `recommend`
    makes it: the highest-ranked matching `keep`/`override` layer rule that applies to the step
    decides (advice never does). Build once (`of`), then ask per layer and candidate setting."""
    base: dict[str, Any]
    rules: tuple[CompiledRule, ...]
    slots: dict[str, str]  # technique -> slot
    n_layers: int
    used: frozenset[str]  # the facts the deciding rules read: only those are converted per decision
    _layers: dict[str, dict[str, Any]] = field(default_factory=dict, compare=False)  # each layer's facts, once

    @classmethod
    def of(cls, k: Knowledge, report: ModelReport, target: str, os: int, constraints: Constraints) -> "LayerRules":
        base = {"model": model_facts(report), "target": target_facts(k.target(target), os),
                "constraints": constraint_facts(constraints, report),
                "placement": placement_facts(report, k.target(target))}
        ranked = sorted((r for r in k.rules.values() if r.rule.scope == "layer"), key=rule_rank)
        deciding = tuple(r for r in ranked if r.rule.action.kind != "advise")
        return cls(base, deciding, {n: t.slot for n, t in k.techniques.items()}, len(report.layers),
                   frozenset(f for r in deciding for f in r.condition.facts_used))

    def decide(self, layer: LayerInfo, technique: str, params: dict[str, Any]) -> CompiledRule | None:
        """The rule that keeps this layer out of (or overrides) this step; None: the setting stands."""
        step = Step(technique=technique, slot=self.slots[technique], params=params)
        ctx = _context(only_used(self._facts(layer, technique, params), self.used))
        return _match([r for r in self.rules if _applies(r, step)], ctx)[0]

    def params(self, decided: CompiledRule, layer: LayerInfo, technique: str, params: dict[str, Any]) -> dict[str, Any]:
        """The override's parameters for this layer and setting (fact placeholders read)."""
        return override_params(decided.rule.action.params, self._facts(layer, technique, params))

    def _facts(self, layer: LayerInfo, technique: str, params: dict[str, Any]) -> dict[str, Any]:
        sf = step_facts(params, technique, self.slots[technique])
        lf = self._layers.get(layer.name) or self._layers.setdefault(layer.name, layer_facts(layer, self.n_layers))
        return {**self.base, "layer": for_step(lf, sf), "step": sf}
