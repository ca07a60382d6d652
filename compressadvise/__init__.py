"""compressadvise: expert model-compression lessons you can run.

The library API (the CLI is a thin layer over it)::

    import compressadvise as ca
    model = ca.load_model("model.pt2")          # or None for the bundled example
    report = ca.analyze(model)                  # per-layer facts
    plan = ca.recommend(report, target="ane-a17", constraints={"max_size_mb": 2})
    result = ca.apply(model, plan, out="out/")  # torchao / coremltools
    verdict = ca.verify(model, result.torch_model_path, samples=...)
    sens = ca.sensitivity(model, samples=...)  # each layer compressed alone, measured
    found = ca.search(model, samples=..., size_fraction=0.25, target="ane-a17")  # found.plan

Heavy libraries (torch, torchao, coremltools) are imported only by the calls that need them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["load_model", "analyze", "recommend", "apply", "verify", "sensitivity", "search",
           "load_knowledge", "load_plan", "save_plan", "__version__"]

_LAZY = {
    "load_model": ("loading", "load_model"),
    "analyze": ("analysis", "analyze"),
    "recommend": ("engine", "recommend"),
    "apply": ("apply", "apply"),
    "verify": ("verify", "verify"),
    "sensitivity": ("sensitivity", "sensitivity"),
    "search": ("search", "search"),
    "load_knowledge": ("knowledge", "load_knowledge"),
    "load_plan": ("plan", "load_plan"),
    "save_plan": ("plan", "save_plan"),
}

if TYPE_CHECKING:  # pragma: no cover
    from .analysis import analyze
    from .engine import recommend
    from .knowledge import load_knowledge
    from .loading import load_model
    from .plan import load_plan, save_plan


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'compressadvise' has no attribute {name!r}")
