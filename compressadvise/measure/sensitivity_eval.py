"""Sensitivity evaluation: library compression of one weight, the worker context, output metrics, gradient proxies."""
from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from compressadvise.errors import BadModel, CompressionFailed
from compressadvise.plan.setting import Setting

if TYPE_CHECKING:
    import torch

PROXY_SAMPLES = 64  # samples used for the gradient-based proxies
HESSIAN_PROBES = 4  # random output probes per batch for the Gauss-Newton diagonal
FISHER_SAMPLES = 32  # per-sample gradients for the empirical Fisher


# ------------------------------------------------------------------ compression (library calls)
def _holder(w: "torch.Tensor") -> "torch.nn.Module":
    """A one-module model holding exactly this weight, so the library compresses just it."""
    import torch
    from torch import nn

    if w.dim() == 2:
        mod: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=False)
    elif w.dim() in (3, 4, 5):
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[w.dim()]
        mod = conv(w.shape[1], w.shape[0], tuple(w.shape[2:]), bias=False)
    else:
        raise CompressionFailed(f"cannot compress a {w.dim()}-D weight")
    with torch.no_grad():
        mod.weight.copy_(w.detach().float())
    return nn.Sequential(mod)


def compress_weight(w: "torch.Tensor", s: Setting, seed: int = 0) -> "torch.Tensor":
    """The dequantized weight after compressing `w` with coremltools.optimize.torch.

    Palettization runs PostTrainingPalettizer (k-means), linear quantization runs
    PostTrainingQuantizer; both leave full-precision weights holding the compressed values.
    Seeded, so the same (weight, setting, seed) gives the same result in every process.
    """
    import random

    import numpy as np
    import torch

    from compressadvise.backends import quiet  # the same quieting as `apply` uses

    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    shape = w.shape
    flat = w.reshape(shape[0], -1) if w.dim() > 5 else w
    if w.dim() == 3 and s.technique == "palettization":
        # coremltools' PostTrainingPalettizer skips Conv1d; as a (k, 1) Conv2d its LUT groups (whole
        # tensor, or output channels) are the same weights, so the values are the Conv1d's
        flat = w.unsqueeze(-1)
    if (fast := _shared_kmeans(flat, s)) is not None:
        return fast.reshape(shape).to(w.dtype)
    holder = _holder(flat)
    with quiet():  # k-means progress bars and log lines on stderr
        mod = _run_library(holder, s)
    if "_COREML_/weight/compression_type" not in dict(mod.named_buffers()):
        raise CompressionFailed(f"{s.label}: the backend left a {list(shape)} weight uncompressed "
                                "(a silent no-op)")
    return mod.weight.detach().reshape(shape).to(w.dtype).clone()


def _shared_kmeans(w: "torch.Tensor", s: Setting) -> "torch.Tensor | None":
    """Scalar LUTs over whole tensors or groups of output channels: backends/kmeans.py's clustering,
    which is optimize.torch's to the bit (tests/test_kmeans.py) and what apply ships, without the
    library's per-module set-up and list conversions (about half of its time per layer in a profile
    of a 270M decoder: 78.5 s of k-means, 48.0 s in the C routine). None: a setting it does not cover
    (vectors, per-channel scales, an int8 LUT, groups that do not divide the channels) goes to the
    library, and so does a 1-D weight, which the library refuses."""
    import numpy as np
    import torch

    from compressadvise.backends import kmeans

    p = s.p
    if (s.technique != "palettization" or w.dim() < 2 or p.get("lut_dtype") or not kmeans.shared(p, False)
            or p.get("granularity", "per_tensor") not in ("per_tensor", "per_grouped_channel")):
        return None
    flat = w.detach().reshape(w.shape[0], -1).float().numpy()
    rows = int(p.get("group_size") or 0) if p.get("granularity") == "per_grouped_channel" else flat.shape[0]
    if rows <= 0 or flat.shape[0] % rows:
        return None
    out = np.empty_like(flat)

    def group(i: int) -> None:
        lut, idx = kmeans.cluster(flat[i:i + rows], int(p["nbits"]))
        out[i:i + rows] = lut[idx].reshape(rows, -1)

    starts = range(0, flat.shape[0], rows)
    threads = min(torch.get_num_threads(), len(starts))  # a search worker runs one thread: serial there
    if threads > 1:  # the C k-means and numpy's sort release the GIL: groups run side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(group, starts))
    else:
        for i in starts:
            group(i)
    return torch.from_numpy(out)


def _run_library(holder: Any, s: Setting) -> Any:
    """Compress the holder with coremltools.optimize.torch (the same parameter -> config mapping as `apply`)."""
    from compressadvise.backends.coremltools_torch import _palettizer_options, _quantizer_options

    if s.technique == "palettization":
        from coremltools.optimize.torch.palettization import (ModulePostTrainingPalettizerConfig,
                                                              PostTrainingPalettizer,
                                                              PostTrainingPalettizerConfig)

        cfg = PostTrainingPalettizerConfig(global_config=ModulePostTrainingPalettizerConfig(**_palettizer_options(s.p)))
        out = PostTrainingPalettizer(holder, cfg).compress()
    elif s.technique == "linear_quantization":
        from coremltools.optimize.torch.quantization import (ModulePostTrainingQuantizerConfig,
                                                             PostTrainingQuantizer,
                                                             PostTrainingQuantizerConfig)

        cfg = PostTrainingQuantizerConfig(global_config=ModulePostTrainingQuantizerConfig(**_quantizer_options(s.p)))
        out = PostTrainingQuantizer(holder, cfg).compress()
    else:
        raise CompressionFailed(f"sensitivity cannot apply technique {s.technique!r} "
                                "(supported: palettization, linear_quantization)")
    return out[0]


def seed_of(layer: str, s: Setting) -> int:
    return zlib.crc32(f"{layer}|{s.key}".encode())


# ------------------------------------------------------------------ evaluation context
@dataclass
class EvalContext:
    """Everything a worker needs, shipped once per worker."""

    model: Any  # an eager nn.Module or GraphModule (None when shipped as TorchScript bytes)
    inputs: list["torch.Tensor"]
    labels: "torch.Tensor | None"
    reference: "torch.Tensor"  # (N, D) flattened float outputs of the original model
    logits: bool  # a single (N, C) output: KL and top-1 agreement apply
    weights: dict[str, str]  # layer -> parameter name of its weight
    hessian: dict[str, "torch.Tensor"] = field(default_factory=dict)
    fisher: dict[str, "torch.Tensor"] = field(default_factory=dict)
    batch_size: int = 256
    macs: dict[str, int] = field(default_factory=dict)  # module path -> MACs (the suffix's share of a pass)
    suffix: bool = True  # single-layer items rerun only what the layer changes (sensitivity_suffix)
    sha256: str = ""
    archive: tuple[str, bytes] | None = None  # ("torchscript" | "exported", bytes): these do not pickle
    pass_fraction: float = 1.0  # these samples' share of all samples: a pass over them costs this much
    prefetch: list[str] = field(default_factory=list)  # the run's single-layer items' layers: their
    # prefixes computed together, in one pass, by the first evaluation that needs one

    def runnable(self) -> Any:
        if self.model is None and self.archive is not None:
            import io

            import torch

            kind, data = self.archive
            if kind == "torchscript":
                self.model = torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
            else:
                self.model = torch.export.load(io.BytesIO(data)).module()
        return self.model


_STATE: dict[str, Any] = {}


