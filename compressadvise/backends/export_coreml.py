"""`export --to coremltools`: a plan as `coremltools.optimize.coreml.OptimizationConfig` YAML.

The configs are the very objects apply's Core ML side builds (`CoremltoolsCoreML._op_config`),
keyed by the same op names: the weight consts of the ML Program apply converts, found the way
apply finds them (`map_layers`: by name, then value, then a unique shape). One YAML document
per optimize call, in apply's order: a layer an earlier call already compressed is keyed by the
head of its constexpr chain and goes into a `joint_compression=True` call, as apply does. Those
names only exist once the earlier call has run, so the calls before the last are run here.
Every document is read back with `OptimizationConfig.from_yaml` and must equal the objects.
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from typing import Any

from compressadvise import backends as B
from compressadvise.backends import kmeans
from compressadvise.backends.export import (ExportResult, Prepared, check_nonempty, comment, example_source,
                                            fold_lines, header_title, plan_notes, step_note, torch_side_api)
from compressadvise.errors import BadModel, CompressionFailed

FUNCTIONS = {"prune": "prune_weights", "quantize": "linear_quantize_weights"}  # else palettize_weights, as apply
ALWAYS = ("mode", "nbits", "dtype", "granularity", "weight_threshold")  # written even at coremltools' default
NEWEST_OS = 18  # a plan for a target that does not deploy through Core ML: names from an iOS 18 conversion


@dataclass
class CoremlPass:
    """One `coremltools.optimize.coreml` call: its function, joint flag and op-name configs."""

    step: int  # plan step number (1-based)
    technique: str
    function: str  # palettize_weights | linear_quantize_weights | prune_weights
    joint: bool
    configs: dict[str, Any]  # op name -> Op*Config
    layers: dict[str, str]  # op name -> plan layer
    why: str = ""
    yaml: str = field(default="", repr=False)  # this call's YAML document

    def call(self) -> str:
        return f"cto.{self.function}(mlmodel, config{', joint_compression=True' if self.joint else ''})"


class _Program:
    """The converted program as the calls so far leave it; the newest call runs only when a later
    one needs the op names it creates (the last one never runs here)."""

    def __init__(self, mlmodel: Any):
        self.mlmodel = mlmodel
        self.pending: CoremlPass | None = None

    def current(self) -> Any:
        if self.pending is not None:
            self.mlmodel = run_pass(self.mlmodel, self.pending, self.pending.configs)
            self.pending = None
        return self.mlmodel


def run_pass(mlmodel: Any, p: CoremlPass, configs: dict[str, Any]) -> Any:
    """Carry out one call as the file's recipe makes it: the op-name configs, the joint flag."""
    import coremltools.optimize.coreml as cto

    with B.quiet():
        return getattr(cto, p.function)(mlmodel, cto.OptimizationConfig(op_name_configs=configs),
                                        joint_compression=p.joint)


# ------------------------------------------------------------------ the export
def export_coreml(prep: Prepared, filename: str) -> ExportResult:
    from compressadvise.backends import coremltools_coreml as C
    from compressadvise.backends.apply_coreml import _float_weights

    os_major = (prep.plan.target.os or prep.target.default_os) if prep.target.coreml else NEWEST_OS
    notes = plan_notes(prep, "fp16")
    usable = _usable(prep, os_major, notes)
    check_nonempty(len(usable), notes, "coremltools' OptimizationConfig")
    if not prep.target.coreml:
        notes.append(f"target {prep.target.name} does not deploy through Core ML: op names are those of an "
                     f"iOS {NEWEST_OS} conversion")
    example, source = _conversion_input(prep)
    mlmodel, how = C.convert(source, example, os_major)
    missing = C.map_layers(mlmodel, [lj for job in usable for lj in job.layers], _float_weights(prep.loaded))
    notes += [f"{name}: kept fp16, {why}" for name, why in missing.items()]
    passes = _passes(_Program(mlmodel), usable, missing)
    names = {lj.name: lj.const for job in usable for lj in job.layers if lj.const and lj.name not in missing}
    for p in passes:
        p.yaml = _document(p)
        _read_back(p)
    notes += _name_notes(prep, usable, missing, how)
    if any(custom_ops(p) for p in passes):
        notes.append("palettization: apply clusters the LUTs with optimize.torch's exact k-means through "
                     "palettize_weights' custom mode (a function, which a YAML file cannot hold): the recipe "
                     "above switches those ops to it (torch_kmeans); the file alone, in kmeans mode, runs "
                     "optimize.coreml's own k-means: LUTs of the same size, other values")
    text = _render(prep, passes, names, usable, notes, filename, example, os_major)
    return ExportResult(to="coremltools", text=text, filename=filename, notes=notes, names=names, passes=passes)


