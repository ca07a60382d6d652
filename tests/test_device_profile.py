"""Device profiles: loading and its one-line errors, per-op-type calibration against a hand
computation, the three latency labels, verify/search/recommend with --device-profile, and the
macOS path (Core ML timing + MLComputePlan) through fakes that must be called."""
from __future__ import annotations

import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest

from cli_helpers import run_captured
from compressadvise.errors import BadArgument, InputNotFound, InvalidKnowledge
from compressadvise.measure import device_profile as D

FIXTURES = Path(__file__).parent / "fixtures" / "device_profiles"
ORIGINAL = FIXTURES / "iphone15pro_digits_original.json"
PAL4 = FIXTURES / "iphone15pro_digits_pal4.json"
DOCS = Path(__file__).parent.parent / "docs" / "device-profiles.md"
FAST = ("--no-drift", "--no-latency")  # the target estimate is what these tests read


def _write(tmp_path: Path, data: dict | str, name: str = "profile.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


def _fixture(path: Path = ORIGINAL, **changes) -> dict:
    data = json.loads(path.read_text())
    data.update(changes)
    return data


@pytest.fixture(scope="module")
def report():
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import load_model

    return analyze(load_model(None), stats=False)


@pytest.fixture(scope="module")
def target():
    from compressadvise.knowledge.base import builtin

    return builtin().target("ane-a17")


@pytest.fixture(scope="module")
def pal4_pt2(tmp_path_factory):
    """The bundled CNN palettized to 4 bits, as a torch.export program (what verify compares)."""
    from compressadvise.examples import digits
    from test_verify_models import export, palettize

    return export(palettize(digits.trained_model(), 4), tmp_path_factory.mktemp("dp") / "pal4.pt2")


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    from test_verify_models import digits_subset

    return digits_subset(tmp_path_factory.mktemp("dp-samples") / "digits20.npz", n=20)


# ------------------------------------------------------------------ loading
def test_fixtures_and_the_docs_example_load():
    orig, pal4 = D.load_device_profile(ORIGINAL), D.load_device_profile(PAL4)
    assert (orig.device, orig.target, orig.model.role, len(orig.ops)) == ("iPhone 15 Pro", "ane-a17", "original", 16)
    assert sum(D.op_times(orig)) == pytest.approx(orig.latency_ms.median)  # costs sum to 1: shares of the median
    assert pal4.model.role == "compressed" and D.op_family("ios18.conv") == "conv"
    assert D.op_times(pal4)[2] == 0.0098  # a measured op keeps its ms
    example = re.search(r"```json\n(.*?)```", DOCS.read_text(), re.S).group(1)
    assert D.as_profile(json.loads(example)).latency_ms.median == 0.12


@pytest.mark.parametrize("change, message", [
    ({"ops": [{"name": "a", "type": "conv", "device": "ANE"}]}, r":\d+: device profile: 'ops\.0\.device'"),
    ({"latency_ms": {"median": 0}}, r"'latency_ms\.median'.*greater than 0"),
    ({"latency_ms": {"median": 1.0, "min": 2.0}}, r"'latency_ms'.*min \(2 ms\) is above median"),
    ({"latency": 1.0}, r"unknown key 'latency'"),
    ({"schema": "compressadvise.device-profile/9"}, r"'schema'"),
    ({"target": "ane-a71"}, r":\d+: device profile: 'target': unknown target 'ane-a71' \(did you mean 'ane-a17'"),
    ({"compute_units": "NE"}, r"'compute_units'"),
    ({"model": {"role": "original", "sha256": "abc"}}, r"'model\.sha256'"),
])
def test_bad_content_names_the_file_and_the_field(tmp_path, change, message):
    path = _write(tmp_path, _fixture(**change))
    with pytest.raises(InvalidKnowledge, match=re.escape(str(path)) + ".*" + message) as e:
        D.load_device_profile(path)
    assert "\n" not in e.value.one_line()


def test_missing_key_missing_file_bad_json_and_size(tmp_path, monkeypatch):
    data = _fixture()
    del data["latency_ms"]
    with pytest.raises(InvalidKnowledge, match=r"missing required key 'latency_ms'"):
        D.load_device_profile(_write(tmp_path, data))
    with pytest.raises(InputNotFound, match="nope.json: no such device profile"):
        D.load_device_profile(tmp_path / "nope.json")
    bad = _write(tmp_path, '{\n  "schema": "compressadvise.device-profile/1",\n  "device": "x",,\n}', "bad.json")
    with pytest.raises(InvalidKnowledge, match=re.escape(f"{bad}:3: malformed JSON")):
        D.load_device_profile(bad)
    with pytest.raises(InvalidKnowledge, match="not a number JSON allows"):
        D.load_device_profile(_write(tmp_path, '{"latency_ms": {"median": NaN}}', "nan.json"))
    with pytest.raises(InvalidKnowledge, match="duplicate key 'device'"):
        D.load_device_profile(_write(tmp_path, '{"device": "a", "device": "b"}', "dup.json"))
    with pytest.raises(InvalidKnowledge, match=r":1: a device profile is a JSON object"):
        D.load_device_profile(_write(tmp_path, "[]", "list.json"))
    monkeypatch.setattr(D, "MAX_BYTES", 100)
    with pytest.raises(InvalidKnowledge, match="too large for a device profile"):
        D.load_device_profile(ORIGINAL)


# ------------------------------------------------------------------ calibration
def _compressed_layers():
    from compressadvise.measure.estimate import LayerCompression

    return {"conv": LayerCompression(bytes=18_000.0, setting="4-bit palettization", mode="palettize"),
            "fc": LayerCompression(bytes=16_000.0, setting="4-bit palettization", mode="palettize")}


def test_per_type_factors_match_a_hand_computation(report, target):
    from compressadvise.measure.estimate import roofline

    orig, comp = roofline(report, target), roofline(report, target, compression=_compressed_layers())
    o, c = D.calibrate_with_profile(orig, comp, D.load_device_profile(ORIGINAL))
    ms = {r.name: r.ms for r in orig.layers}
    conv_roof = ms["stem"] + ms["dw"] + ms["pw"] + ms["conv"]  # conv and depthwise_conv layers
    linear_roof = ms["fc"] + ms["classifier"]
    # By hand from the fixture: costs of the conv ops 0.10+0.08+0.12+0.22, linear 0.14+0.05, the
    # rest (casts, relus, pools, reshape) 0.29, of a 0.12 ms median.
    conv_ms, linear_ms, other_ms = 0.52 * 0.12, 0.19 * 0.12, 0.29 * 0.12
    assert o.profile["factors"] == pytest.approx({"conv": conv_ms / conv_roof, "linear": linear_ms / linear_roof})
    assert o.profile["other_ms"] == pytest.approx(other_ms)
    assert o.total_ms == pytest.approx(0.12)  # the measured model comes back to its median
    cms = {r.name: r.ms for r in comp.layers}
    expect = (conv_ms / conv_roof * (cms["stem"] + cms["dw"] + cms["pw"] + cms["conv"])
              + linear_ms / linear_roof * (cms["fc"] + cms["classifier"]) + other_ms)
    assert c.total_ms == pytest.approx(expect) and c.total_ms < o.total_ms
    assert next(r for r in c.layers if r.name == "fc").scale == pytest.approx(linear_ms / linear_roof)
    assert o.calibrated and o.basis == c.basis == "calibrated from iPhone 15 Pro profile"


def test_fallbacks_to_one_factor_are_noted(report, target):
    from compressadvise.measure.estimate import roofline

    orig = roofline(report, target)
    only = D.as_profile(_fixture(ops=[]))
    o, _ = D.calibrate_with_profile(orig, None, only)
    assert o.total_ms == pytest.approx(0.12) and o.profile["factors"] == {} and o.profile["other_ms"] == 0
    assert any("latency only" in n for n in o.notes)
    conv_lstm = D.as_profile(_fixture(ops=[{"name": "c", "type": "conv", "device": "NE", "ms": 0.05},
                                           {"name": "l", "type": "lstm", "device": "CPU", "ms": 0.02},
                                           {"name": "r", "type": "relu", "device": "NE", "ms": 0.01}]))
    fit = D.fit_profile(orig, conv_lstm)
    assert set(fit.factors) == {"conv"} and fit.default == fit.factors["conv"]  # linear layers: whole-model factor
    assert fit.other_ms == pytest.approx(0.03)  # relu, plus lstm time with no recurrent layer to scale
    assert any("recurrent ops" in n and "match no estimated layer" in n for n in fit.notes)
    assert any("no profile ops for the linear layers" in n for n in fit.notes)


def test_the_three_labels(report, target, tmp_path):
    from compressadvise.measure.estimate import pair_basis, roofline

    orig, comp = roofline(report, target), roofline(report, target, compression=_compressed_layers())
    assert pair_basis(orig, comp) == "estimate (roofline)"
    o, c = D.calibrate_with_profile(orig, comp, D.load_device_profile(ORIGINAL))
    assert pair_basis(o, c) == "calibrated from iPhone 15 Pro profile"
    sha = "ab" * 32
    measured = D.as_profile(_fixture(PAL4, model={"role": "compressed", "sha256": sha.upper()}))
    o, c = D.calibrate_with_profile(orig, comp, measured, compressed_sha256=["ff" * 32, sha])
    assert c.total_ms == 0.104 and c.basis_label() == "measured on iPhone 15 Pro (iOS 18.1, CPU_AND_NE)"
    assert o.basis_label() == "calibrated from iPhone 15 Pro profile" and o.profile["fitted_on"] == "compressed"
    other = D.calibrate_with_profile(orig, comp, measured, compressed_sha256=["ff" * 32])[1]
    assert other.basis.startswith("calibrated") and any("not this compressed model" in n for n in other.notes)


# ------------------------------------------------------------------ verify
def _verify_json(capsys, *args) -> tuple[int, dict]:
    code, out, err = run_captured(capsys, "verify", *args, "--json", *FAST)
    assert out, err
    return code, json.loads(out)


def test_verify_with_a_profile_changes_label_and_figures(capsys, pal4_pt2, subset, tmp_path):
    common = ("bundled", pal4_pt2, "--samples", subset, "--max-latency-ms", "0.1")
    code, plain = _verify_json(capsys, *common, "--target", "ane-a17")
    assert code == 0 and plain["budgets"][0]["basis"].startswith("estimate (roofline) for ane-a17")
    code, cal = _verify_json(capsys, *common, "--device-profile", ORIGINAL)  # the profile's target
    est = cal["estimate"]
    assert est["original"]["target"] == "ane-a17" and est["compressed"]["basis"] == "calibrated from iPhone 15 Pro profile"
    assert est["original"]["total_ms"] == pytest.approx(0.12)
    assert est["compressed"]["total_ms"] > 10 * plain["estimate"]["compressed"]["total_ms"]
    assert cal["budgets"][0]["basis"] == "calibrated from iPhone 15 Pro profile for ane-a17 (iOS 18)"
    assert cal["budgets"][0]["value"] == pytest.approx(est["compressed"]["total_ms"])
    from compressadvise.fsutil import sha256_file

    mine = _write(tmp_path, _fixture(PAL4, model={"role": "compressed", "sha256": sha256_file(pal4_pt2)}))
    code, out, _ = run_captured(capsys, "verify", *common, "--device-profile", mine, *FAST)
    assert code == 1  # 0.104 ms measured > 0.1
    assert "measured on iPhone 15 Pro (iOS 18.1, CPU_AND_NE)" in out
    assert "original: calibrated from iPhone 15 Pro profile; compressed: measured on iPhone 15 Pro" in out


def test_verify_profile_usage_errors(capsys, tmp_path):
    code, _, err = run_captured(capsys, "verify", "bundled", "x.pt2", "--target", "ane-a14", "--device-profile", ORIGINAL)
    assert code == 2 and "calibrates target 'ane-a17', not 'ane-a14'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_captured(capsys, "verify", "bundled", "x.pt2", "--device-profile", ORIGINAL,
                                "--calibration", ORIGINAL)
    assert code == 2 and "not both" in err
    no_target = _write(tmp_path, {k: v for k, v in _fixture().items() if k != "target"})
    from compressadvise.measure.verify import verify

    with pytest.raises(BadArgument, match="pass --target"):
        verify(None, "x.pt2", device_profile=no_target)


