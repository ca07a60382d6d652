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

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from compressadvise import backends as B
from compressadvise.model.analysis import ModelReport, analyze, example_inputs_for
from compressadvise.backends.apply_coreml import _coreml_side
from compressadvise.backends.apply_coreml import MLPACKAGE, _check_coreml  # re-exported
from compressadvise.backends.apply_gate import enforce, planned_vs_built
from compressadvise.backends.apply_manifest import _manifest
from compressadvise.backends.apply_manifest import MANIFEST_VERSION, SIZE_TOLERANCE, Resources  # re-exported
from compressadvise.backends.apply_resolve import Route, _check_model, _example_inputs, _preflight, _samples, resolve
from compressadvise.backends.apply_resolve import effective, weight_tensor  # re-exported
from compressadvise.backends.apply_torch import _check_torch, _save_torch, _torch_side, layerwise
from compressadvise.backends.apply_torch import SPARSE_KINDS, SPARSITY_TOLERANCE, TORCH_FILE, check_tensor  # re-exported
from compressadvise.errors import BadModel, CompressionFailed, InputNotFound, InvalidKnowledge, OutputExists
from compressadvise.fsutil import atomic_dir, check_output, temp_files_in, write_text_atomic
from compressadvise.knowledge.base import Knowledge, builtin
from compressadvise.model.loading import LoadedModel, load_model
from compressadvise.knowledge.schema import Plan
from compressadvise.measure.metrics import Summarized, size_text


