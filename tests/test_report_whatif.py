"""The report's What-if: per-layer options sized like the plan, `plan_for_choices`, and the page
driven in headless Chromium (live totals, bulk setting, the downloaded plan file)."""
from __future__ import annotations

import json
import math
import random
import signal

import pytest

from browser_helpers import CHROMIUM_ARGS, _browser_or_skip
from compressadvise.plan.whatif import KEEP, layer_options, plan_for_choices
from compressadvise.ui import report as R

PAL4 = "palettization:enable_per_channel_scale=False,granularity=per_tensor,lut_dtype=fp16,nbits=4"
PAL4_GS16 = "palettization:enable_per_channel_scale=False,granularity=per_grouped_channel,group_size=16,lut_dtype=fp16,nbits=4"
PAL6 = "palettization:enable_per_channel_scale=False,granularity=per_tensor,lut_dtype=fp16,nbits=6"
LQ8 = "linear_quantization:granularity=per_channel,mode=linear_symmetric,nbits=8"
PEAK = 12.5


@pytest.fixture(scope="module")
def bundled():
    from compressadvise.knowledge.base import builtin
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import load_model
    from compressadvise.plan.engine import recommend

    report = analyze(load_model(None))
    k = builtin()
    plan = recommend(report, target="ane-a17", knowledge=k)
    return k, report, plan, layer_options(k, report, plan)


@pytest.fixture(scope="module")
def page(bundled, tmp_path_factory):
    """The bundled model's report with synthetic single-layer MSEs for every option but one."""
    k, report, plan, opts = bundled
    rnd = random.Random(0)
    mse = {n: {key: rnd.uniform(1e-4, 1e-2) for key in per if key != KEEP} for n, per in opts.stacks.items()}
    del mse["pw"][PAL4]  # one option without a measurement: the page must say so, not guess
    sens = R.Sensitivity(setting="synthetic (test)", peak=PEAK, single_mse=mse,
                         single_bytes={n: {key: 1.0 for key in v} for n, v in mse.items()})
    data = R.build(R.gather(report, plan=plan, sensitivity=sens, knowledge=k), knowledge=k)
    out = tmp_path_factory.mktemp("whatif") / "report.html"
    out.write_text(R.render_html(data), encoding="utf-8")
    return data, mse, out


def _psnr(mse: dict[str, dict[str, float]], picks: dict[str, str]) -> float:
    """Search's prediction: independent single-layer output MSEs add up."""
    total = sum(mse[n][key] for n, key in picks.items() if key != KEEP)
    return 10 * math.log10(PEAK ** 2 / total)


# ------------------------------------------------------------------ Python
def test_option_bytes_are_the_plans_prediction(bundled, page):
    _, _, plan, _ = bundled
    w = page[0].whatif
    rows = {x.name: x for x in plan.layers}
    total = w["before"]
    for entry in w["layers"]:
        assert entry["f"] == rows[entry["n"]].bytes_before
        if "s" in entry:
            mine = entry["b"][entry["c"]]
            assert mine == rows[entry["n"]].bytes_after, entry["n"]
            total += mine - entry["f"]
    assert w["before"] == plan.prediction.bytes_before and total == plan.prediction.bytes_after
    assert w["plan_bytes"] == plan.prediction.bytes_after
    # the plan's own latency basis: the roofline the summary shows
    summary = next(r for r in page[0].summary if r.metric.startswith("latency on"))
    ms = w["latency"]["fixed"] + sum(e["t"][e["c"]] for e in w["layers"] if "t" in e)
    assert ms == pytest.approx(summary.after, rel=1e-4)
    by_name = {e["n"]: e for e in w["layers"]}
    assert by_name["stem"]["k"][0] == "LAY001" and len(w["sets"][by_name["stem"]["s"]]) == 1  # playbook: keep it


def test_plan_for_own_choices_predicts_recommend(bundled):
    from compressadvise.knowledge.schema import Plan

    k, report, plan, opts = bundled
    same = plan_for_choices(plan, report, {}, k, options=opts)
    assert (same.prediction.bytes_before, same.prediction.bytes_after) == (
        plan.prediction.bytes_before, plan.prediction.bytes_after)
    assert [(x.name, x.bytes_after) for x in same.layers] == [(x.name, x.bytes_after) for x in plan.layers]
    assert same.steps[0].layers == ["conv", "fc"] and same.steps[0].params["weight_threshold"] == 0
    assert Plan.model_validate(same.model_dump(mode="json")) == same
    with pytest.raises(Exception, match="not an option"):
        plan_for_choices(plan, report, {"stem": PAL4}, k, options=opts)


