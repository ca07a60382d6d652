"""The visual report: data, HTML, PNGs, CLI, and the page driven in headless Chromium.

The run folder used here is made for real: the bundled model's plan, a copy with fake-quantized
weights standing in for `apply`'s output, a real `verify` of the two on the bundled samples, and
sensitivity results measured by compressing one layer (or all layers) at a time.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from browser_helpers import CHROMIUM_ARGS, _browser_or_skip
from compressadvise.ui import report as R
from compressadvise.ui.cli import app

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"


# ------------------------------------------------------------------ fixtures
def fake_quantize(module: torch.nn.Module, names: set[str] | None, bits: int) -> torch.nn.Module:
    """Copy with symmetric per-channel fake-quantized weights (2-D and up) on `names` (None = all)."""
    out = copy.deepcopy(module)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for name, m in out.named_modules():
            w = getattr(m, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() >= 2 and (names is None or name in names):
                scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / levels
                w.copy_((w / scale).round().clamp(-levels, levels) * scale)
    return out


def top1(module: torch.nn.Module, samples) -> float:
    with torch.no_grad():
        pred = module(samples.inputs[0]).argmax(1)
    return 100.0 * float((pred == samples.labels).float().mean())


@pytest.fixture(scope="module")
def bundled():
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import recommend
    from compressadvise.model.loading import load_model

    loaded = load_model(None)
    report = analyze(loaded)
    return loaded, report, recommend(report, target="ane-a17")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, bundled):
    verify_mod = pytest.importorskip("compressadvise.measure.verify")
    from compressadvise.plan.planfile import save_plan
    from compressadvise.model.samples import load_samples

    loaded, report, plan = bundled
    run = tmp_path_factory.mktemp("run")
    save_plan(plan, run / "plan.yaml")
    compressed = fake_quantize(loaded.module, set(plan.steps[0].layers), bits=3)
    result = verify_mod.verify(loaded, compressed, samples="bundled", target="ane-a17", plan=plan,
                               reps=3, warmup=1)
    (run / "verify.json").write_text(result.to_json())
    samples = load_samples("bundled")
    base = top1(loaded.module, samples)
    weights = [x for x in report.layers if len(x.weight_shape) >= 2]
    layers = [{"name": x.name, "value": base - top1(fake_quantize(loaded.module, {x.name}, 2), samples)}
              for x in weights]
    points = []
    for bits in (8, 4, 3, 2):
        size = sum(x.weight_elements * bits / 8 + (x.params - x.weight_elements) * 2 for x in weights)
        size += sum(x.params * 2 for x in report.layers if x not in weights)
        points.append({"name": f"uniform {bits}-bit", "bytes": size, "kind": "uniform",
                       "value": top1(fake_quantize(loaded.module, None, bits), samples)})
    (run / "sensitivity.json").write_text(json.dumps(
        {"metric": "top-1 accuracy", "unit": "%", "setting": "2-bit linear per channel",
         "layers": layers, "points": points}))
    # A manifest shaped like `apply`'s, for a torch artefact saved here (its size is measured).
    torch.save(compressed.state_dict(), run / "model.pt")
    skipped = {x.layer for x in plan.steps[0].skipped}
    status = {x.name: "applied" if x.name in plan.steps[0].layers else "skipped" if x.name in skipped
              else "unchanged (not in the plan)" for x in report.layers}
    (run / "manifest.json").write_text(json.dumps({
        "input": {"source": loaded.source, "format": loaded.format, "sha256": loaded.sha256},
        "plan": "plan.yaml", "torch_artifact": "model.pt",
        "sizes": {"torch_artifact_bytes": {"value": (run / "model.pt").stat().st_size, "label": "measured",
                                           "basis": "model.pt on disk"},
                  "weight_file_error": {"value": 0.01, "label": "measured vs estimate"}},
        "layers": [{"name": n, "status": st} for n, st in status.items()]}))
    return run


@pytest.fixture(scope="module")
def run_report(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("html") / "report.html"
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.iterdir()}
    inp = R.gather(run_dir)
    data = R.build(inp)
    result = R.write_report(run_dir, out)
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.iterdir()}
    assert before == after, "the run folder must only be read"
    return inp, data, result, out


class Rows(HTMLParser):
    """The layer table's rows as lists of (cell text, data-v)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[str, str | None]]] = []
        self._in_table = self._in_cell = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table" and a.get("id") == "layers":
            self._in_table = True
        elif self._in_table and tag == "tr" and "data-changed" in a:
            self.rows.append([])
        elif self._in_table and tag == "td":
            self._in_cell = True
            self.rows[-1].append(["", a.get("data-v")])

    def handle_endtag(self, tag):
        if tag == "table":
            self._in_table = False
        if tag == "td":
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.rows[-1][-1][0] += data


