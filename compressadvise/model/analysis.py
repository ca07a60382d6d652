"""Per-layer inventory and model facts: what an expert looks at before choosing a compression."""
from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Callable, ClassVar, Literal

from pydantic import BaseModel, Field

from compressadvise.errors import BadModel
from compressadvise.measure.metrics import Summarized
from compressadvise.model.findings import layer_findings
from compressadvise.model.loading import LoadedModel, load_model
from compressadvise.model.decoder import KVShape, kv_shape
from compressadvise.model.ops import OpGraph

SCHEMA_VERSION = "1"
DIVISORS = (4, 8, 16, 32, 64)
SAMPLE_MAX = 1 << 20  # statistics of bigger tensors use a strided sample of this many values
ATTENTION_NAMES = re.compile(r"(attn|attention|q_proj|k_proj|v_proj|qkv|query|in_proj)")
EMBED_NAMES = re.compile(r"(embed|wte|wpe|tok_emb|word_emb|embedding)")

# Recurrent weights are one matrix per gate set: torch names them weight_ih_l0, weight_hh_l0_reverse,
# weight_hr_l0 (LSTM projection), or weight_ih / weight_hh for the *Cell modules; each is its own layer
# (its biases join it), so a 3-layer LSTM is 6 weight layers, not one invisible "other" module.
RECURRENT_TENSOR = re.compile(r"^(?P<module>.*?)\.?(?P<kind>weight|bias)_(?P<gate>ih|hh|hr)(?P<rest>(_l\d+)?(_reverse)?)$")
RECURRENT_GATES = {"LSTM": 4, "LSTMCell": 4, "GRU": 3, "GRUCell": 3, "RNN": 1, "RNNCell": 1}
# Buffers a weight-only file cannot mark as such (an eager module, TorchScript and torch.export say so
# themselves): BatchNorm running statistics and similar non-learned tensors.
BUFFER_NAMES = re.compile(r"(^|\.)(running_mean|running_var|num_batches_tracked|position_ids|token_type_ids)$")

LayerType = Literal["linear", "conv", "depthwise_conv", "embedding", "norm", "attention", "recurrent", "other"]


class WeightStats(BaseModel):
    min: float
    max: float
    absmax: float
    mean: float
    std: float
    kurtosis: float = Field(description="Pearson kurtosis (3 for a normal distribution)")
    outlier_fraction: float = Field(description="share of values beyond 4 std from the mean")
    absmax_over_std: float = Field(description="dynamic range in standard deviations")
    zero_fraction: float
    nonfinite: int = Field(description="count of NaN/inf values")
    sampled: bool = Field(description="statistics from a strided sample of 2^20 values")


class LayerInfo(BaseModel):
    name: str
    type: LayerType
    module_type: str | None = None
    tensors: list[str]
    params: int = Field(description="parameters of this layer; a tied weight counts once, at its first use")
    share: float = Field(description="share of the model's unique parameters")
    weight_shape: list[int]
    weight_elements: int
    out_channels: int
    in_channels: int = Field(description="weight elements per output channel's row axis (shape[1])")
    groups: int = 1
    bytes_fp32: int
    bytes_fp16: int
    index: int
    is_first: bool
    is_last: bool
    is_boundary: bool = Field(description="first or last weight layer of its top-level child")
    is_classifier: bool
    is_embedding: bool
    tied_to: str | None = None
    is_recurrent: bool = False
    writes_output: bool = Field(False, description="its output reaches a model output through weight-free ops "
                                "and norms only (from the graph; the last layer when there is none)")
    is_dead: bool = Field(False, description="no output depends on this weight (from the graph): left out of plans")
    folded_bn: str | None = Field(None, description="the BatchNorm that folds into this layer when converted")
    folded_into: str | None = Field(None, description="this BatchNorm folds into that layer when converted")
    gates: int = Field(0, description="gate blocks stacked in a recurrent weight (LSTM 4, GRU 3, RNN 1; 0 otherwise)")
    out_divisible_by: list[int]
    in_divisible_by: list[int]
    stats: WeightStats | None = None
    macs: int | None = None
    activation_elements: int | None = None


