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

import fnmatch
import hashlib
import itertools
import json
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from pydantic import Field

from ._callable import callable_module
from .analysis import LayerInfo, ModelReport
from .errors import BadModel, CompressionFailed, InvalidKnowledge
from .fsutil import write_text_atomic
from .knowledge import Knowledge, builtin
from .metrics import ResultModel
from .schema import COMPRESSIBLE
from .setting import FP16, Setting  # noqa: F401  (sensitivity.Setting is the one Setting)
from .sizing import NotApplicable, layer_bytes, weight_bytes

if TYPE_CHECKING:
    import torch

    from .executors import Executor
    from .loading import LoadedModel
    from .samples import Samples

CACHE_VERSION = "1"
CACHE_ENV = "COMPRESSADVISE_SENSITIVITY_CACHE"
PROXY_SAMPLES = 64  # samples used for the gradient-based proxies
HESSIAN_PROBES = 4  # random output probes per batch for the Gauss-Newton diagonal
FISHER_SAMPLES = 32  # per-sample gradients for the empirical Fisher
PROXIES = ("weight_rel_error", "hessian_output", "fisher_labels")




def grid_techniques(k: Knowledge | None = None) -> tuple[str, ...]:
    """Techniques with a default candidate grid (a `search_grid` in their YAML)."""
    k = k or builtin()
    return tuple(name for name, t in k.techniques.items() if t.search_grid)


def default_grid(techniques: Iterable[str] | None = None, k: Knowledge | None = None) -> list[Setting]:
    """The default candidates: each technique's `search_grid` (techniques/*.yaml), expanded in
    order; every technique that has one when `techniques` is None."""
    k = k or builtin()
    out: list[Setting] = []
    for name in grid_techniques(k) if techniques is None else techniques:
        for entry in k.techniques[name].search_grid if name in k.techniques else []:
            axes = [v if isinstance(v, list) else [v] for v in entry.values()]
            out += [Setting.of(name, **dict(zip(entry, combo))) for combo in itertools.product(*axes)]
    return out


def parse_settings(specs: Iterable[str], k: Knowledge) -> list[Setting]:
    """Parse `--techniques` entries: a technique name (its default grid) or a grid such as
    `palettization:nbits=4|3,granularity=per_grouped_channel,group_size=8|16`."""
    out: list[Setting] = []
    for spec in specs:
        for part in _split_specs(spec):
            name, _, rest = part.partition(":")
            name = name.strip()
            if name not in k.techniques:
                raise InvalidKnowledge(f"unknown technique {name!r} in --techniques",
                                       hint=f"known: {', '.join(sorted(k.techniques))}")
            if not rest:
                grid = default_grid([name], k)
                if not grid:
                    raise InvalidKnowledge(f"no default candidate grid for {name!r}: give its parameters, "
                                           f"e.g. {name}:nbits=8")
                out.extend(grid)
                continue
            out.extend(_expand(k, name, rest))
    return list(dict.fromkeys(out))


def _split_specs(spec: str) -> list[str]:
    """'palettization;linear_quantization:nbits=8' -> two specs (';' or whitespace separated)."""
    return [s for s in spec.replace(";", " ").split() if s]


def _expand(k: Knowledge, technique: str, text: str) -> list[Setting]:
    tech = k.techniques[technique]
    axes: list[tuple[str, list[Any]]] = []
    for item in text.split(","):
        key, eq, values = item.partition("=")
        key = key.strip()
        spec = tech.parameters.get(key)
        if not eq or spec is None:
            raise InvalidKnowledge(f"--techniques: {technique} has no parameter {key!r}",
                                   hint=f"has: {', '.join(tech.parameters)}")
        vals = [_coerce(spec.type, v.strip()) for v in values.split("|")]
        for v in vals:
            if msg := spec.check(key, v):
                raise InvalidKnowledge(f"--techniques: {technique}: {msg}")
        axes.append((key, vals))
    combos: list[dict[str, Any]] = [{}]
    for key, vals in axes:
        combos = [{**c, key: v} for c in combos for v in vals]
    defaults = {kk: v for kk, v in tech.defaults().items() if kk != "weight_threshold"}
    return [Setting.of(technique, **normalise({**defaults, **c})) for c in combos]


