"""The operations a model runs, in graph order: what a placement check reads.

Which compute unit runs an operation is decided per operation type (and a few attributes:
a dilated convolution, fp32 compute), so the op sequence and its data-flow edges are all the
check needs. They come from the richest graph the input has:
- a torch.export program: its aten nodes (module path from `nn_module_stack`);
- a TorchScript archive: its inlined graph (`aten::lstm`...);
- eager code: a torch.fx trace (torch.nn layers are leaves: `LSTM`, `Conv2d`...), else a
  torch.export trace on the example inputs;
- a converted Core ML program (.mlpackage): its MIL operations, what the device really runs;
- weights only: the layer inventory (recurrent and embedding layers), with no order or edges.

Shape-only ops (view, permute, getitem...) carry no compute; they are dropped and their edges
passed through, so a list stays about as long as the model's real operations.
"""
from __future__ import annotations

from typing import Any, Iterable

from pydantic import BaseModel, Field

# Ops that move or rename a value without computing: they run wherever their input is.
NEUTRAL = frozenset({
    "getitem", "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "contiguous", "clone",
    "expand", "expand_as", "unsqueeze", "squeeze", "flatten", "alias", "detach", "dropout", "identity",
    "sym_size", "size", "dim", "to", "type_as", "_assert_tensor_metadata", "_assert_scalar", "lift_fresh_copy",
    "Dropout", "Identity", "Flatten", "const", "expand_dims", "NumToTensor", "ListConstruct",
    "TupleConstruct", "TupleUnpack", "ListUnpack", "Constant", "GetAttr", "TupleIndex", "ListIndex",
})
# Ops that make a fresh tensor (a zero hidden state, a range): they read only shapes, so they
# get no data-flow edges and run wherever their reader runs.
CREATION = frozenset({"zeros", "ones", "full", "empty", "arange", "zeros_like", "ones_like", "full_like",
                      "empty_like", "new_zeros", "new_ones", "new_full", "new_empty", "scalar_tensor", "tensor",
                      "randn", "rand", "linspace"})
_CONV = ("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
         "_convolution")


class OpRecord(BaseModel):
    """One operation: its type as the graph names it, the layer that called it, its inputs."""
    id: int
    op: str = Field(description="aten overload packet (conv2d, lstm), torch.nn class (LSTM) or MIL op type")
    layer: str = Field("", description="module path that ran it ('' when unknown)")
    inputs: list[int] = Field([], description="ids of the ops whose outputs it reads")
    out_elements: int | None = Field(None, description="elements of its (first) output, when known")
    dilation: int | None = Field(None, description="largest dilation of a convolution")
    dtype: str | None = Field(None, description="compute dtype when the graph says (fp16, fp32): Core ML programs")
    inside: int | None = Field(None, description="id of the loop or branch op whose body holds it (Core ML programs)")


class OpGraph(BaseModel):
    source: str = Field(description="where the ops came from: a graph kind, or 'layer inventory (no graph)'")
    ordered: bool = Field(True, description="ops are in execution order with data-flow edges")
    ops: list[OpRecord] = []


# ------------------------------------------------------------------ shared
def _compact(raw: list[tuple], source: str) -> OpGraph:
    """Number the non-neutral ops and route edges through the dropped neutral ones. A raw row is
    (key, op, layer, input keys, output elements, dilation, dtype[, key of the enclosing loop])."""
    keep: dict[Any, int] = {}
    through: dict[Any, list[int]] = {}  # a neutral node -> the kept ops its value comes from
    ops: list[OpRecord] = []
    for key, op, layer, inputs, out, dil, dtype, *parent in raw:
        srcs = [] if op in CREATION else list(dict.fromkeys(
            i for x in inputs for i in ([keep[x]] if x in keep else through.get(x, []))))
        if op in NEUTRAL:
            through[key] = srcs
            continue
        keep[key] = len(ops)
        ops.append(OpRecord(id=len(ops), op=op, layer=layer, inputs=srcs, out_elements=out, dilation=dil,
                            dtype=dtype, inside=keep.get(parent[0]) if parent and parent[0] is not None else None))
    return OpGraph(source=source, ops=ops)


