"""Verify a compressed model against the original: fidelity, accuracy, slices, drift, latency, size.

The judge for `apply` and for search: both models run on the same real samples, latency is
measured interleaved on this machine, target latency is a labelled roofline estimate, and every
budget gets a verdict saying what it was checked against ("measured" or "estimate").
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

from pydantic import Field

from ._callable import callable_module
from . import metrics as M
from .errors import BadModel, CompressAdviseError, InputNotFound
from .estimate import LayerCompression, ModelEstimate
from .latency import LatencyReport, Timing
from .loading import LoadedModel, import_callable, load_model
from .metrics import ResultModel
from .samples import InvalidSamples, Samples, load_samples, random_samples

if TYPE_CHECKING:
    import torch

DRIFT_THRESHOLD_DB = 30.0  # below this a layer's output is called degraded
ACCURACY_KEY = "accuracy"


class EvaluatorFailed(InvalidSamples):
    """The user's evaluator raised or returned something that is not a dict of numbers (exit 6)."""


# ------------------------------------------------------------------ result schema
class Budgets(ResultModel):
    max_accuracy_drop: float | None = Field(None, description="points (percentage points of accuracy)")
    max_latency_ms: float | None = None
    max_size_mb: float | None = Field(None, description="MB = 10^6 bytes")


class BudgetVerdict(ResultModel):
    name: str
    limit: float | None = None
    value: float | None = None
    unit: str = ""
    basis: str = Field(description="what the value is: measured here, measured on device, estimate, proxy")
    passed: bool
    detail: str = ""


class ModelSide(ResultModel):
    source: str
    format: str
    sha256: str = ""
    size_bytes: int | None = None
    size_basis: str = ""
    mlpackage: str | None = None


class SamplesInfo(ResultModel):
    source: str
    kind: Literal["file", "bundled", "random"]
    count: int
    input_shapes: list[list[int]]
    has_labels: bool
    has_slices: bool


class OutputFidelity(ResultModel):
    name: str
    shape: list[int]
    kind: M.OutputKind
    kind_source: Literal["auto", "override"]
    metrics: dict[str, float]
    nonfinite: int = Field(0, description="NaN/inf values in the compressed model's output")


class MetricRow(ResultModel):
    name: str
    original: float
    compressed: float
    delta: float = Field(description="compressed - original")
    unit: str = ""
    higher_is_better: bool = True


class SliceRow(ResultModel):
    name: str
    count: int
    original: float
    compressed: float
    change: float


class SliceReport(ResultModel):
    by: Literal["class", "slice"]
    metric: str
    rows: list[SliceRow]
    worst: str | None = Field(None, description="slice with the largest drop; None when none dropped")
    worst_change: float | None = None


class LayerDrift(ResultModel):
    name: str
    module: str
    snr_db: float
    cosine: float
    rel_error: float


class DriftReport(ResultModel):
    samples: int
    threshold_db: float
    layers: list[LayerDrift] = []
    first_error: str | None = Field(None, description="first layer (execution order) whose output differs")
    first_degraded: str | None = Field(None, description="first layer below threshold_db")
    worst: str | None = None
    note: str = ""


class CoreMLInfo(ResultModel):
    available: bool
    note: str = ""
    compute_units: str | None = None
    timing: Timing | None = None


class VerifyResult(ResultModel):
    original: ModelSide
    compressed: ModelSide
    samples: SamplesInfo
    fidelity: list[OutputFidelity]
    accuracy: list[MetricRow] = Field([], description="measured task metrics from the sample labels")
    evaluator: list[MetricRow] = Field([], description="measured metrics from the user's evaluator")
    slices: list[SliceReport] = []
    drift: DriftReport | None = None
    latency: LatencyReport | None = None
    coreml: CoreMLInfo | None = None
    estimate: dict[str, ModelEstimate] | None = Field(None, description="target roofline, 'original'/'compressed'")
    target_size_bytes: dict[str, float] | None = Field(None, description="estimate: weight bytes on the target")
    budgets: list[BudgetVerdict] = []
    passed: bool = True
    warnings: list[str] = []

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def missed(self) -> list[BudgetVerdict]:
        return [b for b in self.budgets if not b.passed]


# ------------------------------------------------------------------ model resolution
@dataclass
class _Side:
    loaded: LoadedModel
    fn: Callable
    graph: Any = None  # nn.Module or fx GraphModule for per-layer hooks
    mlpackage: str | None = None
    size_bytes: int | None = None
    size_basis: str = ""
    plan: Any = None
    notes: list[str] = field(default_factory=list)

    def info(self) -> ModelSide:
        return ModelSide(source=self.loaded.source, format=self.loaded.format, sha256=self.loaded.sha256,
                         size_bytes=self.size_bytes, size_basis=self.size_basis, mlpackage=self.mlpackage)