def table_rows(page: str) -> list[list[list]]:
    p = Rows()
    p.feed(page)
    return p.rows


def chart_values(spec: dict, every: bool = False):
    """The inline data rows of a Vega-Lite spec (the first set, or every set when `every`)."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            if isinstance(node.get("data"), dict) and isinstance(node["data"].get("values"), list):
                found.append(node["data"]["values"])
            found.extend(v for v in (node.get("datasets") or {}).values())
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(spec)
    return found if every else found[0]


# ------------------------------------------------------------------ data and HTML
def test_bundled_report_shows_the_plan_and_says_what_is_not_measured(bundled, tmp_path):
    _, report, plan = bundled
    out = tmp_path / "report.html"
    res = R.write_report(None, out)
    assert res.charts == ["size", "latency"]
    assert set(res.omitted) == {"sensitivity", "drift", "pareto", "accuracy"}
    assert all("not measured yet" in why for why in res.omitted.values())
    assert "compressadvise verify bundled" in res.omitted["accuracy"]
    page = out.read_text()
    rows = table_rows(page)
    assert [r[1][0] for r in rows] == [x.name for x in report.layers]
    by_name = {x.name: x for x in plan.layers}
    for r in rows:  # "size now" and "after plan" cells carry the plan's per-layer bytes
        assert int(float(r[4][1])) == by_name[r[1][0]].bytes_before
        assert int(float(r[5][1])) == by_name[r[1][0]].bytes_after
    size = next(s for s in res.summary if s.metric.startswith("size: weights"))
    assert size.basis == "estimate" and size.unit == "B" and size.after == plan.prediction.bytes_after
    acc = next(s for s in res.summary if s.metric == "accuracy")
    assert acc.basis == "not measured yet" and acc.after is None
    assert 'data-omitted="pareto"' in page


def test_report_is_self_contained(run_report):
    *_, out = run_report
    page = out.read_text()
    assert "Content-Security-Policy" in page and "connect-src 'none'" in page
    markup = re.sub(r"(<script[^>]*>).*?</script>", r"\1", page, flags=re.S)  # tags, not code
    assert not re.search(r"<(link|img|iframe|object|embed)\b", markup, re.I)
    assert not re.search(r"<script[^>]+\bsrc=", markup, re.I)
    assert re.findall(r"""(?:href|src)=["'](?:https?:|//)""", markup) == []
    specs = json.loads(re.search(r'id="chart-specs">(.*?)</script>', page, re.S).group(1))
    assert set(specs) == {"size", "latency", "sensitivity", "drift", "pareto", "accuracy-class"}
    assert all(spec.get("$schema", "").startswith("https://vega.github.io/schema/vega/") for spec in specs.values())
    assert 'id="vega-runtime"' in page and len(page) < 5_000_000


def test_run_folder_report_shows_measured_results(run_report, run_dir):
    inp, data, res, out = run_report
    verify = json.loads((run_dir / "verify.json").read_text())
    assert res.charts == ["size", "latency", "sensitivity", "drift", "pareto", "accuracy-class"]
    assert res.omitted == {}
    top = next(s for s in data.summary if s.metric == "top-1 accuracy")
    row = next(r for r in verify["accuracy"] if r["name"] == "top-1 accuracy")
    assert top.basis == "measured" and (top.before, top.after) == (row["original"], row["compressed"])
    assert any(s.basis == "estimate" and s.metric.startswith("latency on ane-a17") for s in data.summary)
    # per-class chart: one pair of bars per class in the verify result
    bars = chart_values(data.chart("accuracy-class").spec)
    assert len(bars) == 2 * len(verify["slices"][0]["rows"])
    # the sensitivity column holds the measured per-layer values
    sens = json.loads((run_dir / "sensitivity.json").read_text())["layers"]
    rows = {r[1][0]: r for r in table_rows(out.read_text())}
    for s in sens:
        assert float(rows[s["name"]][8][1]) == pytest.approx(s["value"], abs=1e-4)


