"""Walkthrough stages 1-3: the model, the target and budgets, and how the result will be evaluated."""
from __future__ import annotations

from typing import Any

from compressadvise.errors import CompressAdviseError
from compressadvise.ui.walkthrough_notes import expert_notes
from compressadvise.ui.walkthrough_session import DEFAULT_TARGET
from compressadvise.ui.walkthrough_ui import Context, _esc

SIZE_MARGIN = 1.25  # package metadata and kept layers: a file lands above the weights estimate


def _load_and_analyze(ctx: Context) -> None:
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import load_model

    with ctx.ui.console.status("loading the model"):
        ctx.loaded = load_model(ctx.session.model, trust_pickle=ctx.session.trust_pickle)
    if ctx.loaded.has_graph and not ctx.loaded.example_inputs and ctx.session.input_shape is None \
            and "model" not in ctx.session.done:
        ctx.session.input_shape = _ask_shape(ctx)
    if ctx.session.input_shape:
        import torch

        # apply (Core ML conversion) and verify (random inputs) both read the example input.
        ctx.loaded.example_inputs = (torch.zeros(*ctx.session.input_shape),)
    with ctx.ui.console.status("analyzing the model"):
        ctx.report = analyze(ctx.loaded, input_shape=ctx.session.input_shape)


def _ask_shape(ctx: Context) -> list[int] | None:
    from compressadvise.commands.common import parse_shape

    ui = ctx.ui
    default = ",".join(map(str, ctx.defaults["input_shape"])) if ctx.defaults.get("input_shape") else "skip"
    while True:
        answer = ui.text("Input shape, e.g. 1,3,224,224 ('skip' if unknown)",
                         "the model carries no example input: conversion, MACs and random test inputs need one",
                         default)
        if answer in ("skip", ""):
            return None
        try:
            return parse_shape(answer)
        except Exception:  # typer.BadParameter: say it and ask again
            ui.say("  [red]the shape must look like 1,3,224,224[/]")
            if not ui.interactive:
                return None


# ------------------------------------------------------------------ 1. model
def stage_model(ctx: Context) -> None:
    from rich.markup import escape
    from rich.table import Table

    from compressadvise.plan.engine import recommend
    from compressadvise.ui.render import bar, human_bytes, human_count

    ui, r = ctx.ui, None
    ui.heading(1, "Model")
    if ctx.session.model is None:
        ui.say("No model given: using the bundled example, a small CNN for 8x8 handwritten digits "
               "(pass a file, e.g. `compressadvise walkthrough model.pt2`, for your own).")
    _load_and_analyze(ctx)
    r = ctx.report
    ui.say(f"[bold]{r.source}[/]: {r.family} ({'; '.join(r.family_evidence)})")
    ui.say(f"{human_count(r.total_params)} parameters, {human_bytes(r.total_bytes_fp16)} at fp16, "
           f"{len(r.layers)} weight layers")
    t = Table(show_edge=False, title="Where the parameters are")
    for col in ("type", "layers", "share", ""):
        t.add_column(col, justify="right" if col in ("layers", "share") else "left")
    for name, b in sorted(r.layer_types.items(), key=lambda kv: -kv[1].params):
        t.add_row(name, str(b.count), f"{b.share:.1%}", bar(b.share))
    ui.say(t)
    target = ctx.defaults.get("target") or DEFAULT_TARGET
    if target not in ctx.knowledge.targets:
        target = sorted(ctx.knowledge.targets)[0]
    preview = recommend(r, target=target, knowledge=ctx.knowledge)
    notes = expert_notes(r, preview, ctx.knowledge)
    ui.say("\n[bold]What an expert notices first[/]")
    for title, lines in (("Largest layers (compression there decides the size)", notes.largest),
                         ("Fragile-looking layers", notes.fragile),
                         (f"Layers that will be skipped, and why (default plan for {target})", notes.skipped)):
        ui.say(f" [bold]{title}[/]")
        for line in lines:
            ui.say(f"   • {escape(line)}")
    for f in r.findings[:5]:
        ui.say(f" [yellow]finding:[/] {escape(f)}")


# ------------------------------------------------------------------ 2. target and budgets
def _os_options(t: Any) -> list[tuple[str, str]]:
    versions = sorted({m.min_os for m in t.modes if m.min_os >= t.min_os} | {t.min_os, t.default_os})
    opts = []
    for v in versions:
        new = [m.mode for m in t.modes if m.min_os == v and m.behaviour != "unsupported"]
        opts.append((str(v), f"adds {', '.join(new)}" if new else ""))
    return opts


