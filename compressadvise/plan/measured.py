"""A plan measured before it is promised: its weight settings applied in memory to the deployable
weights (BatchNorm folded, as the converter ships them), run on samples, compared with the
original's outputs against a floor. A plan under the floor is not printed as if it held: the next
gentler setting the technique allows (the next wider nbits, same granularity) is tried until one
passes or none is left, and the plan says which it chose and why.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from compressadvise.errors import BadModel, CompressionFailed
from compressadvise.knowledge.base import Knowledge
from compressadvise.knowledge.deployment import Deployment
from compressadvise.knowledge.schema import Advisory, Measured, Plan, PlanFidelity
from compressadvise.model.analysis import ModelReport
from compressadvise.plan.setting import Setting

CODE = "MEASURED"
MEASURABLE = ("palettization", "linear_quantization")  # what the in-memory evaluation can apply
# A training-aware step is measured as its post-training twin (same storage): where that already
# holds the floor the training run may be unnecessary, and where it misses, it is the gap the
# training has to close. recommend never trains.
STAND_IN = {"dkm": "palettization", "qat": "linear_quantization"}
MB = 1e6


def measure_plan(plan: Plan, loaded: Any, report: ModelReport, k: Knowledge, *, samples: Any = None,
                 min_psnr: float | None = None, max_samples: int = 64,
                 progress: Callable[[str], None] | None = None) -> Plan:
    """The plan with its measured fidelity (`plan.fidelity`), gentler where it missed the floor."""
    from compressadvise.measure.sensitivity import prepare

    try:
        prep = prepare(loaded, samples, max_samples=max_samples)
    except (BadModel, CompressionFailed) as e:
        return plan.model_copy(update={"fidelity": PlanFidelity(
            label="not measured", evidence="none", note=f"could not measure: {e.one_line()}")})
    evidence = "random" if prep.samples.kind == "random" else "samples"
    label = (f"weak evidence: {prep.n} random inputs (outputs compared only; pass --samples)" if evidence == "random"
             else f"measured on {prep.n} samples")
    floor = _floor(k, plan, prep, min_psnr)
    dep = Deployment.resolve(k, plan.target.name, plan.target.os)
    tried: list[Measured] = []
    plans: list[Plan] = []
    chosen, unmeasured = plan, []
    trained = [s.technique for s in plan.steps if s.technique in STAND_IN and s.layers]
    for candidate in [plan] if trained else _gentler(plan, k, report, dep):
        assign, unmeasured = _assignment(candidate, k, report, prep.weights)
        if not assign:
            break
        if progress:
            progress(f"measuring {_settings_label(candidate)} on {prep.n} inputs")
        try:
            metrics = _run(prep, assign)
        except CompressionFailed as e:  # a layer the in-memory evaluation cannot compress: say so, promise nothing
            return plan.model_copy(update={"fidelity": PlanFidelity(
                label="not measured", evidence="none", unmeasured=unmeasured, note=f"could not measure: {e.one_line()}")})
        tried.append(Measured(settings=_settings_label(candidate), bytes_after=candidate.prediction.bytes_after,
                              metrics=metrics, passed=_passes(metrics, floor)))
        chosen = candidate
        plans.append(candidate)
        if tried[-1].passed:
            break
    if not tried:
        return plan.model_copy(update={"fidelity": PlanFidelity(
            label="not measured", evidence="none", unmeasured=unmeasured,
            note="nothing to measure: no palettization or linear quantization step")})
    if not tried[-1].passed:  # nothing passed: the best-measured of them, said plainly
        best = max(range(len(tried)), key=lambda i: _score(tried[i].metrics, floor))
        chosen = plans[best]
        tried.append(tried.pop(best))
    fidelity = PlanFidelity(label=label, evidence=evidence, samples=prep.n, floor=floor, measured=tried,
                            unmeasured=unmeasured, note="; ".join(prep.notes))
    advice = _training_advice(tried[0], floor, label, trained) if trained else _advice(tried, floor, label)
    return chosen.model_copy(update={"fidelity": fidelity, "advisories": [advice] + list(chosen.advisories)})


def _floor(k: Knowledge, plan: Plan, prep: Any, min_psnr: float | None) -> dict[str, float]:
    """metric -> minimum: top-1 agreement for classifiers (or the accuracy budget), PSNR otherwise.
    On random inputs a classifier's top class is noise (logits near a tie), so only outputs count."""
    drop = plan.constraints.max_accuracy_drop
    if min_psnr is not None or not prep.logits or prep.samples.kind == "random":
        return {"psnr_db": float(min_psnr if min_psnr is not None else k.thresholds["min_output_psnr_db"])}
    if drop and "accuracy" in prep.ref_metrics:
        return {"accuracy": prep.ref_metrics["accuracy"] - drop}  # both in points
    return {"top1_agreement": 1 - drop / 100 if drop else k.thresholds["min_top1_agreement"]}