def _coerce(kind: str, text: str) -> Any:
    try:
        return {"int": int, "float": float, "bool": lambda s: s.lower() in ("1", "true", "yes"),
                "str": str}[kind](text)
    except ValueError:
        raise InvalidKnowledge(f"--techniques: {text!r} is not a valid {kind}") from None


def normalise(p: dict[str, Any]) -> dict[str, Any]:
    """Drop parameters that do not apply to the chosen granularity (so equal settings compare equal)."""
    p = dict(p)
    if p.get("granularity") != "per_grouped_channel":
        p.pop("group_size", None)
    if p.get("granularity") != "per_block":
        p.pop("block_size", None)
    for key, default in (("lut_dtype", "fp16"), ("enable_per_channel_scale", False)):
        if p.get(key) == default:
            p.pop(key)
    return p


def candidate_layers(report: ModelReport, patterns: Iterable[str] | None = None) -> list[LayerInfo]:
    """Weight layers a technique can compress: 2-D+ weights of compressible types, not tied aliases."""
    pats = list(patterns or [])
    out = []
    for x in report.layers:
        if x.type not in COMPRESSIBLE or len(x.weight_shape) < 2 or x.tied_to:
            continue
        if pats and not any(fnmatch.fnmatchcase(x.name, p) for p in pats):
            continue
        out.append(x)
    return out


def setting_bytes(k: Knowledge, layer: LayerInfo, s: Setting, baseline: float) -> int:
    """Whole-layer bytes under a setting (estimate from the technique's formula); raises NotApplicable."""
    if s.is_fp16:
        return layer_bytes(layer, None, baseline)
    w = weight_bytes(k, s.technique, layer, {**s.p, "weight_threshold": 0}, baseline)
    return layer_bytes(layer, w, baseline)


def applicable(k: Knowledge, layer: LayerInfo, settings: list[Setting], baseline: float) -> list[Setting]:
    """Settings the backend can apply to this layer (divisible dims); weight_threshold is not
    applied here: every candidate layer is measured, whatever its size."""
    out = []
    for s in settings:
        try:
            setting_bytes(k, layer, s, baseline)
        except NotApplicable:
            continue
        if backend_skips(layer, s):
            continue
        out.append(s)
    return out


def backend_skips(layer: LayerInfo, s: Setting) -> str | None:
    """Cases the size formulas accept but coremltools leaves alone without an error."""
    p = s.p
    if s.technique == "linear_quantization" and p.get("granularity") == "per_block":
        if int(p.get("block_size", 0) or 0) >= layer.in_channels:
            # checked in coremltools.optimize.torch._utils.validation_utils: blocks must be
            # narrower than the input axis, else the layer is skipped (use per_channel instead)
            return f"block_size {p.get('block_size')} >= {layer.in_channels} input channels: coremltools skips it"
    return None


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

    from .backends import quiet  # the same quieting as `apply` uses

    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    shape = w.shape
    flat = w.reshape(shape[0], -1) if w.dim() > 5 else w
    holder = _holder(flat)
    with quiet():  # k-means progress bars and log lines on stderr
        mod = _run_library(holder, s)
    if "_COREML_/weight/compression_type" not in dict(mod.named_buffers()):
        raise CompressionFailed(f"{s.label}: the backend left a {list(shape)} weight uncompressed "
                                "(a silent no-op)")
    return mod.weight.detach().reshape(shape).to(w.dtype).clone()


def _run_library(holder: Any, s: Setting) -> Any:
    """Compress the holder with coremltools.optimize.torch (the same parameter -> config mapping as `apply`)."""
    from .backends.coremltools_torch import _palettizer_options, _quantizer_options

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
    sha256: str = ""
    archive: tuple[str, bytes] | None = None  # ("torchscript" | "exported", bytes): these do not pickle

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
    key = f"{ctx.sha256}:{id(ctx)}"
    if _STATE.get("key") != key:
        params = dict(ctx.runnable().named_parameters())
        missing = [n for n in ctx.weights.values() if n not in params]
        if missing:
            raise BadModel(f"cannot find weight {missing[0]!r} among the model's parameters")
        _STATE.clear()
        _STATE.update(key=key, params=params,
                      original={n: params[n].detach().clone() for n in ctx.weights.values()})
    return _STATE


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
    from . import metrics as M

    err = float(((out - ref) ** 2).mean())
    m = {"output_mse": err, "psnr_db": M.psnr(ref, out), "snr_db": M.snr(ref, out),
         "cosine": M.cosine_similarity(ref, out)}
    if logits:
        m["top1_agreement"] = M.top1_agreement(ref, out)
        m["kl_divergence"] = max(0.0, M.kl_divergence(ref, out))
        if labels is not None and labels.dim() == 1 and not labels.is_floating_point():
            m["accuracy"] = M.topk_accuracy(out, labels, 1)
    return m


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
    try:
        for layer, s in assign.items():
            if s.is_fp16:
                continue
            name = ctx.weights[layer]
            w0 = original[name]
            wq = compress_weight(w0, s, seed_of(layer, s))
            d2 = (wq.double() - w0.double()) ** 2
            proxies["weight_rel_error"] += float(d2.sum() / (w0.double() ** 2).sum().clamp_min(1e-300))
            if layer in ctx.hessian:
                proxies["hessian_output"] += float((ctx.hessian[layer].double() * d2).sum())
            if layer in ctx.fisher:
                proxies["fisher_labels"] += float(0.5 * (ctx.fisher[layer].double() * d2).sum())
            with torch.no_grad():
                params[name].copy_(wq)
        out = run_model(ctx.runnable(), ctx.inputs, ctx.batch_size)
    finally:
        with torch.no_grad():
            for layer in assign:
                name = ctx.weights[layer]
                params[name].copy_(original[name])
    result = {"metrics": output_metrics(ctx.reference, out, ctx.logits, ctx.labels), "proxies": proxies,
              "seconds": time.perf_counter() - t0}
    if not all(math.isfinite(v) for k, v in result["metrics"].items() if k != "psnr_db" and k != "snr_db"):
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
            for _ in range(probes):
                out = _flatten(_float_outputs(model(*xb)))
                r = torch.randn(out.shape, generator=gen, dtype=out.dtype)
                grads = torch.autograd.grad((out * r).sum(), list(targets.values()), allow_unused=True)
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


# ------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # no $HOME and no passwd entry (some containers)
        import tempfile

        home = Path(tempfile.gettempdir())
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "compressadvise" / "sensitivity"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _valid_result(result: Any) -> bool:
    """The shape `evaluate` writes: metrics and proxies as name -> number, seconds a number."""
    return (isinstance(result, dict)
            and all(isinstance(result.get(part), dict) and all(_is_number(v) for v in result[part].values())
                    for part in ("metrics", "proxies"))
            and _is_number(result.get("seconds", 0.0)))


