"""The report page's views (issue 22): planned vs built from a real `apply` folder, linked chart and
table selection, sorting by every column, scaled units, embedded rule explanations and print.

The apply folder is made for real (the bundled model, its recommended plan, `apply` in-process);
a copy with one layer edited out of its manifest stands for a build that differs from the plan.
"""
from __future__ import annotations

import json
import re
import shutil

import pytest

from compressadvise.ui import report as R
from compressadvise.ui.render import byte_unit, human_bytes, human_ms, human_quantity, time_unit

from browser_helpers import CHROMIUM_ARGS, _browser_or_skip

RED = "rgb(194, 48, 48)"  # --red in report.css


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """A real apply output folder named "o" (the header must name the model, not the folder)."""
    pytest.importorskip("coremltools")
    from compressadvise.backends.apply import apply
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import load_model
    from compressadvise.plan.engine import recommend

    loaded = load_model(None)
    plan = recommend(analyze(loaded), target="ane-a17")
    out = tmp_path_factory.mktemp("run") / "o"
    apply(loaded, plan, out)
    return out


@pytest.fixture(scope="module")
def differing(applied, tmp_path_factory):
    """A copy whose manifest says one planned layer was not built (what the gate records)."""
    run = tmp_path_factory.mktemp("differs") / "o"
    shutil.copytree(applied, run)
    manifest = json.loads((run / "manifest.json").read_text())
    gate = manifest["planned_vs_built"]
    layer = next(x for x in manifest["layers"] if x["status"] == "applied")
    layer["status"] = "skipped"
    gate["rows"] = [{"step": 1, "technique": "palettization", "layer": layer["name"], "planned": "8-bit",
                     "built": "skipped", "reason": "edited out for the test"}]
    gate["layers_built"] -= 1
    gate["ok"] = False
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run, layer["name"]


