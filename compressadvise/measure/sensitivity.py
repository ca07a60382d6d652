"""Per-layer sensitivity: compress one layer alone, measure the model's outputs against the original.

For every compressible layer and candidate setting (a technique plus its parameters), the
layer's weight is compressed by the real library (coremltools.optimize.torch
PostTrainingPalettizer / PostTrainingQuantizer, run on a module holding that exact tensor),
the dequantized weight is swapped into the model in memory, and the outputs on the samples are
compared with the original's (output MSE, PSNR, SNR, cosine, KL and top-1 agreement for logits,
task accuracy when labels exist). All of these figures are measured.

Cheap proxies are computed beside them, and scored on how well they rank layers against the
measured truth (Spearman correlation):
- `weight_rel_error`: ||W - Wq||^2 / ||W||^2, what a weight-space check sees;
- `hessian_output`: the diagonal of the Hessian of the output-MSE loss (the Gauss-Newton
  matrix J^T J, exact at the original weights), estimated from a few gradients with random
  output probes, times the squared weight error: a second-order prediction of output MSE;
- `fisher_labels` (labels only): the empirical Fisher diagonal of the task loss (cross-entropy)
  from per-sample gradients, times the squared weight error.

Results are cached on disk, one JSON per (model sha256, layer, setting, samples hash), written
atomically: reruns and later searches read them back, and an interrupted run resumes where it
stopped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

from compressadvise.model.analysis import LayerInfo, ModelReport
from compressadvise.errors import BadModel
from compressadvise.knowledge.base import Knowledge
from compressadvise.measure.sensitivity_cache import (CACHE_ENV, CACHE_VERSION, Cache, default_cache_dir,  # re-exported
                                item_key, samples_hash)
from compressadvise.measure.sensitivity_eval import (FISHER_SAMPLES, HESSIAN_PROBES, PROXY_SAMPLES, EvalContext,  # re-exported
                               compress_weight, evaluate, evaluate_group, flat_outputs, gradient_proxies, output_metrics, release,
                               run_model, seed_of)
from compressadvise.measure.sensitivity_grid import (applicable, backend_skips, candidate_layers, default_grid,  # re-exported
                               grid_techniques, normalise, parse_settings, setting_bytes)
from compressadvise.measure.sensitivity_results import (PROXIES, LayerRank, Measurement, ProxyQuality,  # re-exported
                                  SensitivityReport, layer_scores, proxy_quality, rank_layers, spearman)
from compressadvise.plan.setting import FP16, Setting  # noqa: F401  (sensitivity.Setting is the one Setting)

if TYPE_CHECKING:
    import torch

    from compressadvise.measure.executors import Executor
    from compressadvise.model.loading import LoadedModel
    from compressadvise.model.samples import Samples


# ------------------------------------------------------------------ orchestration
COMPRESSED_MEMO_BYTES = 1 << 30  # compressed weights kept per prepared model (k-means at 8 bits costs seconds)

@dataclass
class Prepared:
    """A model and samples made ready for evaluation (shared by sensitivity and search)."""

    loaded: "LoadedModel"
    report: ModelReport
    samples: "Samples"
    n: int
    shash: str
    model: Any
    weights: dict[str, str]
    reference: "torch.Tensor"
    logits: bool
    ref_metrics: dict[str, float]
    batch_size: int
    _proxies: tuple[dict, dict] | None = None
    notes: list[str] = field(default_factory=list)
    suffix: bool = True  # single-layer evaluations rerun only the layer's suffix (False: full passes, to compare)
    predictions: dict[tuple[str, str], float | None] = field(default_factory=dict)  # (layer, setting key) ->
    # predicted output MSE (the search's cheap proxy; None: the library leaves it uncompressed), kept for later budgets
    compressed: dict[tuple[str, str], Any] = field(default_factory=dict)  # (layer, setting key) -> the library's
    # compressed weight, from evaluations that kept it (measure(keep_weights=True)): later ones reuse it

    def keep(self, layer: str, key: str, w: Any) -> None:
        """Remember a compressed weight, within COMPRESSED_MEMO_BYTES."""
        used = sum(t.numel() * t.element_size() for t in self.compressed.values())
        if used + w.numel() * w.element_size() <= COMPRESSED_MEMO_BYTES:
            self.compressed[(layer, key)] = w

    def context(self, *, proxies: bool = True, n: int | None = None) -> EvalContext:
        """What the workers need; `n` evaluates on the first n samples only (adaptive samples)."""
        import io

        import torch

        hess, fisher = self.gradient_proxies() if proxies else ({}, {})
        model, archive = self.model, None
        if isinstance(model, torch.jit.ScriptModule) or self.loaded.exported is not None:
            buf = io.BytesIO()
            if self.loaded.exported is not None:
                torch.export.save(self.loaded.exported, buf)
            else:
                torch.jit.save(model, buf)
            model, archive = None, ("exported" if self.loaded.exported is not None else "torchscript", buf.getvalue())
        n = min(n or self.n, self.n)
        labels = self._labels()
        return EvalContext(model=model, inputs=[t[:n] for t in self.samples.inputs],
                           labels=None if labels is None else labels[:n], reference=self.reference[:n],
                           logits=self.logits, weights=self.weights, hessian=hess, fisher=fisher,
                           batch_size=self.batch_size, macs=self._macs(), suffix=self.suffix,
                           sha256=self.loaded.sha256, archive=archive, pass_fraction=n / self.n)

    def gradient_proxies(self) -> tuple[dict, dict]:
        """The Hessian and Fisher diagonals per layer, computed once (empty when unavailable)."""
        if self._proxies is None:
            try:
                self._proxies = gradient_proxies(self.model, [t[:self.n] for t in self.samples.inputs],
                                                 self.weights, labels=self._labels(), logits=self.logits,
                                                 batch=min(32, self.batch_size))
            except Exception as e:  # e.g. a graph without autograd support: measure without them
                self._proxies = ({}, {})
                self.notes.append(f"gradient proxies unavailable: {str(e).splitlines()[0][:160]}")
        return self._proxies

    def hessian(self) -> dict[str, "torch.Tensor"]:
        """The output-MSE Hessian diagonal per layer."""
        return self.gradient_proxies()[0]

    def samples_hash(self, n: int | None = None) -> str:
        """The cache's key for the first n samples (all by default)."""
        return self.shash if n is None or n >= self.n else samples_hash(self.samples, n)

    def _macs(self) -> dict[str, int]:
        """Module path -> MACs per sample of every layer (the suffix's share of a forward pass)."""
        return {x.tensors[0].rpartition(".")[0]: int(x.macs) for x in self.report.layers if x.macs and x.tensors}

    def _labels(self) -> "torch.Tensor | None":
        return None if self.samples.labels is None else self.samples.labels[:self.n]