def test_without_sensitivity_or_model_the_section_says_so(bundled):
    from compressadvise.ui.report_whatif import NOT_PREDICTED, whatif_data

    k, report, plan, _ = bundled
    w = whatif_data(R.gather(report, plan=plan, knowledge=k), k, None)
    assert w["fidelity"] == {"note": NOT_PREDICTED} and w["latency"] is None
    assert not any("t" in e or "e" in e for e in w["layers"])
    assert "needs the model" in whatif_data(R.Inputs(source="plan only", plan=plan), k, None)["unavailable"]


def test_changed_plan_loads_and_apply_builds_it(bundled, tmp_path):
    from compressadvise.plan.planfile import load_plan
    from compressadvise.ui.cli import main

    k, report, plan, opts = bundled
    changed = plan_for_choices(plan, report, {"dw": LQ8, "pw": PAL6, "conv": PAL4_GS16}, k, options=opts)
    assert changed.prediction.bytes_after < plan.prediction.bytes_after
    assert {s.technique: s.layers for s in changed.steps} == {"linear_quantization": ["dw"],
                                                              "palettization": ["pw", "conv", "fc"]}
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps(changed.model_dump(mode="json"), indent=2))  # JSON, as the page writes it
    assert load_plan(path) == changed
    out = tmp_path / "out"
    handler = signal.getsignal(signal.SIGINT)
    try:
        main(["apply", "--plan", str(path), "--out", str(out)])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        signal.signal(signal.SIGINT, handler)
    manifest = json.loads((out / "manifest.json").read_text())
    assert code == 0 and manifest["planned_vs_built"]["ok"], manifest.get("planned_vs_built")


# ------------------------------------------------------------------ the page
def _totals(pg) -> dict:
    return pg.evaluate("""() => ({bytes: +document.getElementById('wi-size').dataset.bytes,
        ms: +document.getElementById('wi-latency').dataset.ms,
        psnr: document.getElementById('wi-fidelity').dataset.psnr,
        fidelity: document.getElementById('wi-fidelity').textContent})""")


def _bulk(pg, option: str, *, type_: str = "", name: str = "") -> str:
    pg.select_option("#wi-type", type_)
    pg.fill("#wi-name", name)
    pg.select_option("#wi-option", option)
    pg.click("#wi-apply")
    return pg.inner_text("#wi-status")


def test_whatif_in_headless_chromium(bundled, page, tmp_path):
    from compressadvise.plan.planfile import load_plan

    sync_playwright, exe = _browser_or_skip()
    k, report, plan, opts = bundled
    _, mse, out = page
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            pg = browser.new_page(accept_downloads=True)
            pg.on("request", lambda r: requests.append(r.url))
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            pg.goto(out.resolve().as_uri(), wait_until="domcontentloaded")
            pg.wait_for_function("window.compressadviseWhatIf !== undefined")
            start = _totals(pg)
            assert start["bytes"] == plan.prediction.bytes_after
            assert float(start["psnr"]) == pytest.approx(_psnr(mse, opts.current), abs=1e-3)

            # one layer: the total moves by exactly the sizing difference
            pg.select_option("#whatif-table select[data-layer=conv]", PAL4)
            one = plan_for_choices(plan, report, {"conv": PAL4}, k, options=opts)
            assert _totals(pg)["bytes"] - start["bytes"] == one.prediction.bytes_after - plan.prediction.bytes_after

            # every depthwise conv in bulk: the Python reference's prediction
            assert _bulk(pg, LQ8, type_="depthwise_conv") == "set 1 layer(s)"
            choices = {"conv": PAL4, "dw": LQ8}
            ref = plan_for_choices(plan, report, choices, k, options=opts)
            now = _totals(pg)
            assert now["bytes"] == ref.prediction.bytes_after
            assert float(now["psnr"]) == pytest.approx(_psnr(mse, {**opts.current, **choices}), abs=1e-3)

            # a setting some selected layers do not allow: those are left alone, and counted
            assert _bulk(pg, PAL4, name="w") == "set 1 layer(s); 1 left alone (the setting is not allowed there)"
            choices["pw"] = PAL4  # dw: 4-bit per_tensor is not offered there (playbook LOW006 makes it 8-bit)
            assert "not predicted: 1 layer(s)" in _totals(pg)["fidelity"]  # pw at PAL4 was never measured

            with pg.expect_download() as download:
                pg.click("#wi-download")
            saved = tmp_path / "plan.yaml"
            download.value.save_as(saved)
        finally:
            browser.close()
    ref = plan_for_choices(plan, report, choices, k, options=opts)
    assert json.loads(saved.read_text()) == ref.model_dump(mode="json")  # no page-specific field
    assert load_plan(saved) == ref
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []
