"""Backends that carry out plan steps: a small registry, imported lazily.

A backend is one module exposing a `BACKEND` object with:

- `id`: "coremltools.torch", "coremltools.coreml" or "torchao" (the ids technique YAML uses);
- `side`: "torch" (compresses an eager nn.Module; the result can be run and measured here) or
  "coreml" (compresses a converted ML Program, saved as a `.mlpackage`);
- `techniques`: technique name -> the library config or function that implements it;
- `unavailable(job, ctx) -> str | None`: why this machine cannot run the step (checked for
  every step before any work starts), or None;
- `layer_support(job, layer, ctx) -> str | None`: why one layer cannot take the step (reported
  in the manifest as a skip), or None;
- `run(...)`: do the work (signature per side, see apply.py).

Adding a backend is one module plus one line in `REGISTRY` (or a call to `register`). Nothing
here imports torch, torchao or coremltools: `analyze` and `recommend` stay fast.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from ..errors import Unavailable

REGISTRY: dict[str, str] = {
    "coremltools.torch": "compressadvise.backends.coremltools_torch",
    "coremltools.coreml": "compressadvise.backends.coremltools_coreml",
    "torchao": "compressadvise.backends.torchao_backend",
}
SIDES = {"coremltools.torch": "torch", "coremltools.coreml": "coreml", "torchao": "torch"}
DEBUG = {"on": bool(os.environ.get("COMPRESSADVISE_DEBUG"))}  # set by the CLI's --debug
_LOADED: dict[str, Any] = {}


def register(backend_id: str, module: str, side: str) -> None:
    """Add (or replace) a backend: `module` must expose a BACKEND object."""
    REGISTRY[backend_id] = module
    SIDES[backend_id] = side
    _LOADED.pop(backend_id, None)


def get(backend_id: str) -> Any:
    """The backend object; imports its module (and so its library) on first use."""
    if backend_id not in REGISTRY:
        raise Unavailable(f"no backend {backend_id!r} is registered", hint=f"known: {', '.join(sorted(REGISTRY))}")
    if backend_id not in _LOADED:
        _LOADED[backend_id] = importlib.import_module(REGISTRY[backend_id]).BACKEND
    return _LOADED[backend_id]


def side_of(backend_id: str) -> str:
    return SIDES.get(backend_id, "torch")


# ------------------------------------------------------------------ shared work records
@dataclass
class LayerJob:
    """One layer of one step: where its weight lives and the parameters it gets."""

    name: str  # the plan's layer name (analysis LayerInfo.name)
    module: str  # module path holding the weight ("" for the root)
    param: str  # parameter name on that module: weight, in_proj_weight...
    tensor: str  # full tensor name, e.g. fc.weight
    shape: list[int]
    params: dict[str, Any]
    layer_type: str = "linear"
    const: str | None = None  # Core ML weight const name once converted
    match: str = ""  # how the Core ML const was matched: name, value or shape


@dataclass
class StepJob:
    """One plan step resolved against the model, the target and the backends."""

    index: int
    technique: str
    slot: str
    kind: str  # palettize | quantize | prune | activations | sparse_palettize ...
    params: dict[str, Any]
    layers: list[LayerJob]
    skipped: list[dict[str, str]] = field(default_factory=list)
    torch_backend: str | None = None
    coreml_backend: str | None = None
    data: str = "none"
    notes: list[str] = field(default_factory=list)
    blocked: list[Exception] = field(default_factory=list)  # raised after the availability checks

    def layer(self, name: str) -> LayerJob:
        return next(j for j in self.layers if j.name == name)


@dataclass
class Context:
    """What backends may need beyond the step: data, example inputs, target, progress."""

    target: Any  # schema.Target
    os: int
    example_inputs: tuple | None = None
    samples: Any = None  # samples.Samples or None
    float_module: Any = None  # the untouched eager model (reference outputs for calibration)
    progress: Callable[[str, int, int], None] | None = None
    prior_sparsity: dict[str, float] = field(default_factory=dict)  # layer -> sparsity from earlier steps
    masks: dict[str, Any] = field(default_factory=dict)  # tensor -> zero mask left by a pruning step

    def tick(self, label: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(label, done, total)


# ------------------------------------------------------------------ library noise
@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence library warnings, log records and progress bars (tqdm on stderr) unless --debug."""
    if DEBUG["on"]:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("coremltools", "torch", "torchao", "root", "")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def import_quietly(name: str) -> Any:
    """Import a heavy library without its import-time chatter; Unavailable if it is missing."""
    with quiet():
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise Unavailable(f"{name} is not installed ({e})",
                              hint="install the optional extras: pip install 'compressadvise[compress]'") from e
