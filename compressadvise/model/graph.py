"""Layer roles from the model's graph, not from parameter order.

The order parameters are registered in says little: a decoder's LM head may be registered
first, a BERT pooler last although no output uses it, a state dict is sorted by name. The graph
says what matters to an expert: which layer runs first, which ones write an output directly
(a classifier, an LM head), and which weights no output depends on (dead: leave them out).

Works on a torch.export program's graph (weights are placeholders) and on a torch.fx trace of an
eager module (weights are modules or get_attr nodes). Weight-only formats have no graph: analysis
falls back to names and says so.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

# Ops that pass a value on without mixing in weights of their own: the walk from an output goes
# through them (and through norms) to the layers that write the output.
_STOP_TYPES = ("linear", "conv", "depthwise_conv", "embedding", "attention", "recurrent")


@dataclass(frozen=True)
class GraphRoles:
    order: tuple[str, ...]  # layers in the order their weights are first used
    feeds_output: frozenset[str]  # compute layers whose output reaches an output through weight-free ops
    dead: frozenset[str]  # layers whose weights no output depends on
    source: str  # "torch.export graph" or "torch.fx trace"
    notes: tuple[str, ...] = field(default=())


def roles_from_program(ep: Any, layer_of: Callable[[str], str], type_of: Callable[[str], str]) -> GraphRoles:
    """Roles from a torch.export program: a weight is a placeholder named in the signature."""
    params = {**ep.graph_signature.inputs_to_parameters}
    reads = {}
    for node in ep.graph.nodes:
        layers = list(dict.fromkeys(layer_of(params[a.name]) for a in node.all_input_nodes
                                    if a.op == "placeholder" and a.name in params))
        if layers and node.op == "call_function":
            reads[node] = layers
    every = {layer_of(p) for p in params.values()}
    return _roles(ep.graph, reads, every, type_of, "torch.export graph")


def roles_from_module(module: Any, layer_of: Callable[[str], str], type_of: Callable[[str], str],
                      layers_under: Callable[[str], list[str]]) -> GraphRoles:
    """Roles from a torch.fx trace of an eager module (raises where it cannot be traced). torch.nn
    modules are leaves of the trace, so a call to one (say nn.TransformerEncoder) reads all its
    layers at once: within one call, parameter order stands for execution order."""
    import torch

    gm = torch.fx.symbolic_trace(module)
    attrs = {n: layer_of(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    reads = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            layers = layers_under(str(node.target))
        elif node.op in ("call_function", "call_method"):
            layers = list(dict.fromkeys(attrs[a] for a in node.all_input_nodes if a in attrs))
        else:
            continue
        if layers:
            reads[node] = layers
    every = {layer_of(n) for n, _ in module.named_parameters(remove_duplicate=False)}
    return _roles(gm.graph, reads, every, type_of, "torch.fx trace")


def roles_from_script(scripted: Any, layer_of: Callable[[str], str], type_of: Callable[[str], str]) -> GraphRoles:
    """Roles from a TorchScript module's inlined graph: a weight is a chain of prim::GetAttr from
    self, named by the attribute path."""
    graph = _ScriptGraph(scripted.inlined_graph)
    params = {n for n, _ in scripted.named_parameters()}
    path: dict[str, str] = {next(scripted.inlined_graph.inputs()).debugName(): ""}  # value name -> attribute path
    reads: dict[Any, list[str]] = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        if node.node.kind() == "prim::GetAttr":
            parent = path.get(next(node.node.inputs()).debugName())
            if parent is not None:
                name = node.node.s("name")
                path[node.node.output().debugName()] = f"{parent}.{name}" if parent else name
            continue
        layers = list(dict.fromkeys(layer_of(path[v.debugName()]) for v in node.node.inputs()
                                    if path.get(v.debugName()) in params))
        if layers:
            reads[node] = layers
    every = {layer_of(n) for n in params}
    return _roles(graph, reads, every, type_of, "TorchScript graph")


class _ScriptGraph:
    """A TorchScript graph seen the way `_roles` reads an fx graph: nodes in order, an output
    node, and each node's input nodes."""

    def __init__(self, graph: Any) -> None:
        self.nodes = [_ScriptNode(n) for n in graph.nodes()] + [_ScriptNode(graph.return_node(), "output")]
        producer = {o.debugName(): n for n in self.nodes for o in n.node.outputs()}  # values by their unique name
        for n in self.nodes:
            n.all_input_nodes = [producer[v.debugName()] for v in n.node.inputs() if v.debugName() in producer]


class _ScriptNode:
    def __init__(self, node: Any, op: str = "call_function") -> None:
        self.node, self.op, self.all_input_nodes = node, op, []