def _numel(val: Any) -> int | None:
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    n = 1
    for d in shape:
        hint = d if isinstance(d, int) else getattr(getattr(d, "node", None), "hint", None)
        if hint is None:
            return None
        n *= int(hint)
    return n


def _max_int(v: Any) -> int | None:
    vals = [int(x) for x in v] if isinstance(v, (list, tuple)) else [int(v)] if isinstance(v, int) else []
    return max(vals) if vals else None


# ------------------------------------------------------------------ torch graphs
def _aten_name(target: Any) -> str:
    packet = getattr(target, "_overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(target, "__name__", None) or str(target)
    return name.split(".")[-1].split("::")[-1]


def from_fx_graph(graph: Any, modules: dict[str, Any] | None, source: str) -> OpGraph:
    """Ops of an fx graph (a torch.export program's or a symbolic trace's)."""
    raw = []
    for node in graph.nodes:
        if node.op not in ("call_function", "call_module", "call_method"):
            continue
        layer, dil = "", None
        if node.op == "call_module":
            mod = (modules or {}).get(str(node.target))
            op, layer = type(mod).__name__ if mod is not None else str(node.target), str(node.target)
            dil = _max_int(getattr(mod, "dilation", None)) if mod is not None else None
        else:
            op = str(node.target) if node.op == "call_method" else _aten_name(node.target)
            stack = node.meta.get("nn_module_stack")
            layer = list(stack.values())[-1][0] if stack else ""
            if op in _CONV and len(node.args) > 5:
                dil = _max_int(node.args[5])
        raw.append((node, op, layer, list(node.all_input_nodes), _numel(node.meta.get("val")), dil, None))
    return _compact(raw, source)


def from_script(scripted: Any) -> OpGraph:
    """Ops of a TorchScript module's inlined graph (aten::lstm -> lstm)."""
    graph = scripted.inlined_graph
    producer: dict[str, Any] = {}
    raw = []
    for node in graph.nodes():
        kind = node.kind()
        op = kind.split("::")[-1]
        inputs = [producer[v.debugName()] for v in node.inputs() if v.debugName() in producer]
        for o in node.outputs():
            producer[o.debugName()] = node
        dil = None
        if op in _CONV:
            args = list(node.inputs())
            dil = _max_int(_script_const(args[5])) if len(args) > 5 else None
        scope = node.scopeName().split("/")[-1].replace("__module.", "")  # traced archives record the module
        raw.append((node, op, scope, inputs, None, dil, None))
    return _compact(raw, "TorchScript graph")


def _script_const(value: Any) -> Any:
    node = value.node()
    if node.kind() == "prim::ListConstruct":
        return [_script_const(v) for v in node.inputs()]
    if node.kind() == "prim::Constant":
        return value.toIValue()
    return None


def from_layers(report: Any) -> OpGraph:
    """Weights only: the layers whose type alone decides placement (recurrent, embedding)."""
    from compressadvise.model.analysis import recurrent_module

    ops: list[OpRecord] = []
    seen: set[str] = set()
    for x in report.layers:
        op = {"recurrent": {4: "LSTM", 3: "GRU", 1: "RNN"}.get(x.gates, "LSTM"), "embedding": "Embedding"}.get(x.type)
        name = (recurrent_module(x.name) if x.type == "recurrent" else None) or x.name  # one op per LSTM module
        if op and name not in seen:
            seen.add(name)
            ops.append(OpRecord(id=len(ops), op=op, layer=name))
    return OpGraph(source="layer inventory (no graph)", ordered=False, ops=ops)


def model_ops(model: Any, example: tuple | None = None) -> OpGraph | None:
    """The op graph of a loaded model (None when none can be read; the layer inventory is the
    caller's fallback). `example` inputs give the fx trace its shapes."""
    traced = getattr(model, "traced_program", None)  # the export the graph roles fell back to
    try:
        if traced is not None:
            return from_fx_graph(traced.graph, None, "torch.export trace")
        if model.exported is not None:
            return from_fx_graph(model.exported.graph, None, "torch.export graph")
        if model.scripted is not None:
            return from_script(model.scripted)
    except Exception:
        return None
    if model.module is None:
        return None
    import torch

    try:
        gm = torch.fx.symbolic_trace(model.module)
        _shapes(gm, example if example is not None else model.example_inputs)
        return from_fx_graph(gm.graph, dict(gm.named_modules()), "torch.fx trace")
    except Exception:
        return None  # untraceable and not exported by the roles either: the layer inventory stands in


def _shapes(gm: Any, example: tuple | None) -> None:
    """Output shapes on the fx nodes (what a unit switch copies), when there are example inputs."""
    if example is None:
        return
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example)
    except Exception:
        return  # sizes stay unknown; the ops are still right
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        while isinstance(meta, (list, tuple)) and meta and not hasattr(meta, "shape"):
            meta = meta[0]  # a tuple output (LSTM: output, (h, c)): its first tensor is what flows on
        if meta is not None and hasattr(meta, "shape"):
            node.meta.setdefault("val", meta)


