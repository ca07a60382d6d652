"""The Core ML side of apply: conversion, coremltools compression, the .mlpackage saved, re-opened and checked."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator

from compressadvise import backends as B
from compressadvise.backends.apply_resolve import Route
from compressadvise.backends.apply_torch import (SPARSE_KINDS, SPARSITY_TOLERANCE, _submodule, _target_sparsity,
                                                  applied_layers)
from compressadvise.errors import CompressionFailed, Unavailable
from compressadvise.fsutil import writing
from compressadvise.model.loading import LoadedModel
from compressadvise.backends import need

MLPACKAGE = "model.mlpackage"


def _coreml_side(loaded: LoadedModel, compressed: Any, jobs: list[B.StepJob], ctx: B.Context, route: Route,
                 outcome: dict, tmp: Path, stage: Callable[[str], None]) -> dict[str, Any]:
    from compressadvise.backends import coremltools_coreml as C, export_decoder as D

    if route.coreml == "convert":
        source = compressed
    else:
        source = loaded.module if loaded.module is not None else (loaded.exported or loaded.scripted)
    mlmodel, how = (D.convert(source, ctx.decoder, ctx.os) if ctx.decoder is not None  # a causal LM's KV cache:
                    else C.convert(source, ctx.example_inputs, ctx.os))  # state or a fixed window (plan.decoder)
    weights = _float_weights(loaded)
    all_layers = [lj for job in jobs for lj in job.layers]
    missing = C.map_layers(mlmodel, all_layers, weights)
    for job in jobs:
        for lj in job.layers:
            if lj.name in missing:
                outcome[(job.index, lj.name, "coreml")] = {"status": "skipped", "reason": missing[lj.name]}
    if route.coreml == "native":
        backend = B.get("coremltools.coreml")
        for job in jobs:
            stage(f"Core ML: step {job.index + 1} {job.technique}")
            todo = [lj for lj in job.layers if lj.const and lj.name not in missing]
            fresh = [lj for lj in todo if C.head_for(C.producer_names(mlmodel), lj.const) == lj.const]
            again = [lj for lj in todo if lj not in fresh]
            try:
                for part, joint in ((fresh, False), (again, True)):
                    if part:
                        sub = copy.copy(job)
                        sub.layers = part
                        mlmodel = backend.run(mlmodel, sub, ctx, joint)
            except (CompressionFailed, Unavailable):
                raise
            except Exception as e:
                raise CompressionFailed(f"plan step {job.index + 1} ({job.technique}) failed in coremltools.coreml: "
                                        f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
            for lj in todo:
                outcome[(job.index, lj.name, "coreml")] = {"status": "applied", "backend": "coremltools.coreml",
                                                           "const": lj.const, "matched_by": lj.match,
                                                           **_lut_kmeans(job, lj, lj in again)}
    else:
        for job in jobs:
            for lj in job.layers:
                if lj.const and lj.name not in missing:
                    rec = outcome.get((job.index, lj.name, "torch"), {})
                    status = "applied" if rec.get("status") == "applied" else "skipped"
                    outcome[(job.index, lj.name, "coreml")] = {
                        "status": status, "backend": "ct.convert of the torch-side result", "const": lj.const,
                        "matched_by": lj.match, **({} if status == "applied" else {"reason": "not compressed on the torch side"})}
    path = tmp / MLPACKAGE
    stage("Core ML: save")
    with writing(path):  # a full disk shows here: one line with the path, not coremltools' error list
        C.save(mlmodel, path)
    del mlmodel  # saved: the program in memory is not needed again (the read-back opens the file)
    if isinstance(compressed, Deferred):  # the memory-bounded native route: the torch side runs now
        compressed = compressed()
    stage("Core ML: read back")
    info, prog, evidence = _read_back(path, jobs, outcome, how)
    if compressed is not None:
        _prove_parity(compressed, prog, evidence, jobs, outcome, route)
    if ctx.decoder is not None:  # the states the saved package holds; a promised state missing fails here
        info["decoder"] = D.read_back(path, ctx.decoder, source, compressed, how)
    return info


def _lut_kmeans(job: B.StepJob, lj: B.LayerJob, joint: bool) -> dict[str, str]:
    """The record of a layer Core ML palettized with optimize.torch's k-means (backends/kmeans.py)."""
    from compressadvise.backends import kmeans

    if job.kind != "palettize" or not kmeans.shared(lj.params, joint):
        return {}
    return {"lut_kmeans": "optimize.torch's exact k-means, through palettize_weights' custom mode"}


