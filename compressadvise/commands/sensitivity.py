"""`compressadvise sensitivity` and `compressadvise search`: measured per-layer sensitivity, and a
budget-driven per-layer plan chosen from it."""
from __future__ import annotations

import math
from enum import Enum
from typing import List, Optional

import typer

from compressadvise.commands.common import (BITS_PER_WEIGHT, DATA, DEFAULT_TARGET, DEVICE_PROFILE, FORCE, JSON,
                                            MAX_ACCURACY_DROP, MAX_LATENCY_MS, MAX_SIZE_MB, MODEL_ARG, OS, SAMPLES,
                                            SIZE_FRACTION, TARGET, TRUST_PICKLE, Data, ExecutorKind, profile_target,
                                            replay_hint, size_budget_mb, value_of)
from compressadvise.commands.knowledge import PLAYBOOKS_OPT
from compressadvise.ui.cli_help import complete_technique

TECHNIQUES_OPT = typer.Option(None, "--techniques", autocompletion=complete_technique, help="Candidate settings: a technique (its default grid) or a "
                              "grid such as 'palettization:nbits=4|3,granularity=per_grouped_channel,group_size=8|16'. "
                              "Repeatable. Default: palettization 8/6/4/3/2 bits per tensor and grouped (4/8/16), "
                              "int8/int4 per channel (sym/asym), int4 per block (16/32/128).")
WORKERS_OPT = typer.Option(None, "--workers", min=1, help="Parallel evaluations (default: the CPU count; 1 = in this process).")
EXECUTOR_OPT = typer.Option(ExecutorKind.process, "--executor",
                            help="process: a local pool; ray: needs the 'distributed' extra; serial: one at a time.")
ADDRESS_OPT = typer.Option(None, "--address", help="Ray cluster address (HOST:PORT or 'auto'); default: a local Ray instance.")
CACHE_OPT = typer.Option(None, "--cache", help="Sensitivity cache folder (default ~/.cache/compressadvise/sensitivity, "
                         "or $COMPRESSADVISE_SENSITIVITY_CACHE).")
NO_CACHE_OPT = typer.Option(False, "--no-cache", help="Neither read nor write the cache.")
MAX_SAMPLES_OPT = typer.Option(512, "--max-samples", min=1, help="Samples used per evaluation (the first N).")


class Lessons(str, Enum):
    """How search uses the playbooks' layer rules."""
    apply = "apply"
    advise = "advise"


def register(app: typer.Typer) -> None:
    app.command("sensitivity")(sensitivity_cmd)
    app.command("search")(search_cmd)


def _executor(kind: ExecutorKind, workers: Optional[int], address: Optional[str]):
    from compressadvise.measure.executors import make_executor

    if address and kind is not ExecutorKind.ray:
        raise typer.BadParameter("--address is for --executor ray")
    return make_executor(value_of(kind), workers=workers, address=address)


def _cache(path: Optional[str], off: bool):
    from compressadvise.measure.sensitivity import Cache

    return Cache(path, enabled=not off)


