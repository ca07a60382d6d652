"""The advisor's scenario table (tests/scenarios.yaml): one test per row, on real pretrained models.

A row says what the plan for (model, target, OS, data, budget) must and must not contain; rows
marked `fails` are known gaps, expected to fail until fixed (strict: a fix must remove the mark).
The same table is the docs page "What the advisor does for ..." (docs/scenarios.md).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import compressadvise as ca
from compressadvise.knowledge.base import builtin
from compressadvise.model.analysis import ModelReport, analyze
from compressadvise.model.loading import LoadedModel
from compressadvise.plan.engine import step_text
from models import TinyLM
from real_models.catalog import REAL_MODELS

TABLE = Path(__file__).with_name("scenarios.yaml")
ROWS = yaml.safe_load(TABLE.read_text())["scenarios"]
EXPECT_KEYS = {"steps", "advice", "no_advice", "meets_budget", "compressed", "kept", "step_text", "step_text_not",
               "ways", "fidelity"}


@functools.lru_cache(maxsize=None)
def _loaded(model_id: str) -> LoadedModel:
    if model_id == "tinylm":
        torch.manual_seed(0)
        module, example = TinyLM(32000, 512).eval(), (torch.randint(0, 32000, (1, 8)),)
    else:
        spec = REAL_MODELS[model_id]
        if not spec.installed():
            pytest.skip(spec.skip_reason())
        module, example = spec.build()
    return LoadedModel(source=model_id, format="module", sha256=model_id, has_graph=True, module=module,
                       example_inputs=example)


@functools.lru_cache(maxsize=None)
def _report(model_id: str) -> ModelReport:
    return analyze(_loaded(model_id))


def _constraints(row: dict[str, Any], report: ModelReport) -> dict[str, Any]:
    budget = dict(row.get("budget", {}))
    if "size_fraction" in budget:  # as the CLI does: a fraction of the fp16 size, in MB
        budget["max_size_mb"] = budget.pop("size_fraction") * report.total_bytes_fp16 / 1e6
    return {**budget, "data": row.get("data", "none")}


def _params(row: dict[str, Any]) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=row["fails"])] if row.get("fails") else []
    return pytest.param(row, id=row["name"], marks=marks)


def test_the_table_is_well_formed() -> None:
    assert len(ROWS) >= 30
    names = [r["name"] for r in ROWS]
    assert len(set(names)) == len(names)
    for r in ROWS:
        assert set(r["expect"]) <= EXPECT_KEYS, (r["name"], set(r["expect"]) - EXPECT_KEYS)
        assert r["model"] in REAL_MODELS or r["model"] == "tinylm", r["name"]
        builtin().target(r["target"])


@pytest.mark.parametrize("row", [_params(r) for r in ROWS])
def test_scenario(row: dict[str, Any]) -> None:
    report = _report(row["model"])
    subject = _loaded(row["model"]) if row.get("measure") else report
    plan = ca.recommend(subject, target=row["target"], os=row.get("os"), constraints=_constraints(row, report),
                        measure=bool(row.get("measure")))
    _check(plan, row["expect"])


def _check(plan: Any, e: dict[str, Any]) -> None:
    k = builtin()
    codes = {a.code for a in plan.advisories} | {w.code for w in plan.ways_forward} | {c for s in plan.steps
                                                                                        for c in s.rules}
    steps = [s.technique for s in plan.steps if s.layers]
    in_steps = {n for s in plan.steps for n in s.layers}
    texts = " | ".join(step_text(k, s) for s in plan.steps if s.layers)
    ways = " | ".join(w.message for w in plan.ways_forward)
    if "steps" in e:
        assert steps == e["steps"], steps
    assert set(e.get("advice", [])) <= codes, sorted(codes)
    assert not set(e.get("no_advice", [])) & codes, sorted(codes)
    if "meets_budget" in e:
        assert plan.prediction.meets_size_budget is e["meets_budget"], plan.prediction
    assert set(e.get("compressed", [])) <= in_steps, sorted(in_steps)
    assert not set(e.get("kept", [])) & in_steps, sorted(in_steps)
    for text in e.get("step_text", []):
        assert text in texts, texts
    for text in e.get("step_text_not", []):
        assert text not in texts, texts
    for text in e.get("ways", []):
        assert text in ways, ways
    if "fidelity" in e:
        assert plan.fidelity is not None and plan.fidelity.evidence == e["fidelity"], plan.fidelity