def _usable(prep: Prepared, os_major: int, notes: list[str]) -> list[B.StepJob]:
    """The steps coremltools.optimize.coreml implements; the others noted, with what apply runs instead."""
    backend = B.get("coremltools.coreml")
    ctx = B.Context(target=prep.target, os=os_major)
    usable, left = [], []
    for job in prep.jobs:
        reason = backend.unavailable(job, ctx)
        if reason:
            left.append(job)
            torch_api = torch_side_api(job) if B.implements("coremltools.torch", job.technique) else ""
            other = " (a torchao technique: export --to torchao)" if B.implements("torchao", job.technique) else ""
            notes.append(step_note(job, (torch_api or reason) + other))
        elif job.layers:
            usable.append(job)
    if left and usable and prep.target.coreml:
        notes.append("apply builds this plan in torch (coremltools.optimize.torch) and converts the result, because "
                     f"step {left[0].index + 1} ({left[0].technique}) has no Core ML implementation: the configs here, "
                     "run on the float ML Program, give other weights than apply's build")
    return usable


def _conversion_input(prep: Prepared) -> tuple[tuple | None, Any]:
    from compressadvise.backends.apply_resolve import _example_inputs

    loaded = prep.loaded
    example = _example_inputs(loaded, None, prep.input_shape)
    if example is None and loaded.exported is None:
        raise BadModel("Core ML conversion needs an example input and the model carries none",
                       hint="pass --input-shape 1,3,224,224")
    source = loaded.module if loaded.module is not None else (loaded.exported or loaded.scripted)
    return example, source


def _passes(prog: _Program, usable: list[B.StepJob], missing: dict[str, str]) -> list[CoremlPass]:
    """Apply's calls, in its order: per step, the layers no earlier call touched, then the others (joint)."""
    from compressadvise.backends import coremltools_coreml as C

    out: list[CoremlPass] = []
    for job in usable:
        todo = [lj for lj in job.layers if lj.const and lj.name not in missing]
        heads = C.producer_names(prog.current())
        fresh = [lj for lj in todo if C.head_for(heads, lj.const) == lj.const]
        again = [lj for lj in todo if lj not in fresh]
        for part, joint in ((fresh, False), (again, True)):
            if part:
                sub = copy.copy(job)
                sub.layers = part
                _job_passes(prog, sub, joint, out)
    return out


