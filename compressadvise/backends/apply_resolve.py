"""Plan validation for apply: the plan checked against the knowledge and the model, backends chosen, preflight."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from compressadvise import backends as B
from compressadvise.model.analysis import LayerInfo, ModelReport, split_tensor_name
from compressadvise.errors import BadModel, CompressionFailed, InvalidKnowledge, Unavailable
from compressadvise.knowledge.base import Knowledge
from compressadvise.knowledge.deployment import Deployment
from compressadvise.model.loading import LoadedModel
from compressadvise.knowledge.schema import COMPRESSIBLE, LAYER_TYPES, SLOTS, Plan, Step, Target, Technique
from compressadvise.plan.sizing import backend_leaves_alone


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
        if split_tensor_name(t)[1] == "weight":
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
        tech = _step_technique(step, k, where)
        _check_step_params(tech, step, report, by_name, where)
        if not step.layers and not step.skipped:
            raise InvalidKnowledge(f"{where}: the step lists no layers to compress")
        kind = tech.form or "quantize"  # the form comes from the technique YAML (absent: as before)
        job = B.StepJob(index=index, technique=tech.name, slot=step.slot, kind=kind,
                        params={**tech.defaults(), **step.params}, layers=[], data=tech.data)
        for s in step.skipped:
            job.skipped.append({"layer": s.layer, "reason": s.reason, "code": s.code or "plan"})
        _add_layers(job, tech, step, report, by_name, seen_slot.setdefault(step.slot, set()), where)
        if target.coreml:
            _check_os(job, k, Deployment(target, plan.target.os or target.default_os), where)
        job.torch_backend = _choose(tech, target, "torch")
        job.coreml_backend = _choose(tech, target, "coreml") if target.coreml else None
        jobs.append(job)
    if not jobs:
        raise InvalidKnowledge("the plan has no steps: nothing to apply")
    if not any(j.layers or j.blocked for j in jobs):
        first = next((s for j in jobs for s in j.skipped), None)
        raise InvalidKnowledge("the plan compresses no layer: its steps skip every layer they name"
                               + (f" (e.g. {first['layer']}: {first['reason']})" if first else ""),
                               hint="nothing to apply; see the skip reasons in the plan or `compressadvise recommend`")
    return jobs


def _check_os(job: B.StepJob, k: Knowledge, dep: Deployment, where: str) -> None:
    """Refuse, before any work, a setting the deployment OS cannot load (per the target's YAML):
    coremltools would otherwise fail mid-conversion (grouped LUTs, per-block scales and joint
    forms are iOS 18 ops)."""
    for lj in job.layers:
        missing = dep.missing(lj.setting.modes(k)) if lj.setting is not None else []
        if not missing:
            continue
        needs = [(m, dep.target.mode(m)) for m in missing]
        listed = [(m, spec.min_os) for m, spec in needs if spec is not None]
        when = "; ".join(f"{m} from OS {v}" for m, v in listed) or f"{', '.join(missing)}: not listed"
        raise InvalidKnowledge(
            f"{where}: layer {lj.name} ({lj.setting.label}) needs runtime mode(s) {', '.join(missing)}, which "
            f"{dep.target.name} cannot load on OS {dep.os} ({when})",
            hint=f"raise the plan's minimum OS (--os {max(v for _, v in listed)})" if listed else
            "choose a setting the target lists (`compressadvise explain " + dep.target.name + "`)")


def _step_technique(step: Step, k: Knowledge, where: str) -> Technique:
    """The step's technique: known, not guidance only, and in the step's slot."""
    if step.technique not in k.techniques:
        raise InvalidKnowledge(f"{where}: unknown technique {step.technique!r}",
                               hint=f"known: {', '.join(sorted(k.techniques))}")
    tech = k.techniques[step.technique]
    if tech.guidance_only:
        raise InvalidKnowledge(f"{where}: {tech.name} is guidance only; it cannot be applied")
    if step.slot != tech.slot:
        raise InvalidKnowledge(f"{where}: slot {step.slot!r} does not match the technique's slot {tech.slot!r}")
    return tech


def _check_step_params(tech: Technique, step: Step, report: ModelReport, by_name: dict[str, LayerInfo],
                       where: str) -> None:
    """The step's parameters and its per-type and per-name overrides: real parameters, types and layers."""
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


def _add_layers(job: B.StepJob, tech: Technique, step: Step, report: ModelReport, by_name: dict[str, LayerInfo],
                taken: set[str], where: str) -> None:
    """The step's layers into the job with their effective parameters; backend skips and blocks recorded."""
    for name in step.layers:
        if name not in by_name:
            raise _unknown_layer(name, report, where)
        if name in taken:
            raise InvalidKnowledge(f"{where}: layer {name!r} already takes another {step.slot} step",
                                   hint="one step per slot and layer (joint forms are separate slots)")
        taken.add(name)
        x = by_name[name]
        setting = step.setting_for(x, tech)
        params = setting.all_params
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
                                     shape=list(x.weight_shape), params=params, layer_type=x.type,
                                     setting=setting))


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
    needs = [j for j in jobs if j.data == "calibration"]  # training steps bring their data (--train)
    if samples is None:
        if needs:
            raise InvalidKnowledge(f"plan step {needs[0].index + 1} ({needs[0].technique}) needs "
                                   f"{needs[0].data} data", hint="pass --samples FILE (npz with 'inputs'), or --samples bundled")
        return None
    from compressadvise.model.samples import Samples, load_samples

    return samples if isinstance(samples, Samples) else load_samples(samples)


