"""Carry out a plan: compressed artefacts through coremltools and torchao, read back and checked.

    result = apply(model, "plan.yaml", "out/")   # model: LoadedModel, path, or None (bundled)

Writes, atomically, into `out/`:
- `model.pt2`: the torch side's result (torch.export program; a TorchScript or state-dict
  fallback is recorded in the manifest), loadable with `load_artifact(out)`;
- `model.mlpackage` for Core ML targets;
- `plan.yaml` (the plan replayed) and `manifest.json` (input hash, library versions, per layer
  what was applied or skipped and why, predicted vs measured sizes).

Everything is validated before any work: unknown techniques, layers or parameters, a plan made
for another model, techniques this machine cannot run, layers whose dimensions the backend
would silently skip. After writing, every artefact is re-opened and each layer is checked for
the compression the plan asked for; a silent no-op raises CompressionFailed (exit 8) and
nothing is left behind.
"""
from __future__ import annotations

import copy
import difflib
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import backends as B
from .analysis import LayerInfo, ModelReport, _split, analyze
from ._callable import callable_module
from .errors import BadModel, CompressionFailed, InputNotFound, InvalidKnowledge, OutputExists, Unavailable
from .fsutil import atomic_dir, check_output, temp_files_in, write_text_atomic, writing
from .knowledge import Knowledge, builtin
from .loading import LoadedModel, load_model
from .schema import COMPRESSIBLE, LAYER_TYPES, SLOTS, Plan, Step, Target, Technique
from .sizing import backend_leaves_alone

MANIFEST_VERSION = 1
TORCH_FILE = "model.pt2"
MLPACKAGE = "model.mlpackage"
SPARSE_KINDS = ("prune", "sparse_palettize", "sparse_quantize")
SPARSITY_TOLERANCE = 0.01  # achieved sparsity may fall this far short of the target (ties, rounding)
SIZE_TOLERANCE = 0.02  # measured weight file vs estimate; beyond it the manifest carries a note


@dataclass
class ApplyResult:
    out_dir: Path
    torch_artifact: Path | None
    mlpackage: Path | None
    manifest: dict[str, Any]
    seconds: float = 0.0

    @property
    def torch_model_path(self) -> Path | None:
        return self.torch_artifact


# ====================================================================== public API
def apply(
    model: LoadedModel | str | Path | None = None,
    plan: Plan | str | Path | None = None,
    out: str | Path | None = None,
    *,
    force: bool = False,
    samples: Any = None,
    progress: Callable[[str, int, int], None] | None = None,
    input_shape: list[int] | None = None,
    trust_pickle: bool = False,
    knowledge: Knowledge | None = None,
) -> ApplyResult:
    """Apply `plan` to `model`, writing the artefacts and manifest into `out`."""
    started = time.perf_counter()
    if plan is None or out is None:
        raise InvalidKnowledge("apply needs a plan and an output folder")
    if not isinstance(plan, Plan):
        from .plan import load_plan

        plan = load_plan(plan)
    out = check_out(out, model, force=force)  # fail fast; atomic_dir checks again when it starts
    k = knowledge or builtin()
    target = k.target(plan.target.name)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, trust_pickle=trust_pickle)
    _check_model(plan, loaded)
    report = analyze(loaded, stats=False)
    jobs = resolve(plan, k, report, target)
    ctx = B.Context(target=target, os=plan.target.os or target.default_os, progress=progress)
    route = _preflight(jobs, ctx, loaded, target)  # libraries, GPU, model code: before anything else
    for job in jobs:
        if job.blocked:  # the divisibility pitfall: refuse rather than let the backend skip silently
            raise job.blocked[0]
    ctx.samples = _samples(samples, jobs)
    ctx.example_inputs = _example_inputs(loaded, ctx.samples, input_shape)
    if route.coreml and ctx.example_inputs is None and loaded.exported is None:
        raise BadModel("Core ML conversion needs an example input and the model carries none",
                       hint="pass --input-shape 1,3,224,224 or --samples FILE")
    with atomic_dir(out, force=force) as tmp:
        with temp_files_in(tmp / ".scratch"):  # coremltools' temp .mlpackages: swept if we are killed
            manifest = _execute(plan, k, loaded, report, jobs, ctx, route, tmp)
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
    return ApplyResult(out_dir=out, torch_artifact=out / manifest["torch_artifact"] if manifest["torch_artifact"] else None,
                       mlpackage=out / manifest["mlpackage"] if manifest["mlpackage"] else None,
                       manifest=manifest, seconds=manifest["seconds"])