def _worker_state(ctx: EvalContext) -> dict[str, Any]:
    """Parameters by name and pristine copies of the weights, built once per worker."""
    # Keyed by the context object itself, held here: an id alone can be reused by the next context
    # (other samples), whose evaluations would then read this one's cached prefix.
    if _STATE.get("ctx") is not ctx:
        params = dict(ctx.runnable().named_parameters())
        missing = [n for n in ctx.weights.values() if n not in params]
        if missing:
            raise BadModel(f"cannot find weight {missing[0]!r} among the model's parameters")
        _STATE.clear()
        _STATE.update(ctx=ctx, params=params, runner=_runner(ctx, params),
                      original={n: params[n].detach().clone() for n in ctx.weights.values()})
    return _STATE


def release(ctx: EvalContext) -> None:
    """Drop what this process keeps for `ctx` (weight copies, the frontier values of a run's
    layers: up to the suffix runner's memory bound): a later context builds its own anyway."""
    if _STATE.get("ctx") is ctx:
        _STATE.clear()


def _runner(ctx: EvalContext, params: dict[str, Any]) -> Any:
    """A suffix runner over the model's fx graph, or None (not traceable, or its weights are copies)."""
    if not ctx.suffix:
        return None
    from compressadvise.measure.sensitivity_suffix import SuffixRunner

    try:
        runner = SuffixRunner(ctx.runnable(), ctx.macs)
    except Exception:  # data-dependent control flow, TorchScript...: full passes
        return None
    same = all(runner.params.get(n) is params[n] for n in ctx.weights.values())
    return runner if same else None


def _suffix_outputs(ctx: EvalContext, st: dict[str, Any], layer: str, cost: dict[str, float]) -> Any:
    """(runner, weight) when `layer`'s suffix can be rerun alone (its prefix computed now, with the
    original weights every evaluation starts from, if not cached), else None: a full pass."""
    runner = st.get("runner")
    name = ctx.weights[layer]
    if runner is None or name in st.get("no_suffix", set()):
        return None
    if runner.has(name):
        return runner, name
    n = int(ctx.inputs[0].shape[0])
    batches = [tuple(t[i:i + ctx.batch_size] for t in ctx.inputs) for i in range(0, n, ctx.batch_size)]
    if not st.get("prefetched") and ctx.prefetch:  # the run's first prefix: every layer's frontier in one pass
        st["prefetched"] = True
        try:
            cost["passes"] += runner.prefixes([ctx.weights[x] for x in ctx.prefetch], batches)
        except Exception:
            pass  # a node the interpreter cannot run: each layer tries its own prefix below
        if runner.has(name):
            return runner, name
    try:
        ok = runner.prefix(name, batches)
    except Exception:
        ok = False
    cost["passes"] += 1.0 - runner.suffix(name).share if ok else 1.0
    if not ok:
        st.setdefault("no_suffix", set()).add(name)
        return None
    return runner, name


def _run_suffix(found: Any, cost: dict[str, float]) -> Any:
    import torch

    runner, name = found
    cost["passes"] += runner.suffix(name).share
    cost["suffix"] = 1.0
    return torch.cat([flat_outputs(o) for o in runner.run_suffix(name)])


def _float_outputs(out: Any) -> list["torch.Tensor"]:
    """The floating tensors a model returned (a tensor, tuple, list, dict or `.logits` object)."""
    import torch

    if isinstance(out, torch.Tensor):
        parts = [out]
    elif isinstance(out, dict):
        parts = list(out.values())
    elif isinstance(out, (tuple, list)):
        parts = list(out)
    else:
        parts = [getattr(out, "logits")] if hasattr(out, "logits") else []
    parts = [p for p in parts if isinstance(p, torch.Tensor) and p.is_floating_point()]
    if not parts:
        raise BadModel(f"the model returned {type(out).__name__} with no floating tensor to compare")
    return parts


def _flatten(parts: list["torch.Tensor"]) -> "torch.Tensor":
    import torch

    b = parts[0].shape[0] if parts[0].dim() else 1
    return torch.cat([p.reshape(b, -1) for p in parts], 1)


def flat_outputs(out: Any) -> "torch.Tensor":
    """All floating outputs of one batch as (B, D) float64 (tuples, lists and dicts concatenated)."""
    return _flatten([p.detach().double() for p in _float_outputs(out)])