class Deferred:
    """The torch side, run once `_coreml_side` has saved the .mlpackage (the memory-bounded native
    route): Core ML converts the float weights first, then the torch side compresses them in place."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make, self.done, self.value = make, False, None

    def __call__(self) -> Any:
        if not self.done:
            self.value, self.done = self.make(), True
        return self.value


def _float_weights(loaded: LoadedModel) -> "FloatWeights":
    """Weights in fp16 numpy form, to find them by value in the converted program: made one by one
    when asked (map_layers asks only for the layers its names did not find), not a copy of them all."""
    return FloatWeights(loaded)


class FloatWeights(Mapping):
    def __init__(self, loaded: LoadedModel) -> None:
        self.folded: dict[str, Any] = {}
        if loaded.module is None and loaded.exported is not None:  # the converter folds its BatchNorms
            from compressadvise.model.deploy import program_folds

            self.folded = program_folds(loaded.exported)[0]
        self.loaded = loaded
        self.names = {n for n, t in loaded.tensors() if t.is_floating_point() and t.dim() >= 2}

    def __getitem__(self, name: str) -> Any:
        import torch

        if name not in self.names:
            raise KeyError(name)
        t = self.folded.get(name)
        if t is None:
            t = next(t for n, t in self.loaded.tensors() if n == name)
        return t.detach().to(dtype=torch.float16).cpu().numpy()

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self.names))

    def __len__(self) -> int:
        return len(self.names)


def _prove_parity(model: Any, prog: Any, evidence: dict, jobs: list[B.StepJob], outcome: dict,
                  route: Route) -> None:
    """Make the torch artefact's weights the .mlpackage's, and prove it per layer.

    Core ML cannot run here, so verify runs the torch artefact: its weights must be the ones shipped.
    "convert": the converter encodes the torch side's values; where it re-quantized them instead (a
    level apart, e.g. SparseGPT's int8), the torch weights are snapped to Core ML's and the gap noted.
    "native": Core ML compressed the layers itself, so the torch weights are snapped to them (the gap
    is kept as parity_before_snap: fp16 storage of the LUTs where both sides ran the same k-means;
    where the torch side ran after the .mlpackage was saved, that k-means ran once, on the Core ML
    side, and the torch side takes its LUTs here). Then every compared
    layer must agree to float tolerance. One weight at a time: each is decompressed, compared and
    snapped, then dropped, so memory stays at about the largest weight in float32."""
    by_head: dict[str, list[tuple[B.StepJob, B.LayerJob, dict]]] = {}
    for job, lj, rec in applied_layers(jobs, outcome, "coreml"):
        by_head.setdefault(evidence[rec["const"]].head or "", []).append((job, lj, rec))
    torch_done = {lj.tensor for _, lj, _ in applied_layers(jobs, outcome, "torch")}
    gaps: dict[str, float] = {}
    off: dict[str, float] = {}
    lost: list[str] = []
    ops = _ops_by_name(prog)
    for head, entries in by_head.items():
        dense = _decompress_one(prog, ops, head) if head else None
        for job, lj, rec in entries:
            diff = _compare(rec, lj, dense, model, torch_done)
            if diff is not None and diff[1]:
                gaps[lj.name] = diff[0]
            if dense is not None and (route.coreml == "native" or lj.name in gaps):
                why = ("the converter re-encoded it" if route.coreml != "native" else
                       "clustered once, by the Core ML side's k-means" if rec.get("lut_kmeans") else
                       "Core ML compressed it itself")
                if _snap(model, dense, job, lj, rec, outcome, why):
                    torch_done.add(lj.tensor)
            after = _compare(rec, lj, dense, model, torch_done)
            if after is not None and after[1]:
                off[lj.name] = after[0]
            elif rec.get("lut_kmeans") and lj.tensor not in torch_done:  # left to the snap, which failed
                lost.append(lj.name)
        del dense
    if gaps and route.coreml != "native":
        route.notes.append(f"the converter re-encoded {len(gaps)} layer(s) instead of keeping the torch side's values "
                           f"(max |diff| {max(gaps.values()):.3g}): the torch artefact now holds the .mlpackage's "
                           "weights, so verify measures what ships")
    if lost:
        raise CompressionFailed(f"Core ML read-back: the .mlpackage's LUTs for {', '.join(lost[:6])} could not be "
                                "copied into the torch artefact (the torch side left them to it)",
                                hint="the fidelity measured on the torch artefact would not be the artefact's; "
                                "rerun with --debug and report it")
    if off:
        raise CompressionFailed("Core ML read-back: the .mlpackage's weights are not the torch side's for "
                                + "; ".join(f"{n}: max |Core ML - torch| = {d:.3g}" for n, d in list(off.items())[:6]),
                                hint="the fidelity measured on the torch artefact would not be the artefact's; "
                                "rerun with --debug and report it")


def _ops_by_name(prog: Any) -> dict[str, Any]:
    from compressadvise.backends.coremltools_coreml import _ops

    return {op.name: op for op in _ops(prog)}


def _decompress_one(prog: Any, ops: dict[str, Any], head: str) -> Any:
    """One weight as Core ML materialises it at load time, in float32, without materialising the
    others : a head whose inputs are stored constants by its own
    value inference; a longer chain (an int8 LUT, a sparse mask over a LUT) by coremltools'
    decompression pass restricted to that chain, which rewrites `prog` (a private copy)."""
    import numpy as np
    from coremltools.optimize.coreml._quantization_passes import WeightDecompressor

    from compressadvise.backends.coreml_convert_gaps import lut_decompression
    from compressadvise.backends.coremltools_coreml import _chain, _ops

    op = ops.get(head)
    if op is None:
        return None
    if op.op_type == "const":
        return np.asarray(op.outputs[0].val, dtype=np.float32)
    chain = _chain(op)
    with B.quiet(), lut_decompression():
        if len(chain) == 1:
            val = op.materialized_val_inference()
            return np.asarray(val[0] if isinstance(val, (list, tuple)) else val, dtype=np.float32)
        ids = {id(o) for o in chain}
        WeightDecompressor(op_selector=lambda o: id(o) in ids).apply(prog)
    const = next((o for o in _ops(prog) if o.op_type == "const" and o.name == head), None)
    return None if const is None else np.asarray(const.outputs[0].val, dtype=np.float32)


def _snap(model: Any, value: Any, job: B.StepJob, lj: B.LayerJob, rec: dict, outcome: dict, why: str) -> bool:
    """Copy a Core ML-applied layer's decompressed weight into the torch model (in its dtype)."""
    import torch

    w = getattr(_submodule(model, lj.module), lj.param, None)
    if type(w) not in (torch.Tensor, torch.nn.Parameter) or value.size != w.numel():
        return False
    new = torch.from_numpy(value.reshape(tuple(w.shape))).to(w.dtype)
    ref = w.detach().float()
    rel = float((new.float() - ref).norm() / ref.norm().clamp_min(1e-30))
    if rel > SNAP_LIMIT:  # not this weight compressed, but another layout (e.g. gates reordered)
        raise CompressionFailed(f"Core ML read-back: the .mlpackage's weight for {lj.name} is not a compressed "
                                f"form of the torch weight (relative difference {rel:.2f})",
                                hint="a layer matched to the wrong Core ML weight; rerun with --debug and report it")
    with torch.no_grad():
        w.copy_(new)
    outcome[(job.index, lj.name, "torch")] = {"status": "applied",
                                              "backend": f"the .mlpackage's weight, decompressed ({why})"}
    rec["parity"] = f"snapped: the torch artefact holds this weight as the .mlpackage decompresses it ({why})"
    if "parity_max_abs_diff" in rec:  # the gap the snap closed, kept as evidence
        rec["parity_before_snap"] = rec.pop("parity_max_abs_diff")
    return True


