"""The deployable form of a torch model: BatchNorm folded into the conv/linear before it.

coremltools' `ct.convert` folds every BatchNorm that directly follows a conv into that conv's
weight and bias (MIL pass `fuse_conv_batchnorm`), so the weights Core ML stores and compresses
are the folded ones, with new values. Planning and measuring on the unfolded torch weights
therefore describes a model that never ships; `fold_batchnorm` builds the one that does.

Pairs come from the traced graph, never from module order or names: a BN folds only when its
input is exactly the output of a conv/linear module called once, whose output nothing else
reads, and whose weight nothing else reads (no tied weights).
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# aten op (overload packet name) -> the module types that may have produced it
_LAYER_OPS: dict[str, tuple[type, ...]] = {
    "conv1d": (nn.Conv1d,), "conv2d": (nn.Conv2d,), "conv3d": (nn.Conv3d,),
    "conv_transpose1d": (nn.ConvTranspose1d,), "conv_transpose2d": (nn.ConvTranspose2d,),
    "conv_transpose3d": (nn.ConvTranspose3d,), "linear": (nn.Linear,),
    "convolution": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                    nn.ConvTranspose3d),
}
_BN_OPS = ("batch_norm", "_native_batch_norm_legit_no_training", "_native_batch_norm_legit",
           "_native_batch_norm_legit_functional", "native_batch_norm", "cudnn_batch_norm")
_LAYER_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d, nn.Linear)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
ALL_KINDS = ("conv", "conv_transpose", "linear")
# What coremltools 9.0 `ct.convert` folds itself (MIL pass fuse_conv_batchnorm): it leaves
# Linear -> BatchNorm1d as a linear op plus a batch_norm op, the linear weight unchanged.
CONVERTER_KINDS = ("conv", "conv_transpose")


@dataclass(frozen=True)
class Fold:
    """One BatchNorm folded into the layer before it."""

    layer: str  # module path of the conv/linear whose weight and bias changed
    bn: str  # module path of the BatchNorm, now nn.Identity
    kind: str  # "conv", "conv_transpose" or "linear"
    channels: int
    scale_min: float  # min over channels of gamma / sqrt(running_var + eps)
    scale_max: float

    def describe(self) -> str:
        return f"{self.bn} -> {self.layer}: per-channel scale {self.scale_min:.3g}x-{self.scale_max:.3g}x"


@dataclass(frozen=True)
class FoldResult:
    module: nn.Module  # the folded deep copy (the input module is never modified)
    folds: tuple[Fold, ...]
    route: str  # "torch.export", "torch.fx" or "none" (the graph could not be traced)
    notes: tuple[str, ...] = ()  # why BatchNorms were left alone, why tracing failed

    @property
    def note(self) -> str:
        return "; ".join(self.notes)

    def span(self) -> str:
        return describe_span(self.folds)


def describe_span(folds: tuple[Fold, ...] | list[Fold]) -> str:
    """E.g. 'folded per-channel scales span 0.27x-75x (52 BatchNorms)'."""
    if not folds:
        return "no BatchNorm folded"
    lo = min(f.scale_min for f in folds)
    hi = max(f.scale_max for f in folds)
    return f"folded per-channel scales span {lo:.3g}x-{hi:.3g}x ({len(folds)} BatchNorms)"


def deployable(model: Any, example_inputs: tuple | None = None) -> Any:
    """The LoadedModel as it ships: an eager module with its BatchNorms folded (`fold_batchnorm`),
    made once (the result says so) and shared by analyze, sensitivity, search and apply, so that
    what is planned and measured is what the converter writes. Other formats come back as they
    are: a TorchScript or torch.export program is not rewritten here (the converter still folds
    it; its Core ML side is matched by value)."""
    import dataclasses

    if model.deployed:
        return model
    if model.module is None and model.exported is not None:
        gm, folds = folded_program_module(model.exported)
        if not folds:
            return dataclasses.replace(model, deployed=True)
        return dataclasses.replace(model, program_module=gm, folds=folds, deployed=True, notes=[*model.notes, (
            f"{len(folds)} BatchNorm(s) folded into the conv before them in the program's graph, as Core ML's "
            f"converter does: measured as they ship ({describe_span(folds)})")])
    if model.module is None:
        return model
    inputs = example_inputs if example_inputs is not None else model.example_inputs
    if inputs is None:
        return dataclasses.replace(model, deployed=True, notes=[*model.notes, (
            "BatchNorm not folded: no example input to trace the graph with (pass --input-shape)")])
    if not any(isinstance(m, _BN_TYPES) for m in model.module.modules()):
        return dataclasses.replace(model, deployed=True)
    result = fold_batchnorm(model.module, tuple(inputs))
    notes = [*model.notes, *result.notes]
    if result.folds:
        notes.append(f"{len(result.folds)} BatchNorm(s) folded into the layer before them, as Core ML's "
                     f"converter does: planned, measured and compressed as they ship ({result.span()})")
    return dataclasses.replace(model, module=result.module, folds=result.folds, deployed=True, notes=notes)


def deployable_values(model: Any, example_inputs: tuple | None) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(layer -> BatchNorm folded into it, tensor name -> value as shipped) for analysis: an eager
    module not yet deployable is folded here, a program gets the converter's fold predicted;
    nothing for other formats or a model already folded."""
    if model.module is None and model.exported is not None:  # rewritten by the converter, not by us
        values, pfolds = program_folds(model.exported)
        return {f.layer: f.bn for f in pfolds}, values
    if model.module is None or model.deployed:
        return {}, {}
    deployed = deployable(model, example_inputs)
    if not deployed.folds:
        return {}, {}
    return ({f.layer: f.bn for f in deployed.folds},
            {n: p.detach() for n, p in deployed.module.named_parameters()})


