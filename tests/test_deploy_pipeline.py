"""The deployable form end to end: what analyze inventories, sensitivity measures and apply ships
are the same folded weights (issue 15). Conv + BatchNorm blocks of identical shapes are the case
where matching the converter's output by shape alone cannot tell layers apart."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

import compressadvise as ca
from compressadvise.model.analysis import analyze
from compressadvise.model.deploy import fold_batchnorm
from compressadvise.model.loading import LoadedModel


class Blocks(nn.Module):
    """A stem and three conv+BN blocks of one shape (residual adds), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32))
                                    for _ in range(3))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for b in self.blocks:
            y = torch.relu(y + b(y))
        return self.head(y.mean((2, 3)))


def _model() -> LoadedModel:
    torch.manual_seed(0)
    m = Blocks()
    with torch.no_grad():  # pretrained-like statistics: per-channel scales far from 1
        for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
            bn.running_var.uniform_(0.01, 4.0)
            bn.running_mean.uniform_(-1, 1)
            bn.weight.uniform_(0.2, 3.0)
    m.eval()
    digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in m.state_dict().values())).hexdigest()
    return LoadedModel(source="test:blocks", format="factory", sha256=digest, has_graph=True, module=m,
                       example_inputs=(torch.randn(1, 3, 16, 16),))


def test_analyze_inventories_the_model_with_the_statistics_of_its_folded_weights():
    model = _model()
    report = analyze(model)
    folded = fold_batchnorm(model.module, model.example_inputs).module
    assert report.total_params == sum(p.numel() for p in model.module.parameters())  # its own parameters
    assert any("4 BatchNorm(s) fold" in n for n in report.notes)
    for name, bn in (("stem.0", "stem.1"), ("blocks.1.0", "blocks.1.1")):
        x = report.layer(name)
        assert x.folded_bn == bn and report.layer(bn).folded_into == name
        w = folded.get_submodule(name).weight
        unfolded = model.module.get_submodule(name).weight
        assert x.stats.absmax == pytest.approx(float(w.abs().max()), rel=1e-5)
        assert x.stats.absmax != pytest.approx(float(unfolded.abs().max()), rel=1e-3)
    assert report.layer("head").folded_bn is None
    assert all(isinstance(m, nn.BatchNorm2d) for m in model.module.modules() if "BatchNorm" in type(m).__name__)


def test_sensitivity_measures_the_folded_model():
    from compressadvise.measure.sensitivity import prepare

    prepared = prepare(_model())
    assert len(prepared.loaded.folds) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.model.modules())


def test_apply_ships_every_planned_layer_matched_by_name(tmp_path):
    model = _model()
    plan = ca.recommend(analyze(model), target="ane-a17", os=18)
    planned = {n for s in plan.steps for n in s.layers}
    assert {"blocks.0.0", "blocks.1.0", "blocks.2.0"} <= planned
    m = ca.apply(model, plan, tmp_path / "out").manifest
    assert sorted(f["bn"] for f in m["folded"]) == ["blocks.0.1", "blocks.1.1", "blocks.2.1", "stem.1"]
    by_name = {x["name"]: x for x in m["layers"]}
    for name in planned:
        assert by_name[name]["status"] == "applied", by_name[name]
        (entry,) = by_name[name]["steps"]
        assert entry["coreml"]["matched_by"] == "name", entry["coreml"]  # the converter had nothing to fold
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["folded"] == m["folded"]


def test_a_program_predicts_the_converters_fold():
    """A .pt2 has no eager code to rewrite: the converter folds it. program_folds predicts the
    weights it writes, equal to folding the eager module."""
    from compressadvise.model.deploy import program_folds

    model = _model()
    ep = torch.export.export(model.module, model.example_inputs)
    values, folds = program_folds(ep)
    eager = dict(fold_batchnorm(model.module, model.example_inputs).module.named_parameters())
    assert sorted(f.bn for f in folds) == ["blocks.0.1", "blocks.1.1", "blocks.2.1", "stem.1"]
    for name, v in values.items():
        assert torch.allclose(v, eager[name], atol=1e-6), name


def test_a_pt2_ships_every_planned_layer_found_by_its_folded_value(tmp_path):
    from compressadvise.model.loading import load_model

    model = _model()
    path = tmp_path / "blocks.pt2"
    torch.export.save(torch.export.export(model.module, model.example_inputs), path)
    loaded = load_model(path)
    report = analyze(loaded)
    assert report.layer("blocks.1.0").folded_bn == "blocks.1.1"  # statistics of the weights that ship
    plan = ca.recommend(report, target="ane-a17", os=18)
    planned = {n for s in plan.steps for n in s.layers}
    assert {"blocks.0.0", "blocks.1.0", "blocks.2.0"} <= planned
    m = ca.apply(loaded, plan, tmp_path / "out").manifest
    by_name = {x["name"]: x for x in m["layers"]}
    for name in planned:
        assert by_name[name]["status"] == "applied", by_name[name]
        (entry,) = by_name[name]["steps"]
        assert entry["coreml"]["matched_by"] == "value", entry["coreml"]  # not a guess by shape


def test_a_pt2_is_measured_as_it_ships_and_the_program_is_untouched(tmp_path):
    """Sensitivity runs a .pt2's graph with the converter's folds applied (same outputs, folded
    weights); the program itself, which apply converts, keeps its own weights."""
    from compressadvise.measure.sensitivity import prepare
    from compressadvise.model.deploy import program_folds
    from compressadvise.model.loading import load_model

    model = _model()
    path = tmp_path / "blocks.pt2"
    torch.export.save(torch.export.export(model.module, model.example_inputs), path)
    loaded = load_model(path)
    before = {k: v.clone() for k, v in loaded.exported.state_dict.items()}
    prepared = prepare(loaded)
    assert len(prepared.loaded.folds) == 4
    gm = prepared.model
    assert not [n for n in gm.graph.nodes if "batch_norm" in str(n.target)]
    x = torch.randn(1, 3, 16, 16)  # the program was exported for a batch of one
    assert torch.allclose(gm(x), model.module(x), atol=1e-5)
    predicted = program_folds(loaded.exported)[0]
    assert torch.allclose(gm.get_parameter("blocks.1.0.weight"), predicted["blocks.1.0.weight"])
    after = loaded.exported.state_dict
    assert all(torch.equal(before[k], after[k]) for k in before)