def _passes(metrics: dict[str, float], floor: dict[str, float]) -> bool:
    return all(metrics.get(name, float("-inf")) >= value - 1e-12 for name, value in floor.items())


def _score(m: dict[str, float], floor: dict[str, float]) -> tuple:
    """Best first by the floor's own metric, then the others."""
    order = list(floor) + [k for k in ("accuracy", "top1_agreement", "psnr_db") if k not in floor]
    return tuple(m.get(k, float("-inf")) for k in order)


def _run(prep: Any, assign: dict[str, Setting]) -> dict[str, float]:
    from compressadvise.measure.sensitivity import measure

    (result,), _, _ = measure(prep, [assign], proxies=False)
    return {name: round(float(v), 4) for name, v in result["metrics"].items()}


def _assignment(plan: Plan, k: Knowledge, report: ModelReport, weights: dict[str, str]
                ) -> tuple[dict[str, Setting], list[str]]:
    """layer -> the Setting its weights step gives it; and what is left out, with why."""
    by_name = {x.name: x for x in report.layers}
    assign: dict[str, Setting] = {}
    left: list[str] = []
    for step in plan.steps:
        if step.technique in STAND_IN:
            step = _post_training_twin(step, k)
        if step.technique not in MEASURABLE:
            if step.layers:
                left.append(f"{step.technique} ({len(step.layers)} layer(s)): not applied in the measurement")
            continue
        tech = k.techniques[step.technique]
        for name in step.layers:
            if name in weights and name in by_name:
                assign[name] = step.setting_for(by_name[name], tech)
            else:
                left.append(f"{name}: its weight is not a parameter of the runnable model")
    return assign, left


def _gentler(plan: Plan, k: Knowledge, report: ModelReport, dep: Deployment) -> Iterator[Plan]:
    """The plan, then the same plan with every measurable step at the next wider nbits its technique
    accepts (the ladder next_moves uses), and so on, where the deployment can load it."""
    from compressadvise.plan.engine import missing_modes, nbits_ladder

    yield plan
    supported = dep.target.supports(dep.os)
    current = plan
    while True:
        steps = [s.model_copy(deep=True) for s in current.steps]
        changed = False
        for step in steps:
            nbits = nbits_ladder(k, step)["nbits_higher"] if step.technique in MEASURABLE else 0
            if not nbits:
                continue
            params = {**step.params, "nbits": nbits}
            if missing_modes(k, step.technique, params, supported):
                continue
            step.params = params
            for override in step.op_name_params.values():
                if "nbits" in override and override["nbits"] < nbits:
                    override["nbits"] = nbits
            changed = True
        if not changed:
            return
        current = repredicted(current, steps, k, report, dep)
        yield current


def repredicted(plan: Plan, steps: list, k: Knowledge, report: ModelReport, dep: Deployment) -> Plan:
    """The plan with these steps, sized as recommend sizes them."""
    from compressadvise.plan.engine import predict_layers
    from compressadvise.plan.sizing import prediction

    layers, before, after = predict_layers(k, report, steps, dep.target.baseline_bytes_per_param, dep.target, dep.os)
    return plan.model_copy(update={"steps": steps, "layers": layers,
                                   "prediction": prediction(before, after, plan.constraints)})