def prepare(model: "LoadedModel | str | Any" = None, samples: "Samples | str | None" = None, *,
            report: ModelReport | None = None, max_samples: int = 512, batch_size: int = 256,
            trust_pickle: bool = False) -> Prepared:
    """Load the model and samples, find each candidate layer's weight, run the original once."""
    import torch

    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import LoadedModel, load_model
    from compressadvise.model.samples import Samples, load_samples, random_samples

    if isinstance(model, torch.nn.Module):
        from compressadvise.model.loading import tensor_hash

        model = LoadedModel(type(model).__name__, "module", tensor_hash(model.state_dict().items()),
                            has_graph=True, module=model.eval())
    loaded = model if isinstance(model, LoadedModel) else load_model(model, trust_pickle=trust_pickle)
    runnable = loaded.runnable()
    if runnable is None:
        raise BadModel(f"{loaded.source}: sensitivity needs a runnable model ({loaded.format} holds weights only)",
                       hint="pass the model code as module:function, or a TorchScript/.pt2 file")
    if samples is None and loaded.format == "bundled":
        samples = "bundled"
    if isinstance(samples, Samples):
        smp = samples
    elif samples is None:
        smp = random_samples(loaded.example_inputs)
    else:
        smp = load_samples(samples)
    if loaded.example_inputs is None:  # one real sample gives analyze the MACs (latency estimates)
        loaded.example_inputs = tuple(t[:1] for t in smp.inputs)
    from compressadvise.model.deploy import deployable

    loaded = deployable(loaded)  # measure the weights that ship (BatchNorm folded), not the training form
    runnable = loaded.runnable()
    report = report or analyze(loaded)
    n = min(len(smp), max_samples)
    weights = _weight_names(runnable, candidate_layers(report))
    ref, batch_size = _reference(runnable, [t[:n] for t in smp.inputs], batch_size, smp)
    logits = _is_logits(runnable, smp, n)
    labels = None if smp.labels is None else smp.labels[:n]
    ref_metrics: dict[str, float] = {}
    if logits and labels is not None and labels.dim() == 1 and not labels.is_floating_point():
        from compressadvise.measure.metrics import topk_accuracy

        ref_metrics["accuracy"] = topk_accuracy(ref, labels, 1)
    return Prepared(loaded, report, smp, n, samples_hash(smp, n), runnable, weights, ref, logits,
                    ref_metrics, batch_size)


