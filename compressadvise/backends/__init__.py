"""Backends that carry out plan steps: a typed registry of backends and their handlers.

A backend is an object satisfying `TorchBackend` or `CoremlBackend` (below):

- `id`: "coremltools.torch", "coremltools.coreml", "torchao"... (the names technique YAML uses);
- `side`: "torch" (compresses an eager nn.Module; the result can be run and measured here) or
  "coreml" (compresses a converted ML Program, saved as a `.mlpackage`);
- `techniques`: technique name -> the library API implementing it (from its handlers);
- `unavailable(job, ctx) -> str | None`: why this machine cannot run the step (checked for
  every step before any work starts), or None;
- `layer_support(job, layer, module) -> str | None`: why one layer cannot take the step
  (reported in the manifest as a skip), or None;
- `run(...)`: do the work, normally `run_handler` (signature per side, see the protocols).

Each technique a backend implements is one handler, registered by decorator (like torchao's
`register_quantize_module_handler`):

    @handles("torchao", "int8_weight_only", api="torchao.quantization.Int8WeightOnlyConfig")
    def _int8(model, job, ctx): ...

Adding a backend: a `BackendSpec` line in `REGISTRY` for a module loaded on first use, or
`@register_backend` on a class defined in-process (tests/fake backends). Nothing here imports
torch, torchao or coremltools: `analyze`, `recommend` and the knowledge loader (which checks
the backend names in technique YAML against `names()`) stay fast.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Mapping, Protocol, TypeVar, runtime_checkable

from compressadvise.errors import Unavailable

Side = Literal["torch", "coreml"]
GUIDANCE = "guidance"  # technique YAML's "advice only, no library runs it": a name, not a backend


@dataclass(frozen=True)
class BackendSpec:
    """A registered backend, known without importing it: its module is imported on first use."""

    id: str
    side: Side
    module: str  # import path of a module exposing a `BACKEND` object

    @property
    def family(self) -> str:
        """The library the backend belongs to (target YAML may name a family: `coremltools`)."""
        return self.id.split(".")[0]


REGISTRY: dict[str, BackendSpec] = {s.id: s for s in (
    BackendSpec("coremltools.torch", "torch", "compressadvise.backends.coremltools_torch"),
    BackendSpec("coremltools.coreml", "coreml", "compressadvise.backends.coremltools_coreml"),
    BackendSpec("torchao", "torch", "compressadvise.backends.torchao_backend"),
)}
DEBUG = {"on": bool(os.environ.get("COMPRESSADVISE_DEBUG"))}  # set by the CLI's --debug
_LOADED: dict[str, Any] = {}


# ------------------------------------------------------------------ the backend protocols
@runtime_checkable
class Backend(Protocol):
    """What apply asks of every backend before any work."""

    id: str
    side: Side

    @property
    def techniques(self) -> Mapping[str, str]: ...

    def unavailable(self, job: StepJob, ctx: Context) -> str | None: ...

    def layer_support(self, job: StepJob, lj: LayerJob, module: Any) -> str | None: ...


@runtime_checkable
class TorchBackend(Backend, Protocol):
    def run(self, model: Any, job: StepJob, ctx: Context) -> Any:
        """Compress `job.layers` of the eager `model`; returns the model (or None: changed in place)."""
        ...


@runtime_checkable
class CoremlBackend(Backend, Protocol):
    def run(self, mlmodel: Any, job: StepJob, ctx: Context, joint: bool) -> Any:
        """Compress `job.layers` of the ML Program; `joint`: on top of an earlier step's compression."""
        ...


# ------------------------------------------------------------------ registration
BackendClass = TypeVar("BackendClass", bound=type)
H = TypeVar("H", bound=Callable[..., Any])


@dataclass(frozen=True)
class Handler:
    """One technique on one backend: the function doing it and the library API it calls."""

    backend: str
    technique: str
    fn: Callable[..., Any]
    api: str


_HANDLERS: dict[tuple[str, str], Handler] = {}


def handles(backend_id: str, technique: str, *, api: str = "") -> Callable[[H], H]:
    """Decorator: `fn` is `backend_id`'s implementation of `technique` (one per pair)."""
    def register_fn(fn: H) -> H:
        key = (backend_id, technique)
        if key in _HANDLERS and _HANDLERS[key].fn is not fn:
            raise ValueError(f"{backend_id} already has a handler for {technique}: "
                             f"{_HANDLERS[key].fn.__qualname__}")
        _HANDLERS[key] = Handler(backend_id, technique, fn, api or fn.__qualname__)
        return fn
    return register_fn


