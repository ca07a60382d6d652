"""Budget search vs the uniform sweep practitioners run by hand (issue 7's quality bar).

    python benchmarks/search_vs_sweep.py [--models digits,transformer] [--workers 2] [--lessons apply,advise]
                                         [--out results.json]
    python benchmarks/search_vs_sweep.py --models mobilenet_v2 [--measure-all] [--repeat N] [--write]

`--models mobilenet_v2` is the real pretrained CNN with BatchNorm, on real photos, with the sweep
and the search timed in one run (search_vs_sweep_cnn.py; issue 23's benchmark).

Two trained models of different families ship with the package: the digits CNN and a 2-block
transformer trained on generated token sequences. Selection (the sweep's best config per budget,
the search's sensitivities and confirmations) uses samples from the training distribution (the
digits training split; freshly generated sequences); every "held-out" figure is measured on the
bundled held-out sets (360 digits, 1000 sequences) that neither training nor selection saw.

Baseline, ~60 configs, each with and without the first and last weight layers skipped, every
layer compressed whatever its size (weight_threshold 0, the strongest uniform option):
- per-channel int8/int4: symmetric (full range [-2^(b-1), 2^(b-1)-1], torchao's
  quant_primitives), symmetric with the extreme code clipped (coremltools linear_symmetric,
  [-7, 7] at int4), asymmetric (coremltools linear, with zero-point);
- int4 per block of 16/32/128 inputs, symmetric-clipped and asymmetric (coremltools);
- palettization 8/6/4/3/2 bits, one LUT per tensor and grouped (4/8/16 channels) (coremltools).
Layers whose dims a per-block/grouped config cannot divide stay fp16 (the backend's behaviour).

For budgets of 1/3, 1/4 and 1/5 of the fp16 size, the best baseline that fits (by selection-set
PSNR) is compared with the searched plan (compressadvise.plan.search, default candidate grid,
target ane-a17 iOS 18). Sizes are the technique formulas (estimates, as in every plan);
fidelity and accuracy are measured. Evaluations: the sweep scores every config on the full
model once; the search scores single layers (once per model, cached across budgets) plus a few
full-model candidates per budget.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BUDGETS = {"1/3": 1 / 3, "1/4": 1 / 4, "1/5": 1 / 5}


# ------------------------------------------------------------------ models and samples
def load(name: str):
    """(LoadedModel, Samples) for one bundled model."""
    import torch

    from compressadvise.model.loading import load_model
    from compressadvise.model.samples import Samples, bundled_samples

    if name == "digits":
        return load_model(None), bundled_samples()
    from compressadvise.examples import tiny_transformer as tt

    x, y = tt.samples()
    return (load_model("compressadvise.examples.tiny_transformer:trained_model"),
            Samples([torch.from_numpy(x)], torch.from_numpy(y), source="tiny transformer held-out set"))


def calibration(name: str, n: int = 1024):
    """Selection samples from the training distribution, as a practitioner would calibrate:
    the digits training split (scikit-learn ships the data; same split as train_digits.py),
    or freshly generated sequences (a seed neither training nor the eval set used)."""
    import torch

    from compressadvise.model.samples import Samples

    if name == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        x_tr, _, y_tr, _ = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
        xt = torch.tensor(x_tr[:n], dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        return Samples([xt], torch.tensor(y_tr[:n]), source="digits training split")
    from compressadvise.examples import tiny_transformer as tt

    x, y = tt.generate(n, seed=2)
    return Samples([torch.from_numpy(x)], torch.from_numpy(y), source="generated sequences (seed 2)")


# ------------------------------------------------------------------ the sweep
def sweep_configs() -> list[dict[str, Any]]:
    """~60 uniform configs: (name, per-layer setting description, skip first+last)."""
    base: list[tuple[str, dict[str, Any]]] = []
    for nbits in (8, 4):
        base.append((f"int{nbits} per-channel symmetric", {"kind": "torchao_sym", "nbits": nbits}))
        base.append((f"int{nbits} per-channel symmetric-clipped", {"technique": "linear_quantization", "nbits": nbits,
                                                                 "granularity": "per_channel", "mode": "linear_symmetric"}))
        base.append((f"int{nbits} per-channel asymmetric", {"technique": "linear_quantization", "nbits": nbits,
                                                           "granularity": "per_channel", "mode": "linear"}))
    for bs in (16, 32, 128):
        for mode, label in (("linear_symmetric", "symmetric-clipped"), ("linear", "asymmetric")):
            base.append((f"int4 per-block {bs} {label}", {"technique": "linear_quantization", "nbits": 4,
                                                          "granularity": "per_block", "block_size": bs, "mode": mode}))
    for nbits in (8, 6, 4, 3, 2):
        base.append((f"pal{nbits} per-tensor", {"technique": "palettization", "nbits": nbits, "granularity": "per_tensor"}))
        for gs in (4, 8, 16):
            base.append((f"pal{nbits} grouped {gs}", {"technique": "palettization", "nbits": nbits,
                                                       "granularity": "per_grouped_channel", "group_size": gs}))
    out = []
    for name, spec in base:
        out.append({"name": name, "spec": spec, "skip_ends": False})
        out.append({"name": name + " skip first+last", "spec": spec, "skip_ends": True})
    return out


def _setting(spec: dict[str, Any]):
    from compressadvise.measure.sensitivity import Setting

    if spec.get("kind") == "torchao_sym":  # sized like linear_symmetric (no zero-point)
        return Setting.of("linear_quantization", nbits=spec["nbits"], granularity="per_channel", mode="linear_symmetric")
    return Setting.of(spec["technique"], **{k: v for k, v in spec.items() if k != "technique"})


def torchao_symmetric(w, nbits: int):
    """Per-output-channel symmetric quantization over the full integer range (torchao primitives)."""
    import torch
    from torchao.quantization.quant_primitives import (MappingType, choose_qparams_affine, dequantize_affine,
                                                       quantize_affine)

    flat = w.reshape(w.shape[0], -1).float()
    block = (1, flat.shape[1])
    qmin, qmax = -(2 ** (nbits - 1)), 2 ** (nbits - 1) - 1
    scale, zp = choose_qparams_affine(flat, MappingType.SYMMETRIC, block, torch.int8, qmin, qmax,
                                      eps=1e-12, zero_point_dtype=torch.int8)
    q = quantize_affine(flat, block, scale, zp, torch.int8, qmin, qmax)
    return dequantize_affine(q, block, scale, zp, torch.int8, qmin, qmax, output_dtype=torch.float32).reshape(w.shape)


_MEMO: dict[tuple, Any] = {}


def sweep_eval(ctx, item: dict[str, Any]) -> dict[str, Any]:
    """One uniform config on the full model (runs in the pool workers); compressed layers are
    memoised per worker, so a config and its skip-first+last twin share the k-means work."""
    import torch

    from compressadvise.measure.sensitivity import compress_weight, output_metrics, run_model, seed_of
    from compressadvise.measure.sensitivity_eval import _worker_state

    st = _worker_state(ctx)
    params, original = st["params"], st["original"]
    per_layer = item["per_layer"]
    try:
        for layer, spec in per_layer.items():
            name = ctx.weights[layer]
            key = (layer, json.dumps(spec, sort_keys=True))
            if key not in _MEMO:
                if spec.get("kind") == "torchao_sym":
                    _MEMO[key] = torchao_symmetric(original[name], spec["nbits"])
                else:
                    s = _setting(spec)
                    _MEMO[key] = compress_weight(original[name], s, seed_of(layer, s))
            with torch.no_grad():
                params[name].copy_(_MEMO[key])
        out = run_model(ctx.model, ctx.inputs, ctx.batch_size)
    finally:
        with torch.no_grad():
            for layer in per_layer:
                params[ctx.weights[layer]].copy_(original[ctx.weights[layer]])
    return output_metrics(ctx.reference, out, ctx.logits, ctx.labels)


def run_sweep(prep_sel, k, executor) -> tuple[list[dict[str, Any]], float]:
    from compressadvise.measure.sensitivity import FP16, applicable, candidate_layers, setting_bytes

    t0 = time.perf_counter()
    layers = candidate_layers(prep_sel.report)
    order = [x.name for x in layers]
    fixed = prep_sel.report.total_params * 2 - sum(setting_bytes(k, x, FP16, 2.0) for x in layers)
    items = []
    for cfg in sweep_configs():
        s = _setting(cfg["spec"])
        chosen = [x for x in layers if applicable(k, x, [s], 2.0)]
        if cfg["skip_ends"]:
            chosen = [x for x in chosen if x.name not in (order[0], order[-1])]
        size = fixed + sum(setting_bytes(k, x, s if x in chosen else FP16, 2.0) for x in layers)
        items.append({**cfg, "per_layer": {x.name: cfg["spec"] for x in chosen}, "bytes": int(size)})
    results: dict[str, dict] = {}
    executor.run(sweep_eval, prep_sel.context(proxies=False), items,
                 lambda item, res: results.__setitem__(item["name"], res))
    wall = time.perf_counter() - t0
    for it in items:
        it["selection"] = results[it["name"]]
    return items, wall


def held_out(prep_rep, executor, items: list[dict[str, Any]]) -> list[dict[str, float]]:
    out: dict[str, dict] = {}
    executor.run(sweep_eval, prep_rep.context(proxies=False), items, lambda it, res: out.__setitem__(it["name"], res))
    return [out[it["name"]] for it in items]


# ------------------------------------------------------------------ main
def bench_model(name: str, workers: int, lessons_modes: list[str], cache_root: Path) -> dict[str, Any]:
    from compressadvise.measure.executors import ProcessExecutor
    from compressadvise.knowledge.base import builtin
    from compressadvise.plan.search import search
    from compressadvise.measure.sensitivity import Cache, prepare

    k = builtin()
    loaded, held = load(name)
    prep_sel, prep_rep = prepare(loaded, calibration(name), max_samples=1024), prepare(loaded, held, max_samples=1024)
    ex = ProcessExecutor(workers)
    fp16 = prep_sel.report.total_params * 2
    print(f"[{name}] {prep_sel.report.total_params} params, fp16 {fp16} B, selection {prep_sel.n} / "
          f"held-out {prep_rep.n} samples; reference {prep_rep.ref_metrics}", flush=True)
    sweep, sweep_wall = run_sweep(prep_sel, k, ex)
    print(f"[{name}] sweep: {len(sweep)} configs in {sweep_wall:.1f} s", flush=True)
    rows = []
    for mode in lessons_modes:
        cache = Cache(cache_root / f"{name}-{mode}")
        sens_wall_total = 0.0
        for label, frac in BUDGETS.items():
            budget = frac * fp16
            fits = [s for s in sweep if s["bytes"] <= budget]
            best = max(fits, key=lambda s: s["selection"]["psnr_db"]) if fits else None
            t0 = time.perf_counter()
            res = search(prepared=prep_sel, size_fraction=frac, target="ane-a17", knowledge=k, lessons=mode,
                         confirm=3, cache=cache, executor=ex)
            wall = time.perf_counter() - t0
            sens_wall_total += res.sensitivity_wall_s
            searched_item = {"name": "searched", "per_layer": {
                layer: {"technique": d["technique"], **d["params"]} for layer, d in res.chosen.settings.items()}}
            heldout = held_out(prep_rep, ex, [x for x in (best, searched_item) if x is not None])
            row = {
                "model": name, "lessons": mode, "budget": label, "budget_bytes": int(budget),
                "baseline": None if best is None else {
                    "name": best["name"], "bytes": best["bytes"], "selection": best["selection"],
                    "held_out": heldout[0]},
                "searched": {"bytes": int(res.chosen.estimate["bytes"]), "estimate_psnr_db": res.chosen.estimate["psnr_db"],
                             "selection": res.chosen.measured, "held_out": heldout[-1],
                             "assignment": res.chosen.assignment, "candidate": res.chosen.name},
                "evaluations": {"sweep_full_model": len(sweep), "search_full_model": res.evaluations["full_model"],
                                "search_single_layer_run": res.evaluations["single_layer"],
                                "search_single_layer_cached": res.evaluations["single_layer_cached"]},
                "wall_s": {"sweep": round(sweep_wall, 1), "search": round(wall, 1),
                           "search_sensitivity": round(res.sensitivity_wall_s, 1)},
            }
            rows.append(row)
            _print_row(row)
    return {"model": name, "params": prep_sel.report.total_params, "fp16_bytes": fp16,
            "reference_held_out": prep_rep.ref_metrics, "sweep": [
                {k2: v for k2, v in s.items() if k2 != "spec"} for s in sweep], "rows": rows}


def _fmt(m: dict[str, float] | None, key: str, fmt: str = "{:.2f}") -> str:
    if not m or key not in m or m[key] is None:
        return "-"
    v = m[key]
    return "inf" if isinstance(v, float) and math.isinf(v) else fmt.format(v)


def _print_row(r: dict[str, Any]) -> None:
    b, s = r["baseline"], r["searched"]
    base = "none fits" if b is None else (f"{b['name']} {b['bytes']} B sel {_fmt(b['selection'], 'psnr_db')} dB "
                                          f"held-out {_fmt(b['held_out'], 'psnr_db')} dB acc {_fmt(b['held_out'], 'accuracy')}%")
    print(f"  [{r['model']} {r['lessons']} {r['budget']}] baseline: {base} | searched {s['bytes']} B sel "
          f"{_fmt(s['selection'], 'psnr_db')} dB held-out {_fmt(s['held_out'], 'psnr_db')} dB acc "
          f"{_fmt(s['held_out'], 'accuracy')}% | evals {r['evaluations']} | wall {r['wall_s']}", flush=True)


def markdown(results: list[dict[str, Any]]) -> str:
    lines = ["| model | lessons | budget | best baseline (name, size) | baseline PSNR sel / held-out | baseline acc | "
             "searched size | searched PSNR sel / held-out | searched acc | full-model evals sweep / search | "
             "single-layer evals | wall s sweep / search |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            b, s, e, w = r["baseline"], r["searched"], r["evaluations"], r["wall_s"]
            lines.append("| " + " | ".join([
                res["model"], r["lessons"], f"{r['budget']} ({r['budget_bytes']} B)",
                "none fits" if b is None else f"{b['name']}, {b['bytes']} B",
                "-" if b is None else f"{_fmt(b['selection'], 'psnr_db')} / {_fmt(b['held_out'], 'psnr_db')}",
                "-" if b is None else _fmt(b["held_out"], "accuracy"),
                f"{s['bytes']} B", f"{_fmt(s['selection'], 'psnr_db')} / {_fmt(s['held_out'], 'psnr_db')}",
                _fmt(s["held_out"], "accuracy"), f"{e['sweep_full_model']} / {e['search_full_model']}",
                f"{e['search_single_layer_run']} run + {e['search_single_layer_cached']} cached",
                f"{w['sweep']} / {w['search']}"]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits,transformer")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--lessons", default="apply,advise")
    ap.add_argument("--out", default=None, help="write all results as JSON here")
    ap.add_argument("--cache", default=None, help="sensitivity cache root (default: a fresh temp folder)")
    ap.add_argument("--measure-all", action="store_true", help="mobilenet_v2: also run the search measuring every pair")
    ap.add_argument("--write", action="store_true", help="mobilenet_v2: put the table in docs/benchmarks.md")
    ap.add_argument("--repeat", type=int, default=1, help="mobilenet_v2: run sweep and search N times, interleaved")
    args = ap.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import coremltools
    import torch

    from compressadvise.fsutil import write_text_atomic

    env = {"python": platform.python_version(), "torch": torch.__version__, "coremltools": coremltools.__version__,
           "cpus": os.cpu_count(), "workers": args.workers, "machine": platform.machine()}
    if args.models == "mobilenet_v2":
        return _real_cnn(args, env, write_text_atomic)
    cache_root = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="ca-bench-"))
    results = [bench_model(m, args.workers, args.lessons.split(","), cache_root) for m in args.models.split(",")]
    print("\n" + markdown(results))
    print(f"\nenvironment: {env}")
    if args.out:
        write_text_atomic(args.out, json.dumps({"environment": env, "results": results}, indent=2, default=str))


def _real_cnn(args: argparse.Namespace, env: dict[str, Any], write_text_atomic: Any) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import search_vs_sweep_cnn as cnn
    from doc_section import write_section

    res = cnn.bench(args.workers, args.measure_all, args.repeat)
    table, text = cnn.markdown(res), cnn.summary(res)
    print("\n" + table + "\n\n" + text + f"\n\nenvironment: {env}")
    if args.out:
        write_text_atomic(args.out, json.dumps({"environment": env, "results": res}, indent=2, default=str))
    if args.write:
        cmd = "python benchmarks/search_vs_sweep.py --models mobilenet_v2" + (" --measure-all" if args.measure_all else "")
        write_section(cnn.HEADING, f"{cnn.HEADING}\n\n`{cmd} --workers {args.workers}` on {env['machine']}, "
                      f"{env['cpus']} cores, torch {env['torch']}, coremltools {env['coremltools']}. "
                      f"{cnn.__doc__.split(chr(10) * 2, 2)[2].strip()}\n\n{table}\n\n{text}\n")


if __name__ == "__main__":
    sys.exit(main())
