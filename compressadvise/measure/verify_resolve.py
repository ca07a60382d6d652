"""Model resolution for verify: models, files and `apply` folders into runnable sides, with their sizes."""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from compressadvise.errors import BadModel, CompressAdviseError, InputNotFound
from compressadvise.model.loading import LoadedModel, load_model
from compressadvise.measure.metrics import ResultModel


class ModelSide(ResultModel):
    source: str
    format: str
    sha256: str = ""
    size_bytes: int | None = None
    size_basis: str = ""
    mlpackage: str | None = None


@dataclass
class _Side:
    loaded: LoadedModel
    fn: Callable
    graph: Any = None  # nn.Module or fx GraphModule for per-layer hooks
    mlpackage: str | None = None
    size_bytes: int | None = None
    size_basis: str = ""
    plan: Any = None
    notes: list[str] = field(default_factory=list)
    manifest: dict | None = None  # an apply folder's: planned vs built and parity, as apply recorded them

    def info(self) -> ModelSide:
        return ModelSide(source=self.loaded.source, format=self.loaded.format, sha256=self.loaded.sha256,
                         size_bytes=self.size_bytes, size_basis=self.size_basis, mlpackage=self.mlpackage)


def disk_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _serialised_size(module: Any) -> int | None:
    import torch

    try:
        buf = io.BytesIO()
        torch.save(module.state_dict(), buf)
        return buf.tell()
    except Exception:  # exotic tensor subclasses: size unknown rather than wrong
        return None


def _from_module(module: Any) -> LoadedModel:
    from compressadvise.model.loading import tensor_hash

    try:
        digest = tensor_hash(module.state_dict().items())
    except Exception:  # quantized tensor subclasses have no plain bytes to hash
        digest = ""
    return LoadedModel(source=f"in-memory {type(module).__name__}", format="module", sha256=digest,
                       has_graph=True, module=module.eval())


def _apply_dir(path: Path, named: str | None = None) -> tuple[LoadedModel, str | None, Any, Path, dict]:
    """An `apply` output folder: manifest.json names the torch artifact and the .mlpackage.
    `named`: the model spec the caller gave, the only factory a state-dict artefact may import.
    `load_artifact` inspects the artefact like any model file (nothing pickled is loaded)."""
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise InputNotFound(f"{path} is a directory without manifest.json (not an `apply` output)",
                            hint="pass a model file or an apply output folder")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as e:
        raise BadModel(f"{manifest_path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict):
        raise BadModel(f"{manifest_path}: unreadable manifest (not a JSON object)")
    from compressadvise.backends.apply import load_artifact  # the one manifest check (it never chooses code)

    loaded = load_artifact(path, factory=named)
    artifact = manifest.get("torch_artifact")
    mlpackage = manifest.get("mlpackage")
    mlpath = str(path / mlpackage) if mlpackage and (path / mlpackage).exists() else None
    plan = None
    plan_file = manifest.get("plan") or ("plan.yaml" if (path / "plan.yaml").is_file() else None)
    if plan_file and (path / plan_file).is_file():
        from compressadvise.plan.planfile import load_plan

        try:
            plan = load_plan(path / plan_file)
        except CompressAdviseError:
            plan = None
    file = path / artifact if artifact and (path / artifact).exists() else path
    return loaded, mlpath, plan, file, manifest


def _is_hf(path: Path) -> bool:
    """A Hugging Face folder (config.json + weights, no apply manifest): a model, loaded as one."""
    from compressadvise.model.hf import is_hf_folder

    return is_hf_folder(path) and not (path / "manifest.json").exists()


def _named_spec(model: Any) -> str | None:
    """The spec of a model the caller gave (a string, or a factory it loaded itself)."""
    if isinstance(model, LoadedModel):
        return model.source if model.format == "factory" else None
    return str(model) if isinstance(model, (str, os.PathLike)) else None


def _resolve(model: Any, trust_pickle: bool, named: str | None = None) -> _Side:
    import torch

    mlpackage = plan = manifest = None
    size: int | None = None
    basis = ""
    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, torch.nn.Module):
        loaded = _from_module(model)
    elif model is not None and str(model) != "bundled" and Path(str(model)).is_dir() and not _is_hf(Path(str(model))):
        loaded, mlpackage, plan, file, manifest = _apply_dir(Path(str(model)), named)
        if file.is_file():
            size, basis = disk_size(file), "torch artifact on disk (measured)"
    else:
        loaded = load_model(model, trust_pickle=trust_pickle)
    fn = loaded.runnable()
    if fn is None:
        raise BadModel(f"{loaded.source} holds weights only ({loaded.format}): verify needs a model it can run",
                       hint="pass module:function, a TorchScript archive or a torch.export .pt2")
    graph = loaded.module if loaded.module is not None else (fn if loaded.exported is not None else None)
    if size is None:
        size, basis = _model_size(loaded)
    if mlpackage:
        size, basis = disk_size(mlpackage), "Core ML package on disk (measured)"
    return _Side(loaded, fn, graph, mlpackage, size, basis, plan, manifest=manifest)


def _model_size(loaded: LoadedModel) -> tuple[int | None, str]:
    if loaded.format == "bundled":
        from compressadvise.examples import digits

        return disk_size(digits.WEIGHTS), "bundled weights file on disk, fp32 (measured)"
    if Path(loaded.source).is_file():
        return disk_size(loaded.source), "file on disk (measured)"
    if loaded.module is not None:
        size = _serialised_size(loaded.module)
        return size, "serialised state dict (measured)" if size is not None else "unknown"
    return None, "unknown"
