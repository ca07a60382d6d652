"""`apply` builds what was planned: every OS x technique, planned vs built as a gate, torch <-> Core ML
parity, and the converter frontend that works for the model (issue 16).

Small models built here with fixed seeds; each .mlpackage is re-opened from disk (no prediction:
macOS-only) and its weights decompressed with coremltools' own pass.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn

import compressadvise as ca
from compressadvise.backends import apply_coreml, kmeans
from compressadvise.backends.apply_gate import PlanNotBuilt
from compressadvise.errors import CompressionFailed, InvalidKnowledge
from compressadvise.model.loading import LoadedModel, load_model
from compressadvise.knowledge.schema import Plan, PlanTarget, Prediction, Step
from test_apply import small_mlp

LAYERS = ["fc1", "fc2"]
# (technique, slot, params, Core ML op on iOS 16/17, on iOS 18); None: the OS cannot load it.
MATRIX = {
    "palettize": ("palettization", "weights", {"nbits": 4, "granularity": "per_tensor"},
                  "constexpr_lut_to_dense", "constexpr_lut_to_dense"),
    "palettize_grouped": ("palettization", "weights", {"nbits": 4, "granularity": "per_grouped_channel",
                                                       "group_size": 16}, None, "constexpr_lut_to_dense"),
    "int8": ("linear_quantization", "weights", {"nbits": 8},
             "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale"),
    "int4_block": ("linear_quantization", "weights", {"nbits": 4, "granularity": "per_block", "block_size": 32,
                                                      "mode": "linear"}, None, "constexpr_blockwise_shift_scale"),
    "prune": ("pruning", "sparsity", {"sparsity": 0.5}, "constexpr_sparse_to_dense", "constexpr_sparse_to_dense"),
    "joint": ("joint_compression", "weights", {"sparsity": 0.5, "nbits": 4, "granularity": "per_tensor"},
              None, "constexpr_lut_to_sparse"),
}


def _plan(technique: str, slot: str, params: dict, os: int, layers=LAYERS, target: str = "ane-a14") -> Plan:
    return Plan(target=PlanTarget(name=target, os=os),
                steps=[Step(technique=technique, slot=slot, params=params, layers=list(layers))])


@pytest.fixture(scope="module")
def mlp_pt2(tmp_path_factory) -> LoadedModel:
    m = small_mlp()
    path = tmp_path_factory.mktemp("pt2") / "mlp.pt2"
    torch.export.save(torch.export.export(m.module, m.example_inputs), path)
    return load_model(path)


def _coreml(manifest: dict, name: str) -> dict:
    layer = next(x for x in manifest["layers"] if x["name"] == name)
    return next(e["coreml"] for e in layer["steps"] if "coreml" in e)


@pytest.mark.parametrize("os_major", [16, 17, 18])
@pytest.mark.parametrize("form", sorted(MATRIX))
@pytest.mark.parametrize("fmt", ["eager", "pt2"])
def test_os_by_technique(fmt, form, os_major, mlp_pt2, tmp_path):
    technique, slot, params, op_old, op_18 = MATRIX[form]
    op = op_18 if os_major >= 18 else op_old
    model = small_mlp() if fmt == "eager" else mlp_pt2
    plan = _plan(technique, slot, params, os_major)
    if op is None:  # refused before any work, with the OS the target's YAML names
        with pytest.raises(InvalidKnowledge, match=r"cannot load on OS %d .*from OS 18" % os_major):
            ca.apply(model, plan, tmp_path / "o")
        assert not (tmp_path / "o").exists()
        return
    m = ca.apply(model, plan, tmp_path / "o").manifest
    gate = m["planned_vs_built"]
    assert gate["ok"] and gate["layers_built"] == gate["layers_planned"] == 2 and not gate["rows"]
    for name in LAYERS:
        rec = _coreml(m, name)
        assert rec["status"] == "applied" and op in rec["evidence"], rec
        if "nbits" in params and technique == "palettization":
            assert f"LUT {2 ** params['nbits']} entries" in rec["evidence"]
        if "sparsity" in params:
            found = re.search(r"sparsity (\d+\.\d)%", rec["evidence"])
            assert found and 49.5 <= float(found.group(1)) <= 51, rec["evidence"]
        if fmt == "eager":  # the torch side compressed it: the .mlpackage must hold the same values
            w = small_mlp().module.get_submodule(name).weight
            assert rec["parity_max_abs_diff"] <= 2e-3 * float(w.abs().max())
        else:  # no torch side: the torch artefact is the program carrying the .mlpackage's weights
            assert rec["parity"].startswith("snapped") and rec["parity_max_abs_diff"] == 0
    if fmt == "pt2":
        assert m["torch_artifact"] == "model.pt2" and "the .mlpackage's weights" in m["torch_note"]


def test_parity_mismatch_fails_apply(monkeypatch, tmp_path):
    # Feed the parity check torch weights that are not the ones converted: apply must refuse.
    real = apply_coreml._decompress_one

    def shifted(*a, **k):
        v = real(*a, **k)
        return None if v is None else v + 0.05

    monkeypatch.setattr(apply_coreml, "_decompress_one", shifted)
    monkeypatch.setattr(apply_coreml, "_snap", lambda *a, **k: False)  # nothing closes the gap
    monkeypatch.setattr(kmeans, "shared", lambda p, joint: False)  # both sides cluster: the torch side's values compared
    with pytest.raises(CompressionFailed, match=r"not the torch side's for fc1: max \|Core ML - torch\| = 0\.0[5-9]"):
        ca.apply(small_mlp(), _plan("palettization", "weights", {"nbits": 4}, 18), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_luts_left_to_the_mlpackage_must_reach_the_torch_artefact(monkeypatch, tmp_path):
    # The bounded native route clusters once, on the Core ML side; the torch side takes those LUTs
    # by the snap. A snap that fails would leave float weights in what verify measures: refused.
    monkeypatch.setattr(apply_coreml, "_snap", lambda *a, **k: False)
    with pytest.raises(CompressionFailed, match=r"LUTs for fc1, fc2 could not be copied into the torch artefact"):
        ca.apply(small_mlp(), _plan("palettization", "weights", {"nbits": 4}, 18), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def _predicted(model: LoadedModel, plan: Plan, tmp_path) -> Plan:
    """The plan with the prediction the build measures (what recommend would write)."""
    built = ca.apply(model, plan, tmp_path / "probe").manifest["planned_vs_built"]["built_bytes"]
    return plan.model_copy(update={"prediction": Prediction(bytes_before=4 * built, bytes_after=built, ratio=4.0)})


def test_size_off_the_plan_fails_unless_allowed(tmp_path):
    plan = _predicted(small_mlp(), _plan("palettization", "weights", {"nbits": 4}, 18), tmp_path)
    assert ca.apply(small_mlp(), plan, tmp_path / "ok").manifest["planned_vs_built"]["size_error"] == 0
    low = plan.model_copy(update={"prediction": plan.prediction.model_copy(
        update={"bytes_after": int(plan.prediction.bytes_after * 0.8)})})
    with pytest.raises(PlanNotBuilt, match=r"2 of 2 planned layer\(s\) built; .* \(\+25\.0%, tolerance 2%\)") as e:
        ca.apply(small_mlp(), low, tmp_path / "bad")
    assert e.value.exit_code == 8 and not (tmp_path / "bad").exists()
    m = ca.apply(small_mlp(), low, tmp_path / "partial", allow_partial=True).manifest
    assert list(m)[:2] == ["manifest_version", "planned_vs_built"]  # the manifest leads with it
    assert m["planned_vs_built"]["ok"] is False and m["notes"][0].startswith("planned vs built differ")


def test_torch_only_target_is_gated_on_the_bytes_its_artefact_stores(tmp_path):
    # x86-cpu ships the torch artefact: the gate compares the plan's prediction with the tensors read
    # back from it (int8 data + scales + float tensors), not with a re-estimate or the file size.
    model = small_mlp()
    plan = ca.recommend(model, target="x86-cpu", constraints={"max_size_mb": 0.05})
    assert plan.steps and plan.steps[0].layers
    gate = ca.apply(small_mlp(), plan, tmp_path / "ok").manifest["planned_vs_built"]
    assert gate["side"] == "torch" and gate["ok"] and abs(gate["size_error"]) <= 0.02, gate
    int8 = sum(p.numel() for n, p in model.module.named_parameters() if n.split(".")[0] in plan.steps[0].layers
               and n.endswith("weight"))
    assert gate["built_bytes"] < sum(p.numel() * 4 for p in model.module.parameters()) - 2 * int8
    off = plan.model_copy(update={"prediction": plan.prediction.model_copy(
        update={"bytes_after": int(gate["built_bytes"] * 0.5)})})
    with pytest.raises(PlanNotBuilt, match=r"\(\+100\.0%, tolerance 2%\)"):
        ca.apply(small_mlp(), off, tmp_path / "bad")


def test_a_program_is_not_planned_what_only_eager_code_can_build(mlp_pt2):
    # torchao compresses nn.Linear modules; a .pt2 has none: recommend must not plan what apply refuses.
    plan = ca.recommend(mlp_pt2, target="x86-cpu", constraints={"max_size_mb": 0.05})
    assert not plan.steps
    entry = next(e for e in plan.trace if e.status == "unsupported")
    assert "module:function" in entry.detail
    assert ca.recommend(small_mlp(), target="x86-cpu", constraints={"max_size_mb": 0.05}).steps


def test_planned_layer_left_alone_is_a_gate_row(tmp_path):
    # `head` (640 weights) is under coremltools' weight_threshold: planned, so it must not vanish silently.
    plan = _plan("palettization", "weights", {"nbits": 4}, 18, layers=["fc1", "fc2", "head"])
    with pytest.raises(PlanNotBuilt) as e:
        ca.apply(small_mlp(), plan, tmp_path / "o")
    rows = e.value.gate["rows"]
    assert [r["layer"] for r in rows] == ["head"] and "weight_threshold" in rows[0]["reason"]
    assert e.value.gate["layers_planned"] == 3 and e.value.gate["layers_built"] == 2


def test_cli_gate_exit_code_and_table(tmp_path, capsys):
    from compressadvise.ui.cli import main
    from compressadvise.plan.planfile import plan_to_yaml

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(plan_to_yaml(_plan("palettization", "weights", {"nbits": 4}, 18,
                                            layers=["conv", "fc", "stem"], target="ane-a17")))
    with pytest.raises(SystemExit) as e:
        main(["apply", "--plan", str(plan_file), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 8 and "planned vs built" in err and "stem" in err and "weight_threshold" in err
    with pytest.raises(SystemExit) as e:
        main(["apply", "--plan", str(plan_file), "--out", str(tmp_path / "o"), "--allow-partial", "--json"])
    assert e.value.code in (0, None)
    m = json.loads(capsys.readouterr().out)["manifest"]
    assert [r["layer"] for r in m["planned_vs_built"]["rows"]] == ["stem"]


class ConvLSTM(nn.Module):
    """conv1d features into an LSTM and a linear head: coremltools' torch.export frontend lacks LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(16, 64, 3, padding=1)
        self.lstm = nn.LSTM(64, 32, batch_first=True)
        self.head = nn.Linear(32, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(torch.relu(self.conv(x)).transpose(1, 2))
        return self.head(y)


def test_pt2_with_lstm_converts_through_torchscript(tmp_path):
    torch.manual_seed(0)
    m = ConvLSTM().eval()
    path = tmp_path / "convlstm.pt2"
    torch.export.save(torch.export.export(m, (torch.randn(1, 16, 20),)), path)
    out = ca.apply(load_model(path), _plan("palettization", "weights", {"nbits": 6}, 18, layers=["conv", "head"]),
                   tmp_path / "o").manifest
    assert out["coreml"]["conversion"].startswith("TorchScript trace of the program (torch.export frontend: ")
    assert "lstm" in out["coreml"]["conversion"]
    assert out["planned_vs_built"]["ok"]
    assert {_coreml(out, n)["matched_by"] for n in ("conv", "head")} == {"name"}


def test_report_of_a_partial_build_draws_what_was_built(tmp_path):
    # The digits CNN with its 320-weight stem planned: apply leaves it (weight_threshold); the report
    # must show it uncompressed and marked, not as the plan drew it.
    from compressadvise.ui import report as R

    plan = _plan("palettization", "weights", {"nbits": 4}, 18, layers=["conv", "fc", "stem"], target="ane-a17")
    run = tmp_path / "run"
    ca.apply(None, plan, run, allow_partial=True)
    R.write_report(run, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    built = html[html.index('<section id="built">'):]
    built = built[:built.index("</section>")]  # the planned-vs-built section leads the page
    assert "<b>DIFFERS from the plan</b>" in built and "2 of 3 planned layer(s) built" in built
    row = html[html.index("<td class=name>stem</td>"):]
    row = row[:row.index("</tr>")]
    assert "<td class=notbuilt>planned, not built:" in row and "weight_threshold" in row


def test_pt2_torch_artefact_is_the_folded_program_with_the_shipped_weights(tmp_path):
    # A conv + BatchNorm CNN as a .pt2: Core ML folds and compresses it; the torch artefact verify runs
    # must be that folded, compressed model (not the float program, which has no torch side to compress).
    from compressadvise.backends.apply import load_artifact

    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.BatchNorm2d(64),
                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 40)).eval()
    for bn in (m[1], m[4]):  # statistics far from identity, so a fold that did not happen shows
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.05, 4)
        bn.weight.data.uniform_(0.5, 2)
    x = torch.randn(1, 16, 16, 16)
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(m, (x,)), path)
    out = ca.apply(load_model(path), _plan("palettization", "weights", {"nbits": 6}, 18, layers=["0", "3", "8"]),
                   tmp_path / "o").manifest
    assert out["planned_vs_built"]["ok"] and {_coreml(out, n)["matched_by"] for n in ("0", "3")} == {"value"}
    art = load_artifact(tmp_path / "o")
    weights = dict(art.tensors())
    assert len(torch.unique(weights["0.weight"])) <= 64 and len(torch.unique(weights["3.weight"])) <= 64
    with torch.no_grad():
        ref, got = m(x), art.runnable()(x)
    assert float((ref - got).norm() / ref.norm()) < 0.05  # 6-bit LUTs of the folded weights, BN folded in
    assert not any("batch_norm" in str(n.target) for n in torch.export.load(tmp_path / "o" / "model.pt2").graph.nodes)
    # the manifest names the folds, so verify's drift compares each folded conv with its BatchNorm's output
    assert [(f["layer"], f["bn"]) for f in out["folded"]] == [("0", "1"), ("3", "4")]
    from compressadvise.measure.verify import verify
    from compressadvise.model.samples import Samples

    v = verify(load_model(path), tmp_path / "o", samples=Samples([torch.randn(8, 16, 16, 16)]), latency=False)
    snr = {r.name: r.snr_db for r in v.drift.layers}
    assert snr["0"] > 20 and snr["3"] > 20, snr  # 6-bit LUT noise, not the BatchNorm's whole shift


