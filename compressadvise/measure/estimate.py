"""Per-layer roofline latency estimate for a target profile (labelled "estimate", never measured).

For each layer with multiply-accumulates (linear and convolution layers):

    compute_s = 2 * MACs / (peak TOPS * 1e12)
    memory_s  = (weight bytes moved + output activation bytes) / (bandwidth GB/s * 1e9)
    time      = max(compute_s, memory_s)

Weight bytes moved depend on when the runtime decompresses, as the target's `decompression`
entries say by OS: Core ML on iOS 16 expands compressed weights at load, so every inference
streams them at full size; iOS 17+ decompresses just in time, and torchao keeps quantized
weights compressed in memory (x86 CPU, NVIDIA GPU), so the compressed bytes are streamed. A mode
the target marks "decompressed" at that OS (e.g. int4 on the Neural Engine) also streams full
size, unless its entry says `streams: compressed`. Activations are counted once, as each layer's output at
fp16 (the input is the previous layer's output). Layers without MACs (norms, embeddings,
pooling) are not estimated.

Target profile figures read (by name, each optional):
- `memory_bandwidth_gbs` (GB/s): required; without it no estimate is made;
- `peak_fp16_tops` (TOPS): the compute roof for fp16 layers; without it the estimate is memory only;
- `peak_int8_tops` (TOPS): the roof for layers with int8 activations (W8A8) where the target
  accelerates `w8a8`; falls back to `peak_fp16_tops`.

A device profile (JSON, measure/device_profile.py) calibrates per op type instead, and sets `basis`.

Calibration (a small YAML of latencies measured on a device) scales the figures:

    model: original        # which model the figures were measured on (original | compressed)
    total_ms: 1.63         # whole-model latency; scales every layer without its own figure
    layers:                # per-layer measured latencies (optional)
      conv1: 0.21
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from compressadvise.model.analysis import LayerInfo, ModelReport
from compressadvise.knowledge.deployment import Deployment
from compressadvise.measure.metrics import ResultModel
from compressadvise.knowledge.schema import Target

FIGURES = ("memory_bandwidth_gbs", "peak_fp16_tops", "peak_int8_tops")
ACT_BYTES = 2  # fp16 activations


class LayerEstimate(ResultModel):
    name: str
    type: str
    setting: str
    macs: int
    weight_bytes_stored: float
    weight_bytes_moved: float
    activation_bytes: float
    compute_ms: float
    memory_ms: float
    ms: float = Field(description="estimate: max(compute, memory), times the calibration factor")
    bound: Literal["compute", "memory"]
    scale: float = 1.0


class ModelEstimate(ResultModel):
    label: Literal["estimate"] = "estimate"
    target: str
    os: int
    decompression: str
    figures: dict[str, float]
    total_ms: float
    layers: list[LayerEstimate]
    calibrated: bool = False
    notes: list[str] = []
    basis: str = Field("estimate", description=(
        "'estimate' (roofline, or scaled by a calibration YAML), 'calibrated from DEVICE profile' "
        "(scaled per op type by a device profile) or 'measured on DEVICE' (the profile's median)"))
    profile: dict[str, Any] | None = Field(None, description=(
        "the device profile applied: device, os, compute_units, factors per op type, default_factor, other_ms"))

    def basis_label(self) -> str:
        """What the latency is, in the words tables show: 'estimate (roofline)', 'estimate (calibrated)',
        'calibrated from DEVICE profile' or 'measured on DEVICE (OS, COMPUTE_UNITS)'."""
        if self.basis == "estimate":
            return "estimate (calibrated)" if self.calibrated else "estimate (roofline)"
        if self.basis.startswith("measured on") and self.profile:
            return f"{self.basis} ({self.profile.get('os')}, {self.profile.get('compute_units')})"
        return self.basis


def pair_basis(original: ModelEstimate, compressed: ModelEstimate) -> str:
    """The latency row's label: one when both estimates share it, else each model's (a profile of
    the compressed build measures it, while the original stays calibrated)."""
    lo, lc = original.basis_label(), compressed.basis_label()
    return lo if lo == lc else f"original: {lo}; compressed: {lc}"


class Calibration(ResultModel):
    model_config = ConfigDict(extra="forbid")

    model: Literal["original", "compressed"] = "original"
    target: str | None = None
    os: int | None = None
    total_ms: float | None = Field(None, gt=0)
    layers: dict[str, float] = {}


class LayerCompression(ResultModel):
    """What compression left in one layer: stored weight bytes and the runtime mode it needs."""

    bytes: float
    setting: str
    mode: str | None = None
    modes: list[str] = Field(default_factory=list, description="every runtime mode the settings need")
    int8_activations: bool = False


def figure(target: Target, name: str) -> float | None:
    f = target.figures.get(name)
    return float(f.value) if f is not None and f.value > 0 else None


def weight_bytes_moved(stored: float, fp16: float, mode: str | None, target: Target, os: int) -> float:
    """Bytes streamed per inference for one layer's weights (when to decompress: target data)."""
    if stored >= fp16:
        return stored
    return stored if Deployment(target, os).streams_compressed(mode) else fp16