def _reference(model: Any, inputs: list["torch.Tensor"], batch_size: int, smp: "Samples"
               ) -> tuple["torch.Tensor", int]:
    """The original outputs; one sample at a time when the graph has a fixed batch of 1
    (e.g. a torch.export program traced on one example)."""
    try:
        return run_model(model, inputs, batch_size), batch_size
    except Exception as first:
        try:
            return run_model(model, inputs, 1), 1
        except Exception:
            raise BadModel(f"the model does not run on the samples {smp.shapes()}: "
                           f"{str(first).splitlines()[0][:200]}") from first


def _is_logits(model: Any, smp: "Samples", n: int) -> bool:
    import torch

    with torch.no_grad():
        out = model(*(t[:1] for t in smp.inputs))
    return isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[1] > 1


def _weight_names(model: Any, layers: list[LayerInfo]) -> dict[str, str]:
    """layer -> parameter name of its weight (analysis names layers after their weight tensors)."""
    names = {n for n, _ in model.named_parameters()}
    out = {}
    for x in layers:
        cands = [t for t in x.tensors if t.endswith("weight")]
        hit = next((t for t in cands if t in names), None)
        if hit is None:
            raise BadModel(f"layer {x.name}: no weight parameter found in the runnable model "
                           f"(looked for {', '.join(cands) or x.name + '.weight'})")
        out[x.name] = hit
    return out