def disk_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _serialised_size(module: Any) -> int | None:
    import torch

    try:
        buf = io.BytesIO()
        torch.save(module.state_dict(), buf)
        return buf.tell()
    except Exception:  # exotic tensor subclasses: size unknown rather than wrong
        return None


def _from_module(module: Any) -> LoadedModel:
    from .loading import _tensor_hash

    try:
        digest = _tensor_hash(module.state_dict().items())
    except Exception:  # quantized tensor subclasses have no plain bytes to hash
        digest = ""
    return LoadedModel(source=f"in-memory {type(module).__name__}", format="module", sha256=digest,
                       has_graph=True, module=module.eval())


def _apply_dir(path: Path, trust_pickle: bool, named: str | None = None) -> tuple[LoadedModel, str | None, Any, Path]:
    """An `apply` output folder: manifest.json names the torch artifact and the .mlpackage.
    `named`: the model spec the caller gave, the only factory a state-dict artefact may import."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise InputNotFound(f"{path} is a directory without manifest.json (not an `apply` output)",
                            hint="pass a model file or an apply output folder")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise BadModel(f"{manifest_path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise BadModel(f"{manifest_path}: unreadable manifest (not a JSON object)")
    _refuse_manifest_code(manifest, path, named)
    artifact = manifest.get("torch_artifact")
    loaded = None
    try:
        from .apply import load_artifact  # written by `apply`; preferred when present
    except ImportError:
        load_artifact = None
    if load_artifact is not None:
        loaded = load_artifact(path, factory=named)
    elif artifact:
        loaded = load_model(path / artifact, trust_pickle=trust_pickle)
    if loaded is None:
        raise BadModel(f"{manifest_path}: names no torch_artifact to run")
    mlpackage = manifest.get("mlpackage")
    mlpath = str(path / mlpackage) if mlpackage and (path / mlpackage).exists() else None
    plan = None
    plan_file = manifest.get("plan") or ("plan.yaml" if (path / "plan.yaml").is_file() else None)
    if plan_file and (path / plan_file).is_file():
        from .plan import load_plan

        try:
            plan = load_plan(path / plan_file)
        except CompressAdviseError:
            plan = None
    file = path / artifact if artifact and (path / artifact).exists() else path
    return loaded, mlpath, plan, file


def _refuse_manifest_code(manifest: dict[str, Any], path: Path, named: str | None) -> None:
    """A state-dict artefact is rebuilt by the factory its manifest names (apply.load_artifact):
    import it only when the user named that same factory; a written file never chooses code."""
    if manifest.get("torch_format") != "state_dict":
        return
    given = manifest.get("input")
    if not isinstance(given, dict):
        raise BadModel(f"{path / 'manifest.json'}: the torch artefact is a state dict and 'input' does not "
                       "say which model to rebuild it into")
    source = str(given.get("source") or "")
    if given.get("format") == "factory" and source != named:
        import shlex

        raise BadModel(f"{path}: its torch artefact is a state dict rebuilt by the Python factory {source} "
                       "that manifest.json names; a file the tool wrote never chooses code to import",
                       hint=f"pass the model on the command line: `compressadvise verify {shlex.quote(source)} "
                       f"{shlex.quote(str(path))}`")


def _named_spec(model: Any) -> str | None:
    """The spec of a model the caller gave (a string, or a factory it loaded itself)."""
    if isinstance(model, LoadedModel):
        return model.source if model.format == "factory" else None
    return str(model) if isinstance(model, (str, os.PathLike)) else None


def _resolve(model: Any, trust_pickle: bool, named: str | None = None) -> _Side:
    import torch

    mlpackage = plan = None
    size: int | None = None
    basis = ""
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, torch.nn.Module):
        loaded = _from_module(model)
    elif model is not None and str(model) != "bundled" and Path(str(model)).is_dir():
        loaded, mlpackage, plan, file = _apply_dir(Path(str(model)), trust_pickle, named)
        if file.is_file():
            size, basis = disk_size(file), "torch artifact on disk (measured)"
    else:
        loaded = load_model(model, trust_pickle=trust_pickle)
    fn = loaded.runnable()
    if fn is None:
        raise BadModel(f"{loaded.source} holds weights only ({loaded.format}): verify needs a model it can run",
                       hint="pass module:function, a TorchScript archive or a torch.export .pt2")
    graph = loaded.module if loaded.module is not None else (fn if loaded.exported is not None else None)
    if size is None:
        size, basis = _model_size(loaded)
    if mlpackage:
        size, basis = disk_size(mlpackage), "Core ML package on disk (measured)"
    return _Side(loaded, fn, graph, mlpackage, size, basis, plan)


def _model_size(loaded: LoadedModel) -> tuple[int | None, str]:
    if loaded.format == "bundled":
        from .examples import digits

        return disk_size(digits.WEIGHTS), "bundled weights file on disk, fp32 (measured)"
    if Path(loaded.source).is_file():
        return disk_size(loaded.source), "file on disk (measured)"
    if loaded.module is not None:
        size = _serialised_size(loaded.module)
        return size, "serialised state dict (measured)" if size is not None else "unknown"
    return None, "unknown"


# ------------------------------------------------------------------ running the models
def flatten_outputs(out: Any, prefix: str = "output") -> dict[str, "torch.Tensor"]:
    """Name every tensor in a model's output: output, output_0, output.logits ..."""
    import torch

    if isinstance(out, torch.Tensor):
        return {prefix: out}
    if isinstance(out, dict) or hasattr(out, "items"):
        found: dict[str, torch.Tensor] = {}
        for k, v in out.items():
            found.update(flatten_outputs(v, f"{prefix}.{k}" if prefix != "output" else str(k)))
        return found
    if isinstance(out, (list, tuple)):
        found = {}
        for i, v in enumerate(out):
            found.update(flatten_outputs(v, f"{prefix}_{i}"))
        return found
    return {}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


