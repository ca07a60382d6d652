"""recommend measures before it promises (issue 17: item 1; items 3-4 in part): the plan applied
in memory to the deployable weights and run on samples, a gentler setting when it misses the
floor, the measurement checked against what apply builds; and less noise in the printed plan."""
from __future__ import annotations

import json
import re

import pytest

import compressadvise as ca
from compressadvise.knowledge.base import builtin
from compressadvise.knowledge.schema import Step
from compressadvise.model.analysis import analyze
from compressadvise.model.loading import load_model
from compressadvise.plan.measured import measure_plan
from test_apply import small_mlp


@pytest.fixture(scope="module")
def bundled():
    loaded = load_model(None)
    return loaded, analyze(loaded)


def _harsh(loaded, report, nbits: int, granularity: str = "per_tensor"):
    """The recommended plan's layers at a harsher setting, sized as recommend sizes it."""
    from compressadvise.knowledge.deployment import Deployment
    from compressadvise.plan.measured import repredicted

    k = builtin()
    base = ca.recommend(report, target="ane-a14", os=18)
    steps = [Step(technique="palettization", slot="weights", params={"nbits": nbits, "granularity": granularity},
                  layers=list(base.steps[0].layers))]
    return repredicted(base, steps, k, report, Deployment.resolve(k, "ane-a14", 18))


def test_the_plan_is_measured_on_the_samples_and_apply_builds_that_fidelity(bundled, tmp_path):
    from compressadvise.measure.verify import verify

    loaded, report = bundled
    plan = ca.recommend(loaded, target="ane-a17", measure=True)
    fid = plan.fidelity
    assert fid.evidence == "samples" and fid.label == f"measured on {fid.samples} samples" and fid.samples > 0
    (m,) = fid.measured
    assert m.passed and m.metrics["top1_agreement"] >= fid.floor["top1_agreement"] == 0.9
    assert plan.advisories[0].code == "MEASURED"
    # The measurement predicts what the built artefact does on the same samples (k-means seeds differ).
    ca.apply(loaded, plan, tmp_path / "o")
    built = verify(loaded, tmp_path / "o", latency=False, drift=False).fidelity[0].metrics
    assert abs(built["top1_agreement"] - m.metrics["top1_agreement"]) <= 0.05, (built, m.metrics)
    assert abs(built["snr_db"] - m.metrics["snr_db"]) <= 3.0, (built, m.metrics)


def test_a_plan_under_the_floor_becomes_the_next_gentler_setting(bundled):
    loaded, report = bundled
    harsh = _harsh(loaded, report, nbits=1)
    plan = measure_plan(harsh, loaded, report, builtin())
    first, *_, last = plan.fidelity.measured
    assert first.settings == "1-bit palettization per_tensor" and not first.passed
    assert last.passed and plan.steps[0].params["nbits"] > 1
    assert f"{plan.steps[0].params['nbits']}-bit palettization per_tensor" == last.settings
    # the chosen plan is sized as recommend sizes that setting, not left with the harsh plan's figure
    assert plan.prediction.bytes_after == _harsh(loaded, report, plan.steps[0].params["nbits"]).prediction.bytes_after
    assert plan.prediction.bytes_after > harsh.prediction.bytes_after
    assert plan.advisories[0].title.startswith("The first plan missed the fidelity floor")


def test_no_setting_reaches_an_impossible_floor_and_the_plan_says_so(bundled):
    loaded, report = bundled
    plan = measure_plan(_harsh(loaded, report, nbits=4), loaded, report, builtin(), min_psnr=200.0)
    assert plan.fidelity.floor == {"psnr_db": 200.0}
    assert sorted(m.settings.split("-")[0] for m in plan.fidelity.measured) == ["4", "6", "8"]  # all tried
    assert not any(m.passed for m in plan.fidelity.measured)
    best = plan.fidelity.measured[-1]
    assert best.metrics["psnr_db"] == max(m.metrics["psnr_db"] for m in plan.fidelity.measured)
    assert plan.advisories[0].title == "No post-training plan reaches the fidelity floor"
    assert "calibration" in plan.advisories[0].message


def test_without_samples_random_inputs_are_weak_evidence():
    plan = ca.recommend(small_mlp(), target="ane-a17", constraints={"max_size_mb": 0.02}, measure=True)
    assert plan.fidelity.evidence == "random" and plan.fidelity.label.startswith("weak evidence: ")
    assert plan.fidelity.measured and plan.fidelity.samples > 0
    # on random inputs a classifier's top class is noise: outputs are compared (PSNR), not top-1
    assert plan.fidelity.floor == {"psnr_db": builtin().thresholds["min_output_psnr_db"]}
    psnr = measure_plan(plan, small_mlp(), analyze(small_mlp()), builtin(), min_psnr=25.0)
    assert psnr.fidelity.floor == {"psnr_db": 25.0}


def test_a_weights_only_file_is_not_measured_and_says_why(tmp_path):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in small_mlp().module.state_dict().items()}, str(tmp_path / "w.safetensors"))
    plan = ca.recommend(str(tmp_path / "w.safetensors"), target="ane-a17", measure=True)
    assert plan.fidelity.evidence == "none" and plan.fidelity.note.startswith("could not measure: ")


