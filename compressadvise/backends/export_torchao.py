"""`export --to torchao`: a plan as a Python file whose `compress(model)` reproduces it with torchao.

The configs are the objects apply's torchao backend builds (`Torchao.config`), grouped the way
it groups them (one `quantize_` per distinct config, limited to its modules by `filter_fn`),
written as Python source and read back (an AST walk, no eval): the source must rebuild an equal object.
Layers torchao cannot take (`Torchao.layer_support`: nn.Linear only, intx also nn.Embedding)
and techniques it lacks are notes in the file's header.
"""
from __future__ import annotations

import ast
import dataclasses
import enum
from typing import Any

from compressadvise import backends as B
from compressadvise.backends.export import (ExportResult, Prepared, check_nonempty, comment, fold_lines,
                                            header_title, plan_notes, step_note, torch_side_api)
from compressadvise.errors import BadModel, CompressionFailed

PLAN_FIELDS = ("granularity", "weight_dtype", "mapping_type", "group_size")  # written even at torchao's default
SPARSIFY = ("pruning", "semi_sparse")  # apply runs these through torchao.sparsity.sparsify_


@dataclasses.dataclass
class TorchaoCall:
    """One `quantize_` / `sparsify_` call: the config (object and source) and the modules it touches."""

    step: int
    technique: str
    function: str  # quantize_ | sparsify_
    config: Any  # the torchao config object (None for sparsify_: built by the snippet)
    source: str  # the config as Python source
    modules: list[str]
    cuda: bool = False  # its kernels are CUDA-only (apply moves the model to the GPU first)


def export_torchao(prep: Prepared, filename: str) -> ExportResult:
    if prep.loaded.module is None:
        raise BadModel(f"exporting for torchao needs the model's code: {prep.loaded.source} is a "
                       f"{prep.loaded.format} file", hint="pass --model module:function")
    notes = plan_notes(prep, "float")
    imports: dict[str, set[str]] = {"torchao.quantization": {"quantize_"}}
    calls: list[TorchaoCall] = []
    names: dict[str, str] = {}
    for job in prep.jobs:
        for call in _step_calls(prep, job, imports, notes):
            calls.append(call)
            names.update({lj.name: lj.module for lj in job.layers if lj.module in call.modules})
    check_nonempty(len(calls), notes, "torchao")
    if prep.target.coreml:
        notes.append(f"target {prep.target.name} deploys through Core ML: torchao's weights are not the ones it ships")
    touched = set(names.values())
    folds = [f for f in prep.loaded.folds if f.layer in touched]
    text = _render(prep, calls, folds, imports, notes, filename)
    return ExportResult(to="torchao", text=text, filename=filename, notes=notes, names=names)


def _step_calls(prep: Prepared, job: B.StepJob, imports: dict[str, set[str]], notes: list[str]) -> list[TorchaoCall]:
    """A step's calls, as the torchao backend would make them; what it cannot take goes to `notes`."""
    from compressadvise.backends.apply_torch import _submodule
    from compressadvise.backends.torchao_backend import GPU_ONLY

    if not B.implements("torchao", job.technique):
        why = f"torchao has no implementation of {job.technique}"
        if job.data != "none" and B.implements("coremltools.torch", job.technique):
            why += f"; apply runs {torch_side_api(job)}"
        if B.implements("coremltools.coreml", job.technique):
            why += " (export --to coremltools)"
        notes.append(step_note(job, why))
        return []
    backend = B.get("torchao")
    taken = []
    for lj in job.layers:
        reason = backend.layer_support(job, lj, _submodule(prep.loaded.module, lj.module))
        if reason:
            notes.append(f"{lj.name}: kept float in step {job.index + 1} ({job.technique}): {reason}")
        else:
            taken.append(lj)
    if not taken:
        return []
    if job.torch_backend and job.torch_backend != "torchao":
        notes.append(f"apply builds step {job.index + 1} ({job.technique}) with {job.torch_backend}: torchao's "
                     "config here is the nearest, and may round otherwise")
    cuda = job.technique in GPU_ONLY
    if cuda:
        notes.append(f"step {job.index + 1} ({job.technique}) needs CUDA: {GPU_ONLY[job.technique]}")
    if job.technique in SPARSIFY:
        return [_sparsify_call(job, taken, imports, notes)]
    groups: dict[str, tuple[Any, list[str]]] = {}
    for lj in taken:
        cfg = backend.config(job, lj.params)
        groups.setdefault(repr(cfg), (cfg, []))[1].append(lj.module)
    return [TorchaoCall(job.index + 1, job.technique, "quantize_", cfg, _checked_source(cfg, imports), sorted(mods),
                        cuda) for cfg, mods in groups.values()]


def _sparsify_call(job: B.StepJob, taken: list[B.LayerJob], imports: dict[str, set[str]],
                   notes: list[str]) -> TorchaoCall:
    p = taken[0].params
    if not (p.get("pattern") == "n_m" and (p.get("n"), p.get("m")) == (2, 4)):
        notes.append(f"step {job.index + 1} ({job.technique}): torchao's sparsify_ prunes 2:4 (semi-structured), "
                     "whatever the plan's pattern and sparsity, as apply does")
    imports.setdefault("torchao.sparsity", set()).update({"semi_sparse_weight", "sparsify_"})
    return TorchaoCall(job.index + 1, job.technique, "sparsify_", None, "semi_sparse_weight()",
                       sorted(lj.module for lj in taken), cuda=True)


