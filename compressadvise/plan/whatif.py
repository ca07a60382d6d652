"""What-if edits of a plan: change a step's parameters or kept layers and re-predict its size.

Used by the walkthrough to show the predicted size change as the user edits each step, and by
the report's What-if section (per layer, one of the settings search would consider there:
`layer_options`, `plan_for_choices`). Every figure here is an estimate from the technique size
formulas (the same ones `recommend` uses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compressadvise.model.analysis import LayerInfo, ModelReport
from compressadvise.errors import InvalidKnowledge
from compressadvise.knowledge.base import Knowledge, builtin
from compressadvise.knowledge.schema import LayerPrediction, Plan, Prediction, Skip, Step, TraceEntry
from compressadvise.plan.setting import Setting, stacked_key

USER_KEEP = "user"  # Skip.code of layers the user chose to keep uncompressed
MB = 1e6
KEEP = "fp16"  # the option key of "keep the layer as it is"
WHATIF_CODE = "WHATIF"
WHATIF_WHY = "what-if: per-layer settings chosen by hand (the report's What-if, or plan.whatif.plan_for_choices)"
KEEP_REASON = "kept unchanged in a what-if"
# {changed}, {total}, {compressed}: the page fills them in the same way (whatif.js)
WHATIF_DETAIL = "what-if on the plan: {changed} of {total} layer(s) changed by hand; {compressed} compressed"
SLOT_RANK = {"sparsity": 0, "weights": 1, "activations": 2}  # the order steps apply in (engine.SLOTS)
Stack = tuple[Setting, ...]  # one layer's settings in step order; () keeps it as it is


def predict(plan: Plan, report: ModelReport, knowledge: Knowledge | None = None) -> Plan:
    """A copy of `plan` with every step's layers and sizes recomputed for its current params.

    Layers the backend skipped under the old parameters (e.g. a group size that did not divide
    the channels) are tried again, since the new parameters may suit them.
    """
    from compressadvise.plan.engine import predict_layers

    k = knowledge or builtin()
    tgt = k.target(plan.target.name)
    new = plan.model_copy(deep=True)
    order = {x.name: x.index for x in report.layers}
    for step in new.steps:
        retry = [s.layer for s in step.skipped if s.code == "backend"]
        step.skipped = [s for s in step.skipped if s.code != "backend"]
        step.layers = sorted(set(step.layers) | set(retry), key=lambda n: order.get(n, 1 << 30))
    layers, before, after = predict_layers(k, report, new.steps, tgt.baseline_bytes_per_param, tgt,
                                           plan.target.os or tgt.default_os)
    new.layers = layers
    budget = new.constraints.max_size_mb
    new.prediction = Prediction(bytes_before=before, bytes_after=after,
                                ratio=before / after if after else 0.0,
                                meets_size_budget=None if not budget else after / MB <= budget)
    return new


def check_param(plan: Plan, index: int, name: str, value: Any, knowledge: Knowledge | None = None) -> str | None:
    """An error message when `name=value` does not fit the step's technique or target, else None."""
    from compressadvise.plan.engine import missing_modes

    k = knowledge or builtin()
    step = plan.steps[index]
    tech = k.technique(step.technique)
    spec = tech.parameters.get(name)
    if spec is None:
        return f"{tech.name} has no parameter {name!r} (has: {', '.join(tech.parameters)})"
    if msg := spec.check(name, value):
        return msg
    tgt = k.target(plan.target.name)
    missing = missing_modes(k, step.technique, {**step.params, name: value}, tgt.supports(plan.target.os))
    if missing:
        return f"{tgt.name} at OS {plan.target.os} does not support {', '.join(missing)}"
    return None


def set_param(plan: Plan, index: int, name: str, value: Any, report: ModelReport,
              knowledge: Knowledge | None = None) -> Plan:
    """Set one parameter of step `index` (all its layers) and re-predict; raises InvalidKnowledge."""
    if msg := check_param(plan, index, name, value, knowledge):
        raise InvalidKnowledge(msg)
    new = plan.model_copy(deep=True)
    step = new.steps[index]
    step.params[name] = value
    # A per-layer override of the same parameter would silently win over the user's choice.
    for ov in step.op_name_params.values():
        ov.pop(name, None)
    step.op_name_params = {k: v for k, v in step.op_name_params.items() if v}
    return predict(new, report, knowledge)


