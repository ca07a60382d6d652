"""Converter gaps a real model hits (issue 16): an LSTMCell (TorchScript's `unsafe_chunk`, which
coremltools lacks) and a learned position table looked up at the example's fixed length (folded to
a constant by the converter unless the sequence dimension is flexible)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import compressadvise as ca
from compressadvise.backends.apply_gate import PlanNotBuilt
from compressadvise.backends.coreml_convert_gaps import fixed_position_lookup
from compressadvise.knowledge.schema import Plan, PlanTarget, Step
from compressadvise.model.loading import LoadedModel, load_model

class CellVAD(nn.Module):
    """Conv features stepped through an LSTMCell with explicit state, as streaming VADs are written."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(16, 64, 3, padding=1)
        self.cell = nn.LSTMCell(64, 32)
        self.head = nn.Linear(32, 80)

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        h, c = self.cell(torch.relu(self.conv(x)).mean(-1), (state[0], state[1]))
        return self.head(h)

class TinyEncoder(nn.Module):
    """Token + learned position embeddings (positions from arange, as BERT and GPT-2 do) and a linear."""

    def __init__(self, positions_from_input: bool = False) -> None:
        super().__init__()
        self.word = nn.Embedding(100, 32)
        self.pos = nn.Embedding(128, 32)
        self.out = nn.Linear(32, 96)
        self.positions_from_input = positions_from_input

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = mask.cumsum(-1) - 1 if self.positions_from_input else torch.arange(ids.shape[1])
        return self.out(self.word(ids) + self.pos(positions))

def _plan(layers: list[str], os: int = 18) -> Plan:
    return Plan(target=PlanTarget(name="ane-a14", os=os),
                steps=[Step(technique="linear_quantization", slot="weights", params={"nbits": 8},
                            layers=layers)])

def _loaded(module: nn.Module, example: tuple) -> LoadedModel:
    return LoadedModel(source="test", format="module", sha256=type(module).__name__, has_graph=True,
                       module=module, example_inputs=example)

def _tokens() -> tuple:
    return torch.randint(0, 100, (1, 5)), torch.ones(1, 5, dtype=torch.long)

@pytest.mark.parametrize("os_major", [16, 18])
def test_lstm_cell_converts_and_its_neighbours_are_built(os_major, tmp_path):
    torch.manual_seed(0)
    model = _loaded(CellVAD().eval(), (torch.randn(1, 16, 12), torch.zeros(2, 1, 32)))
    m = ca.apply(model, _plan(["conv", "head"], os_major), tmp_path / "o").manifest
    assert m["coreml"]["conversion"] == "torch.jit.trace"  # the torch.export frontend lacks lstm_cell
    assert m["planned_vs_built"]["ok"], m["planned_vs_built"]

def test_a_fixed_position_lookup_is_found_from_the_graph():
    ep = torch.export.export(TinyEncoder(), _tokens())
    flex = fixed_position_lookup(ep, _tokens())
    assert flex is not None and (flex.table, flex.length, flex.upper, flex.inputs) == ("pos.weight", 5, 128, (0, 1))
    # positions computed from an input reach the lookup: nothing would fold, the shapes stay as given
    assert fixed_position_lookup(torch.export.export(TinyEncoder(True), _tokens()), _tokens()) is None

@pytest.mark.parametrize("fmt", ["eager", "pt2 dynamic"])
def test_a_position_table_ships_whole_and_the_input_length_is_flexible(fmt, tmp_path):
    import coremltools as ct

    torch.manual_seed(0)
    module = TinyEncoder().eval()
    if fmt == "pt2 dynamic":  # exported by the user with a dynamic length: converted as it is
        seq = torch.export.Dim("seq", min=1, max=128)
        torch.export.save(torch.export.export(module, _tokens(), dynamic_shapes=({1: seq}, {1: seq})),
                          tmp_path / "m.pt2")
        model = load_model(tmp_path / "m.pt2")
    else:  # apply exports it with the length flexible, bounded by the table
        model = _loaded(module, _tokens())
    m = ca.apply(model, _plan(["word", "pos", "out"]), tmp_path / "o").manifest
    assert m["planned_vs_built"]["ok"] and m["planned_vs_built"]["layers_built"] == 3, m["planned_vs_built"]
    if fmt == "eager":
        assert "sequence dimension made flexible (1..128, example 5)" in m["coreml"]["conversion"]
    spec = ct.utils.load_spec(str(tmp_path / "o" / m["mlpackage"]))
    ranges = spec.description.input[0].type.multiArrayType.shapeRange.sizeRanges
    assert (ranges[-1].lowerBound, ranges[-1].upperBound) == (1, 128)

def test_a_program_exported_at_a_fixed_length_fails_the_gate_with_the_fix(tmp_path):
    # Its positions are constants of the program: the converter folds the table; apply must say so.
    torch.export.save(torch.export.export(TinyEncoder().eval(), _tokens()), tmp_path / "m.pt2")
    with pytest.raises(PlanNotBuilt) as e:
        ca.apply(load_model(tmp_path / "m.pt2"), _plan(["word", "pos", "out"]), tmp_path / "o")
    (row,) = e.value.gate["rows"]
    assert row["layer"] == "pos" and "export the model with a dynamic sequence dimension" in row["reason"]

@pytest.mark.parametrize("blocks", [(1, 1), (4, 1), (1, 3), (8, 6)])
def test_lut_decompression_equals_coremltools(blocks):
    # Same values as coremltools' own lut_to_dense (which repeats the LUT per element: 6 GB on a BERT).
    import numpy as np
    from coremltools.optimize import _utils

    from compressadvise.backends.coreml_convert_gaps import lut_to_dense

    rng = np.random.default_rng(0)
    indices = rng.integers(0, 16, size=(24, 18)).astype(np.uint8)
    lut = rng.standard_normal(blocks + (16, 1)).astype(np.float16)
    ours = lut_to_dense(indices, lut)
    assert ours.shape == indices.shape and ours.dtype == lut.dtype
    np.testing.assert_array_equal(ours, _utils.lut_to_dense(indices, lut))

def test_a_table_regrouped_by_a_divisor_is_built_as_planned(tmp_path):
    # LAY011 gives a 102-row table (2 x 3 x 17) group size 6 where the step says 16: apply must
    # build exactly that (grouped LUTs on a gather's weight), within 2% of the plan's size.

    torch.manual_seed(0)
    module = TinyEncoder().eval()
    module.word = nn.Embedding(102, 32)
    model = _loaded(module, _tokens())
    plan = ca.recommend(model, target="ane-a17", os=18, constraints={"max_size_mb": 0.004})
    step = plan.steps[0]
    assert step.params["granularity"] == "per_grouped_channel" and step.params["group_size"] == 16
    assert step.op_name_params["word"]["group_size"] == 6 and "LAY011" in step.rules
    gate = ca.apply(model, plan, tmp_path / "o").manifest["planned_vs_built"]
    assert gate["ok"] and abs(gate["size_error"]) <= 0.02, gate
