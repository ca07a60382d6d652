"""Gaps in coremltools that a real model hits, closed on our side.

- `unsafe_chunk`: TorchScript decomposes `nn.LSTMCell` (and GRU cells, and any `Tensor.chunk`
  the JIT marks unsafe) into `aten::unsafe_chunk`, which coremltools 9 has no translation for
  (it has `prim::ConstantChunk`). Same semantics as `chunk`: equal splits, the last one smaller.
  The cell's weights then stay plain constants feeding `linear`, so they can be compressed.
- Positions looked up at a fixed sequence length: exported at the example input's shape, a
  learned position table indexed by `arange(T)` (BERT, GPT-2, ...) is constant-folded by the
  converter into a [T, d] constant, so the planned table never ships and the .mlpackage accepts
  only T tokens. `dynamic_sequence` finds such lookups in the graph and gives the integer
  inputs' sequence dimension a range bounded by the table's length.
- `diff` and `new_ones`: transformers 5 builds a decoder's causal mask with `torch.diff` on the
  position ids (its packed-sequence check) and `new_ones((), dtype=bool)`; coremltools 9 has
  neither, so no transformers decoder (a tiny Llama, measured) converted.
- LUT decompression: coremltools' `lut_to_dense` repeats the LUT to the weight's full shape
  before indexing it, O(elements x palette): 6 GB for an 8-bit palettized 30522 x 384 embedding.
  `lut_decompression` swaps in an indexing of the same result in O(elements) while it runs.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

EMBEDDING_OPS = ("embedding", "index_select")


def register_missing_ops() -> None:
    """Add translations coremltools lacks; idempotent, and never overrides one it has."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY as registry

    def unsafe_chunk(context: Any, node: Any) -> None:
        inputs = ops._get_inputs(context, node, expected=(2, 3))
        x, chunks = inputs[0], inputs[1]
        axis = int(inputs[2].val) if len(inputs) > 2 else 0
        total = x.shape[axis]
        size = int(math.ceil(total / int(chunks.val)))
        sizes = [size] * (total // size) + ([total % size] if total % size else [])
        parts = mb.split(x=x, split_sizes=sizes, axis=axis, name=node.name)
        if len(node.outputs) == 1:  # TorchScript: one list value, unpacked by the next node
            context.add(parts, torch_name=node.name)
        else:
            for val, name in zip(parts, node.outputs):
                context.add(val, name)

    for name in ("unsafe_chunk", "chunk"):
        if registry.get_func(name) is None:
            registry.set_func_by_name(unsafe_chunk, name)
    if registry.get_func("diff") is None:
        registry.set_func_by_name(_diff, "diff")
    if registry.get_func("new_ones") is None:
        registry.set_func_by_name(_new_ones, "new_ones")


def _new_ones(context: Any, node: Any) -> None:
    """`x.new_ones(size, dtype=...)` (transformers' and_mask starts from `new_ones((), dtype=bool)`):
    a fill of ones, cast as coremltools' own `ones` does."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops

    inputs = ops._get_inputs(context, node, min_expected=2)
    size = mb.concat(values=inputs[1], axis=0) if isinstance(inputs[1], list) else inputs[1]
    if size.val is not None:  # a constant size (`()` for a scalar) as the int32 shape fill expects
        size = mb.const(val=np.asarray(size.val, dtype=np.int32).reshape(-1))
    dtype = ops._get_kwinputs(context, node, "dtype", default=[inputs[2] if len(inputs) > 2 else None])[0]
    res = mb.fill(shape=size, value=1.0)
    if dtype is not None and dtype.val is not None:
        res = ops._cast_to(res, ops.NUM_TO_DTYPE_STRING[dtype.val], node.name)
    context.add(res, node.name)


def _diff(context: Any, node: Any) -> None:
    """`torch.diff(x, n, dim, prepend, append)`: transformers 5 decoders call it on their position
    ids (masking_utils' packed-sequence check), which coremltools 9 cannot translate."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops

    inputs = list(ops._get_inputs(context, node, min_expected=1)) + [None] * 4
    x, n, dim, prepend, append = inputs[:5]
    axis = int(dim.val) if dim is not None and dim.val is not None else -1
    parts = [v for v in (prepend, x, append) if v is not None]
    if len(parts) > 1:
        x = mb.concat(values=parts, axis=axis)
    rank = x.rank
    axis %= rank
    for _ in range(int(n.val) if n is not None and n.val is not None else 1):
        hi = mb.slice_by_index(x=x, begin=[int(i == axis) for i in range(rank)], end=[0] * rank,
                               end_mask=[True] * rank)
        lo = mb.slice_by_index(x=x, begin=[0] * rank, end=[-1 if i == axis else 0 for i in range(rank)],
                               end_mask=[i != axis for i in range(rank)])
        x = mb.sub(x=hi, y=lo)
    context.add(x, torch_name=node.name)


@dataclass(frozen=True)
class Flexible:
    """A sequence dimension to export as a range: which inputs, which size, up to what."""
    inputs: tuple[int, ...]
    length: int
    upper: int
    table: str

    def describe(self) -> str:
        return (f"sequence dimension made flexible (1..{self.upper}, example {self.length}): "
                f"'{self.table}' is looked up at fixed positions and would fold to a [{self.length}, d] constant")


def fixed_position_lookup(ep: Any, example_inputs: tuple) -> Flexible | None:
    """A table the graph indexes with positions that no user input reaches (arange, a sliced
    buffer), and the integer inputs whose size matches the lookup's length; None when none."""
    sig = ep.graph_signature
    user = set(sig.user_inputs)
    params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    nodes = list(ep.graph.nodes)
    reached = {n.name for n in nodes if n.op == "placeholder" and n.name in user}
    for n in nodes:  # nodes are topologically ordered
        if n.op == "call_function" and any(getattr(a, "name", None) in reached for a in _args(n)):
            reached.add(n.name)
    for n in nodes:
        if n.op != "call_function" or _op_name(n) not in EMBEDDING_OPS:
            continue
        table, index = n.args[0], n.args[-1] if _op_name(n) == "embedding" else n.args[2]
        name = params.get(getattr(table, "name", ""))
        if name is None or getattr(index, "name", None) in reached:
            continue
        length = _numel(index)
        ints = tuple(i for i, t in enumerate(example_inputs)
                     if not t.is_floating_point() and t.dim() >= 2 and t.shape[-1] == length)
        upper = int(table.meta["val"].shape[0]) if "val" in table.meta else 0
        if ints and length and upper > length:
            return Flexible(ints, length, upper, name)
    return None


def dynamic_shapes(flex: Flexible, example_inputs: tuple) -> tuple:
    import torch

    seq = torch.export.Dim("seq", min=1, max=flex.upper)
    return tuple({t.dim() - 1: seq} if i in flex.inputs else None for i, t in enumerate(example_inputs))


def _args(node: Any) -> list:
    out: list = []
    for a in list(node.args) + list(node.kwargs.values()):
        out.extend(a if isinstance(a, (list, tuple)) else [a])
    return out


def _op_name(node: Any) -> str:
    target = node.target
    name = getattr(target, "__name__", str(target))
    return name.split(".")[0]


def _numel(node: Any) -> int:
    val = getattr(node, "meta", {}).get("val")
    try:
        return int(val.shape[-1]) if val is not None and val.dim() else 0
    except Exception:  # a symbolic size: the lookup is already dynamic
        return 0


def lut_to_dense(indices: Any, lut: Any, vector_axis: int | None = None) -> Any:
    """coremltools.optimize._utils.lut_to_dense's result (lut [b0..bK-1, palette, vector]: each
    block of the weight reads its own palette) without materialising a palette per element."""
    import numpy as np

    from coremltools.optimize import _utils

    if lut.shape[-1] != 1 or lut.ndim != indices.ndim + 2:
        return _ORIGINAL.get("lut_to_dense", _utils.lut_to_dense)(indices, lut, vector_axis)
    table = lut[..., 0]
    where = []
    for axis, (n, blocks) in enumerate(zip(indices.shape, lut.shape[:-2])):
        shape = [1] * indices.ndim
        shape[axis] = n
        where.append((np.arange(n) // (n // blocks)).reshape(shape))
    return table[tuple(where) + (indices.astype(np.intp),)]


_ORIGINAL: dict[str, Any] = {}


@contextmanager
def lut_decompression() -> Iterator[None]:
    from coremltools.optimize import _utils

    _ORIGINAL.setdefault("lut_to_dense", _utils.lut_to_dense)
    _utils.lut_to_dense = lut_to_dense
    try:
        yield
    finally:
        _utils.lut_to_dense = _ORIGINAL["lut_to_dense"]