def keep_layers(plan: Plan, index: int, names: list[str], report: ModelReport,
                knowledge: Knowledge | None = None) -> Plan:
    """Leave `names` out of step `index` (kept at full precision) and re-predict."""
    new = plan.model_copy(deep=True)
    step = new.steps[index]
    unknown = [n for n in names if n not in step.layers]
    if unknown:
        raise InvalidKnowledge(f"step {index + 1} does not compress {', '.join(unknown)}",
                               hint=f"it compresses: {', '.join(step.layers) or 'nothing'}")
    step.layers = [n for n in step.layers if n not in names]
    step.skipped += [Skip(layer=n, reason="kept at full precision by the user", code=USER_KEEP) for n in names]
    for n in names:
        step.op_name_params.pop(n, None)
    return predict(new, report, knowledge)


def drop_step(plan: Plan, index: int, report: ModelReport, knowledge: Knowledge | None = None) -> Plan:
    """Remove step `index` from the plan and re-predict."""
    new = plan.model_copy(deep=True)
    del new.steps[index]
    return predict(new, report, knowledge)


# ------------------------------------------------------------------ the report's what-if
@dataclass
class Options:
    """Per layer the what-if offers, in model order: keep, the settings search would consider on
    it (target, OS, backend and playbook rules), and the plan's own choice."""

    layers: list[LayerInfo]
    stacks: dict[str, dict[str, Stack]]  # layer -> option key -> settings; KEEP first
    current: dict[str, str]  # layer -> the plan's option key
    kept_why: dict[str, tuple[str, str]]  # layer -> (rule code, why) where a rule leaves only KEEP


def stack_key(stack: Stack) -> str:
    return stacked_key(list(stack)) if stack else KEEP


def _deployment(k: Knowledge, plan: Plan) -> tuple[Any, int]:
    tgt = k.target(plan.target.name)
    return tgt, plan.target.os or tgt.default_os


def current_stacks(k: Knowledge, report: ModelReport, plan: Plan) -> dict[str, Stack]:
    """Per layer, the settings the plan's steps give it in step order. The steps are re-predicted
    on a copy, so a layer the backend would leave alone (weight_threshold) counts as kept."""
    from compressadvise.plan.engine import predict_layers

    tgt, os = _deployment(k, plan)
    steps = [s.model_copy(deep=True) for s in plan.steps]
    predict_layers(k, report, steps, tgt.baseline_bytes_per_param, tgt, os)
    by_name = {x.name: x for x in report.layers}
    out: dict[str, Stack] = {}
    for step in steps:
        tech = k.techniques[step.technique]
        for n in step.layers:
            s = step.setting_for(by_name[n], tech)
            out[n] = out.get(n, ()) + (Setting.of(s.technique, **s.p),)  # weight_threshold: the step's, not the layer's
    return out


def layer_options(k: Knowledge, report: ModelReport, plan: Plan) -> Options:
    """The what-if's options: search's candidates (`_target_grid`, `_allowed` with the lessons
    applied), normalised so they join the plan's rows and sensitivity results by key."""
    from compressadvise.measure.sensitivity import candidate_layers, default_grid
    from compressadvise.plan.search import _allowed, _target_grid

    tgt, os = _deployment(k, plan)
    current = current_stacks(k, report, plan)
    grid, _ = _target_grid(k, default_grid(k=k), plan.target.name, tgt.name, os)
    cands = candidate_layers(report)
    allowed, notes = _allowed(k, report, plan.target.name, os, plan.constraints, cands, grid, "apply",
                              tgt.baseline_bytes_per_param)
    names = {x.name for x in cands} | set(current)
    opts = Options(layers=[x for x in report.layers if x.name in names], stacks={}, current={}, kept_why={})
    for x in opts.layers:
        stacks: dict[str, Stack] = {KEEP: ()}
        for s in allowed.get(x.name, []):
            norm = Setting.normalised(k, s.technique, s.p)
            stacks.setdefault(norm.key, (Setting.of(norm.technique, **norm.p),))
        mine = current.get(x.name, ())
        stacks.setdefault(stack_key(mine), mine)
        opts.stacks[x.name], opts.current[x.name] = stacks, stack_key(mine)
        if len(stacks) == 1 and notes.get(x.name):
            code = notes[x.name][0][0]
            rule = k.rules.get(code)
            opts.kept_why[x.name] = (code, f"kept by playbook rule {code}" + (f": {rule.rule.why}" if rule else ""))
    return opts