@pytest.mark.skipif(sys.platform == "darwin", reason="the refusal is for machines without Core ML")
def test_write_device_profile_off_macos_exits_7(capsys, tmp_path):
    code, _, err = run_captured(capsys, "verify", "bundled", "x.pt2", "--write-device-profile", tmp_path / "p.json")
    assert code == 7 and "Core ML runs only on macOS" in err and "Xcode's Core ML performance report" in err
    assert not (tmp_path / "p.json").exists()


# ------------------------------------------------------------------ macOS, through fakes
class _Device:
    pass


def _fake_coremltools(calls: list, with_plan: bool = True) -> dict[str, types.ModuleType]:
    """coremltools as verify uses it: MLModel (spec, predict, compiled path), ComputeUnit, and
    MLComputePlan over a main block holding a conditional with two nested blocks."""
    import enum

    ct, models = types.ModuleType("coremltools"), types.ModuleType("coremltools.models")
    cd = types.ModuleType("coremltools.models.compute_device")
    for name in ("MLCPUComputeDevice", "MLGPUComputeDevice", "MLNeuralEngineComputeDevice"):
        setattr(cd, name, type(name, (_Device,), {}))
    ct.ComputeUnit = enum.Enum("ComputeUnit", "ALL CPU_ONLY CPU_AND_GPU CPU_AND_NE")

    class MLModel:
        def __init__(self, path, compute_units=None, **kw):
            calls.append(("load", str(path), compute_units.name))

        def get_spec(self):
            return types.SimpleNamespace(description=types.SimpleNamespace(input=[types.SimpleNamespace(name="x")]))

        def predict(self, feed):
            calls.append(("predict", tuple(feed)))
            return {"y": 0}

        def get_compiled_model_path(self):
            return "/fake/model.mlmodelc"

    def op(name, kind, device=None, cost=None, blocks=()):
        return types.SimpleNamespace(operator_name=kind, outputs=[types.SimpleNamespace(name=name)], blocks=list(blocks),
                                     device=device, cost=cost)

    ne, cpu = cd.MLNeuralEngineComputeDevice(), cd.MLCPUComputeDevice()
    then = types.SimpleNamespace(operations=[op("conv_0", "conv", ne, 0.5), op("relu_0", "relu", ne, 0.1)])
    orelse = types.SimpleNamespace(operations=[op("linear_0", "linear", cpu, 0.3)])
    main = types.SimpleNamespace(operations=[op("w", "const"), op("x_cast", "cast", cpu, 0.1),
                                             op("cond_0", "cond", cpu, 0.0, blocks=[then, orelse])])

    class MLComputePlan:
        model_structure = types.SimpleNamespace(program=types.SimpleNamespace(
            functions={"main": types.SimpleNamespace(block=main)}))

        @classmethod
        def load_from_path(cls, path, compute_units=None):
            calls.append(("plan", path, compute_units.name))
            return cls()

        def get_compute_device_usage_for_mlprogram_operation(self, o):
            return None if o.device is None else types.SimpleNamespace(preferred_compute_device=o.device,
                                                                       supported_compute_devices=[o.device, cpu])

        def get_estimated_cost_for_mlprogram_operation(self, o):
            return None if o.cost is None else types.SimpleNamespace(weight=o.cost)

    models.MLModel, models.compute_device, ct.models = MLModel, cd, models
    mods = {"coremltools": ct, "coremltools.models": models, "coremltools.models.compute_device": cd}
    if with_plan:
        plan = types.ModuleType("coremltools.models.compute_plan")
        plan.MLComputePlan = MLComputePlan
        models.compute_plan = plan
        mods["coremltools.models.compute_plan"] = plan
    return mods