def run_model(model: Any, inputs: list["torch.Tensor"], batch_size: int) -> "torch.Tensor":
    import torch

    n = int(inputs[0].shape[0])
    outs = []
    with torch.no_grad():
        for i in range(0, n, batch_size):
            outs.append(flat_outputs(model(*(t[i:i + batch_size] for t in inputs))))
    return torch.cat(outs)


def output_metrics(ref: "torch.Tensor", out: "torch.Tensor", logits: bool,
                   labels: "torch.Tensor | None") -> dict[str, float]:
    """Measured fidelity of `out` against `ref` (both (N, D)), plus accuracy with labels."""
    from compressadvise.measure import metrics as M

    per_sample = ((out - ref) ** 2).mean(1)
    err = float(per_sample.mean())
    se = float(per_sample.std() / math.sqrt(len(per_sample))) if len(per_sample) > 1 else math.inf
    m = {"output_mse": err, "output_mse_se": se, "psnr_db": M.psnr(ref, out), "snr_db": M.snr(ref, out),
         "cosine": M.cosine_similarity(ref, out)}
    if logits:
        m["top1_agreement"] = M.top1_agreement(ref, out)
        m["kl_divergence"] = max(0.0, M.kl_divergence(ref, out))
        if labels is not None and labels.dim() == 1 and not labels.is_floating_point():
            m["accuracy"] = M.topk_accuracy(out, labels, 1)
    return m


def evaluate_group(ctx: EvalContext, item: dict[str, Any]) -> dict[str, Any]:
    """Several single-layer items of one layer in one task, so one worker computes the layer's
    prefix once for all of them (a pool would otherwise spread them over workers)."""
    extra = {k: item[k] for k in ("return_weights",) if k in item}
    return {"results": [evaluate(ctx, {"assign": a, **extra, "weights": w})
                        for a, w in zip(item["assigns"], item.get("weights") or [{}] * len(item["assigns"]))]}


def evaluate(ctx: EvalContext, item: dict[str, Any]) -> dict[str, Any]:
    """Compress the item's layers with their settings, run the model, restore, measure.

    item: {"assign": {layer: setting dict}}. One layer = a sensitivity measurement; all
    layers = a full candidate plan. Deterministic: each layer's compression is seeded by
    (layer, setting).
    """
    import torch

    t0 = time.perf_counter()
    st = _worker_state(ctx)
    params, original = st["params"], st["original"]
    assign = {layer: Setting.from_dict(d) for layer, d in item["assign"].items()}
    nan = float("nan")  # a proxy the context carries no scores for is "not computed", not zero
    proxies = {"weight_rel_error": 0.0, "hessian_output": 0.0 if ctx.hessian else nan,
               "fisher_labels": 0.0 if ctx.fisher else nan}
    cost = {"passes": 0.0, "suffix": 0.0}  # forward-pass equivalents: a pass over all samples = 1
    kept: dict[str, Any] = {}
    found = _suffix_outputs(ctx, st, next(iter(assign)), cost) if len(assign) == 1 else None
    try:
        for layer, s in assign.items():
            if s.is_fp16:
                continue
            name = ctx.weights[layer]
            w0 = original[name]
            given = item.get("weights", {}).get(layer)  # compressed before (the same seeded call): reused
            wq = given if given is not None else compress_weight(w0, s, seed_of(layer, s))
            if item.get("return_weights"):
                kept[layer] = wq
            d2 = (wq.double() - w0.double()) ** 2
            proxies["weight_rel_error"] += float(d2.sum() / (w0.double() ** 2).sum().clamp_min(1e-300))
            if layer in ctx.hessian:
                proxies["hessian_output"] += float((ctx.hessian[layer].double() * d2).sum())
            if layer in ctx.fisher:
                proxies["fisher_labels"] += float(0.5 * (ctx.fisher[layer].double() * d2).sum())
            with torch.no_grad():
                params[name].copy_(wq)
        if found is not None:
            out = _run_suffix(found, cost)
        else:
            out = run_model(ctx.runnable(), ctx.inputs, ctx.batch_size)
            cost["passes"] += 1.0
    finally:
        with torch.no_grad():
            for layer in assign:
                name = ctx.weights[layer]
                params[name].copy_(original[name])
    cost["passes"] *= ctx.pass_fraction
    result = {"metrics": output_metrics(ctx.reference, out, ctx.logits, ctx.labels), "proxies": proxies,
              "seconds": time.perf_counter() - t0, "cost": cost, "samples": int(ctx.inputs[0].shape[0])}
    if kept:
        result["weights"] = kept  # the caller keeps them for later evaluations; never cached to disk
    if not all(math.isfinite(v) for k, v in result["metrics"].items() if k not in ("psnr_db", "snr_db", "output_mse_se")):
        result["nonfinite"] = True
    return result


