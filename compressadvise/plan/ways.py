"""Ways forward for a plan that misses its size budget: never a bare "misses the budget".

Three sources, ranked by predicted size (those that reach the budget first):
- the playbooks' `outcome` rules (playbooks/next_moves.yaml), each sized where it changes a
  setting (fewer bits re-predicted by the same sizing as the plan);
- the arithmetic of the scheme: the bits per weight each step stores (scales and LUTs included)
  against the bits per weight the budget leaves for the compressed layers;
- the floor: the smallest post-training plan the target allows (every compressible layer at
  its smallest supported setting); above the budget it is out of reach without another lever.
"""
from __future__ import annotations

import math
from typing import Any

from compressadvise.knowledge.base import Knowledge
from compressadvise.knowledge.deployment import Deployment
from compressadvise.knowledge.schema import Plan, WayForward
from compressadvise.model.analysis import ModelReport

MB = 1e6
CODE = "BUDGET"


def _h(n: float) -> str:
    from compressadvise.ui.render import human_bytes

    return human_bytes(n)


def ways_forward(plan: Plan, report: ModelReport, k: Knowledge) -> list[WayForward]:
    """Ranked ways to the size budget the plan misses ([] when it meets it or has none)."""
    p = plan.prediction
    if p is None or p.meets_size_budget is not False:
        return []
    budget = plan.constraints.max_size_mb * MB
    dep = Deployment.resolve(k, plan.target.name, plan.target.os)
    ways = _rule_moves(plan, report, k, dep) + _arithmetic(plan, report, budget)
    smallest = _smallest(report, k, dep)
    if smallest is not None:
        ways.append(_floor_way(smallest, budget, _search_command(plan, report, budget)))
    return sorted(ways, key=lambda w: (w.predicted_bytes is None,
                                       (w.predicted_bytes or 0) > budget, w.predicted_bytes or 0))


def _rule_moves(plan: Plan, report: ModelReport, k: Knowledge, dep: Deployment) -> list[WayForward]:
    from compressadvise.plan.engine import next_moves

    out = []
    for move in next_moves(plan, report, ["size"], k, data=plan.constraints.data).moves:
        if move.step and not plan.steps[move.step - 1].layers:
            continue  # a step that compresses nothing: changing its setting changes nothing
        size = _lower_bits_size(plan, report, k, dep, move.step) if move.code in ("NXT008", "NXT009") else None
        out.append(WayForward(code=move.code, message=move.message, predicted_bytes=size,
                              cost="accuracy unknown until measured" if size else ""))
    return out


def _lower_bits_size(plan: Plan, report: ModelReport, k: Knowledge, dep: Deployment, step: int) -> int | None:
    """The plan's size with step `step` (1-based) at the next lower nbits its technique accepts."""
    from compressadvise.plan.engine import nbits_ladder
    from compressadvise.plan.measured import repredicted

    steps = [s.model_copy(deep=True) for s in plan.steps]
    lower = nbits_ladder(k, steps[step - 1])["nbits_lower"] if 0 < step <= len(steps) else 0
    if not lower:
        return None
    steps[step - 1].params = {**steps[step - 1].params, "nbits": lower}
    for override in steps[step - 1].op_name_params.values():
        override.pop("nbits", None)
    return repredicted(plan, steps, k, report, dep).prediction.bytes_after


def _arithmetic(plan: Plan, report: ModelReport, budget: float) -> list[WayForward]:
    """Bits per weight each step stores, and what the budget leaves per compressed weight."""
    by_name = {x.name: x for x in report.layers}
    rows = {x.name: x for x in plan.layers}
    out = []
    compressed = [n for s in plan.steps if s.slot == "weights" for n in s.layers if n in by_name and n in rows]
    params = sum(by_name[n].params for n in set(compressed))
    fixed = plan.prediction.bytes_after - sum(rows[n].bytes_after for n in set(compressed))
    if not params:
        return out
    need = 8 * (budget - fixed) / params
    for i, step in enumerate(plan.steps, 1):
        names = [n for n in step.layers if n in by_name and n in rows]
        if step.slot != "weights" or not names:
            continue
        bits = 8 * sum(rows[n].bytes_after for n in names) / sum(by_name[n].params for n in names)
        reach = (f"the budget leaves {need:.2f} bits per weight for the compressed layers "
                 f"(the rest of the model takes {_h(fixed)})") if need > 0 else (
            f"the layers left uncompressed alone take {_h(fixed)}, over the budget")
        out.append(WayForward(code=CODE, message=(
            f"step {i} ({step.technique} {_label(step.params)}) stores {bits:.3g} bits per weight, scales and "
            f"LUTs included; {reach}"), predicted_bytes=None, cost="arithmetic (exact for the config)"))
    return out


def _smallest(report: ModelReport, k: Knowledge, dep: Deployment) -> int | None:
    """Every compressible layer at its smallest setting the target supports; others as they are."""
    from compressadvise.measure.sensitivity import supported_settings
    from compressadvise.measure.sensitivity_grid import applicable, candidate_layers, default_grid, setting_bytes
    from compressadvise.plan.sizing import layer_bytes

    baseline = dep.target.baseline_bytes_per_param
    grid, _ = supported_settings(k, default_grid(("palettization", "linear_quantization"), k), dep.target.name, dep.os)
    threshold = int(k.techniques["palettization"].defaults().get("weight_threshold", 0))
    layers = {x.name: x for x in candidate_layers(report)  # what the backend leaves alone stays as it is
              if not x.is_dead and math.prod(x.weight_shape) > threshold}
    if not layers:
        return None
    total = 0
    for x in report.layers:
        if x.is_dead:
            continue
        width = dep.target.stored_bytes(x.module_type, dep.os)
        options = applicable(k, x, grid, baseline) if x.name in layers else []
        total += min((setting_bytes(k, x, s, width) for s in options), default=layer_bytes(x, None, width))
    return int(total + (report.stored() - sum(x.params for x in report.layers if not x.is_dead)) * baseline)


def _search_command(plan: Plan, report: ModelReport, budget: float) -> str:
    """The search for this model, target and budget, as it runs when pasted."""
    import shlex

    model = [] if report.format == "bundled" else [shlex.quote(report.source)]
    os_flag = [f"--os {plan.target.os}"] if plan.target.os else []
    return " ".join(["compressadvise search", *model, f"--target {shlex.quote(plan.target.name)}", *os_flag,
                     f"--max-size-mb {budget / MB:g}"])


def _floor_way(smallest: int, budget: float, search: str) -> WayForward:
    if smallest > budget:
        return WayForward(code=CODE, predicted_bytes=smallest, cost="none: a limit", message=(
            f"out of reach by post-training weight compression: the smallest plan this target allows (every "
            f"compressible layer at its smallest supported setting) is {_h(smallest)} against "
            f"{_h(budget)}; raise the budget, prune (training), or change the architecture"))
    return WayForward(code=CODE, predicted_bytes=smallest, cost="accuracy: the harshest settings, measure first",
                      message=(f"within reach: every compressible layer at its smallest supported setting gives "
                               f"{_h(smallest)}; `{search}` "
                               "spends the budget where it costs least accuracy"))


def _label(params: dict[str, Any]) -> str:
    keys = ("nbits", "granularity", "group_size", "block_size")
    return " ".join(f"{k}={params[k]}" for k in keys if k in params and not (
        k == "group_size" and params.get("granularity") != "per_grouped_channel") and not (
        k == "block_size" and params.get("granularity") != "per_block"))