def _progress():
    """A Rich bar with ETA on stderr (stdout stays clean for --json); phase names update it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from compressadvise.ui.render import err

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), console=err, transient=True)
    tasks: dict[str, int] = {}

    def update(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = prog.add_task(phase, total=total or None)
        prog.update(tasks[phase], completed=done, total=total or None)

    return prog, update


def sensitivity_cmd(
    model: Optional[str] = MODEL_ARG,
    samples: Optional[str] = SAMPLES,
    techniques: Optional[List[str]] = TECHNIQUES_OPT,
    target: Optional[str] = TARGET,
    os: Optional[int] = OS,
    layers: Optional[List[str]] = typer.Option(None, "--layer", help="Glob of layer names to measure (repeatable); default all compressible layers."),
    workers: Optional[int] = WORKERS_OPT,
    executor: ExecutorKind = EXECUTOR_OPT,
    address: Optional[str] = ADDRESS_OPT,
    cache: Optional[str] = CACHE_OPT,
    no_cache: bool = NO_CACHE_OPT,
    max_samples: int = MAX_SAMPLES_OPT,
    top: int = typer.Option(20, "--top", help="Layers shown (0 = all)."),
    trust_pickle: bool = TRUST_PICKLE,
    json_out: bool = JSON,
) -> None:
    """Measure each layer's sensitivity: compress it alone per setting, compare outputs with the original.

    With --target (and --os), settings that target cannot run are left out."""
    from compressadvise.knowledge.base import builtin
    from compressadvise.measure.sensitivity import parse_settings, prepare, sensitivity

    k = builtin()
    if target:
        k.target(target)
    grid = parse_settings(techniques, k) if techniques else None
    ex = _executor(executor, workers, address)
    prep = prepare(model, samples, max_samples=max_samples, trust_pickle=trust_pickle)
    prog, update = _progress()
    with prog:
        rep = sensitivity(prepared=prep, settings=grid, knowledge=k, target=target, os=os, layers=layers,
                          cache=_cache(cache, no_cache), executor=ex,
                          progress=lambda d, t: update("measuring", d, t))
    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json(rep.model_dump(mode="json"))
        return
    show_sensitivity(rep, top=top)


def _db(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return "inf" if math.isinf(x) else f"{x:.1f}"


def _rho(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2f}"


def show_sensitivity(rep, *, top: int = 20) -> None:  # noqa: ANN001 - SensitivityReport
    from rich.table import Table

    from compressadvise.ui.render import bar, human_count, out

    out.print(f"[bold]Sensitivity[/] of {rep.source}: {len(rep.layers)} layer(s) x {len(rep.settings)} setting(s), "
              f"{rep.samples_used} samples from {rep.samples} [dim](all figures measured)[/]")
    for n in rep.notes:
        out.print(f"[yellow]note:[/] {n}")
    if rep.reference:
        out.print("original: " + ", ".join(f"{k} {v:.2f}" for k, v in rep.reference.items()))
    table = rep.table()
    shown = rep.ranking if top == 0 else rep.ranking[:top]
    columns = _columns(rep)
    t = Table(title="Layers by sensitivity (output PSNR in dB when this layer alone is compressed)", show_edge=False)
    for col in ("#", "layer", "type", "params", "vs median", ""):
        t.add_column(col, justify="right" if col in ("#", "params", "vs median") else "left")
    for key, label in columns:
        t.add_column(label, justify="right")
    biggest = max((math.log10(max(r.vs_median, 1e-6)) for r in rep.ranking), default=1.0) or 1.0
    for r in shown:
        row = table.get(r.layer, {})
        t.add_row(str(r.rank), r.layer, r.type, human_count(r.params), f"{r.vs_median:.2g}x",
                  bar(max(0.0, math.log10(max(r.vs_median, 1e-6))) / biggest if biggest > 0 else 0.0, 8),
                  *(_db(row[key].metrics.get("psnr_db")) if key in row else "n/a" for key, _ in columns))
    out.print(t)
    if len(rep.ranking) > len(shown):
        out.print(f"[dim]{len(rep.ranking) - len(shown)} more layer(s): --top 0 shows all, --json has every setting[/]")
    p = Table(title="Cheap proxies vs the measured ranking (Spearman rank correlation)", show_edge=False)
    for col in ("proxy", "layer ranking", "per setting", "all pairs", "finds the most sensitive"):
        p.add_column(col, justify="left" if col == "proxy" else "right")
    for q in rep.proxies:
        p.add_row(q.proxy, _rho(q.layer_rank_spearman), _rho(q.per_setting_spearman), _rho(q.pairs_spearman),
                  "-" if q.top1_match is None else ("yes" if q.top1_match else "no"))
    out.print(p)
    cached = f"{rep.cache_hits} from the cache {rep.cache_dir}" if rep.cache_dir else "cache off"
    out.print(f"[dim]{rep.evaluations} evaluation(s) run ({rep.executor}, {rep.workers} worker(s)), "
              f"{cached}; {rep.forward_passes:g} forward-pass equivalent(s) "
              f"({rep.suffix_evaluations} suffix-only); {rep.wall_s:.1f} s[/]")


def _columns(rep) -> list[tuple[str, str]]:  # noqa: ANN001
    """Up to 8 settings measured on the most layers, fewest bits last."""
    from collections import Counter

    count = Counter(m.setting for m in rep.measurements)
    labels = {m.setting: m.label for m in rep.measurements}
    bits = {m.setting: m.params.get("nbits", 16) for m in rep.measurements}
    keys = sorted(count, key=lambda s: (-count[s], -bits[s], s))[:8]
    keys.sort(key=lambda s: (-bits[s], labels[s]))
    return [(s, _short(labels[s])) for s in keys]


def _short(label: str) -> str:
    return (label.replace("palettization", "pal").replace("linear_quantization", "int")
            .replace("per_grouped_channel", "g").replace("per_tensor", "").replace("per_channel", "ch")
            .replace("per_block", "blk").replace("  ", " ").strip())


# ------------------------------------------------------------------ search
# Over 60 lines only because its signature declares the command's options (Typer reads them there).
def search_cmd(
    model: Optional[str] = MODEL_ARG,
    samples: Optional[str] = SAMPLES,
    target: Optional[str] = TARGET,
    os: Optional[int] = OS,
    max_size_mb: Optional[float] = MAX_SIZE_MB,
    bits_per_weight: Optional[float] = BITS_PER_WEIGHT,
    size_fraction: Optional[float] = SIZE_FRACTION,
    max_latency_ms: Optional[float] = MAX_LATENCY_MS,
    max_accuracy_drop: Optional[float] = MAX_ACCURACY_DROP,
    data: Optional[Data] = DATA,
    device_profile: Optional[str] = DEVICE_PROFILE,
    techniques: Optional[List[str]] = TECHNIQUES_OPT,
    lessons: Lessons = typer.Option(Lessons.apply, "--lessons", help="apply: playbook layer rules restrict the "
                                    "candidates; advise: measure everything and report where a rule disagrees."),
    confirm: int = typer.Option(3, "--confirm", min=1, help="Candidate plans applied and measured before choosing."),
    measure_all: bool = typer.Option(False, "--measure-all", help="Measure every candidate setting of every layer on "
                                     "all samples (slower). By default only what the budget can choose is measured: "
                                     "settings are predicted first, dominated ones skipped."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write the chosen plan file (YAML) here."),
    force: bool = FORCE,
    workers: Optional[int] = WORKERS_OPT,
    executor: ExecutorKind = EXECUTOR_OPT,
    address: Optional[str] = ADDRESS_OPT,
    cache: Optional[str] = CACHE_OPT,
    no_cache: bool = NO_CACHE_OPT,
    max_samples: int = MAX_SAMPLES_OPT,
    playbooks: Optional[List[str]] = PLAYBOOKS_OPT,
    trust_pickle: bool = TRUST_PICKLE,
    json_out: bool = JSON,
) -> None:
    """Choose a setting per layer that meets a size or latency budget with the least measured damage.

    With --max-accuracy-drop and labelled samples, a confirmed candidate that loses more top-1
    accuracy does not fit; when none fits, the best is still written and the exit code is 1.
    With --device-profile the latency costs are calibrated per op type by measurements on a device."""
    # Each budget was checked while parsing (common.check_budget), before anything is loaded or measured.
    target = target or profile_target(device_profile) or DEFAULT_TARGET
    size_budget_mb(0, 0, max_size_mb=max_size_mb, size_fraction=size_fraction, bits_per_weight=bits_per_weight)
    from compressadvise.fsutil import check_output
    from compressadvise.knowledge.base import builtin, load_knowledge
    from compressadvise.plan.search import search
    from compressadvise.measure.sensitivity import parse_settings, prepare

    if not any((max_size_mb, bits_per_weight, size_fraction, max_latency_ms)):
        raise typer.BadParameter("give a budget: --max-size-mb, --bits-per-weight, --size-fraction or --max-latency-ms")
    if out:  # before the measuring, which takes minutes
        check_output(out, force=force, inputs={"model": model, "samples": samples})
    k = load_knowledge(playbooks) if playbooks else builtin()
    k.target(target)
    grid = parse_settings(techniques, k) if techniques else None
    ex = _executor(executor, workers, address)
    prep = prepare(model, samples, max_samples=max_samples, trust_pickle=trust_pickle)
    prog, update = _progress()
    with prog:
        res = search(prepared=prep, max_size_mb=max_size_mb, bits_per_weight=bits_per_weight,
                     size_fraction=size_fraction, max_latency_ms=max_latency_ms,
                     max_accuracy_drop=max_accuracy_drop, data=value_of(data), target=target, os=os,
                     knowledge=k, settings=grid, lessons=value_of(lessons), confirm=confirm,
                     cache=_cache(cache, no_cache), executor=ex, progress=update, measure_all=measure_all,
                     device_profile=device_profile)
    if out:
        from compressadvise.plan.planfile import save_plan

        save_plan(res.plan, out)
    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json(res.model_dump(mode="json"))
    else:
        show_search(res)
    if out and not json_out:
        from compressadvise.ui.render import out as console

        console.print(replay_hint(out, model, trust_pickle=trust_pickle), markup=False, soft_wrap=True)
    if not res.chosen.fits:
        from compressadvise.errors import BudgetMissed

        raise BudgetMissed("no confirmed candidate meets every budget (see the candidates' 'fits'); "
                           + ("the best is written to " + out if out else "the best is shown above"))


def _pruning_line(pr) -> str:  # noqa: ANN001 - Pruning
    """What the search measured and skipped, in one dim line."""
    rho = "-" if pr.proxy_spearman is None else f"{pr.proxy_spearman:.2f}"
    return (f"[dim]measured {pr.measured} of {pr.candidates} (layer, setting) pairs: {pr.dominated} dominated "
            f"by a setting no larger and predicted less damaging, {pr.not_needed} left to their calibrated "
            f"prediction (never chosen, or chosen with a negligible share of the noise); first on "
            f"{pr.first_samples} of {pr.all_samples} samples, {pr.remeasured} measured again on all; "
            f"{pr.rounds} round(s); predicted vs measured rank correlation {rho}"
            + ("" if pr.trusted else " (too low to rank by: every kept pair measured)")
            + (f"; widened where they disagreed: {', '.join(pr.widened)}" if pr.widened else "") + "[/]")


def _show_prediction(p, target: str) -> None:  # noqa: ANN001 - a plan's Prediction
    """The chosen plan's size against the budget, and its latency when the plan records one."""
    from compressadvise.ui.render import human_bytes, human_ms, out

    verdict = "" if p.meets_size_budget is None else (" [green]meets the size budget[/]" if p.meets_size_budget
                                                      else " [red]misses the size budget[/]")
    out.print(f"size: {human_bytes(p.bytes_before)} -> {human_bytes(p.bytes_after)} ({p.ratio:.2f}x) "
              f"[dim](estimate)[/]{verdict}")
    if p.latency_basis and p.latency_ms_before is not None and p.latency_ms_after is not None:
        out.print(f"latency on {target}: {human_ms(p.latency_ms_before)} -> {human_ms(p.latency_ms_after)} "
                  f"[dim]({p.latency_basis})[/]")