def fold_batchnorm(module: nn.Module, example_inputs: tuple, kinds: tuple[str, ...] = ALL_KINDS) -> FoldResult:
    """A deep copy of `module` with every graph-adjacent conv/linear -> BatchNorm pair folded.

    `kinds` limits the layer kinds folded; CONVERTER_KINDS gives exactly the weights
    `ct.convert` would ship for the unfolded module.
    """
    folded = copy.deepcopy(module)
    notes: list[str] = []
    try:
        pairs, route = _export_pairs(folded, tuple(example_inputs), notes), "torch.export"
    except Exception as export_error:  # unexportable: symbolic tracing covers some other models
        try:
            pairs, route = _fx_pairs(folded, tuple(example_inputs), notes), "torch.fx"
            notes.insert(0, f"torch.export failed ({_first_line(export_error)}); pairs found with torch.fx")
        except Exception as fx_error:
            notes.append(f"not folded: torch.export failed ({_first_line(export_error)}) and "
                         f"torch.fx.symbolic_trace failed ({_first_line(fx_error)})")
            return FoldResult(folded, (), "none", tuple(notes))
    kept = [(layer, bn) for layer, bn in pairs if _kind(folded.get_submodule(layer)) in kinds]
    notes += [f"{bn} not folded: {_kind(folded.get_submodule(layer))} is not among kinds {kinds}"
              for layer, bn in pairs if (layer, bn) not in kept]
    folds = [_apply(folded, layer, bn) for layer, bn in kept]
    return FoldResult(folded, tuple(folds), route, tuple(notes))


# ------------------------------------------------------------------ a program the converter folds
_CONV_OPS = ("conv1d", "conv2d", "conv3d", "convolution")