class Cache:
    """One JSON file per (model sha256, layer(s) and setting(s), samples hash); atomic writes.

    Anything unexpected in an entry (not JSON, not an object, a field missing or of the wrong
    type) is a miss, and the entry is rewritten once measured again."""

    def __init__(self, root: str | Path | None = None, *, enabled: bool = True):
        self.root = Path(root) if root else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        if enabled:
            self._check_root()

    def _check_root(self) -> None:
        """Fail before any measuring when entries could never be written: a file is in the way,
        or the nearest existing folder is read-only."""
        from .errors import InputNotFound

        hint = "pass --cache FOLDER, or --no-cache"
        base = next((p for p in (self.root, *self.root.absolute().parents) if p.exists()), None)
        if base is None:
            return
        if not base.is_dir():
            what = "is a file" if base == self.root else f"is under the file {base}"
            raise InputNotFound(f"sensitivity cache {self.root} {what}: the cache must be a folder", hint=hint)
        if not os.access(base, os.W_OK | os.X_OK):
            raise InputNotFound(f"sensitivity cache {self.root}: {base} is not writable", hint=hint)

    def _path(self, model_sha: str, item_key: str, samples_hash: str) -> Path:
        digest = hashlib.sha256(f"{CACHE_VERSION}\n{item_key}\n{samples_hash}".encode()).hexdigest()[:40]
        return self.root / model_sha[:24] / f"{digest}.json"

    def get(self, model_sha: str, item_key: str, samples_hash: str) -> dict[str, Any] | None:
        if not self.enabled:
            self.misses += 1
            return None
        path = self._path(model_sha, item_key, samples_hash)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # RecursionError: '[[[[...' nested too deep
            data = None
        if (not isinstance(data, dict) or data.get("model_sha256") != model_sha or data.get("item") != item_key
                or data.get("samples") != samples_hash or not _valid_result(data.get("result"))):
            self.misses += 1
            return None
        self.hits += 1
        return data["result"]

    def put(self, model_sha: str, item_key: str, samples_hash: str, result: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from .errors import CompressAdviseError, InputNotFound

        data = {"version": CACHE_VERSION, "model_sha256": model_sha, "item": item_key,
                "samples": samples_hash, "result": result}
        path = self._path(model_sha, item_key, samples_hash)
        try:  # a failure stops the run loudly; what was measured so far is cached and resumes
            write_text_atomic(path, json.dumps(data, allow_nan=True))
        except CompressAdviseError:
            raise
        except OSError as e:  # disk full, a folder where the entry goes
            raise InputNotFound(f"cannot write the sensitivity cache entry {path} ({e.strerror or e})",
                                hint="pass --cache FOLDER, or --no-cache") from None


def item_key(assign: dict[str, Setting]) -> str:
    return ";".join(f"{layer}={s.key}" for layer, s in sorted(assign.items()))


def samples_hash(samples: "Samples", n: int) -> str:
    h = hashlib.sha256()
    for t in samples.inputs:
        h.update(str(tuple(t[:n].shape)).encode())
        h.update(t[:n].contiguous().numpy().tobytes())
    if samples.labels is not None:
        h.update(samples.labels[:n].contiguous().numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------ results
class Measurement(ResultModel):
    layer: str
    setting: str = Field(description="setting key, technique:param=value,...")
    label: str
    technique: str
    params: dict[str, Any]
    bytes: int = Field(description="estimate: whole-layer bytes under this setting (technique formula)")
    metrics: dict[str, float] = Field(description="measured on the samples, this layer alone compressed")
    proxies: dict[str, float] = Field(description="cheap predictions (weight error, Hessian/Fisher x error)")
    seconds: float = 0.0
    cached: bool = False


class LayerRank(ResultModel):
    layer: str
    type: str
    params: int
    score: float = Field(description="geometric mean over its settings of the measured output MSE / the median "
                               "layer's at the same setting")
    vs_median: float = Field(description="score / median layer score")
    rank: int


class ProxyQuality(ResultModel):
    proxy: str
    layer_rank_spearman: float | None = Field(description="rank correlation of per-layer scores with the measured ones")
    per_setting_spearman: float | None = Field(description="mean over settings of the rank correlation across layers")
    top1_match: bool | None = Field(description="the proxy's most sensitive layer is the measured one")
    pairs_spearman: float | None = Field(description="rank correlation over all (layer, setting) pairs")


class SensitivityReport(ResultModel):
    source: str
    model_sha256: str
    samples: str
    samples_used: int
    samples_hash: str
    output_dim: int
    logits: bool
    reference: dict[str, float] = Field(description="measured on the original model (accuracy with labels)")
    peak: float = Field(description="max |reference output|, the PSNR peak")
    baseline_bytes_per_param: float
    layers: list[str]
    settings: list[str]
    measurements: list[Measurement]
    ranking: list[LayerRank]
    proxies: list[ProxyQuality]
    evaluations: int = Field(description="single-layer evaluations run now (not from the cache)")
    cache_hits: int
    cache_dir: str | None
    executor: str
    workers: int
    wall_s: float
    notes: list[str] = []

    def table(self) -> dict[str, dict[str, Measurement]]:
        out: dict[str, dict[str, Measurement]] = {}
        for m in self.measurements:
            out.setdefault(m.layer, {})[m.setting] = m
        return out


# ------------------------------------------------------------------ orchestration
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

    def context(self, *, proxies: bool = True) -> EvalContext:
        import io

        import torch

        hess, fisher = {}, {}
        if proxies:
            if self._proxies is None:
                try:
                    self._proxies = gradient_proxies(self.model, [t[:self.n] for t in self.samples.inputs],
                                                     self.weights, labels=self._labels(), logits=self.logits,
                                                     batch=min(32, self.batch_size))
                except Exception as e:  # e.g. a graph without autograd support: measure without them
                    self._proxies = ({}, {})
                    self.notes.append(f"gradient proxies unavailable: {str(e).splitlines()[0][:160]}")
            hess, fisher = self._proxies
        model, archive = self.model, None
        if isinstance(model, torch.jit.ScriptModule) or self.loaded.exported is not None:
            buf = io.BytesIO()
            if self.loaded.exported is not None:
                torch.export.save(self.loaded.exported, buf)
            else:
                torch.jit.save(model, buf)
            model, archive = None, ("exported" if self.loaded.exported is not None else "torchscript", buf.getvalue())
        return EvalContext(model=model, inputs=[t[:self.n] for t in self.samples.inputs],
                           labels=self._labels(), reference=self.reference, logits=self.logits,
                           weights=self.weights, hessian=hess, fisher=fisher, batch_size=self.batch_size,
                           sha256=self.loaded.sha256, archive=archive)

    def _labels(self) -> "torch.Tensor | None":
        return None if self.samples.labels is None else self.samples.labels[:self.n]


def prepare(model: "LoadedModel | str | Any" = None, samples: "Samples | str | None" = None, *,
            report: ModelReport | None = None, max_samples: int = 512, batch_size: int = 256,
            trust_pickle: bool = False) -> Prepared:
    """Load the model and samples, find each candidate layer's weight, run the original once."""
    import torch

    from .analysis import analyze
    from .loading import LoadedModel, load_model
    from .samples import Samples, load_samples, random_samples

    if isinstance(model, torch.nn.Module):
        from .loading import _tensor_hash

        model = LoadedModel(type(model).__name__, "module", _tensor_hash(model.state_dict().items()),
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
    report = report or analyze(loaded)
    n = min(len(smp), max_samples)
    weights = _weight_names(runnable, candidate_layers(report))
    ref, batch_size = _reference(runnable, [t[:n] for t in smp.inputs], batch_size, smp)
    logits = _is_logits(runnable, smp, n)
    labels = None if smp.labels is None else smp.labels[:n]
    ref_metrics: dict[str, float] = {}
    if logits and labels is not None and labels.dim() == 1 and not labels.is_floating_point():
        from .metrics import topk_accuracy

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
            proxies: bool = True) -> tuple[list[dict[str, Any]], int, "Executor | None"]:
    """Evaluate each assignment (layer -> setting), reading and filling the cache.

    Returns the results in item order (each with a `cached` flag), how many ran now, and the
    executor that ran them (None when everything came from the cache).
    """
    from .executors import make_executor

    cache = cache or Cache(enabled=False)
    results: list[dict[str, Any] | None] = [None] * len(items)
    todo: list[dict[str, Any]] = []
    for i, assign in enumerate(items):
        hit = cache.get(prep.loaded.sha256, item_key(assign), prep.shash)
        if hit is not None:
            results[i] = {**hit, "cached": True}
        else:
            todo.append({"index": i, "assign": {layer: s.to_dict() for layer, s in assign.items()}})
    done = len(items) - len(todo)
    if progress:
        progress(done, len(items))
    ex = None
    if todo:
        ctx = prep.context(proxies=proxies)
        ex = executor or make_executor("process", items=len(todo))

        def on_result(item: dict[str, Any], result: dict[str, Any]) -> None:
            nonlocal done
            i = item["index"]
            cache.put(prep.loaded.sha256, item_key(items[i]), prep.shash, result)
            results[i] = {**result, "cached": False}
            done += 1
            if progress:
                progress(done, len(items))

        ex.run(evaluate, ctx, todo, on_result)
    return [r for r in results if r is not None], len(todo), ex


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
) -> SensitivityReport:
    """Measure every (layer, setting) pair alone; rank layers; score the proxies.

    `candidates` (layer -> settings) overrides the grid per layer (search passes the settings
    that the target and the playbooks allow). With a `target`, settings needing a mode it does
    not support at `os` are left out.
    """
    from .knowledge import builtin

    t0 = time.perf_counter()
    k = knowledge or builtin()
    prep = prepared or prepare(model, samples, max_samples=max_samples, trust_pickle=trust_pickle)
    baseline = k.target(target).baseline_bytes_per_param if target else 2.0
    grid = settings or default_grid(k=k)
    notes: list[str] = []
    if target:
        grid, dropped = supported_settings(k, grid, target, os)
        if dropped:
            notes.append(f"{len(dropped)} setting(s) left out: {target} does not support them "
                         f"(e.g. {dropped[0].label})")
    layer_list = candidate_layers(prep.report, layers)
    if not layer_list:
        raise BadModel(f"{prep.loaded.source}: no compressible layer matched")
    per_layer = {x.name: applicable(k, x, candidates.get(x.name, grid) if candidates else grid, baseline)
                 for x in layer_list}
    items = [{x.name: s} for x in layer_list for s in per_layer[x.name] if not s.is_fp16]
    cache = cache or Cache()
    results, ran, used = measure(prep, items, cache=cache, executor=executor, progress=progress)
    by_layer = {x.name: x for x in layer_list}
    meas = []
    for assign, res in zip(items, results):
        (layer, s), = assign.items()
        meas.append(Measurement(layer=layer, setting=s.key, label=s.label, technique=s.technique, params=s.p,
                                bytes=setting_bytes(k, by_layer[layer], s, baseline), metrics=res["metrics"],
                                proxies=res["proxies"], seconds=res.get("seconds", 0.0), cached=res["cached"]))
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
        evaluations=ran, cache_hits=len(items) - ran, cache_dir=str(cache.root) if cache.enabled else None,
        executor=used.name if used else "cache", workers=used.workers if used else 0, wall_s=time.perf_counter() - t0, notes=notes)