@pytest.mark.parametrize("os_major", [16, 17])
def test_recurrent_weights_are_predicted_at_the_width_the_os_stores(os_major, tmp_path):
    # Core ML's lstm op is fp32-only before iOS 17 (the targets' `storage`): the plan must predict
    # the fp32 weights it will build, or the gate (rightly) fails a plan that "meets its budget".
    torch.manual_seed(0)
    loaded = LoadedModel(source="test:convlstm", format="module", sha256="convlstm", has_graph=True,
                         module=ConvLSTM().eval(), example_inputs=(torch.randn(1, 16, 20),))
    plans = {os: ca.recommend(loaded, target="ane-a14", os=os) for os in (16, 17)}
    lstm = sum(p.numel() for n, p in loaded.module.named_parameters() if n.startswith("lstm."))  # and biases
    assert plans[16].prediction.bytes_after - plans[17].prediction.bytes_after == 2 * lstm
    gate = ca.apply(loaded, plans[os_major], tmp_path / "o").manifest["planned_vs_built"]
    assert gate["ok"] and abs(gate["size_error"]) <= 0.02, gate


def test_drift_compares_a_folded_layer_with_the_original_batchnorm(tmp_path):
    # The digits CNN's stem is kept at fp16, but its BatchNorm is folded into it: per-layer drift must
    # compare the folded stem with the original stem_bn output (it read -12.5 dB against the bare conv).
    from compressadvise.measure.verify import verify

    plan = _plan("palettization", "weights", {"nbits": 8}, 18, layers=["conv", "fc"], target="ane-a17")
    run = tmp_path / "run"
    m = ca.apply(None, plan, run).manifest
    assert any(f["layer"] == "stem" for f in m["folded"])
    drift = {r.name: r for r in verify("bundled", run, latency=False).drift.layers}
    assert drift["stem"].snr_db > 80, drift["stem"]  # uncompressed: only float rounding of the fold


def test_a_core_ml_weight_in_another_layout_is_never_snapped(monkeypatch, tmp_path):
    # Snapping copies the .mlpackage's weight into the torch artefact: a weight that is not a compressed
    # form of the torch one (here: rows reversed, as a gate reorder would be) must fail, not be copied.
    real = apply_coreml._decompress_one

    def reversed_rows(*a, **k):
        v = real(*a, **k)
        return None if v is None else v[::-1].copy()

    monkeypatch.setattr(apply_coreml, "_decompress_one", reversed_rows)
    with pytest.raises(CompressionFailed, match="is not a compressed form of the torch weight"):
        ca.apply(small_mlp(), _plan("palettization", "weights", {"nbits": 4}, 18), tmp_path / "o")