class BufferInfo(BaseModel):
    """A non-parameter tensor: not compressed, not counted in parameters or the fp16 baseline."""
    name: str
    elements: int
    dtype: str


class TypeBreakdown(BaseModel):
    count: int
    params: int
    share: float


class ModelReport(Summarized, BaseModel):
    summary_fields: ClassVar[tuple[str, ...]] = ("source", "format", "family", "total_params", "total_bytes_fp16", "layers")
    schema_version: str = SCHEMA_VERSION
    source: str
    format: str
    sha256: str
    has_graph: bool
    notes: list[str]
    total_params: int
    total_bytes_fp32: int
    total_bytes_fp16: int
    compressible_params: int
    layer_types: dict[str, TypeBreakdown]
    embedding_share: float
    family: str
    family_evidence: list[str]
    tied_groups: list[list[str]]
    findings: list[str]
    input_shape: list[int] | None = None
    macs_total: int | None = None
    layers: list[LayerInfo]
    buffers: list[BufferInfo] = Field([], description="non-parameter tensors (running statistics, masks, "
                                      "position ids): not in total_params or the fp16 baseline")
    buffer_elements: int = 0
    shipped_elements: int = Field(0, description="values the converted model stores: parameters less dead layers' "
                                  "plus float buffers that are not folded away (the size prediction's basis)")
    roles_source: str = Field("", description="where first/last/classifier/dead came from: the graph, or a guess")
    ops: OpGraph | None = Field(None, description="the operations in graph order (what a placement check reads)")
    kv: KVShape | None = Field(None, description="a causal LM's KV-cache shape, from its config (None otherwise)")

    def stored(self) -> int:
        return self.shipped_elements or self.total_params  # 0: a report made before the field existed

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def weight_stats(t: Any) -> WeightStats:
    import torch

    t = t.detach()  # a loaded program's parameters require grad: statistics need none
    n = t.numel()
    x = t.reshape(-1)
    nonfinite = _count_nonfinite(x) if t.is_floating_point() else 0
    sampled = n > SAMPLE_MAX
    if sampled:
        x = x[:: n // SAMPLE_MAX][:SAMPLE_MAX]
    x = x.float()
    if nonfinite:
        x = x[torch.isfinite(x)]
    if x.numel() == 0:
        nan = float("nan")
        return WeightStats(min=nan, max=nan, absmax=nan, mean=nan, std=nan, kurtosis=nan,
                           outlier_fraction=0, absmax_over_std=nan, zero_fraction=0,
                           nonfinite=nonfinite, sampled=sampled)
    std, mean = torch.std_mean(x, correction=0)
    std_f, mean_f = float(std), float(mean)
    lo, hi = torch.aminmax(x)
    absmax = max(abs(float(lo)), abs(float(hi)))
    if std_f > 0:
        z = (x - mean) / std
        kurt = float((z**4).mean())
        outliers = float((z.abs() > 4).float().mean())
    else:
        kurt, outliers = 0.0, 0.0
    return WeightStats(
        min=float(lo), max=float(hi), absmax=absmax, mean=mean_f, std=std_f, kurtosis=kurt,
        outlier_fraction=outliers, absmax_over_std=absmax / std_f if std_f > 0 else 0.0,
        zero_fraction=float((x == 0).float().mean()), nonfinite=nonfinite, sampled=sampled,
    )


_EXP_MASK = {"float16": (16, 0x7C00), "bfloat16": (16, 0x7F80), "float32": (32, 0x7F800000)}


def _count_nonfinite(x: Any) -> int:
    """NaN/inf count over the whole tensor; on the bit pattern (all-ones exponent) for half
    types, which is several times faster than isfinite() on CPUs without native fp16."""
    import torch

    # Fast path: one float32-accumulated sum is finite iff no element is NaN/inf (fp16/bf16
    # values cannot overflow a float32 sum at any realistic size).
    if x.dtype in (torch.float16, torch.bfloat16) and bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return 0
    spec = _EXP_MASK.get(str(x.dtype).replace("torch.", ""))
    if spec is None:
        return int(x.numel() - torch.isfinite(x).sum())
    bits, mask = spec
    ints = x.view(torch.int16 if bits == 16 else torch.int32)
    m = torch.tensor(mask if bits == 32 or mask < 0x8000 else mask - 0x10000, dtype=ints.dtype)
    return int(((ints & m) == m).sum())


def split_tensor_name(tensor_name: str) -> tuple[str, str]:
    """'enc.fc.weight' -> ('enc.fc', 'weight'); 'attn.in_proj_weight' -> ('attn.in_proj', 'weight');
    a recurrent matrix is a layer of its own: 'rnn.weight_hh_l1' -> ('rnn.weight_hh_l1', 'weight'),
    'rnn.bias_hh_l1' -> ('rnn.weight_hh_l1', 'bias')."""
    m = RECURRENT_TENSOR.match(tensor_name)
    if m:
        return f"{m['module']}{'.' if m['module'] else ''}weight_{m['gate']}{m['rest']}", m["kind"]
    for suffix in ("weight", "bias"):
        if tensor_name.endswith("." + suffix):
            return tensor_name[: -len(suffix) - 1], suffix
        if tensor_name.endswith("_" + suffix):
            return tensor_name[: -len(suffix) - 1], suffix
    return tensor_name, tensor_name.rsplit(".", 1)[-1]


def _module_types(model: LoadedModel) -> dict[str, tuple[str, int]]:
    """Map module path -> (class name, groups) from whatever structure the format carries."""
    out: dict[str, tuple[str, int]] = {}
    src = model.module or model.scripted
    if src is not None:
        for name, mod in src.named_modules():
            cls = getattr(mod, "original_name", None) or type(mod).__name__
            groups = getattr(mod, "groups", None)  # traced TorchScript keeps no such attribute
            out[name] = (str(cls), int(groups) if isinstance(groups, int) else 0)
            if cls == "MultiheadAttention":
                out[f"{name}.in_proj"] = ("MultiheadAttention", 1)
    elif model.exported is not None:
        for node in model.exported.graph_module.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if not stack:
                continue
            path, cls = list(stack.values())[-1]
            cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
            groups = 1
            if "conv" in str(node.target) and len(node.args) > 8:
                groups = int(node.args[8])
            elif "conv2d" in str(node.target) and len(node.args) > 6:
                groups = int(node.args[6])
            prev = out.get(path)
            out[path] = (cls_name.rsplit(".", 1)[-1], max(groups, prev[1] if prev else 1))
    return out


def recurrent_module(layer_name: str) -> str | None:
    """The module path of a recurrent weight layer ('enc.lstm.weight_ih_l0' -> 'enc.lstm'), else None."""
    m = RECURRENT_TENSOR.match(layer_name)
    return m["module"] if m and m["kind"] == "weight" else None


def _classify(name: str, shape: list[int], cls: str | None, groups: int) -> LayerType:
    if recurrent_module(name) is not None and (cls is None or cls in RECURRENT_GATES):
        return "recurrent"
    if cls:
        if "Embedding" in cls:
            return "embedding"
        if "MultiheadAttention" in cls:
            return "attention"
        if "Conv" in cls and groups:  # groups == 0 means unknown: fall through to the shape
            in_per_group = shape[1] if len(shape) > 1 else 1
            return "depthwise_conv" if groups > 1 and in_per_group == 1 else "conv"
        if "Linear" in cls:
            return "linear"
        if "Norm" in cls:
            return "norm"
    if len(shape) >= 3:
        # One input channel per filter with a spatial kernel: depthwise (the first layer of a
        # single-channel model looks the same; _build_layers corrects that case).
        return "depthwise_conv" if shape[1] == 1 and math.prod(shape[2:]) > 1 else "conv"
    if len(shape) == 2:
        return "embedding" if EMBED_NAMES.search(name) else "linear"
    if len(shape) == 1 and re.search(r"(norm|ln|bn)", name):
        return "norm"
    return "other"


def _family(layers: list[LayerInfo], total: int) -> tuple[str, list[str]]:
    by_type: dict[str, int] = defaultdict(int)
    for layer in layers:
        by_type[layer.type] += layer.params
    conv = (by_type["conv"] + by_type["depthwise_conv"]) / max(total, 1)
    attn_layers = [x.name for x in layers if x.type == "attention" or ATTENTION_NAMES.search(x.name)]
    emb = [x for x in layers if x.is_embedding]
    tied_head = any(x.tied_to for x in layers)
    lm_head = [x.name for x in layers if re.search(r"lm_head", x.name)]
    vocab_out = bool(emb) and any(
        x.type == "linear" and x.out_channels == emb[0].out_channels and x.is_last for x in layers
    )
    evidence: list[str] = []
    if attn_layers:
        evidence.append(f"{len(attn_layers)} attention projection(s), e.g. {attn_layers[0]}")
    if emb:
        evidence.append(f"embedding {emb[0].name} ({emb[0].weight_shape[0]} x {emb[0].weight_shape[-1]})")
    if conv:
        evidence.append(f"convolutions hold {conv:.0%} of parameters")
    dw = [x.name for x in layers if x.type == "depthwise_conv"]
    if dw:
        evidence.append(f"{len(dw)} depthwise convolution(s)")
    rec = by_type["recurrent"] / max(total, 1)
    if rec:
        evidence.append(f"recurrent (LSTM/GRU) weights hold {rec:.0%} of parameters")
    if rec > 0.1 and not attn_layers:
        return ("conv_recurrent" if conv > 0.1 else "recurrent"), evidence
    if attn_layers and emb and (tied_head or lm_head or vocab_out):
        evidence.append("output projection to the vocabulary" + (" tied to the embedding" if tied_head else ""))
        return "decoder_lm", evidence
    if attn_layers and conv > 0.1:
        return "hybrid", evidence
    if attn_layers:
        return "transformer_encoder", evidence
    if conv > 0.3:
        return "cnn", evidence
    if by_type["linear"]:
        evidence.append("only fully connected layers")
        return "mlp", evidence
    return "unknown", evidence or ["no recognisable weight layers"]


def _macs(model: LoadedModel, input_shape: list[int] | None) -> tuple[dict[str, tuple[int, int]], list[int] | None]:
    """MACs and output elements per layer from one forward pass (shapes only matter)."""
    import torch

    runnable = model.module
    if runnable is None and model.exported is not None:
        return _macs_from_graph(model), input_shape or _example_shape(model)
    if runnable is None:
        return {}, None
    example: tuple | None = None
    if input_shape:
        example = (torch.zeros(*input_shape),)
    elif model.example_inputs:
        example = tuple(model.example_inputs)
    if example is None:
        return {}, None
    found: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, mod in runnable.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and isinstance(
            mod, (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
        ):
            def hook(m, _inp, out, name=name):
                per_out = m.weight.numel() // m.weight.shape[0]
                found[name] = (int(out.numel() * per_out), int(out.numel()))
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            runnable(*example)
    except Exception as e:
        raise BadModel(f"forward pass with input shape {input_shape} failed: {e}") from e
    finally:
        for h in hooks:
            h.remove()
    return found, list(example[0].shape)


def example_inputs_for(model: LoadedModel, input_shape: list[int] | None) -> tuple | None:
    """The model's example inputs, or zeros of the given shape."""
    if model.example_inputs is not None:
        return model.example_inputs
    if input_shape:
        import torch

        return (torch.zeros(*input_shape),)
    return None


def _example_shape(model: LoadedModel) -> list[int] | None:
    if model.example_inputs:
        return list(model.example_inputs[0].shape)
    return None


def _macs_from_graph(model: LoadedModel) -> dict[str, tuple[int, int]]:
    found: dict[str, tuple[int, int]] = {}
    for node in model.exported.graph_module.graph.nodes:
        target = str(node.target)
        if not any(k in target for k in ("aten.linear", "aten.conv")):
            continue
        stack = node.meta.get("nn_module_stack")
        w, out = node.args[1].meta.get("val"), node.meta.get("val")
        if not stack or w is None or out is None:
            continue
        path = list(stack.values())[-1][0]
        w_numel, rows, out_numel = (_concrete(v) for v in (w.numel(), w.shape[0], out.numel()))
        if None in (w_numel, rows, out_numel) or not rows:
            continue  # a dynamic size without an example value: MACs unknown, not a guess
        found[path] = (out_numel * (w_numel // rows), out_numel)
    return found


def _concrete(n: Any) -> int | None:
    """An int from a size that may be symbolic (a program exported with dynamic shapes): its
    example value (the hint torch recorded) when there is one. int() on an unbacked symbol
    would raise a data-dependent guard error."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def analyze(
    model: LoadedModel | str | None = None,
    *,
    input_shape: list[int] | None = None,
    stats: bool = True,
    progress: Callable[[int, int], None] | None = None,
    trust_pickle: bool = False,
) -> ModelReport:
    """Inventory a model: per-layer facts, model totals, family guess and findings."""
    if not isinstance(model, LoadedModel):
        model = load_model(model, trust_pickle=trust_pickle)
    # The inventory is the model's own parameters; the statistics are those of the weights as they
    # ship (BatchNorm folded, as the converter does), since those are what gets compressed.
    from compressadvise.model.deploy import deployable_values, shipped_elements

    folds, values = deployable_values(model, example_inputs_for(model, input_shape))
    types = _module_types(model)
    groups, order, tied, total_unique, buffers = _group_tensors(model, values, stats, progress)
    if total_unique == 0:
        raise BadModel(f"{model.source}: the model has no parameters")
    layer_rows = [n for n in order if groups[n]["weight"] is not None]
    _norms_by_statistics(types, groups, buffers)
    macs, shape = _macs(model, input_shape) if model.has_graph else ({}, None)
    from compressadvise.model.graph import output_writers, roles_for

    roles, roles_note = roles_for(model, groups, types)
    layers = _build_layers(layer_rows, groups, types, total_unique, macs, roles)
    _mark_folds(layers, folds)
    report = _report(model, layers, groups, total_unique, tied, macs, shape)
    report.roles_source, report.buffers, report.buffer_elements = roles_note, buffers, sum(b.elements for b in buffers)
    report.shipped_elements = shipped_elements(report)
    from compressadvise.model.ops import from_layers, model_ops

    report.ops = model_ops(model, example_inputs_for(model, input_shape)) or from_layers(report)
    report.kv = kv_shape(model)
    if folds:
        report.notes.append(f"{len(folds)} BatchNorm(s) fold into the layer before them when converted (as Core ML's "
                            "converter does): their statistics are those of the folded weights that ship")
    return report


def _group_tensors(model: LoadedModel, values: dict[str, Any], stats: bool,
                   progress: Callable[[int, int], None] | None) -> tuple[dict, list[str], dict[str, str], int, list]:
    """Tensors into layers: (groups, order, tied aliases, unique parameters, buffers)."""
    seen_storage: dict[tuple[int, int, tuple], str] = {}
    groups: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    tied: dict[str, str] = {}
    total_unique = 0
    total_tensors = model.tensor_count or 0
    if progress is not None and not total_tensors and model.format != "state_dict":
        total_tensors = sum(1 for _ in model.tensors())  # cheap for in-memory modules
    buffers = [BufferInfo(name=n, elements=b.numel(), dtype=str(b.dtype).replace("torch.", ""))
               for n, b in model.buffers()]
    for i, (tname, t) in enumerate(model.tensors()):
        if progress is not None:
            progress(i + 1, total_tensors)
        if model.weight_only and BUFFER_NAMES.search(tname):
            buffers.append(BufferInfo(name=tname, elements=t.numel(), dtype=str(t.dtype).replace("torch.", "")))
            continue  # running statistics in a state dict: buffers, recognised by name
        if not t.is_floating_point():
            continue  # integer buffers (e.g. BatchNorm's num_batches_tracked) are not weights
        layer_name, kind = split_tensor_name(tname)
        key = (None if not t.numel() else (i, 0, ()) if model.streamed
               else (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)))
        first_owner = seen_storage.get(key) if key else None
        if key and first_owner is None:
            seen_storage[key] = tname
            total_unique += t.numel()
        elif first_owner is not None:
            tied[tname] = first_owner
        g = groups.get(layer_name)
        if g is None:
            g = groups[layer_name] = {"tensors": [], "params": 0, "weight": None, "stats": None}
            order.append(layer_name)
        g["tensors"].append(tname)
        if first_owner is None:
            g["params"] += t.numel()
        if kind == "weight" and g["weight"] is None:
            g["weight"] = list(t.shape)
            g["tied_to"] = split_tensor_name(first_owner)[0] if first_owner else None
            if stats and t.is_floating_point() and t.numel():
                g["stats"] = weight_stats(values.get(tname, t))
    return groups, order, tied, total_unique, buffers


def _build_layers(rows: list[str], groups: dict, types: dict, total: int, macs: dict,
                  roles: Any = None) -> list[LayerInfo]:
    layers: list[LayerInfo] = []
    weight_rows = [n for n in rows if len(groups[n]["weight"]) >= 2]
    if roles is not None:  # execution order from the graph; unused layers last
        ranked = {n: i for i, n in enumerate(roles.order)}
        weight_rows.sort(key=lambda n: ranked.get(n, len(ranked)))
        live = [n for n in weight_rows if n not in roles.dead]
        first, last = (live[0], live[-1]) if live else (None, None)
    else:
        first, last = (weight_rows[0], weight_rows[-1]) if weight_rows else (None, None)
    from compressadvise.model.graph import output_writers

    writers = output_writers(roles, groups) if roles is not None else None
    by_child: dict[str, list[str]] = defaultdict(list)
    for n in weight_rows:
        by_child[n.split(".", 1)[0]].append(n)
    # Entry/exit layers of every sub-model (a top-level child holding several weight layers).
    boundary = {first, last}
    for v in by_child.values():
        if len(v) > 1:
            boundary |= {v[0], v[-1]}
    for idx, name in enumerate(rows):
        g = groups[name]
        shape = g["weight"]
        rmod = recurrent_module(name)
        cls, grp = types.get(name) or (types.get(rmod) if rmod is not None else None) or (None, 1)
        ltype = _classify(name, shape, cls, grp)
        if ltype == "depthwise_conv" and name == first and not grp:
            ltype = "conv"  # a model's first conv has nothing to be depthwise over
        grp = grp or (shape[0] if ltype == "depthwise_conv" else 1)
        numel = math.prod(shape)
        out_ch = shape[0] if shape else 1
        in_ch = shape[1] if len(shape) > 1 else 1
        mac = macs.get(name)
        is_2d = len(shape) >= 2
        layers.append(LayerInfo(
            name=name, type=ltype, module_type=cls, tensors=g["tensors"], params=g["params"],
            share=g["params"] / total, weight_shape=shape, weight_elements=numel,
            out_channels=out_ch, in_channels=in_ch, groups=grp,
            bytes_fp32=g["params"] * 4, bytes_fp16=g["params"] * 2, index=idx,
            is_first=name == first, is_last=name == last, is_boundary=is_2d and name in boundary,
            is_classifier=(name in writers if writers is not None else name == last) and ltype == "linear",
            is_dead=roles is not None and name in roles.dead,
            writes_output=name in writers if writers is not None else name == last,
            is_embedding=ltype == "embedding", tied_to=g.get("tied_to"),
            is_recurrent=ltype == "recurrent", gates=_gates(name, cls, shape, groups) if ltype == "recurrent" else 0,
            out_divisible_by=[d for d in DIVISORS if out_ch % d == 0],
            in_divisible_by=[d for d in DIVISORS if in_ch % d == 0],
            stats=g["stats"], macs=mac[0] if mac else None,
            activation_elements=mac[1] if mac else None,
        ))
    return layers


def _norms_by_statistics(types: dict, groups: dict, buffers: list[BufferInfo]) -> None:
    """A weight-only file's norms: the layer that owns running statistics is a BatchNorm."""
    for b in buffers:
        owner, kind = b.name.rsplit(".", 1) if "." in b.name else ("", b.name)
        if kind == "running_mean" and owner in groups and owner not in types:
            types[owner] = ("BatchNorm", 0)


def _mark_folds(layers: list[LayerInfo], folds: dict[str, str]) -> None:
    into = {bn: layer for layer, bn in folds.items()}
    for x in layers:
        x.folded_bn, x.folded_into = folds.get(x.name), into.get(x.name)


def _gates(name: str, cls: str | None, shape: list[int], groups: dict) -> int:
    """Gate blocks in a recurrent weight: from the module class, else from the hidden size
    (weight_hh is (gates * hidden, hidden)) for weight-only files."""
    if cls in RECURRENT_GATES:
        return RECURRENT_GATES[cls]
    m = RECURRENT_TENSOR.match(name)
    hh = groups.get(f"{m['module']}{'.' if m['module'] else ''}weight_hh{m['rest']}") if m else None
    hidden = hh["weight"][1] if hh and hh.get("weight") and len(hh["weight"]) == 2 else 0
    return shape[0] // hidden if hidden and shape and shape[0] % hidden == 0 else 0


def _report(model: LoadedModel, layers: list[LayerInfo], groups: dict, total: int,
            tied: dict[str, str], macs: dict, shape: list[int] | None) -> ModelReport:
    breakdown: dict[str, TypeBreakdown] = {}
    for layer in layers:
        b = breakdown.setdefault(layer.type, TypeBreakdown(count=0, params=0, share=0.0))
        b.count += 1
        b.params += layer.params
    other = total - sum(b.params for b in breakdown.values())
    if other > 0:  # tensors that belong to no weight layer (e.g. stray buffers, positional tables)
        breakdown.setdefault("other", TypeBreakdown(count=0, params=0, share=0.0)).params += other
    for b in breakdown.values():
        b.share = b.params / total
    family, evidence = _family(layers, total)
    findings = layer_findings(layers, tied)
    emb = sum(x.params for x in layers if x.is_embedding) / total
    tied_groups: dict[str, list[str]] = defaultdict(list)
    for name, owner in tied.items():
        tied_groups[owner].append(name)
    return ModelReport(
        source=model.source, format=model.format, sha256=model.sha256, has_graph=model.has_graph,
        notes=list(model.notes), total_params=total, total_bytes_fp32=total * 4,
        total_bytes_fp16=total * 2,
        compressible_params=sum(x.params for x in layers if x.type in ("linear", "conv", "depthwise_conv", "embedding", "attention")),
        layer_types=breakdown, embedding_share=emb, family=family, family_evidence=evidence,
        tied_groups=[[k, *v] for k, v in tied_groups.items()], findings=findings,
        input_shape=shape, macs_total=sum(m for m, _ in macs.values()) if macs else None,
        layers=layers,
    )