def supported_settings(k: Knowledge, grid: list[Setting], target: str, os: int | None
                       ) -> tuple[list[Setting], list[Setting]]:
    """Split settings into those the target runs at this OS and those it does not (modes)."""
    from .engine import _missing_modes

    from .deployment import Deployment

    supported = Deployment.resolve(k, target, os, check=False).supported
    keep, drop = [], []
    for s in grid:
        if s.is_fp16:
            keep.append(s)
            continue
        (drop if _missing_modes(k, s.technique, s.p, supported) else keep).append(s)
    return keep, drop


# ------------------------------------------------------------------ ranking and proxy quality
def layer_scores(meas: list[Measurement], value: Callable[[Measurement], float]) -> dict[str, float]:
    """Per-layer sensitivity relative to the other layers, comparable when layers were measured
    with different settings (a playbook can allow 8 bits only on one layer, 4 on another).

    For each setting measured on 2+ layers, a layer's `value` is divided by the median layer's
    at that setting; a layer's score is the geometric mean of those ratios. Comparing raw
    values across different settings would call a layer insensitive just because it was only
    tried at 8 bits. When every layer shares every setting, the order is that of the geometric
    mean of the raw values.
    """
    by_setting: dict[str, list[Measurement]] = {}
    for m in meas:
        v = value(m)
        if v == v:  # NaN: not computed for this pair
            by_setting.setdefault(m.setting, []).append(m)
    ratios: dict[str, list[float]] = {}
    for group in by_setting.values():
        if len({m.layer for m in group}) < 2:
            continue
        med = _median([max(value(m), 1e-30) for m in group])
        for m in group:
            ratios.setdefault(m.layer, []).append(max(value(m), 1e-30) / med)
    # A layer measured only at settings no other layer was has nothing to be compared with: left out.
    return {layer: _geomean(v) for layer, v in ratios.items()}