def test_apply_manifest_sizes_and_layer_status(run_report, run_dir):
    _, data, _, out = run_report
    manifest = json.loads((run_dir / "manifest.json").read_text())
    # verify measured the files on disk (a main row): apply's own artefact size is folded away
    row = next(s for s in data.summary if s.metric == "size: torch artifact (apply)")
    assert row.basis == "measured" and row.after == (run_dir / "model.pt").stat().st_size and row.group == "internal"
    assert [s.metric for s in data.summary if s.metric.startswith("size") and s.group == "main"] == [
        "size: weights on the target", "size: file on disk"]
    assert not any("error" in s.metric for s in data.summary)  # a ratio, not a size
    status = {x["name"]: x["status"] for x in manifest["layers"]}
    assert {r.name: r.applied for r in data.layers} == status
    rows = table_rows(out.read_text())
    assert {r[1][0]: r[-1][0] for r in rows} == status  # the "applied" column, last


def test_pareto_marks_the_plan_the_original_and_the_uniform_baselines(run_report, run_dir):
    _, data, *_ = run_report
    verify = json.loads((run_dir / "verify.json").read_text())
    points = max(chart_values(data.chart("pareto").spec, every=True), key=len)
    kinds = {p["kind"] for p in points}
    assert kinds == {"uniform", "original", "chosen"}
    axes = {(x["encoding"]["x"].get("title"), x["encoding"]["y"].get("title")) for x in data.chart("pareto").spec["layer"]
            if "title" in x["encoding"]["y"]}
    assert axes == {("model size (KB)", "top-1 accuracy (%)")}  # the size scales, the metric keeps its unit
    chosen = next(p for p in points if p["kind"] == "chosen")
    row = next(r for r in verify["accuracy"] if r["name"] == "top-1 accuracy")
    assert chosen["value"] == row["compressed"]
    assert chosen["mb"] == pytest.approx(verify["target_size_bytes"]["compressed"] / 1e6)
    front = [p for p in points if p["frontier"]]
    for p in points:  # nothing on the frontier is beaten on both axes
        for f in front:
            assert not (p["mb"] < f["mb"] and p["value"] > f["value"])


def test_frontier_keeps_only_undominated_points():
    P = R.ParetoPoint
    pts = [P(name="a", bytes=10, value=90), P(name="b", bytes=20, value=95), P(name="c", bytes=30, value=93),
           P(name="d", bytes=5, value=50), P(name="e", bytes=20, value=80)]
    assert [p.name for p in R.frontier(pts)] == ["d", "a", "b"]
    assert [p.name for p in R.frontier(pts, higher_is_better=False)] == ["d"]


def test_plan_section_links_rules_and_inlines_explain(bundled, tmp_path):
    _, report, plan = bundled
    out = tmp_path / "r.html"
    R.write_report(report, out, docs_base="https://docs.example/rules/", plan=plan)
    page = out.read_text()
    for code in plan.steps[0].rules:
        assert f'href="https://docs.example/rules/{code}.md"' in page
        assert f"<h1>{code}:" in page  # `explain CODE` text, rendered inside <details>
    page_default = (tmp_path / "d.html")
    R.write_report(report, page_default, plan=plan)  # no docs base: the text is embedded, nothing links off the page
    assert ".md\"" not in page_default.read_text() and f'id="rule-{plan.steps[0].rules[0]}"' in page_default.read_text()


def test_run_folder_without_results_degrades(tmp_path, bundled):
    from compressadvise.plan.planfile import save_plan

    _, _, plan = bundled
    run = tmp_path / "run"
    run.mkdir()
    save_plan(plan, run / "p.yaml")
    (run / "manifest.json").write_text(json.dumps({"plan": "p.yaml", "source": str(tmp_path / "gone.pt")}))
    data = R.build(R.gather(run))
    assert [c.id for c in data.charts] == ["size"]  # sizes from the plan only
    assert any("could not be analyzed" in n for n in data.notes)
    assert {r.name for r in data.layers} == {x.name for x in plan.layers}


