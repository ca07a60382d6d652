"""Budgets as the library API takes them: one set of keywords for `recommend` and `search`.

    max_size_mb=        whole model in MB (10^6 bytes)
    size_fraction=      a share of the model's size, in (0, 1] (of what: below)
    bits_per_weight=    average bits per parameter, in (0, 32]
    max_latency_ms=     estimate on the target (roofline)
    max_accuracy_drop=  points of accuracy the plan may lose (recorded in the plan; `verify` judges it)
    data=               "none", "calibration" or "training": the data you have for compressing

A size fraction is of the model's fp16 size for `recommend`, `search` and `verify` alike.

At most one of the three size budgets. `constraints=` (a dict or a plan's Constraints, 0 = no
budget) keeps working; a budget given there and as a keyword too is refused rather than one of
them silently winning. A wrong key, type or range raises BadArgument (a ValueError) before any
work starts, naming the key.
"""
from __future__ import annotations

import math
from typing import Any, get_args

from pydantic import ValidationError

from compressadvise.errors import BadArgument, bad_argument
from compressadvise.knowledge.schema import Constraints
from compressadvise.model.analysis import ModelReport

MB = 1e6
SIZE_KEYS = ("max_size_mb", "size_fraction", "bits_per_weight")
# keyword -> (0 allowed, highest allowed): the ranges the CLI's options check (commands.common)
RANGES: dict[str, tuple[bool, float | None]] = {
    "max_size_mb": (False, None), "size_fraction": (False, 1.0), "bits_per_weight": (False, 32.0),
    "max_latency_ms": (False, None), "max_accuracy_drop": (True, None),
}
KEYWORDS = (*RANGES, "data")


def as_constraints(value: Any) -> Constraints:
    """A Constraints, a dict of its keys, or None (no budget)."""
    if value is None:
        return Constraints()
    if isinstance(value, Constraints):
        return value
    if not isinstance(value, dict):
        raise BadArgument(f"constraints must be a dict or a Constraints, not {type(value).__name__}")
    try:
        return Constraints.model_validate(value)
    except ValidationError as e:
        raise bad_argument("constraints", e, Constraints.model_fields) from None


def out_of_range(value: float, most: float | None, zero_ok: bool) -> str | None:
    """What a budget must be when `value` is not it (None: it is): the one range check of the API
    and the CLI options."""
    low_ok = value >= 0 if zero_ok else value > 0
    if math.isfinite(value) and low_ok and (most is None or value <= most):
        return None
    return f"in (0, {most:g}]" if most is not None else "a finite number >= 0" if zero_ok else "a finite number > 0"


def check_budget(name: str, value: Any) -> float:
    """A keyword budget: a finite number in its range (bool is not a number here)."""
    zero_ok, most = RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadArgument(f"{name} must be a number, not {value!r}")
    if span := out_of_range(value, most, zero_ok):
        raise BadArgument(f"{name} must be {span} (got {value!r})")
    return float(value)


def _check_data(value: Any) -> str:
    kinds = get_args(Constraints.model_fields["data"].annotation)
    if value not in kinds:
        raise BadArgument(f"data must be one of {', '.join(map(repr, kinds))} (got {value!r})")
    return str(value)


def budget_request(constraints: Any = None, **keywords: Any) -> dict[str, Any]:
    """The budgets a caller gave, checked before any work: the non-zero entries of `constraints`
    plus the keywords that are not None (KEYWORDS)."""
    given = {k: v for k, v in as_constraints(constraints).model_dump().items() if v not in (0.0, "none")}
    for name, value in keywords.items():
        if value is None:
            continue
        if name in given:
            raise BadArgument(f"{name} given twice: in constraints and as a keyword")
        given[name] = _check_data(value) if name == "data" else check_budget(name, value)
    sizes = [k for k in SIZE_KEYS if k in given]
    if len(sizes) > 1:
        raise BadArgument(f"give one size budget, not {' and '.join(sizes)}")
    return given


def budget_bytes(fp16_bytes: float, params: int, *, size_fraction: float | None = None,
                 bits_per_weight: float | None = None) -> float | None:
    """A relative size budget in bytes: a fraction is of the fp16 size (not of an fp32 target's own
    size), bits are per parameter. recommend, search, verify and the CLI all read it here."""
    if size_fraction is not None:
        return size_fraction * fp16_bytes
    if bits_per_weight is not None:
        return bits_per_weight * params / 8
    return None


def size_mb(given: dict[str, Any], report: ModelReport) -> float | None:
    """`recommend`'s size budget in MB, as the CLI computes it (commands.common.size_budget_mb)."""
    rel = budget_bytes(report.total_bytes_fp16, report.total_params, size_fraction=given.get("size_fraction"),
                       bits_per_weight=given.get("bits_per_weight"))
    return given.get("max_size_mb") if rel is None else rel / MB  # an MB budget as given: no round trip


def plan_constraints(given: dict[str, Any], max_size_mb: float | None,
                     max_latency_ms: float | None = None) -> Constraints:
    """The plan's Constraints (0 = none) from a checked request and its size budget in MB."""
    return Constraints(max_size_mb=max_size_mb or 0.0,
                       max_latency_ms=max_latency_ms or given.get("max_latency_ms", 0.0),
                       max_accuracy_drop=given.get("max_accuracy_drop", 0.0), data=given.get("data", "none"))


def search_request(budget: Any, constraints: Any = None, **keywords: Any) -> dict[str, Any]:
    """`search`'s budgets: an explicit Budget, or a size or latency budget among the keywords and
    `constraints` (an accuracy drop or `data` alone gives the knapsack nothing to spend)."""
    given = budget_request(constraints, **keywords)
    limits = [k for k in (*SIZE_KEYS, "max_latency_ms") if k in given]
    if budget is not None and limits:
        raise BadArgument(f"give budget= or {limits[0]}=, not both")
    if budget is None and not limits:
        raise BadArgument("search needs a budget: max_size_mb=, size_fraction=, bits_per_weight= or max_latency_ms=")
    return given