def _geomean(xs: list[float]) -> float:
    xs = [max(x, 1e-30) for x in xs if x == x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else 0.0


def rank_layers(meas: list[Measurement], report: ModelReport) -> list[LayerRank]:
    scores = layer_scores(meas, lambda m: m.metrics["output_mse"])
    if not scores:
        return []
    med = _median(list(scores.values())) or 1e-30
    info = {x.name: x for x in report.layers}
    ordered = sorted(scores.items(), key=lambda kv: -kv[1])
    return [LayerRank(layer=name, type=info[name].type, params=info[name].params, score=s,
                      vs_median=s / med if med > 0 else float("inf"), rank=i + 1)
            for i, (name, s) in enumerate(ordered)]


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    if not ys:
        return 0.0
    mid = len(ys) // 2
    return ys[mid] if len(ys) % 2 else 0.5 * (ys[mid - 1] + ys[mid])


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for kk in range(i, j + 1):
            ranks[order[kk]] = (i + j) / 2.0
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 pairs."""
    pairs = [(x, y) for x, y in zip(a, b) if x == x and y == y]
    if len(pairs) < 3:
        return None
    ra, rb = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va > 0 and vb > 0 else None


def proxy_quality(meas: list[Measurement], ranking: list[LayerRank]) -> list[ProxyQuality]:
    truth = {r.layer: r.score for r in ranking}
    out = []
    for proxy in PROXIES:
        if not any(m.proxies.get(proxy) == m.proxies.get(proxy) for m in meas):
            continue  # not available (e.g. no labels for the Fisher proxy)
        scores = layer_scores(meas, lambda m: m.proxies.get(proxy, float("nan")))
        layers = [x for x in truth if x in scores]
        rho = spearman([truth[x] for x in layers], [scores[x] for x in layers])
        per: list[float] = []
        by_setting: dict[str, list[Measurement]] = {}
        for m in meas:
            by_setting.setdefault(m.setting, []).append(m)
        for group in by_setting.values():
            r = spearman([m.metrics["output_mse"] for m in group], [m.proxies.get(proxy, float("nan")) for m in group])
            if r is not None:
                per.append(r)
        top = max(scores, key=scores.get) == ranking[0].layer if scores and ranking else None
        pairs = spearman([m.metrics["output_mse"] for m in meas], [m.proxies.get(proxy, float("nan")) for m in meas])
        out.append(ProxyQuality(proxy=proxy, layer_rank_spearman=rho,
                                per_setting_spearman=sum(per) / len(per) if per else None,
                                top1_match=top, pairs_spearman=pairs))
    return out


callable_module(__name__)  # `compressadvise.sensitivity(...)` works even once this module is imported
