"""compressadvise: expert model-compression lessons you can run.

The library API (the CLI is a thin layer over it)::

    import compressadvise as ca
    model = ca.load_model("model.pt2")          # or None for the bundled example
    report = ca.analyze(model)                  # per-layer facts
    plan = ca.recommend(report, target="ane-a17", constraints={"max_size_mb": 2})
    result = ca.apply(model, plan, out="out/")  # torchao / coremltools
    result = ca.apply(model, dkm_plan, out="out/", train=ca.Training(loader, loss))  # training-aware steps
    verdict = ca.verify(model, result.torch_model_path, samples=...)
    sens = ca.sensitivity(model, samples=...)  # each layer compressed alone, measured
    found = ca.search(model, samples=..., size_fraction=0.25, target="ane-a17")  # found.plan

Heavy libraries (torch, torchao, coremltools) are imported only by the calls that need them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["load_model", "analyze", "recommend", "apply", "verify", "sensitivity", "search",
           "load_knowledge", "load_plan", "save_plan", "Training", "__version__"]

_LAZY = {
    "load_model": ("model.loading", "load_model"),
    "analyze": ("model.analysis", "analyze"),
    "recommend": ("plan.engine", "recommend"),
    "apply": ("backends.apply", "apply"),
    "verify": ("measure.verify", "verify"),
    "sensitivity": ("measure.sensitivity", "sensitivity"),
    "search": ("plan.search", "search"),
    "load_knowledge": ("knowledge.base", "load_knowledge"),
    "load_plan": ("plan.planfile", "load_plan"),
    "save_plan": ("plan.planfile", "save_plan"),
    "Training": ("backends.training", "Training"),
}

if TYPE_CHECKING:  # pragma: no cover
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import recommend
    from compressadvise.knowledge.base import load_knowledge
    from compressadvise.model.loading import load_model
    from compressadvise.plan.planfile import load_plan, save_plan
    from compressadvise.backends.training import Training


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'compressadvise' has no attribute {name!r}")