def _example_inputs(loaded: LoadedModel, data: Any, input_shape: list[int] | None) -> tuple | None:
    import torch

    if input_shape:
        return (torch.zeros(*input_shape),)
    if loaded.example_inputs:
        return tuple(loaded.example_inputs)
    if data is not None:
        return data.batch(0, 1)
    return _saved_example(loaded.exported) if loaded.exported is not None else None


def _saved_example(ep: Any) -> tuple | None:
    """The example inputs a .pt2 was saved with (torch.export keeps them), as plain tensors."""
    import torch

    saved = getattr(ep, "example_inputs", None)
    args = saved[0] if isinstance(saved, tuple) and saved else None
    if args and all(isinstance(a, torch.Tensor) for a in args):
        return tuple(a.detach().clone() for a in args)
    return None


@dataclass
class Route:
    torch_side: bool  # the torch side runs (eager module available)
    coreml: str | None  # None | "native" (optimize.coreml on the converted float model) | "convert" (convert the torch result)
    notes: list[str] = field(default_factory=list)


def _coreml_route(jobs: list[B.StepJob]) -> str:
    """"native" (optimize.coreml on the converted model) where every step has a Core ML
    implementation, else "convert" (the converter encodes the torch side's compression metadata).
    Native is preferred for memory: coremltools 9 converting torch palettization metadata maps
    weights to LUT entries at float64 x entries x weights (24 GB for a 22M-parameter BERT at
    8 bits; 0.7 GB natively). Either way apply then proves the torch artefact holds the shipped
    weights (apply_coreml._prove_parity)."""
    return "native" if all(j.coreml_backend for j in jobs) else "convert"


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
    if not eager and not (target.coreml and loaded.exported is not None):
        notes.append(f"the input is a {loaded.format} file without eager code: the torch side cannot run, "
                     "only the Core ML artefact is written")
    coreml = None
    if target.coreml:
        coreml = _coreml_route(jobs)
        if coreml == "convert":
            if not eager:
                raise BadModel("a step without a Core ML implementation needs the torch side, which needs "
                               "the model's code", hint="pass module:function for the model")
            notes.append("Core ML artefact converted from the torch side's result (coremltools keeps its "
                         "compression metadata), because " + "; ".join(n for j in jobs for n in j.notes)
                         if any(j.notes for j in jobs) else "Core ML artefact converted from the torch side's result "
                         "(coremltools encodes its compressed weights, so they are the ones verify measures)")
        B.import_quietly("coremltools")
    return Route(torch_side=eager and any(j.torch_backend for j in jobs), coreml=coreml, notes=notes)
