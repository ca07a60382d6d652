"""The documented facts a playbook condition may use: one record per fact.

Each fact is one `Fact` (its name is its key in the namespace table): a CEL type, the description
the docs print, and the extractor that computes it. The engine's fact dicts, CEL type-checking at
load (`prototypes`) and the docs' "facts" reference page all read these records, so a fact cannot
be documented without being produced, or produced without being documented.
Types are CEL types: int, double, string, bool, list(string).

Extractor inputs, by namespace: model (ModelReport); layer (LayerInfo, number of layers);
target (Deployment); constraints (Constraints, ModelReport); step (params, technique, slot).
Outcome facts are computed by `engine.next_moves` from a verify run (no extractor here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # facts.py stays import-light: the knowledge commands never load torch
    from compressadvise.model.analysis import LayerInfo, ModelReport

MB = 1e6


@dataclass(frozen=True)
class Fact:
    type: str
    description: str
    extract: Callable[..., Any] | None = None


def _finite(v: float | None) -> float:
    return v if v is not None and v == v else 0.0  # NaN (constant weights) reads as 0


def _share(r: ModelReport, *types: str) -> float:
    return sum(r.layer_types[t].share for t in types if t in r.layer_types)


def _mac_share(r: ModelReport, *types: str) -> float:
    """Share of the model's multiply-accumulates in these layer types; -1 when MACs are unknown."""
    total = sum(x.macs or 0 for x in r.layers)
    return sum(x.macs or 0 for x in r.layers if x.type in types) / total if total else -1.0


def group_divisor(channels: int, group_size: int) -> int:
    """The largest d <= group_size dividing channels (1 when only 1 does, or no channels)."""
    return max((d for d in range(1, group_size + 1) if channels % d == 0), default=1) if channels > 0 else 1


SMALL_TENSOR = 2048  # elements: coremltools' default weight_threshold (it leaves these uncompressed)


def _small_share(r: ModelReport) -> float:
    import math

    total = sum(x.params for x in r.layers) or 1
    return sum(x.params for x in r.layers if math.prod(x.weight_shape or [0]) <= SMALL_TENSOR) / total


def _max_kurtosis(r: ModelReport) -> float:
    return max((x.stats.kurtosis for x in r.layers if x.stats and x.stats.kurtosis == x.stats.kurtosis),
               default=0.0)


def _stat(name: str, default: Any = 0.0, finite: bool = False) -> Callable[[LayerInfo, int], Any]:
    def get(x: LayerInfo, n: int) -> Any:
        v = getattr(x.stats, name) if x.stats else default
        return _finite(v) if finite else v
    return get


def _context(r: ModelReport) -> int:
    """Outside a plan, a decoder's KV cache is counted at its own position limit (0: no cache known)."""
    kv = getattr(r, "kv", None)
    return int(kv.max_context or 0) if kv is not None else 0


def _kv_mb(r: ModelReport) -> float:
    ctx = _context(r)
    return r.kv.bytes_at(ctx) / MB if ctx else 0.0


def _kv_dim(name: str) -> Callable[[ModelReport], int]:
    return lambda r: int(getattr(r.kv, name)) if getattr(r, "kv", None) is not None else 0


