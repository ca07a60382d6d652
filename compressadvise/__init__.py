"""compressadvise: expert model-compression lessons you can run.

The library API (the CLI is a thin layer over it)::

    import compressadvise as ca
    model = ca.load_model("model.pt2")          # or None for the bundled example
    report = ca.analyze(model)                  # per-layer facts
    plan = ca.recommend(report, target="ane-a17", max_size_mb=2)
    result = ca.apply(model, plan, out="out/")  # torchao / coremltools
    result = ca.apply(model, dkm_plan, out="out/", train=ca.Training(loader, loss))  # training-aware steps
    verdict = ca.verify(model, result.torch_model_path, samples=...)
    sens = ca.sensitivity(model, samples=...)  # each layer compressed alone, measured
    found = ca.search(model, samples=..., size_fraction=0.25, target="ane-a17")  # found.plan
    text = ca.export_plan(plan, to="coremltools", model=model).text  # the library's own config

Budgets, one way for `recommend` and `search` (keywords; `verify(budgets={...})` uses the same names):
`max_size_mb=` (MB = 10^6 bytes), `size_fraction=` (in (0, 1]: of the fp16 size),
`bits_per_weight=` (in (0, 32]), `max_latency_ms=` (estimate; `device_profile=` calibrates it on device figures),
`max_accuracy_drop=` (points, recorded in the plan for `verify`), `data=` ("none", "calibration",
"training"). One size budget at most; `search` needs a size or latency budget. `constraints={...}`
keeps working (plan/budgets.py).

Errors are CompressAdviseError subclasses with an `exit_code`; a wrong argument (an unknown
budget key, a negative size) is BadArgument, also a ValueError, raised before any work. Results
(ModelReport, Plan, ApplyResult, VerifyResult, SensitivityReport, SearchResult) have a one-line
repr of their key figures and show as a table in a notebook (`_repr_html_`) or in rich
(`__rich__`); `.model_dump()` has every field.

Heavy libraries (torch, torchao, coremltools) are imported only by the calls that need them:
the names below load on first use (`__getattr__`), and type checkers read the imports under
TYPE_CHECKING, so IDEs complete and check them (the package ships `py.typed`).
"""
from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

# Errors are plain Python (no imports): loaded now, so `except ca.BadArgument` needs no lookup.
from compressadvise.errors import (BadArgument, BadModel, BudgetMissed, CompressAdviseError, CompressionFailed,
                                   InputNotFound, InvalidKnowledge, OutputExists, OutputNotWritable, Unavailable,
                                   UntrustedPickle)

__version__ = "0.1.0"

# name -> module under compressadvise; keep in step with the TYPE_CHECKING imports (tests/test_api.py)
_LAZY: dict[str, str] = {
    # the pipeline
    "load_model": "model.loading", "analyze": "model.analysis", "recommend": "plan.engine",
    "apply": "backends.apply", "verify": "measure.verify", "sensitivity": "measure.sensitivity",
    "search": "plan.search", "load_knowledge": "knowledge.base", "load_plan": "plan.planfile",
    "save_plan": "plan.planfile", "load_samples": "model.samples", "Training": "backends.training",
    "export_plan": "backends.export", "ExportResult": "backends.export",
    # what the calls take and return
    "LoadedModel": "model.loading", "ModelReport": "model.analysis", "Knowledge": "knowledge.base",
    "Plan": "knowledge.schema", "Constraints": "knowledge.schema", "Samples": "model.samples",
    "Setting": "plan.setting", "ApplyResult": "backends.apply", "VerifyResult": "measure.verify",
    "Budgets": "measure.verify_budgets", "SensitivityReport": "measure.sensitivity_results",
    "SearchResult": "plan.search_results", "Budget": "plan.search_results",
}
_ERRORS = ["CompressAdviseError", "BadArgument", "BudgetMissed", "InputNotFound", "BadModel", "UntrustedPickle",
           "InvalidKnowledge", "Unavailable", "CompressionFailed", "OutputExists", "OutputNotWritable"]

__all__ = [*_LAZY, *_ERRORS, "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from compressadvise.backends.apply import ApplyResult, apply
    from compressadvise.backends.export import ExportResult, export_plan
    from compressadvise.backends.training import Training
    from compressadvise.knowledge.base import Knowledge, load_knowledge
    from compressadvise.knowledge.schema import Constraints, Plan
    from compressadvise.measure.sensitivity import sensitivity
    from compressadvise.measure.sensitivity_results import SensitivityReport
    from compressadvise.measure.verify import VerifyResult, verify
    from compressadvise.measure.verify_budgets import Budgets
    from compressadvise.model.analysis import ModelReport, analyze
    from compressadvise.model.loading import LoadedModel, load_model
    from compressadvise.model.samples import Samples, load_samples
    from compressadvise.plan.engine import recommend
    from compressadvise.plan.planfile import load_plan, save_plan
    from compressadvise.plan.search import search
    from compressadvise.plan.search_results import Budget, SearchResult
    from compressadvise.plan.setting import Setting
else:
    # Hidden from type checkers, so a misspelt `ca.recomend` is an error there, not an `Any`.
    def __getattr__(name: str) -> object:
        """Load a public name on first use. Not cached in globals(): `ca.verify` stays whatever
        `compressadvise.measure.verify.verify` is now, so a patched function is the one called
        (tests/test_packaging.py); a repeat lookup is a dict hit plus a sys.modules hit."""
        if name in _LAZY:
            import importlib

            return getattr(importlib.import_module(f"compressadvise.{_LAZY[name]}"), name)
        raise AttributeError(f"module 'compressadvise' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The API for tab completion, plus the module's own dunders and loaded subpackages
    (not the typing helpers a bare dir() showed)."""
    own = {n for n, v in globals().items() if n.startswith("__") or isinstance(v, ModuleType)}
    return sorted({*__all__, *own})