def show_search(res) -> None:  # noqa: ANN001 - SearchResult
    from rich.table import Table

    from compressadvise.ui.render import human_bytes, human_ms, out
    from compressadvise.plan.search import _pct

    p = res.plan.prediction
    out.print(f"[bold]Search[/] for {res.plan.model.source} on [bold]{res.plan.target.name}[/] "
              f"(OS {res.plan.target.os}), budget {res.budget.basis}; playbook lessons: {res.lessons}")
    for n in res.notes:
        out.print(f"[yellow]note:[/] {n}")
    t = Table(title="Per-layer choice (sizes are estimates; sensitivity measured)", show_edge=False)
    for col in ("layer", "setting", "size", "sensitivity vs median", "share of predicted noise"):
        t.add_column(col, justify="left" if col in ("layer", "setting") else "right", overflow="fold")
    for c in res.layers:
        t.add_row(c.layer, c.setting, human_bytes(c.bytes), "-" if c.vs_median is None else f"{c.vs_median:.2g}x",
                  _pct(c.noise_share))
    out.print(t)
    out.print("[bold]Why[/]")
    for c in res.layers:
        out.print(f" • [bold]{c.layer}[/] {c.why}")
    ct = Table(title="Candidates confirmed (applied in memory, run on the samples)", show_edge=False)
    for col in ("candidate", "size (estimate)", "PSNR (estimate)", "PSNR (measured)", "top-1 agree (measured)",
                "accuracy (measured)", "fits"):
        ct.add_column(col, justify="left" if col == "candidate" else "right")
    for c in res.candidates:
        mark = " [bold]<- chosen[/]" if c.name == res.chosen.name else ""
        m = c.measured
        ct.add_row(c.name + mark, human_bytes(c.estimate["bytes"] or 0), _db(c.estimate["psnr_db"]),
                   _db(m.get("psnr_db")), f"{100 * m['top1_agreement']:.1f}%" if "top1_agreement" in m else "-",
                   f"{m['accuracy']:.2f}%" if "accuracy" in m else "-", "yes" if c.fits else "[red]no[/]")
    out.print(ct)
    ft = Table(title="Pareto frontier: size vs predicted fidelity (estimates)", show_edge=False)
    for col in ("size", "latency", "PSNR (estimate)", "PSNR (measured)", "compressed layers"):
        ft.add_column(col, justify="right")
    for f in res.frontier_size:
        ft.add_row(human_bytes(f.bytes), "-" if f.latency_ms is None else human_ms(f.latency_ms),
                   _db(f.predicted_psnr_db), _db(f.measured_psnr_db), str(f.compressed_layers))
    out.print(ft)
    if res.frontier_latency:
        how = "roofline estimates" if res.latency_basis in (None, "estimate (roofline)") else res.latency_basis
        lt = Table(title=f"Pareto frontier: latency on the target vs predicted fidelity ({how})", show_edge=False)
        for col in ("latency", "size", "PSNR (estimate)"):
            lt.add_column(col, justify="right")
        for f in res.frontier_latency:
            lt.add_row(human_ms(f.latency_ms), human_bytes(f.bytes), _db(f.predicted_psnr_db))
        out.print(lt)
    if p:
        _show_prediction(p, res.plan.target.name)
    ref = ", ".join(f"{k} {v:.2f}" for k, v in res.reference.items())
    e = res.evaluations
    out.print(f"[dim]{e['single_layer']} single-layer evaluation(s) run, {e['single_layer_cached']} from the cache; "
              f"{e['full_model']} full-model candidate(s) measured; {res.forward_passes:g} forward-pass "
              f"equivalent(s); {res.wall_s:.1f} s"
              + (f"; original {ref}" if ref else "") + "[/]")
    if res.pruning is not None:
        out.print(_pruning_line(res.pruning))
