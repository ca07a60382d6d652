"""A Markdown summary of a `verify` result for a pull request or a CI job page (GitHub-flavoured).

Short on purpose (a PR comment, not the report): the verdict, the budgets, sizes, accuracy, the
worst classes, fidelity, drift and latency, each figure with the basis the result gives it
(measured here, measured on a device, estimate, proxy). Full figures stay in `verify --json`.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from compressadvise.errors import OutputNotWritable
from compressadvise.fsutil import check_writable, write_text_atomic, writing

if TYPE_CHECKING:
    from compressadvise.measure.verify import VerifyResult
    from compressadvise.measure.verify_outputs import SliceReport

MAX_ROWS = 10  # per-class rows and outputs shown; the rest are counted
STDOUT = "-"
# Characters that would end a table cell, open a code span, or start emphasis, a link or HTML.
_SPECIAL = re.compile(r"([\\`*_\[\]<>|#~&])")
_FIDELITY_NAMES = {"top1_agreement": "top-1 agreement", "pixel_agreement": "pixel agreement",
                   "kl_divergence": "KL divergence", "snr_db": "SNR", "psnr_db": "PSNR", "iou": "IoU",
                   "cosine": "cosine", "max_abs_error": "max abs error"}


# ------------------------------------------------------------------ formatting
def md_escape(text: object) -> str:
    """Literal text inside Markdown (and a table cell): names come from users' models and sample
    files, and a `|` or backtick in a class or layer name would break the table around it."""
    return _SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def _bytes(n: float) -> str:
    from compressadvise.ui.render import human_bytes

    return human_bytes(n)


def _ratio(before: float | None, after: float | None, better: str, worse: str) -> str:
    from compressadvise.ui.render import ratio_text

    return ratio_text(before, after, better, worse)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GFM table; right-aligned columns are those whose header starts with a space."""
    align = ["---:" if h.startswith(" ") else ":---" for h in header]
    lines = ["| " + " | ".join(h.strip() for h in header) + " |", "| " + " | ".join(align) + " |"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


# ------------------------------------------------------------------ sections
def _headline(r: VerifyResult) -> list[str]:
    missed = r.missed()
    if not r.budgets:
        verdict = "➖ compressadvise verify: no budgets given, nothing gated"
    elif not missed:
        n = len(r.budgets)
        verdict = f"✅ compressadvise verify: {'budget' if n == 1 else f'all {n} budgets'} met"
    else:
        names = md_escape(", ".join(b.name for b in missed))
        n = len(r.budgets)
        verdict = f"❌ compressadvise verify: {'budget' if n == 1 else f'{len(missed)} of {n} budgets'} missed ({names})"
    lines = [f"### {verdict}", "",
             f"**original** {md_escape(r.original.source)} ({md_escape(r.original.format)}) → "
             f"**compressed** {md_escape(r.compressed.source)} ({md_escape(r.compressed.format)})"]
    if r.warnings:
        lines += ["", *(f"> ⚠️ {md_escape(w)}" for w in r.warnings)]
    return lines


def _budgets(r: VerifyResult) -> list[str]:
    if not r.budgets:
        return ["No budgets given (`--max-accuracy-drop`, `--max-size-mb`, `--max-latency-ms`)."]
    rows = []
    for b in r.budgets:
        unit = f" {md_escape(b.unit)}" if b.unit else ""
        limit = f"≤ {_num(b.limit)}{unit}" if b.limit is not None else "—"
        value = f"{_num(b.value)}{unit}" if b.value is not None else "not measured"
        basis = md_escape(b.basis + (f" ({b.detail})" if b.detail else ""))
        rows.append([md_escape(b.name), limit, value, "✅ pass" if b.passed else "❌ **missed**", basis])
    return ["#### Budgets", *_table(["budget", " limit", " value", "verdict", "basis"], rows)]


def _sizes(r: VerifyResult) -> list[str]:
    o, c = r.original, r.compressed
    rows = []
    if o.size_bytes is not None and c.size_bytes is not None:
        same = o.size_basis == c.size_basis  # a ratio only between like and like, as the terminal table
        basis = o.size_basis if same else f"original: {o.size_basis}; compressed: {c.size_basis}"
        change = _ratio(o.size_bytes, c.size_bytes, "smaller", "larger") if same else "formats differ"
        rows.append(["on disk", _bytes(o.size_bytes), _bytes(c.size_bytes), change, md_escape(basis)])
    if r.target_size_bytes:
        to, tc = r.target_size_bytes["original"], r.target_size_bytes["compressed"]
        rows.append(["weights on the target", _bytes(to), _bytes(tc), _ratio(to, tc, "smaller", "larger"),
                     "estimate (same format on both sides)"])
    if not rows:
        return []
    lines = ["#### Size", *_table(["", " original", " compressed", " change", "basis"], rows)]
    if o.size_bytes is not None and c.size_bytes is not None and (o.mlpackage is None) != (c.mlpackage is None):
        ml, torch_side = ("compressed", "original") if c.mlpackage else ("original", "compressed")
        lines += ["", f"Not like for like on disk: the {ml} size is a Core ML package (its uncompressed weights "
                  f"are fp16), the {torch_side} size a torch file"
                  + ("; the target row compares the same format." if r.target_size_bytes
                     else "; pass `--target` for a same-format estimate.")]
    return lines


def _accuracy(r: VerifyResult) -> list[str]:
    rows = []
    for a, basis in [*((a, "measured (labels)") for a in r.accuracy),
                     *((a, "measured (your evaluator)") for a in r.evaluator)]:
        pct = a.unit == "%"
        fmt = (lambda v: f"{v:.2f}%") if pct else _num
        change = f"{a.delta:+.2f} points" if pct else f"{a.delta:+.3g}"
        rows.append([md_escape(a.name), fmt(a.original), fmt(a.compressed), change, basis])
    if not rows:
        return ["#### Accuracy", "No accuracy measured (no labels, no `--eval`): see top-1 agreement below."]
    return ["#### Accuracy", *_table(["metric", " original", " compressed", " change", "basis"], rows)]


def _per_group(s: SliceReport) -> list[str]:
    """The groups that lost accuracy, worst first (at most MAX_ROWS); the others are counted."""
    rows = sorted(s.rows, key=lambda x: (x.change, x.compressed, x.name))
    what = "class" if s.by == "class" else "slice"
    plural = "classes" if s.by == "class" else "slices"
    shown = [x for x in rows if x.change < 0][:MAX_ROWS]
    if not shown:
        return [f"No {what} lost accuracy ({len(rows)} {plural if len(rows) != 1 else what}; "
                f"{md_escape(s.metric)}, measured)."]
    table = _table([what, " n", " original", " compressed", " change"],
                   [[md_escape(x.name), str(x.count), f"{x.original:.2f}%", f"{x.compressed:.2f}%",
                     f"{x.change:+.2f} ❌"] for x in shown])
    lines = [f"#### Per {what}: {md_escape(s.metric)}, worst first (measured)", *table]
    rest = rows[len(shown):]
    if rest:
        lower = sum(x.change < 0 for x in rest)
        lost = f"{lower} more lost accuracy" if lower else "none lost accuracy"
        lines += ["", f"{len(rest)} other {plural if len(rest) > 1 else what}: {lost} "
                  f"(changes {rest[0].change:+.2f} to {rest[-1].change:+.2f}; every row in `--json`)."]
    return lines


def _fidelity_value(key: str, v: float) -> str:
    if key in ("top1_agreement", "pixel_agreement"):
        return f"{100 * v:.2f}%"
    if key.endswith("_db"):
        return "identical" if math.isinf(v) and v > 0 else f"{_num(v)} dB"
    return _num(v)


def _fidelity(r: VerifyResult) -> list[str]:
    rows = []
    for f in r.fidelity[:MAX_ROWS]:
        parts = [f"{_FIDELITY_NAMES.get(k, md_escape(k))} {_fidelity_value(k, v)}" for k, v in f.metrics.items()]
        if f.nonfinite:
            parts.append(f"**{f.nonfinite} NaN/inf values**")
        rows.append([md_escape(f.name), md_escape(f.kind), " · ".join(parts)])
    if not rows:
        return []
    lines = ["#### Fidelity to the original (measured)", *_table(["output", "kind", "metrics"], rows)]
    if len(r.fidelity) > MAX_ROWS:
        lines += ["", f"…and {len(r.fidelity) - MAX_ROWS} more outputs in `--json`."]
    return lines


def _drift(r: VerifyResult) -> list[str]:
    d = r.drift
    if d is None or not d.layers:
        return []
    if not d.first_error:
        return [f"Drift: no layer output differs from the original (measured, {d.samples} samples)."]
    parts = [f"error starts at **{md_escape(d.first_error)}**"]
    if d.first_degraded:
        parts.append(f"first below {d.threshold_db:.0f} dB: **{md_escape(d.first_degraded)}**")
    parts += [f"worst: **{md_escape(d.worst)}**", f"at the output: {_fidelity_value('snr_db', d.layers[-1].snr_db)}"]
    return [f"Drift: {'; '.join(parts)} (layer outputs, measured, {d.samples} samples)."]


def _latency_rows(r: VerifyResult) -> list[list[str]]:
    rows = []
    if r.latency is not None:
        lat = r.latency
        for mode in ("eager", "compile"):
            a, b = lat.get("original", mode), lat.get("compressed", mode)
            if a is not None and b is not None:
                basis = f"measured here ({lat.device}, {lat.threads} threads, {a.reps} reps interleaved)"
                rows.append([f"median, {mode}", f"{_num(a.median_ms)} ms", f"{_num(b.median_ms)} ms",
                             _ratio(a.median_ms, b.median_ms, "faster", "slower"), md_escape(basis)])
    if r.estimate:
        from compressadvise.measure.estimate import pair_basis

        o, c = r.estimate["original"], r.estimate["compressed"]
        rows.append([md_escape(f"on {o.target} (iOS {o.os})"), f"{_num(o.total_ms)} ms", f"{_num(c.total_ms)} ms",
                     _ratio(o.total_ms, c.total_ms, "faster", "slower"),
                     md_escape(pair_basis(o, c))])
    if r.coreml is not None and r.coreml.timing is not None:
        rows.append([md_escape(f"Core ML, {r.coreml.compute_units}"), "", f"{_num(r.coreml.timing.median_ms)} ms",
                     "", "measured on a Mac"])
    return rows


def _latency(r: VerifyResult) -> list[str]:
    rows = _latency_rows(r)
    lines = ["#### Latency", *_table(["", " original", " compressed", " change", "basis"], rows)] if rows else []
    c = r.coreml
    if c is not None and c.parity_layers:
        lines += ["", f"Core ML package: torch ↔ Core ML weight parity on {c.parity_layers} layer(s), "
                  f"max \\|diff\\| {_num(c.parity_max_abs_diff)} (measured at apply)."]
    return lines


def _evidence(r: VerifyResult) -> str:
    """How much the figures above can be trusted: what the samples were and how many."""
    s = r.samples
    src = md_escape(s.source)
    if s.kind == "random":
        return (f"**Evidence: weak.** {s.count} random inputs ({src}): outputs compared only, no accuracy; "
                "pass `--samples` with real, labelled data.")
    if not s.has_labels:
        return (f"**Evidence:** {s.count} unlabelled samples ({src}): accuracy is a proxy "
                "(top-1 agreement with the original); add labels for the real figure.")
    step = 100.0 / s.count if s.count else float("inf")
    few = " Few samples: a drop of a point or two can be noise." if s.count < 200 else ""
    return (f"**Evidence:** {s.count} labelled samples ({src}" + (", with slices" if s.has_slices else "")
            + f"): one sample moves accuracy by {step:.2g} points.{few}")


def summary_markdown(result: VerifyResult) -> str:
    """The pull-request summary of one verify run, ending in a newline."""
    sections = [_headline(result), _budgets(result), _sizes(result), _accuracy(result),
                *(_per_group(s) for s in result.slices), _fidelity(result), _drift(result), _latency(result),
                [_evidence(result)]]
    text = "\n\n".join("\n".join(lines) for lines in sections if lines)
    return text + "\n\n<sub>compressadvise verify: every figure in `--json`</sub>\n"


# ------------------------------------------------------------------ writing it
def check_summary_path(path: str | None, json_out: bool = False) -> None:
    """Before the run: a summary that could not be written at the end is an error now (exit 3),
    not after minutes of measuring; `-` and --json would both claim stdout (exit 2)."""
    if path is None:
        return
    if path == STDOUT:
        if json_out:
            import typer

            raise typer.BadParameter("--summary-md - and --json both write to stdout: give --summary-md a file")
        return
    p = Path(path)
    if p.is_dir():
        raise OutputNotWritable(f"--summary-md {p} is a folder, not a file", hint="give a file path")
    check_writable(p)


def write_summary(result: VerifyResult, path: str) -> None:
    """Print the summary (`-`) or add it to the end of PATH: GitHub's $GITHUB_STEP_SUMMARY is
    appended to, so earlier lines of the step survive. The whole file is replaced atomically
    (a reader never sees half a summary); a missing file is created."""
    text = summary_markdown(result)
    if path == STDOUT:
        sys.stdout.write(text)
        return
    p = Path(path)
    with writing(p):
        old = p.read_text(encoding="utf-8", errors="replace") if p.is_file() else ""
    if old.strip():
        text = old.rstrip("\n") + "\n\n" + text
    write_text_atomic(p, text)
