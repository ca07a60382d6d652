"""Search vs the uniform sweep on a real pretrained CNN with BatchNorm, timed in one run (issue 23).

    python benchmarks/search_vs_sweep.py --models mobilenet_v2 [--workers 2] [--measure-all] [--repeat N] [--write]

MobileNetV2 (tests/real_models: ImageNet weights, BatchNorm folded as it ships, 53 weight layers)
on 24 real photos (scikit-image's sample images, tests/real_models/photos.py). Both sides measure
the PSNR of the logits against the original float model on the same photos.

The sweep is the one issue 23 describes: 17 uniform configs (palettization 8/6/4 bits per tensor
and grouped 4/8/16; int8 and int4 per channel; int4 per block 16/32/128), each with and without
the first and last layers left uncompressed: 34 configs. Every config compresses each layer once
(its skip-first+last twin reuses the layers) and runs the whole model once per variant; layers a
grouped or per-block config cannot divide stay fp16 (the backend's behaviour).

The search (compressadvise.plan.search, default grid, ane-a17 iOS 18, 3 confirmations) then runs
for the budgets 1/2, 1/3, 1/4 and 1/5 of fp16, one after the other with one fresh cache, as a user
would; the ratio is the search's wall time for the first three budgets over the sweep's. With
--measure-all the old search (every pair measured on all samples) runs too, on its own fresh cache.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

BUDGETS = {"1/2": 1 / 2, "1/3": 1 / 3, "1/4": 1 / 4, "1/5": 1 / 5}
RATIO_BUDGETS = ("1/2", "1/3", "1/4")
HEADING = "## Search vs the uniform sweep on a real CNN, one run"


def issue_sweep() -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    for nbits in (8, 6, 4):
        out.append((f"pal{nbits} per-tensor", {"technique": "palettization", "nbits": nbits, "granularity": "per_tensor"}))
        for gs in (4, 8, 16):
            out.append((f"pal{nbits} grouped {gs}", {"technique": "palettization", "nbits": nbits,
                                                      "granularity": "per_grouped_channel", "group_size": gs}))
    for nbits in (8, 4):
        out.append((f"int{nbits} per-channel", {"technique": "linear_quantization", "nbits": nbits,
                                                "granularity": "per_channel", "mode": "linear_symmetric"}))
    for bs in (16, 32, 128):
        out.append((f"int4 per-block {bs}", {"technique": "linear_quantization", "nbits": 4, "granularity": "per_block",
                                             "block_size": bs, "mode": "linear_symmetric"}))
    return out


def sweep_pair(ctx, item: dict[str, Any]) -> dict[str, Any]:
    """One config, both variants (all layers; first and last skipped): each layer compressed once."""
    import torch

    from compressadvise.measure.sensitivity import Setting, compress_weight, output_metrics, run_model, seed_of
    from compressadvise.measure.sensitivity_eval import _worker_state

    st = _worker_state(ctx)
    params, original = st["params"], st["original"]
    s = Setting.of(item["spec"]["technique"], **{k: v for k, v in item["spec"].items() if k != "technique"})
    t0 = time.process_time()
    done = {layer: compress_weight(original[ctx.weights[layer]], s, seed_of(layer, s)) for layer in item["layers"]}
    out: dict[str, Any] = {"cpu_s": {"compress": time.process_time() - t0}}
    t0 = time.process_time()
    for variant, layers in (("all", item["layers"]), ("skip", item["skip_layers"])):
        try:
            with torch.no_grad():
                for layer in layers:
                    params[ctx.weights[layer]].copy_(done[layer])
            res = run_model(ctx.model, ctx.inputs, ctx.batch_size)
        finally:
            with torch.no_grad():
                for layer in layers:
                    params[ctx.weights[layer]].copy_(original[ctx.weights[layer]])
        out[variant] = output_metrics(ctx.reference, res, ctx.logits, ctx.labels)
    out["cpu_s"]["forward"] = time.process_time() - t0
    return out


def run_sweep(prep, k, executor) -> tuple[list[dict[str, Any]], float, dict[str, float]]:
    from compressadvise.measure.sensitivity import FP16, Setting, applicable, candidate_layers, setting_bytes

    t0 = time.perf_counter()
    layers = candidate_layers(prep.report)
    ends = {layers[0].name, layers[-1].name}
    fixed = prep.report.stored() * 2 - sum(setting_bytes(k, x, FP16, 2.0) for x in layers)
    items, configs = [], []
    for name, spec in issue_sweep():
        s = Setting.of(spec["technique"], **{kk: v for kk, v in spec.items() if kk != "technique"})
        chosen = [x for x in layers if applicable(k, x, [s], 2.0)]
        items.append({"name": name, "spec": spec, "layers": [x.name for x in chosen],
                      "skip_layers": [x.name for x in chosen if x.name not in ends]})
        for variant, keep in (("all", chosen), ("skip", [x for x in chosen if x.name not in ends])):
            size = fixed + sum(setting_bytes(k, x, s if x in keep else FP16, 2.0) for x in layers)
            configs.append({"name": name + ("" if variant == "all" else " skip first+last"), "bytes": int(size),
                            "config": name, "variant": variant})
    results: dict[str, dict] = {}
    executor.run(sweep_pair, prep.context(proxies=False), items, lambda it, res: results.__setitem__(it["name"], res))
    for c in configs:
        c["metrics"] = results[c["config"]][c["variant"]]
    cpu = {part: sum(r["cpu_s"][part] for r in results.values()) for part in ("compress", "forward")}
    return configs, time.perf_counter() - t0, cpu


def plans_floor(prep, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """CPU seconds (one thread, as a sweep worker runs) to compress the chosen plans of the ratio's
    budgets once: every distinct (layer, setting) they hold. A search that confirms what it ships
    pays at least this, before any prediction or measurement."""
    import torch

    from compressadvise.measure.sensitivity import Setting, compress_weight, seed_of

    pairs: dict[tuple[str, str], Setting] = {}
    for row in rows:
        if row["budget"] in RATIO_BUDGETS:
            for layer, d in row["settings"].items():
                s = Setting.from_dict(d)
                pairs[(layer, s.key)] = s
    params = dict(prep.model.named_parameters())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.process_time()
        for (layer, _), s in pairs.items():
            compress_weight(params[prep.weights[layer]].detach(), s, seed_of(layer, s))
        return {"pairs": len(pairs), "cpu_s": time.process_time() - t0}
    finally:
        torch.set_num_threads(threads)


def run_searches(prep, k, executor, measure_all: bool) -> list[dict[str, Any]]:
    from compressadvise.measure.sensitivity import Cache
    from compressadvise.plan.search import search

    cache = Cache(Path(tempfile.mkdtemp(prefix="ca-sweep-cnn-")))
    rows = []
    for label, frac in BUDGETS.items():
        t0 = time.perf_counter()
        res = search(prepared=prep, size_fraction=frac, target="ane-a17", knowledge=k, confirm=3, cache=cache,
                     executor=executor, measure_all=measure_all)
        rows.append({"budget": label, "wall_s": time.perf_counter() - t0, "bytes": res.chosen.estimate["bytes"],
                     "psnr_db": res.chosen.measured.get("psnr_db"), "top1": res.chosen.measured.get("top1_agreement"),
                     "single_layer": res.evaluations["single_layer"], "cached": res.evaluations["single_layer_cached"],
                     "passes": res.forward_passes, "pruning": res.pruning.model_dump() if res.pruning else None,
                     "settings": res.chosen.settings})
        print(f"  search{' (measure all)' if measure_all else ''} {label}: {rows[-1]['wall_s']:.1f} s, "
              f"PSNR {rows[-1]['psnr_db']:.2f} dB, {rows[-1]['single_layer']} single-layer run, "
              f"{rows[-1]['passes']:.1f} pass equivalents", flush=True)
    return rows


def bench(workers: int, measure_all: bool, repeat: int = 1) -> dict[str, Any]:
    from real_models.catalog import REAL_MODELS
    from real_models.photos import photos, skip_reason

    from compressadvise.knowledge.base import builtin
    from compressadvise.measure.executors import ProcessExecutor
    from compressadvise.measure.sensitivity import prepare
    from compressadvise.model.loading import LoadedModel
    from compressadvise.model.samples import Samples

    spec = REAL_MODELS["mobilenet_v2"]
    if not spec.installed() or skip_reason():
        sys.exit(f"needs MobileNetV2 and the photos: {spec.skip_reason() if not spec.installed() else skip_reason()}")
    module, example = spec.build()
    x = photos(24)

    def fresh():
        loaded = LoadedModel(source="mobilenet_v2", format="module", sha256="mobilenet_v2-photos", has_graph=True,
                             module=module.eval(), example_inputs=example)
        return prepare(loaded, Samples([x], source="24 photos (scikit-image sample images)"), max_samples=24)

    k, ex = builtin(), ProcessExecutor(workers)
    runs = []
    for i in range(max(1, repeat)):  # interleaved: sweep, search, sweep, search... each search from cold
        prep = fresh()
        fp16 = prep.report.stored() * 2
        print(f"[mobilenet_v2] run {i + 1}: {len(prep.weights)} weight layers, fp16 {fp16} B, {prep.n} photos",
              flush=True)
        sweep, sweep_wall, sweep_cpu = run_sweep(prep, k, ex)
        print(f"  sweep: {len(sweep)} configs in {sweep_wall:.1f} s", flush=True)
        search_rows = run_searches(prep, k, ex, measure_all=False)
        runs.append({"sweep_wall_s": sweep_wall, "search_s": _ratio_s(search_rows),
                     "psnr_db": [row["psnr_db"] for row in search_rows]})
        if i == 0:
            first = {"fp16": fp16, "sweep": sweep, "sweep_wall_s": sweep_wall, "sweep_cpu_s": sweep_cpu,
                     "floor": plans_floor(prep, search_rows), "search": search_rows}
    old = run_searches(fresh(), k, ex, measure_all=True) if measure_all else None
    return {**first, "runs": runs, "measure_all": old, "workers": workers}


def _ratio_s(rows: list[dict[str, Any]]) -> float:
    return sum(row["wall_s"] for row in rows if row["budget"] in RATIO_BUDGETS)


def markdown(r: dict[str, Any]) -> str:
    fp16, sweep = r["fp16"], r["sweep"]
    lines = ["| budget (of fp16) | best uniform config (size) | uniform PSNR dB | searched size | searched PSNR dB | "
             "searched - uniform dB | search s | single-layer evaluations | forward-pass equivalents |"
             + (" measure-all PSNR dB / s |" if r["measure_all"] else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if r["measure_all"] else "")]
    for i, row in enumerate(r["search"]):
        budget = BUDGETS[row["budget"]] * fp16
        fits = [c for c in sweep if c["bytes"] <= budget]
        best = max(fits, key=lambda c: c["metrics"]["psnr_db"]) if fits else None
        gap = "-" if best is None else f"{row['psnr_db'] - best['metrics']['psnr_db']:+.1f}"
        cells = [row["budget"], "none fits" if best is None else f"{best['name']} ({best['bytes'] / 1e6:.2f} MB)",
                 "-" if best is None else f"{best['metrics']['psnr_db']:.1f}", f"{row['bytes'] / 1e6:.2f} MB",
                 f"{row['psnr_db']:.1f}", gap, f"{row['wall_s']:.0f}", f"{row['single_layer']} run + {row['cached']} cached",
                 f"{row['passes']:.0f}"]
        if r["measure_all"]:
            o = r["measure_all"][i]
            cells.append(f"{o['psnr_db']:.1f} / {o['wall_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(r: dict[str, Any]) -> str:
    search_s = _ratio_s(r["search"])
    all_s = sum(row["wall_s"] for row in r["search"])
    text = (f"Sweep: {len(r['sweep'])} configs in {r['sweep_wall_s']:.0f} s. Search for {', '.join(RATIO_BUDGETS)}: "
            f"{search_s:.0f} s, ratio {search_s / r['sweep_wall_s']:.3f}; all four budgets {all_s:.0f} s, ratio "
            f"{all_s / r['sweep_wall_s']:.3f}. First budget: {r['search'][0]['passes']:.0f} forward-pass equivalents, "
            f"{r['search'][0]['wall_s']:.0f} s.")
    if len(r["runs"]) > 1:
        runs = r["runs"]
        same = all(run["psnr_db"] == runs[0]["psnr_db"] for run in runs)
        sweeps = ", ".join(f"{x['sweep_wall_s']:.0f}" for x in runs)
        searches = ", ".join(f"{x['search_s']:.0f}" for x in runs)
        ratios = ", ".join(f"{x['search_s'] / x['sweep_wall_s']:.3f}" for x in runs)
        overall = sum(x["search_s"] for x in runs) / sum(x["sweep_wall_s"] for x in runs)
        text += (f" Repeated {len(runs)} times, interleaved (sweep, search, sweep, search...; each search from a "
                 f"cold cache): sweep {sweeps} s, search {searches} s, ratios {ratios}; overall {overall:.3f}"
                 f"{'; the same plans every time' if same else '; the plans differed between runs'}.")
    f, cpu = r["floor"], r["sweep_cpu_s"]
    sweep_cpu = cpu["compress"] + cpu["forward"]
    text += (f" Floor: compressing the three chosen plans once ({f['pairs']} distinct (layer, setting) pairs, one "
             f"thread) takes {f['cpu_s']:.1f} CPU-s; the sweep's work is {sweep_cpu:.0f} CPU-s (compressing "
             f"{cpu['compress']:.0f}, forward passes {cpu['forward']:.0f}): a search that confirms what it ships "
             f"costs at least {f['cpu_s'] / sweep_cpu:.3f} of the sweep before it predicts or measures anything.")
    if r["measure_all"]:
        old = sum(row["wall_s"] for row in r["measure_all"] if row["budget"] in RATIO_BUDGETS)
        text += (f" Measuring every pair instead: {old:.0f} s for the same three budgets (ratio "
                 f"{old / r['sweep_wall_s']:.2f}), first budget {r['measure_all'][0]['passes']:.0f} pass equivalents.")
    return text