# ------------------------------------------------------------------ gradient proxies
def gradient_proxies(model: Any, inputs: list["torch.Tensor"], weights: dict[str, str], *,
                     labels: "torch.Tensor | None", logits: bool, n: int = PROXY_SAMPLES,
                     probes: int = HESSIAN_PROBES, seed: int = 0, batch: int = 32) -> tuple[dict, dict]:
    """Diagonal second-order scores per weight element (estimates from a few gradients).

    hessian: diag(J^T J) / (N * D), where J is the Jacobian of the flattened outputs of N
    samples: E_r[(J^T r)^2] over Gaussian probes r. Times the squared weight error it predicts
    the output MSE the error causes (the Hessian of output MSE at the original weights).
    fisher: the empirical Fisher diagonal of the cross-entropy loss, mean over samples of the
    squared per-sample gradient (labels and logits only).
    """
    import torch

    params = dict(model.named_parameters())
    targets = {layer: params[name] for layer, name in weights.items()}
    flags = {layer: p.requires_grad for layer, p in targets.items()}
    gen = torch.Generator().manual_seed(seed)
    n = min(n, int(inputs[0].shape[0]))
    sub = [t[:n] for t in inputs]
    hess = {layer: torch.zeros_like(p, dtype=torch.float64) for layer, p in targets.items()}
    fisher: dict[str, Any] = {}
    try:
        for p in targets.values():
            p.requires_grad_(True)
        out = None
        elements = 0
        for i in range(0, n, batch):
            xb = tuple(t[i:i + batch] for t in sub)
            out = _flatten(_float_outputs(model(*xb)))  # one forward: every probe's backward reuses its graph
            for probe in range(probes):
                r = torch.randn(out.shape, generator=gen, dtype=out.dtype)
                grads = torch.autograd.grad((out * r).sum(), list(targets.values()), allow_unused=True,
                                            retain_graph=probe < probes - 1)
                for layer, g in zip(targets, grads):
                    if g is not None:
                        hess[layer] += g.double() ** 2 / probes
            elements += out.numel() if out is not None else 0
        for layer in hess:
            hess[layer] /= max(elements, 1)
        if labels is not None and logits and labels.dim() == 1 and not labels.is_floating_point():
            m = min(FISHER_SAMPLES, n)
            fisher = {layer: torch.zeros_like(p, dtype=torch.float64) for layer, p in targets.items()}
            for i in range(m):
                out = _flatten(_float_outputs(model(*(t[i:i + 1] for t in sub))))
                loss = torch.nn.functional.cross_entropy(out, labels[i:i + 1])
                grads = torch.autograd.grad(loss, list(targets.values()), allow_unused=True)
                for layer, g in zip(targets, grads):
                    if g is not None:
                        fisher[layer] += g.double() ** 2 / m
    finally:
        for layer, p in targets.items():
            p.requires_grad_(flags[layer])
    return ({k: v.float() for k, v in hess.items()}, {k: v.float() for k, v in fisher.items()})
