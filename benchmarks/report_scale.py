"""Size and load time of the HTML report for a model with ~1,000 weight layers.

    python benchmarks/report_scale.py [--blocks 500] [--loads 3] [--keep DIR] [--write]

The model is built here: BLOCKS blocks of LayerNorm + Linear (2 weight layers each), runnable,
so every table column and chart is filled: the plan (recommended for ane-a17), roofline latency
per layer, a real `verify` run against a copy with 4-bit fake-quantized weights (random inputs:
drift for every layer, latency on this machine) and per-layer sensitivity results (synthetic
values: only their volume matters here). The page is then opened in headless Chromium with
networking off, `--loads` times; DOMContentLoaded and the time until every chart has drawn
come from the page's own navigation timing; sorting the whole table by size is timed in the page.

Targets (issue 22): under 3 MB and DOMContentLoaded under 1 s. --write puts the figures in
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from torch import nn

LIMIT_BYTES = 3_000_000
LIMIT_DCL_MS = 1000.0
HEADING = "## Report for a 1,000-layer model"
PARTS = {  # the page's big parts, by the element that holds them
    "Vega runtime": r'<script type="text/plain" id="vega-runtime">(.*?)</script>',
    "chart specs": r'<script type="application/json" id="chart-specs">(.*?)</script>',
    "layer table": r'<section id="layers-section">(.*?)</section>',
    "what-if section and data": r'(<section id="whatif">.*?</section>|<script type="application/json" id="whatif-data">.*?</script>)',
    "rule texts": r'<section id="rules">(.*?)</section>',
}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.relu(self.fc(self.norm(x)))


class Deep(nn.Module):
    def __init__(self, blocks: int, d: int = 64) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(d) for _ in range(blocks)))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        return self.head(self.blocks(x))


def fake_quantize(model: nn.Module, bits: int = 4) -> nn.Module:
    """A copy with symmetric per-channel fake-quantized Linear weights (a stand-in for apply)."""
    out = copy.deepcopy(model)
    levels = 2 ** (bits - 1) - 1
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, nn.Linear):
                scale = m.weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / levels
                m.weight.copy_((m.weight / scale).round().clamp(-levels, levels) * scale)
    return out


# Sort the table by size (a click on its header), including the relayout it causes.
SORT_JS = """() => {
  const th = document.querySelector('#layers th[data-key=before]');
  const t0 = performance.now();
  th.click();
  document.getElementById('layers').offsetHeight;
  return performance.now() - t0;
}"""


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def load_times(page_path: Path, loads: int) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    exe = chromium()
    if exe is None:
        raise SystemExit("no chromium on PATH (apt-get install chromium)")
    dcl, charts, sorts, requests = [], [], [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            for _ in range(loads):
                ctx = browser.new_context(viewport={"width": 1300, "height": 900})
                page = ctx.new_page()
                page.on("request", lambda r: requests.append(r.url))
                t0 = time.perf_counter()
                page.goto(page_path.resolve().as_uri(), wait_until="domcontentloaded")
                page.wait_for_function(
                    "[...document.querySelectorAll('[data-chart]')].every(e => e.dataset.rendered)", timeout=60_000)
                charts.append((time.perf_counter() - t0) * 1e3)
                nav = page.evaluate("JSON.stringify(performance.getEntriesByType('navigation')[0])")
                dcl.append(json.loads(nav)["domContentLoadedEventEnd"])
                sorts.append(page.evaluate(SORT_JS))
                ctx.close()
        finally:
            browser.close()
    external = [u for u in requests if not u.startswith(("file:", "data:", "blob:", "about:"))]
    return {"dcl_ms_median": statistics.median(dcl), "dcl_ms_max": max(dcl),
            "charts_drawn_ms_median": statistics.median(charts), "sort_1000_rows_ms_median": statistics.median(sorts),
            "network_requests": len(external)}


def parts(page: str) -> dict[str, int]:
    """Bytes of each big part of the page (what to shrink first when it grows)."""
    return {name: sum(len(m.encode("utf-8")) for m in re.findall(pattern, page, re.S))
            for name, pattern in PARTS.items()}


def section(result: dict, loads: int, blocks: int) -> str:
    """The docs/benchmarks.md section for these figures."""
    kb = lambda n: f"{n / 1000:,.0f} KB"  # noqa: E731
    rows = [("HTML size", f"{result['html_bytes']:,} bytes", "under 3 MB"),
            ("DOMContentLoaded, median / max", f"{result['dcl_ms_median']:.0f} / {result['dcl_ms_max']:.0f} ms",
             "under 1 s"),
            ("all charts drawn, median", f"{result['charts_drawn_ms_median'] / 1000:.1f} s", ""),
            ("sorting 1,000 rows", f"{result['sort_1000_rows_ms_median'] / 1000:.2f} s", ""),
            ("network requests", str(result["network_requests"]), "0")]
    intro = (f"`python benchmarks/report_scale.py --blocks {blocks} --loads {loads}`: {result['layers']:,} layers, "
             f"every column and {len(result['charts'])} charts filled, opened {loads} times in headless Chromium "
             f"({result['machine']}, load average {result['load_average_1m']}).")
    rest = result["html_bytes"] - sum(result["parts"].values())
    where = ("Where the bytes are: " + ", ".join(f"{k} {kb(v)}" for k, v in result["parts"].items())
             + f"; the rest (styles, scripts, the other sections) {kb(rest)}. The runtime and the chart specs are "
             "inert text until the page has opened, so the table is usable at once.")
    lines = [HEADING, "", textwrap.fill(intro, 100), "", "| figure | value | target (issue 22) |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", textwrap.fill(where, 100)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=500)
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--keep", help="Keep the report here instead of a temporary folder.")
    ap.add_argument("--write", action="store_true", help="Write the figures into docs/benchmarks.md.")
    args = ap.parse_args()
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import LoadedModel
    from compressadvise.ui.report import Sensitivity, SensitivityLayer, build, gather, render_html
    from compressadvise.measure.verify import verify

    torch.manual_seed(0)
    model = Deep(args.blocks).eval()
    example = (torch.randn(1, 64),)
    loaded = LoadedModel("bench:deep", "factory", "0", has_graph=True, module=model, example_inputs=example)
    report = analyze(loaded)
    t0 = time.perf_counter()
    inp = gather(report, target="ane-a17")
    inp.verify = verify(loaded, fake_quantize(model), target="ane-a17", plan=inp.plan, reps=3, warmup=1,
                        drift_samples=8)
    verify_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(1)
    inp.sensitivity = Sensitivity(setting="synthetic values (benchmark)", layers=[
        SensitivityLayer(name=x.name, value=float(torch.rand(1, generator=gen))) for x in report.layers])
    t0 = time.perf_counter()
    data = build(inp)
    page = render_html(data)
    build_s = time.perf_counter() - t0
    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="report-scale-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    size = path.stat().st_size
    timing = load_times(path, args.loads)
    result = {
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "load_average_1m": round(os.getloadavg()[0], 1),
        "layers": len(data.layers), "charts": [c.id for c in data.charts],
        "html_bytes": size, "html_limit_bytes": LIMIT_BYTES, "parts": parts(page),
        "plan_and_verify_s": round(verify_s, 2), "build_and_render_s": round(build_s, 2),
        **{k: round(v, 1) if isinstance(v, float) else v for k, v in timing.items()},
        "dcl_limit_ms": LIMIT_DCL_MS,
        "ok": size < LIMIT_BYTES and timing["dcl_ms_max"] < LIMIT_DCL_MS and timing["network_requests"] == 0,
    }
    if args.keep:
        result["report"] = str(path)
    print(json.dumps(result, indent=2))
    if args.write:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from doc_section import write_section

        write_section(HEADING, section(result, args.loads, args.blocks))
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