@pytest.fixture(scope="module")
def pages(applied, differing, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pages")
    out = {}
    for name, run in (("built", applied), ("differs", differing[0])):
        data = R.build(R.gather(run))
        page = R.render_html(data)
        (folder / f"{name}.html").write_text(page, encoding="utf-8")
        out[name] = (data, page, folder / f"{name}.html")
    return out


def visible_text(page: str) -> str:
    """The page's markup without scripts and chart specs: what the reader sees, roughly."""
    return re.sub(r"<script[^>]*>.*?</script>", "", page, flags=re.S)


# ------------------------------------------------------------------ data and HTML
def test_planned_vs_built_comes_first_with_totals_and_per_layer_rows(pages, applied):
    data, page, _ = pages["built"]
    manifest = json.loads((applied / "manifest.json").read_text())
    gate = manifest["planned_vs_built"]
    assert page.index('id="built"') < page.index('id="summary"') < page.index('id="charts"')
    assert data.built is not None and data.built.ok
    planned = {x.name for x in data.built.layers}
    assert planned == {x["name"] for x in manifest["layers"] if x["status"] == "applied"}
    assert not any(x.differs for x in data.built.layers)
    section = page[page.index('id="built"'):page.index('id="summary"')]
    assert "built as planned" in section and "DIFFERS" not in section and "class=\"differs\"" not in section
    for n in (gate["planned_bytes"], gate["built_bytes"], manifest["sizes"]["weight_file_bytes"]["value"]):
        assert human_bytes(n) in section  # the totals, in the page's units


def test_a_layer_that_differs_is_marked(pages, differing):
    data, page, _ = pages["differs"]
    _, name = differing
    assert not data.built.ok
    row = data.built.layers[0]  # the ones that differ come first
    assert row.name == name and row.differs and "edited out for the test" in row.built
    assert row.built_bytes > row.planned_bytes  # it shipped uncompressed
    assert re.search(rf'<tr class="differs"><td class=name>{name}</td>', page)
    assert "DIFFERS from the plan" in page


def test_header_names_the_model_not_the_folder(pages, applied):
    data, page, _ = pages["built"]
    assert data.model == "bundled:digits-cnn" and data.source == str(applied)
    header = page[page.index("<header>"):page.index("</header>")]
    assert "model <code>bundled:digits-cnn</code>" in header and f"apply folder <code>{applied}</code>" in header
    assert "<title>Compression report: bundled:digits-cnn</title>" in page


def test_one_size_row_per_basis_and_the_internal_estimates_folded(pages, applied):
    data, page, _ = pages["built"]
    sizes = json.loads((applied / "manifest.json").read_text())["sizes"]
    main = [r for r in data.summary if r.group == "main" and r.metric.startswith("size")]
    assert [r.metric for r in main] == ["size: weights on the target", "size: file on disk"]
    weights, disk = main
    assert weights.after == sizes["weight_file_bytes"]["value"] and weights.basis == "measured"
    assert weights.before_basis.startswith("estimate")  # fp16, from the formulas
    assert disk.after == sizes["mlpackage_bytes"]["value"]
    internal = {r.metric for r in data.summary if r.group == "internal"}
    assert internal == {"size: plan estimate (apply)", "size: applied estimate (apply)",
                        "size: weight file estimate (apply)", "size: torch artifact (apply)"}
    summary = page[page.index('id="summary"'):page.index('id="charts"')]
    folded = summary[summary.index('<details class="internal">'):]
    assert all(m in folded for m in internal) and not any(m in summary[:summary.index("<details")] for m in internal)


AWKWARD = re.compile(r"\b0\.\d+ ?(KB|MB|GB|ms|s)\b|\d\.\d{4,} ?(B|KB|MB|GB|ms|µs)\b")  # "0.1479 MB", "0.003251 ms"


def test_units_scale_everywhere_on_the_page(pages):
    data, page, _ = pages["built"]
    # The page's own figures; the knowledge base's prose (advice messages, rule texts) keeps its words.
    text = re.sub(r'<ul class="advice">.*?</ul>|<section id="rules">.*?</section>', "", visible_text(page), flags=re.S)
    assert not AWKWARD.search(text), AWKWARD.search(text)
    titles = json.dumps([c.spec.get("title") for c in data.charts] + [c.spec.get("encoding") for c in data.charts])
    assert not AWKWARD.search(titles), AWKWARD.search(titles)
    latency = next(r for r in data.summary if r.metric.startswith("latency on ane-a17"))
    assert human_ms(latency.before).endswith("µs") and f"<td class=num>{human_ms(latency.before)}</td>" in page
    size = next(r for r in data.summary if r.metric == "size: weights on the target")
    assert f"<td class=num>{human_bytes(size.before)}</td>" in page
    size_chart = data.chart("size").spec
    assert size_chart["encoding"]["x"]["title"] == "KB"  # the bundled model's layers are KBs, not MB


def test_one_formatter_scales_bytes_and_durations():
    assert [human_bytes(n) for n in (640, 147_860, 1_605_889, 3.2e9)] == ["640 B", "147.86 KB", "1.61 MB", "3.20 GB"]
    assert [human_ms(m) for m in (0.003251, 0.9996, 87.62, 1500)] == ["3.25 µs", "1 ms", "87.6 ms", "1.5 s"]
    assert human_quantity(0.1479, "MB") == "147.90 KB" and human_quantity(99.17, "%") == "99.17 %"
    assert byte_unit(79_252) == ("KB", 1e3) and time_unit(0.5) == ("µs", 1000.0)


def test_every_rule_mention_has_its_explanation_and_no_relative_md_link(pages):
    data, page, _ = pages["built"]
    linked = set(re.findall(r'<a class="ruleref" href="#rule-([A-Z]{3}\d{3})"', page))
    explained = set(re.findall(r'<details class="rule" id="rule-([A-Z]{3}\d{3})">', page))
    cited = {r.code for s in data.steps for r in s.rules} | {a.rule.code for a in data.advice}
    cited |= {t["code"] for t in data.trace}
    assert cited and cited <= linked == explained == set(data.rules)
    for code in explained:  # the `explain` text, rendered in the entry
        entry = page[page.index(f'id="rule-{code}"'):]
        assert f"<h1>{code}:" in entry[:entry.index("</details>")]
    markup = visible_text(page)
    assert not re.search(r'href="(?!#|https?:)[^"]*\.md"', markup)  # opened on its own, nothing breaks
    assert 'class="docs"' not in markup


def test_rule_links_go_to_the_docs_site_only_with_a_base(applied):
    data = R.build(R.gather(applied), docs_base="https://docs.example/rules/")
    page = R.render_html(data, runtime="")
    for code in data.rules:
        assert f'<a class="docs" href="https://docs.example/rules/{code}.md">' in page


def test_pareto_labels_do_not_overlap():
    from compressadvise.ui.report_charts import LABEL_PX, PARETO_SIZE, _place_labels

    # ten uniform settings crowded near each other on the frontier, plus the plan and the original
    values = [{"name": f"uniform {b}-bit palettization", "x": 10 + b * 0.3, "value": 80 + b * 0.5,
               "kind": "uniform", "frontier": True} for b in range(2, 12)]
    values += [{"name": "the plan", "x": 12.5, "value": 83.2, "kind": "chosen", "frontier": False},
               {"name": "original (fp16)", "x": 40, "value": 86, "kind": "original", "frontier": True}]
    _place_labels(values, PARETO_SIZE)
    assert {v["name"] for v in values if v["label"]} >= {"the plan", "original (fp16)"}
    assert 0 < sum(bool(v["label"]) for v in values) < len(values)  # crowded ones stay unlabelled
    xs, ys = [v["x"] for v in values], [v["value"] for v in values]
    boxes = []
    for v in (v for v in values if v["label"]):
        x = (v["x"] - min(xs)) / (max(xs) - min(xs)) * PARETO_SIZE[0]
        y = (1 - (v["value"] - min(ys)) / (max(ys) - min(ys))) * PARETO_SIZE[1]
        w = LABEL_PX[0] * len(v["name"])
        x0 = x + 8 if v["label"] == "right" else x - 8 - w
        boxes.append((x0, y - 18, x0 + w, y - 6))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not (a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]), (a, b)