@torch.no_grad()
def program_folds(ep: Any) -> tuple[dict[str, torch.Tensor], tuple[Fold, ...]]:
    """For a torch.export program (no eager code to rewrite): the conv weights as `ct.convert`
    will write them, BatchNorm folded in (its pass fuse_conv_batchnorm folds conv -> batch_norm
    when the conv output has no other user). Keyed by parameter name, so analysis measures and
    the Core ML side finds (by value) the weights that ship."""
    sig = ep.graph_signature
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    state = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}

    def tensor(arg: Any) -> torch.Tensor | None:
        name = names.get(getattr(arg, "name", "")) if getattr(arg, "op", None) == "placeholder" else None
        return state.get(name) if name else None

    values: dict[str, torch.Tensor] = {}
    folds: list[Fold] = []
    for bn in ep.graph.nodes:
        if bn.op != "call_function" or _op(bn) not in ("_native_batch_norm_legit_no_training", "batch_norm"):
            continue
        conv = bn.args[0]
        if (getattr(conv, "op", None) != "call_function" or _op(conv) not in _CONV_OPS or len(conv.users) != 1
                or (_op(conv) == "convolution" and conv.args[6])):  # transposed: left to the converter
            continue
        w_arg = conv.args[1]
        w, var, mean = tensor(w_arg), tensor(bn.args[4]), tensor(bn.args[3])
        if w is None or var is None or mean is None or len(w_arg.users) != 1:
            continue
        eps = bn.args[6] if _op(bn) == "_native_batch_norm_legit_no_training" else bn.args[7]
        bias = tensor(conv.args[2]) if len(conv.args) > 2 else None
        w_name = names[w_arg.name]
        b_name = names.get(getattr(conv.args[2], "name", ""), "") if len(conv.args) > 2 and conv.args[2] is not None else ""
        values[w_name], values[b_name or w_name.rsplit(".", 1)[0] + ".bias"], scale = _fold(
            w, bias, tensor(bn.args[1]), tensor(bn.args[2]), mean, var, eps)
        bn_name = names.get(getattr(bn.args[3], "name", ""), "").rsplit(".", 1)[0]
        folds.append(Fold(w_name.rsplit(".", 1)[0], bn_name, "conv", int(scale.numel()),
                          float(scale.min()), float(scale.max())))
    return values, tuple(folds)


@torch.no_grad()
def folded_program_module(ep: Any) -> tuple[Any, tuple[Fold, ...]]:
    """The program's runnable GraphModule (`ep.module()`) with the same folds `program_folds`
    predicts applied to its graph: what sensitivity measures for a .pt2 is then what the converter
    writes. Pairs it cannot rewrite safely (a shared or computed bias) are left unfolded."""
    gm = ep.module()
    folds: list[Fold] = []
    for bn in list(gm.graph.nodes):
        if bn.op == "call_function" and _op(bn) in ("batch_norm", "_native_batch_norm_legit_no_training"):
            fold = _fold_graph_pair(gm, bn)
            if fold is not None:
                folds.append(fold)
    gm.graph.lint()
    gm.recompile()
    return gm, tuple(folds)


def _fold_graph_pair(gm: Any, bn: Any) -> Fold | None:
    conv = bn.args[0]
    if (getattr(conv, "op", None) != "call_function" or _op(conv) not in _CONV_OPS or len(conv.users) != 1
            or (_op(conv) == "convolution" and conv.args[6])):
        return None
    native = _op(bn) == "_native_batch_norm_legit_no_training"
    if not native and bn.args[5]:  # training=True: batch statistics, nothing to fold
        return None
    w_node = conv.args[1]
    b_node = conv.args[2] if len(conv.args) > 2 else None
    attrs = [_graph_attr(gm, a) for a in (w_node, *bn.args[1:5])]
    w, gamma, beta, mean, var = attrs
    if w is None or mean is None or var is None or len(w_node.users) != 1:
        return None
    if b_node is not None and (_graph_attr(gm, b_node) is None or len(b_node.users) != 1):
        return None
    eps = bn.args[6] if native else bn.args[7]
    w = _owned(gm, w_node.target)  # ep.module() shares the program's tensors: never write into those
    old_b = _owned(gm, b_node.target) if b_node is not None else None
    new_w, new_b, scale = _fold(w, old_b, gamma, beta, mean, var, eps)
    w.copy_(new_w)
    layer = w_node.target.rpartition(".")[0]
    if old_b is not None:
        old_b.copy_(new_b)
    else:
        owner = gm.get_submodule(layer) if layer else gm
        if hasattr(owner, "bias"):
            return None  # a name in the way: leave this pair to the converter
        owner.register_parameter("bias", nn.Parameter(new_b, requires_grad=False))
        with gm.graph.inserting_before(conv):
            bias_node = gm.graph.get_attr(f"{layer}.bias" if layer else "bias")
        args = list(conv.args) + [None] * max(0, 3 - len(conv.args))
        args[2] = bias_node
        conv.args = tuple(args)
    # named before the node goes: an erased node keeps no arguments to read the name from
    bn_name = bn.args[3].target.rpartition(".")[0] if getattr(bn.args[3], "op", None) == "get_attr" else ""
    for user in list(bn.users) if native else [bn]:
        user.replace_all_uses_with(conv)
        if user is not bn:
            gm.graph.erase_node(user)
    gm.graph.erase_node(bn)
    return Fold(layer, bn_name, "conv", int(scale.numel()), float(scale.min()), float(scale.max()))


