"""Deployment (target + OS, resolved once), decompression facts from the targets' YAML, and the
fact table against its extractors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compressadvise.model.analysis import analyze
from compressadvise.knowledge.deployment import Deployment
from compressadvise.plan.engine import constraint_facts, layer_facts, model_facts, recommend, target_facts
from compressadvise.errors import InvalidKnowledge
from compressadvise.measure.estimate import LayerCompression, from_plan, roofline
from compressadvise.knowledge.facts import NAMESPACES, step_facts
from compressadvise.knowledge.base import builtin
from compressadvise.knowledge.schema import Constraints
from compressadvise.measure.verify import _from_module

from models import TinyCNN


@pytest.fixture(scope="module")
def k():
    return builtin()


@pytest.fixture(scope="module")
def mlp_report():
    """Two 1024x1024 linears at batch 1: memory-bound on every shipped profile."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024))
    return analyze(_from_module(model), input_shape=[1, 1024], stats=False)


# ------------------------------------------------------------------ resolving once
def test_resolve_applies_the_default_os(k):
    assert Deployment.resolve(k, "ane-a17").os == k.target("ane-a17").default_os == 18
    assert Deployment.resolve(k, "nvidia-gpu").os == 0
    d = Deployment.resolve(k, "ane-a14", "17")  # the CLI hands the OS over as text
    assert (d.name, d.os) == ("ane-a14", 17)
    assert Deployment.resolve(k, d.target, None) == Deployment(d.target, 18)  # a profile works too


def test_resolve_refuses_an_os_below_the_minimum_like_recommend(k, mlp_report):
    with pytest.raises(InvalidKnowledge, match=r"target ane-a14 needs OS 16 or later \(got 15\)"):
        Deployment.resolve(k, "ane-a14", 15)
    with pytest.raises(InvalidKnowledge, match=r"target ane-a14 needs OS 16 or later \(got 15\)"):
        recommend(mlp_report, target="ane-a14", os=15, knowledge=k)
    assert Deployment.resolve(k, "ane-a14", 15, check=False).os == 15  # search/sensitivity: no refusal
    assert Deployment.resolve(k, "x86-cpu", 3).os == 3  # not a Core ML target: nothing to refuse


def test_modes_needed_vs_what_the_deployment_does(k):
    ios16, ios18 = Deployment.resolve(k, "ane-a14", 16), Deployment.resolve(k, "ane-a14", 18)
    assert ios16.behaviour("palettize_grouped") == "unsupported"  # grouped LUTs from iOS 18
    assert ios18.behaviour("palettize_grouped") == "accelerated"
    assert ios18.behaviour("linear_per_block") == "decompressed"
    assert ios18.behaviour("no_such_mode") == "unsupported"
    assert ios16.missing(["palettize", "palettize_grouped"]) == ["palettize_grouped"]
    assert ios18.missing(["palettize", "palettize_grouped"]) == []


def test_decompression_comes_from_the_target_yaml(k):
    for name in ("ane-a14", "ane-a17", "apple-cpu", "mac-gpu"):
        assert Deployment.resolve(k, name, 16).decompression.at == "load"
        assert Deployment.resolve(k, name, 17).decompression.at == "just_in_time"
    for name in ("x86-cpu", "nvidia-gpu"):  # torchao keeps quantized weights compressed in memory
        assert Deployment.resolve(k, name).jit_decompression
    x86, gpu = Deployment.resolve(k, "x86-cpu"), Deployment.resolve(k, "nvidia-gpu")
    assert x86.streams_compressed("torchao_int8_weight")  # stated: `streams: compressed`
    assert gpu.streams_compressed("torchao_int8_weight")
    assert not gpu.streams_compressed("torchao_intx")  # marked decompressed, nothing stated


def test_int8_compute_is_stated_per_target(k):
    got = {t: Deployment.resolve(k, t).int8_compute for t in k.targets}
    # the same answers the 1.5x figure threshold gave before it moved into the YAML
    assert got == {"ane-a14": False, "ane-a17": True, "apple-cpu": False, "mac-gpu": False,
                   "nvidia-gpu": True, "x86-cpu": True}
    for t in k.targets:
        stated = k.target(t).int8_compute
        assert stated is not None and stated.source


