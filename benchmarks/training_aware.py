"""When post-training is not enough: post-training vs calibrated vs training-aware, built by `apply`.

    python benchmarks/training_aware.py [--bits 1 2 3 4] [--real] [--write]

Bundled digits CNN, every conv/linear layer (weight_threshold 0, first and last layers included:
the harsh case), for ane-a17 iOS 18, each row a real `apply` (Core ML conversion and read-back
included in the wall time):
- palettization (k-means, data-free) vs sensitive_kmeans (128 training images as calibration
  data) vs dkm (`--train bundled`: the training split) at 1/2/3/4 bits, one LUT per tensor;
- linear_quantization int4 per channel vs qat int4 (`--train bundled`);
- W8A8 from the torch side (activation_quantization: LinearQuantizer observers on the 128
  calibration images; the .mlpackage read back with a quantize/dequantize pair before each layer).
Accuracy is top-1 of the torch artefact on the 360 held-out digits (never trained or calibrated
on). `--real`: MobileNetV2 (tests/real_models) at 4 bits, post-training vs sensitive k-means,
fidelity as output PSNR against the float model on 16 random inputs (weak evidence: the package
ships no images), calibrated on 32 other random inputs. --write updates docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from doc_section import write_section  # noqa: E402

HEADING = "## When post-training is not enough"
LAYERS = ["stem", "dw", "pw", "conv", "fc", "classifier"]


def _plan(technique: str, slot: str = "weights", layers: list[str] | None = None, **params):
    from compressadvise.knowledge.schema import Plan, PlanModel, PlanTarget, Step

    return Plan(target=PlanTarget(name="ane-a17", os=18), model=PlanModel(),
                steps=[Step(technique=technique, slot=slot, params={"weight_threshold": 0, **params},
                            layers=list(layers or LAYERS))])


def _accuracy(out: Path) -> float:
    import torch

    from compressadvise.backends.apply import load_artifact
    from compressadvise.examples import digits

    x, y = digits.samples()
    run = load_artifact(out).runnable()
    with torch.no_grad():
        return float((run(torch.from_numpy(x)).argmax(1) == torch.from_numpy(y)).float().mean()) * 100


def _input_quantized(manifest: dict) -> str:
    """How many layers the .mlpackage read-back found with a quantize/dequantize input."""
    evidence = [e.get("coreml", {}).get("evidence", "") for x in manifest["layers"] for e in x["steps"]]
    return f"read back: {sum('input through quantize' in e for e in evidence)} layers with int8 inputs"


def _calibration(tmp: Path) -> Path:
    """128 images of the training split (the held-out set stays out of calibration too)."""
    import numpy as np

    from compressadvise.examples import digits

    x, y = digits.train_split()
    path = tmp / "calibration.npz"
    np.savez(path, inputs=x[:128], labels=y[:128])
    return path


def digits_rows(bits: list[int]) -> list[list[str]]:
    import compressadvise as ca
    from compressadvise.examples import digits

    model = ca.load_model(None)
    rows = [["float (fp32)", "-", f"{digits.card()['float_top1'] * 100:.2f}", "-", "-"]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cal = _calibration(tmp)
        runs = []
        for nbits in bits:
            runs += [(f"palettization {nbits}-bit", "post-training", _plan("palettization", nbits=nbits), {}),
                     (f"sensitive_kmeans {nbits}-bit", "calibrated (128 train images)",
                      _plan("sensitive_kmeans", nbits=nbits, granularity="per_tensor"), {"samples": cal}),
                     (f"dkm {nbits}-bit", "training-aware (--train bundled)", _plan("dkm", nbits=nbits),
                      {"train": "bundled"})]
        runs += [("linear_quantization int4", "post-training", _plan("linear_quantization", nbits=4), {}),
                 ("qat int4", "training-aware (--train bundled)", _plan("qat", nbits=4), {"train": "bundled"}),
                 ("activation_quantization W8A8", "calibrated (128 train images)",
                  _plan("activation_quantization", "activations"), {"samples": cal})]
        for i, (label, kind, plan, extra) in enumerate(runs):
            out = tmp / f"o{i}"
            t0 = time.perf_counter()
            try:
                result = ca.apply(model, plan, out, **extra)
            except Exception as e:  # a row that fails is a finding
                rows.append([label, kind, f"error: {type(e).__name__}: {str(e)[:100]}", "", ""])
                continue
            seconds = time.perf_counter() - t0
            trained = result.manifest["steps"][0].get("training")
            rows.append([label, kind, f"{_accuracy(out):.2f}", f"{seconds:.1f}",
                         f"{trained['steps']} steps, {trained['seconds']:.1f} s" if trained else
                         (_input_quantized(result.manifest) if "W8A8" in label else "-")])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def real_rows() -> list[list[str]]:
    import numpy as np
    import torch

    import compressadvise as ca
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import LoadedModel
    from real_models.catalog import REAL_MODELS

    spec = REAL_MODELS["mobilenet_v2"]
    if not spec.installed():
        return [["MobileNetV2", spec.skip_reason(), "", "", ""]]
    module, example = spec.build()
    loaded = LoadedModel(source="mobilenet_v2", format="module", sha256="mobilenet_v2", has_graph=True,
                         module=module.eval(), example_inputs=example)
    report = analyze(loaded, stats=False)
    layers = [x.name for x in report.layers if x.type in ("conv", "pointwise_conv", "linear") and x.params > 2048]
    gen = torch.Generator().manual_seed(0)
    shape = tuple(example[0].shape[1:])
    evaluate = torch.randn(16, *shape, generator=gen)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cal = Path(tmp) / "cal.npz"
        np.savez(cal, inputs=torch.randn(32, *shape, generator=gen).numpy())
        with torch.no_grad():
            ref = module(evaluate)
        for label, plan, extra in (
                ("palettization 4-bit per tensor", _plan("palettization", layers=layers, nbits=4, weight_threshold=2048), {}),
                ("sensitive_kmeans 4-bit per tensor (32 random inputs)",
                 _plan("sensitive_kmeans", layers=layers, nbits=4, granularity="per_tensor", weight_threshold=2048,
                       calibration_samples=32), {"samples": cal})):
            out = Path(tmp) / label.split()[0]
            t0 = time.perf_counter()
            try:
                ca.apply(loaded, plan, out, **extra)
            except Exception as e:
                rows.append([f"MobileNetV2 {label}", f"error: {type(e).__name__}: {str(e)[:100]}", "", "", ""])
                continue
            seconds = time.perf_counter() - t0
            from compressadvise.backends.apply import load_artifact

            with torch.no_grad():
                got = load_artifact(out).runnable()(evaluate)
            mse = float(((got - ref) ** 2).mean())
            psnr = 10 * np.log10(float(ref.abs().max()) ** 2 / mse)
            top1 = float((got.argmax(1) == ref.argmax(1)).float().mean())
            rows.append([f"MobileNetV2 {label}", f"{psnr:.1f} dB", f"{top1:.2f}", f"{seconds:.1f}", f"{len(layers)} layers"])
            print(" | ".join(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import torch

    torch.manual_seed(0)
    rows = digits_rows(args.bits)
    table = ["| setting | data | top-1 % (360 held-out) | apply wall s | training |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    real = real_rows() if args.real else []
    text = [HEADING, "",
            f"`python benchmarks/training_aware.py{' --real' if args.real else ''} --write` on {platform.machine()}, "
            f"{torch.get_num_threads()} threads, torch {torch.__version__}. Every row is a real `apply` for ane-a17 "
            "(iOS 18): compression, Core ML conversion, read-back and the planned-vs-built gate included in the wall "
            "time. Bundled digits CNN, all six conv/linear layers at one LUT (or one int4 grid per channel), "
            "`weight_threshold` 0 (the first and last layers too: the harsh case, not what `recommend` plans). "
            "Accuracy: the torch artefact on the 360 held-out digits (never trained or calibrated on).", ""]
    text += table
    if real:
        text += ["", "MobileNetV2 (real ImageNet weights, tests/real_models), 4 bits on its conv/linear layers "
                 "above 2048 weights. Fidelity against the float model on 16 random inputs (weak evidence: the "
                 "package ships no images); sensitive k-means calibrated on 32 other random inputs.", "",
                 "| setting | output PSNR | top-1 agreement | apply wall s | layers |", "|---|---|---|---|---|"]
        text += ["| " + " | ".join(r) + " |" for r in real]
    print("\n".join(text))
    if args.write:
        write_section(HEADING, "\n".join(text) + "\n")


if __name__ == "__main__":
    main()
