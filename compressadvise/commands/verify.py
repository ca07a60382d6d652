"""`compressadvise verify`: compare a compressed model with the original and gate on budgets.

Exit codes: 0 every budget met, 1 a budget missed (errors.BudgetMissed), 3 input not found or
evaluator not importable, 4 model unusable or output structures differ, 6 invalid sample file,
samples that do not fit the model, or an evaluator that fails.
"""
from __future__ import annotations

import math
from enum import Enum
from typing import List, Optional

import typer

from compressadvise.commands.common import (BITS_PER_WEIGHT, DEVICE_PROFILE, JSON, MAX_ACCURACY_DROP, MAX_LATENCY_MS,
                                            MAX_SIZE_MB, OS, SAMPLES, SIZE_FRACTION, TARGET, TRUST_PICKLE,
                                            size_budget_mb, value_of)


class ComputeUnits(str, Enum):
    """Core ML compute units (latency.COMPUTE_UNITS; not imported here: it would load torch at startup)."""
    CPU_ONLY = "CPU_ONLY"
    CPU_AND_GPU = "CPU_AND_GPU"
    CPU_AND_NE = "CPU_AND_NE"
    ALL = "ALL"


def register(app: typer.Typer) -> None:
    app.command("verify")(verify_cmd)


def verify_cmd(
    original: str = typer.Argument(..., help="Original model (file, module:function, or 'bundled')."),
    compressed: str = typer.Argument(..., help="Compressed model: a model file, module:function, or an `apply` output folder."),
    samples: Optional[str] = SAMPLES,
    text: Optional[str] = typer.Option(
        None, "--text", metavar="FILE",
        help="A text file for a language model: tokenized by ORIGINAL's tokenizer.json (a Hugging Face folder) "
        "into --seq-len sequences, then next-token agreement, KL and perplexity per position bucket. "
        "Instead of --samples."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=2, help=(
        "Tokens per sequence for --text (default 128, or the model's context when shorter).")),
    evaluator: Optional[str] = typer.Option(None, "--eval", help="Your evaluator module:function: receives the model, returns a dict of metrics ('accuracy' feeds the budget)."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", help="OUTPUT=METRIC override (logits, dense, mask; or psnr, iou, kl...). Repeatable."),
    max_accuracy_drop: Optional[float] = MAX_ACCURACY_DROP,
    max_latency_ms: Optional[float] = MAX_LATENCY_MS,
    max_size_mb: Optional[float] = MAX_SIZE_MB,
    size_fraction: Optional[float] = SIZE_FRACTION,
    bits_per_weight: Optional[float] = BITS_PER_WEIGHT,
    target: Optional[str] = TARGET,
    os_version: Optional[int] = OS,
    calibration: Optional[str] = typer.Option(None, "--calibration", help="YAML of latencies measured on a device, to scale the estimate."),
    device_profile: Optional[str] = DEVICE_PROFILE,
    write_device_profile: Optional[str] = typer.Option(
        None, "--write-device-profile", metavar="FILE",
        help="macOS only: write the device profile of the timed .mlpackage (Core ML timing, and MLComputePlan's "
        "compute unit and cost per op where coremltools 8+ and macOS 14.4+ provide it), for --device-profile "
        "on any machine."),
    plan: Optional[str] = typer.Option(None, "--plan", help="Plan file: per-layer compressed sizes for the estimate."),
    compute_units: ComputeUnits = typer.Option(ComputeUnits.ALL, "--compute-units", help="Core ML compute units on a Mac."),
    compile_: bool = typer.Option(False, "--compile", help="Also time torch.compile versions."),
    reps: int = typer.Option(30, "--reps", min=1, help="Timed repetitions per model (interleaved)."),
    warmup: int = typer.Option(5, "--warmup", min=0, help="Untimed warm-up calls per model."),
    no_latency: bool = typer.Option(False, "--no-latency", help="Skip latency measurement."),
    no_drift: bool = typer.Option(False, "--no-drift", help="Skip the per-layer drift comparison."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Batch size for the accuracy pass."),
    trust_pickle: bool = TRUST_PICKLE,
    json_out: bool = JSON,
    summary_md: Optional[str] = typer.Option(
        None, "--summary-md", metavar="PATH",
        help="Also write a Markdown summary for a pull request (verdict, budgets, sizes, accuracy, worst classes, "
        "latency), even when a budget is missed; appended to PATH if it exists, as GitHub's job summary expects: "
        "--summary-md \"$GITHUB_STEP_SUMMARY\". '-' prints it instead of the tables."),
) -> None:
    """Verify a compressed model: accuracy, fidelity, slices, drift, latency and size vs budgets.

    Exits 1 when a budget is missed (a CI gate), 0 when all are met; 3 input not found, 4 model
    unusable or outputs that differ in structure (or an apply folder whose state dict needs the
    factory its manifest names: give that factory as ORIGINAL), 6 bad sample file or failing evaluator.
    A calibration YAML holds `model: original|compressed`, `total_ms` and/or `layers: {name: ms}`.
    A --device-profile (JSON) calibrates the target estimate per op type instead ("calibrated from
    DEVICE profile"), or gives the compressed latency itself when it profiled this very build
    ("measured on DEVICE"); its target is used without --target. The latency budget is Core ML's
    timing on a Mac, else the --target estimate, else measured here. --write-device-profile
    (macOS) writes the profile of the timed .mlpackage; elsewhere it exits 7.
    """
    from compressadvise.errors import BudgetMissed
    from compressadvise.measure.verify import Budgets, verify
    from compressadvise.ui.summary_md import check_summary_path, write_summary

    check_summary_path(summary_md, json_out)
    size_budget_mb(0, 0, max_size_mb=max_size_mb, size_fraction=size_fraction, bits_per_weight=bits_per_weight)
    plan_obj = None
    if plan:
        from compressadvise.plan.planfile import load_plan

        plan_obj = load_plan(plan)
    if text is not None:
        samples = _text_samples(text, samples, original, seq_len)
    from compressadvise.ui.render import err

    with err.status("verifying") as status:
        result = verify(
            original, compressed, samples=samples, evaluator=evaluator, target=target, os=os_version,
            budgets=Budgets(max_accuracy_drop=max_accuracy_drop, max_latency_ms=max_latency_ms,
                            max_size_mb=max_size_mb, size_fraction=size_fraction, bits_per_weight=bits_per_weight),
            latency=not no_latency, compile=compile_, reps=reps, warmup=warmup, metrics=metric,
            plan=plan_obj, calibration=calibration, device_profile=device_profile,
            write_device_profile=write_device_profile, compute_units=value_of(compute_units), batch_size=batch_size,
            drift=not no_drift, trust_pickle=trust_pickle, progress=lambda m: status.update(m))
    if json_out:
        import sys

        sys.stdout.write(result.to_json() + "\n")
    elif summary_md != "-":
        show_result(result)
    if summary_md:
        write_summary(result, summary_md)  # before the exit code: a missed budget is what CI must see
    if not result.passed:
        missed = "; ".join(f"{b.name} {_num(b.value)} {b.unit} > {_num(b.limit)}" if b.value is not None
                           else f"{b.name}: {b.basis}" for b in result.missed())
        raise BudgetMissed(f"budget missed: {missed}")


def _text_samples(text: str, samples: Optional[str], original: str, seq_len: Optional[int]):
    """--text: token sequences from ORIGINAL's tokenizer (a Hugging Face folder's tokenizer.json)."""
    from pathlib import Path

    from compressadvise.errors import BadArgument
    from compressadvise.model.samples import text_samples

    if samples is not None:
        raise BadArgument("--text and --samples both give the samples: pass one")
    if not Path(original).is_dir():
        raise BadArgument(f"--text needs ORIGINAL to be a Hugging Face folder with its tokenizer.json, not {original!r}")
    return text_samples(text, original, seq_len=seq_len)


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "identical" if x > 0 else "-inf"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:,.0f}"


def _ratio(before: float, after: float, better: str, worse: str) -> str:
    from compressadvise.ui.render import ratio_text

    return ratio_text(before, after, better, worse)


def _pct(x: float) -> str:
    return f"{x:.2f}%"


def show_result(r) -> None:  # noqa: ANN001 - VerifyResult
    from compressadvise.ui.render import out

    out.print(f"[bold]original[/]   {r.original.source} ({r.original.format})")
    out.print(f"[bold]compressed[/] {r.compressed.source} ({r.compressed.format})")
    out.print(f"[bold]samples[/]    {r.samples.count} from {r.samples.source}"
              + (" with labels" if r.samples.has_labels else "") + (" and slices" if r.samples.has_slices else ""))
    for w in r.warnings:
        out.print(f"[yellow]warning:[/] {w}")
    _before_after(r)
    _language_model(r.language_model)
    _slices(r)
    _drift(r)
    _estimate(r)
    _budgets(r)


def _size_rows(t, r) -> None:  # noqa: ANN001 - a rich Table, a VerifyResult
    from compressadvise.ui.render import human_bytes

    if r.original.size_bytes is not None and r.compressed.size_bytes is not None:
        # A ratio only between like and like: an fp32 file against an fp16 .mlpackage is not
        # what compression bought (the target row below compares the weights on the target).
        same = r.original.size_basis == r.compressed.size_basis
        t.add_row("size", human_bytes(r.original.size_bytes), human_bytes(r.compressed.size_bytes),
                  _ratio(r.original.size_bytes, r.compressed.size_bytes, "smaller", "larger") if same else "formats differ",
                  r.compressed.size_basis if same else
                  f"original: {r.original.size_basis}; compressed: {r.compressed.size_basis}")
    if r.target_size_bytes:
        o, c = r.target_size_bytes["original"], r.target_size_bytes["compressed"]
        t.add_row("size on target (weights)", human_bytes(o), human_bytes(c), _ratio(o, c, "smaller", "larger"),
                  "[cyan]estimate[/]")


def _before_after(r) -> None:  # noqa: ANN001
    from rich.table import Table

    from compressadvise.ui.render import out

    t = Table(title="Before / after", show_edge=False)
    for col, j in (("metric", "left"), ("original", "right"), ("compressed", "right"), ("change", "right"), ("basis", "left")):
        t.add_column(col, justify=j, overflow="fold")
    for a in r.accuracy:
        fmt = _pct if a.unit == "%" else _num
        t.add_row(a.name, fmt(a.original), fmt(a.compressed), f"{a.delta:+.3g}", "measured (labels)")
    for a in r.evaluator:
        t.add_row(a.name, _num(a.original), _num(a.compressed), f"{a.delta:+.3g}", "measured (evaluator)")
    for f in r.fidelity:
        for k, v in f.metrics.items():
            shown = _pct(100 * v) if k in ("top1_agreement", "pixel_agreement") else _num(v)
            t.add_row(f"{f.name}: {k}", "", shown, "", f"measured, {f.kind} ({f.kind_source})")
        if f.nonfinite:
            t.add_row(f"{f.name}: NaN/inf values", "0", str(f.nonfinite), "", "[red]measured[/]")
    if r.latency is not None:
        lat = r.latency
        for mode in ("eager", "compile"):
            a, b = lat.get("original", mode), lat.get("compressed", mode)
            if a is None or b is None:
                continue
            basis = f"measured here ({lat.device}, {lat.threads} threads, {a.reps} reps interleaved)"
            t.add_row(f"latency median ({mode})", f"{a.median_ms:.3f} ms", f"{b.median_ms:.3f} ms",
                      _ratio(a.median_ms, b.median_ms, "faster", "slower"), basis)
            t.add_row(f"latency p90 ({mode})", f"{a.p90_ms:.3f} ms", f"{b.p90_ms:.3f} ms", "", basis)
            if a.peak_rss_delta_mb is not None and b.peak_rss_delta_mb is not None:
                t.add_row(f"peak memory during inference ({mode})", f"+{a.peak_rss_delta_mb:.2f} MB",
                          f"+{b.peak_rss_delta_mb:.2f} MB", "", "measured (RSS growth)")
    _size_rows(t, r)
    if r.estimate:
        o, c = r.estimate["original"], r.estimate["compressed"]
        t.add_row(f"latency on {o.target} (iOS {o.os})", f"{o.total_ms:.4f} ms", f"{c.total_ms:.4f} ms",
                  _ratio(o.total_ms, c.total_ms, "faster", "slower"), _latency_basis(o, c))
    if r.coreml is not None:
        if r.coreml.timing is not None:
            tm = r.coreml.timing
            t.add_row(f"Core ML latency ({r.coreml.compute_units})", "", f"{tm.median_ms:.3f} ms", "",
                      "measured on this Mac")
    out.print(t)
    if r.coreml is not None and r.coreml.timing is None and r.coreml.note:
        out.print(f"[dim]{r.coreml.note}[/]")
    if r.coreml is not None:
        _show_build(r.coreml)
    if r.latency is not None:
        for n in r.latency.notes:
            out.print(f"[dim]{n}[/]")


def _latency_basis(o, c) -> str:  # noqa: ANN001 - two ModelEstimates
    """The estimate's label, in the estimate colour unless part of it was measured on the device."""
    from compressadvise.measure.estimate import pair_basis

    text = pair_basis(o, c)
    return text if "measured" in text else f"[cyan]{text}[/]"


def _language_model(lm) -> None:  # noqa: ANN001 - a LanguageModelReport or None
    """Next-token agreement, KL and perplexity, overall and per bucket of positions."""
    if lm is None:
        return
    from rich.table import Table

    from compressadvise.ui.render import out

    t = Table(title=f"Language model ({lm.sequences} sequences x {lm.length} tokens, output {lm.output}; measured)",
              show_edge=False)
    for col in ("positions", "tokens", "next-token agreement", "KL (nats)", "perplexity", "change"):
        t.add_column(col, justify="left" if col == "positions" else "right")
    rows = [("all", lm.sequences * lm.length, lm)] + [(f"{b.start}-{b.stop - 1}", b.tokens, b) for b in lm.buckets]
    for label, tokens, x in rows:
        ppl = (f"{x.perplexity_original:.4g} -> {x.perplexity_compressed:.4g}"
               if x.perplexity_original is not None else "n/a")
        change = (f"{x.perplexity_compressed / x.perplexity_original - 1:+.2%}"
                  if x.perplexity_original else "")
        t.add_row(label, str(tokens), _pct(x.next_token_agreement * 100), f"{x.kl_divergence:.4g}", ppl, change)
    out.print(t)
    for n in lm.notes:
        out.print(f"[dim]note: {n}[/]")


def _slices(r) -> None:  # noqa: ANN001
    from rich.table import Table

    from compressadvise.ui.render import out

    for s in r.slices:
        t = Table(title=f"Per {s.by}: {s.metric}", show_edge=False)
        for col in (s.by, "n", "original", "compressed", "change"):
            t.add_column(col, justify="left" if col == s.by else "right")
        for row in s.rows[:10]:
            style = "red" if row.change < 0 else ""
            t.add_row(row.name, str(row.count), _pct(row.original), _pct(row.compressed),
                      f"[{style}]{row.change:+.2f}[/]" if style else f"{row.change:+.2f}")
        out.print(t)
        if len(s.rows) > 10:
            out.print(f"[dim]{len(s.rows) - 10} more {s.by}(es) in --json[/]")
        if s.worst is not None:
            out.print(f"worst {s.by}: [bold]{s.worst}[/] ({s.worst_change:+.2f} points)")
        else:
            out.print(f"no {s.by} lost accuracy")


def _drift(r) -> None:  # noqa: ANN001
    from rich.table import Table

    from compressadvise.measure.verify_drift import NOISE_FLOOR_DB
    from compressadvise.ui.render import bar, out

    d = r.drift
    if d is None:
        return
    if not d.layers:
        if d.note:
            out.print(f"[dim]drift: {d.note}[/]")
        return
    t = Table(title=f"Per-layer drift (outputs vs the original, {d.samples} samples, execution order)", show_edge=False)
    for col in ("layer", "module", "SNR dB", "cosine", "rel. error", ""):
        t.add_column(col, justify="left" if col in ("layer", "module", "") else "right")
    worst_rows = sorted(d.layers, key=lambda x: x.snr_db)[:8]
    keep = {x.name for x in worst_rows} | {d.first_error, d.first_degraded, d.layers[-1].name}
    top = max((x.rel_error for x in d.layers), default=1.0) or 1.0
    for x in d.layers:
        if x.name in keep:
            t.add_row(x.name, x.module, _num(x.snr_db), f"{x.cosine:.4f}", f"{x.rel_error:.3g}", bar(x.rel_error / top, 10))
    out.print(t)
    if d.first_error:
        out.print(f"error starts at [bold]{d.first_error}[/]"
                  + (f"; first below {d.threshold_db:.0f} dB: [bold]{d.first_degraded}[/]" if d.first_degraded else "")
                  + f"; worst: [bold]{d.worst}[/]; at the output: {_num(d.layers[-1].snr_db)} dB")
    else:
        out.print(f"no layer output differs from the original beyond float rounding (all above {NOISE_FLOOR_DB:.0f} dB)")


def _estimate(r) -> None:  # noqa: ANN001
    from rich.table import Table

    from compressadvise.ui.render import bar, human_bytes, human_count, out

    if not r.estimate:
        return
    o, c = r.estimate["original"], r.estimate["compressed"]
    by = {x.name: x for x in o.layers}
    total = c.total_ms or 1.0
    how = "roofline" if c.basis == "estimate" else f"roofline {o.basis}"
    t = Table(title=f"Estimate per layer on {c.target} (iOS {c.os}), {how}, sorted by compressed time",
              show_edge=False)
    for col in ("layer", "type", "setting", "MACs", "weights moved", "bound", "orig ms", "comp ms", "share", ""):
        t.add_column(col, justify="right" if col in ("MACs", "weights moved", "orig ms", "comp ms", "share") else "left",
                     overflow="fold")
    for x in sorted(c.layers, key=lambda x: -x.ms)[:15]:
        before = by.get(x.name)
        t.add_row(x.name, x.type, x.setting, human_count(x.macs), human_bytes(x.weight_bytes_moved), x.bound,
                  f"{before.ms:.5f}" if before else "-", f"{x.ms:.5f}", f"{x.ms / total:.0%}", bar(x.ms / total, 10))
    out.print(t)
    out.print(f"[dim]estimate: {c.decompression}; figures {', '.join(f'{k}={v:g}' for k, v in c.figures.items())}[/]")
    for n in dict.fromkeys([*o.notes, *c.notes]):
        out.print(f"[dim]estimate note: {n}[/]")


def _budgets(r) -> None:  # noqa: ANN001
    from rich.table import Table

    from compressadvise.ui.render import out

    if not r.budgets:
        out.print("[dim]no budgets given: nothing to gate (--max-accuracy-drop, --max-latency-ms, --max-size-mb)[/]")
        return
    t = Table(title="Budgets", show_edge=False)
    for col in ("budget", "value", "limit", "verdict", "basis"):
        t.add_column(col, overflow="fold")
    for b in r.budgets:
        verdict = "[green]PASS[/]" if b.passed else "[red]MISS[/]"
        t.add_row(b.name, f"{_num(b.value)} {b.unit}", f"{_num(b.limit)} {b.unit}" if b.limit is not None else "-",
                  verdict, b.basis + (f" ({b.detail})" if b.detail else ""))
    out.print(t)
    out.print("[green]all budgets met[/]" if r.passed else "[red]budget missed[/]")


def _show_build(c) -> None:
    """What apply proved about the .mlpackage (its manifest): planned vs built, and parity."""
    from compressadvise.ui.render import out

    if c.planned_vs_built:
        out.print(f"planned vs built (at apply): {c.planned_vs_built}")
    if c.parity_layers:
        out.print(f"torch <-> Core ML parity (at apply): {c.parity_layers} layer(s), max |diff| "
                  f"{c.parity_max_abs_diff:.3g}: the fidelity above is the .mlpackage's weights")
    elif c.planned_vs_built:
        out.print("[yellow]torch <-> Core ML parity: not measured (no torch side compressed these layers): "
                  "the fidelity above is not evidence for the .mlpackage[/]")

