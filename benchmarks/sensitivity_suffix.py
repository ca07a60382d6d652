"""Sensitivity with the unchanged prefix run once vs full passes, on a real pretrained CNN.

    python benchmarks/sensitivity_suffix.py [--samples 24] [--settings 6] [--write]

MobileNetV2 (tests/real_models: ImageNet weights, BatchNorm folded as it ships) on N random
224x224 inputs (the package ships no images; this measures cost, and checks that both modes give
the same figures). The same single-layer evaluations run twice in one process, one worker, no
cache: full passes (every evaluation runs the whole model) and suffix passes (one pass computes
every layer's prefix, then each evaluation runs only what depends on its layer). Reported: wall
time, forward-pass equivalents (a pass over all samples = 1, a suffix pass its share of the MACs)
and the largest difference between the two modes' PSNR. --write puts the table in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from doc_section import write_section  # noqa: E402

HEADING = "## Sensitivity: the unchanged prefix once"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--settings", type=int, default=6, help="settings per layer (N spread over the default grid)")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import torch

    from compressadvise.measure.executors import make_executor
    from compressadvise.measure.sensitivity import Cache, default_grid, prepare, sensitivity
    from compressadvise.model.loading import LoadedModel
    from compressadvise.model.samples import Samples
    from real_models.catalog import REAL_MODELS

    spec = REAL_MODELS["mobilenet_v2"]
    if not spec.installed():
        sys.exit(f"MobileNetV2 not installed: {spec.skip_reason()}")
    module, example = spec.build()
    loaded = LoadedModel(source="mobilenet_v2", format="module", sha256="mobilenet_v2", has_graph=True,
                         module=module.eval(), example_inputs=example)
    x = torch.randn(args.samples, *example[0].shape[1:], generator=torch.Generator().manual_seed(0))
    full = default_grid()
    grid = full[::max(1, len(full) // args.settings)][:args.settings]  # spread over the grid's techniques and bits
    rows, psnr = [], {}
    for suffix in (False, True):
        prep = prepare(loaded, Samples([x], source=f"{args.samples} random inputs"), max_samples=args.samples)
        prep.suffix = suffix
        t0 = time.perf_counter()
        rep = sensitivity(prepared=prep, settings=grid, cache=Cache(enabled=False), executor=make_executor("serial"))
        wall = time.perf_counter() - t0
        psnr[suffix] = {(m.layer, m.setting): m.metrics["psnr_db"] for m in rep.measurements}
        rows.append(["suffix passes" if suffix else "full passes", str(rep.evaluations), f"{rep.forward_passes:.1f}",
                     str(rep.suffix_evaluations), f"{wall:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    diff = max(abs(psnr[True][k] - psnr[False][k]) for k in psnr[False])
    layers = len({k[0] for k in psnr[False]})
    text = [HEADING, "",
            f"`python benchmarks/sensitivity_suffix.py --samples {args.samples} --settings {args.settings}` on "
            f"{platform.machine()}, one worker, no cache, torch {torch.__version__}. MobileNetV2 (ImageNet weights, "
            f"BatchNorm folded), {layers} layers x {len(grid)} settings ({', '.join(s.label for s in grid)}), "
            f"{args.samples} random inputs.", "",
            "| mode | evaluations | forward-pass equivalents | suffix-only | wall s |", "|---|---|---|---|---|"]
    text += ["| " + " | ".join(r) + " |" for r in rows]
    text += ["", f"Largest PSNR difference between the two modes over all {len(psnr[False])} measurements: "
             f"{diff:.2g} dB (the same operations on the same tensors). Ratio of wall times: "
             f"{float(rows[1][4]) / float(rows[0][4]):.2f}."]
    print("\n".join(text))
    if args.write:
        write_section(HEADING, "\n".join(text) + "\n")


if __name__ == "__main__":
    main()