def stage_target(ctx: Context) -> None:
    from compressadvise.ui.render import human_bytes

    ui, s, k, r = ctx.ui, ctx.session, ctx.knowledge, ctx.report
    ui.heading(2, "Target and budgets")
    names = sorted(k.targets)
    default = ctx.defaults.get("target") or (DEFAULT_TARGET if DEFAULT_TARGET in names else names[0])
    s.target = ui.choose("Target device", "where the model will run; decides which compression modes load and run fast",
                         [(n, k.targets[n].title) for n in names], default)
    t = k.target(s.target)
    s.os = None
    if t.coreml:
        opts = _os_options(t)
        os_default = str(ctx.defaults.get("os") or t.default_os)
        if os_default not in [v for v, _ in opts]:
            opts.append((os_default, ""))
        s.os = int(ui.choose(f"Minimum {t.os_family or 'OS'} version (iOS numbering)",
                             "older OS versions cannot load newer compression modes",
                             opts, os_default))
    else:
        s.os = t.default_os or None
    from compressadvise.plan.engine import recommend

    preview = recommend(r, target=s.target, os=s.os, knowledge=k)
    reach = preview.prediction.bytes_after if preview.prediction and preview.steps else r.total_bytes_fp16
    suggested = round_up(reach * SIZE_MARGIN / 1e6)
    s.max_size_mb = ui.number("Size budget in MB (0 = none)",
                              f"download/disk size you can afford; default: what the data-free plan reaches "
                              f"({human_bytes(reach)} of {human_bytes(r.total_bytes_fp16)} at fp16, estimate) "
                              f"plus {SIZE_MARGIN - 1:.0%} for file overhead",
                              _given(ctx, "max_size_mb", suggested))
    s.max_latency_ms = ui.number("Latency budget in ms per inference (0 = none)",
                                 "checked against a roofline estimate for the target until you measure on the device",
                                 _given(ctx, "max_latency_ms", 0.0))
    s.max_accuracy_drop = ui.number("Accuracy you can lose, in points (0 = none given)",
                                    "top-1 points (or your evaluator's metric) the compressed model may lose",
                                    _given(ctx, "max_accuracy_drop", 1.0))
    s.data = ui.choose("Data you have for compression",
                       "more data unlocks stronger techniques (calibration: W8A8, sensitive k-means; training: QAT)",
                       [("none", "data-free techniques only"),
                        ("calibration", "~128 real inputs, no labels needed"),
                        ("training", "a training set and time to fine-tune")],
                       ctx.defaults.get("data") or "none")


def round_up(x: float, digits: int = 2) -> float:
    """Round up to `digits` significant digits (a budget suggestion should not sit below the estimate)."""
    import math

    if x <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale - 1e-9) / scale


def _given(ctx: Context, key: str, fallback: float) -> float:
    """A budget passed on the command line (0 included) wins over the suggested default."""
    value = ctx.defaults.get(key)
    return float(fallback if value is None else value)


# ------------------------------------------------------------------ 3. evaluation first
def stage_evaluation(ctx: Context) -> None:
    ui, s = ctx.ui, ctx.session
    ui.heading(3, "Evaluation first")
    ui.say("Decide how you will judge the compressed model before compressing it: fixed samples with "
           "labels, or your own evaluator.")
    bundled = s.model is None or s.model == "bundled"
    while True:
        _ask_samples(ctx, bundled)
        _ask_evaluator(ctx)
        s.fidelity_only = s.samples is None and s.evaluator is None
        if not s.fidelity_only:
            break
        ui.say("[yellow]warning:[/] with no samples and no evaluator, verify runs both models on random "
               "inputs: it can only compare their outputs (fidelity). Accuracy, per-class effects and "
               "calibration-based techniques cannot be judged.")
        if ui.confirm("Continue with fidelity-only checks?", "answer n to give samples or an evaluator", True):
            break
    if s.data == "calibration" and s.samples is None:
        ui.say("[yellow]note:[/] you said calibration data exists: pass it as the samples so apply can use it.")


def _ask_evaluator(ctx: Context) -> None:
    from compressadvise.measure.verify import load_evaluator

    ui, s = ctx.ui, ctx.session
    while True:
        answer = ui.text("Your evaluator, module:function returning a dict of metrics ('none' to skip)",
                         "it receives the model; its 'accuracy' key feeds the accuracy budget",
                         ctx.defaults.get("eval") or "none")
        s.evaluator = None if answer in ("none", "") else answer
        if s.evaluator is None:
            return
        try:
            load_evaluator(s.evaluator)  # importable now, not after a minute of compression
            return
        except CompressAdviseError as e:
            ui.say(f"  [red]{_esc(e.one_line())}[/]")
            if not ui.interactive:
                raise


def _ask_samples(ctx: Context, bundled: bool) -> None:
    from compressadvise.model.samples import load_samples

    ui, s = ctx.ui, ctx.session
    default = ctx.defaults.get("samples") or ("bundled" if bundled else "none")
    while True:
        answer = ui.text("Evaluation samples (a .npz/.pt/.safetensors file or folder, 'bundled', or 'none')",
                         "real inputs with labels measure accuracy; 'bundled' = the 360 held-out digits" if bundled
                         else "real inputs with labels measure accuracy; 'none' = random inputs, fidelity only",
                         default)
        if answer in ("none", ""):
            s.samples = None
            return
        try:
            smp = load_samples(answer)
        except CompressAdviseError as e:
            ui.say(f"  [red]{_esc(e.one_line())}[/]")
            if not ui.interactive:
                raise
            continue
        s.samples = answer
        ui.say(f"  {len(smp)} samples" + (" with labels" if smp.labels is not None else " without labels")
               + (" and slices" if smp.slices else ""))
        if smp.labels is None:
            ui.say("  [yellow]no labels: accuracy is judged by agreement with the original model (a proxy)[/]")
        return
