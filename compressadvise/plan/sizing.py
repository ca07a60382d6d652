"""Predicted storage size from the techniques' formulas and the model's real shapes (estimates)."""
from __future__ import annotations

import math
from typing import Any

from compressadvise.model.analysis import LayerInfo
from compressadvise.knowledge.base import Knowledge
from compressadvise.knowledge.schema import Constraints, Prediction


class NotApplicable(Exception):
    """The backend would leave this layer alone (too small, indivisible dims...)."""


def backend_leaves_alone(layer: LayerInfo, params: dict[str, Any]) -> tuple[str, str] | None:
    """Why coremltools would leave this weight uncompressed without an error, if it would:
    ("threshold", reason) for a tensor too small, ("divisibility", reason) for a group or block
    size that does not divide its dimension. The one copy of these rules: sizing, recommend and
    apply all ask here."""
    n = layer.weight_elements
    threshold = int(params.get("weight_threshold", 0) or 0)
    if threshold and n <= threshold:  # coremltools compresses only tensors with MORE elements
        return "threshold", f"{n} elements <= weight_threshold {threshold}: the backend leaves it uncompressed"
    gran = params.get("granularity", "per_tensor")
    if gran == "per_grouped_channel":
        gs, rows = int(params.get("group_size", 0) or 0), max(layer.out_channels, 1)
        if gs <= 0 or rows % gs:
            return "divisibility", (f"out_channels {rows} not divisible by group_size {gs}: "
                                    "the backend would skip it silently")
    elif gran == "per_block":
        bs = int(params.get("block_size", 0) or 0)
        if bs <= 0 or layer.in_channels % bs:
            return "divisibility", (f"input channels {layer.in_channels} not divisible by block_size {bs}: "
                                    "the backend would skip it silently")
    return None


def size_variables(layer: LayerInfo, params: dict[str, Any], baseline: float,
                   sparsity: float = 0.0) -> dict[str, float]:
    """Variables of the size formulas for one weight tensor under one setting."""
    if left := backend_leaves_alone(layer, params):
        raise NotApplicable(left[1])
    n = layer.weight_elements
    rows = max(layer.out_channels, 1)
    cols = n // rows
    gran = params.get("granularity", "per_tensor")
    if gran == "per_grouped_channel":
        groups = rows // int(params["group_size"])
    elif gran == "per_block":
        groups = n // int(params["block_size"])
    elif gran == "per_channel":
        groups = rows
    else:
        groups = 1
    nbits = int(params.get("nbits", 8) or 8)
    return {
        "n": float(n), "rows": float(rows), "cols": float(cols), "nbits": float(nbits),
        "levels": float(2**nbits), "groups": float(groups),
        "lut_bytes": 1.0 if params.get("lut_dtype") == "int8" else 2.0,
        "per_channel_scale": 1.0 if params.get("enable_per_channel_scale") else 0.0,
        "zero_point": 0.0 if params.get("mode", "linear_symmetric") in ("linear_symmetric", "symmetric_clipped") else 1.0,
        # A joint (prune + palettize/quantize) step carries its own sparsity parameter.
        "sparsity": float(sparsity or pruned_fraction(params)), "baseline": float(baseline),
    }


def pruned_fraction(params: dict[str, Any]) -> float:
    """Fraction of zeros a pruning setting leaves: n/m for n:m (n of every m set to zero)."""
    if params.get("pattern") == "n_m":
        return int(params.get("n", 2)) / max(int(params.get("m", 4)), 1)
    return float(params.get("sparsity", 0.0) or 0.0)


def weight_bytes(k: Knowledge, technique: str, layer: LayerInfo, params: dict[str, Any],
                 baseline: float, sparsity: float = 0.0) -> float:
    """Bytes of the layer's weight tensor after compression; raises NotApplicable."""
    program = k.size_programs.get(technique)
    if program is None:
        raise NotApplicable(f"technique {technique!r} has no size formula")
    value = program.execute(size_variables(layer, params, baseline, sparsity))
    return float(value)


def layer_bytes(layer: LayerInfo, weight: float | None, baseline: float) -> int:
    """Whole layer (weight + bias...) given its weight bytes; None means uncompressed."""
    if layer.tied_to:  # stored once, at its owner
        return int(math.ceil((layer.params) * baseline))
    other = layer.params - layer.weight_elements
    w = layer.weight_elements * baseline if weight is None else weight
    return int(math.ceil(w + other * baseline))


def prediction(before: int, after: int, c: Constraints) -> Prediction:
    """A plan's size estimate, and whether it meets the size budget (None without one)."""
    return Prediction(bytes_before=before, bytes_after=after, ratio=before / after if after else 0.0,
                      meets_size_budget=None if not c.max_size_mb else after / 1e6 <= c.max_size_mb)
