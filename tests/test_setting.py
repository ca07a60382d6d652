"""The one Setting value and the one resolver (issue 14, items 1-2): normalised settings,
one label builder, modes from the techniques' `requires`, plans that carry settings as data,
sizing and apply reading the same per-layer parameters, the report joining by setting key."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import compressadvise as ca
from compressadvise.ui import report as R
from compressadvise.backends.apply import effective, resolve
from compressadvise.plan.engine import _describe, recommend
from compressadvise.measure.estimate import from_plan, mode_of_setting
from compressadvise.knowledge.base import builtin
from compressadvise.model.loading import LoadedModel
from compressadvise.plan.planfile import load_plan, save_plan
from compressadvise.knowledge.schema import Plan, PlanModel, PlanTarget, Step
from compressadvise.plan.setting import FP16, Setting
from compressadvise.plan.whatif import predict


@pytest.fixture(scope="module")
def k():
    return builtin()


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    m = nn.Sequential()
    for name, (i, o) in {"l0": (128, 128), "l1": (128, 256), "l2": (256, 128), "l3": (128, 64)}.items():
        m.add_module(name, nn.Linear(i, o))
    return ca.analyze(LoadedModel("test", "factory", "abc", has_graph=True, module=m), input_shape=[1, 128])


def _plan(*steps: Step) -> Plan:
    return Plan(target=PlanTarget(name="ane-a17", os=18), model=PlanModel(), steps=list(steps))


# ------------------------------------------------------------------ the value
def test_resolve_fills_defaults_and_keeps_only_what_matters(k):
    pal = k.techniques["palettization"]
    s = Setting.resolve(pal, {"nbits": 4, "granularity": "per_tensor", "group_size": 16})
    assert "group_size" not in s.p and s.p["lut_dtype"] == "fp16" and s.p["nbits"] == 4
    assert dict(s.backend) == {"weight_threshold": 2048} and s.all_params["weight_threshold"] == 2048
    lin = k.techniques["linear_quantization"]
    assert "block_size" not in Setting.resolve(lin, {"granularity": "per_channel"}).p
    assert Setting.resolve(lin, {"granularity": "per_block"}).p["block_size"] == 32
    prune = k.techniques["pruning"]
    assert {"n", "m", "block_size"}.isdisjoint(Setting.resolve(prune, {}).p)
    assert Setting.resolve(prune, {"pattern": "n_m"}).p["n"] == 2
    # two spellings of one compression are one setting, one key; the backend threshold is not part of it
    a = Setting.resolve(pal, {"nbits": 4, "weight_threshold": 0})
    b = Setting.resolve(pal, {"nbits": 4, "group_size": 8, "lut_dtype": "fp16"})
    assert a == b and a.key == b.key and hash(a) == hash(b)


def test_setting_dict_round_trip_keeps_backend_params(k):
    s = Setting.resolve(k.techniques["linear_quantization"], {"nbits": 4, "mode": "linear", "weight_threshold": 0})
    d = json.loads(json.dumps(s.to_dict()))
    back = Setting.from_dict(d)
    assert back == s and back.key == s.key and back.all_params == s.all_params and back.backend == s.backend
    assert Setting.from_dict(FP16.to_dict()) == FP16


def test_one_label_builder(k, report):
    lin = k.techniques["linear_quantization"]
    asym = Setting.resolve(lin, {"nbits": 4, "granularity": "per_channel", "mode": "linear"})
    assert asym.label == "4-bit linear_quantization per_channel asym"
    assert Setting.resolve(lin, {"granularity": "per_block", "nbits": 4}).label == \
        "4-bit linear_quantization per_block bs=32"
    assert Setting.resolve(k.techniques["palettization"], {"nbits": 4, "granularity": "per_grouped_channel"}).label == \
        "4-bit palettization per_grouped_channel gs=16"
    assert Setting.resolve(k.techniques["pruning"], {"sparsity": 0.5}).label == "pruning 50%"
    assert Setting.resolve(k.techniques["pruning"], {"pattern": "n_m"}).label == "pruning 2:4"
    assert FP16.label == "fp16 (unchanged)"
    # the engine and sensitivity use the same builder (sensitivity.Setting is this class)
    from compressadvise.measure import sensitivity

    assert sensitivity.Setting is Setting and sensitivity.FP16 == FP16
    step = Step(technique="linear_quantization", slot="weights", layers=["l1"],
                params={"nbits": 4, "granularity": "per_channel", "mode": "linear"})
    x = next(x for x in report.layers if x.name == "l1")
    assert _describe(k, step, x) == asym.label
    sized = predict(_plan(step), report, k)
    row = next(r for r in sized.layers if r.name == "l1")
    assert row.setting == asym.label and Setting.from_dict(row.settings[0]) == asym


def test_modes_come_from_requires_not_text(k):
    pal = k.techniques["palettization"]
    grouped = Setting.resolve(pal, {"nbits": 4, "granularity": "per_grouped_channel"})
    assert grouped.modes(k) == ["palettize", "palettize_grouped"]
    assert Setting.resolve(pal, {"nbits": 3}).modes(k) == ["palettize", "palettize_3bit"]
    lin = k.techniques["linear_quantization"]
    assert Setting.resolve(lin, {"nbits": 4, "granularity": "per_block"}).modes(k) == ["linear_int4", "linear_per_block"]
    assert FP16.modes(k) == []
    # the primary mode agrees with the legacy label reading on every label it understood
    for s in (grouped, Setting.resolve(pal, {"nbits": 3}), Setting.resolve(pal, {"nbits": 8}),
              Setting.resolve(lin, {"nbits": 4, "granularity": "per_block"}), Setting.resolve(lin, {"nbits": 8})):
        assert s.primary_mode(k) == mode_of_setting(s.label)


def test_weight_bytes_is_the_technique_formula(k, report):
    x = next(x for x in report.layers if x.name == "l1")  # 256 x 128
    s = Setting.resolve(k.techniques["palettization"], {"nbits": 4})
    assert s.weight_bytes(k, x, 2.0) == 256 * 128 * 4 / 8 + 16 * 2


# ------------------------------------------------------------------ plans carry settings
def test_setting_round_trips_through_plan_yaml_and_json(k, report, tmp_path):
    plan = recommend(report, target="ane-a17", knowledge=k)
    rows = [r for r in plan.layers if r.settings]
    assert rows, "the plan compresses something"
    path = save_plan(plan, tmp_path / "plan.yaml")
    from_yaml = load_plan(path)
    from_json = Plan.model_validate_json(plan.model_dump_json())
    for again in (from_yaml, from_json):
        by_name = {r.name: r for r in again.layers}
        for r in plan.layers:
            assert by_name[r.name].settings == r.settings and by_name[r.name].setting == r.setting
            got = [Setting.from_dict(d) for d in by_name[r.name].settings]
            assert got == [Setting.from_dict(d) for d in r.settings]
            assert " + ".join(s.label for s in got) == r.setting  # the label is the Setting's, not parsed


def test_plan_rows_give_the_roofline_its_modes(k, report):
    step = Step(technique="palettization", slot="weights", layers=["l1", "l2"],
                params={"nbits": 4, "granularity": "per_grouped_channel", "group_size": 16})
    plan = predict(_plan(step), report, k)
    comp = from_plan(plan.layers, k)
    assert comp["l1"].mode == "palettize_grouped" and comp["l1"].modes == ["palettize", "palettize_grouped"]
    assert from_plan(plan.layers)["l1"].mode == "palettize_grouped"  # without knowledge: the legacy reading


def test_op_type_params_are_sized_and_applied_with_the_same_parameters(k, report):
    step = Step(technique="palettization", slot="weights", layers=["l0", "l1", "l2", "l3"],
                params={"nbits": 8, "granularity": "per_tensor", "weight_threshold": 0},
                op_type_params={"linear": {"nbits": 4}, "Linear": {"granularity": "per_grouped_channel"}},
                op_name_params={"l2": {"nbits": 6}})
    sized = predict(_plan(step), report, k)
    jobs = resolve(_plan(step), k, report, k.target("ane-a17"))
    applied = {lj.name: lj.params for lj in jobs[0].layers}
    assert set(applied) == {"l0", "l1", "l2", "l3"}
    from compressadvise.backends.apply_manifest import _layer_records

    manifest = {r["name"]: r["steps"] for r in _layer_records(report, jobs, {})}
    by_name = {x.name: x for x in report.layers}
    for row in sized.layers:
        (d,) = row.settings
        planned = Setting.from_dict(d)
        assert applied[row.name] == planned.all_params == effective(k.techniques["palettization"], step,
                                                                      by_name[row.name])
        (entry,) = manifest[row.name]  # the manifest names the setting sizing predicted
        assert entry["setting"] == {"key": planned.key, "label": planned.label}
        want = 6 if row.name == "l2" else 4  # op_name > op_type (layer type) > step params
        assert planned.p["nbits"] == want and planned.p["granularity"] == "per_grouped_channel"
        x = by_name[row.name]
        other = x.params - x.weight_elements
        assert row.bytes_after == math.ceil(planned.weight_bytes(k, x, 2.0) + other * 2.0)


def test_trace_prints_only_the_parameters_that_matter(k, report):
    plan = recommend(report, target="ane-a17", knowledge=k)
    for e in plan.trace:
        if e.status == "fired" and "step:" in e.detail:
            if "per_tensor" in e.detail or "per_channel" in e.detail:
                assert "group_size" not in e.detail, e.detail
            if "per_block" not in e.detail:
                assert "block_size" not in e.detail, e.detail


# ------------------------------------------------------------------ report joins by key
def _sensitivity_json(report, k, settings: list[Setting]) -> dict:
    from compressadvise.measure.sensitivity import LayerRank, Measurement, SensitivityReport

    weights = [x for x in report.layers if len(x.weight_shape) >= 2]
    meas = []
    for i, x in enumerate(weights):
        for j, s in enumerate(settings):
            meas.append(Measurement(layer=x.name, setting=s.key, label=s.label, technique=s.technique, params=s.p,
                                    bytes=int(s.weight_bytes(k, x, 2.0)), metrics={"output_mse": 1e-4 * (i + 1) * (j + 1)},
                                    proxies={}))
    ranking = [LayerRank(layer=x.name, type=x.type, params=x.params, score=1.0, vs_median=1.0, rank=i + 1)
               for i, x in enumerate(weights)]
    rep = SensitivityReport(
        source="test", model_sha256="abc", samples="synthetic", samples_used=1, samples_hash="", output_dim=64,
        logits=False, reference={}, peak=4.0, baseline_bytes_per_param=2.0, layers=[x.name for x in weights],
        settings=[s.key for s in settings], measurements=meas, ranking=ranking, proxies=[], evaluations=len(meas),
        cache_hits=0, cache_dir=None, executor="test", workers=1, wall_s=0.0)
    return json.loads(rep.model_dump_json())


def test_searched_asymmetric_int4_plan_meets_its_own_sensitivity_rows(k, report, tmp_path):
    # grid settings as sensitivity spells them (no defaults filled in)
    asym4 = Setting.of("linear_quantization", nbits=4, granularity="per_channel", mode="linear")
    sym8 = Setting.of("linear_quantization", nbits=8, granularity="per_channel", mode="linear_symmetric")
    sens = _sensitivity_json(report, k, [asym4, sym8])
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(sens))
    # the plan as search writes it: the common setting as step params, the others per name
    step = Step(technique="linear_quantization", slot="weights", layers=["l0", "l1", "l2", "l3"],
                params={**asym4.p, "weight_threshold": 0}, op_name_params={"l3": sym8.p})
    plan = predict(_plan(step), report, k)
    assert {r.name: r.setting for r in plan.layers}["l1"] == asym4.label  # ' asym' on both sides
    data = R.build(R.gather(report, plan=plan, sensitivity=path), knowledge=k)
    points = {p.name: p for p in R._predicted_points(data, R.keyed(R.load_sensitivity(path), k))}
    assert "the plan (predicted)" in points
    mse = {(m["layer"], m["setting"]): m["metrics"]["output_mse"] for m in sens["measurements"]}
    total = sum(mse[(n, (sym8 if n == "l3" else asym4).key)] for n in ("l0", "l1", "l2", "l3"))
    assert points["the plan (predicted)"].value == pytest.approx(10 * math.log10(4.0 ** 2 / total))
    assert {"uniform " + asym4.label, "uniform " + sym8.label} <= set(points)
    keys = {r.name: r.setting_key for r in data.layers}
    assert keys["l1"] == Setting.normalised(k, asym4.technique, asym4.p).key