# ------------------------------------------------------------------ the roofline credits compressed weights
def _totals(k, report, target: str, os: int | None = None, **budget):
    plan = recommend(report, target=target, os=os, constraints=budget, knowledge=k)
    assert plan.steps, f"no step planned for {target}"
    tgt = k.target(target)
    before = roofline(report, tgt, plan.target.os)
    after = roofline(report, tgt, plan.target.os, from_plan(plan.layers))
    assert all(x.bound == "memory" for x in before.layers)
    return before, after


@pytest.mark.parametrize("target", ["x86-cpu", "nvidia-gpu"])
def test_roofline_credits_torchao_weights(k, mlp_report, target):
    before, after = _totals(k, mlp_report, target, max_size_mb=1.0)
    assert after.total_ms < before.total_ms
    assert all(x.weight_bytes_moved < y.weight_bytes_moved for x, y in zip(after.layers, before.layers))
    assert not after.decompression.startswith("iOS")  # an iOS rule no longer speaks for torchao


@pytest.mark.parametrize("target", ["x86-cpu", "nvidia-gpu"])
def test_roofline_credits_the_torchao_mode_by_name(k, mlp_report, target):
    tgt = k.target(target)
    fp = mlp_report.layers[0].params * tgt.baseline_bytes_per_param
    comp = {x.name: LayerCompression(bytes=fp / 4, setting="8-bit int8_weight_only", mode="torchao_int8_weight")
            for x in mlp_report.layers}
    assert roofline(mlp_report, tgt, None, comp).total_ms < roofline(mlp_report, tgt).total_ms


def test_ane_a14_decompresses_at_load_on_ios16_and_just_in_time_from_17(k, mlp_report):
    b16, a16 = _totals(k, mlp_report, "ane-a14", 16, max_size_mb=1.5)
    assert a16.total_ms == pytest.approx(b16.total_ms)  # size win only on iOS 16
    assert a16.decompression.startswith("iOS 16")
    b17, a17 = _totals(k, mlp_report, "ane-a14", 17, max_size_mb=1.5)
    assert a17.total_ms < b17.total_ms
    assert a17.decompression.startswith("iOS 17+")


# ------------------------------------------------------------------ the fact table equals the extractors
_PY = {"int": int, "double": float, "string": str, "bool": bool}


def _typed(value, cel: str) -> bool:
    if cel == "list(string)":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if cel == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if cel == "double":
        return isinstance(value, float)
    return isinstance(value, _PY[cel])


def _check(ns: str, produced: dict) -> None:
    table = NAMESPACES[ns]
    assert set(produced) == set(table), f"{ns}: produced vs documented differ"
    wrong = {n: (type(v).__name__, table[n].type) for n, v in produced.items() if not _typed(v, table[n].type)}
    assert not wrong, f"{ns} facts of the wrong type: {wrong}"


def test_fact_table_equals_the_extractors(k):
    torch.manual_seed(0)
    report = analyze(_from_module(TinyCNN()), input_shape=[1, 3, 16, 16])
    _check("model", model_facts(report))
    for x in report.layers:
        _check("layer", layer_facts(x, len(report.layers)))
    for t in k.targets:
        _check("target", target_facts(Deployment.resolve(k, t)))
    _check("constraints", constraint_facts(Constraints(max_size_mb=0.01, data="calibration"), report))
    _check("step", step_facts({"nbits": 4, "granularity": "per_grouped_channel", "group_size": 16},
                              "palettization", "weights"))
    _check("step", step_facts({}, "pruning", "sparsity"))  # absent parameters read as zeros


def test_every_condition_fact_but_outcome_has_an_extractor_and_the_docs_print_it():
    from compressadvise.ui.docsgen import facts_page

    page = facts_page()
    for ns, table in NAMESPACES.items():
        for name, f in table.items():
            assert ns == "outcome" or f.extract is not None, f"{ns}.{name} has no extractor"
            assert f"`{ns}.{name}` | {f.type} |" in page