@dataclass(repr=False)  # Summarized's one-line repr: the dataclass one printed the whole manifest
class ApplyResult(Summarized):
    out_dir: Path
    torch_artifact: Path | None
    mlpackage: Path | None
    manifest: dict[str, Any]
    seconds: float = 0.0

    @property
    def torch_model_path(self) -> Path | None:
        return self.torch_artifact

    def _summary(self) -> tuple[str, list[tuple[str, str]]]:
        """Where the artefacts are, what was built against the plan, and the sizes on disk."""
        m = self.manifest
        sizes = {k: v.get("value") for k, v in (m.get("sizes") or {}).items() if isinstance(v, dict)}
        built = m.get("planned_vs_built") or {}
        files = [p.name if p.parent == self.out_dir else str(p) for p in (self.torch_artifact, self.mlpackage) if p]
        rows = [("out", str(self.out_dir)), ("artefacts", ", ".join(files) or "none")]
        if built:
            rows.append(("built", f"{built.get('layers_built')} of {built.get('layers_planned')} planned layers, "
                                  f"size {built.get('size', '?')}"))
        rows += [(label, size_text(sizes[key])) for key, label in (
            ("plan_estimate_bytes", "planned size"), ("weight_file_bytes", "weight file"),
            ("mlpackage_bytes", "mlpackage size")) if isinstance(sizes.get(key), (int, float))]
        rows.append(("time", f"{self.seconds:.1f} s"))
        return "ApplyResult", rows


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
    allow_partial: bool = False,
    train: Any = None,
    resume: bool = False,
) -> ApplyResult:
    """Apply `plan` to `model`, writing the artefacts and manifest into `out`.

    `train` (a `training.Training`, "bundled" or "module:function": user code, imported) feeds
    the training-aware steps (dkm, qat, gradual_pruning); they checkpoint beside `out`, and
    `resume` continues an interrupted run from its last checkpoint.

    Raises PlanNotBuilt (exit 8) when the artefact is not what the plan promised (a planned layer
    left uncompressed, or the weights over 2% off the predicted size), unless `allow_partial`."""
    started = time.perf_counter()
    resources = Resources("load, analyze, validate")
    if plan is None or out is None:
        raise InvalidKnowledge("apply needs a plan and an output folder")
    if not isinstance(plan, Plan):
        from compressadvise.plan.planfile import load_plan

        plan = load_plan(plan)
    out = check_out(out, model, force=force)  # fail fast; atomic_dir checks again when it starts
    k = knowledge or builtin()
    target = k.target(plan.target.name)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, trust_pickle=trust_pickle)
    _check_model(plan, loaded)
    # Compress the form that ships (BatchNorm folded, as the converter would): the converter then
    # has nothing left to fold, so the compressed weights reach Core ML unchanged. A .pt2 has no
    # torch side here: the converter folds it, and its layers are found by their folded values.
    given = loaded.module
    if loaded.module is not None:
        from compressadvise.model.deploy import deployable

        loaded = deployable(loaded, example_inputs_for(loaded, input_shape))
    # A model apply loaded itself (or folded into a copy) is its own to compress in place; a caller's never.
    owned = not isinstance(model, LoadedModel) or loaded.module is not given
    report = analyze(loaded, stats=False)
    jobs = resolve(plan, k, report, target)
    ctx = B.Context(target=target, os=plan.target.os or target.default_os, progress=progress, decoder=plan.decoder)
    route = _preflight(jobs, ctx, loaded, target)  # libraries, GPU, model code: before anything else
    for job in jobs:
        if job.blocked:  # the divisibility pitfall: refuse rather than let the backend skip silently
            raise job.blocked[0]
    ctx.samples = _samples(samples, jobs)
    ctx.training = _training(train, resume, jobs, plan, loaded, out)
    ctx.example_inputs = _example_inputs(loaded, ctx.samples, input_shape)
    if route.coreml and ctx.example_inputs is None and loaded.exported is None:
        raise BadModel("Core ML conversion needs an example input and the model carries none",
                       hint="pass --input-shape 1,3,224,224 or --samples FILE")
    with atomic_dir(out, force=force) as tmp:
        with temp_files_in(tmp / ".scratch"):  # coremltools' temp .mlpackages: swept if we are killed
            manifest = _execute(plan, k, loaded, report, jobs, ctx, route, tmp, resources, owned)
        enforce(manifest["planned_vs_built"], allow_partial, manifest["notes"])
        resources.stage("placement")
        manifest["placement"] = _built_placement(plan, target, tmp / manifest["mlpackage"] if manifest["mlpackage"] else None)
        manifest["seconds"] = round(time.perf_counter() - started, 2)
        manifest["resources"] = resources.record()
        write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
    if ctx.training is not None and ctx.training.checkpoints is not None:
        ctx.training.checkpoints.clear()  # the output is whole: nothing left to resume
    return ApplyResult(out_dir=out, torch_artifact=out / manifest["torch_artifact"] if manifest["torch_artifact"] else None,
                       mlpackage=out / manifest["mlpackage"] if manifest["mlpackage"] else None,
                       manifest=manifest, seconds=manifest["seconds"])


def _built_placement(plan: Plan, target: Any, package: Path | None) -> dict[str, Any] | None:
    """Placement read from the built program (the MIL ops Core ML is handed) beside what the plan
    predicted from the torch graph: a difference is said, never smoothed over."""
    if package is None or target.placement is None:
        return None
    from compressadvise.measure.placement import for_mlpackage

    built = for_mlpackage(str(package), target)
    out: dict[str, Any] = {"built": built.model_dump(mode="json"), "note": ""}
    planned = plan.placement
    counts = (len(built.fallback), len(built.boundaries))
    if planned is not None and (len(planned.fallback), len(planned.boundaries)) != counts:
        out["note"] = (f"the plan predicted {len(planned.fallback)} fallback op(s) and {len(planned.boundaries)} "
                       f"switch(es) from the {planned.basis}; the built program has {counts[0]} and {counts[1]}")
    return out


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