MODEL = {
    "params": Fact("int", "unique parameters (tied weights counted once)", lambda r: r.total_params),
    "size_mb": Fact("double", "size at fp16 in MB (10^6 bytes)", lambda r: r.total_bytes_fp16 / MB),
    "family": Fact("string", "cnn | transformer_encoder | decoder_lm | hybrid | recurrent | conv_recurrent | mlp | unknown", lambda r: r.family),
    "format": Fact("string", "torchscript | exported | state_dict | safetensors | pickle | factory | bundled",
                   lambda r: r.format),
    "has_graph": Fact("bool", "the file carries a runnable graph (not only weights)", lambda r: r.has_graph),
    "num_layers": Fact("int", "weight layers (linear, conv, embedding, norm...)", lambda r: len(r.layers)),
    "depthwise_layers": Fact("int", "depthwise convolutions",
                             lambda r: sum(1 for x in r.layers if x.type == "depthwise_conv")),
    "conv_share": Fact("double", "share of parameters in convolutions (0..1)",
                       lambda r: _share(r, "conv", "depthwise_conv")),
    "linear_share": Fact("double", "share of parameters in linear layers (0..1)",
                         lambda r: _share(r, "linear", "attention")),
    "linear_mac_share": Fact("double", "share of multiply-accumulates in linear layers (0..1; -1 when unknown): "
                             "compute, where parameter shares count embedding tables that do none",
                             lambda r: _mac_share(r, "linear", "attention")),
    "small_tensor_share": Fact("double", "share of parameters in layers whose weight has at most 2048 elements "
                               "(coremltools' default weight_threshold leaves those uncompressed)", _small_share),
    "embedding_share": Fact("double", "share of parameters in embeddings (0..1)", lambda r: r.embedding_share),
    "largest_layer_share": Fact("double", "share of parameters in the largest layer (0..1)",
                                lambda r: max((x.share for x in r.layers), default=0.0)),
    "tied": Fact("bool", "some weights are tied (shared storage)", lambda r: bool(r.tied_groups)),
    "max_kurtosis": Fact("double", "largest per-layer weight kurtosis (3 = normal)", _max_kurtosis),
    "nonfinite_layers": Fact("int", "layers holding NaN or inf weights",
                             lambda r: sum(1 for x in r.layers if x.stats and x.stats.nonfinite)),
    "macs": Fact("int", "multiply-accumulates per inference (0 when unknown)", lambda r: r.macs_total or 0),
    # A causal LM's KV cache (shape from its config; 0 for other models). The last four depend on the
    # plan: a model-scope advise rule that reads them is decided once the plan's weights and context
    # are known (plan/decoder_facts.py); anywhere else they are counted at the position limit
    # against the fp16 weights.
    "kv_layers": Fact("int", "layers that keep a KV cache (0: no cache known)", _kv_dim("layers")),
    "kv_heads": Fact("int", "key/value heads per layer (fewer than query heads with grouped-query attention; "
                             "the most of any layer when they differ by layer)", _kv_dim("kv_heads")),
    "kv_head_dim": Fact("int", "values per key (or value) vector of one head", _kv_dim("head_dim")),
    "context_length": Fact("int", "tokens the KV cache is counted at: recommend --context-length, else the "
                           "model's position limit (0: no cache known)", _context),
    "kv_cache_mb": Fact("double", "fp16 KV cache in MB (10^6 bytes) at context_length: 2 x kv_layers x kv_heads "
                        "x kv_head_dim x context_length x 2 bytes (0: no cache known)", _kv_mb),
    "planned_weights_mb": Fact("double", "the plan's predicted weights in MB (the fp16 size outside a plan)",
                               lambda r: r.total_bytes_fp16 / MB),
    "kv_over_weights": Fact("double", "kv_cache_mb / planned_weights_mb (0: no cache known)",
                            lambda r: _kv_mb(r) / (r.total_bytes_fp16 / MB) if r.total_bytes_fp16 else 0.0),
}
# Model facts a plan changes (its context and predicted weights), for plan/decoder_facts.py.
PLAN_DEPENDENT = ("context_length", "kv_cache_mb", "planned_weights_mb", "kv_over_weights")

LAYER = {
    "name": Fact("string", "qualified module name, e.g. encoder.layers.0.fc1", lambda x, n: x.name),
    "type": Fact("string", "linear | conv | depthwise_conv | embedding | norm | attention | recurrent | other",
                 lambda x, n: x.type),
    "params": Fact("int", "parameters of this layer", lambda x, n: x.params),
    "share": Fact("double", "share of the model's parameters (0..1)", lambda x, n: x.share),
    "elements": Fact("int", "elements of the weight tensor", lambda x, n: x.weight_elements),
    "out_channels": Fact("int", "weight.shape[0]", lambda x, n: x.out_channels),
    "out_group_divisor": Fact("int", "the largest group size up to the step's group_size (16 outside a step) "
                              "that divides out_channels; 1 when only 1 does",
                              lambda x, n: group_divisor(x.out_channels, 16)),
    "in_channels": Fact("int", "weight.shape[1] (1 for depthwise convolutions)", lambda x, n: x.in_channels),
    "groups": Fact("int", "convolution groups (1 otherwise)", lambda x, n: x.groups),
    "depth": Fact("double", "position among weight layers, 0 (first) .. 1 (last)",
                  lambda x, n: x.index / max(n - 1, 1)),
    "is_first": Fact("bool", "first weight layer of the model", lambda x, n: x.is_first),
    "is_last": Fact("bool", "last weight layer of the model", lambda x, n: x.is_last),
    "is_boundary": Fact("bool", "first/last layer of the model or of a top-level sub-model",
                        lambda x, n: x.is_boundary),
    "is_classifier": Fact("bool", "last layer and a linear one (classifier or LM head)",
                          lambda x, n: x.is_classifier),
    "is_embedding": Fact("bool", "an embedding table", lambda x, n: x.is_embedding),
    "writes_output": Fact("bool", "writes a model output directly (through weight-free ops and norms), from "
                          "the graph: a classifier, an LM head, a final conv", lambda x, n: x.writes_output),
    "is_dead": Fact("bool", "no output depends on it (from the graph)", lambda x, n: x.is_dead),
    "is_recurrent": Fact("bool", "an LSTM/GRU/RNN gate matrix (weight_ih, weight_hh)", lambda x, n: x.is_recurrent),
    "gates": Fact("int", "gate blocks stacked in a recurrent weight (LSTM 4, GRU 3, RNN 1; 0 otherwise)",
                  lambda x, n: x.gates),
    "is_tied": Fact("bool", "shares its weight with another layer", lambda x, n: x.tied_to is not None),
    "kurtosis": Fact("double", "weight kurtosis (3 = normal; high = heavy tails)", _stat("kurtosis", finite=True)),
    "outlier_fraction": Fact("double", "share of weights beyond 4 std", _stat("outlier_fraction")),
    "absmax_over_std": Fact("double", "largest |weight| in standard deviations", _stat("absmax_over_std", finite=True)),
    "zero_fraction": Fact("double", "share of exact zeros in the weight", _stat("zero_fraction")),
    "nonfinite": Fact("int", "NaN/inf weight values", _stat("nonfinite", 0)),
}

TARGET = {  # d: a Deployment (target profile + OS, resolved once)
    "name": Fact("string", "profile name, e.g. ane-a17", lambda d: d.target.name),
    "vendor": Fact("string", "apple | nvidia | generic", lambda d: d.target.vendor),
    "kind": Fact("string", "ane | apple_gpu | apple_cpu | x86_cpu | nvidia_gpu", lambda d: d.target.kind),
    "os": Fact("int", "minimum OS major version (iOS numbering; 0 when not an Apple target)", lambda d: d.os),
    "coreml": Fact("bool", "deploys through Core ML", lambda d: d.target.coreml),
    "supports": Fact("list(string)", "compression modes the runtime can load at this OS", lambda d: d.supported),
    "accelerates": Fact("list(string)", "modes that run faster (not just smaller) at this OS",
                        lambda d: d.accelerated),
    "jit_decompression": Fact("bool", "weights decompressed just in time (Core ML from iOS 17), not at load; "
                              "from the target's `decompression` entries", lambda d: d.jit_decompression),
    "has_cuda": Fact("bool", "an NVIDIA GPU with CUDA kernels", lambda d: d.target.kind == "nvidia_gpu"),
    "int8_compute": Fact("bool", "int8 math is much faster than fp16 here (the target's `int8_compute`, "
                         "stated with its source)", lambda d: d.int8_compute),
}

CONSTRAINTS = {  # (c: Constraints, r: ModelReport)
    "max_size_mb": Fact("double", "size budget in MB (0 = none)", lambda c, r: float(c.max_size_mb)),
    "max_latency_ms": Fact("double", "latency budget in ms (0 = none)", lambda c, r: float(c.max_latency_ms)),
    "max_accuracy_drop": Fact("double", "tolerated accuracy drop in points (0 = none given)",
                              lambda c, r: float(c.max_accuracy_drop)),
    "data": Fact("string", "none | calibration | training", lambda c, r: c.data),
    "required_ratio": Fact("double", "fp16 size / size budget (0 = no budget)",
                           lambda c, r: (r.total_bytes_fp16 / MB) / c.max_size_mb if c.max_size_mb else 0.0),
}


def _p(key: str, kind: type, default: Any) -> Callable[[dict[str, Any], str, str], Any]:
    return lambda p, technique, slot: kind(p.get(key, default) or default)