SNAP_LIMIT = 1.0  # relative error of another tensor of the same spread: ~1.41; 1-bit LUTs ~0.6, 90% pruning ~0.8
PARITY_TOLERANCE = 2e-3  # of the weight's largest |value|: fp16 storage of values, LUTs and scales


def _compare(rec: dict, lj: B.LayerJob, theirs: Any, model: Any, torch_done: set[str]) -> tuple[float, bool] | None:
    """Record max |decompressed Core ML weight - torch weight| for one layer; (difference, beyond
    float tolerance), or None where there is nothing to compare."""
    import numpy as np
    import torch

    w = getattr(_submodule(model, lj.module), lj.param, None) if lj.tensor in torch_done else None
    if type(w) not in (torch.Tensor, torch.nn.Parameter):  # plain floats, not a tensor subclass
        rec["parity"] = "not compared: the torch side did not compress this layer"
        return None
    mine = w.detach().float().cpu().numpy()
    if theirs is None or theirs.size != mine.size:
        rec["parity"] = "not compared: the Core ML weight could not be decompressed to the torch shape"
        return None
    diff = float(np.abs(theirs.reshape(mine.shape) - mine).max())
    rec["parity_max_abs_diff"] = diff
    return diff, diff > PARITY_TOLERANCE * (float(np.abs(mine).max()) or 1.0)


