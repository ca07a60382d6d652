"""Fidelity and task metrics for comparing a compressed model's outputs with the original's.

Each function takes the original ("reference") output first and the compressed ("test")
output second, both torch tensors whose first axis is the sample axis. Figures are plain
floats; +inf (PSNR/SNR of identical outputs) is a real answer, not an error.

Output kinds decide which metrics apply (chosen automatically by `choose_kind`, overridable):
- logits: a (N, C) score vector per sample -> top-1 agreement, KL, cosine, SNR, max abs error
- dense:  any other floating output -> PSNR, SNR, cosine, max abs error
- mask:   boolean/integer outputs or 0/1 floats -> IoU and pixel agreement
"""
from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

SummaryRows = list[tuple[str, str]]
REPR_MAX = 199  # a repr is one line a person reads, not the object's dump (a VerifyResult's ran to 4k)


class Summarized:
    """Short displays of a result: `repr` (one line), `_repr_html_` (a notebook table) and
    `__rich__` (a rich table). A class names its key figures in `summary_fields`, or overrides
    `_summary` for figures that need working out; by default every plain field is shown."""

    summary_fields: ClassVar[tuple[str, ...]] = ()

    def _summary(self) -> tuple[str, SummaryRows]:
        names = self.summary_fields or _field_names(self)
        rows = [(n, text) for n in names if (text := value_text(n, getattr(self, n, None))) is not None]
        return type(self).__name__, rows

    def __repr__(self) -> str:
        try:
            title, rows = self._summary()
        except Exception:  # a half-built object (model_construct, a test double): repr must not raise
            return f"<{type(self).__name__} object>"
        inner = ", ".join(f"{k}={v}" for k, v in rows)
        line = f"{title}({inner})"
        return line if len(line) <= REPR_MAX else line[:REPR_MAX - 2] + "…)"

    def _repr_html_(self) -> str:
        title, rows = self._summary()
        e = html.escape
        body = "".join(f"<tr><th style=\"text-align:left\">{e(k)}</th><td style=\"text-align:left\">{e(v)}</td></tr>"
                       for k, v in rows)
        return f"<table><caption style=\"text-align:left\"><b>{e(title)}</b></caption>{body}</table>"

    def __rich__(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        title, rows = self._summary()
        table = Table(title=Text(title, style="bold"), title_justify="left", show_header=False)
        table.add_column(style="dim")
        table.add_column()
        for k, v in rows:
            table.add_row(Text(k), Text(v))  # Text: a layer named "[red]" is not markup
        return table


def _field_names(obj: Any) -> list[str]:
    fields = getattr(type(obj), "model_fields", None)
    if fields is None:
        import dataclasses

        return [f.name for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
    return list(fields)


def size_text(n: float) -> str:
    from compressadvise.ui.render import human_bytes  # the CLI's units

    return human_bytes(n)


def count_text(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


def value_text(name: str, value: Any, limit: int = 60) -> str | None:
    """A field's value as a short display string; None leaves it out (unset, empty or nested)."""
    if value is None or isinstance(value, (Summarized, BaseModel)) or isinstance(value, (str, list, dict)) and not value:
        return None
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        if "bytes" in name:
            return size_text(value)
        return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) and len(value) <= 6:
            return "x".join(f"{v:g}" for v in value)  # a shape
        return count_text(len(value), "item")
    if isinstance(value, dict):
        if all(isinstance(v, (int, float)) for v in value.values()):
            text = ", ".join(f"{k} {v:.4g}" for k, v in value.items())
        else:
            text = count_text(len(value), "entry", "entries")
    else:
        text = str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class ResultModel(Summarized, BaseModel):
    """Base of result objects: JSON keeps +inf/NaN as the strings "Infinity"/"NaN" (valid JSON),
    and displays are short summaries (Summarized)."""

    model_config = ConfigDict(ser_json_inf_nan="strings")


OutputKind = Literal["logits", "dense", "mask"]
KINDS: tuple[str, ...] = ("logits", "dense", "mask")
# Single metric names a user may pass to --metric, mapped to the kind that reports them.
METRIC_ALIASES: dict[str, OutputKind] = {
    "logits": "logits", "top1": "logits", "kl": "logits",
    "dense": "dense", "psnr": "dense", "snr": "dense", "cosine": "dense",
    "mask": "mask", "iou": "mask",
}


def _f64(t: "torch.Tensor") -> "torch.Tensor":
    import torch

    return t.detach().to(torch.float64)


def mse(ref: "torch.Tensor", test: "torch.Tensor") -> float:
    """Mean squared error over all elements."""
    return float(((_f64(ref) - _f64(test)) ** 2).mean())


def max_abs_error(ref: "torch.Tensor", test: "torch.Tensor") -> float:
    return float((_f64(ref) - _f64(test)).abs().max()) if ref.numel() else 0.0


def psnr(ref: "torch.Tensor", test: "torch.Tensor") -> float:
    """Peak signal-to-noise ratio in dB, peak = max |reference| (the signal's own range).

    10*log10(peak^2 / MSE); +inf when the outputs are identical.
    """
    err = mse(ref, test)
    peak = float(_f64(ref).abs().max()) if ref.numel() else 0.0
    if err == 0.0:
        return math.inf
    if peak == 0.0:
        return -math.inf
    return 10.0 * math.log10(peak * peak / err)


def snr(ref: "torch.Tensor", test: "torch.Tensor") -> float:
    """Signal-to-noise ratio in dB: 10*log10(sum ref^2 / sum (ref - test)^2); +inf if identical."""
    r = _f64(ref)
    noise = float(((r - _f64(test)) ** 2).sum())
    signal = float((r**2).sum())
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine_similarity(ref: "torch.Tensor", test: "torch.Tensor") -> float:
    """Mean over samples of the cosine between each sample's flattened outputs.

    Per sample, so one large-magnitude sample cannot hide the others. Two all-zero samples
    count as identical (1.0); one zero and one non-zero as orthogonal (0.0).
    """
    r = _f64(ref).reshape(ref.shape[0], -1) if ref.dim() else _f64(ref).reshape(1, 1)
    t = _f64(test).reshape(r.shape)
    dot = (r * t).sum(1)
    norms = r.norm(dim=1) * t.norm(dim=1)
    both_zero = (r.norm(dim=1) == 0) & (t.norm(dim=1) == 0)
    cos = dot / norms.clamp_min(1e-300)
    cos = cos.masked_fill(both_zero, 1.0).masked_fill((norms == 0) & ~both_zero, 0.0)
    return float(cos.mean())


def top1_agreement(ref_logits: "torch.Tensor", test_logits: "torch.Tensor") -> float:
    """Share (0..1) of samples whose arg-max class is the same in both outputs."""
    return float((ref_logits.argmax(-1) == test_logits.argmax(-1)).double().mean())


def kl_divergence(ref_logits: "torch.Tensor", test_logits: "torch.Tensor") -> float:
    """Mean KL(softmax(ref) || softmax(test)) in nats over samples (and any other leading axes)."""
    import torch

    lp = torch.log_softmax(_f64(ref_logits), -1)
    lq = torch.log_softmax(_f64(test_logits), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


def _binarise(mask: "torch.Tensor") -> "torch.Tensor":
    """Bool mask: booleans as is, integers non-zero, floats > 0.5 (probabilities) or > 0 (logits)."""
    import torch

    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        return mask != 0
    in_unit = bool(((mask >= 0) & (mask <= 1)).all())
    return mask > (0.5 if in_unit else 0.0)


def iou(ref: "torch.Tensor", test: "torch.Tensor") -> float:
    """Intersection over union of two masks.

    Binary masks (bool, 0/1, probabilities, logits): |A and B| / |A or B|, 1.0 when both are
    empty. Integer masks with more than two values are class maps: the mean IoU over the
    classes present in either map.
    """
    import torch

    if not ref.is_floating_point() and ref.dtype != torch.bool:
        classes = torch.unique(torch.cat([ref.reshape(-1), test.reshape(-1)]))
        if classes.numel() > 2 or bool((classes > 1).any()):
            scores = [_binary_iou(ref == c, test == c) for c in classes.tolist()]
            return float(sum(scores) / len(scores))
    return _binary_iou(_binarise(ref), _binarise(test))


def _binary_iou(a: "torch.Tensor", b: "torch.Tensor") -> float:
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def pixel_agreement(ref: "torch.Tensor", test: "torch.Tensor") -> float:
    """Share of mask elements with the same value (after binarising non-class masks)."""
    import torch

    if not ref.is_floating_point() and ref.dtype != torch.bool:
        return float((ref == test).double().mean())
    return float((_binarise(ref) == _binarise(test)).double().mean())


def topk_accuracy(logits: "torch.Tensor", labels: "torch.Tensor", k: int = 1) -> float:
    """Percentage of samples whose label is among the k highest scores."""
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return 100.0 * float((top == labels.reshape(-1, 1)).any(-1).double().mean())


def choose_kind(t: "torch.Tensor") -> OutputKind:
    """Pick the metric family for one output from its dtype, shape and values."""
    import torch

    if t.dtype == torch.bool or not t.is_floating_point():
        return "mask"
    if t.dim() == 2 and t.shape[1] > 1:
        return "logits"
    if t.numel() and bool(((t == 0) | (t == 1)).all()):
        return "mask"
    return "dense"


def fidelity(ref: "torch.Tensor", test: "torch.Tensor", kind: OutputKind) -> dict[str, float]:
    """The fidelity metrics of one output of the given kind."""
    if kind == "mask":
        return {"iou": iou(ref, test), "pixel_agreement": pixel_agreement(ref, test)}
    out: dict[str, float] = {}
    if kind == "logits":
        out["top1_agreement"] = top1_agreement(ref, test)
        out["kl_divergence"] = kl_divergence(ref, test)
    else:
        out["psnr_db"] = psnr(ref, test)
    out["snr_db"] = snr(ref, test)
    out["cosine"] = cosine_similarity(ref, test)
    out["max_abs_error"] = max_abs_error(ref, test)
    return out
