"""Recurrent weights are layers, and buffers are not parameters, in every format (issue 15)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compressadvise.model.analysis import analyze
from compressadvise.model.loading import LoadedModel, load_model


class ConvLSTM(nn.Module):
    """conv + BN front end, a 2-layer bidirectional LSTM, a GRUCell and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 64, 3)
        self.bn = nn.BatchNorm2d(64)
        self.lstm = nn.LSTM(64, 48, num_layers=2, bidirectional=True, batch_first=True)
        self.cell = nn.GRUCell(96, 40)
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).mean((2, 3)).unsqueeze(1).repeat(1, 5, 1)
        o, _ = self.lstm(y)
        return self.fc(self.cell(o[:, -1]))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    m = ConvLSTM()
    m(torch.randn(2, 1, 10, 10))  # train-mode pass: running statistics become non-trivial
    return m.eval()


EXAMPLE = (torch.randn(1, 1, 10, 10),)


def _eager(m: nn.Module):
    return analyze(LoadedModel(source="t", format="module", sha256="", has_graph=True, module=m,
                               example_inputs=EXAMPLE), stats=False)


def _matrices(m: nn.Module) -> set[str]:
    return {n for n, p in m.named_parameters() if p.ndim >= 2}


def test_every_recurrent_matrix_is_a_layer_with_its_gates(model):
    r = _eager(model)
    inventoried = {t for x in r.layers for t in x.tensors}
    assert _matrices(model) <= inventoried
    rec = {x.name: x for x in r.layers if x.is_recurrent}
    assert len(rec) == 8 + 2  # 2 layers x 2 directions x (ih, hh) + the cell's ih, hh
    assert {x.gates for n, x in rec.items() if n.startswith("lstm.")} == {4}
    assert {x.gates for n, x in rec.items() if n.startswith("cell.")} == {3}
    assert rec["lstm.weight_hh_l1_reverse"].tensors == ["lstm.weight_hh_l1_reverse", "lstm.bias_hh_l1_reverse"]
    assert all(x.type == "recurrent" for x in rec.values())
    assert r.family == "recurrent" and any("recurrent" in f for f in r.findings)


def test_buffers_are_listed_not_counted(model):
    r = _eager(model)
    assert r.total_params == sum(p.numel() for p in model.parameters())
    assert r.total_bytes_fp16 == 2 * r.total_params
    names = {b.name for b in r.buffers}
    assert {"bn.running_mean", "bn.running_var"} <= names
    assert r.buffer_elements == sum(b.numel() for b in model.buffers())


def test_formats_agree_on_layers_params_and_buffers(model, tmp_path):
    eager = _eager(model)
    sd = tmp_path / "m.pt"
    torch.save(model.state_dict(), sd)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, EXAMPLE), pt2)
    for path in (sd, pt2):
        r = analyze(load_model(path), stats=False)
        assert r.total_params == eager.total_params, path.suffix
        assert [x.name for x in r.layers] == [x.name for x in eager.layers], path.suffix
        assert [x.gates for x in r.layers] == [x.gates for x in eager.layers], path.suffix  # weight-only: from shapes
        assert {"bn.running_mean", "bn.running_var"} <= {b.name for b in r.buffers}, path.suffix


def test_plans_say_why_recurrent_layers_are_left_alone(model):
    from compressadvise.plan.engine import recommend

    plan = recommend(_eager(model), target="ane-a17")
    rec = {x.name for x in _eager(model).layers if x.is_recurrent}
    for step in plan.steps:
        assert not rec & set(step.layers)
        reasons = {s.layer: s for s in step.skipped}
        assert rec <= set(reasons), step.technique
        assert all(reasons[n].code == "backend" and "recurrent" in reasons[n].reason for n in rec)


def test_a_state_dicts_batchnorm_is_a_norm_layer(model, tmp_path):
    """A weight-only file names no module class: the layer owning running statistics is a norm."""
    sd = tmp_path / "m.pt"
    torch.save(model.state_dict(), sd)
    r = analyze(load_model(sd), stats=False)
    assert r.layer("bn").type == "norm" == _eager(model).layer("bn").type