def _owned(gm: Any, target: str) -> torch.Tensor:
    """Replace the graph module's tensor at `target` with a private copy, and return it."""
    path, _, name = target.rpartition(".")
    owner = gm.get_submodule(path) if path else gm
    value = getattr(owner, name)
    copy_ = value.detach().clone()
    if isinstance(value, nn.Parameter):
        owner.register_parameter(name, nn.Parameter(copy_, requires_grad=False))
    else:
        owner.register_buffer(name, copy_)
    return copy_


def _graph_attr(gm: Any, node: Any) -> torch.Tensor | None:
    if getattr(node, "op", None) != "get_attr":
        return None
    try:
        value = gm.get_parameter(node.target)
    except AttributeError:
        try:
            value = gm.get_buffer(node.target)
        except AttributeError:
            return None
    return value.data if isinstance(value, torch.Tensor) else None


# ------------------------------------------------------------------ finding pairs: torch.export
def _export_pairs(root: nn.Module, inputs: tuple, notes: list[str]) -> list[tuple[str, str]]:
    ep = torch.export.export(root, inputs, strict=False)
    sig = ep.graph_signature
    fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    calls: dict[str, set[str]] = defaultdict(set)  # module path -> distinct call keys
    scope: dict[str, list[Any]] = defaultdict(list)  # module path -> op nodes innermost in it
    for node in ep.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        for key, (path, _) in stack.items():
            calls[path].add(key)
        if node.op == "call_function" and stack:
            scope[list(stack.values())[-1][0]].append(node)
    pairs: list[tuple[str, str]] = []
    for path, nodes in scope.items():
        bn = _module(root, path)
        if not isinstance(bn, _BN_TYPES):
            continue
        bn_nodes = [n for n in nodes if _op(n) in _BN_OPS]
        reason = _bn_unfit(bn, len(calls[path]), bn_nodes, nodes)
        if reason is None:
            reason = _export_layer_unfit(root, bn_nodes[0], path, fqn, calls, scope)
        if reason is None:
            pairs.append((_path(bn_nodes[0].args[0]), path))
        elif reason:
            notes.append(f"{path} not folded: {reason}")
    return pairs


def _bn_unfit(bn: nn.Module, ncalls: int, bn_nodes: list, nodes: list) -> str | None:
    if bn.training:
        return "in training mode (batch statistics); call .eval() before folding"
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False)"
    if not bn_nodes:
        return "no batch_norm op in its traced forward"
    if ncalls != 1 or len(bn_nodes) != 1:
        return f"called {max(ncalls, len(bn_nodes))} times"
    extra = [n for n in nodes if n is not bn_nodes[0] and not _is_getitem_of(n, bn_nodes[0])]
    if extra:  # e.g. a BatchNorm subclass whose forward does more than normalise
        return f"its forward also computes {_op(extra[0])}"
    return None