def _load_state_dict_artifact(out_dir: Path, manifest: dict[str, Any], factory: str | None) -> LoadedModel:
    import torch

    given = manifest.get("input")
    if not isinstance(given, dict):
        raise BadModel(f"{out_dir / 'manifest.json'}: the torch artefact is a state dict and 'input' does not "
                       "say which model to rebuild it into")
    source, fmt = str(given.get("source") or ""), given.get("format", "")
    if fmt not in ("factory", "bundled"):
        raise BadModel(f"{out_dir}: the torch artefact is a state dict and the input ({source}) has no factory to rebuild it")
    if fmt == "factory" and source != factory:
        import shlex

        raise BadModel(f"{out_dir}: its torch artefact is a state dict rebuilt by the Python factory {source} "
                       "that manifest.json names; a file the tool wrote never chooses code to import",
                       hint=f"pass the model on the command line: `compressadvise verify {shlex.quote(source)} "
                       f"{shlex.quote(str(out_dir))}`")
    from compressadvise.model.deploy import deployable

    base = deployable(load_model(None if fmt == "bundled" else source))  # the form apply compressed
    want = sorted(f["bn"] for f in manifest.get("folded", []))
    if sorted(f.bn for f in base.folds) != want:
        raise BadModel(f"{out_dir / 'manifest.json'}: the artefact was compressed with BatchNorms {want} folded, "
                       f"and rebuilding {source} folds {sorted(f.bn for f in base.folds)}",
                       hint="rebuild with the model code and example input apply used")
    module = base.module
    if "torchao" in manifest.get("backends_used", []):
        plan_path = out_dir / (manifest.get("plan") or "plan.yaml")
        from compressadvise.plan.planfile import load_plan

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


# ====================================================================== the work
def _execute(plan: Plan, k: Knowledge, loaded: LoadedModel, report: ModelReport, jobs: list[B.StepJob],
             ctx: B.Context, route: Route, tmp: Path, resources: Resources, owned: bool = False) -> dict[str, Any]:
    from compressadvise.backends.apply_coreml import Deferred
    from compressadvise.plan.planfile import plan_to_yaml

    outcome: dict[tuple[int, str, str], dict[str, Any]] = {}  # (step, layer, side) -> record
    torch_info: dict[str, Any] = {"file": None, "format": None, "note": None}
    compressed, snap_folds = None, ()
    n = len(jobs)
    stage = _Stages(ctx, (n + 2 if route.torch_side else 0) + ((n if route.coreml == "native" else 0) + 3
                                                            if route.coreml else 0) + 1, resources)
    bounded = _bounded(route, jobs)
    resources.path = MEMORY_PATHS[bounded]
    if route.torch_side:
        def torch_side() -> Any:
            return _torch_side(loaded, jobs, ctx, outcome, stage, bounded=bounded, own=bounded and owned)

        # Bounded native route: Core ML converts the float weights first, the torch side then
        # compresses them in place (one copy of the weights, not two).
        later = bounded and route.coreml == "native"
        compressed = Deferred(torch_side) if later else torch_side()
    mlinfo: dict[str, Any] = {}
    if route.coreml:  # before the torch save: the native route snaps the torch weights to the .mlpackage's
        stage("Core ML: conversion")
        if compressed is None and route.coreml == "native" and loaded.exported is not None:
            compressed, snap_folds = _program_to_snap(loaded)
        mlinfo = _coreml_side(loaded, compressed, jobs, ctx, route, outcome, tmp, stage)
    if isinstance(compressed, Deferred):
        compressed = compressed()
    if compressed is not None:
        stage("torch: save")
        torch_info = _save_torch(compressed, ctx.example_inputs, tmp)
        if not route.torch_side:
            torch_info["note"] += ("; no torch-side compression (no eager code): the input program with its "
                                   "BatchNorms folded and the .mlpackage's weights, decompressed, for verify")
        stage("torch: read back")
        if torch_info["file"]:
            torch_info["stored_bytes"] = _check_torch(tmp / torch_info["file"], jobs, outcome, ctx)
    else:
        torch_info["note"] = route.notes[0] if route.notes else "no torch-side step"
    _require_work(jobs, outcome, route)
    stage("manifest")
    write_text_atomic(tmp / "plan.yaml", plan_to_yaml(plan))
    torch_bytes = (tmp / torch_info["file"]).stat().st_size if torch_info["file"] else None
    manifest = _manifest(plan, k, loaded, report, jobs, route, outcome, torch_info, torch_bytes, mlinfo)
    if snap_folds and not manifest["folded"]:  # the .pt2's folds: verify's drift compares a folded conv with its BN
        manifest["folded"] = [{"layer": f.layer, "bn": f.bn, "scale_min": f.scale_min, "scale_max": f.scale_max}
                              for f in snap_folds]
    side, built, basis = (("coreml", mlinfo["payload_bytes"], "Core ML weight payload (weight.bin blobs, "
                           "without the container's headers)") if mlinfo else
                          ("torch", torch_info.get("stored_bytes"), "bytes the torch artefact's tensors store "
                           "(read back: integer data, scales, float tensors; its program not counted)"))
    gate = planned_vs_built(plan, jobs, outcome, side, built, basis)
    for record in manifest["steps"]:
        if ctx.training is not None and record["step"] - 1 in ctx.training.results:
            record["training"] = ctx.training.results[record["step"] - 1]
    return {"manifest_version": manifest.pop("manifest_version"), "planned_vs_built": gate, **manifest}


