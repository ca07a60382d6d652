"""coremltools, Core ML side: convert to an ML Program, compress with `coremltools.optimize.coreml`.

Every layer gets its own op-name config (keyed by the weight's current producer op), so
per-layer overrides from the plan are honoured exactly and nothing is left to a global config.
Steps after the first use `joint_compression=True` (prune -> palettize/quantize, palettize ->
int8 LUT), the forms the Core ML runtime reads as sparse-palettized / sparse-quantized weights.

Read-back (`inspect_package`) re-opens the saved .mlpackage (spec + weight file, no
prediction: that is macOS-only) and reports, per original weight, the constexpr ops that
produce it, the LUT size, the stored integer type and the achieved sparsity.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressadvise.errors import BadModel, CompressionFailed, Unavailable
from compressadvise.backends import kmeans
from compressadvise.backends.coreml_convert_gaps import (Flexible, dynamic_shapes, fixed_position_lookup,
                                                          lut_decompression, register_missing_ops)
from compressadvise.backends import (Context, HandlerTable, LayerJob, StepJob, handles, import_quietly, need, quiet,
                                     run_handler)

ID = "coremltools.coreml"

LUT_OPS = ("constexpr_lut_to_dense", "constexpr_lut_to_sparse")
QUANT_OPS = ("constexpr_blockwise_shift_scale", "constexpr_affine_dequantize",
             "constexpr_sparse_blockwise_shift_scale")
SPARSE_OPS = ("constexpr_sparse_to_dense",)
BLOB_HEADER = 64  # bytes: weight.bin file header (MIL blob storage v2)
BLOB_META = 64  # bytes: metadata record before every blob
BLOB_ALIGN = 64  # every blob's data starts on a 64-byte boundary


class CoremltoolsCoreML(HandlerTable):
    id = ID
    side = "coreml"

    def unavailable(self, job: StepJob, ctx: Context) -> str | None:
        if job.technique == "activation_quantization":
            return ("Core ML activation quantization (linear_quantize_activations) calibrates by running "
                    "the model through Core ML, which only macOS can do")
        if missing := self.no_handler(job):
            return missing
        try:
            import_quietly("coremltools.optimize.coreml")
        except Unavailable as e:
            return str(e)
        return None

    def layer_support(self, job: StepJob, lj: LayerJob, module: Any) -> str | None:
        return None  # any weight const is compressible; the mapping to consts is checked after conversion

    def run(self, mlmodel: Any, job: StepJob, ctx: Context, joint: bool) -> Any:
        return run_handler(self.id, mlmodel, job, ctx, joint)

    @staticmethod
    def compress(mlmodel: Any, job: StepJob, ctx: Context, joint: bool) -> Any:
        """One `optimize.coreml` pass of the step's kind, an op-name config per layer."""
        import coremltools.optimize.coreml as cto

        if job.kind in ("sparse_palettize", "sparse_quantize"):  # one plan step, two joint passes
            mlmodel = CoremltoolsCoreML.compress(mlmodel, _as_kind(job, "prune"), ctx, joint)
            return CoremltoolsCoreML.compress(mlmodel, _as_kind(job, job.kind.split("_", 1)[1]), ctx, True)

        heads = producer_names(mlmodel)
        configs: dict[str, Any] = {}
        for lj in job.layers:
            if lj.const is None:
                continue
            configs[head_for(heads, lj.const) or lj.const] = CoremltoolsCoreML._op_config(job, lj, mlmodel, joint)
        if not configs:
            return mlmodel
        opt = cto.OptimizationConfig(op_name_configs=configs)
        with quiet():
            if job.kind == "prune":
                return cto.prune_weights(mlmodel, opt, joint_compression=joint)
            if job.kind == "quantize":
                return cto.linear_quantize_weights(mlmodel, opt, joint_compression=joint)
            out = cto.palettize_weights(mlmodel, opt, joint_compression=joint)
            lut8 = [lj for lj in job.layers if lj.const and lj.params.get("lut_dtype") == "int8"]
            if lut8:  # int8 LUT: quantize the LUT itself (joint palettize + quantize)
                heads = producer_names(out)
                q = {head_for(heads, lj.const) or lj.const: cto.OpLinearQuantizerConfig(
                    mode="linear_symmetric", dtype="int8", granularity="per_tensor", weight_threshold=0)
                    for lj in lut8}
                out = cto.linear_quantize_weights(out, cto.OptimizationConfig(op_name_configs=q),
                                                  joint_compression=True)
            return out

    @staticmethod
    def _op_config(job: StepJob, lj: LayerJob, mlmodel: Any, joint: bool, custom: bool = True) -> Any:
        """The layer's Op*Config; `custom=False` where it must be written down (a YAML file holds no
        function): palettization then names coremltools' own k-means."""
        import coremltools.optimize.coreml as cto

        p = lj.params
        threshold = int(p.get("weight_threshold", 2048) or 0)
        if job.kind == "quantize":
            gran = p.get("granularity", "per_channel")
            kw: dict[str, Any] = {"mode": p.get("mode", "linear_symmetric"), "granularity": gran,
                                  "dtype": f"int{int(need(p, 'nbits'))}", "weight_threshold": threshold}
            if gran == "per_block":
                kw["block_size"] = int(need(p, "block_size"))
            return cto.OpLinearQuantizerConfig(**kw)
        if job.kind == "prune":
            return _pruner_config(lj, p, threshold, mlmodel)
        nbits = int(need(p, "nbits"))
        # The torch side's k-means through the custom mode (backends/kmeans.py): the LUTs the
        # search measured and the torch side holds, not a second, different k-means.
        how = ({"mode": "custom", "lut_function": kmeans.lut_function(nbits)} if custom and kmeans.shared(p, joint)
               else {"mode": "kmeans", "nbits": nbits})
        kw = {**how, "weight_threshold": threshold, "granularity": p.get("granularity", "per_tensor"),
              "enable_per_channel_scale": bool(p.get("enable_per_channel_scale", False))}
        if kw["granularity"] == "per_grouped_channel":
            kw["group_size"] = int(need(p, "group_size"))
        return cto.OpPalettizerConfig(**kw)


