"""Export a plan as the target library's own configuration, so adopting the advice needs no retyping.

    result = export_plan("plan.yaml", to="coremltools")   # model: LoadedModel, path, or None (bundled)
    Path(result.filename).write_text(result.text)

- `coremltools`: `coremltools.optimize.coreml.OptimizationConfig` YAML, keyed by the op names of
  the ML Program `apply` converts (BatchNorms folded first), one YAML document per optimize call
  (`palettize_weights`, `linear_quantize_weights`, `prune_weights`) in the order apply makes them;
- `torchao`: a Python file whose `compress(model)` runs `quantize_` once per config, each limited
  to its layers by a `filter_fn`, as apply does.

The plan is resolved exactly as `apply` resolves it (same layers, parameters, backend skips), and
the configs are the objects apply's backends build, rendered and read back before they are
returned. What the library cannot express (a layer the plan keeps uncompressed, a technique only
the other library has, calibration- or training-time steps) is listed in `notes` and in the
file's header, never dropped silently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compressadvise import backends as B
from compressadvise.errors import InvalidKnowledge, Unavailable
from compressadvise.knowledge.base import Knowledge, builtin
from compressadvise.knowledge.schema import Plan, Target
from compressadvise.model.analysis import ModelReport
from compressadvise.model.loading import LoadedModel

TARGETS = ("coremltools", "torchao")
DEFAULT_FILES = {"coremltools": "plan.coremltools.yaml", "torchao": "plan_torchao.py"}


@dataclass
class ExportResult:
    to: str  # "coremltools" | "torchao"
    text: str  # the file's contents
    filename: str  # the file name its recipe refers to (the --out name, or a default)
    notes: list[str] = field(default_factory=list)  # what the file does not express, and why
    names: dict[str, str] = field(default_factory=dict)  # plan layer -> the name the file keys it by
    passes: list[Any] = field(default_factory=list)  # coremltools: one export_coreml.CoremlPass per optimize call


@dataclass
class Prepared:
    """The plan resolved against the model as `apply` resolves it."""

    plan: Plan
    source: str  # the plan file's name ("" for a Plan object), for the header
    k: Knowledge
    target: Target
    loaded: LoadedModel  # the deployable form (BatchNorms folded), what apply compresses
    report: ModelReport
    jobs: list[B.StepJob]
    input_shape: list[int] | None = None


def export_plan(plan: Plan | str | Path, to: str = "coremltools", model: LoadedModel | str | Path | None = None, *,
                input_shape: list[int] | None = None, trust_pickle: bool = False,
                knowledge: Knowledge | None = None, filename: str | None = None) -> ExportResult:
    """Export `plan` for `model` as a coremltools OptimizationConfig YAML or a torchao snippet.

    Raises InvalidKnowledge (exit 6) for a plan apply would refuse, Unavailable (exit 7) when
    nothing in the plan can be expressed with the chosen library."""
    if to not in TARGETS:
        raise Unavailable(f"no exporter for {to!r}", hint=f"choose one of {', '.join(TARGETS)}")
    prep = prepare(plan, model, input_shape=input_shape, trust_pickle=trust_pickle, knowledge=knowledge)
    name = Path(filename).name if filename else DEFAULT_FILES[to]
    if to == "coremltools":
        from compressadvise.backends.export_coreml import export_coreml

        return export_coreml(prep, name)
    from compressadvise.backends.export_torchao import export_torchao

    return export_torchao(prep, name)


def prepare(plan: Plan | str | Path, model: LoadedModel | str | Path | None, *, input_shape: list[int] | None = None,
            trust_pickle: bool = False, knowledge: Knowledge | None = None) -> Prepared:
    """The first half of `apply`: plan loaded and checked, model loaded and folded, steps resolved."""
    from compressadvise.backends.apply_resolve import _check_model, resolve
    from compressadvise.model.analysis import analyze, example_inputs_for
    from compressadvise.model.loading import load_model

    source = ""
    if not isinstance(plan, Plan):
        from compressadvise.plan.planfile import load_plan

        source, plan = Path(plan).name, load_plan(plan)
    k = knowledge or builtin()
    target = k.target(plan.target.name)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, trust_pickle=trust_pickle)
    _check_model(plan, loaded)
    if loaded.module is not None:  # compress the form that ships, as apply does
        from compressadvise.model.deploy import deployable

        loaded = deployable(loaded, example_inputs_for(loaded, input_shape))
    report = analyze(loaded, stats=False)
    jobs = resolve(plan, k, report, target)
    for job in jobs:
        if job.blocked:  # apply refuses these before any work: so does export
            raise job.blocked[0]
    return Prepared(plan, source, k, target, loaded, report, jobs, input_shape)


# ------------------------------------------------------------------ notes both exporters share
def plan_notes(prep: Prepared, kept: str) -> list[str]:
    """Layers the plan leaves alone, by step, and those no step names; `kept` says how they stay
    ("fp16" on Core ML, "float" in torch)."""
    notes: list[str] = []
    named: set[str] = set()
    for job in prep.jobs:
        named |= {lj.name for lj in job.layers}
        for s in job.skipped:
            named.add(s["layer"])
            code = f" [{s['code']}]" if s.get("code") and s["code"] not in ("plan", "backend") else ""
            who = "" if s.get("code") == "backend" else ", skipped by the plan"  # a backend skip's reason says so
            notes.append(f"{s['layer']}: kept {kept}{who} in step {job.index + 1} ({job.technique}){code}: "
                         f"{s['reason']}")
    rest = [x.name for x in prep.report.layers if x.tensors and x.name not in named and not x.folded_into]
    if rest:
        notes.append(f"kept {kept} (no step names them): {', '.join(rest)}")
    return notes


def step_note(job: B.StepJob, why: str) -> str:
    """A whole step the library cannot express, with the layers it would have compressed."""
    layers = ", ".join(lj.name for lj in job.layers) or "no layer"
    return f"step {job.index + 1} ({job.technique}, layers {layers}) is not in this file: {why}"


def torch_side_api(job: B.StepJob) -> str:
    """The coremltools.optimize.torch API apply runs for a step, for the note that leaves it out."""
    try:
        api = B.get("coremltools.torch").techniques.get(job.technique, "")
    except Unavailable:
        api = ""
    kind = {"training": "a training-time step (fine-tunes with your training data)",
            "calibration": "a calibration-time step (runs the model on your samples)"}.get(job.data, "a torch-side step")
    return f"{kind}" + (f": {api}" if api else "")


def check_nonempty(expressed: int, notes: list[str], library: str) -> None:
    if not expressed:
        first = sorted(notes, key=lambda n: "is not in this file" not in n)  # why the steps are out, first
        raise Unavailable(f"nothing in this plan can be expressed with {library}: " + "; ".join(first[:3]),
                          hint="export --to the other library, or replay the plan with `compressadvise apply`")


def example_source(example: tuple | None) -> str:
    """The example input as Python source, e.g. '(torch.zeros(1, 1, 8, 8),)'."""
    if not example:
        raise InvalidKnowledge("the export needs the model's example input to write its conversion",
                               hint="pass --input-shape 1,3,224,224")
    parts = []
    for t in example:
        dtype = "" if t.is_floating_point() and str(t.dtype) == "torch.float32" else f", dtype={t.dtype}"
        parts.append(f"torch.zeros({', '.join(str(int(d)) for d in t.shape)}{dtype})")
    return "(" + ", ".join(parts) + ",)"


def fold_lines(folds: list[Any], indent: str) -> list[str]:
    """Python lines folding each BatchNorm into the layer before it, as apply does first
    (apply folds in float64; torch's fusion helpers in float32: the last bit may differ)."""
    if not folds:
        return []
    pairs = ", ".join(f"({f.layer!r}, {f.bn!r}, {f.kind!r})" for f in folds)
    return [f"{indent}from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval",
            f"{indent}for layer, bn, kind in [{pairs}]:  # the BatchNorms apply folds first",
            f"{indent}    a, b = model.get_submodule(layer), model.get_submodule(bn)",
            f"{indent}    fused = fuse_linear_bn_eval(a, b) if kind == 'linear' else "
            "fuse_conv_bn_eval(a, b, transpose=kind == 'conv_transpose')",
            f"{indent}    model.set_submodule(layer, fused)",
            f"{indent}    model.set_submodule(bn, torch.nn.Identity())"]


def comment(text: Any) -> str:
    """Text for one comment line: every line break (Python's and YAML's, e.g. U+2028) folded to a
    space, so a plan's free text (skip reasons, names) can never start a line of code or YAML."""
    return " ".join(str(text).split())


def header_title(prep: Prepared, what: str) -> str:
    plan = prep.source or "a plan"
    os_major = prep.plan.target.os or prep.target.default_os
    os_part = f", iOS {os_major}" if prep.target.coreml and os_major else ""
    return (f"{what} exported by `compressadvise export` from {plan} (model {prep.loaded.source}, target "
            f"{prep.plan.target.name}{os_part})")
