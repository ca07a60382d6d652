"""The documented fact names a playbook condition may use, with their types.

This table is the contract between playbook authors and the engine: conditions are checked
against it when a playbook loads, and the docs' "facts" reference page is generated from it.
Types are CEL types: int, double, string, bool, list(string).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Fact:
    type: str
    description: str


MODEL = {
    "params": Fact("int", "unique parameters (tied weights counted once)"),
    "size_mb": Fact("double", "size at fp16 in MB (10^6 bytes)"),
    "family": Fact("string", "cnn | transformer_encoder | decoder_lm | hybrid | mlp | unknown"),
    "format": Fact("string", "torchscript | exported | state_dict | safetensors | pickle | factory | bundled"),
    "has_graph": Fact("bool", "the file carries a runnable graph (not only weights)"),
    "num_layers": Fact("int", "weight layers (linear, conv, embedding, norm...)"),
    "depthwise_layers": Fact("int", "depthwise convolutions"),
    "conv_share": Fact("double", "share of parameters in convolutions (0..1)"),
    "linear_share": Fact("double", "share of parameters in linear layers (0..1)"),
    "embedding_share": Fact("double", "share of parameters in embeddings (0..1)"),
    "largest_layer_share": Fact("double", "share of parameters in the largest layer (0..1)"),
    "tied": Fact("bool", "some weights are tied (shared storage)"),
    "max_kurtosis": Fact("double", "largest per-layer weight kurtosis (3 = normal)"),
    "nonfinite_layers": Fact("int", "layers holding NaN or inf weights"),
    "macs": Fact("int", "multiply-accumulates per inference (0 when unknown)"),
}

LAYER = {
    "name": Fact("string", "qualified module name, e.g. encoder.layers.0.fc1"),
    "type": Fact("string", "linear | conv | depthwise_conv | embedding | norm | attention | other"),
    "params": Fact("int", "parameters of this layer"),
    "share": Fact("double", "share of the model's parameters (0..1)"),
    "elements": Fact("int", "elements of the weight tensor"),
    "out_channels": Fact("int", "weight.shape[0]"),
    "in_channels": Fact("int", "weight.shape[1] (1 for depthwise convolutions)"),
    "groups": Fact("int", "convolution groups (1 otherwise)"),
    "depth": Fact("double", "position among weight layers, 0 (first) .. 1 (last)"),
    "is_first": Fact("bool", "first weight layer of the model"),
    "is_last": Fact("bool", "last weight layer of the model"),
    "is_boundary": Fact("bool", "first/last layer of the model or of a top-level sub-model"),
    "is_classifier": Fact("bool", "last layer and a linear one (classifier or LM head)"),
    "is_embedding": Fact("bool", "an embedding table"),
    "is_tied": Fact("bool", "shares its weight with another layer"),
    "kurtosis": Fact("double", "weight kurtosis (3 = normal; high = heavy tails)"),
    "outlier_fraction": Fact("double", "share of weights beyond 4 std"),
    "absmax_over_std": Fact("double", "largest |weight| in standard deviations"),
    "zero_fraction": Fact("double", "share of exact zeros in the weight"),
    "nonfinite": Fact("int", "NaN/inf weight values"),
}

TARGET = {
    "name": Fact("string", "profile name, e.g. ane-a17"),
    "vendor": Fact("string", "apple | nvidia | generic"),
    "kind": Fact("string", "ane | apple_gpu | apple_cpu | x86_cpu | nvidia_gpu"),
    "os": Fact("int", "minimum OS major version (iOS numbering; 0 when not an Apple target)"),
    "coreml": Fact("bool", "deploys through Core ML"),
    "supports": Fact("list(string)", "compression modes the runtime can load at this OS"),
    "accelerates": Fact("list(string)", "modes that run faster (not just smaller) at this OS"),
    "jit_decompression": Fact("bool", "weights decompressed just in time (iOS 17+), not at load"),
    "has_cuda": Fact("bool", "an NVIDIA GPU with CUDA kernels"),
    "int8_compute": Fact("bool", "int8 math is much faster than fp16 here (peak_int8_tops >= 1.5x peak_fp16_tops)"),
}

CONSTRAINTS = {
    "max_size_mb": Fact("double", "size budget in MB (0 = none)"),
    "max_latency_ms": Fact("double", "latency budget in ms (0 = none)"),
    "max_accuracy_drop": Fact("double", "tolerated accuracy drop in points (0 = none given)"),
    "data": Fact("string", "none | calibration | training"),
    "required_ratio": Fact("double", "fp16 size / size budget (0 = no budget)"),
}

STEP = {
    "technique": Fact("string", "technique of the step (layer rules only)"),
    "slot": Fact("string", "sparsity | weights | activations"),
    "nbits": Fact("int", "bits of the step (0 when not applicable)"),
    "granularity": Fact("string", "per_tensor | per_channel | per_grouped_channel | per_block"),
    "group_size": Fact("int", "channels per LUT group (grouped palettization; 0 otherwise)"),
    "block_size": Fact("int", "elements per block (per-block quantization; 0 otherwise)"),
    "mode": Fact("string", "quantization mode, e.g. linear_symmetric ('' when not applicable)"),
    "sparsity": Fact("double", "target sparsity of a pruning step (0 otherwise)"),
    "weight_threshold": Fact("int", "tensors with fewer elements are left alone by the backend"),
    "lut_dtype": Fact("string", "palettization LUT entry type: fp16 | int8 ('' otherwise)"),
    "per_channel_scale": Fact("bool", "palettization with a per-channel scale"),
    "pattern": Fact("string", "pruning pattern: unstructured | block | n_m ('' otherwise)"),
}

NAMESPACES: dict[str, dict[str, Fact]] = {
    "model": MODEL,
    "layer": LAYER,
    "target": TARGET,
    "constraints": CONSTRAINTS,
    "step": STEP,
}
MODEL_SCOPE = ("model", "target", "constraints")
LAYER_SCOPE = ("model", "layer", "target", "constraints", "step")

_PROTO = {
    "int": (16, 3),
    "double": (1.5, 0.25),
    "string": ("x", "y"),
    "bool": (True, False),
    "list(string)": (["x"], []),
}


def prototypes(namespaces: tuple[str, ...], variant: int) -> dict[str, dict[str, Any]]:
    """Typed stand-in values for checking a condition before any model is seen."""
    return {ns: {k: _PROTO[f.type][variant] for k, f in NAMESPACES[ns].items()} for ns in namespaces}


def step_facts(params: dict[str, Any], technique: str, slot: str) -> dict[str, Any]:
    """Step facts with defaults, so a layer rule can ask about any step."""
    return {
        "technique": technique,
        "slot": slot,
        "nbits": int(params.get("nbits", 0) or 0),
        "granularity": str(params.get("granularity", "") or ""),
        "group_size": int(params.get("group_size", 0) or 0),
        "block_size": int(params.get("block_size", 0) or 0),
        "mode": str(params.get("mode", "") or ""),
        "sparsity": float(params.get("sparsity", 0.0) or 0.0),
        "weight_threshold": int(params.get("weight_threshold", 0) or 0),
        "lut_dtype": str(params.get("lut_dtype", "") or ""),
        "per_channel_scale": bool(params.get("enable_per_channel_scale", False)),
        "pattern": str(params.get("pattern", "") or ""),
    }