def _job_passes(prog: _Program, job: B.StepJob, joint: bool, out: list[CoremlPass]) -> None:
    """Mirror of `CoremltoolsCoreML.compress`: a joint form is two calls (prune, then palettize or
    quantize the rest), an int8 LUT a linear quantization of the LUT after palettizing."""
    from compressadvise.backends import coremltools_coreml as C
    from compressadvise.backends.coremltools_coreml import CoremltoolsCoreML, _as_kind

    if job.kind in ("sparse_palettize", "sparse_quantize"):
        _job_passes(prog, _as_kind(job, "prune"), joint, out)
        _job_passes(prog, _as_kind(job, job.kind.split("_", 1)[1]), True, out)
        return
    mlmodel = prog.current()
    heads = C.producer_names(mlmodel)
    configs, layers = {}, {}
    for lj in job.layers:
        key = C.head_for(heads, lj.const) or lj.const
        configs[key], layers[key] = CoremltoolsCoreML._op_config(job, lj, mlmodel, joint, custom=False), lj.name
    _add(prog, out, CoremlPass(job.index + 1, job.technique, FUNCTIONS.get(job.kind, "palettize_weights"), joint,
                               configs, layers))
    lut8 = [lj for lj in job.layers if lj.params.get("lut_dtype") == "int8"]
    if job.kind == "palettize" and lut8:
        import coremltools.optimize.coreml as cto

        heads = C.producer_names(prog.current())
        q = {C.head_for(heads, lj.const) or lj.const: cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_tensor", weight_threshold=0) for lj in lut8}
        named = {key: lj.name for key, lj in zip(q, lut8)}
        _add(prog, out, CoremlPass(job.index + 1, job.technique, "linear_quantize_weights", True, q, named,
                                   why="lut_dtype int8: the LUT itself quantized to int8"))


def _add(prog: _Program, out: list[CoremlPass], p: CoremlPass) -> None:
    prog.current()  # the call before runs now: this one's names were taken from its result
    prog.pending = p
    out.append(p)


# ------------------------------------------------------------------ YAML
def _document(p: CoremlPass) -> str:
    import yaml

    kinds = [type(c).__name__ for c in p.configs.values()]
    top = max(kinds, key=kinds.count)  # the first of the most common: the same file every run
    ops = {}
    for name, cfg in p.configs.items():
        fields = config_fields(cfg)
        ops[name] = fields if type(cfg).__name__ == top else {"config_type": type(cfg).__name__, **fields}
    return yaml.safe_dump({"config_type": top, "op_name_configs": ops}, sort_keys=False, width=100)


def config_fields(cfg: Any) -> dict[str, Any]:
    """An Op*Config as the plain values `OptimizationConfig.from_dict` structures back into it:
    the fields that differ from coremltools' defaults, plus those the plan decides (ALWAYS)."""
    import attrs
    from coremltools.converters.mil.mil import types
    from coremltools.optimize.coreml._config import CompressionGranularity

    out: dict[str, Any] = {}
    for f in attrs.fields(type(cfg)):
        value = getattr(cfg, f.name)
        if not f.init or f.name.startswith("_") or value is None:
            continue
        if value == f.default and f.name not in ALWAYS:
            continue
        if isinstance(value, CompressionGranularity):
            value = value.name.lower()
        elif f.name == "dtype":
            value = types.builtin_to_string(value)
        elif f.name == "mode":
            value = value.lower()
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _read_back(p: CoremlPass) -> None:
    """The document must load with `from_yaml` into exactly apply's configs (a renderer bug otherwise)."""
    import coremltools.optimize.coreml as cto

    got = cto.OptimizationConfig.from_yaml(io.StringIO(p.yaml)).op_name_configs
    wrong = [name for name, cfg in p.configs.items() if got.get(name) != cfg]
    if wrong or set(got) != set(p.configs):
        raise CompressionFailed(f"export: the YAML for plan step {p.step} ({p.technique}) does not read back as the "
                                f"config apply uses (op {(wrong or sorted(set(got) ^ set(p.configs)))[0]})",
                                hint="a bug in compressadvise's exporter: rerun with --debug and report it")


def _name_notes(prep: Prepared, usable: list[B.StepJob], missing: dict[str, str], how: str) -> list[str]:
    notes = []
    loaded = prep.loaded
    written = "torch.export" if loaded.module is not None else \
        "torch.export program" if loaded.exported is not None else "TorchScript"  # what the recipe converts
    if how != written:
        notes.append(f"apply converted the model through {how}, not as the recipe above writes: convert it "
                     "that way, or the op names may differ")
    folded = [f for f in loaded.folds if any(lj.name == f.layer for job in usable for lj in job.layers)]
    if folded:
        notes.append(f"BatchNorm folded first ({', '.join(f'{f.bn} into {f.layer}' for f in folded)}): a ct.convert "
                     "of the unfolded model folds it itself and names the weight otherwise (e.g. const_16_to_fp16), "
                     "which no op_name_configs entry here matches: fold as the recipe does")
    by_value = [lj.name for job in usable for lj in job.layers if lj.const and lj.match and lj.match != "name"]
    if by_value:
        notes.append(f"op names found by value or shape, not by name: {', '.join(by_value)} (another conversion "
                     "may name them otherwise)")
    prune = [lj.name for job in usable for lj in job.layers
             if job.kind in ("prune", "sparse_palettize", "sparse_quantize") and lj.name not in missing
             and lj.params.get("pattern", "unstructured") == "unstructured"]
    if prune:
        notes.append(f"unstructured pruning of {', '.join(prune)} is written as OpThresholdPrunerConfig with the "
                     "magnitude cut apply computes from this model's weights (coremltools' magnitude pruner fails "
                     "on fp16 tensors over 65,504 elements): valid for these weights only")
    return notes


# ------------------------------------------------------------------ the file
def _render(prep: Prepared, passes: list[CoremlPass], names: dict[str, str], usable: list[B.StepJob],
            notes: list[str], filename: str, example: tuple | None, os_major: int) -> str:
    lines = [f"# {comment(header_title(prep, 'coremltools OptimizationConfig'))}.",
             f"# {len(passes)} optimize call(s), in this order: " + ", ".join(p.function for p in passes) + ".",
             "#", "# Op names: the weight consts of the ML Program apply converts (BatchNorms folded first):"]
    matched = {lj.name: lj.match for job in usable for lj in job.layers}
    lines += [f"#   {comment(layer)} -> {comment(op)} (matched by {matched.get(layer) or 'name'})"
              for layer, op in names.items()]
    lines += ["#", "# Reproduce with coremltools alone (`model`: your torch.nn.Module in eval mode):"]
    lines += _recipe(prep, passes, filename, example, os_major)
    if notes:
        lines += ["#", "# Not in this file (the plan keeps it as it is, or OptimizationConfig cannot express it):"]
        lines += [f"#   - {comment(n)}" for n in notes]
    body = []
    for i, p in enumerate(passes, 1):
        head = [f"# call {i} of {len(passes)}: plan step {p.step} ({p.technique}) -> {p.call()}"
                + (f"; {p.why}" if p.why else "")]
        body.append("\n".join(head) + "\n" + p.yaml.rstrip("\n"))
    return "\n".join(lines) + "\n\n" + "\n---\n".join(body) + "\n"


def _recipe(prep: Prepared, passes: list[CoremlPass], filename: str, example: tuple | None, os_major: int) -> list[str]:
    code = ["import coremltools as ct", "import coremltools.optimize.coreml as cto", "import torch",
            *_conversion_lines(prep, example, os_major)]
    custom = [custom_ops(p) for p in passes]
    switch = any(custom)  # some ops take apply's k-means: the recipe defines it and switches them
    if switch:
        code += kmeans.recipe_lines()
    if len(passes) == 1:
        code += [f"config = cto.OptimizationConfig.from_yaml({filename!r})"]
        code += [f"config = torch_kmeans(config, {custom[0]!r})"] if custom[0] else []
        code += [f"mlmodel = {passes[0].call()}"]
    else:
        ops = ", ops" if switch else ""
        calls = ", ".join(f"({p.function!r}, {p.joint}" + (f", {c!r}" if switch else "") + ")"
                          for p, c in zip(passes, custom))
        code += ["import yaml", f"calls = [{calls}]", f"with open({filename!r}) as f:",
                 f"    for (function, joint{ops}), doc in zip(calls, yaml.safe_load_all(f)):",
                 "        config = cto.OptimizationConfig.from_dict(doc)",
                 *(["        config = torch_kmeans(config, ops)"] if switch else []),
                 "        mlmodel = getattr(cto, function)(mlmodel, config, joint_compression=joint)"]
    code.append('mlmodel.save("model.mlpackage")')
    return [f"#   {line}" for line in code]


def custom_ops(p: CoremlPass) -> dict[str, int]:
    """Op -> nbits for the ops of a palettize call that apply clusters with optimize.torch's k-means
    (backends/kmeans.py): a YAML config names coremltools' own kmeans mode; the recipe switches them."""
    if p.function != "palettize_weights":
        return {}
    return {name: int(cfg.nbits) for name, cfg in p.configs.items()
            if kmeans.shared({"enable_per_channel_scale": cfg.enable_per_channel_scale,
                              "cluster_dim": cfg.cluster_dim}, p.joint)}


def _conversion_lines(prep: Prepared, example: tuple | None, os_major: int) -> list[str]:
    """The conversion apply makes (coremltools_coreml.convert), as the user's code: an eager module
    folded then torch.export-ed, a .pt2 program as saved, a TorchScript file with named inputs."""
    from compressadvise.backends.coremltools_coreml import deployment_target

    loaded = prep.loaded
    target = f"minimum_deployment_target=ct.target.{deployment_target(os_major).name}, convert_to=\"mlprogram\""
    if loaded.module is not None:
        return [*fold_lines(list(loaded.folds), ""), f"example = {example_source(example)}",
                "program = torch.export.export(model, example).run_decompositions({})",
                f"mlmodel = ct.convert(program, {target})"]
    if loaded.exported is not None:
        return [f"program = torch.export.load({loaded.source!r}).run_decompositions({{}})",
                f"mlmodel = ct.convert(program, {target})"]
    inputs = ", ".join(f"ct.TensorType(name='input_{i}', shape={tuple(int(d) for d in t.shape)!r}"
                       + (", dtype=np.float32)" if t.is_floating_point() else ", dtype=np.int32)")
                       for i, t in enumerate(example or ()))
    return ["import numpy as np", f"program = torch.jit.load({loaded.source!r})",
            f"mlmodel = ct.convert(program, inputs=[{inputs}], {target})"]
