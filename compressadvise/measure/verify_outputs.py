"""Running both models for verify and comparing their outputs: fidelity, accuracy and per-slice reports."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field

from compressadvise.measure import metrics as M
from compressadvise.errors import BadModel
from compressadvise.measure.metrics import ResultModel
from compressadvise.model.samples import InvalidSamples, Samples

if TYPE_CHECKING:
    import torch


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
    from compressadvise.errors import InvalidKnowledge

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
    from compressadvise.errors import InvalidKnowledge

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