def estimate_layer(layer: LayerInfo, target: Target, os: int, comp: LayerCompression | None,
                   baseline: float) -> LayerEstimate | None:
    """One layer's roofline estimate, or None when its MACs are unknown."""
    if not layer.macs:
        return None
    bandwidth = figure(target, "memory_bandwidth_gbs")
    if bandwidth is None:
        return None
    fp16 = layer.params * baseline
    stored = comp.bytes if comp is not None else fp16
    moved = weight_bytes_moved(stored, fp16, comp.mode if comp else None, target, os)
    act = float((layer.activation_elements or 0) * ACT_BYTES)
    peak = figure(target, "peak_fp16_tops")
    if comp is not None and comp.int8_activations and "w8a8" in target.accelerates(os):
        peak = figure(target, "peak_int8_tops") or peak
    compute_ms = 2.0 * layer.macs / (peak * 1e12) * 1e3 if peak else 0.0
    memory_ms = (moved + act) / (bandwidth * 1e9) * 1e3
    return LayerEstimate(
        name=layer.name, type=layer.type, setting=comp.setting if comp else "fp16 (unchanged)",
        macs=layer.macs, weight_bytes_stored=stored, weight_bytes_moved=moved, activation_bytes=act,
        compute_ms=compute_ms, memory_ms=memory_ms, ms=max(compute_ms, memory_ms),
        bound="compute" if compute_ms > memory_ms else "memory")


def roofline(report: ModelReport, target: Target, os: int | None = None,
             compression: dict[str, LayerCompression] | None = None) -> ModelEstimate:
    """The per-layer roofline estimate of one model (original when `compression` is None)."""
    dep = Deployment.resolve(None, target, os, check=False)
    os = dep.os
    compression = compression or {}
    notes: list[str] = []
    figs = {n: v for n in FIGURES if (v := figure(target, n)) is not None}
    if "memory_bandwidth_gbs" not in figs:
        notes.append(f"target {target.name} has no memory_bandwidth_gbs figure: no estimate")
    if "peak_fp16_tops" not in figs:
        notes.append(f"target {target.name} has no peak_fp16_tops figure: memory-bound estimate only")
    if not any(x.macs for x in report.layers):
        notes.append("no per-layer MACs (needs a runnable model and an input shape): no estimate")
    rows = [e for x in report.layers
            if (e := estimate_layer(x, target, os, compression.get(x.name), target.baseline_bytes_per_param))]
    skipped = [x.name for x in report.layers if not x.macs]
    if skipped and rows:
        notes.append(f"{len(skipped)} layer(s) without MACs not estimated (e.g. {skipped[0]})")
    if rows:
        notes.append("a roofline ignores per-op dispatch, layout changes and CPU fallbacks: read it as a "
                     "lower bound, or calibrate it with latencies measured on a device")
        notes += _fallback_note(report, target)
    return ModelEstimate(target=target.name, os=os, decompression=dep.decompression.summary, figures=figs,
                         total_ms=sum(r.ms for r in rows), layers=rows, notes=notes)


def _fallback_note(report: ModelReport, target: Target) -> list[str]:
    """What the placement check found that a roofline cannot price: ops off the accelerator."""
    from compressadvise.measure.placement import for_report

    placed = for_report(report, target)
    if placed is None or not placed.fallback:
        return []
    return [f"{len(placed.fallback)} op(s) fall back off the {placed.accelerator} ({placed.preview()}) with "
            f"{len(placed.boundaries)} unit switch(es) (placement, {placed.rule}): the roofline prices every "
            "layer on the accelerator and no switch; a device profile measures both"]