def check_out(out: str | Path, model: LoadedModel | str | Path | None, *, force: bool) -> Path:
    """`out` is a folder that never holds the input model; --force replaces only an earlier
    output (or an empty folder), never a folder of other files (`--out . --force`)."""
    out = Path(out)
    source = model.source if isinstance(model, LoadedModel) else model
    check_output(out, force=force, inputs={"model": source}, kind="folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        raise OutputExists(f"--out {out} is a folder that is not an `apply` output (no manifest.json): "
                           "--force only replaces those", hint="choose a new or empty --out folder")
    return out


def load_artifact(out_dir: str | Path, *, factory: str | None = None) -> LoadedModel:
    """The torch side's compressed model from an `apply` output folder, ready to run.

    A state-dict artefact needs its model code: only `factory`, the `module:function` the caller
    named itself, is imported for it; the manifest (a file we wrote, or anyone did) never chooses it."""
    out_dir = Path(out_dir)
    path = out_dir / "manifest.json"
    if not path.is_file():
        raise InputNotFound(f"{out_dir} holds no manifest.json (not an `apply` output)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise BadModel(f"{path}: unreadable manifest ({e})") from e
    artifact = manifest.get("torch_artifact")
    if not artifact:
        raise BadModel(f"{path}: no torch artefact was written ({manifest.get('torch_note', 'see the manifest')})")
    if "torchao" in manifest.get("backends_used", []):
        B.import_quietly("torchao")  # registers the tensor subclasses the artefact holds
    fmt = manifest.get("torch_format", "exported")
    if fmt == "state_dict":
        return _load_state_dict_artifact(out_dir, manifest, factory)
    with B.quiet():
        loaded = load_model(out_dir / artifact)
    loaded.notes.append(f"compressed by compressadvise apply ({', '.join(s['technique'] for s in manifest.get('steps', []))})")
    return loaded


# ====================================================================== validation
def _check_model(plan: Plan, loaded: LoadedModel) -> None:
    if plan.model.sha256 and plan.model.sha256 != loaded.sha256:
        raise InvalidKnowledge(
            f"the plan was made for another model (sha256 {plan.model.sha256[:12]}..., source "
            f"{plan.model.source or '?'}); this model is {loaded.sha256[:12]}... ({loaded.source})",
            hint="run `compressadvise recommend` for this model, or remove model.sha256 from a hand-written plan")
    if not loaded.has_graph:
        raise BadModel(f"{loaded.source} holds weights only ({loaded.format}): there is no graph to compress "
                       "or convert", hint="pass module:function (the model code) or a torch.export .pt2")


def weight_tensor(x: LayerInfo) -> str:
    for t in x.tensors:
        if _split(t)[1] == "weight":
            return t
    return x.tensors[0]


def effective(tech: Technique, step: Step, x: LayerInfo) -> dict[str, Any]:
    """Technique defaults < step params < per-type override < per-name override: the one
    resolver (`Step.setting_for`, which sizing uses too), plus backend parameters."""
    return step.setting_for(x, tech).all_params


def _check_params(tech: Technique, params: dict[str, Any], where: str) -> None:
    for name, value in params.items():
        spec = tech.parameters.get(name)
        if spec is None:
            raise InvalidKnowledge(f"{where}: technique {tech.name!r} has no parameter {name!r}",
                                   hint=f"its parameters: {', '.join(tech.parameters) or 'none'}")
        if msg := spec.check(name, value):
            raise InvalidKnowledge(f"{where}: {msg}")


def _unknown_layer(name: str, report: ModelReport, where: str) -> InvalidKnowledge:
    close = difflib.get_close_matches(name, [x.name for x in report.layers], n=3)
    return InvalidKnowledge(f"{where}: layer {name!r} does not exist in {report.source}",
                            hint=f"did you mean {', '.join(close)}?" if close else "see `compressadvise analyze`")


def resolve(plan: Plan, k: Knowledge, report: ModelReport, target: Target) -> list[B.StepJob]:
    """Check the plan against the knowledge and the model; one StepJob per step, backends chosen."""
    by_name = {x.name: x for x in report.layers}
    ordered = sorted(enumerate(plan.steps), key=lambda e: (SLOTS.index(e[1].slot) if e[1].slot in SLOTS else 9, e[0]))
    jobs: list[B.StepJob] = []
    seen_slot: dict[str, set[str]] = {}
    for index, step in ordered:
        where = f"plan step {index + 1} ({step.technique})"
        if step.technique not in k.techniques:
            raise InvalidKnowledge(f"{where}: unknown technique {step.technique!r}",
                                   hint=f"known: {', '.join(sorted(k.techniques))}")
        tech = k.techniques[step.technique]
        if tech.guidance_only:
            raise InvalidKnowledge(f"{where}: {tech.name} is guidance only; it cannot be applied")
        if step.slot != tech.slot:
            raise InvalidKnowledge(f"{where}: slot {step.slot!r} does not match the technique's slot {tech.slot!r}")
        _check_params(tech, step.params, where)
        for key, ov in step.op_type_params.items():
            if key not in LAYER_TYPES and not any(x.module_type == key for x in report.layers):
                raise InvalidKnowledge(f"{where}: op_type_params key {key!r} is neither a layer type "
                                       f"({', '.join(LAYER_TYPES)}) nor a module class of this model")
            _check_params(tech, ov, f"{where}, op_type_params[{key}]")
        for name, ov in step.op_name_params.items():
            if name not in by_name:
                raise _unknown_layer(name, report, f"{where}, op_name_params")
            _check_params(tech, ov, f"{where}, op_name_params[{name}]")
        if not step.layers:
            raise InvalidKnowledge(f"{where}: the step lists no layers to compress")
        kind = tech.form or "quantize"  # the form comes from the technique YAML (absent: as before)
        job = B.StepJob(index=index, technique=tech.name, slot=step.slot, kind=kind,
                        params={**tech.defaults(), **step.params}, layers=[], data=tech.data)
        for s in step.skipped:
            job.skipped.append({"layer": s.layer, "reason": s.reason, "code": s.code or "plan"})
        taken = seen_slot.setdefault(step.slot, set())
        for name in step.layers:
            if name not in by_name:
                raise _unknown_layer(name, report, where)
            if name in taken:
                raise InvalidKnowledge(f"{where}: layer {name!r} already takes another {step.slot} step",
                                       hint="one step per slot and layer (joint forms are separate slots)")
            taken.add(name)
            x = by_name[name]
            params = effective(tech, step, x)
            try:
                reason = _backend_skip(x, params)
            except CompressionFailed as e:
                job.blocked.append(e)
                continue
            if reason:
                job.skipped.append({"layer": name, "reason": reason, "code": "backend"})
                continue
            tensor = weight_tensor(x)
            module, _, param = tensor.rpartition(".")
            job.layers.append(B.LayerJob(name=name, module=module, param=param, tensor=tensor,
                                         shape=list(x.weight_shape), params=params, layer_type=x.type))
        job.torch_backend = _choose(tech, target, "torch")
        job.coreml_backend = _choose(tech, target, "coreml") if target.coreml else None
        jobs.append(job)
    if not jobs:
        raise InvalidKnowledge("the plan has no steps: nothing to apply")
    return jobs


def _backend_skip(x: LayerInfo, p: dict[str, Any]) -> str | None:
    """Layers the backends leave alone by design (reported), or raise on the divisibility pitfall."""
    if x.tied_to:
        return f"shares its weight with {x.tied_to}: compress it there (stored once)"
    if len(x.weight_shape) < 2 or x.type not in COMPRESSIBLE:
        return f"{x.type} layer with a {len(x.weight_shape)}-d weight: not compressible by these backends"
    left = backend_leaves_alone(x, p)
    if left is None:
        return None
    kind, reason = left
    if kind == "threshold":
        return reason
    size = "group_size" if p.get("granularity") == "per_grouped_channel" else "block_size"
    raise CompressionFailed(f"layer {x.name}: {reason}",
                            hint=f"choose a {size} dividing it, or list the layer under skipped (recommend does this)")


def _choose(tech: Technique, target: Target, side: str) -> str | None:
    """The YAML's backends first (in order), then any registered backend implementing the technique."""
    names = B.names()
    listed = [b.backend for b in tech.backends if b.backend in names]
    for bid in listed + [b for b in names if b not in listed]:
        spec = B.REGISTRY[bid]
        if spec.side != side:
            continue
        if target.backends and bid not in target.backends and spec.family not in target.backends:
            continue
        if B.implements(bid, tech.name):
            return bid
    return None


def _samples(samples: Any, jobs: list[B.StepJob]) -> Any:
    needs = [j for j in jobs if j.data != "none"]
    if samples is None:
        if needs:
            raise InvalidKnowledge(f"plan step {needs[0].index + 1} ({needs[0].technique}) needs "
                                   f"{needs[0].data} data", hint="pass --samples FILE (npz with 'inputs'), or --samples bundled")
        return None
    from .samples import Samples, load_samples

    return samples if isinstance(samples, Samples) else load_samples(samples)


def _example_inputs(loaded: LoadedModel, data: Any, input_shape: list[int] | None) -> tuple | None:
    import torch

    if input_shape:
        return (torch.zeros(*input_shape),)
    if loaded.example_inputs:
        return tuple(loaded.example_inputs)
    if data is not None:
        return data.batch(0, 1)
    return None


@dataclass
class Route:
    torch_side: bool  # the torch side runs (eager module available)
    coreml: str | None  # None | "native" (optimize.coreml on the converted float model) | "convert" (convert the torch result)
    notes: list[str] = field(default_factory=list)


def _preflight(jobs: list[B.StepJob], ctx: B.Context, loaded: LoadedModel, target: Target) -> Route:
    """Everything that can fail for lack of a library, a GPU, model code or an example input."""
    notes: list[str] = []
    eager = loaded.module is not None
    for job in jobs:
        where = f"plan step {job.index + 1} ({job.technique})"
        if job.torch_backend and eager:
            if reason := B.get(job.torch_backend).unavailable(job, ctx):
                raise Unavailable(f"{where}: {reason}", hint="pick another technique for this target, or run where the library/GPU is present")
        if job.coreml_backend:
            if reason := B.get(job.coreml_backend).unavailable(job, ctx):
                job.coreml_backend = None
                job.notes.append(f"Core ML side: {reason}")
        if target.coreml and not job.coreml_backend and job.torch_backend != "coremltools.torch":
            why = job.notes[-1] if job.notes else B.get("coremltools.coreml").unavailable(job, ctx)
            raise Unavailable(f"{where}: {target.name} deploys through Core ML and no Core ML implementation "
                              f"of {job.technique} is available here" + (f" ({why})" if why else ""))
        if not job.torch_backend and not target.coreml:
            raise Unavailable(f"{where}: no backend for {target.name} implements {job.technique}",
                              hint=f"target backends: {', '.join(target.backends) or 'any'}")
        if not eager and job.torch_backend and not (target.coreml and job.coreml_backend):
            raise BadModel(f"{where}: the torch side needs the model's code, but {loaded.source} is a "
                           f"{loaded.format} file", hint="pass module:function for the model")
    if not eager:
        notes.append(f"the input is a {loaded.format} file without eager code: the torch side cannot run, "
                     "only the Core ML artefact is written")
    coreml = None
    if target.coreml:
        coreml = "native" if all(j.coreml_backend for j in jobs) else "convert"
        if coreml == "convert":
            if not eager:
                raise BadModel("a step without a Core ML implementation needs the torch side, which needs "
                               "the model's code", hint="pass module:function for the model")
            notes.append("Core ML artefact converted from the torch side's result (coremltools keeps its "
                         "compression metadata), because " + "; ".join(n for j in jobs for n in j.notes)
                         if any(j.notes for j in jobs) else "Core ML artefact converted from the torch side's result")
        B.import_quietly("coremltools")
    return Route(torch_side=eager and any(j.torch_backend for j in jobs), coreml=coreml, notes=notes)


# ====================================================================== the work
def _execute(plan: Plan, k: Knowledge, loaded: LoadedModel, report: ModelReport, jobs: list[B.StepJob],
             ctx: B.Context, route: Route, tmp: Path) -> dict[str, Any]:
    from .plan import plan_to_yaml

    outcome: dict[tuple[int, str, str], dict[str, Any]] = {}  # (step, layer, side) -> record
    torch_info: dict[str, Any] = {"file": None, "format": None, "note": None}
    compressed = None
    n = len(jobs)
    stage = _Stages(ctx, (n + 2 if route.torch_side else 0) + ((n if route.coreml == "native" else 0) + 3
                                                            if route.coreml else 0) + 1)
    if route.torch_side:
        compressed = _torch_side(loaded, jobs, ctx, outcome, stage)
        stage("torch: save")
        torch_info = _save_torch(compressed, ctx.example_inputs, tmp)
        stage("torch: read back")
        if torch_info["file"]:
            _check_torch(tmp / torch_info["file"], jobs, outcome, ctx)
    else:
        torch_info["note"] = route.notes[0] if route.notes else "no torch-side step"
    mlinfo: dict[str, Any] = {}
    if route.coreml:
        stage("Core ML: conversion")
        mlinfo = _coreml_side(loaded, compressed, jobs, ctx, route, outcome, tmp, stage)
    _require_work(jobs, outcome, route)
    stage("manifest")
    write_text_atomic(tmp / "plan.yaml", plan_to_yaml(plan))
    torch_bytes = (tmp / torch_info["file"]).stat().st_size if torch_info["file"] else None
    return _manifest(plan, k, loaded, report, jobs, route, outcome, torch_info, torch_bytes, mlinfo)


def _require_work(jobs: list[B.StepJob], outcome: dict, route: Route) -> None:
    """A step whose every layer the backends turned down did nothing: refuse to ship that."""
    applied = {(s, n) for (s, n, _), r in outcome.items() if r.get("status") == "applied"}
    for job in jobs:
        if job.layers and not any((job.index, lj.name) in applied for lj in job.layers):
            reasons = sorted({r.get("reason", "") for (s, _, _), r in outcome.items() if s == job.index and r.get("reason")})
            raise CompressionFailed(f"plan step {job.index + 1} ({job.technique}) compressed none of its "
                                    f"{len(job.layers)} layer(s): {'; '.join(reasons)[:400]}")
        if not job.layers:
            route.notes.append(f"plan step {job.index + 1} ({job.technique}): every listed layer was skipped "
                               "(see layers); nothing to compress")
    if not applied:
        raise CompressionFailed("the plan compressed no layer at all", hint="see the skip reasons with --debug")


class _Stages:
    """Progress by stage: each call announces the stage that starts now."""

    def __init__(self, ctx: B.Context, total: int) -> None:
        self.ctx, self.total, self.done = ctx, total, -1

    def __call__(self, label: str) -> None:
        self.done += 1
        self.ctx.tick(label, min(self.done, self.total), self.total)


# ---------------------------------------------------------------- torch side
def _torch_side(loaded: LoadedModel, jobs: list[B.StepJob], ctx: B.Context,
                outcome: dict, tick: Callable[[str], None]) -> Any:
    with B.quiet():
        model = copy.deepcopy(loaded.module).eval()  # the input model is never modified
    ctx.float_module = loaded.module
    for job in jobs:
        tick(f"torch: step {job.index + 1} {job.technique}")
        if not job.torch_backend:
            for lj in job.layers:
                outcome[(job.index, lj.name, "torch")] = {"status": "not run", "reason": "no torch-side implementation; "
                                                          "the torch artefact keeps these weights in float"}
            continue
        backend = B.get(job.torch_backend)
        run_job = copy.copy(job)
        run_job.layers = []
        for lj in job.layers:
            module = _submodule(model, lj.module)
            reason = backend.layer_support(job, lj, module)
            if reason:
                outcome[(job.index, lj.name, "torch")] = {"status": "skipped", "reason": reason,
                                                          "backend": job.torch_backend}
            else:
                run_job.layers.append(lj)
        if not run_job.layers:
            continue
        try:
            model = backend.run(model, run_job, ctx) or model
        except (CompressionFailed, Unavailable, InvalidKnowledge):
            raise
        except Exception as e:
            raise CompressionFailed(f"plan step {job.index + 1} ({job.technique}) failed in {job.torch_backend}: "
                                    f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}") from e
        if job.kind == "prune":
            _remember_masks(ctx, run_job, model)
        for lj in run_job.layers:
            outcome[(job.index, lj.name, "torch")] = {"status": "applied", "backend": job.torch_backend}
    _restore_sparsity(ctx, model)
    return model.eval()


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


def _load_state_dict_artifact(out_dir: Path, manifest: dict[str, Any], factory: str | None) -> LoadedModel:
    import torch

    given = manifest.get("input") if isinstance(manifest.get("input"), dict) else {}
    source, fmt = str(given.get("source", "")), given.get("format", "")
    if fmt not in ("factory", "bundled"):
        raise BadModel(f"{out_dir}: the torch artefact is a state dict and the input ({source}) has no factory to rebuild it")
    if fmt == "factory" and source != factory:
        raise BadModel(f"{out_dir}: its torch artefact is a state dict rebuilt by the Python factory {source} "
                       "that manifest.json names; a file the tool wrote never chooses code to import",
                       hint="pass that factory yourself (e.g. `compressadvise verify MODULE:FUNCTION DIR`)")
    base = load_model(None if fmt == "bundled" else source)
    module = base.module
    if "torchao" in manifest.get("backends_used", []):
        plan_path = out_dir / (manifest.get("plan") or "plan.yaml")
        from .plan import load_plan

        plan = load_plan(plan_path)
        k = builtin()
        report = analyze(base, stats=False)
        for job in resolve(plan, k, report, k.target(plan.target.name)):
            if job.torch_backend == "torchao":
                B.get("torchao").run(module, job, B.Context(target=None, os=0))
    state = torch.load(str(out_dir / manifest["torch_artifact"]), weights_only=True, map_location="cpu")
    module.load_state_dict(state, strict=False, assign=True)
    return LoadedModel(source=str(out_dir), format="apply", sha256="", has_graph=True, module=module.eval(),
                       example_inputs=base.example_inputs)


def _check_torch(path: Path, jobs: list[B.StepJob], outcome: dict, ctx: B.Context) -> None:
    """Reload the saved torch artefact and check every applied layer really is compressed."""
    import torch

    with B.quiet():
        if path.suffix == ".pt2":
            ep = torch.export.load(str(path))
            state = {**ep.state_dict, **{k: v for k, v in ep.constants.items() if isinstance(v, torch.Tensor)}}
        elif path.suffix == ".ts":
            state = dict(torch.jit.load(str(path)).state_dict())
        else:
            state = torch.load(str(path), weights_only=True, map_location="cpu")
    failures = []
    for job in jobs:
        for lj in job.layers:
            rec = outcome.get((job.index, lj.name, "torch"))
            if not rec or rec["status"] != "applied":
                continue
            w = state.get(lj.tensor)
            ok, evidence = (False, f"{lj.tensor} missing from the saved artefact") if w is None else \
                check_tensor(w, job.kind, lj.params, ctx.prior_sparsity.get(lj.name))
            rec["evidence"] = evidence
            if not ok:
                failures.append(f"{lj.name} ({job.technique}): {evidence}")
    if failures:
        raise CompressionFailed("torch artefact read-back: compression did not happen for " + "; ".join(failures[:6])
                                + (f" (+{len(failures) - 6} more)" if len(failures) > 6 else ""))


def check_tensor(w: Any, kind: str, p: dict[str, Any], prior_sparsity: float | None = None) -> tuple[bool, str]:
    """(ok, evidence): does this weight show the compression `kind` with parameters `p`?"""
    import torch

    inner = getattr(w, "qdata", None)
    if inner is not None:  # torchao tensor subclass: integer storage + scales
        nbits = int(p.get("nbits", 8))
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
    if kind not in ("palettize", "quantize"):
        return True, "not checked"
    nbits = int(p.get("nbits", 8))
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
    from .backends.coremltools_torch import n_m_ratio

    if p.get("pattern") == "n_m" and (r := n_m_ratio(p)):
        return r[0] / r[1]
    return float(p.get("sparsity", 0.5))


def _value_groups(w: Any, kind: str, p: dict[str, Any]) -> list:
    rows = w.reshape(w.shape[0], -1)
    gran = p.get("granularity", "per_tensor" if kind == "palettize" else "per_channel")
    if kind == "palettize":
        if p.get("enable_per_channel_scale"):
            return list(rows)
        if gran == "per_grouped_channel":
            gs = int(p.get("group_size", 16))
            return [rows[i:i + gs] for i in range(0, rows.shape[0], gs)]
        return [rows]
    if gran == "per_tensor":
        return [rows]
    if gran == "per_block":
        bs = int(p.get("block_size", 32))
        cin = w.shape[1]
        blocks = w.reshape(w.shape[0], cin, -1)
        return [blocks[r, c:c + bs] for r in range(w.shape[0]) for c in range(0, cin, bs)]
    return list(rows)


# ---------------------------------------------------------------- Core ML side
def _coreml_side(loaded: LoadedModel, compressed: Any, jobs: list[B.StepJob], ctx: B.Context, route: Route,
                 outcome: dict, tmp: Path, stage: Callable[[str], None]) -> dict[str, Any]:
    from .backends import coremltools_coreml as C

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
    return _check_coreml(path, jobs, outcome, how)


def _float_weights(loaded: LoadedModel) -> dict[str, Any]:
    """Weights in fp16 numpy form, to find them by value in the converted program."""
    import torch

    out = {}
    for name, t in loaded.tensors():
        if t.is_floating_point() and t.dim() >= 2:
            out[name] = t.detach().to(dtype=torch.float16).cpu().numpy()
    return out


def _check_coreml(path: Path, jobs: list[B.StepJob], outcome: dict, how: str) -> dict[str, Any]:
    """Re-open the saved .mlpackage and check each applied layer's constexpr ops."""
    from .backends import coremltools_coreml as C

    prog = C.load_program(path)
    consts = sorted({rec["const"] for (s, n, side), rec in outcome.items() if side == "coreml" and rec.get("const")})
    evidence = C.inspect_program(prog, consts)
    counts: dict[str, int] = {}
    for ev in evidence.values():
        for op in ev.ops:
            counts[op] = counts.get(op, 0) + 1
    failures = []
    for job in jobs:
        for lj in job.layers:
            rec = outcome.get((job.index, lj.name, "coreml"))
            if not rec or rec["status"] != "applied":
                continue
            ev = evidence.get(rec["const"], C.WeightEvidence())
            ok, why = _coreml_ok(job.kind, lj.params, ev)
            rec["evidence"] = ev.describe()
            if not ok:
                failures.append(f"{lj.name} ({job.technique}): {why}")
    if failures:
        raise CompressionFailed("Core ML read-back: compression did not happen for " + "; ".join(failures[:6])
                                + (f" (+{len(failures) - 6} more)" if len(failures) > 6 else ""),
                                hint="a silent no-op in the converter or compression pass; rerun with --debug")
    sizes = C.blob_layout(prog)
    total, weight_file = C.package_sizes(path)
    return {"conversion": how, "op_counts": counts, "blobs": len(sizes), "payload_bytes": sum(sizes),
            "package_bytes": total, "weight_file_bytes": weight_file,
            "overhead_estimate": C.container_overhead(len(sizes))}


def _coreml_ok(kind: str, p: dict[str, Any], ev: Any) -> tuple[bool, str]:
    from .backends.coremltools_coreml import LUT_OPS, QUANT_OPS, SPARSE_OPS

    if kind == "palettize":
        if not any(o in LUT_OPS for o in ev.ops):
            return False, "no constexpr_lut_to_dense/constexpr_lut_to_sparse op: the weight stayed dense"
        want = 2 ** int(p.get("nbits", 8))
        if ev.lut_entries is not None and ev.lut_entries != want:
            return False, f"LUT has {ev.lut_entries} entries, expected {want}"
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


# ---------------------------------------------------------------- manifest
def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("compressadvise", "torch", "coremltools", "torchao", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _predict_applied(k: Knowledge, report: ModelReport, jobs: list[B.StepJob], outcome: dict, side: str,
                     baseline: float) -> int:
    """The size formulas over the layers really compressed on one side (estimate)."""
    from .engine import _predict

    steps = []
    for job in jobs:
        done = [lj for lj in job.layers if outcome.get((job.index, lj.name, side), {}).get("status") == "applied"]
        steps.append(Step(technique=job.technique, slot=job.slot, params=job.params,
                          layers=[lj.name for lj in done], op_name_params={lj.name: _sized(lj.params) for lj in done}))
    try:
        _, _, after = _predict(k, report, steps, baseline)
    except Exception:  # a technique without a size formula
        return 0
    return after


def _sized(p: dict[str, Any]) -> dict[str, Any]:
    """Parameters as the size formulas read them: an n:m pattern's sparsity is n/m."""
    if p.get("pattern") == "n_m" and "sparsity" in p:
        return {**p, "sparsity": _target_sparsity(p)}
    return p


def _manifest(plan: Plan, k: Knowledge, loaded: LoadedModel, report: ModelReport, jobs: list[B.StepJob],
              route: Route, outcome: dict, torch_info: dict[str, Any], torch_bytes: int | None,
              ml: dict[str, Any]) -> dict[str, Any]:
    target = k.target(plan.target.name)
    layers = []
    in_steps: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        for lj in job.layers:
            entry = {"step": job.index + 1, "technique": job.technique, "params": lj.params}
            for side in ("torch", "coreml"):
                rec = outcome.get((job.index, lj.name, side))
                if rec:
                    entry[side] = rec
            in_steps.setdefault(lj.name, []).append(entry)
        for s in job.skipped:
            in_steps.setdefault(s["layer"], []).append({"step": job.index + 1, "technique": job.technique,
                                                        "status": "skipped", "reason": s["reason"], "code": s["code"]})
    for x in report.layers:
        entries = in_steps.get(x.name, [])
        layers.append({"name": x.name, "type": x.type, "shape": x.weight_shape, "params": x.params,
                       "status": _layer_status(entries), "steps": entries})
    baseline = target.baseline_bytes_per_param
    sizes: dict[str, Any] = {}
    if plan.prediction:
        sizes["plan_estimate_bytes"] = {"value": plan.prediction.bytes_after, "label": "estimate",
                                        "basis": "the plan's prediction (technique size formulas, layers as planned)"}
    side = "coreml" if ml else "torch"
    applied = _predict_applied(k, report, jobs, outcome, side, baseline)
    if applied:
        sizes["applied_estimate_bytes"] = {"value": applied, "label": "estimate",
                                           "basis": f"size formulas over the layers compressed on the {side} side, "
                                           f"{baseline:g} B per uncompressed weight"}
    if ml:
        est = applied + ml["overhead_estimate"] if applied else None
        sizes["mlpackage_bytes"] = {"value": ml["package_bytes"], "label": "measured",
                                    "basis": "whole .mlpackage on disk (weights + program + manifest)"}
        sizes["weight_file_bytes"] = {"value": ml["weight_file_bytes"], "label": "measured",
                                      "basis": "Data/com.apple.CoreML/weights/weight.bin on disk"}
        if est:
            sizes["weight_file_estimate_bytes"] = {
                "value": est, "label": "estimate",
                "basis": f"applied estimate + container overhead for {ml['blobs']} blobs (64 B file header, "
                "64 B per blob, 32 B average alignment padding)"}
            err = (ml["weight_file_bytes"] - est) / est
            sizes["weight_file_error"] = {"value": round(err, 4), "label": "measured vs estimate"}
            if abs(err) > SIZE_TOLERANCE:
                route.notes.append(f"the weight file is {err:+.1%} off the size estimate (tolerance "
                                   f"{SIZE_TOLERANCE:.0%}): a technique's size formula does not match what "
                                   "the backend stores for this model")
    if torch_bytes is not None:
        sizes["torch_artifact_bytes"] = {"value": torch_bytes, "label": "measured",
                                         "basis": f"{torch_info['file']} on disk"
                                         + ("" if target.coreml is False else " (float weights snapped to the "
                                            "compressed values: for accuracy checks, not for size)")}
    used = sorted({b for j in jobs for b in (j.torch_backend if route.torch_side else None,
                                             j.coreml_backend if route.coreml == "native" else None) if b})
    if route.coreml == "convert":
        used.append("coremltools (ct.convert)")
    return {
        "manifest_version": MANIFEST_VERSION,
        "input": {"source": loaded.source, "format": loaded.format, "sha256": loaded.sha256},
        "input_sha256": loaded.sha256,
        "plan": "plan.yaml",
        "target": {"name": target.name, "os": plan.target.os, "coreml": target.coreml},
        "versions": _versions(),
        "torch_artifact": torch_info["file"],
        "torch_format": torch_info["format"],
        "torch_note": torch_info["note"],
        "mlpackage": MLPACKAGE if ml else None,
        "coreml": ({k2: v for k2, v in ml.items() if k2 not in ("package_bytes", "weight_file_bytes")} if ml else None),
        "backends_used": used,
        "steps": [{"step": j.index + 1, "technique": j.technique, "slot": j.slot, "params": j.params,
                   "torch_backend": j.torch_backend if route.torch_side else None,
                   "coreml_backend": j.coreml_backend if route.coreml == "native" else
                   ("ct.convert of the torch-side result" if route.coreml else None),
                   "layers_applied": sorted({n for (s, n, _), r in outcome.items() if s == j.index and r.get("status") == "applied"}),
                   "layers_skipped": len(j.skipped), "notes": j.notes} for j in jobs],
        "notes": route.notes,
        "layers": layers,
        "sizes": sizes,
    }


def _layer_status(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "unchanged (not in the plan)"
    states = set()
    for e in entries:
        if e.get("status") == "skipped":
            states.add("skipped")
        for side in ("torch", "coreml"):
            if side in e:
                states.add(e[side]["status"])
    if "applied" in states:
        return "applied" if states == {"applied"} else "partly applied"
    return "skipped"


callable_module(__name__)  # `compressadvise.apply(...)` works even once this module is imported