# ------------------------------------------------------------------ configs as Python source
def source_of(value: Any, imports: dict[str, set[str]]) -> str:
    """Python source rebuilding `value` (a torchao config, granularity, enum, dtype or plain value);
    a config's fields at their default are left out, except those the plan decides (PLAN_FIELDS)."""
    import torch

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        _need(type(value), imports)
        args = []
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.init and ((f.name in PLAN_FIELDS and v is not None) or not _is_default(f, v)):
                args.append(f"{f.name}={source_of(v, imports)}")
        return f"{type(value).__name__}({', '.join(args)})"
    if isinstance(value, enum.Enum):
        _need(type(value), imports)
        return f"{type(value).__name__}.{value.name}"
    if isinstance(value, torch.dtype):
        return str(value)  # torch.int4
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple (e.g. Float8MMConfig)
        _need(type(value), imports)
        args = ", ".join(f"{name}={source_of(v, imports)}" for name, v in zip(value._fields, value))
        return f"{type(value).__name__}({args})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(source_of(v, imports) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    raise CompressionFailed(f"export: cannot write a {type(value).__name__} as Python source",
                            hint="a bug in compressadvise's exporter: rerun with --debug and report it")


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    if f.default is not dataclasses.MISSING:
        return value == f.default
    if f.default_factory is not dataclasses.MISSING:
        return value == f.default_factory()
    return False


def _need(cls: type, imports: dict[str, set[str]]) -> None:
    """Import a class from torchao's public module where it is exported there, else from its own."""
    import importlib

    module = cls.__module__
    for public in ("torchao.quantization", "torchao.sparsity"):
        if module.startswith(public.split(".")[0]) and getattr(importlib.import_module(public), cls.__name__, None) is cls:
            module = public
            break
    imports.setdefault(module, set()).add(cls.__name__)


def _checked_source(cfg: Any, imports: dict[str, set[str]]) -> str:
    """The config's source, rebuilt with only its imports: it must give back an equal object."""
    import importlib

    import torch

    src = source_of(cfg, imports)
    scope: dict[str, Any] = {"torch": torch}
    for module, names in imports.items():
        scope.update({n: getattr(importlib.import_module(module), n) for n in names})
    back = _rebuild(ast.parse(src, mode="eval").body, scope)
    if back != cfg or repr(back) != repr(cfg):  # repr too: a plain tuple equals a NamedTuple
        raise CompressionFailed(f"export: {src} does not rebuild torchao's config {cfg!r}",
                                hint="a bug in compressadvise's exporter: rerun with --debug and report it")
    return src


def _rebuild(node: ast.AST, scope: dict[str, Any]) -> Any:
    """The value of what source_of writes (calls of imported names, their attributes, literals),
    read without eval: nothing else is accepted."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant):
        return -node.operand.value
    if isinstance(node, ast.Name) and node.id in scope:
        return scope[node.id]
    if isinstance(node, ast.Attribute) and not node.attr.startswith("_"):
        return getattr(_rebuild(node.value, scope), node.attr)
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_rebuild(e, scope) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute)):
        fn = _rebuild(node.func, scope)
        return fn(*(_rebuild(a, scope) for a in node.args), **{k.arg: _rebuild(k.value, scope) for k in node.keywords})
    raise CompressionFailed(f"export: unexpected {type(node).__name__} in generated source",
                            hint="a bug in compressadvise's exporter: rerun with --debug and report it")


def _import_lines(imports: dict[str, set[str]]) -> str:
    return "\n".join(f"from {m} import {', '.join(sorted(names))}" for m, names in sorted(imports.items()))


# ------------------------------------------------------------------ the file
def _render(prep: Prepared, calls: list[TorchaoCall], folds: list[Any], imports: dict[str, set[str]],
            notes: list[str], filename: str) -> str:
    module = filename[:-3] if filename.endswith(".py") else filename
    lines = ['"""torchao recipe exported by `compressadvise export`: `compress(model)` reproduces the plan\'s',
             "torchao steps with torchao alone (model: your torch.nn.Module in eval mode).", "",
             f"    from {module} import compress" if module.isidentifier() else
             "    from compress_plan import compress  # saved as compress_plan.py", "    model = compress(model)", '"""',
             f"# {comment(header_title(prep, 'torchao recipe'))}."]
    lines += ["#", "# Module names (filter_fn's fqn) by plan layer:"]
    lines += [f"#   {comment(lj.name)} -> {comment(lj.module)}" for job in prep.jobs for lj in job.layers
              if any(lj.module in c.modules and c.step == job.index + 1 for c in calls)]
    if notes:
        lines += ["#", "# Not in this file (the plan keeps it as it is, or torchao cannot express it):"]
        lines += [f"#   - {comment(n)}" for n in notes]
    lines += ["import torch", _import_lines(imports), "", "",
              "# One call per entry, in plan order: (function, config, the modules it is limited to, needs CUDA).",
              "STEPS = ["]
    for c in calls:
        lines += [f"    # plan step {c.step} ({c.technique})",
                  f"    ({c.function}, {c.source}, {c.modules!r}, {c.cuda}),"]
    lines += ["]", "", "", "def compress(model: torch.nn.Module) -> torch.nn.Module:",
              '    """The plan\'s torchao steps on `model`, in place; returns it."""']
    lines += fold_lines(folds, "    ")
    lines += ["    for function, config, names, cuda in STEPS:", "        if cuda:",
              "            model = model.cuda()  # these kernels are CUDA-only",
              "        function(model, config, filter_fn=lambda module, fqn, names=frozenset(names): fqn in names)",
              "    return model"]
    return "\n".join(lines) + "\n"