APIS = {
    "palettization": "coremltools.optimize.coreml.palettize_weights (OpPalettizerConfig)",
    "linear_quantization": "coremltools.optimize.coreml.linear_quantize_weights (OpLinearQuantizerConfig)",
    "pruning": "coremltools.optimize.coreml.prune_weights (OpThresholdPrunerConfig / OpMagnitudePrunerConfig)",
    "joint_compression": "prune_weights, then palettize_weights(joint_compression=True)",
    "joint_sparse_quantization": "prune_weights, then linear_quantize_weights(joint_compression=True)",
}
for _technique, _api in APIS.items():  # one pass per step kind: the same handler for each technique
    handles(ID, _technique, api=_api)(CoremltoolsCoreML.compress)


def _as_kind(job: StepJob, kind: str) -> StepJob:
    import copy

    sub = copy.copy(job)
    sub.kind = kind
    return sub


def _pruner_config(lj: LayerJob, p: dict[str, Any], threshold: int, mlmodel: Any) -> Any:
    import numpy as np
    import coremltools.optimize.coreml as cto

    from compressadvise.backends.coremltools_torch import n_m_ratio

    pattern = p.get("pattern", "unstructured")
    sparsity = float(need(p, "sparsity"))
    if pattern == "n_m":
        return cto.OpMagnitudePrunerConfig(n_m_ratio=n_m_ratio(p), weight_threshold=threshold)
    if pattern == "block":
        return cto.OpMagnitudePrunerConfig(target_sparsity=sparsity, block_size=int(need(p, "block_size")),
                                           weight_threshold=threshold)
    # Unstructured: coremltools' magnitude pruner takes np.percentile of the fp16 weights, which
    # returns NaN (and prunes nothing) for tensors over 65,504 elements (the index overflows
    # float16). The same cut computed in float32 and handed to the threshold pruner is the
    # identical magnitude pruning without that failure.
    value = const_value(mlmodel, lj.const)
    cut = float(np.quantile(np.abs(value.astype(np.float32)), sparsity))
    return cto.OpThresholdPrunerConfig(threshold=max(cut, 1e-12), minimum_sparsity_percentile=0.0,
                                       weight_threshold=threshold)


# ------------------------------------------------------------------ conversion
def deployment_target(os_major: int) -> Any:
    ct = import_quietly("coremltools")
    versions = sorted(int(n[3:]) for n in dir(ct.target) if n.startswith("iOS") and n[3:].isdigit())
    usable = [v for v in versions if v <= max(os_major, versions[0])]
    return getattr(ct.target, f"iOS{usable[-1]}")