def measure(prep: Prepared, items: list[dict[str, Setting]], *, cache: Cache | None = None,
            executor: "Executor | None" = None, progress: Callable[[int, int], None] | None = None,
            proxies: bool = True, samples: int | None = None, keep_weights: bool = False
            ) -> tuple[list[dict[str, Any]], int, "Executor | None"]:
    """Evaluate each assignment (layer -> setting), reading and filling the cache.

    Returns the results in item order (each with a `cached` flag), how many ran now, and the
    executor that ran them (None when everything came from the cache). `samples` evaluates on the
    first N samples only (cached under their own hash). `keep_weights`: compressed weights come
    back and are kept in `prep.compressed`; every evaluation reuses the ones kept there.
    """
    from compressadvise.measure.executors import make_executor

    cache = cache or Cache(enabled=False)
    shash = prep.samples_hash(samples)
    results: list[dict[str, Any] | None] = [None] * len(items)
    todo: list[int] = []
    for i, assign in enumerate(items):
        hit = cache.get(prep.loaded.sha256, item_key(assign), shash)
        if hit is not None:
            results[i] = {**hit, "cached": True}
        else:
            todo.append(i)
    done = len(items) - len(todo)
    if progress:
        progress(done, len(items))
    ex = None
    if todo:
        ctx = prep.context(proxies=proxies, n=samples)
        ctx.prefetch = list(dict.fromkeys(layer for i in todo if len(items[i]) == 1 for layer in items[i]))
        ex = executor or make_executor("process", items=len(todo))
        tasks = _tasks(items, todo, GROUP if ex.workers > 1 else 1)
        for t in tasks:
            t["weights"] = [{layer: w for layer, s in items[i].items() if (w := prep.compressed.get((layer, s.key)))
                             is not None} for i in t["index"]]
            t["return_weights"] = keep_weights

        def on_result(task: dict[str, Any], result: dict[str, Any]) -> None:
            nonlocal done
            for i, res in zip(task["index"], result["results"]):
                for layer, w in res.pop("weights", {}).items():
                    prep.keep(layer, items[i][layer].key, w)
                cache.put(prep.loaded.sha256, item_key(items[i]), shash, res)
                results[i] = {**res, "cached": False}
                done += 1
            if progress:
                progress(done, len(items))

        try:
            ex.run(evaluate_group, ctx, tasks, on_result)
        finally:
            release(ctx)  # an in-process run's kept frontiers must not outlive it
    return [r for r in results if r is not None], len(todo), ex


GROUP = 4  # single-layer items of one layer per task on a pool: its prefix computed once for them


def _tasks(items: list[dict[str, Setting]], todo: list[int], group: int) -> list[dict[str, Any]]:
    """Tasks of up to `group` single-layer items of the same layer (candidate plans: one per task).
    In one process the suffix runner already keeps a layer's prefix across its items."""
    by_layer: dict[str, list[int]] = {}
    tasks: list[dict[str, Any]] = []
    for i in todo:
        if len(items[i]) == 1:
            by_layer.setdefault(next(iter(items[i])), []).append(i)
        else:
            tasks.append({"index": [i]})
    for idx in by_layer.values():
        tasks += [{"index": idx[j:j + group]} for j in range(0, len(idx), group)]
    for t in tasks:
        t["assigns"] = [{layer: s.to_dict() for layer, s in items[i].items()} for i in t["index"]]
    return sorted(tasks, key=lambda t: t["index"][0])