def _roles(graph: Any, reads: dict[Any, list[str]], every: set[str], type_of: Callable[[str], str],
           source: str) -> GraphRoles:
    order: list[str] = []
    for node in graph.nodes:
        for layer in reads.get(node, ()):
            if layer not in order:
                order.append(layer)
    outputs = [n for n in graph.nodes if n.op == "output"]
    live = _ancestors(outputs)
    used = {layer for node, layers in reads.items() if node in live for layer in layers}
    # Per returned value, the writer is the LAST compute layer (in execution order) it depends on
    # through weight-free ops: a residual stream reaches every block's projection that way, but
    # only the last one writes the value (the pooler for a pooled output, the head for logits).
    rank = {layer: i for i, layer in enumerate(order)}
    writers = {max(w, key=lambda x: rank.get(x, -1)) for value in _returned(outputs)
               if (w := _writers([value], reads, type_of))}
    return GraphRoles(tuple(order), frozenset(writers),
                      frozenset(x for x in every - used if type_of(x) in _STOP_TYPES + ("norm",)), source)


def _returned(outputs: list[Any]) -> list[Any]:
    """The values a graph returns, one by one (a TorchScript tuple is unpacked)."""
    values: list[Any] = []
    todo = [v for out in outputs for v in out.all_input_nodes]
    while todo:
        node = todo.pop(0)
        kind = node.node.kind() if hasattr(node, "node") and hasattr(node.node, "kind") else ""
        if kind in ("prim::TupleConstruct", "prim::ListConstruct", "prim::DictConstruct"):
            todo = list(node.all_input_nodes) + todo
        else:
            values.append(node)
    return values


def _ancestors(starts: list[Any], stop: Callable[[Any], bool] = lambda node: False) -> set[Any]:
    """Nodes the starts depend on, not walking past a node where `stop` says so."""
    seen: set[Any] = set()
    todo = deque(starts)
    while todo:
        node = todo.popleft()
        if node in seen:
            continue
        seen.add(node)
        if not stop(node):
            todo.extend(node.all_input_nodes)
    return seen


def _writers(outputs: list[Any], reads: dict[Any, list[str]], type_of: Callable[[str], str]) -> set[str]:
    """Compute layers an output depends on through weight-free ops and norms only: the walk stops
    at the first compute layer on each path (what it reads is not an output writer)."""
    def compute(node: Any) -> list[str]:
        return [x for x in reads.get(node, ()) if type_of(x) in _STOP_TYPES]

    return {x for node in _ancestors(outputs, lambda n: bool(compute(n))) for x in compute(node)}


# ------------------------------------------------------------------ analysis glue
def output_writers(roles: Any, groups: dict) -> set[str]:
    """Layers that write an output, with the aliases of tied ones (a head tied to the embedding)."""
    writers = set(roles.feeds_output)
    return writers | {n for n, g in groups.items() if g.get("tied_to") in writers}


def roles_for(model: Any, groups: dict, types: dict) -> tuple[Any, str]:
    """Roles from the graph where the format has one, with a note saying where they came from."""
    from compressadvise.model.analysis import _classify, recurrent_module, split_tensor_name

    def layer_of(tname: str) -> str:
        # A tied weight counts as its owner's: torch.export reads one shared table under one name
        # (a Llama's embedding look-up reads `lm_head.weight`), which left the owner looking dead.
        name, kind = split_tensor_name(tname)
        return (groups.get(name) or {}).get("tied_to") or name if kind == "weight" else name

    def type_of(name: str) -> str:
        g = groups.get(name)
        if g is None or g["weight"] is None:
            return "other"
        rmod = recurrent_module(name)
        cls, grp = types.get(name) or (types.get(rmod) if rmod is not None else None) or (None, 1)
        return _classify(name, g["weight"], cls, grp)

    def layers_under(path: str) -> list[str]:
        return [n for n in groups if n == path or n.startswith(path + ".")]  # parameter order

    try:
        if model.exported is not None:
            return roles_from_program(model.exported, layer_of, type_of), "roles from the torch.export graph"
        if model.scripted is not None:
            return roles_from_script(model.scripted, layer_of, type_of), "roles from the TorchScript graph"
    except Exception as e:
        return None, f"roles from parameter order: the graph could not be read ({type(e).__name__})"
    if model.module is None:
        return None, "roles guessed from names and parameter order (a weight-only file has no graph)"
    try:  # fx first (fast, no inputs needed); models it cannot trace (transformers, control flow): export
        return roles_from_module(model.module, layer_of, type_of, layers_under), "roles from a torch.fx trace"
    except Exception as fx_error:
        if model.example_inputs is None:
            return None, f"roles from parameter order: the module could not be traced ({type(fx_error).__name__})"
        try:
            import torch

            ep = torch.export.export(model.module, tuple(model.example_inputs), strict=False)
            model.traced_program = ep  # the op list reads the same trace (model.ops)
            return roles_from_program(ep, layer_of, type_of), "roles from a torch.export trace"
        except Exception as e:
            return None, (f"roles from parameter order: the module could not be traced "
                          f"(fx: {type(fx_error).__name__}, export: {type(e).__name__})")