@pytest.fixture
def apply_folder(pal4_pt2, tmp_path):
    out = tmp_path / "out"
    (out / "model.mlpackage" / "Data").mkdir(parents=True)
    (out / "model.mlpackage" / "Manifest.json").write_text("{}")
    (out / "model.mlpackage" / "Data" / "weights.bin").write_bytes(b"\0" * 64)
    shutil.copy(pal4_pt2, out / "model.pt2")
    (out / "manifest.json").write_text(json.dumps({"torch_artifact": "model.pt2", "mlpackage": "model.mlpackage"}))
    return out


def _on_a_fake_mac(monkeypatch, calls: list, with_plan: bool = True) -> None:
    from compressadvise.measure import latency

    monkeypatch.setattr(latency, "coreml_available", lambda: (True, ""))
    for name in ("coremltools.models.compute_plan",):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name, mod in _fake_coremltools(calls, with_plan).items():
        monkeypatch.setitem(sys.modules, name, mod)


def test_write_device_profile_on_a_mac_walks_the_compute_plan(monkeypatch, apply_folder, subset, tmp_path):
    from compressadvise.fsutil import sha256_path
    from compressadvise.measure.verify import verify

    calls: list = []
    _on_a_fake_mac(monkeypatch, calls)
    path = tmp_path / "mac.json"
    r = verify(None, apply_folder, samples=subset, target="ane-a17", compute_units="CPU_AND_NE",
               write_device_profile=path, reps=3, warmup=1, drift=False, latency=False)
    assert ("load", str(apply_folder / "model.mlpackage"), "CPU_AND_NE") in calls  # the fakes ran, once compiled
    assert ("plan", "/fake/model.mlmodelc", "CPU_AND_NE") in calls and sum(c[0] == "load" for c in calls) == 1
    assert sum(c[0] == "predict" for c in calls) == 4 and r.coreml.timing.p99_ms is not None
    monkeypatch.undo()
    prof = D.load_device_profile(path)  # what was written loads back
    assert r.coreml.device_profile == str(path) and prof.source == "mlcomputeplan" and prof.target == "ane-a17"
    assert [(o.name, o.type, o.device) for o in prof.ops] == [
        ("x_cast", "cast", "CPU"), ("cond_0", "cond", "CPU"), ("conv_0", "conv", "NE"), ("relu_0", "relu", "NE"),
        ("linear_0", "linear", "CPU")]  # nested blocks in program order; the const without a unit left out
    assert prof.ops[2].supported == ["NE", "CPU"] and prof.ops[2].cost == 0.5
    assert prof.model.role == "compressed" and prof.model.sha256 == sha256_path(apply_folder / "model.mlpackage")
    assert prof.latency_ms.reps == 3 and any("constants" in n for n in prof.notes)
    again = verify(None, apply_folder, samples=subset, device_profile=path, latency=False, drift=False)
    assert again.estimate["compressed"].basis.startswith("measured on Mac")  # the profiled build itself
    assert again.estimate["compressed"].total_ms == prof.latency_ms.median


