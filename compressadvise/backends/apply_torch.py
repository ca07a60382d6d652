"""The torch side of apply: backends run on a copy of the model, the artefact saved, re-opened and checked."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Iterator

from compressadvise import backends as B
from compressadvise.errors import CompressionFailed, InvalidKnowledge, Unavailable
from compressadvise.model.loading import LoadedModel
from compressadvise.backends import need

TORCH_FILE = "model.pt2"
SPARSE_KINDS = ("prune", "sparse_palettize", "sparse_quantize")
SPARSITY_TOLERANCE = 0.01  # achieved sparsity may fall this far short of the target (ties, rounding)


# Steps whose backend compresses each layer from its own weight alone (no calibration through the
# model, no training): run one layer at a time, they touch nothing else, so apply can work on its
# own copy of the model in place, or share every weight it does not compress with the caller's.
LAYERWISE = {"coremltools.torch": ("palettization", "linear_quantization", "pruning", "joint_compression",
                                   "joint_sparse_quantization")}


def layerwise(jobs: list[B.StepJob]) -> bool:
    """Every torch-side step compresses layer by layer (the memory-bounded path can run it)."""
    return all(not j.torch_backend or j.technique in LAYERWISE.get(j.torch_backend, ()) for j in jobs)


def _torch_side(loaded: LoadedModel, jobs: list[B.StepJob], ctx: B.Context,
                outcome: dict, tick: Callable[[str], None], *, bounded: bool = False, own: bool = False) -> Any:
    """The torch side's compressed model. All in memory: a deep copy, each step over all its layers.
    Bounded (`layerwise` steps): one layer at a time, in place on a model apply loaded itself (`own`),
    else on a copy that shares every tensor until its layer is compressed: no second copy of the
    weights left alone, no float32 upcast of the model (coremltools clusters fp16 as it is)."""
    with B.quiet():
        model = (loaded.module if own else _sharing_copy(loaded.module)) if bounded \
            else copy.deepcopy(loaded.module)  # the input model is never modified
    model.eval()
    ctx.float_module = loaded.module
    owners = None if own or not bounded else _owners(model)
    for job in jobs:
        tick(f"torch: step {job.index + 1} {job.technique}")
        if not job.torch_backend:
            for lj in job.layers:
                outcome[(job.index, lj.name, "torch")] = {"status": "not run", "reason": "no torch-side implementation; "
                                                          "the torch artefact keeps these weights in float"}
            continue
        run_job = _supported(model, job, outcome)
        run_job.layers = [lj for lj in run_job.layers if not _clustered_in_coreml(job, lj, outcome)]
        if not run_job.layers:
            continue
        try:
            for part in (_one_by_one(run_job) if bounded else [run_job]):
                if owners is not None:
                    _privatize(model, part.layers, owners)
                model = B.get(job.torch_backend).run(model, part, ctx) or model
        except (CompressionFailed, Unavailable, InvalidKnowledge):
            raise
        except Exception as e:
            raise CompressionFailed(f"plan step {job.index + 1} ({job.technique}) failed in {job.torch_backend}: "
                                    f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
        if job.kind == "prune":
            _remember_masks(ctx, run_job, model)
        for lj in run_job.layers:
            outcome[(job.index, lj.name, "torch")] = {"status": "applied", "backend": job.torch_backend}
    if owners is not None:  # the layers no torch backend took: the Core ML read-back may snap them
        _privatize(model, [lj for job in jobs for lj in job.layers], owners)
    _restore_sparsity(ctx, model)
    return model.eval()


def _clustered_in_coreml(job: B.StepJob, lj: B.LayerJob, outcome: dict) -> bool:
    """A layer the saved .mlpackage already palettized with the torch side's own k-means (the
    memory-bounded native route runs the torch side after it): the same LUTs, so the k-means is not
    run twice; the Core ML read-back decompresses them into the torch artefact (parity's snap)."""
    if not outcome.get((job.index, lj.name, "coreml"), {}).get("lut_kmeans"):
        return False
    outcome[(job.index, lj.name, "torch")] = {
        "status": "skipped", "backend": job.torch_backend,
        "reason": "clustered by the Core ML side with the same k-means; its LUTs are decompressed into the torch artefact"}
    return True


def _supported(model: Any, job: B.StepJob, outcome: dict) -> B.StepJob:
    """The step restricted to the layers its backend handles; the others recorded as skipped."""
    backend = B.get(job.torch_backend)
    run_job = copy.copy(job)
    run_job.layers = []
    for lj in job.layers:
        reason = backend.layer_support(job, lj, _submodule(model, lj.module))
        if reason:
            outcome[(job.index, lj.name, "torch")] = {"status": "skipped", "reason": reason, "backend": job.torch_backend}
        else:
            run_job.layers.append(lj)
    return run_job


def _one_by_one(job: B.StepJob) -> Iterator[B.StepJob]:
    for lj in job.layers:
        part = copy.copy(job)
        part.layers = [lj]
        yield part


def _sharing_copy(module: Any) -> Any:
    """New module objects over the same tensors: what the backends rebind or register lands on
    the copy; a weight is made private (`_privatize`) just before it is compressed."""
    memo: dict[int, Any] = {}
    for t in [*module.parameters(), *module.buffers()]:
        memo[id(t)] = t
    return copy.deepcopy(module, memo)


def _owners(model: Any) -> dict[int, list[tuple[Any, str]]]:
    """Every (module, name) holding each parameter object: a tied weight is replaced everywhere."""
    out: dict[int, list[tuple[Any, str]]] = {}
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None:
                out.setdefault(id(p), []).append((m, name))
    return out


def _privatize(model: Any, layers: list[B.LayerJob], owners: dict[int, list[tuple[Any, str]]]) -> None:
    """Give these layers' weights their own storage (shared with the caller's model until now)."""
    import torch

    for lj in layers:
        old = _param(model, lj)
        if not isinstance(old, torch.nn.Parameter) or id(old) not in owners:
            continue
        new = torch.nn.Parameter(old.detach().clone(), requires_grad=old.requires_grad)
        for m, name in owners.pop(id(old)):
            m._parameters[name] = new


def _submodule(model: Any, path: str) -> Any:
    try:
        return model.get_submodule(path) if path else model
    except AttributeError:
        return None


def _remember_masks(ctx: B.Context, job: B.StepJob, model: Any) -> None:
    """Remember pruning masks: a later palettization's k-means may turn exact zeros into a centroid."""
    for lj in job.layers:
        w = _param(model, lj)
        if w is not None:
            ctx.masks[lj.tensor] = (w.detach() == 0)
            ctx.prior_sparsity[lj.name] = float(ctx.masks[lj.tensor].float().mean())


def _restore_sparsity(ctx: B.Context, model: Any) -> None:
    """Re-zero pruned weights after later steps: Core ML's joint formats keep zeros out of the LUT/grid too."""
    import torch

    with torch.no_grad():
        for tensor, mask in ctx.masks.items():
            module, _, param = tensor.rpartition(".")
            w = getattr(_submodule(model, module), param, None)
            if isinstance(w, torch.Tensor) and type(w) in (torch.Tensor, torch.nn.Parameter):
                w.masked_fill_(mask, 0.0)


def _param(model: Any, lj: B.LayerJob) -> Any:
    return getattr(_submodule(model, lj.module), lj.param, None)


def _save_torch(model: Any, example: tuple | None, tmp: Path) -> dict[str, Any]:
    """torch.export program when possible; TorchScript next; a state dict (+ recipe) last."""
    import torch

    errors = []
    with B.quiet():
        if example:
            # A dynamic batch axis first, so the artefact runs on batches of any size (verify).
            # (torch specialises a size-1 axis, hence an example batch of 2 for that attempt).
            dynamic = tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in example)
            batch2 = tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in example)
            for args, shapes, label in ((batch2, dynamic, "dynamic batch"), (tuple(example), None, "fixed input shape")):
                try:
                    ep = torch.export.export(model, args, dynamic_shapes=shapes)
                    torch.export.save(ep, str(tmp / TORCH_FILE))
                    return {"file": TORCH_FILE, "format": "exported",
                            "note": f"torch.export program, {label} (load_model / load_artifact)"}
                except Exception as e:
                    errors.append(f"torch.export ({label}): {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160] if str(e) else ''}")
            try:
                traced = torch.jit.trace(model, tuple(example), check_trace=False)
                torch.jit.save(traced, str(tmp / "model.ts"))
                return {"file": "model.ts", "format": "torchscript", "note": "TorchScript (torch.export failed: "
                        + "; ".join(errors) + ")"}
            except Exception as e:
                errors.append(f"torch.jit.trace: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
        else:
            errors.append("no example input to export with")
        torch.save(model.state_dict(), str(tmp / "state_dict.pt"))
    return {"file": "state_dict.pt", "format": "state_dict",
            "note": "state dict; load_artifact rebuilds the model from its factory (" + "; ".join(errors) + ")"}


def applied_layers(jobs: list[B.StepJob], outcome: dict, side: str) -> Iterator[tuple[B.StepJob, B.LayerJob, dict]]:
    """(job, layer, outcome record) of every layer a side reports as applied: what read-back checks."""
    for job in jobs:
        for lj in job.layers:
            rec = outcome.get((job.index, lj.name, side))
            if rec and rec["status"] == "applied":
                yield job, lj, rec


def _check_torch(path: Path, jobs: list[B.StepJob], outcome: dict, ctx: B.Context) -> int:
    """Reload the saved torch artefact and check every applied layer really is compressed; returns
    the bytes its tensors store (what the torch-only targets' gate compares with the plan)."""
    import torch

    with B.quiet():
        if path.suffix == ".pt2":
            ep = torch.export.load(str(path))  # our own artefact, written by this run a moment ago
            state = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
        elif path.suffix == ".ts":
            state = dict(torch.jit.load(str(path)).state_dict())
        else:
            state = torch.load(str(path), weights_only=True, map_location="cpu")
    failures = []
    for job, lj, rec in applied_layers(jobs, outcome, "torch"):
        w = state.get(lj.tensor)
        ok, evidence = (False, f"{lj.tensor} missing from the saved artefact") if w is None else \
            check_tensor(w, job.kind, lj.params, ctx.prior_sparsity.get(lj.name))
        if ok and job.kind == "activations":  # W8A8: the calibrated input quantization travels with the layer
            scale = state.get(f"{lj.module}._act_scale" if lj.module else "_act_scale")
            ok = scale is not None
            evidence += f"; input quantized to uint8, scale {float(scale):.3g}" if ok else "; no input quantization"
        rec["evidence"] = evidence
        if not ok:
            failures.append(f"{lj.name} ({job.technique}): {evidence}")
    if failures:
        raise CompressionFailed("torch artefact read-back: compression did not happen for " + "; ".join(failures[:6])
                                + (f" (+{len(failures) - 6} more)" if len(failures) > 6 else ""))
    seen: set[int] = set()
    return sum(tensor_bytes(v, seen) for v in state.values())


def tensor_bytes(t: Any, seen: set[int]) -> int:
    """Bytes a saved value stores: a torchao subclass by its inner tensors (integer data, scales),
    a quantized tensor by its integers and per-channel parameters; shared storage counted once."""
    import torch

    if isinstance(t, (list, tuple)):
        return sum(tensor_bytes(x, seen) for x in t)
    if not isinstance(t, torch.Tensor):
        return 0
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        return sum(tensor_bytes(getattr(t, name), seen) for name in t.__tensor_flatten__()[0])
    if t.is_quantized:
        extra = 0
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            extra = sum(tensor_bytes(x, seen) for x in (t.q_per_channel_scales(), t.q_per_channel_zero_points()))
        return t.numel() * t.element_size() + extra
    key = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
    if key in seen and t.numel():
        return 0
    seen.add(key)
    return t.numel() * t.element_size()


def check_tensor(w: Any, kind: str, p: dict[str, Any], prior_sparsity: float | None = None) -> tuple[bool, str]:
    """(ok, evidence): does this weight show the compression `kind` with parameters `p`?"""
    import torch

    inner = getattr(w, "qdata", None)
    if inner is not None:  # torchao tensor subclass: integer storage + scales
        nbits = int(need(p, "nbits"))
        lo, hi = int(inner.min()), int(inner.max())
        ok = not inner.is_floating_point() and -(2 ** (nbits - 1)) <= lo and hi <= 2 ** (nbits - 1) - 1
        return ok, f"{type(w).__name__}: {inner.dtype} storage, values in [{lo}, {hi}] ({nbits}-bit range)"
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        return False, f"unexpected {type(w).__name__}"
    w = w.detach().float()
    sparse = ""
    if kind in SPARSE_KINDS:
        target = _target_sparsity(p)
        achieved = float((w == 0).float().mean())
        sparse = f"sparsity {achieved:.1%} (target {target:.0%})"
        if achieved < target - SPARSITY_TOLERANCE or kind == "prune":
            return achieved >= target - SPARSITY_TOLERANCE, sparse
        prior_sparsity = achieved
        kind = kind.split("_", 1)[1]
    if kind == "activations":
        kind = "quantize"  # W8A8's weights: an int8 grid per channel (its input quantization is checked by the caller)
    if kind not in ("palettize", "quantize"):
        return True, "not checked"
    nbits = int(need(p, "nbits"))
    levels = 2 ** nbits
    groups = _value_groups(w, kind, p)
    worst = max(_distinct(g, prior_sparsity) for g in groups)
    what = "LUT" if kind == "palettize" else "grid"
    extra = "" if not prior_sparsity else " besides the pruned zeros"
    text = f"at most {worst} distinct values{extra} per {what} group (<= {levels} for {nbits} bits; {len(groups)} group(s))"
    return worst <= levels, "; ".join(x for x in (sparse, text) if x)


def _distinct(g: Any, prior_sparsity: float | None) -> int:
    u = g.unique()
    if prior_sparsity:
        u = u[u != 0]
    return int(u.numel())


def _target_sparsity(p: dict[str, Any]) -> float:
    from compressadvise.backends.coremltools_torch import n_m_ratio

    if p.get("pattern") == "n_m" and (r := n_m_ratio(p)):
        return r[0] / r[1]
    return float(need(p, "sparsity"))


def _value_groups(w: Any, kind: str, p: dict[str, Any]) -> list:
    rows = w.reshape(w.shape[0], -1)
    gran = p.get("granularity", "per_tensor" if kind == "palettize" else "per_channel")
    if kind == "palettize":
        if p.get("enable_per_channel_scale"):
            return list(rows)
        if gran == "per_grouped_channel":
            gs = int(need(p, "group_size"))
            return [rows[i:i + gs] for i in range(0, rows.shape[0], gs)]
        return [rows]
    if gran == "per_tensor":
        return [rows]
    if gran == "per_block":
        bs = int(need(p, "block_size"))
        cin = w.shape[1]
        blocks = w.reshape(w.shape[0], cin, -1)
        return [blocks[r, c:c + bs] for r in range(w.shape[0]) for c in range(0, cin, bs)]
    return list(rows)