# ------------------------------------------------------------------ Core ML programs
_MIL_DTYPES = {"FLOAT16": "fp16", "FLOAT32": "fp32"}


def from_mlpackage(path: str) -> OpGraph:
    """Ops of a converted Core ML program, read from its spec (no Core ML runtime needed)."""
    from compressadvise.backends import import_quietly, quiet

    ct = import_quietly("coremltools")
    with quiet():
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    if not spec.HasField("mlProgram"):
        return OpGraph(source="Core ML neural network (not an ML program): ops not read", ordered=False)
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    raw: list = []
    consts: dict[str, Any] = {}
    _walk_mil(block.operations, raw, {}, consts, ct, None)
    return _compact(raw, "Core ML program")


def _walk_mil(operations: Iterable[Any], raw: list, producer: dict[str, Any], consts: dict[str, Any], ct: Any,
              parent: Any) -> None:
    for op in operations:
        names = [a.name for arg in op.inputs.values() for a in arg.arguments if a.name]
        out = op.outputs[0] if op.outputs else None
        dtype = None
        if out is not None and out.type.HasField("tensorType"):
            dtype = _MIL_DTYPES.get(ct.proto.MIL_pb2.DataType.Name(out.type.tensorType.dataType))
        if op.type == "const" and out is not None:
            consts[out.name] = op
        dil = _mil_ints(op, "dilations", consts) if op.type in ("conv", "conv_transpose") else None
        key = op.outputs[0].name if out is not None else id(op)
        raw.append((key, op.type, out.name if out is not None else "",
                    [producer[n] for n in names if n in producer], _mil_numel(out), dil, dtype, parent))
        for o in op.outputs:
            producer[o.name] = key
        for blk in op.blocks:  # while_loop / cond bodies run where the loop runs
            _walk_mil(blk.operations, raw, producer, consts, ct, key if parent is None else parent)


def _mil_ints(op: Any, arg: str, consts: dict[str, Any]) -> int | None:
    binding = op.inputs.get(arg)
    if binding is None or not binding.arguments:
        return None
    a = binding.arguments[0]
    value = a.value if a.HasField("value") else None
    if value is None and a.name in consts:
        value = consts[a.name].attributes["val"]
    if value is None:
        return None
    ints = list(value.immediateValue.tensor.ints.values)
    return max(ints) if ints else None


def _mil_numel(out: Any) -> int | None:
    if out is None or not out.type.HasField("tensorType"):
        return None
    n = 1
    for d in out.type.tensorType.dimensions:
        if not d.HasField("constant"):
            return None
        n *= int(d.constant.size)
    return n