def sensitivity_report(loaded, report, samples, bits=(8, 4)) -> dict:
    """Results shaped like `compressadvise.measure.sensitivity` (validated by its own schema), measured
    here with fake-quantized weights: a uniform 2^bits-level grid is a valid per-tensor LUT."""
    from compressadvise.measure.sensitivity import LayerRank, Measurement, SensitivityReport

    with torch.no_grad():
        ref = loaded.module(samples.inputs[0])
    weights = [x for x in report.layers if len(x.weight_shape) >= 2]
    meas, score = [], {}
    for x in weights:
        for b in bits:
            with torch.no_grad():
                out = fake_quantize(loaded.module, {x.name}, b)(samples.inputs[0])
            mse = float(((out - ref) ** 2).mean())
            label = f"{b}-bit palettization per_tensor"
            size = x.weight_elements * b / 8 + 2**b * 2 + (x.params - x.weight_elements) * 2
            meas.append(Measurement(layer=x.name, setting=f"palettization:granularity=per_tensor,nbits={b}",
                                    label=label, technique="palettization", params={"nbits": b},
                                    bytes=int(size), metrics={"output_mse": mse}, proxies={}))
            score[x.name] = score.get(x.name, 1.0) * mse
    med = sorted(score.values())[len(score) // 2]
    ranking = [LayerRank(layer=n, type="conv", params=1, score=v, vs_median=v / med, rank=i + 1)
               for i, (n, v) in enumerate(sorted(score.items(), key=lambda kv: -kv[1]))]
    rep = SensitivityReport(
        source=loaded.source, model_sha256=loaded.sha256, samples="bundled", samples_used=len(samples),
        samples_hash="", output_dim=int(ref.shape[1]), logits=True, reference={}, peak=float(ref.abs().max()),
        baseline_bytes_per_param=2.0, layers=[x.name for x in weights], settings=[m.setting for m in meas[:len(bits)]],
        measurements=meas, ranking=ranking, proxies=[], evaluations=len(meas), cache_hits=0, cache_dir=None,
        executor="test", workers=1, wall_s=0.0)
    return json.loads(rep.model_dump_json())


def test_sensitivity_results_predict_the_plan_and_uniform_settings(bundled, tmp_path):
    pytest.importorskip("compressadvise.measure.sensitivity")
    from compressadvise.model.samples import load_samples

    loaded, report, plan = bundled
    sens = sensitivity_report(loaded, report, load_samples("bundled"))
    path = tmp_path / "sensitivity.json"
    path.write_text(json.dumps(sens))
    data = R.build(R.gather(report, plan=plan, sensitivity=path))
    assert data.chart("sensitivity") is not None
    assert {r.name: r.sensitivity for r in data.layers if r.sensitivity is not None} == pytest.approx(
        {r["layer"]: r["vs_median"] for r in sens["ranking"]})
    points = {p["name"]: p for p in max(chart_values(data.chart("pareto").spec, every=True), key=len)}
    assert {"uniform 8-bit palettization per_tensor", "uniform 4-bit palettization per_tensor"} <= set(points)
    # the plan's predicted PSNR: its changed layers' single-layer MSEs added up
    mse = {(m["layer"], m["label"]): m["metrics"]["output_mse"] for m in sens["measurements"]}
    changed = [x for x in plan.layers if x.bytes_after < x.bytes_before]
    total = sum(mse[(x.name, x.setting)] for x in changed)
    want = 10 * math.log10(sens["peak"] ** 2 / total)
    got = points["the plan (predicted)"]
    assert got["value"] == pytest.approx(want) and got["fidelity"] == "estimate"
    assert got["mb"] == pytest.approx(sum(x.bytes_after for x in plan.layers) / 1e6)
    u4, u8 = points["uniform 4-bit palettization per_tensor"], points["uniform 8-bit palettization per_tensor"]
    assert u4["mb"] < u8["mb"] and u4["value"] < u8["value"]


def test_sensitivity_file_errors(tmp_path):
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"layers": [{"name": "x"}]}))
    with pytest.raises(R.InvalidKnowledge, match="value"):
        R.load_sensitivity(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"layers": {"a": 1.5}, "points": [{"name": "p", "size_bytes": 10, "value": 1}]}))
    s = R.load_sensitivity(ok)
    assert s.layers[0].name == "a" and s.points[0].bytes == 10