BOUNDED = True  # False: every plan takes the all-in-memory path (the tests compare the two)
MEMORY_PATHS = {True: "memory-bounded: layer by layer, in the input's float dtype, Core ML converted before "
                      "the torch side compresses the same weights", False: "all in memory: a deep copy of the model"}


def _bounded(route: Route, jobs: list[B.StepJob]) -> bool:
    """The memory-bounded path where it builds the same artefact: every torch-side step compresses
    layer by layer (post-training palettization, quantization, pruning) and Core ML compresses the
    float weights itself (native) or is not a target; else (calibration through the model, training,
    a converted torch result) all in memory."""
    return BOUNDED and route.coreml in (None, "native") and layerwise(jobs)


def _training(train: Any, resume: bool, jobs: list[B.StepJob], plan: Plan, loaded: LoadedModel,
              out: Path) -> Any:
    """The training data and checkpoints for the plan's training-aware steps (None without any)."""
    trained = [j for j in jobs if j.data == "training"]
    if not trained:
        if train is not None:
            raise InvalidKnowledge("--train was given but no step of the plan trains (dkm, qat, gradual_pruning)",
                                   hint="drop --train, or plan a training-aware step (recommend --data training)")
        return None
    if train is None:
        j = trained[0]
        raise InvalidKnowledge(f"plan step {j.index + 1} ({j.technique}) fine-tunes the model and needs training data",
                               hint="pass --train module:function (returns a loader and a loss) or --train bundled")
    from compressadvise.plan.planfile import plan_to_yaml
    from compressadvise.backends.training import Checkpoints, TrainingRun, checkpoint_key, load_training

    if str(train) == "bundled" and loaded.format != "bundled":
        raise InvalidKnowledge(f"--train bundled is the bundled digits model's training split; {loaded.source} "
                               "needs its own", hint="pass --train module:function returning your loader and loss")
    spec = load_training(train)
    key = checkpoint_key(plan_to_yaml(plan), loaded.sha256, spec.source)
    return TrainingRun(spec=spec, checkpoints=Checkpoints(out, key, resume))


def _program_to_snap(loaded: LoadedModel) -> tuple[Any, tuple]:
    """A .pt2's runnable module, folded as the converter folds it and on private copies of every
    tensor, to take the .mlpackage's weights: the torch artefact verify can run; and its folds."""
    import copy

    from compressadvise.model.deploy import folded_program_module

    with B.quiet():
        gm, folds = folded_program_module(loaded.exported)
        return copy.deepcopy(gm), folds


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
    """Progress by stage: each call announces the stage that starts now, and closes the one before
    in `resources` (its seconds, and this process's memory when it ended)."""

    def __init__(self, ctx: B.Context, total: int, resources: Resources) -> None:
        self.ctx, self.total, self.done, self.resources = ctx, total, -1, resources

    def __call__(self, label: str) -> None:
        self.done += 1
        self.resources.stage(label)
        self.ctx.tick(label, min(self.done, self.total), self.total)