def _post_training_twin(step: Any, k: Knowledge) -> Any:
    """The training-aware step as its post-training technique, with the parameters that one takes."""
    twin = STAND_IN[step.technique]
    known = k.techniques[twin].parameters

    def keep(p: dict) -> dict:
        return {name: v for name, v in p.items() if name in known}

    return step.model_copy(update={"technique": twin, "params": keep(step.params),
                                   "op_type_params": {t: keep(p) for t, p in step.op_type_params.items()},
                                   "op_name_params": {n: keep(p) for n, p in step.op_name_params.items()}})


def _settings_label(plan: Plan) -> str:
    parts = []
    for s in plan.steps:
        if (s.technique in MEASURABLE or s.technique in STAND_IN) and s.layers:
            gran = s.params.get("granularity", "")
            twin = f" (as post-training {STAND_IN[s.technique]})" if s.technique in STAND_IN else ""
            parts.append(f"{s.params.get('nbits', '?')}-bit {s.technique}{' ' + gran if gran else ''}{twin}")
    return " + ".join(parts) or "no weights step"


def metric_text(m: dict[str, float]) -> str:
    keys = [("top1_agreement", "top-1 agreement {:.0%}"), ("accuracy", "accuracy {:.1f}%"),
            ("kl_divergence", "KL {:.3g}"), ("psnr_db", "PSNR {:.1f} dB")]
    return ", ".join(fmt.format(m[key]) for key, fmt in keys if key in m)


def _training_advice(m: Measured, floor: dict[str, float], label: str, trained: list[str]) -> Advisory:
    """What the post-training twin of a training-aware step says about the training run."""
    floor_text = ", ".join(f"{name} >= {v:.3g}" for name, v in floor.items())
    steps = ", ".join(sorted(set(trained)))
    if m.passed:
        title = "Post-training already holds at this setting: the training run may be unnecessary"
        msg = (f"{m.settings}: {metric_text(m.metrics)} ({label}; floor {floor_text}) without any training. "
               f"Try the post-training technique first; keep {steps} for when it misses on your evaluation.")
    else:
        title = "Post-training misses at this setting: the training step has to close the gap"
        msg = (f"{m.settings}: {metric_text(m.metrics)} ({label}), under the floor ({floor_text}): this is where "
               f"{steps} starts from. apply --train runs it; verify the result against the same floor.")
    return Advisory(code=CODE, title=title, message=msg,
                    why="A training run costs hours on a real model; its post-training twin costs seconds and says whether it is needed.")


def _advice(tried: list[Measured], floor: dict[str, float], label: str) -> Advisory:
    first, last = tried[0], tried[-1]
    floor_text = ", ".join(f"{name} >= {v:.3g}" for name, v in floor.items())
    if len(tried) == 1 and first.passed:
        msg = f"{first.settings}: {metric_text(first.metrics)} ({label}; floor {floor_text})."
        title = "The plan was measured and holds"
    elif last.passed:
        msg = (f"{first.settings} measured {metric_text(first.metrics)}, under the floor ({floor_text}); "
               f"chose {last.settings}: {metric_text(last.metrics)}, {last.bytes_after / MB:.2f} MB ({label}).")
        title = "The first plan missed the fidelity floor: a gentler one was chosen"
    else:
        msg = (f"no post-training setting of wider nbits reaches the floor ({floor_text}); the best measured is "
               f"{last.settings}: {metric_text(last.metrics)} ({label}). Next: calibration (sensitive k-means, "
               "GPTQ), training-aware compression, or mixed precision with `search`.")
        title = "No post-training plan reaches the fidelity floor"
    return Advisory(code=CODE, title=title, message=msg,
                    why="Published figures are other models' numbers; a plan is only as good as its measurement on this one.")