def handlers(backend_id: str) -> dict[str, Handler]:
    """technique -> handler, for one backend (its module must be imported: see `get`)."""
    return {t: h for (b, t), h in _HANDLERS.items() if b == backend_id}


def implemented(backend_id: str) -> dict[str, str]:
    """technique -> library API: what a backend object reports as its `techniques`."""
    return {t: h.api for t, h in handlers(backend_id).items()}


class HandlerTable:
    """For backends whose techniques are exactly their registered handlers."""

    id: str

    @property
    def techniques(self) -> dict[str, str]:
        return implemented(self.id)

    def no_handler(self, job: "StepJob") -> str | None:
        """Why this backend cannot run the step at all, or None."""
        return None if job.technique in self.techniques else f"{self.id} has no implementation of {job.technique}"


def run_handler(backend_id: str, model: Any, job: StepJob, ctx: Context, *args: Any) -> Any:
    """Dispatch one step to its technique's handler on this backend."""
    h = _HANDLERS.get((backend_id, job.technique))
    if h is None:
        raise Unavailable(f"{backend_id} has no handler for {job.technique}",
                          hint=f"it implements: {', '.join(sorted(implemented(backend_id))) or 'nothing'}")
    return h.fn(model, job, ctx, *args)


def register(backend_id: str, module: str, side: Side) -> None:
    """Add (or replace) a backend loaded on first use: `module` must expose a BACKEND object."""
    REGISTRY[backend_id] = BackendSpec(backend_id, side, module)
    _LOADED.pop(backend_id, None)


def register_backend(cls: BackendClass) -> BackendClass:
    """Class decorator: register an in-process backend (an instance of `cls`) under `cls.id`."""
    backend = cls()
    if not isinstance(backend, Backend) or backend.side not in ("torch", "coreml"):
        raise TypeError(f"{cls.__qualname__} does not satisfy the Backend protocol (id, side, techniques, "
                        "unavailable, layer_support, run)")
    REGISTRY[backend.id] = BackendSpec(backend.id, backend.side, cls.__module__)
    _LOADED[backend.id] = backend
    return cls


def unregister(backend_id: str) -> None:
    """Remove a backend and its handlers (tests)."""
    REGISTRY.pop(backend_id, None)
    _LOADED.pop(backend_id, None)
    for key in [k for k in _HANDLERS if k[0] == backend_id]:
        del _HANDLERS[key]


def need(p: Mapping[str, Any], name: str) -> Any:
    """A parameter the resolved setting must carry. Parameters reach a backend through
    `Step.setting_for`, which fills the technique's defaults from its YAML: a backend never
    invents its own default (they once disagreed with the YAML and with each other)."""
    try:
        return p[name]
    except KeyError:
        from compressadvise.errors import CompressionFailed

        raise CompressionFailed(f"parameter {name!r} missing from {dict(p)}: parameters must be resolved "
                                "with Step.setting_for (technique defaults)") from None


def names() -> tuple[str, ...]:
    """Registered backend ids, without importing any backend (the knowledge loader's check)."""
    return tuple(REGISTRY)


def families() -> set[str]:
    return {s.family for s in REGISTRY.values()}


def get(backend_id: str) -> Any:
    """The backend object; imports its module (and so registers its handlers) on first use."""
    if backend_id not in REGISTRY:
        raise Unavailable(f"no backend {backend_id!r} is registered", hint=f"known: {', '.join(sorted(REGISTRY))}")
    if backend_id not in _LOADED:
        _LOADED[backend_id] = importlib.import_module(REGISTRY[backend_id].module).BACKEND
    return _LOADED[backend_id]


def implements(backend_id: str, technique: str) -> bool:
    return technique in get(backend_id).techniques


def side_of(backend_id: str) -> str:
    spec = REGISTRY.get(backend_id)
    return spec.side if spec else "torch"


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
    setting: Any = None  # the resolved Setting `params` came from (its key and label go to the manifest)


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
    training: Any = None  # training.TrainingRun for training-aware steps (--train), else None
    decoder: Any = None  # schema.DecoderDeployment (plan.decoder): a causal LM's KV-cache conversion

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