def test_without_mlcomputeplan_the_profile_has_latency_only(monkeypatch, apply_folder, subset, tmp_path):
    from compressadvise.measure.verify import verify

    calls: list = []
    _on_a_fake_mac(monkeypatch, calls, with_plan=False)
    path = tmp_path / "old.json"
    verify(None, apply_folder, samples=subset, write_device_profile=path, reps=2, warmup=0, drift=False, latency=False)
    assert calls and not any(c[0] == "plan" for c in calls)
    monkeypatch.undo()
    prof = D.load_device_profile(path)
    assert prof.ops == [] and any("no MLComputePlan" in n and "latency only" in n for n in prof.notes)


# ------------------------------------------------------------------ search and recommend
def test_search_plans_with_calibrated_costs(tmp_path):
    from compressadvise.measure.executors import SerialExecutor
    from compressadvise.measure.sensitivity import Cache, Setting, prepare
    from compressadvise.plan.planfile import load_plan, save_plan
    from compressadvise.plan.search import search

    prep = prepare(None, None, max_samples=16)
    grid = [Setting.of("palettization", nbits=8, granularity="per_tensor")]
    kw = {"prepared": prep, "max_latency_ms": 0.11, "settings": grid, "cache": Cache(enabled=False),
          "executor": SerialExecutor(), "confirm": 1}
    plain = search(**kw)
    assert plain.plan.steps == [] and plain.latency_basis == "estimate (roofline)"  # 3 us of roofline fit
    cal = search(**kw, device_profile=ORIGINAL)
    assert cal.latency_basis == cal.budget.latency_basis == "calibrated from iPhone 15 Pro profile"
    assert "0.11 ms (calibrated from iPhone 15 Pro profile)" in cal.budget.basis
    p = cal.plan.prediction
    assert p.latency_ms_before == pytest.approx(0.12) and p.latency_ms_after <= 0.11  # fp16 no longer fits
    assert cal.plan.steps and cal.chosen.fits and cal.chosen.estimate["latency_ms"] == pytest.approx(p.latency_ms_after)
    assert load_plan(save_plan(cal.plan, tmp_path / "plan.yaml")).prediction.latency_basis == cal.latency_basis
    with pytest.raises(BadArgument, match="calibrates target 'ane-a17'"):
        search(**kw, target="ane-a14", device_profile=ORIGINAL)


def test_recommend_records_the_calibrated_latency(capsys, tmp_path):
    code, out, err = run_captured(capsys, "recommend", "--device-profile", ORIGINAL, "--no-measure", "--json")
    assert code == 0, err
    p = json.loads(out)["prediction"]
    assert p["latency_basis"] == "calibrated from iPhone 15 Pro profile"
    assert p["latency_ms_before"] == pytest.approx(0.12) and p["latency_ms_after"] < p["latency_ms_before"]
    plan_yaml = tmp_path / "old.yaml"  # a plan file without the latency fields still loads
    code, _, _ = run_captured(capsys, "recommend", "--no-measure", "--out", plan_yaml)
    from compressadvise.plan.planfile import load_plan

    assert code == 0 and load_plan(plan_yaml).prediction.latency_basis is None


# ------------------------------------------------------------------ docs
def test_the_docs_schema_tables_are_current():
    from compressadvise.ui.docsgen_reference import schema_page

    md, _ = schema_page("Device profile", "", D.DeviceProfile, "validation", "device-profile.schema.json")
    tables = md[md.index("## DeviceProfile"):].rstrip("\n")
    assert tables in DOCS.read_text(), "docs/device-profiles.md: paste the schema tables generated from DeviceProfile"