def convert(source: Any, example_inputs: tuple | None, os_major: int) -> tuple[Any, str]:
    """An ML Program from an eager module, an ExportedProgram or a ScriptModule; (model, route)."""
    ct = import_quietly("coremltools")
    import torch

    target = deployment_target(os_major)
    with quiet():
        register_missing_ops()
        if isinstance(source, (torch.export.ExportedProgram, torch.jit.ScriptModule)):
            try:
                if isinstance(source, torch.export.ExportedProgram):
                    return _convert_program(ct, source, example_inputs, target)
                if not example_inputs:
                    raise BadModel("converting TorchScript to Core ML needs an example input",
                                   hint="pass --input-shape or --samples")
                return ct.convert(source, inputs=_tensor_types(ct, example_inputs), minimum_deployment_target=target,
                                  convert_to="mlprogram"), "TorchScript"
            except BadModel:
                raise
            except Exception as e:
                raise CompressionFailed(f"Core ML conversion failed: {_first_line(e)}") from e
        if not example_inputs:
            raise BadModel("Core ML conversion needs an example input and the model carries none",
                           hint="pass --input-shape, --samples, or return (module, example_inputs) from the factory")
        return _convert_module(ct, torch, source, tuple(example_inputs), target)


def _convert_module(ct: Any, torch: Any, module: Any, example: tuple, target: Any) -> tuple[Any, str]:
    """An eager module: torch.export, else a TorchScript trace (LSTM, LSTMCell...); each with a
    flexible sequence dimension where a position table needs one, then at the example's shapes."""
    errors: list[str] = []
    flex = None
    try:
        static = torch.export.export(module, example)
        flex = fixed_position_lookup(static, example)
        programs = ([(_flexible(torch, module, example, flex), flex)] if flex else []) + [(static, None)]
        for ep, f in programs:
            if ep is None:
                continue
            try:
                return (ct.convert(ep.run_decompositions({}), minimum_deployment_target=target,
                                   convert_to="mlprogram"), _route("torch.export", f))
            except Exception as e:
                errors.append(f"torch.export{' (flexible)' if f else ''}: {_first_line(e)}")
    except Exception as e:
        errors.append(f"torch.export: {_first_line(e)}")
    try:
        traced = torch.jit.trace(module, example, check_trace=False)
    except Exception as e:
        raise CompressionFailed(f"Core ML conversion failed: {'; '.join(errors)}; torch.jit.trace: "
                                f"{_first_line(e)}") from e
    for f in ([flex] if flex else []) + [None]:
        try:
            return ct.convert(traced, inputs=_tensor_types(ct, example, f), minimum_deployment_target=target,
                              convert_to="mlprogram"), _route("torch.jit.trace", f)
        except Exception as e:
            errors.append(f"torch.jit.trace{' (flexible)' if f else ''}: {_first_line(e)}")
            last = e
    raise CompressionFailed(f"Core ML conversion failed: {'; '.join(errors)}") from last


def _convert_program(ct: Any, ep: Any, example_inputs: tuple | None, target: Any) -> tuple[Any, str]:
    """A .pt2 through the torch.export frontend; where that frontend lacks an op (LSTM in
    coremltools 9), through the TorchScript frontend, from a trace of the program's own module
    (its parameters keep their names, so layers are still found by name or value)."""
    import torch

    # A program's shapes are the user's: exported at a fixed length, its positions are constants
    # (re-exporting cannot make them flexible), and the gate names a table the converter folds.
    try:
        return ct.convert(ep.run_decompositions({}), minimum_deployment_target=target,
                          convert_to="mlprogram"), "torch.export program"
    except Exception as export_error:
        if not example_inputs:
            raise
        example = tuple(example_inputs)
        try:
            traced = torch.jit.trace(ep.module(), example, check_trace=False)
            mlmodel = ct.convert(traced, inputs=_tensor_types(ct, example), minimum_deployment_target=target,
                                 convert_to="mlprogram")
        except Exception as trace_error:
            raise CompressionFailed(f"Core ML conversion failed: torch.export frontend: {_first_line(export_error)}; "
                                    f"TorchScript frontend: {_first_line(trace_error)}") from trace_error
        return mlmodel, f"TorchScript trace of the program (torch.export frontend: {_first_line(export_error)})"