def _check_coreml(path: Path, jobs: list[B.StepJob], outcome: dict, how: str) -> dict[str, Any]:
    """Re-open the saved .mlpackage and check each applied layer's constexpr ops."""
    return _read_back(path, jobs, outcome, how)[0]


def _read_back(path: Path, jobs: list[B.StepJob], outcome: dict, how: str) -> tuple[dict[str, Any], Any, dict]:
    """The read-back check and the .mlpackage's sizes, with the program and per-const evidence it
    read, so the parity proof decompresses that same program rather than parsing the file again."""
    from compressadvise.backends import coremltools_coreml as C

    prog = C.load_program(path)
    consts = sorted({rec["const"] for (s, n, side), rec in outcome.items() if side == "coreml" and rec.get("const")})
    evidence = C.inspect_program(prog, consts)
    counts: dict[str, int] = {}
    for ev in evidence.values():
        for op in ev.ops:
            counts[op] = counts.get(op, 0) + 1
    failures = []
    by_name = {op.name: op for f in prog.functions.values() for op in f.operations}
    for job, lj, rec in applied_layers(jobs, outcome, "coreml"):
        ev = evidence.get(rec["const"], C.WeightEvidence())
        ok, why = _coreml_ok(job.kind, lj.params, ev)
        rec["evidence"] = ev.describe()
        if ok and job.kind == "activations":
            ok, why = _input_quantized(by_name.get(ev.head or ""))
            rec["evidence"] += "; " + (why if ok else "input not quantized")
        if not ok:
            failures.append(f"{lj.name} ({job.technique}): {why}")
    if failures:
        raise CompressionFailed("Core ML read-back: compression did not happen for " + "; ".join(failures[:6])
                                + (f" (+{len(failures) - 6} more)" if len(failures) > 6 else ""),
                                hint="a silent no-op in the converter or compression pass; rerun with --debug")
    sizes = C.blob_layout(prog)
    total, weight_file = C.package_sizes(path)
    info = {"conversion": how, "op_counts": counts, "blobs": len(sizes), "payload_bytes": sum(sizes),
            "package_bytes": total, "weight_file_bytes": weight_file,
            "overhead_estimate": C.container_overhead(len(sizes))}
    return info, prog, evidence


def _input_quantized(head: Any) -> tuple[bool, str]:
    """W8A8 read-back: does the op consuming this int8 weight take its input from dequantize(quantize(x))?"""
    users = [op for v in (head.outputs if head is not None else []) for op in v.child_ops]
    for op in users:
        deq = getattr(op.inputs.get("x"), "op", None)
        q = getattr(deq.inputs.get("input"), "op", None) if deq is not None and deq.op_type == "dequantize" else None
        if q is not None and q.op_type == "quantize":
            dtype = q.inputs["output_dtype"].val if "output_dtype" in q.inputs else "int8"
            return True, f"{op.op_type} input through quantize ({dtype}) + dequantize"
    return False, "no quantize/dequantize before the op using the weight: activations stay float"


def _coreml_ok(kind: str, p: dict[str, Any], ev: Any) -> tuple[bool, str]:
    from compressadvise.backends.coremltools_coreml import LUT_OPS, QUANT_OPS, SPARSE_OPS

    if kind == "palettize":
        if not any(o in LUT_OPS for o in ev.ops):
            return False, "no constexpr_lut_to_dense/constexpr_lut_to_sparse op: the weight stayed dense"
        want = 2 ** int(need(p, "nbits"))
        if ev.lut_entries is not None and ev.lut_entries != want:
            return False, f"LUT has {ev.lut_entries} entries, expected {want}"
        return True, ""
    if kind == "activations":  # W8A8: int8 (or an earlier step's) weights; the caller checks the input
        if not any(o in QUANT_OPS + LUT_OPS for o in ev.ops):
            return False, "the weight stayed dense fp16: W8A8 needs int8 (or compressed) weights"
        return True, ""
    if kind == "quantize":
        if not any(o in QUANT_OPS for o in ev.ops):
            return False, "no constexpr_blockwise_shift_scale/constexpr_affine_dequantize op: the weight stayed dense"
        return True, ""
    if kind in SPARSE_KINDS:
        if not any(o in SPARSE_OPS for o in ev.ops):
            return False, "no constexpr_sparse_to_dense op: the weight stayed dense"
        target = _target_sparsity(p)
        if ev.sparsity is None or ev.sparsity < target - SPARSITY_TOLERANCE:
            return False, f"achieved sparsity {ev.sparsity or 0:.1%} < target {target:.0%} (the sparse form holds no zeros)"
        if kind != "prune":
            return _coreml_ok(kind.split("_", 1)[1], p, ev)
        return True, ""
    return True, ""
