"""verify(): real accuracy, slices, drift, latency and gates on small models built in code."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from compressadvise.errors import BadModel, InputNotFound
from compressadvise.examples import digits
from compressadvise.model.samples import InvalidSamples
from compressadvise.measure.verify import Budgets, EvaluatorFailed, judge, verify
from test_verify_models import (FlipBright, NaNOut, Scores, TwoHeads, broken, digits_subset, export,
                                palettize, slice_samples)

FAST = {"reps": 3, "warmup": 1}


@pytest.fixture(scope="module")
def original():
    return digits.trained_model()


@pytest.fixture(scope="module")
def pal4(original):
    return palettize(original, 4)


@pytest.fixture(scope="module")
def pal4_pt2(pal4, tmp_path_factory):
    """The palettized copy as a torch.export program (static batch of 1)."""
    return export(pal4, tmp_path_factory.mktemp("verify") / "pal4.pt2")


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    return digits_subset(tmp_path_factory.mktemp("samples") / "digits60.npz")


@pytest.fixture(scope="module")
def bundled_result(pal4):
    return verify(None, pal4, target="ane-a17", **FAST)


def _by_class(model, x, y):
    with torch.no_grad():
        pred = model(x).argmax(1)
    return {c: float((pred[y == c] == c).double().mean()) * 100 for c in range(10)}, float((pred == y).double().mean()) * 100


def test_bundled_vs_4bit_palettized_reports_real_accuracy(bundled_result, original, pal4):
    r = bundled_result
    x, y = (torch.from_numpy(a) for a in digits.samples())
    per_o, acc_o = _by_class(original, x, y)
    per_c, acc_c = _by_class(pal4, x, y)
    assert r.samples.kind == "bundled" and r.samples.count == len(y) and r.samples.has_labels
    top1 = r.accuracy[0]
    assert top1.name == "top-1 accuracy"
    assert top1.original == pytest.approx(acc_o) and top1.compressed == pytest.approx(acc_c)
    assert top1.original > 95  # a trained model, on held-out data
    # the worst class is the one whose accuracy dropped most, computed independently here
    classes = r.slices[0]
    assert classes.by == "class"
    drops = {str(c): per_c[c] - per_o[c] for c in range(10)}
    worst = min(drops.values())
    if worst < 0:
        assert drops[classes.worst] == pytest.approx(worst)
    else:
        assert classes.worst is None


def test_bundled_latency_is_measured_for_both(bundled_result):
    lat = bundled_result.latency
    assert lat.label == "measured" and lat.interleaved and lat.threads == torch.get_num_threads()
    for name in ("original", "compressed"):
        t = lat.get(name, "eager")
        assert t.label == "measured" and t.reps == FAST["reps"] and 0 < t.median_ms <= t.p90_ms


def test_drift_shows_where_error_starts(bundled_result):
    d = bundled_result.drift
    names = [x.name for x in d.layers]
    assert names[:3] == ["stem", "stem_bn", "stem_act"]  # execution order
    assert d.first_error == "stem"  # the first palettized layer
    assert d.worst in names and all(x.snr_db < 60 for x in d.layers)


def test_estimate_is_labelled_and_sees_4bit_weights(bundled_result):
    est = bundled_result.estimate
    assert est["original"].label == est["compressed"].label == "estimate"
    assert est["compressed"].total_ms < est["original"].total_ms
    sizes = bundled_result.target_size_bytes
    assert sizes["original"] == 73930 * 2  # every parameter at fp16
    assert 3.5 < sizes["original"] / sizes["compressed"] < 4.0  # 4-bit indices + LUTs + fp16 norms/biases
    assert not bundled_result.coreml.available and "unavailable" in bundled_result.coreml.note
    text = bundled_result.to_json()
    json.loads(text)  # strict JSON, infinities as strings
    again = type(bundled_result).model_validate_json(text)  # what `report` reads back
    assert again.accuracy == bundled_result.accuracy and again.drift.first_error == "stem"


def test_gate_verdicts(original):
    bad = broken(original)
    r = verify(original, bad, samples="bundled", latency=False, drift=False)
    drop = r.accuracy[0].original - r.accuracy[0].compressed
    assert drop > 50
    missed = judge(r, Budgets(max_accuracy_drop=1.0))
    assert not missed.passed and missed.budgets[0].value == pytest.approx(drop)
    assert "measured" in missed.budgets[0].basis
    ok = judge(r, Budgets(max_accuracy_drop=100.0))
    assert ok.passed
    assert judge(r, Budgets()).passed and judge(r, Budgets()).budgets == []
    # latency was not measured and no target given: that budget cannot pass
    assert not judge(r, Budgets(max_latency_ms=1e9)).passed


def test_latency_and_size_budgets_measured_here(original, pal4_pt2, subset):
    path = pal4_pt2
    r = verify(original, path, samples=subset, budgets={"max_latency_ms": 1e6, "max_size_mb": 100.0}, drift=False, **FAST)
    assert r.passed
    size = next(b for b in r.budgets if b.name == "size")
    assert size.value == pytest.approx(path.stat().st_size / 1e6) and "measured" in size.basis
    lat = next(b for b in r.budgets if b.name == "latency")
    assert lat.value == pytest.approx(r.latency.best("compressed").median_ms) and "this machine" in lat.basis
    tight = judge(r, Budgets(max_latency_ms=1e-9, max_size_mb=1e-6))
    assert not tight.passed and [b.passed for b in tight.budgets] == [False, False]


def test_accuracy_proxy_without_labels(original, pal4, tmp_path):
    x, _ = digits.samples()
    np.savez(tmp_path / "s.npz", inputs=x[:50])
    r = verify(original, pal4, samples=tmp_path / "s.npz", budgets={"max_accuracy_drop": 100.0},
               latency=False, drift=False)
    assert r.accuracy == [] and r.slices == []
    v = r.budgets[0]
    assert v.basis.startswith("proxy") and v.passed
    assert v.value == pytest.approx(100 * (1 - r.fidelity[0].metrics["top1_agreement"]))


def test_user_slices_name_the_worst(tmp_path):
    np.savez(tmp_path / "slices.npz", **slice_samples())
    r = verify(Scores(), FlipBright(), samples=tmp_path / "slices.npz", latency=False)
    by_slice = next(s for s in r.slices if s.by == "slice")
    rows = {x.name: x for x in by_slice.rows}
    assert rows["bright"].original == 100 and rows["bright"].compressed == 0
    assert rows["dim"].change == 0
    assert by_slice.worst == "bright" and by_slice.worst_change == -100
    assert next(s for s in r.slices if s.by == "class").worst == "2"


def test_exported_compressed_runs_per_sample_and_drifts_by_module_path(original, pal4, pal4_pt2, subset):
    path = pal4_pt2  # static batch of 1: verify falls back to one sample at a time
    r = verify(original, path, samples=subset, latency=False, drift_samples=16)
    assert r.compressed.format == "exported" and r.samples.count == 60
    eager = verify(original, pal4, samples=subset, latency=False, drift=False)
    assert r.accuracy[0].compressed == pytest.approx(eager.accuracy[0].compressed)
    assert r.drift.first_error == "stem" and len(r.drift.layers) >= 10


def test_apply_output_folder(pal4_pt2, subset, tmp_path):
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(pal4_pt2, out / "model.pt2")
    (out / "manifest.json").write_text(json.dumps({"torch_artifact": "model.pt2", "mlpackage": None}))
    r = verify(None, out, samples=subset, latency=False, drift=False)
    assert r.compressed.size_bytes == (out / "model.pt2").stat().st_size
    assert r.compressed.size_basis.startswith("torch artifact")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFound, match="without manifest.json"):
        verify(None, tmp_path / "empty", latency=False)


def test_random_inputs_only_as_a_last_resort_with_a_warning():
    from compressadvise.model.loading import load_model

    cnn = load_model("models:cnn_factory")
    r = verify(cnn, cnn.module, latency=False, drift=False)
    assert r.samples.kind == "random" and "weak evidence" in r.warnings[0]
    assert r.fidelity[0].metrics["top1_agreement"] == 1.0 and math.isinf(r.fidelity[0].metrics["snr_db"])


def test_input_model_is_never_modified(original, pal4):
    before = {k: v.clone() for k, v in original.state_dict().items()}
    verify(original, pal4, samples="bundled", **FAST)
    after = original.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in original.modules())


# ------------------------------------------------------------------ bad input
def test_samples_that_do_not_fit_the_model(original, tmp_path):
    np.savez(tmp_path / "rgb.npz", inputs=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(InvalidSamples, match=r"original model failed on samples .*\[1, 3, 8, 8\]"):
        verify(original, original, samples=tmp_path / "rgb.npz", latency=False)


def test_different_output_structure():
    x = {"inputs": torch.randn(5, 3)}
    from compressadvise.model.samples import Samples

    s = Samples([x["inputs"]])
    with pytest.raises(BadModel, match="differ in output structure"):
        verify(Scores(), TwoHeads(), samples=s, latency=False)


def test_nan_outputs(original):
    r = verify(original, NaNOut(original), samples="bundled", latency=False, drift=False)
    assert r.fidelity[0].nonfinite == math.ceil(360 / 64) and not r.passed  # one NaN per batch of 64
    assert r.budgets[-1].name == "finite outputs" and "NaN" in r.warnings[-1]
    with pytest.raises(BadModel, match=r"original model outputs 6 NaN/inf value\(s\)"):
        verify(NaNOut(original), original, samples="bundled", latency=False, drift=False)


def test_evaluator_results_and_failures(original, pal4, tmp_path, monkeypatch):
    (tmp_path / "ca_eval_mod.py").write_text(
        "import torch\n"
        "from compressadvise.examples import digits\n"
        "def good(model):\n"
        "    x, y = (torch.from_numpy(a) for a in digits.samples())\n"
        "    with torch.no_grad():\n"
        "        acc = (model(x).argmax(1) == y).double().mean().item() * 100\n"
        "    return {'accuracy': acc, 'calls': 1}\n"
        "def boom(model):\n"
        "    raise ValueError('dataset path missing')\n"
        "def notdict(model):\n"
        "    return 0.5\n")
    monkeypatch.chdir(tmp_path)
    r = verify(original, broken(original), evaluator="ca_eval_mod:good", samples="bundled", budgets={"max_accuracy_drop": 1.0},
               latency=False, drift=False)
    row = next(e for e in r.evaluator if e.name == "accuracy")
    assert row.original == pytest.approx(r.accuracy[0].original)
    assert not r.passed and "evaluator" in r.budgets[0].basis
    with pytest.raises(EvaluatorFailed, match="ValueError on the original model: dataset path missing"):
        verify(original, pal4, evaluator="ca_eval_mod:boom", samples="bundled", latency=False, drift=False)
    with pytest.raises(EvaluatorFailed, match="dict of metric"):
        verify(original, pal4, evaluator="ca_eval_mod:notdict", samples="bundled", latency=False, drift=False)
    with pytest.raises(InputNotFound, match="cannot import evaluator module 'no_such_mod_xyz'"):
        verify(original, pal4, evaluator="no_such_mod_xyz:f", samples="bundled", latency=False, drift=False)
    with pytest.raises(InputNotFound, match="no callable 'missing'"):
        verify(original, pal4, evaluator="ca_eval_mod:missing", samples="bundled", latency=False, drift=False)


def test_plan_and_calibration_feed_the_estimate(pal4, tmp_path):
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import recommend

    plan = recommend(analyze(None), target="ane-a17", constraints={"max_size_mb": 0.05})
    cal = tmp_path / "cal.yaml"
    cal.write_text("model: original\ntotal_ms: 0.5\n")
    r = verify(None, pal4, target="ane-a17", plan=plan, calibration=cal, latency=False, drift=False,
               budgets={"max_latency_ms": 0.4})
    o, c = r.estimate["original"], r.estimate["compressed"]
    assert o.calibrated and o.total_ms == pytest.approx(0.5)  # scaled to the device figure
    assert any("from the plan" in n for n in c.notes)
    compressed = {x.name for x in plan.layers if x.bytes_after < x.bytes_before}
    assert {x.name for x in c.layers if x.setting != "fp16 (unchanged)"} == compressed & {x.name for x in c.layers}
    lat = r.budgets[0]
    assert lat.basis.startswith("estimate") and lat.value == pytest.approx(c.total_ms)
    assert lat.passed == (c.total_ms <= 0.4)
