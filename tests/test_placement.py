"""The pre-flight placement check: ops the target's accelerator lacks, and the unit switches.

Each graph kind the tool reads (fx trace, torch.export program, TorchScript, a converted Core ML
program, weights only) is checked on a model with ops the Neural Engine lacks and on one without.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import run_captured
from compressadvise.knowledge.base import builtin
from compressadvise.measure.placement import check, for_mlpackage
from compressadvise.model.analysis import analyze
from compressadvise.model.loading import LoadedModel, load_model


class ConvLSTM(nn.Module):
    """conv -> LSTM -> classifier: the LSTM sits between Neural Engine ops (two switches)."""

    def __init__(self, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(32, 64, 3, padding=dilation, dilation=dilation)
        self.lstm = nn.LSTM(64, 64, batch_first=True)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).transpose(1, 2)
        o, _ = self.lstm(h)
        return self.fc(o[:, -1])


class ConvGRU(ConvLSTM):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.GRU(64, 64, batch_first=True)


class ConvOnly(nn.Module):
    def __init__(self, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(32, 64, 3, padding=dilation, dilation=dilation)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(-1))


X = torch.randn(1, 32, 16)
ANE = builtin().target("ane-a17")


def _loaded(module: nn.Module, **kw) -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("test", "factory", "t", has_graph=True, module=module.eval(), example_inputs=(X,), **kw)


def _placed(loaded: LoadedModel, target=ANE):
    return check(analyze(loaded, stats=False).ops, target)


def test_lstm_falls_back_between_two_switches_fx():
    rep = _placed(_loaded(ConvLSTM()))
    assert rep.basis == "torch.fx trace" and rep.accelerator == "NE"
    assert [(p.op, p.layer, p.runs_on, p.entry) for p in rep.fallback] == [("LSTM", "lstm", "CPU", "recurrent")]
    assert [(b.from_unit, b.to_unit) for b in rep.boundaries] == [("NE", "CPU"), ("CPU", "NE")]
    # the crossing tensors' sizes come from the example input: relu's (1, 64, 16) and the LSTM's output
    assert rep.boundaries[0].bytes == 64 * 16 * 2
    assert rep.switch_ms is not None and rep.switch_ms > 0
    assert all(p.source and p.confidence == "reported" for p in rep.fallback)


def test_no_fallback_no_switch():
    rep = _placed(_loaded(ConvOnly()))
    assert rep.fallback == [] and rep.boundaries == [] and rep.ops_total >= 3


def test_dilated_conv_only_when_dilated():
    assert [p.entry for p in _placed(_loaded(ConvOnly(dilation=2))).fallback] == ["dilated_conv"]
    assert _placed(_loaded(ConvOnly(dilation=1))).fallback == []


def test_export_program_and_torchscript_agree_with_fx():
    """The same model read from a torch.export program and from a TorchScript archive: the same
    op falls back, with the same switches."""
    m = ConvLSTM().eval()
    ep = torch.export.export(m, (X,), strict=False)
    from_ep = _placed(LoadedModel("t.pt2", "exported", "t", has_graph=True, exported=ep, example_inputs=(X,)))
    scripted = torch.jit.trace(m, (X,))
    from_ts = _placed(LoadedModel("t.ts", "torchscript", "t", has_graph=True, scripted=scripted))
    for rep, op in ((from_ep, "lstm"), (from_ts, "lstm")):
        assert [p.op for p in rep.fallback] == [op], rep.basis
        assert [(b.from_unit, b.to_unit) for b in rep.boundaries] == [("NE", "CPU"), ("CPU", "NE")], rep.basis
    assert from_ep.basis == "torch.export graph" and from_ts.basis == "TorchScript graph"
    assert from_ep.fallback[0].layer == "lstm"


def test_weights_only_finds_recurrent_layers_without_counting_switches(tmp_path):
    path = tmp_path / "w.pt"
    torch.save(ConvLSTM().state_dict(), path)
    rep = _placed(load_model(str(path)))
    assert rep.basis == "layer inventory (no graph)" and not rep.switches_counted
    assert [p.op for p in rep.fallback] == ["LSTM"] and rep.boundaries == []
    assert any("not counted" in n for n in rep.notes)


def test_targets_without_a_table_say_so():
    rep = _placed(_loaded(ConvLSTM()), builtin().target("mac-gpu"))
    assert rep.accelerator is None and rep.fallback == [] and "lists no ops" in rep.notes[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """The conv + LSTM model converted by coremltools (TorchScript frontend: it has the LSTM), at
    float 16 and at float 32 compute precision."""
    from compressadvise.backends import import_quietly, quiet

    ct = import_quietly("coremltools")
    folder = tmp_path_factory.mktemp("coreml")
    traced = torch.jit.trace(ConvLSTM().eval(), (X,))
    out = {}
    for name, precision in (("fp16", ct.precision.FLOAT16), ("fp32", ct.precision.FLOAT32)):
        with quiet():
            ml = ct.convert(traced, inputs=[ct.TensorType(shape=X.shape)], convert_to="mlprogram",
                            minimum_deployment_target=ct.target.iOS17, compute_precision=precision)
        out[name] = folder / f"{name}.mlpackage"
        ml.save(str(out[name]))
    gru = torch.jit.trace(ConvGRU().eval(), (X,))
    with quiet():
        ml = ct.convert(gru, inputs=[ct.TensorType(shape=X.shape)], convert_to="mlprogram",
                        minimum_deployment_target=ct.target.iOS17)
    out["gru"] = folder / "gru.mlpackage"
    ml.save(str(out["gru"]))
    return out


def test_converted_program_lstm_and_fp32(converted):
    """After conversion the MIL ops decide: the lstm op falls back; at float 32 the conv and
    linear compute in fp32 too, which the Neural Engine does not (documented)."""
    fp16 = for_mlpackage(str(converted["fp16"]), ANE)
    assert fp16.basis == "Core ML program"
    assert [p.op for p in fp16.fallback] == ["lstm"]
    assert len(fp16.boundaries) == 2 and all(b.bytes for b in fp16.boundaries)
    fp32 = for_mlpackage(str(converted["fp32"]), ANE)
    entries = {(p.op, p.entry) for p in fp32.fallback}
    assert {("conv", "fp32_compute"), ("linear", "fp32_compute"), ("lstm", "recurrent")} <= entries
    assert {p.confidence for p in fp32.fallback if p.entry == "fp32_compute"} == {"documented"}


def test_converted_gru_is_a_loop_that_runs_on_the_cpu(converted):
    """coremltools lowers nn.GRU to a while_loop of linears: the loop falls back, and its body
    (linears, a gather) runs with it: one fallback and two switches, not one per body op."""
    rep = for_mlpackage(str(converted["gru"]), ANE)
    assert [(p.op, p.entry) for p in rep.fallback] == [("while_loop", "control_flow")]
    assert [(b.from_unit, b.to_unit) for b in rep.boundaries] == [("NE", "CPU"), ("CPU", "NE")]


def test_report_reads_the_built_package_and_refuses_paths_outside_the_folder(converted, tmp_path):
    from compressadvise.knowledge.schema import Plan, PlanTarget
    from compressadvise.ui.report import Inputs, _placement

    run = converted["fp16"].parent
    plan = Plan(target=PlanTarget(name="ane-a17", os=18))
    rep = _placement(Inputs(source=str(run), plan=plan, manifest={"mlpackage": "fp16.mlpackage"}, run_dir=run),
                     builtin())
    assert rep.basis == "Core ML program" and [p.op for p in rep.fallback] == ["lstm"]
    hostile = Inputs(source=str(tmp_path), plan=plan, manifest={"mlpackage": f"../{run.name}/fp16.mlpackage"},
                     run_dir=tmp_path)
    assert _placement(hostile, builtin()) is None  # not read: no report, no plan placement either


def test_recommend_advises_and_records_placement(tmp_path):
    from compressadvise.plan.engine import recommend
    from compressadvise.plan.planfile import load_plan, save_plan

    plan = recommend(analyze(_loaded(ConvLSTM()), stats=False), target="ane-a17")
    adv = next(a for a in plan.advisories if a.code == "TGT010")
    assert "1 op(s) the NE lacks" in adv.message and "LSTM at lstm (CPU)" in adv.message
    assert "2 switch(es)" in adv.message
    assert plan.placement is not None and plan.placement.fallback[0].layer == "lstm"
    save_plan(plan, tmp_path / "plan.yaml")
    assert load_plan(tmp_path / "plan.yaml").placement == plan.placement
    quiet = recommend(analyze(_loaded(ConvOnly()), stats=False), target="ane-a17")
    assert "TGT010" not in {a.code for a in quiet.advisories} and not quiet.placement.fallback


def test_targets_json_lists_each_fallback_with_its_source(capsys):
    code, out, err = run_captured(capsys, "targets", "ane-a17", "--json")
    assert code == 0, err
    ops = json.loads(out)["placement"]["fallback_ops"]
    assert {"recurrent", "gather", "dilated_conv", "fp32_compute"} <= {o["name"] for o in ops}
    assert all(o["source"] and o["confidence"] in ("documented", "measured", "reported") for o in ops)
    assert "lstm" in next(o for o in ops if o["name"] == "recurrent")["mil"]
    _, text, _ = run_captured(capsys, "targets", "ane-a17")
    assert "Ops the NE lacks" in text and "hollance/neural-engine" in text
    assert run_captured(capsys, "targets", "ane-a71")[0] == 2


def test_analyze_target_shows_the_hot_spots(tmp_path, capsys):
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(ConvLSTM().eval(), (X,), strict=False), str(path))
    code, out, err = run_captured(capsys, "analyze", str(path), "--target", "ane-a17")
    assert code == 0, err
    assert "Placement on ane-a17" in out and "recurrent layers" in out
    assert "NE -> CPU" in out and "TGT010" in out
    data = json.loads(run_captured(capsys, "analyze", str(path), "--target", "ane-a17", "--json")[1])
    assert [p["op"] for p in data["placement"]["fallback"]] == ["lstm"]
    assert "placement" not in json.loads(run_captured(capsys, "analyze", str(path), "--json")[1])


def test_report_section_names_the_hot_spots_and_embeds_the_rule():
    from compressadvise.plan.engine import recommend
    from compressadvise.ui.report import Inputs, build
    from compressadvise.ui.report_html import _placement_html

    report = analyze(_loaded(ConvLSTM()), stats=False)
    data = build(Inputs(source="t", report=report, plan=recommend(report, target="ane-a17")))
    html = _placement_html(data)
    assert 'id="placement"' in html and "<code>LSTM</code>" in html and "NE &rarr; CPU" in html
    assert data.placement_rule.code == "TGT010" and "switching units is costly" in html
    quiet = analyze(_loaded(ConvOnly()), stats=False)
    html = _placement_html(build(Inputs(source="t", report=quiet, plan=recommend(quiet, target="ane-a17"))))
    assert "every op is expected on the NE" in html


def _profile(ops: list[tuple[str, str]], units: str = "ALL"):
    from compressadvise.measure.device_profile import DeviceProfile

    return DeviceProfile.model_validate({
        "schema": "compressadvise.device-profile/1", "device": "iPhone 15 Pro", "os": "iOS 18.1",
        "compute_units": units, "latency_ms": {"median": 1.0},
        "ops": [{"name": f"op{i}", "type": t, "device": d} for i, (t, d) in enumerate(ops)]})


def test_prediction_checked_against_a_device_profile(converted):
    from compressadvise.measure.placement import against_profile

    rep = for_mlpackage(str(converted["fp16"]), ANE)
    same = against_profile(rep, _profile([("ios17.conv", "NE"), ("lstm", "CPU"), ("linear", "NE")]))
    assert "predicted off the NE: lstm x1; measured off it: lstm x1" in same[0] and same[-1] == "the prediction matches the device"
    surprise = against_profile(rep, _profile([("conv", "NE"), ("lstm", "NE"), ("slice_by_index", "CPU"),
                                              ("const", "CPU")]))
    assert any("not in ane-a17's table: slice_by_index x1" in n for n in surprise)
    assert any("predicted off the NE but ran on it on iPhone 15 Pro: lstm x1" in n for n in surprise)
    assert "excludes the Neural Engine" in against_profile(rep, _profile([("lstm", "CPU")], "CPU_AND_GPU"))[0]
    graph = _placed(_loaded(ConvLSTM()))
    assert "op names differ" in against_profile(graph, _profile([("lstm", "CPU")]))[0]
