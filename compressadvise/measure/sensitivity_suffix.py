"""Run only what a layer's setting can change: the unchanged prefix once, the suffix per setting.

Compressing one layer changes nothing upstream of it. On a torch.fx graph of the model, the
nodes that depend on the layer's weight (its *suffix*: the weight's module call or get_attr and
everything downstream) are the only ones to recompute; the values that flow into the suffix from
outside it (the *frontier*: the layer's input, a residual branch's skip value, the graph inputs
where the suffix reads them) are computed once per layer and kept. Each setting of that layer then
costs a pass over the suffix only. The values are the same operations on the same tensors as a
full pass, so the outputs are identical (a test checks them to float tolerance).

Models torch.fx cannot trace (data-dependent control flow, TorchScript) run full passes; so do
frontiers over the memory bound (`max_bytes`), and the cost report says which layers did.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_FRONTIER_BYTES = 1 << 30  # per layer: past it, the layer's settings run full passes


@dataclass
class Suffix:
    """One layer's suffix: the nodes to rerun (in graph order) and the frontier values they read."""

    nodes: list[Any]
    frontier: list[Any]
    share: float  # of the model's weight-layer MACs the suffix holds (forward-pass equivalents per run;
    # the prefix, run once per layer, costs the rest)


class SuffixRunner:
    """A model traced once; per layer, its frontier values cached for the samples, its suffix rerun."""

    def __init__(self, model: Any, macs: dict[str, int] | None = None, max_bytes: int = MAX_FRONTIER_BYTES) -> None:
        import torch.fx as fx

        self.gm = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
        self.macs = macs or {}
        self.max_bytes = max_bytes
        self.params = dict(self.gm.named_parameters())
        self._cached: tuple[str, list[dict[Any, Any]]] | None = None  # (weight, frontier values per batch)
        self._suffixes: dict[str, Suffix] = {}

    # -------------------------------------------------------------- which nodes
    def suffix(self, weight: str) -> Suffix:
        if weight not in self._suffixes:
            self._suffixes[weight] = self._find_suffix(weight)
        return self._suffixes[weight]

    def _find_suffix(self, weight: str) -> Suffix:
        module, _, _ = weight.rpartition(".")
        graph = list(self.gm.graph.nodes)
        seeds = [n for n in graph if (n.op == "call_module" and n.target == module)
                 or (n.op == "get_attr" and n.target == weight)]
        if not seeds:
            raise LookupError(f"{weight}: no graph node reads it")
        inside: set[Any] = set()
        for n in graph:  # graph order is topological: one pass marks every descendant
            if n in seeds or any(a in inside for a in n.all_input_nodes):
                inside.add(n)
        nodes = [n for n in graph if n in inside]
        frontier = [n for n in graph if n not in inside and n.op != "get_attr"
                    and any(u in inside for u in n.users)]
        total = sum(self.macs.values()) or 1
        in_suffix = {str(n.target) for n in nodes if n.op == "call_module"} | \
                    {str(n.target).rpartition(".")[0] for n in nodes if n.op == "get_attr"}
        share = sum(m for name, m in self.macs.items() if name in in_suffix) / total if self.macs else 1.0
        return Suffix(nodes=nodes, frontier=frontier, share=min(1.0, share))

    # -------------------------------------------------------------- running
    def prefix(self, weight: str, batches: list[tuple]) -> bool:
        """Compute and keep the frontier values of `weight`'s suffix for every batch: a pass over
        the nodes outside the suffix only (1 - share of a forward pass). False when they would
        pass the memory bound (the caller then runs full passes)."""
        import torch

        sfx = self.suffix(weight)
        wanted = set(sfx.frontier)
        inside = set(sfx.nodes)
        outside = [n for n in self.gm.graph.nodes if n not in inside]
        kept: list[dict[Any, Any]] = []
        size = 0
        with torch.no_grad():
            for batch in batches:
                env = self._interpret(outside, dict(zip(self._placeholders(), batch)), wanted)
                kept.append({n: env[n] for n in sfx.frontier})
                size += sum(_nbytes(v) for v in kept[-1].values())
                if size > self.max_bytes:
                    self._cached = None
                    return False
        self._cached = (weight, kept)
        return True

    def run_suffix(self, weight: str) -> list[Any]:
        """The model's outputs per batch, recomputing only the suffix (the weight as it is now)."""
        import torch

        if self._cached is None or self._cached[0] != weight:
            raise LookupError(f"{weight}: no prefix cached")
        sfx = self.suffix(weight)
        outs = []
        with torch.no_grad():
            for values in self._cached[1]:
                env = self._interpret(sfx.nodes, dict(values), None)
                outs.append(env["__output__"])
        return outs

    def _placeholders(self) -> list[Any]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    def _interpret(self, nodes: list[Any], env: dict[Any, Any], keep: set[Any] | None) -> dict[Any, Any]:
        """Run `nodes` in order over `env` (node -> value); the output node's value under "__output__"."""
        import torch.fx as fx

        def load(a: Any) -> Any:
            return fx.node.map_arg(a, lambda n: env[n])

        last = {}  # node -> index of its last reader here: values are dropped after it (memory)
        for i, n in enumerate(nodes):
            for a in n.all_input_nodes:
                last[a] = i
        for i, n in enumerate(nodes):
            if n.op == "placeholder":
                continue
            if n.op == "get_attr":
                env[n] = _fetch(self.gm, str(n.target))
            elif n.op == "call_module":
                env[n] = self.gm.get_submodule(str(n.target))(*load(n.args), **load(n.kwargs))
            elif n.op == "call_function":
                env[n] = n.target(*load(n.args), **load(n.kwargs))
            elif n.op == "call_method":
                obj, *rest = load(n.args)
                env[n] = getattr(obj, str(n.target))(*rest, **load(n.kwargs))
            elif n.op == "output":
                env["__output__"] = load(n.args[0])
            for a in n.all_input_nodes:
                if last.get(a) == i and (keep is None or a not in keep):
                    env.pop(a, None)
        return env


def _fetch(gm: Any, target: str) -> Any:
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _nbytes(v: Any) -> int:
    import torch

    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    return 0