def sensitivity(
    model: "LoadedModel | str | Any" = None,
    samples: "Samples | str | None" = None,
    *,
    settings: list[Setting] | None = None,
    candidates: dict[str, list[Setting]] | None = None,
    knowledge: Knowledge | None = None,
    target: str | None = None,
    os: int | None = None,
    layers: Iterable[str] | None = None,
    cache: Cache | None = None,
    executor: "Executor | None" = None,
    progress: Callable[[int, int], None] | None = None,
    max_samples: int = 512,
    prepared: Prepared | None = None,
    trust_pickle: bool = False,
    samples_used: int | None = None,
    keep_weights: bool = False,
) -> SensitivityReport:
    """Measure every (layer, setting) pair alone; rank layers; score the proxies.

    `samples_used` measures on the first N of the prepared samples only (the search's adaptive
    samples); each measurement records how many it used.
    `candidates` (layer -> settings) overrides the grid per layer (search passes the settings
    that the target and the playbooks allow). With a `target`, settings needing a mode it does
    not support at `os` are left out.
    """
    from compressadvise.knowledge.base import builtin

    t0 = time.perf_counter()
    k = knowledge or builtin()
    prep = prepared or prepare(model, samples, max_samples=max_samples, trust_pickle=trust_pickle)
    baseline = k.target(target).baseline_bytes_per_param if target else 2.0
    grid, notes = _target_grid(k, settings or default_grid(k=k), target, os)
    layer_list = candidate_layers(prep.report, layers)
    if not layer_list:
        raise BadModel(f"{prep.loaded.source}: no compressible layer matched")
    per_layer = {x.name: applicable(k, x, candidates.get(x.name, grid) if candidates else grid, baseline)
                 for x in layer_list}
    items = [{x.name: s} for x in layer_list for s in per_layer[x.name] if not s.is_fp16]
    cache = cache or Cache()
    results, ran, used = measure(prep, items, cache=cache, executor=executor, progress=progress, samples=samples_used,
                                 keep_weights=keep_weights)
    meas = _measurements(k, layer_list, items, results, baseline)
    ranking = rank_layers(meas, prep.report)
    unranked = sorted({m.layer for m in meas} - {r.layer for r in ranking})
    if unranked:
        notes.append(f"{len(unranked)} layer(s) not ranked (e.g. {unranked[0]}): measured only at settings "
                     "no other layer was, so nothing to compare with")
    if prep.samples.kind == "random":
        notes.extend(prep.samples.warnings)
    notes.extend(prep.notes)
    return SensitivityReport(
        source=prep.loaded.source, model_sha256=prep.loaded.sha256, samples=prep.samples.source,
        samples_used=prep.n, samples_hash=prep.shash, output_dim=int(prep.reference.shape[1]),
        logits=prep.logits, reference=prep.ref_metrics, peak=float(prep.reference.abs().max()),
        baseline_bytes_per_param=baseline, layers=[x.name for x in layer_list],
        settings=[s.key for s in dict.fromkeys(s for v in per_layer.values() for s in v)],
        measurements=meas, ranking=ranking, proxies=proxy_quality(meas, ranking),
        evaluations=ran, forward_passes=round(sum(_cost(r, "passes") for r in results), 2),
        suffix_evaluations=int(sum(_cost(r, "suffix") for r in results)), cache_hits=len(items) - ran, cache_dir=str(cache.root) if cache.enabled else None,
        executor=used.name if used else "cache", workers=used.workers if used else 0, wall_s=time.perf_counter() - t0, notes=notes)


def _cost(result: dict[str, Any], key: str) -> float:
    """A result's cost run now (cached results cost nothing this time)."""
    return 0.0 if result.get("cached") else float(result.get("cost", {}).get(key, 0.0))


def _target_grid(k: Knowledge, grid: list[Setting], target: str | None, os: int | None
                 ) -> tuple[list[Setting], list[str]]:
    """The grid less the settings the target does not run at `os`, and a note when any were left out."""
    notes: list[str] = []
    if target:
        grid, dropped = supported_settings(k, grid, target, os)
        if dropped:
            notes.append(f"{len(dropped)} setting(s) left out: {target} does not support them "
                         f"(e.g. {dropped[0].label})")
    return grid, notes


def _measurements(k: Knowledge, layer_list: list[LayerInfo], items: list[dict[str, Setting]],
                  results: list[dict[str, Any]], baseline: float) -> list[Measurement]:
    """One Measurement per single-layer item, with its estimated bytes under the setting."""
    by_layer = {x.name: x for x in layer_list}
    meas = []
    for assign, res in zip(items, results):
        (layer, s), = assign.items()
        meas.append(Measurement(layer=layer, setting=s.key, label=s.label, technique=s.technique, params=s.p,
                                bytes=setting_bytes(k, by_layer[layer], s, baseline), metrics=res["metrics"],
                                proxies=res["proxies"], seconds=res.get("seconds", 0.0), cached=res["cached"],
                                samples=res.get("samples")))
    return meas


def supported_settings(k: Knowledge, grid: list[Setting], target: str, os: int | None
                       ) -> tuple[list[Setting], list[Setting]]:
    """Split settings into those the target runs at this OS and those it does not (modes)."""
    from compressadvise.plan.engine import missing_modes

    from compressadvise.knowledge.deployment import Deployment

    supported = Deployment.resolve(k, target, os, check=False).supported
    keep, drop = [], []
    for s in grid:
        if s.is_fp16:
            keep.append(s)
            continue
        (drop if missing_modes(k, s.technique, s.p, supported) else keep).append(s)
    return keep, drop