# ------------------------------------------------------------------ CLI
def test_cli_writes_html_png_and_json(run_dir, tmp_path):
    runner = CliRunner()
    out, png = tmp_path / "r.html", tmp_path / "png"
    res = runner.invoke(app, ["report", str(run_dir), "--out", str(out), "--png", str(png), "--json"])
    assert res.exit_code == 0, res.output
    body = json.loads(res.stdout)
    assert body["html"] == str(out) and body["bytes"] == out.stat().st_size
    assert sorted(Path(p).name for p in body["png"]) == sorted(f"{c}.png" for c in body["charts"])
    for p in body["png"]:
        head = Path(p).read_bytes()[:24]
        assert head[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(head[16:20], "big") > 200


def cli(*args: str) -> subprocess.CompletedProcess:
    code = "from compressadvise.ui.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


def test_cli_errors_are_one_line_with_documented_codes(tmp_path):
    out = tmp_path / "r.html"
    out.write_text("keep me")
    exists = cli("report", "--out", str(out))
    assert exists.returncode == 9 and out.read_text() == "keep me"
    missing = cli("report", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x.html"))
    assert missing.returncode == 3
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    invalid = cli("report", "--verify", str(bad), "--out", str(tmp_path / "y.html"))
    assert invalid.returncode == 6 and not (tmp_path / "y.html").exists()
    for r in (exists, missing, invalid):
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr


# ------------------------------------------------------------------ in the browser
def test_report_in_headless_chromium(run_report):
    sync_playwright, exe = _browser_or_skip()
    _, data, _, out = run_report
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.goto(out.resolve().as_uri(), wait_until="domcontentloaded")
            page.wait_for_function("[...document.querySelectorAll('[data-chart]')].every(e => e.dataset.rendered)",
                                   timeout=30_000)
            _check_page(page, data)
            ARTIFACTS.mkdir(exist_ok=True)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
        finally:
            browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:", "blob:"))] == []
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def _visible_names(page) -> list[str]:
    return page.eval_on_selector_all("#layers tbody tr:not(.hidden)", "rs => rs.map(r => r.cells[1].textContent)")


def _check_page(page, data: R.ReportData) -> None:
    charts = page.eval_on_selector_all(
        "[data-chart]", "es => es.map(e => [e.dataset.chart, e.dataset.rendered, e.querySelectorAll('svg path, svg rect').length])")
    assert {c[0] for c in charts} == {c.id for c in data.charts}
    assert all(c[1] == "1" and c[2] > 3 for c in charts), charts
    assert _visible_names(page) == [r.name for r in data.layers]
    # sort by "size now": largest first, then smallest first
    page.click("#layers th[data-key=before]")
    by_size = sorted(data.layers, key=lambda r: -r.bytes_before)
    assert _visible_names(page)[0] == by_size[0].name
    assert page.get_attribute("#layers th[data-key=before]", "aria-sort") == "descending"
    page.click("#layers th[data-key=before]")
    sizes = page.eval_on_selector_all("#layers tbody tr", "rs => rs.map(r => +r.cells[4].dataset.v)")
    assert sizes == sorted(sizes)
    page.click("#layers th[data-key=name]")  # text columns start ascending
    assert _visible_names(page) == sorted(r.name for r in data.layers)
    # filter by type, search, and only-changed
    page.select_option("#type-filter", "linear")
    assert sorted(_visible_names(page)) == sorted(r.name for r in data.layers if r.type == "linear")
    n_linear = sum(r.type == "linear" for r in data.layers)
    assert page.inner_text("#count") == f"{n_linear} of {len(data.layers)} layers"
    page.select_option("#type-filter", "")
    page.fill("#q", "conv")
    assert sorted(_visible_names(page)) == sorted(r.name for r in data.layers
                                                  if "conv" in (r.name + " " + r.setting).lower())
    page.fill("#q", "")
    page.check("#changed-only")
    assert sorted(_visible_names(page)) == sorted(r.name for r in data.layers if R._changed(r.setting))
    page.uncheck("#changed-only")
    assert len(_visible_names(page)) == len(data.layers)