# ------------------------------------------------------------------ in the browser
def test_linked_views_sorting_print_and_the_red_row_in_headless_chromium(pages):
    sync_playwright, exe = _browser_or_skip()
    data, _, path = pages["built"]
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.goto(path.resolve().as_uri(), wait_until="domcontentloaded")
            page.wait_for_function("[...document.querySelectorAll('[data-chart]')].every(e => e.dataset.rendered)",
                                   timeout=30_000)
            _check_linked_selection(page)
            _check_sorting_by_every_column(page, len(data.layers))
            wrap = page.evaluate("(w => [w.scrollWidth, w.clientWidth])(document.querySelector('.tablewrap'))")
            assert wrap[0] <= wrap[1], f"the layer table is clipped: {wrap}"
            _check_print(page)
            page.goto(pages["differs"][2].resolve().as_uri(), wait_until="domcontentloaded")
            assert page.eval_on_selector("#built tr.differs td", "td => getComputedStyle(td).color") == RED
            assert page.eval_on_selector("#built tbody tr:not(.differs) td", "td => getComputedStyle(td).color") != RED
        finally:
            browser.close()
    assert errors == []


def _faded(page, chart: str, layer: str) -> tuple[set[str], set[str]]:
    """(opacities of the chart's marks for `layer`, opacities of the others)."""
    marks = page.eval_on_selector_all(
        f"[data-chart={chart}] svg path[aria-label*='layer: ']",
        "es => es.map(e => [/layer: ([^;]*)/.exec(e.getAttribute('aria-label'))[1], e.getAttribute('opacity')])")
    return {o for n, o in marks if n == layer}, {o for n, o in marks if n != layer}


def _check_linked_selection(page) -> None:
    def selected_rows():
        return page.eval_on_selector_all("#layers tr.selected", "rs => rs.map(r => r.cells[1].textContent)")

    # a click on a bar in one chart: the row is selected, the other chart highlights the layer
    page.locator("[data-chart=size] svg path[aria-label*='layer: conv;']").first.click()
    assert page.evaluate("compressadviseReport.selected()") == "conv" and selected_rows() == ["conv"]
    assert page.evaluate("compressadviseReport.view('latency').signal('sel')") == "conv"
    mine, others = _faded(page, "latency", "conv")
    assert mine == {"1"} and others == {"0.3"}
    assert page.is_visible("#selection") and page.inner_text("#selected-name") == "conv"
    # a click on a table row: both charts follow
    page.click("#layers tbody tr:has(td.name:text-is('fc'))")
    assert selected_rows() == ["fc"]
    for chart in ("size", "latency"):
        mine, others = _faded(page, chart, "fc")
        assert mine == {"1"} and others == {"0.3"}, chart
    page.click("#clear-selection")
    assert selected_rows() == [] and _faded(page, "size", "fc")[1] == {"1"}
    page.evaluate("compressadviseReport.selectLayer('conv')")  # the page's selection API
    assert selected_rows() == ["conv"] and _faded(page, "size", "conv") == ({"1"}, {"0.3"})
    page.evaluate("compressadviseReport.selectLayer(null)")


SORTED_JS = """key => {
  const th = document.querySelector(`#layers th[data-key=${key}]`);
  const i = [...th.parentNode.children].indexOf(th);
  return [th.getAttribute('aria-sort'), [...document.querySelectorAll('#layers tbody tr')].map(r => {
    const c = r.cells[i];
    return th.dataset.type === 'num' ? (c.dataset.v === '' ? null : +c.dataset.v) : c.textContent.toLowerCase();
  })];
}"""


def _check_sorting_by_every_column(page, n_rows: int) -> None:
    keys = page.eval_on_selector_all("#layers th", "hs => hs.map(h => h.dataset.key)")
    assert len(keys) >= 10
    for key in keys:
        for _ in range(2):  # each direction
            page.click(f"#layers th[data-key={key}]")
            direction, values = page.evaluate(SORTED_JS, key)
            assert len(values) == n_rows
            present = [v for v in values if v is not None]
            assert values[len(present):] == [None] * (n_rows - len(present)), f"{key}: missing values last"
            want = sorted(present, reverse=direction == "descending")
            assert present == want, f"{key} {direction}: {values}"


def _check_print(page) -> None:
    page.emulate_media(media="print")
    page.wait_for_function("[...document.querySelectorAll('details')].every(d => d.open)", timeout=5_000)
    hidden = page.evaluate("['.controls', '.hint', '#selection', '#q'].map("
                           "s => getComputedStyle(document.querySelector(s)).display)")
    assert hidden == ["none"] * 4
    assert page.evaluate("getComputedStyle(document.querySelector('.tablewrap')).overflow") == "visible"
    page.set_viewport_size({"width": 718, "height": 1000})  # a portrait A4 page's printable width
    widths = page.eval_on_selector_all("figure.chart svg, #layers, #built table, #summary table",
                                       "es => es.map(e => e.getBoundingClientRect().right)")
    assert widths and max(widths) <= page.evaluate("document.documentElement.clientWidth"), widths
    page.set_viewport_size({"width": 1300, "height": 900})
    page.emulate_media(media="screen")
    page.wait_for_function("![...document.querySelectorAll('#rules details')].some(d => d.open)", timeout=5_000)
