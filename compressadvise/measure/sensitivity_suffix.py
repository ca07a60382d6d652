"""Run only what a layer's setting can change: the unchanged prefix once, the suffix per setting.

Compressing one layer changes nothing upstream of it. On a torch.fx graph of the model, the
nodes that depend on the layer's weight (its *suffix*: the weight's module call or get_attr and
everything downstream) are the only ones to recompute; the values that flow into the suffix from
outside it (the *frontier*: the layer's input, a residual branch's skip value, the graph inputs
where the suffix reads them) are computed once per layer and kept. Each setting of that layer then
costs a pass over the suffix only. The values are the same operations on the same tensors as a
full pass, so the outputs are identical (a test checks them to float tolerance).

When a run measures several layers, one pass with the original weights computes all their
frontiers at once (`prefixes`: the graph up to the deepest frontier, each value kept once however
many frontiers share it), instead of one prefix pass per layer: on a 53-layer CNN the prefixes of
a run cost at most one forward pass, not the sum of 53 partial ones.

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
        self._many: dict[str, list[dict[Any, Any]]] = {}  # weight -> frontier values per batch, from `prefixes`
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

    def prefixes(self, weights: list[str], batches: list[tuple]) -> float:
        """Compute and keep the frontier values of every one of these weights' suffixes in one pass
        with the current (original) weights: the graph in order up to the deepest frontier node.
        A value no frontier needs is dropped after its last reader. Returns the pass's cost in
        forward-pass equivalents (1 - the deepest layer's suffix share, of the batches run): nothing
        is kept when the values would pass the memory bound (each layer then gets its own prefix pass)."""
        import torch

        todo = [w for w in dict.fromkeys(weights) if w not in self._many]
        if not todo:
            return 0.0
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        wanted = {n for w in todo for n in self.suffix(w).frontier}
        if not wanted:
            return 0.0
        nodes = list(self.gm.graph.nodes)[:max(order[n] for n in wanted) + 1]
        cost = 1.0 - min(self.suffix(w).share for w in todo)
        envs, size = [], 0
        with torch.no_grad():
            for batch in batches:
                env = self._interpret(nodes, dict(zip(self._placeholders(), batch)), wanted)
                envs.append({n: env[n] for n in wanted})
                size += _unique_nbytes(envs[-1].values())
                if size > self.max_bytes:
                    return cost * len(envs) / len(batches)
        for w in todo:
            self._many[w] = [{n: env[n] for n in self.suffix(w).frontier} for env in envs]
        return cost

    def has(self, weight: str) -> bool:
        """Whether `weight`'s frontier values are kept (its suffix can run alone)."""
        return weight in self._many or (self._cached is not None and self._cached[0] == weight)

    def run_suffix(self, weight: str) -> list[Any]:
        """The model's outputs per batch, recomputing only the suffix (the weight as it is now)."""
        import torch

        if not self.has(weight):
            raise LookupError(f"{weight}: no prefix cached")
        values_per_batch = self._many[weight] if weight in self._many else self._cached[1]  # type: ignore[index]
        sfx = self.suffix(weight)
        outs = []
        with torch.no_grad():
            for values in values_per_batch:
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


def _unique_nbytes(values: Any) -> int:
    """Bytes of these values, a tensor that appears twice (shared by frontiers) counted once."""
    import torch

    seen: dict[int, int] = {}
    stack = list(values)
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            seen[id(v)] = v.numel() * v.element_size()
        elif isinstance(v, (tuple, list)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return sum(seen.values())


def _nbytes(v: Any) -> int:
    import torch

    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    if isinstance(v, dict):
        return sum(_nbytes(x) for x in v.values())
    return 0