STEP = {  # (params, technique, slot); absent parameters read as the type's zero
    "technique": Fact("string", "technique of the step (layer rules only)", lambda p, technique, slot: technique),
    "slot": Fact("string", "sparsity | weights | activations", lambda p, technique, slot: slot),
    "nbits": Fact("int", "bits of the step (0 when not applicable)", _p("nbits", int, 0)),
    "granularity": Fact("string", "per_tensor | per_channel | per_grouped_channel | per_block",
                        _p("granularity", str, "")),
    "group_size": Fact("int", "channels per LUT group (grouped palettization; 0 otherwise)",
                       _p("group_size", int, 0)),
    "block_size": Fact("int", "elements per block (per-block quantization; 0 otherwise)", _p("block_size", int, 0)),
    "mode": Fact("string", "quantization mode, e.g. linear_symmetric ('' when not applicable)", _p("mode", str, "")),
    "sparsity": Fact("double", "target sparsity of a pruning step (0 otherwise)", _p("sparsity", float, 0.0)),
    "weight_threshold": Fact("int", "tensors with fewer elements are left alone by the backend",
                             _p("weight_threshold", int, 0)),
    "lut_dtype": Fact("string", "palettization LUT entry type: fp16 | int8 ('' otherwise)", _p("lut_dtype", str, "")),
    "per_channel_scale": Fact("bool", "palettization with a per-channel scale",
                              lambda p, technique, slot: bool(p.get("enable_per_channel_scale", False))),
    "pattern": Fact("string", "pruning pattern: unstructured | block | n_m ('' otherwise)", _p("pattern", str, "")),
}

PLACEMENT = {  # p: measure.placement.facts() of the model's ops against the target's table
    "known": Fact("bool", "the target lists ops its accelerator lacks and the model's ops were matched against it",
                  lambda p: p["known"]),
    "fallback_ops": Fact("int", "ops the target's accelerator lacks (they fall back to another unit; estimate "
                         "from the op graph and the target's cited table)", lambda p: p["fallback_ops"]),
    "fallback_preview": Fact("string", "the first fallback ops, e.g. 'lstm at rnn (CPU)'",
                             lambda p: p["fallback_preview"]),
    "fallback_units": Fact("string", "units they fall back to, e.g. 'CPU'", lambda p: p["fallback_units"]),
    "unit_switches": Fact("int", "edges between ops on different units (0 when the ops have no order)",
                          lambda p: p["unit_switches"]),
    "accelerator": Fact("string", "the accelerator of the target's table, e.g. NE ('' when none)",
                        lambda p: p["accelerator"]),
    "basis": Fact("string", "where the ops came from: torch.export graph, torch.fx trace, Core ML program...",
                  lambda p: p["basis"]),
}

# What a verify run left behind, for `outcome` rules (the next moves after a missed budget).
OUTCOME = {
    "missed": Fact("list(string)", "budgets the compressed model missed: size | latency | accuracy drop | finite outputs"),
    "data": Fact("string", "data the user can provide now: none | calibration | training"),
    "step": Fact("int", "1-based number of the plan step the rule is looking at (0: the plan as a whole)"),
    "weight_steps": Fact("int", "weight steps in the plan"),
    "activation_steps": Fact("int", "activation steps in the plan"),
    "sensitive_layer": Fact("string", "the most sensitive compressed layer: measured, else highest kurtosis ('' if none)"),
    "kept_layers": Fact("int", "layers the plan leaves uncompressed (skipped by a rule or the backend)"),
    "kept_preview": Fact("string", "the first four of those layers, comma-separated"),
    "nbits_lower": Fact("int", "next lower nbits the step's technique accepts (0: none, or no step)"),
    "nbits_higher": Fact("int", "next higher nbits the step's technique accepts (0: none, or no step)"),
}

NAMESPACES: dict[str, dict[str, Fact]] = {
    "model": MODEL,
    "layer": LAYER,
    "target": TARGET,
    "constraints": CONSTRAINTS,
    "placement": PLACEMENT,
    "step": STEP,
    "outcome": OUTCOME,
}
MODEL_SCOPE = ("model", "target", "constraints", "placement")
LAYER_SCOPE = ("model", "layer", "target", "constraints", "placement", "step")
OUTCOME_SCOPE = ("model", "target", "constraints", "placement", "step", "outcome")

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


def extract(namespace: str, *inputs: Any) -> dict[str, Any]:
    """Every documented fact of one namespace, computed by its extractor."""
    return {name: f.extract(*inputs) for name, f in NAMESPACES[namespace].items() if f.extract is not None}


def step_facts(params: dict[str, Any], technique: str, slot: str) -> dict[str, Any]:
    """Step facts with defaults, so a layer rule can ask about any step."""
    return extract("step", params, technique, slot)