def _flexible(torch: Any, module: Any, example: tuple, flex: Flexible) -> Any:
    """The module re-exported with the sequence dimension as a range; None where the model pins
    its length (then it converts at the example's shapes and the gate names the folded table)."""
    try:
        return torch.export.export(module, example, dynamic_shapes=dynamic_shapes(flex, example))
    except Exception:
        return None


def _route(route: str, flex: Flexible | None) -> str:
    return f"{route}; {flex.describe()}" if flex else route


def _tensor_types(ct: Any, example_inputs: tuple, flex: Flexible | None = None) -> list:
    import numpy as np

    out = []
    for i, t in enumerate(example_inputs):
        dtype = np.int32 if not t.is_floating_point() else np.float32
        shape: list = list(t.shape)
        if flex and i in flex.inputs:
            shape[-1] = ct.RangeDim(lower_bound=1, upper_bound=flex.upper, default=flex.length)
        out.append(ct.TensorType(name=f"input_{i}", shape=tuple(shape), dtype=dtype))
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def _ops(mlmodel_or_prog: Any) -> list:
    """Every op of the program, including those nested in control flow (a recurrent layer traced
    to a while_loop keeps its weights inside the loop's body block)."""
    prog = getattr(mlmodel_or_prog, "_mil_program", mlmodel_or_prog)
    out: list = []
    todo = [op for f in prog.functions.values() for op in reversed(f.operations)]
    while todo:
        op = todo.pop()
        out.append(op)
        for block in reversed(getattr(op, "blocks", None) or []):
            todo.extend(reversed(block.operations))
    return out


def const_value(mlmodel: Any, name: str) -> Any:
    for op in _ops(mlmodel):
        if op.op_type == "const" and op.name == name:
            return op.outputs[0].val
    raise CompressionFailed(f"weight {name} vanished from the Core ML program")


def weight_consts(mlmodel: Any) -> list[tuple[str, Any, tuple, list[str]]]:
    """(name, value or None, shape, consumer op types) for every weight a compute op reads.

    Plain float consts with 2+ dims, and the heads of constexpr chains (weights that arrive
    already compressed, e.g. converted from a torch model carrying compression metadata).
    """
    out = []
    for op in _ops(mlmodel):
        if not (op.op_type == "const" or op.op_type.startswith("constexpr_")):
            continue
        var = op.outputs[0]
        consumers = [c.op_type for v in op.outputs for c in v.child_ops]
        if not consumers or all(t.startswith("constexpr_") for t in consumers) or len(var.shape or ()) < 2:
            continue
        if op.op_type == "const":
            val = var.val
            if getattr(val, "dtype", None) is None or val.dtype.kind != "f":
                continue
            out.append((op.name, val, tuple(val.shape), consumers))
        else:
            out.append((op.name, None, tuple(var.shape), consumers))
    return out


VALUE_TOLERANCE = 2e-3  # of the weight's largest |value|: fp16 rounding of a fold computed another way


def _by_value(consts: list, w: Any, claimed: set[str]) -> str | None:
    """The unclaimed const equal to `w` up to fp16 rounding (the converter folds in fp32, we in
    float64), if exactly one is that close: same-shaped layers differ by O(1), not by rounding."""
    import numpy as np

    scale = float(np.abs(w).max()) or 1.0
    close = [n for n, v, shape, _ in consts if v is not None and shape == tuple(w.shape) and n not in claimed
             and float(np.abs(v.astype(np.float32) - w.astype(np.float32)).max()) <= VALUE_TOLERANCE * scale]
    return close[0] if len(close) == 1 else None