# ------------------------------------------------------------------ calibration
def load_calibration(path: str | Path) -> Calibration:
    from compressadvise.errors import InputNotFound, InvalidKnowledge
    from compressadvise.knowledge.yamlio import read_yaml, validate

    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: no such calibration file")
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise InvalidKnowledge(f"{path}:1: a calibration file is a mapping (model, total_ms, layers)")
    cal = validate(Calibration, data, str(path), lines)
    if cal.total_ms is None and not cal.layers:
        raise InvalidKnowledge(f"{path}:1: give total_ms or per-layer figures under layers")
    for name, ms in cal.layers.items():
        if ms <= 0:
            raise InvalidKnowledge(f"{path}: layer {name!r}: measured ms must be positive")
    return cal


def calibration_scales(est: ModelEstimate, cal: Calibration) -> tuple[dict[str, float], float, list[str]]:
    """Per-layer factors (measured / estimated) and the factor for layers without a figure."""
    by_name = {r.name: r for r in est.layers}
    notes = [f"{n}: calibration figure for a layer the estimate does not cover" for n in cal.layers if n not in by_name]
    per = {n: ms / by_name[n].ms for n, ms in cal.layers.items() if n in by_name and by_name[n].ms > 0}
    if cal.total_ms is not None and est.total_ms > 0:
        rest_est = sum(r.ms for r in est.layers if r.name not in per)
        rest_measured = cal.total_ms - sum(ms for n, ms in cal.layers.items() if n in per)
        if rest_est > 0 and rest_measured > 0:
            default = rest_measured / rest_est
        else:
            default = cal.total_ms / est.total_ms
    elif per:
        measured = sum(cal.layers[n] for n in per)
        default = measured / sum(by_name[n].ms for n in per)
    else:
        default = 1.0
    return per, default, notes


def apply_scales(est: ModelEstimate, per: dict[str, float], default: float, notes: list[str]) -> ModelEstimate:
    rows = []
    for r in est.layers:
        s = per.get(r.name, default)
        rows.append(r.model_copy(update={"scale": s, "ms": r.ms * s}))
    return est.model_copy(update={
        "layers": rows, "total_ms": sum(r.ms for r in rows), "calibrated": True,
        "notes": [*est.notes, *notes, f"calibrated with device measurements (default factor {default:.3g})"]})


def calibrate(original: ModelEstimate, compressed: ModelEstimate | None, cal: Calibration
              ) -> tuple[ModelEstimate, ModelEstimate | None]:
    """Scale both estimates by the factors fitted on the model the figures were measured on."""
    basis = compressed if cal.model == "compressed" and compressed is not None else original
    per, default, notes = calibration_scales(basis, cal)
    return (apply_scales(original, per, default, notes),
            apply_scales(compressed, per, default, notes) if compressed is not None else None)


# ------------------------------------------------------------------ what compression left
def mode_of_setting(setting: str) -> str | None:
    """Legacy only: plans written before per-layer rows carried their settings as data. Maps
    the label text (e.g. '4-bit palettization per_grouped_channel gs=16') to a runtime mode;
    everything else asks `Setting.modes` (from the technique's `requires`)."""
    s = setting.lower()
    if "palett" in s:
        if "grouped" in s:
            return "palettize_grouped"
        if re.search(r"\b3-bit", s):
            return "palettize_3bit"
        return "palettize"
    if "w8a8" in s or "activation" in s:
        return "w8a8"
    if "per_block" in s:
        return "linear_per_block"
    if re.search(r"\b4-bit", s):
        return "linear_int4"
    if "quant" in s or re.search(r"\b8-bit", s):
        return "linear_int8"
    return None


def from_plan(layers: list[Any], k: Any = None) -> dict[str, LayerCompression]:
    """Per-layer compression from a plan's LayerPrediction rows (bytes are plan estimates).
    Modes come from each row's settings (data) given the knowledge; label text only for rows
    without settings (older plans) or without knowledge."""
    return {x.name: _row_compression(x, k) for x in layers if x.bytes_after < x.bytes_before}


