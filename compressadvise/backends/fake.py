"""A fake torch-side backend: apply's whole orchestration without coremltools or torchao.

It compresses in plain torch, so the read-back checks see real compression: palettization and
linear quantization snap a weight to 2^nbits evenly spaced values (one grid per tensor, so
every LUT/grid group holds at most 2^nbits values), pruning zeroes the smallest magnitudes.
It handles nn.Linear only (anything else is a reported skip) and unstructured sparsity only.

Not in `REGISTRY`: importing this module registers it as `fake` (tests do, or a plugin would).
A target must name it (`backends: [fake]`) for apply to choose it. torch is imported lazily.
"""
from __future__ import annotations

from typing import Any

from compressadvise.backends import Context, HandlerTable, LayerJob, StepJob, handles, register_backend, run_handler

ID = "fake"


@register_backend
class Fake(HandlerTable):
    id = ID
    side = "torch"

    def unavailable(self, job: StepJob, ctx: Context) -> str | None:
        if missing := self.no_handler(job):
            return missing
        if job.params.get("pattern") == "n_m":
            return "the fake backend prunes unstructured only, not n:m"
        return None

    def layer_support(self, job: StepJob, lj: LayerJob, module: Any) -> str | None:
        import torch

        if type(module) is torch.nn.Linear and lj.param == "weight":
            return None
        return f"{type(module).__name__}: the fake backend handles nn.Linear weights only"

    def run(self, model: Any, job: StepJob, ctx: Context) -> Any:
        return run_handler(self.id, model, job, ctx)


def _weight(model: Any, lj: LayerJob) -> Any:
    return getattr(model.get_submodule(lj.module) if lj.module else model, lj.param)


@handles(ID, "palettization", api="torch: snap to 2^nbits evenly spaced values per tensor")
@handles(ID, "linear_quantization", api="torch: snap to a 2^nbits-level grid per tensor")
def _snap(model: Any, job: StepJob, ctx: Context) -> Any:
    import torch

    with torch.no_grad():
        for lj in job.layers:
            w = _weight(model, lj)
            levels = 2 ** int(lj.params["nbits"])
            lo, hi = w.min(), w.max()
            step = (hi - lo) / (levels - 1) if hi > lo else torch.ones_like(hi)
            w.copy_(lo + torch.round((w - lo) / step) * step)
    return model


@handles(ID, "pruning", api="torch: zero the smallest |w| (unstructured)")
def _prune(model: Any, job: StepJob, ctx: Context) -> Any:
    import torch

    with torch.no_grad():
        for lj in job.layers:
            w = _weight(model, lj)
            k = int(round(float(lj.params["sparsity"]) * w.numel()))
            if k:
                smallest = w.abs().flatten().topk(k, largest=False).indices
                w.view(-1)[smallest] = 0.0
    return model