def map_layers(mlmodel: Any, jobs: list[LayerJob], weights: dict[str, Any]) -> dict[str, str]:
    """Find each layer's weight in the program: by name, then by value, then by a unique shape.

    Returns {layer: reason} for the layers that could not be found (e.g. folded away).
    """
    import numpy as np

    consts = weight_consts(mlmodel)
    names = [n for n, _, _, _ in consts]
    shapes = {n: s for n, _, s, _ in consts}
    claimed: set[str] = set()
    missing: dict[str, str] = {}
    for lj in jobs:
        base = lj.tensor.replace(".", "_")
        for stem in (base, f"p_{base}"):
            hits = [n for n in names if (n == stem or n.startswith(stem + "_")) and shapes[n] == tuple(lj.shape)]
            if hits:
                lj.const, lj.match = min(hits, key=len), "name"
                break
        if lj.const is None and lj.tensor in weights:
            lj.const = _by_value(consts, weights[lj.tensor], claimed)
            lj.match = "value" if lj.const else ""
        if lj.const:
            claimed.add(lj.const)
    for lj in jobs:
        if lj.const is not None:
            continue
        same = [n for n, _, shape, c in consts if shape == tuple(lj.shape) and n not in claimed
                and any(t in ("conv", "linear", "matmul", "conv_transpose", "gather") for t in c)]
        if len(same) == 1:  # e.g. a conv whose BatchNorm the converter folded in: new values, same shape
            lj.const, lj.match = same[0], "shape (values changed by the converter, e.g. a folded BatchNorm)"
            claimed.add(same[0])
        else:
            missing[lj.name] = ("its weight could not be found in the converted Core ML program "
                                f"({len(same)} unclaimed weights of shape {lj.shape})" + _fold_hint(lj))
    return missing


def _fold_hint(lj: LayerJob) -> str:
    if "embedding" not in lj.layer_type.lower():
        return ""
    return ("; if the model looks this table up at fixed positions (arange, a position-id buffer), the converter "
            "folds it to a constant at the example input's length: export the model with a dynamic sequence dimension "
            "(torch.export dynamic_shapes)")


def producer_names(mlmodel: Any) -> set[str]:
    """Names of the ops that produce weights for compute ops (the heads of constexpr chains)."""
    heads: set[str] = set()
    for op in _ops(mlmodel):
        if not (op.op_type == "const" or op.op_type.startswith("constexpr_")):
            continue
        consumers = [c for v in op.outputs for c in v.child_ops]
        if consumers and all(c.op_type.startswith("constexpr_") for c in consumers):
            continue  # an intermediate (indices, LUT, mask...): not the head of its chain
        heads.add(op.name)
    return heads


def head_for(heads: set[str], original: str) -> str | None:
    """The head that now stands for an original const: passes name new ops after what they replace."""
    if original in heads:
        return original
    found = [h for h in heads if h.startswith(original + "_")]
    return min(found, key=len) if found else None


# ------------------------------------------------------------------ save and read back
def save(mlmodel: Any, path: Path) -> None:
    with quiet():
        mlmodel.save(str(path))


@dataclass
class WeightEvidence:
    ops: list[str] = field(default_factory=list)
    lut_entries: int | None = None  # entries per LUT (2^nbits)
    index_bits: int | None = None
    quant_dtype: str | None = None
    sparsity: float | None = None
    per_channel_scale: bool = False
    head: str | None = None  # the op that now produces the weight (the head of its constexpr chain)

    def describe(self) -> str:
        parts = ["+".join(self.ops) or "dense fp16 const"]
        if self.lut_entries is not None:
            parts.append(f"LUT {self.lut_entries} entries" + (f", {self.index_bits}-bit indices" if self.index_bits else ""))
        if self.quant_dtype:
            parts.append(f"stored as {self.quant_dtype}")
        if self.sparsity is not None:
            parts.append(f"sparsity {self.sparsity:.1%}")
        return "; ".join(parts)


def load_program(path: Path) -> Any:
    """Re-open a saved .mlpackage without compiling or running it (works on Linux)."""
    ct = import_quietly("coremltools")
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    with quiet():
        model = ct.models.MLModel(str(path), skip_model_load=True)
        spec = model.get_spec()
        if spec.WhichOneof("Type") != "mlProgram":
            raise CompressionFailed(f"{path} is not an ML Program")
        return milproto_load(spec, specification_version=spec.specificationVersion,
                             file_weights_dir=model.weights_dir)


def inspect_program(prog: Any, originals: list[str]) -> dict[str, WeightEvidence]:
    """Per original const name: the compression found in the program."""
    import numpy as np

    out: dict[str, WeightEvidence] = {}
    ops = _ops(prog)
    heads = producer_names(prog)
    by_name = {op.name: op for op in ops}
    for orig in originals:
        head = head_for(heads, orig)
        ev = WeightEvidence(head=head)
        for op in _chain(by_name.get(head) if head else None):
            ev.ops.append(op.op_type)
            if op.op_type in LUT_OPS:
                ev.lut_entries, ev.index_bits = _lut_layout(op)
            if op.op_type in QUANT_OPS:
                data = op.inputs.get("data", op.inputs.get("quantized_data"))
                if data is not None and _dtype_name(data.dtype).startswith("fp"):
                    ev.per_channel_scale = True  # scales a de-palettized weight (per-channel scale)
                elif data is not None:
                    ev.quant_dtype = _dtype_name(data.dtype)
            for key in ("mask", "indices_mask", "data_mask"):  # the bitmask, wherever the chain stores it
                mask = op.inputs.get(key)
                if mask is not None and mask.val is not None and ev.sparsity is None:
                    ev.sparsity = _sparsity(op, np.asarray(mask.val))
        out[orig] = ev
    return out