def run_model(fn: Callable, samples: Samples, batch_size: int = 64, name: str = "model"
              ) -> dict[str, "torch.Tensor"]:
    """All outputs on all samples, batched; falls back to one sample at a time (static shapes)."""
    import torch

    n = len(samples)
    size = max(1, min(batch_size, n))
    chunks: list[dict[str, torch.Tensor]] = []
    start = 0
    with torch.inference_mode():
        while start < n:
            try:
                out = fn(*samples.batch(start, start + size))
            except Exception as e:
                if size > 1 and start == 0:
                    size = 1  # e.g. an exported program traced at batch size 1
                    continue
                raise InvalidSamples(
                    f"{name} failed on samples {start}..{start + size - 1} with input shape(s) "
                    f"{[list(t.shape) for t in samples.batch(start, start + size)]}: {_first_line(e)}",
                    hint="check that the samples match the model's expected input") from e
            flat = flatten_outputs(out)
            if not flat:
                raise BadModel(f"{name} returned {type(out).__name__}, no tensors to compare")
            chunks.append({k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in flat.items()})
            start += size
    return {k: torch.cat([c[k] for c in chunks]) if chunks[0][k].dim() else chunks[0][k] for k in chunks[0]}


def _check_structure(a: dict[str, "torch.Tensor"], b: dict[str, "torch.Tensor"]) -> None:
    if list(a) != list(b):
        raise BadModel(f"the models differ in output structure: original gives {list(a)}, compressed gives {list(b)}",
                       hint="compare models with the same outputs")
    for k in a:
        if a[k].shape != b[k].shape:
            raise BadModel(f"output {k!r} differs in shape: original {list(a[k].shape)}, "
                           f"compressed {list(b[k].shape)}")


def _nonfinite(t: "torch.Tensor") -> int:
    import torch

    return int((~torch.isfinite(t)).sum()) if t.is_floating_point() else 0


def parse_metric_overrides(items: dict[str, str] | list[str] | None) -> dict[str, M.OutputKind]:
    """`OUTPUT=METRIC` pairs (or a dict) into {output: kind}; metric names map to their kind."""
    from .errors import InvalidKnowledge

    if not items:
        return {}
    pairs = items.items() if isinstance(items, dict) else [i.partition("=")[::2] for i in items]
    out: dict[str, M.OutputKind] = {}
    for name, metric in pairs:
        kind = M.METRIC_ALIASES.get(str(metric).strip().lower())
        if not name or kind is None:
            raise InvalidKnowledge(f"bad metric override {name}={metric}",
                                   hint=f"use OUTPUT=METRIC with METRIC one of {', '.join(M.METRIC_ALIASES)}")
        out[name.strip()] = kind
    return out


def fidelity_report(ref: dict[str, "torch.Tensor"], test: dict[str, "torch.Tensor"],
                    overrides: dict[str, M.OutputKind]) -> list[OutputFidelity]:
    from .errors import InvalidKnowledge

    unknown = [k for k in overrides if k not in ref]
    if unknown:
        raise InvalidKnowledge(f"--metric names unknown output(s) {unknown}", hint=f"outputs: {', '.join(ref)}")
    rows = []
    for name, r in ref.items():
        t = test[name]
        kind = overrides.get(name) or M.choose_kind(r)
        bad = _nonfinite(t)
        rows.append(OutputFidelity(name=name, shape=list(r.shape), kind=kind,
                                   kind_source="override" if name in overrides else "auto",
                                   metrics=M.fidelity(r, t, kind), nonfinite=bad))
    return rows