def test_cli_measures_by_default_and_not_with_no_measure(capsys):
    from compressadvise.ui.cli import main

    with pytest.raises(SystemExit) as e:
        main(["recommend", "--target", "ane-a17", "--json"])
    assert e.value.code in (0, None)
    plan = json.loads(capsys.readouterr().out)
    assert plan["fidelity"]["evidence"] == "samples" and plan["fidelity"]["measured"][0]["passed"]
    with pytest.raises(SystemExit):
        main(["recommend", "--target", "ane-a17", "--no-measure"])
    assert "Fidelity" not in capsys.readouterr().out


def test_a_step_prints_only_the_parameters_its_setting_uses():
    from compressadvise.plan.engine import step_text

    k = builtin()
    text = step_text(k, Step(technique="palettization", slot="weights", params={
        **k.techniques["palettization"].defaults(), "nbits": 6, "granularity": "per_tensor", "group_size": 16}))
    assert text == "nbits=6, granularity=per_tensor"  # no group_size, no lut_dtype=fp16, no weight_threshold
    grouped = step_text(k, Step(technique="palettization", slot="weights",
                                params={"nbits": 4, "granularity": "per_grouped_channel", "group_size": 16}))
    assert "group_size=16" in grouped


def test_unchanged_layers_say_the_dtype_the_target_stores():
    host = ca.recommend(small_mlp(), target="x86-cpu", constraints={"max_size_mb": 0.05})
    ane = ca.recommend(small_mlp(), target="ane-a17")
    kept = {p.name: p.setting for p in host.layers if p.bytes_after == p.bytes_before}
    assert kept and set(kept.values()) == {"fp32 (unchanged)"}
    assert {p.setting for p in ane.layers if p.bytes_after == p.bytes_before} <= {"fp16 (unchanged)"}


def test_a_missed_budget_gets_ranked_ways_forward_sized_against_a_build(bundled, tmp_path):
    # issue 17, item 2: never a bare "misses the size budget"
    loaded, report = bundled
    plan = ca.recommend(report, target="ane-a14", os=18, constraints={"max_size_mb": 0.03})
    assert plan.prediction.meets_size_budget is False
    ways = plan.ways_forward
    codes = [w.code for w in ways]
    assert "NXT009" in codes and "BUDGET" in codes
    sized = [w.predicted_bytes for w in ways if w.predicted_bytes]
    reach = [s for s in sized if s <= 30_000]
    assert reach and sized[:len(reach)] == sorted(reach)  # those that reach the budget come first
    floor = next(w for w in ways if w.message.startswith("within reach"))
    assert re.search(r"`compressadvise search --target \S+ (--os \d+ )?--max-size-mb 0.03`", floor.message), floor.message
    # the floor is a real plan: every compressible layer the backend touches at 2-bit LUTs; built, it is that size
    smallest = _harsh(loaded, report, nbits=2)
    assert floor.predicted_bytes == smallest.prediction.bytes_after
    gate = ca.apply(loaded, smallest, tmp_path / "o").manifest["planned_vs_built"]
    assert gate["ok"] and abs(gate["size_error"]) <= 0.02
    assert any("bits per weight, scales and LUTs included" in w.message for w in ways)


def test_an_unreachable_budget_says_so_with_the_smallest_plan(bundled):
    _, report = bundled
    plan = ca.recommend(report, target="ane-a14", os=17, constraints={"max_size_mb": 0.005})
    floor = next(w for w in plan.ways_forward if w.message.startswith("out of reach"))
    assert floor.predicted_bytes > 5_000 and "raise the budget" in floor.message
    assert ca.recommend(report, target="ane-a14", os=17, constraints={"max_size_mb": 1.0}).ways_forward == []


@pytest.mark.parametrize("nbits,holds", [(4, True), (1, False)])
def test_a_training_step_is_measured_as_its_post_training_twin(bundled, nbits, holds):
    """recommend never trains: a dkm step is measured as palettization at the same setting, kept as
    planned (no gentler setting), and the advice says whether the training run is needed."""
    from compressadvise.knowledge.deployment import Deployment
    from compressadvise.plan.measured import repredicted

    loaded, report = bundled
    k = builtin()
    base = ca.recommend(report, target="ane-a17", os=18)
    steps = [Step(technique="dkm", slot="weights", params={"nbits": nbits, "granularity": "per_tensor"},
                  layers=list(base.steps[0].layers))]
    plan = measure_plan(repredicted(base, steps, k, report, Deployment.resolve(k, "ane-a17", 18)), loaded, report, k)
    (m,) = plan.fidelity.measured
    assert m.settings == f"{nbits}-bit dkm per_tensor (as post-training palettization)"
    assert m.passed is holds and plan.steps[0].technique == "dkm" and plan.steps[0].params["nbits"] == nbits
    title = plan.advisories[0].title
    assert ("may be unnecessary" in title) if holds else ("has to close the gap" in title)