def _export_layer_unfit(root: nn.Module, bn_node: Any, bn_path: str, fqn: dict[str, str],
                        calls: dict[str, set[str]], scope: dict[str, list]) -> str | None:
    """Why the node feeding this BN is not a foldable layer ('' = nothing to say: not a layer)."""
    src = bn_node.args[0]
    if getattr(src, "op", None) != "call_function" or _op(src) not in _LAYER_OPS:
        return ""  # not fed by a conv/linear (relu, add, ...): silently nothing to fold
    path = _path(src)
    layer = _module(root, path)
    if not isinstance(layer, _LAYER_OPS[_op(src)]):
        return f"its input comes from a functional {_op(src)}, not a module"
    if _tied(root, layer):
        return f"{path} shares its weight with another module (tied weights)"
    if len(calls[path]) != 1 or sum(_op(n) in _LAYER_OPS for n in scope[path]) != 1:
        return f"{path} is called more than once"
    if len(src.users) != 1:
        return f"the output of {path} is also read elsewhere"
    for arg, name in zip(src.args[1:3], ("weight", "bias")):
        if arg is None:
            continue
        if getattr(arg, "op", None) == "placeholder" and len(arg.users) != 1:
            return f"{path}.{name} is shared with other ops (tied weights)"
        if not _is_own(root, fqn, arg, getattr(layer, name)):
            return f"{path} computes its {name} (not its own parameter)"
    bn = root.get_submodule(bn_path)
    for arg, name in zip(bn_node.args[1:5], ("weight", "bias", "running_mean", "running_var")):
        if arg is not None and not _is_own(root, fqn, arg, getattr(bn, name)):
            return f"its {name} is not its own tensor"
    if _op(bn_node) == "batch_norm" and bn_node.args[5]:
        return "traced in training mode"
    return _rank_unfit(layer, path, getattr(src.meta.get("val"), "shape", None))


def _rank_unfit(layer: nn.Module, path: str, shape: Any) -> str | None:
    """BN normalises dim 1: that must be the layer's output-channel dim."""
    if shape is None:
        return f"output shape of {path} unknown"
    want = 2 if isinstance(layer, nn.Linear) else len(layer.kernel_size) + 2
    if len(shape) != want:  # e.g. Linear on (N, L, F) or an unbatched conv: dim 1 is not the channels
        return f"{path} output has rank {len(shape)}, so dim 1 is not its output channels"
    return None


# ------------------------------------------------------------------ finding pairs: torch.fx
def _fx_pairs(root: nn.Module, inputs: tuple, notes: list[str]) -> list[tuple[str, str]]:
    from torch.fx.passes.shape_prop import ShapeProp

    gm = torch.fx.symbolic_trace(root)
    ShapeProp(gm).propagate(*inputs)  # output shapes, for the rank check
    calls: dict[str, int] = defaultdict(int)
    attr_reads: set[str] = set()  # modules whose tensors are read outside their own call
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] += 1
        elif node.op == "get_attr":
            attr_reads.add(node.target.rsplit(".", 1)[0])
    pairs: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(bn := _module(root, node.target), _BN_TYPES):
            continue
        reason = _fx_unfit(root, node, bn, calls, attr_reads)
        if reason is None:
            pairs.append((node.args[0].target, node.target))
        elif reason:
            notes.append(f"{node.target} not folded: {reason}")
    return pairs


def _fx_unfit(root: nn.Module, node: Any, bn: nn.Module, calls: dict[str, int], attr_reads: set[str]) -> str | None:
    reason = _bn_unfit(bn, calls[node.target], [node], [node])
    if reason is not None:
        return reason
    src = node.args[0] if node.args else None
    if getattr(src, "op", None) != "call_module" or not isinstance(layer := _module(root, src.target), _LAYER_TYPES):
        return ""
    if calls[src.target] != 1:
        return f"{src.target} is called more than once"
    if len(src.users) != 1:
        return f"the output of {src.target} is also read elsewhere"
    if src.target in attr_reads or node.target in attr_reads or _tied(root, layer):
        return "its tensors are also read directly (tied or shared)"
    meta = src.meta.get("tensor_meta")
    return _rank_unfit(layer, src.target, getattr(meta, "shape", None))


# ------------------------------------------------------------------ folding
@torch.no_grad()
def _apply(root: nn.Module, layer_path: str, bn_path: str) -> Fold:
    layer, bn = root.get_submodule(layer_path), root.get_submodule(bn_path)
    w = layer.weight
    new_w, new_bias, scale = _fold(w, layer.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps,
                                   scaled=lambda w64, s: _scaled(layer, w64, s))
    layer.weight.copy_(new_w)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias, requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(new_bias)
    _replace(root, bn_path, nn.Identity())
    return Fold(layer_path, bn_path, _kind(layer), int(scale.numel()), float(scale.min()), float(scale.max()))