def _sparsity(op: Any, mask: Any) -> float:
    """Zero fraction of a sparse weight. iOS 16/17 constexpr_sparse_to_dense packs its mask as
    uint8 bits with the dense `shape` as an input; iOS 18 stores one uint1 per element."""
    import numpy as np

    shape = op.inputs.get("shape")
    if shape is not None and shape.val is not None:
        n = int(np.prod(shape.val))
        if mask.dtype == np.uint8 and mask.size * 8 >= n > mask.size:
            kept = int(np.unpackbits(mask.ravel(), bitorder="little")[:n].sum())
            return 1.0 - kept / max(n, 1)
    return 1.0 - float(np.count_nonzero(mask)) / max(mask.size, 1)


def _lut_layout(op: Any) -> tuple[int | None, int | None]:
    """(LUT entries, index bits) of a constexpr_lut_to_dense op, in either opset's layout.

    iOS 16/17: `lut` is [NUM_PALETTES] and `indices` packed uint8 bytes (n_bits = log2 entries);
    iOS 18: `lut` is [..., NUM_PALETTES, VECTOR_SIZE] and `indices` a sub-byte uint tensor."""
    lut, idx = op.inputs.get("lut"), op.inputs.get("indices")
    shape = tuple(lut.shape or ()) if lut is not None else ()
    if not shape:
        return None, None
    if len(shape) == 1:
        entries = int(shape[0])
        return entries, max(entries - 1, 1).bit_length()
    return int(shape[-2]), _bits(idx.dtype) if idx is not None else None


def _chain(head: Any) -> list:
    """The constexpr ops that produce one weight: the head and, recursively, its constexpr inputs."""
    out, todo = [], [head] if head is not None else []
    while todo:
        op = todo.pop()
        if op is None or not op.op_type.startswith("constexpr_") or op in out:
            continue
        out.append(op)
        todo.extend(v.op for v in op.inputs.values() if getattr(v, "op", None) is not None)
    return out


def _bits(dtype: Any) -> int | None:
    name = _dtype_name(dtype)
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else None


def _dtype_name(dtype: Any) -> str:
    from coremltools.converters.mil.mil import types

    try:
        return types.builtin_to_string(dtype)
    except Exception:
        return str(dtype)


def blob_layout(prog: Any) -> list[int]:
    """Payload bytes of every blob the program stores in its weight file."""
    from coremltools.converters.mil.backend.mil.load import should_use_weight_file

    sizes: list[int] = []
    seen: set[int] = set()
    for op in _ops(prog):
        if op.op_type != "const":
            continue
        val = op.outputs[0].val
        if id(val) in seen:
            continue
        seen.add(id(val))
        try:
            stored = should_use_weight_file(val, 9)
        except Exception:
            stored = False
        if stored:
            bits = _bits(op.outputs[0].dtype) or 8 * val.itemsize
            sizes.append((val.size * bits + 7) // 8)
    return sizes


def container_overhead(blobs: int, payload_sizes: list[int] | None = None) -> int:
    """Weight-file bytes beyond the payload: file header, per-blob metadata, 64-byte alignment.

    Without the individual sizes, the alignment padding is taken as half a block on average.
    """
    pad = sum((-s) % BLOB_ALIGN for s in payload_sizes) if payload_sizes is not None else blobs * BLOB_ALIGN // 2
    return BLOB_HEADER + blobs * BLOB_META + pad


def package_sizes(path: Path) -> tuple[int, int]:
    """(whole .mlpackage bytes, weight file bytes) on disk."""
    total = 0
    weights = 0
    for root, _, files in os.walk(path):
        for f in files:
            size = os.path.getsize(os.path.join(root, f))
            total += size
            if f == "weight.bin":
                weights += size
    return total, weights


BACKEND = CoremltoolsCoreML()