def whatif_steps(k: Knowledge, chosen: list[tuple[str, Stack]], kept_why: dict[str, tuple[str, str]]) -> list[Step]:
    """Search's plan steps (`technique_steps`) for per-layer stacks given in model order: stages
    sorted by slot, so a layer's sparsity step runs before its weights step; kept layers become
    skips of the first step. The page builds the same steps from the same data (whatif.js)."""
    from compressadvise.plan.search_plan import technique_steps

    members = sorted(((n, s) for n, stack in chosen for s in stack),
                     key=lambda m: SLOT_RANK.get(k.techniques[m[1].technique].slot, 1))
    steps = technique_steps(k, members, WHATIF_WHY)
    if steps:
        for n, stack in chosen:
            if not stack:
                code, why = kept_why.get(n, (USER_KEEP, KEEP_REASON))
                steps[0].skipped.append(Skip(layer=n, reason=why, code=code))
    return steps


def plan_for_choices(plan: Plan, report: ModelReport, choices: dict[str, str], knowledge: Knowledge | None = None,
                     *, options: Options | None = None) -> Plan:
    """The plan file for per-layer choices ({layer: option key}, as the report's What-if offers
    them; layers not named keep the plan's choice), sized by `predict_layers`. The page's
    "Download plan.yaml" writes exactly this plan for the same choices."""
    from compressadvise.plan.engine import predict_layers
    from compressadvise.plan.sizing import prediction

    k = knowledge or builtin()
    opts = options or layer_options(k, report, plan)
    picks = _picks(opts, choices)
    steps = whatif_steps(k, [(x.name, opts.stacks[x.name][picks[x.name]]) for x in opts.layers], opts.kept_why)
    tgt, os = _deployment(k, plan)
    layers, before, after = predict_layers(k, report, steps, tgt.baseline_bytes_per_param, tgt, os)
    changed = [x.name for x in opts.layers if picks[x.name] != opts.current[x.name]]
    detail = WHATIF_DETAIL.format(changed=len(changed), total=len(opts.layers),
                                  compressed=sum(1 for key in picks.values() if key != KEEP))
    return Plan(model=plan.model.model_copy(), target=plan.target.model_copy(), constraints=plan.constraints.model_copy(),
                playbooks=dict(plan.playbooks), steps=steps, prediction=prediction(before, after, plan.constraints),
                layers=layers, trace=[TraceEntry(code=WHATIF_CODE, status="fired", detail=detail, layers=changed)],
                placement=plan.placement.model_copy(deep=True) if plan.placement is not None else None)


def _picks(opts: Options, choices: dict[str, str]) -> dict[str, str]:
    """Every what-if layer's option key: the plan's, unless `choices` names another it offers."""
    picks = dict(opts.current)
    for name, key in choices.items():
        if name not in opts.stacks:
            raise InvalidKnowledge(f"{name}: not a layer the what-if offers settings for",
                                   hint=f"layers: {', '.join(list(opts.stacks)[:8])}...")
        if key not in opts.stacks[name]:
            raise InvalidKnowledge(f"{name}: {key!r} is not an option there",
                                   hint=f"options: {', '.join(opts.stacks[name])}")
        picks[name] = key
    return picks


def sized_options(k: Knowledge, report: ModelReport, plan: Plan, opts: Options
                  ) -> tuple[int, dict[str, LayerPrediction], dict[str, dict[str, list[LayerPrediction]]]]:
    """(bytes before, every layer's row with nothing compressed, and per what-if layer and option
    its rows after each of its stages), all from `predict_layers` itself: the code that sizes the
    plan sizes every option. One round per option rank sizes one option of every layer at once;
    an option the backend would leave alone in a round is dropped."""
    from compressadvise.plan.engine import predict_layers

    tgt, os = _deployment(k, plan)
    base = tgt.baseline_bytes_per_param
    work = {x.name: [(key, stack[:i]) for key, stack in opts.stacks[x.name].items() for i in range(1, len(stack) + 1)]
            for x in opts.layers}
    fp16_rows, before, _ = predict_layers(k, report, [], base, tgt, os)
    sized: dict[str, dict[str, list[LayerPrediction]]] = {x.name: {} for x in opts.layers}
    for r in range(max((len(w) for w in work.values()), default=0)):
        chosen = [(n, w[r][1] if r < len(w) else ()) for n, w in work.items()]
        steps = whatif_steps(k, chosen, {})
        rows, _, _ = predict_layers(k, report, steps, base, tgt, os)
        left = {s.layer for step in steps for s in step.skipped if s.code == "backend"}
        by_name = {row.name: row for row in rows}
        for n, w in work.items():
            if r < len(w):
                sized[n].setdefault(w[r][0], []).append(by_name[n] if n not in left else None)
    out = {n: {key: rows for key, rows in per.items() if None not in rows} for n, per in sized.items()}
    rows0 = {row.name: row for row in fp16_rows}
    for n in out:
        out[n] = {KEEP: [rows0[n]], **out[n]}
    return before, rows0, out