def _fold(w: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None, beta: torch.Tensor | None,
          mean: torch.Tensor, var: torch.Tensor, eps: float,
          scaled: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The one fold arithmetic (eager modules and program graphs): (weight, bias, per-channel
    scale) with y = conv(x) * scale + (beta - mean * scale). In float64, so folding adds no
    rounding of its own beyond the final cast. `scaled` scales the weight per output channel
    (dim 0 by default; ConvTranspose passes its own layout)."""
    var64, mean64 = var.double(), mean.double()
    gamma64 = gamma.double() if gamma is not None else torch.ones_like(var64)
    beta64 = beta.double() if beta is not None else torch.zeros_like(var64)
    scale = gamma64 / torch.sqrt(var64 + eps)
    w64 = w.double()
    new_w = scaled(w64, scale) if scaled else w64 * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b64 = bias.double() if bias is not None else torch.zeros_like(mean64)
    return new_w.to(w.dtype), ((b64 - mean64) * scale + beta64).to(w.dtype), scale


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    return "conv_transpose" if isinstance(layer, nn.modules.conv._ConvTransposeNd) else "conv"


def _scaled(layer: nn.Module, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Weight scaled per output channel (dim 0, except ConvTranspose: (in, out/groups, k...))."""
    if isinstance(layer, nn.modules.conv._ConvTransposeNd):
        g = layer.groups
        grouped = w.reshape(g, w.shape[0] // g, w.shape[1], *w.shape[2:])
        s = scale.reshape(g, 1, w.shape[1], *([1] * (w.dim() - 2)))
        return (grouped * s).reshape(w.shape)
    return w * scale.reshape(-1, *([1] * (w.dim() - 1)))


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


# ------------------------------------------------------------------ small helpers
def _op(node: Any) -> str:
    """aten overload packet name of a call node ('conv2d', 'batch_norm', ...)."""
    target = getattr(node, "target", None)
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", "") if packet is not None else getattr(target, "__name__", "")


def _path(node: Any) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


def _module(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _tied(root: nn.Module, layer: nn.Module) -> bool:
    """Whether folding would also change another module: its weight/bias is registered twice."""
    mine = {id(p) for p in (layer.weight, layer.bias) if p is not None}
    return sum(id(p) in mine for _, p in root.named_parameters(remove_duplicate=False)) > len(mine)


def _is_own(root: nn.Module, fqn: dict[str, str], arg: Any, tensor: Any) -> bool:
    """Whether a graph input is exactly this module's tensor (tied tensors export under one name)."""
    name = fqn.get(getattr(arg, "name", "")) if getattr(arg, "op", None) == "placeholder" else None
    if name is None or tensor is None:
        return False
    owner, _, attr = name.rpartition(".")
    return getattr(_module(root, owner), attr, None) is tensor


def _is_getitem_of(node: Any, src: Any) -> bool:
    return getattr(node.target, "__name__", "") == "getitem" and node.args and node.args[0] is src


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


FOLDED_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def shipped_elements(report: Any) -> int:
    """Values the converted model stores, the basis of every size prediction: the parameters, less
    dead layers' (the converter drops ops no output uses), plus float buffers, which ship as fp16
    constants (a fixed STFT basis, a positional table) except the statistics of a BatchNorm that
    folds into the layer before it. Folds are found for eager modules and .pt2 programs; elsewhere
    (TorchScript, weight-only files) every BatchNorm is taken to fold: most follow a conv."""
    folded = {x.name for x in report.layers if x.folded_into}
    folds_known = report.has_graph and report.format != "torchscript"
    dead = sum(x.params for x in report.layers if x.is_dead)
    constants = 0
    for b in report.buffers:
        owner, _, leaf = b.name.rpartition(".")
        if not b.dtype.startswith(("float", "bfloat", "half")):
            continue  # integer ids and counters: tiny int32 constants at most
        if leaf in FOLDED_STATISTICS and (owner in folded or not folds_known):
            continue
        constants += b.elements
    return report.total_params - dead + constants