def _row_compression(x: Any, k: Any) -> LayerCompression:
    settings = list(getattr(x, "settings", None) or [])
    if k is None or not settings:
        mode = mode_of_setting(x.setting)
        return LayerCompression(bytes=float(x.bytes_after), setting=x.setting, mode=mode,
                                modes=[mode] if mode else [], int8_activations=mode == "w8a8")
    from compressadvise.plan.setting import Setting

    per = [Setting.normalised(k, d["technique"], d.get("params", {})) for d in settings]
    modes = list(dict.fromkeys(m for s in per for m in s.modes(k)))
    # The weights' storage is decided by the last step that set a mode (e.g. prune, then palettize).
    mode = next((s.primary_mode(k) for s in reversed(per) if s.modes(k)), None)
    return LayerCompression(bytes=float(x.bytes_after), setting=x.setting, mode=mode, modes=modes,
                            int8_activations="w8a8" in modes)


def detect_compression(module: Any, report: ModelReport, baseline: float = 2.0) -> dict[str, LayerCompression]:
    """Read what compression a torch model carries, layer by layer, from its weights.

    torchao quantized weights are tensor subclasses holding int data and scales; palettized
    weights (coremltools.optimize.torch) hold at most 2^nbits distinct values per LUT group and
    record their LUT in `_COREML_/weight/lut` buffers. Layers with neither stay at fp16.
    """
    import torch

    if module is None or not hasattr(module, "named_modules"):
        return {}
    mods = dict(module.named_modules())
    out: dict[str, LayerCompression] = {}
    for layer in report.layers:
        mod = mods.get(layer.name)
        w = getattr(mod, "weight", None) if mod is not None else None
        if not isinstance(w, torch.Tensor):
            continue
        other = (layer.params - layer.weight_elements) * baseline
        found = _torchao_weight(w) or _palettized_weight(mod, w)
        if found is not None:
            wbytes, setting, mode, a8 = found
            out[layer.name] = LayerCompression(bytes=wbytes + other, setting=setting, mode=mode,
                                               int8_activations=a8)
    return out


def _torchao_weight(w: Any) -> tuple[float, str, str, bool] | None:
    import torch

    names = getattr(w, "tensor_data_names", None)
    if type(w) is torch.Tensor or type(w) is torch.nn.Parameter or not names:
        return None
    data = [getattr(w, n) for n in names if isinstance(getattr(w, n, None), torch.Tensor)]
    q = data[0] if data else None
    if q is None or q.is_floating_point():
        return None
    total = float(sum(t.numel() * t.element_size() for t in data))
    bits = 4 if total < w.numel() * 0.75 else 8  # int4 packs two values per byte
    a8 = _has_input_quant(w)  # dynamic activation quantization keeps its settings on the weight
    mode = "w8a8" if a8 and bits == 8 else ("linear_int4" if bits == 4 else "linear_int8")
    return total, f"{bits}-bit {type(w).__name__}" + (" (int8 activations)" if a8 else ""), mode, a8


def _has_input_quant(w: Any) -> bool:
    return any(getattr(w, a, None) is not None for a in ("act_quant_kwargs", "input_quant_func"))


def _palettized_weight(mod: Any, w: Any) -> tuple[float, str, str, bool] | None:
    import math

    import torch

    lut = dict(mod.named_buffers()).get("_COREML_/weight/lut")
    if lut is not None:
        levels = int(lut.shape[-2])
        groups = lut.numel() // max(levels * int(lut.shape[-1]), 1)
        nbits = max(1, math.ceil(math.log2(max(levels, 2))))
        gran = "per_tensor" if groups == 1 else f"{groups} LUTs"
    else:
        uniq = torch.unique(w.detach()).numel()
        if uniq > 256 or uniq * 4 > w.numel():
            return None  # too many distinct values to be a look-up table
        levels, groups = uniq, 1
        nbits = max(1, math.ceil(math.log2(max(uniq, 2))))
        gran = "per_tensor"
    wbytes = w.numel() * nbits / 8.0 + groups * (2**nbits) * 2.0
    mode = "palettize_3bit" if nbits == 3 else ("palettize_grouped" if groups > 1 else "palettize")
    return wbytes, f"{nbits}-bit palettization {gran}", mode, False