# ------------------------------------------------------------------ accuracy and slices
def _logits_output(outs: dict[str, "torch.Tensor"], labels: "torch.Tensor") -> str | None:
    for name, t in outs.items():
        if t.is_floating_point() and t.dim() == 2 and t.shape[0] == labels.shape[0] and t.shape[1] > 1:
            return name
    return None


def check_labels(labels: "torch.Tensor | None", outputs: dict[str, "torch.Tensor"], source: str) -> None:
    """Class labels must index the model's classes: one outside 0..C-1 is never predicted, so
    accuracy would read 0% before and after and an accuracy budget would pass on nothing."""
    import torch

    if labels is None or labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        return
    name = _logits_output(outputs, labels)
    if name is None:
        return  # the output width is unknown: nothing to check against
    classes = int(outputs[name].shape[1])
    bad = ((labels < 0) | (labels >= classes)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise InvalidSamples(f"{source}: label {int(labels[i])} at sample {i} is not one of the model's {classes} "
                             f"classes (output {name!r} has {classes} columns; {bad.numel()} label(s) out of range)",
                             hint=f"labels must be class indices 0..{classes - 1}")


def accuracy_rows(ref: dict[str, "torch.Tensor"], test: dict[str, "torch.Tensor"],
                  labels: "torch.Tensor") -> tuple[list[MetricRow], str | None]:
    """Top-1/top-5 for class labels, MSE for float targets; (rows, output used)."""
    rows: list[MetricRow] = []
    if not labels.is_floating_point():
        name = _logits_output(ref, labels)
        if name is None:
            return [], None
        a, b = ref[name], test[name]
        for k in (1, 5):
            if k > 1 and a.shape[1] <= k:
                break
            o, c = M.topk_accuracy(a, labels, k), M.topk_accuracy(b, labels, k)
            rows.append(MetricRow(name=f"top-{k} accuracy", original=o, compressed=c, delta=c - o, unit="%"))
        return rows, name
    for name, t in ref.items():
        if t.shape == labels.shape:
            o, c = M.mse(t, labels), M.mse(test[name], labels)
            rows.append(MetricRow(name="MSE", original=o, compressed=c, delta=c - o, higher_is_better=False))
            return rows, name
    return [], None


def slice_report(by: Literal["class", "slice"], groups: list[str], ref: "torch.Tensor", test: "torch.Tensor",
                 labels: "torch.Tensor | None") -> SliceReport:
    """Per-group top-1 accuracy (with labels) or top-1 agreement with the original (without)."""
    import torch

    order = list(dict.fromkeys(groups))
    idx = {g: torch.tensor([i for i, x in enumerate(groups) if x == g]) for g in order}
    rows = []
    for g in order:
        sel = idx[g]
        if labels is not None:
            o = M.topk_accuracy(ref[sel], labels[sel], 1)
            c = M.topk_accuracy(test[sel], labels[sel], 1)
        else:
            o, c = 100.0, 100.0 * M.top1_agreement(ref[sel], test[sel])
        rows.append(SliceRow(name=g, count=len(sel), original=o, compressed=c, change=c - o))
    rows.sort(key=lambda r: (r.change, r.compressed, r.name))
    worst = rows[0] if rows and rows[0].change < 0 else None
    metric = "top-1 accuracy %" if labels is not None else "top-1 agreement with the original %"
    return SliceReport(by=by, metric=metric, rows=rows, worst=worst.name if worst else None,
                       worst_change=worst.change if worst else None)


def _slices(samples: Samples, ref: dict, test: dict, labels: "torch.Tensor | None") -> list[SliceReport]:
    out = []
    name = _logits_output(ref, labels) if labels is not None and not labels.is_floating_point() else None
    if name is not None:
        names = samples.class_names
        groups = [names[i] if names and 0 <= i < len(names) else str(i) for i in labels.tolist()]
        out.append(slice_report("class", groups, ref[name], test[name], labels))
    if samples.slices is not None:
        if name is None:
            name = next((k for k, t in ref.items() if M.choose_kind(t) == "logits"), None)
            labels = None if name is None or labels is None or labels.is_floating_point() else labels
        if name is not None:
            out.append(slice_report("slice", samples.slices, ref[name], test[name], labels))
    return out


# ------------------------------------------------------------------ user evaluator
@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """User code's prints go to stderr while it runs: stdout carries --json and must stay
    parseable. Both sys.stdout and file descriptor 1 (C extensions, subprocesses) move."""
    real = sys.stdout
    if real is not None:
        real.flush()
    try:
        saved: int | None = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 to move (closed)
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if real is not None:
            real.flush()  # what it wrote to sys.__stdout__ directly still goes to stderr
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _evaluator_name(func: Callable) -> str:
    mod, name = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    return f"{mod}:{name}" if mod and name else repr(func)


def load_evaluator(spec: str | Callable) -> Callable:
    if callable(spec):
        return spec
    try:
        with _stdout_to_stderr():  # a module that prints as it imports
            return import_callable(str(spec), "evaluator")
    except SystemExit as e:  # its exit code is not ours to report
        raise EvaluatorFailed(f"evaluator {spec} called exit({e.code!r}) while being imported") from e


def run_evaluator(func: Callable, model: Any, which: str) -> dict[str, float]:
    name = _evaluator_name(func)
    try:
        with _stdout_to_stderr():
            result = func(model)
    except SystemExit as e:  # sys.exit() inside the evaluator: its failure (exit 6), not our exit code
        raise EvaluatorFailed(f"evaluator {name} called exit({e.code!r}) on the {which} model",
                              hint="return a dict of metrics instead of exiting") from e
    except Exception as e:
        raise EvaluatorFailed(f"evaluator {name} raised {type(e).__name__} on the {which} model: "
                              f"{_first_line(e)}") from e
    if not isinstance(result, dict) or not result:
        raise EvaluatorFailed(f"evaluator {name} returned {type(result).__name__} for the {which} model; "
                              "it must return a non-empty dict of metric name -> number")
    out = {}
    for k, v in result.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise EvaluatorFailed(f"evaluator {name} metric {k!r} is {type(v).__name__}, not a number") from None
    return out


def evaluator_rows(o: dict[str, float], c: dict[str, float]) -> list[MetricRow]:
    return [MetricRow(name=k, original=o[k], compressed=c[k], delta=c[k] - o[k]) for k in o if k in c]


# ------------------------------------------------------------------ per-layer drift
def capture_layers(graph: Any, inputs: tuple, exported: bool) -> dict[str, tuple[str, "torch.Tensor"]]:
    """Each leaf module's output (module path -> (class, tensor)), in execution order."""
    import torch

    found: dict[str, tuple[str, torch.Tensor]] = {}
    if exported:
        return _capture_graph(graph, inputs)
    hooks = []
    for name, mod in graph.named_modules():
        if name and not any(True for _ in mod.children()):
            def hook(m, _i, out, name=name):
                if isinstance(out, torch.Tensor) and name not in found:
                    found[name] = (type(m).__name__, out.detach().float())
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            graph(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


def _capture_graph(gm: Any, inputs: tuple) -> dict[str, tuple[str, "torch.Tensor"]]:
    """Exported programs: the last node of each module (its output), via an fx Interpreter."""
    import torch
    from torch.fx import Interpreter

    found: dict[str, tuple[str, torch.Tensor]] = {}

    class Recorder(Interpreter):
        def run_node(self, n):  # noqa: ANN001 - fx API
            value = super().run_node(n)
            stack = n.meta.get("nn_module_stack")
            if stack and isinstance(value, torch.Tensor):
                path, cls = list(stack.values())[-1]
                cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                found.pop(path, None)  # re-insert so the order follows each module's last node
                found[path] = (cls_name.rsplit(".", 1)[-1], value.detach().float())
            return value

    with torch.inference_mode():
        Recorder(gm).run(*inputs)
    return found


def _run_capture(side: _Side, samples: Samples, batch_size: int) -> dict[str, tuple[str, "torch.Tensor"]]:
    import torch

    exported = side.loaded.exported is not None and side.loaded.module is None
    size = 1 if exported else max(1, min(batch_size, len(samples)))
    parts: list[dict[str, tuple[str, torch.Tensor]]] = []
    for start in range(0, len(samples), size):
        parts.append(capture_layers(side.graph, samples.batch(start, start + size), exported))
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    return {k: (parts[0][k][0], torch.cat([p[k][1] for p in parts])) for k in keys}


def drift_report(orig: _Side, comp: _Side, samples: Samples, batch_size: int = 64,
                 threshold_db: float = DRIFT_THRESHOLD_DB) -> DriftReport:
    """Compare hooked layer outputs of both models on the same inputs: where error starts, how it grows."""
    n = len(samples)
    missing = [s.loaded.source for s in (orig, comp) if s.graph is None]
    if missing:
        return DriftReport(samples=n, threshold_db=threshold_db,
                           note=f"per-layer drift needs eager modules or exported programs; not available for {', '.join(missing)} (TorchScript)")
    try:
        a = _run_capture(orig, samples, batch_size)
        b = _run_capture(comp, samples, batch_size)
    except Exception as e:  # drift is a diagnostic: never fail the verdict over it
        return DriftReport(samples=n, threshold_db=threshold_db, note=f"per-layer drift unavailable: {_first_line(e)}")
    rows = []
    for name, (cls, ra) in a.items():
        if name not in b or b[name][1].shape != ra.shape:
            continue
        rb = b[name][1]
        rel = float((ra - rb).norm() / ra.norm().clamp_min(1e-30))
        rows.append(LayerDrift(name=name, module=cls, snr_db=M.snr(ra, rb), cosine=M.cosine_similarity(ra, rb),
                               rel_error=rel))
    note = "" if rows else "no layer names in common: drift needs the same module structure in both models"
    first_err = next((r.name for r in rows if math.isfinite(r.snr_db)), None)
    first_bad = next((r.name for r in rows if r.snr_db < threshold_db), None)
    worst = min(rows, key=lambda r: r.snr_db).name if rows and first_err else None
    return DriftReport(samples=n, threshold_db=threshold_db, layers=rows, first_error=first_err,
                       first_degraded=first_bad, worst=worst, note=note)


# ------------------------------------------------------------------ estimates and budgets
def _estimates(orig: _Side, comp: _Side, samples: Samples, target: str, os_version: int | None,
               calibration: Any, plan: Any) -> tuple[dict[str, ModelEstimate], dict[str, float], list[str]]:
    from .analysis import analyze
    from .estimate import calibrate, detect_compression, from_plan, load_calibration, roofline
    from .knowledge import builtin

    k = builtin()
    tgt = k.target(target)
    shape = [1, *samples.inputs[0].shape[1:]]
    report = analyze(orig.loaded, input_shape=shape, stats=False)
    notes = []
    plan = plan or comp.plan
    if plan is not None and getattr(plan, "layers", None):
        comp_layers = from_plan(plan.layers, k)
        notes.append("compressed weight bytes per layer from the plan (estimates)")
    else:
        comp_layers = detect_compression(comp.graph, report, tgt.baseline_bytes_per_param)
        if not comp_layers:
            notes.append("no compression detected in the compressed model's weights: "
                         "its target estimate equals the original's")
    e_orig = roofline(report, tgt, os_version)
    e_comp = roofline(report, tgt, os_version, comp_layers)
    if calibration is not None:
        cal = calibration if not isinstance(calibration, (str, os.PathLike)) else load_calibration(calibration)
        e_orig, e_comp = calibrate(e_orig, e_comp, cal)
    sizes = {"original": _target_bytes(report, {}, tgt.baseline_bytes_per_param),
             "compressed": _target_bytes(report, comp_layers, tgt.baseline_bytes_per_param)}
    return {"original": e_orig, "compressed": e_comp}, sizes, notes


def _target_bytes(report: Any, comp: dict[str, LayerCompression], baseline: float) -> float:
    in_layers = sum(x.params for x in report.layers)
    total = (report.total_params - in_layers) * baseline
    for x in report.layers:
        total += comp[x.name].bytes if x.name in comp else x.params * baseline
    return total


def _accuracy_verdict(limit: float, result: VerifyResult) -> BudgetVerdict:
    primary = next((r for r in result.evaluator if r.name == ACCURACY_KEY), result.evaluator[0] if result.evaluator else None)
    if primary is not None:
        drop = primary.original - primary.compressed
        return BudgetVerdict(name="accuracy drop", limit=limit, value=drop, unit="points",
                             basis=f"measured: evaluator metric {primary.name!r}", passed=drop <= limit)
    top1 = next((r for r in result.accuracy if r.name == "top-1 accuracy"), None)
    if top1 is not None:
        drop = top1.original - top1.compressed
        return BudgetVerdict(name="accuracy drop", limit=limit, value=drop, unit="points",
                             basis="measured: top-1 on the labelled samples", passed=drop <= limit)
    agree = next((f for f in result.fidelity if "top1_agreement" in f.metrics), None)
    if agree is not None:
        drop = 100.0 * (1.0 - agree.metrics["top1_agreement"])
        return BudgetVerdict(name="accuracy drop", limit=limit, value=drop, unit="points",
                             basis="proxy: top-1 disagreement with the original (no labels)", passed=drop <= limit,
                             detail="an upper bound on the top-1 drop; pass labels or --eval for the real figure")
    return BudgetVerdict(name="accuracy drop", limit=limit, basis="not measurable", passed=False,
                         detail="no labels, no evaluator and no classification output: pass --eval module:function")


def _latency_verdict(limit: float, result: VerifyResult) -> BudgetVerdict:
    if result.coreml is not None and result.coreml.timing is not None:
        v = result.coreml.timing.median_ms
        basis = f"measured: Core ML {result.coreml.compute_units} median on this Mac"
    elif result.estimate is not None and result.estimate["compressed"].total_ms > 0:
        e = result.estimate["compressed"]
        v, basis = e.total_ms, f"estimate: roofline for {e.target} (iOS {e.os})"
    elif result.latency is not None and result.latency.best("compressed") is not None:
        t = result.latency.best("compressed")
        v, basis = t.median_ms, f"measured: {t.mode} median on this machine ({result.latency.device}, {result.latency.threads} threads)"
    else:
        return BudgetVerdict(name="latency", limit=limit, unit="ms", basis="not measured", passed=False,
                             detail="latency was not measured (--no-latency) and no target estimate exists")
    return BudgetVerdict(name="latency", limit=limit, value=v, unit="ms", basis=basis, passed=v <= limit)


def _size_verdict(limit: float, result: VerifyResult) -> BudgetVerdict:
    side = result.compressed
    if side.mlpackage is None and result.target_size_bytes is not None:
        v, basis = result.target_size_bytes["compressed"] / 1e6, "estimate: weights on the target"
    elif side.size_bytes is not None:
        v, basis = side.size_bytes / 1e6, side.size_basis
    else:
        return BudgetVerdict(name="size", limit=limit, unit="MB", basis="not measured", passed=False,
                             detail="the compressed model's size is unknown")
    return BudgetVerdict(name="size", limit=limit, value=v, unit="MB", basis=basis, passed=v <= limit)


def judge(result: VerifyResult, budgets: Budgets) -> VerifyResult:
    """Fill the verdicts and `passed` from the measured/estimated figures."""
    verdicts = []
    if budgets.max_accuracy_drop is not None:
        verdicts.append(_accuracy_verdict(budgets.max_accuracy_drop, result))
    if budgets.max_latency_ms is not None:
        verdicts.append(_latency_verdict(budgets.max_latency_ms, result))
    if budgets.max_size_mb is not None:
        verdicts.append(_size_verdict(budgets.max_size_mb, result))
    bad = [f for f in result.fidelity if f.nonfinite]
    if bad:
        verdicts.append(BudgetVerdict(name="finite outputs", value=float(sum(f.nonfinite for f in bad)),
                                      unit="NaN/inf values", basis="measured", passed=False,
                                      detail=f"the compressed model outputs NaN/inf in {', '.join(f.name for f in bad)}"))
    result.budgets = verdicts
    result.passed = all(v.passed for v in verdicts)
    return result


# ------------------------------------------------------------------ the entry point
def _budgets(budgets: Any) -> Budgets:
    """Budgets, a dict (None = no budget, 0 = a strict zero), or a plan's Constraints (0 = none)."""
    if budgets is None:
        return Budgets()
    if isinstance(budgets, Budgets):
        return budgets
    if isinstance(budgets, dict):
        return Budgets(**budgets)
    names = ("max_accuracy_drop", "max_latency_ms", "max_size_mb")
    return Budgets(**{k: (getattr(budgets, k, 0.0) or None) for k in names})


def _samples(samples: Any, orig: _Side) -> Samples:
    if isinstance(samples, Samples):
        return samples
    if samples is not None:
        return load_samples(samples)
    if orig.loaded.format == "bundled":
        return load_samples("bundled")
    return random_samples(orig.loaded.example_inputs)


def _labels(labels: Any, samples: Samples) -> "torch.Tensor | None":
    import torch

    if labels is None:
        return samples.labels
    t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    if t.dim() == 0 or t.shape[0] != len(samples):
        raise InvalidSamples(f"{t.shape[0] if t.dim() else 0} labels for {len(samples)} samples")
    return t


def verify(
    original: Any = None,
    compressed: Any = None,
    *,
    samples: Any = None,
    labels: Any = None,
    evaluator: str | Callable | None = None,
    target: str | None = None,
    os: int | None = None,
    budgets: Any = None,
    latency: bool = True,
    compile: bool = False,
    reps: int = 30,
    warmup: int = 5,
    metrics: dict[str, str] | list[str] | None = None,
    plan: Any = None,
    calibration: Any = None,
    compute_units: str = "ALL",
    batch_size: int = 64,
    drift: bool = True,
    drift_samples: int = 64,
    trust_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Compare `compressed` with `original` on samples and judge the budgets.

    original/compressed: LoadedModel, nn.Module, model path, `apply` output folder, or
    None/"bundled" for the bundled example (an `apply` folder holding a state dict is rebuilt
    by the factory its manifest names only when `original` is that same factory).
    samples: Samples, a sample file or folder, "bundled", or None (bundled samples for the
    bundled model, else random inputs with a warning). evaluator: `module:function` (or a
    callable) receiving the model and returning a dict of metrics; its `accuracy` key (else
    the first) feeds the accuracy budget, in points.
    """
    say = progress or (lambda _msg: None)
    budget = _budgets(budgets)
    overrides = parse_metric_overrides(metrics)
    if compressed is None:
        raise InputNotFound("no compressed model given", hint="verify ORIGINAL COMPRESSED")
    say("loading models")
    orig = _resolve(original, trust_pickle)
    comp = _resolve(compressed, trust_pickle, named=_named_spec(original))  # its factory, if any, is the user's
    smp = _samples(samples, orig)
    lab = _labels(labels, smp)
    warnings = list(smp.warnings)
    if target is not None:
        from .knowledge import builtin

        builtin().target(target)  # fail fast on an unknown name
    func = load_evaluator(evaluator) if evaluator is not None else None

    say(f"running both models on {len(smp)} samples")
    ref = run_model(orig.fn, smp, batch_size, "the original model")
    bad = sum(_nonfinite(t) for t in ref.values())
    if bad:
        raise BadModel(f"the original model outputs {bad} NaN/inf value(s) on these samples: "
                       "fidelity cannot be measured against it", hint="check the samples' scaling and dtype")
    check_labels(lab, ref, smp.source if labels is None else "labels")
    test = run_model(comp.fn, smp, batch_size, "the compressed model")
    _check_structure(ref, test)
    fid = fidelity_report(ref, test, overrides)
    if any(f.nonfinite for f in fid):
        warnings.append("the compressed model outputs NaN/inf: its metrics are not meaningful")
    acc, _ = accuracy_rows(ref, test, lab) if lab is not None else ([], None)
    if lab is not None and not acc:
        warnings.append("labels given but no output fits them (class logits or an output shaped like the labels)")
    result = VerifyResult(
        original=orig.info(), compressed=comp.info(),
        samples=SamplesInfo(source=smp.source, kind=smp.kind, count=len(smp), input_shapes=smp.shapes(),
                            has_labels=lab is not None, has_slices=smp.slices is not None),
        fidelity=fid, accuracy=acc, slices=_slices(smp, ref, test, lab), warnings=warnings)
    if func is not None:
        say("running the evaluator")
        result.evaluator = evaluator_rows(run_evaluator(func, orig.fn, "original"),
                                          run_evaluator(func, comp.fn, "compressed"))
    if drift:
        say("comparing layer outputs (drift)")
        result.drift = drift_report(orig, comp, smp.subset(min(drift_samples, len(smp))), batch_size)
    if latency:
        from .latency import measure

        say("timing both models (interleaved)")
        result.latency = measure({"original": orig.fn, "compressed": comp.fn}, smp.batch(0, 1),
                                 reps=reps, warmup=warmup, compile=compile)
    result.coreml = _coreml(comp, smp, target, compute_units)
    if target is not None:
        say("estimating target latency")
        result.estimate, result.target_size_bytes, notes = _estimates(orig, comp, smp, target, os, calibration, plan)
        result.estimate["compressed"].notes.extend(notes)
    return judge(result, budget)


def _coreml(comp: _Side, smp: Samples, target: str | None, compute_units: str) -> CoreMLInfo | None:
    """Time the .mlpackage on a Mac; elsewhere say plainly that on-device timing is unavailable."""
    from .latency import coreml_available, coreml_timing

    if comp.mlpackage is None and target is None:
        return None
    ok, why = coreml_available()
    if not ok:
        return CoreMLInfo(available=False, note=why)
    if comp.mlpackage is None:
        return CoreMLInfo(available=True, note="no .mlpackage to time (the apply output has none)")
    import coremltools as ct

    spec = ct.models.MLModel(comp.mlpackage, skip_model_load=True).get_spec()
    names = [i.name for i in spec.description.input]
    feed = {n: t.numpy() for n, t in zip(names, smp.batch(0, 1))}
    timing = coreml_timing(comp.mlpackage, feed, compute_units=compute_units)
    return CoreMLInfo(available=True, compute_units=compute_units, timing=timing,
                      note=f"measured on this Mac with compute units {compute_units}")


callable_module(__name__)  # `compressadvise.verify(...)` works even once this module is imported
