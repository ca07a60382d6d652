"""The Core ML side of apply: conversion, coremltools compression, the .mlpackage saved, re-opened and checked."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

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
    from compressadvise.backends import coremltools_coreml as C

    if route.coreml == "convert":
        source = compressed
    else:
        source = loaded.module if loaded.module is not None else (loaded.exported or loaded.scripted)
    mlmodel, how = C.convert(source, ctx.example_inputs, ctx.os)
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
                                                           "const": lj.const, "matched_by": lj.match}
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
    stage("Core ML: read back")
    info, prog, evidence = _read_back(path, jobs, outcome, how)
    if compressed is not None:
        _prove_parity(compressed, prog, evidence, jobs, outcome, route)
    return info


def _float_weights(loaded: LoadedModel) -> dict[str, Any]:
    """Weights in fp16 numpy form, to find them by value in the converted program."""
    import torch

    folded: dict[str, Any] = {}
    if loaded.module is None and loaded.exported is not None:  # the converter folds its BatchNorms
        from compressadvise.model.deploy import program_folds

        folded = program_folds(loaded.exported)[0]
    out = {}
    for name, t in loaded.tensors():
        if t.is_floating_point() and t.dim() >= 2:
            out[name] = folded.get(name, t).detach().to(dtype=torch.float16).cpu().numpy()
    return out


def _prove_parity(model: Any, prog: Any, evidence: dict, jobs: list[B.StepJob], outcome: dict,
                  route: Route) -> None:
    """Make the torch artefact's weights the .mlpackage's, and prove it per layer.

    Core ML cannot run here, so verify runs the torch artefact: its weights must be the ones shipped.
    "convert": the converter encodes the torch side's values; where it re-quantized them instead (a
    level apart, e.g. SparseGPT's int8), the torch weights are snapped to Core ML's and the gap noted.
    "native": Core ML compressed the layers itself (an independent k-means picks other LUTs: the gap
    is kept as parity_before_snap), so the torch weights are snapped to them. Then every compared
    layer must agree to float tolerance."""
    dense, evidence = _dense(prog, evidence, jobs, outcome)
    off = _parity(dense, evidence, jobs, outcome, _torch_weights(model, jobs, outcome))  # the gap, recorded
    if route.coreml == "native":
        _snap(model, dense, evidence, jobs, outcome, None, "Core ML compressed it itself")
    elif off:
        worst = max(off.values())
        _snap(model, dense, evidence, jobs, outcome, set(off), "the converter re-encoded it")
        route.notes.append(f"the converter re-encoded {len(off)} layer(s) instead of keeping the torch side's values "
                           f"(max |diff| {worst:.3g}): the torch artefact now holds the .mlpackage's weights, so verify "
                           "measures what ships")
    off = _parity(dense, evidence, jobs, outcome, _torch_weights(model, jobs, outcome))
    if off:
        raise CompressionFailed("Core ML read-back: the .mlpackage's weights are not the torch side's for "
                                + "; ".join(f"{n}: max |Core ML - torch| = {d:.3g}" for n, d in list(off.items())[:6]),
                                hint="the fidelity measured on the torch artefact would not be the artefact's; "
                                "rerun with --debug and report it")


def _dense(prog: Any, evidence: dict, jobs: list[B.StepJob], outcome: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """(decompressed weight by head op, evidence by original const) for the Core ML-applied layers;
    decompressing rewrites `prog`, the read-back's private copy, once its sizes are taken."""
    from compressadvise.backends import coremltools_coreml as C

    heads = {evidence[rec["const"]].head for _, _, rec in applied_layers(jobs, outcome, "coreml")}
    return C.decompressed(prog, sorted(h for h in heads if h)), evidence


def _snap(model: Any, dense: dict, evidence: dict, jobs: list[B.StepJob], outcome: dict,
          names: set[str] | None, why: str) -> None:
    """Copy each Core ML-applied layer's decompressed weight (all, or `names`) into the torch model."""
    import torch

    for job, lj, rec in applied_layers(jobs, outcome, "coreml"):
        value = dense.get(evidence[rec["const"]].head or "")
        w = getattr(_submodule(model, lj.module), lj.param, None)
        if (names is not None and lj.name not in names) or value is None \
                or type(w) not in (torch.Tensor, torch.nn.Parameter) or value.size != w.numel():
            continue
        new = torch.from_numpy(value.reshape(tuple(w.shape))).to(w.dtype)
        rel = float((new - w.detach()).norm() / w.detach().norm().clamp_min(1e-30))
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


def _torch_weights(model: Any, jobs: list[B.StepJob], outcome: dict) -> dict[str, Any]:
    """The torch side's compressed weights (float values snapped to the LUT / grid), for parity."""
    import torch

    weights = {}
    for _, lj, _ in applied_layers(jobs, outcome, "torch"):
        w = getattr(_submodule(model, lj.module), lj.param, None)
        if type(w) in (torch.Tensor, torch.nn.Parameter):  # plain floats, not a tensor subclass
            weights[lj.tensor] = w.detach().float().cpu().numpy()
    return weights


SNAP_LIMIT = 1.0  # relative error of another tensor of the same spread: ~1.41; 1-bit LUTs ~0.6, 90% pruning ~0.8
PARITY_TOLERANCE = 2e-3  # of the weight's largest |value|: fp16 storage of values, LUTs and scales


def _parity(dense: dict, evidence: dict, jobs: list[B.StepJob], outcome: dict,
            torch_weights: dict[str, Any]) -> dict[str, float]:
    """Record per Core ML-applied layer max |decompressed Core ML weight - torch weight|; return the
    layers beyond float tolerance with their difference."""
    import numpy as np

    off: dict[str, float] = {}
    for _, lj, rec in applied_layers(jobs, outcome, "coreml"):
        mine, theirs = torch_weights.get(lj.tensor), dense.get(evidence[rec["const"]].head or "")
        if mine is None:
            rec["parity"] = "not compared: the torch side did not compress this layer"
            continue
        if theirs is None or theirs.size != mine.size:
            rec["parity"] = "not compared: the Core ML weight could not be decompressed to the torch shape"
            continue
        diff = float(np.abs(theirs.reshape(mine.shape) - mine).max())
        rec["parity_max_abs_diff"] = diff
        if diff > PARITY_TOLERANCE * (float(np.abs(mine).max()) or 1.0):
            off[lj.name] = diff
    return off


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
