"""Per-layer drift for verify: hooked layer outputs of both models compared, where error starts and grows."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from compressadvise.measure import metrics as M
from compressadvise.measure.metrics import ResultModel
from compressadvise.model.samples import Samples
from compressadvise.measure.verify_outputs import _first_line

if TYPE_CHECKING:
    import torch

    from compressadvise.measure.verify_resolve import _Side

DRIFT_THRESHOLD_DB = 30.0  # below this a layer's output is called degraded

# Above this a layer's output differs from the original only by float rounding (a kernel that
# sums in another order: ~120-150 dB in fp32), not by compression: not where "error starts".
NOISE_FLOOR_DB = 100.0


class LayerDrift(ResultModel):
    name: str
    module: str
    snr_db: float
    cosine: float
    rel_error: float


class DriftReport(ResultModel):
    samples: int
    threshold_db: float
    layers: list[LayerDrift] = []
    first_error: str | None = Field(None, description="first layer (execution order) whose output differs by more "
                                    "than float rounding (below NOISE_FLOOR_DB)")
    first_degraded: str | None = Field(None, description="first layer below threshold_db")
    worst: str | None = None
    note: str = ""


def capture_layers(graph: Any, inputs: tuple, exported: bool) -> dict[str, tuple[str, "torch.Tensor"]]:
    """Each leaf module's output (module path -> (class, tensor)), in execution order."""
    import torch

    found: dict[str, tuple[str, torch.Tensor]] = {}
    if exported:
        return _capture_graph(graph, inputs)
    hooks = []
    for name, mod in graph.named_modules():
        if name and not any(True for _ in mod.children()):
            def hook(m, _i, out, name=name):
                if isinstance(out, torch.Tensor) and name not in found:
                    found[name] = (type(m).__name__, out.detach().float())
            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            graph(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


def _capture_graph(gm: Any, inputs: tuple) -> dict[str, tuple[str, "torch.Tensor"]]:
    """Exported programs: the last node of each module (its output), via an fx Interpreter."""
    import torch
    from torch.fx import Interpreter

    found: dict[str, tuple[str, torch.Tensor]] = {}

    class Recorder(Interpreter):
        def run_node(self, n):  # noqa: ANN001 - fx API
            value = super().run_node(n)
            stack = n.meta.get("nn_module_stack")
            if stack and isinstance(value, torch.Tensor):
                path, cls = list(stack.values())[-1]
                cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
                found.pop(path, None)  # re-insert so the order follows each module's last node
                found[path] = (cls_name.rsplit(".", 1)[-1], value.detach().float())
            return value

    with torch.inference_mode():
        Recorder(gm).run(*inputs)
    return found


def _run_capture(side: _Side, samples: Samples, batch_size: int) -> dict[str, tuple[str, "torch.Tensor"]]:
    import torch

    exported = side.loaded.exported is not None and side.loaded.module is None
    size = 1 if exported else max(1, min(batch_size, len(samples)))
    parts: list[dict[str, tuple[str, torch.Tensor]]] = []
    for start in range(0, len(samples), size):
        parts.append(capture_layers(side.graph, samples.batch(start, start + size), exported))
    keys = [k for k in parts[0] if all(k in p for p in parts)]
    return {k: (parts[0][k][0], torch.cat([p[k][1] for p in parts])) for k in keys}


def drift_report(orig: _Side, comp: _Side, samples: Samples, batch_size: int = 64,
                 threshold_db: float = DRIFT_THRESHOLD_DB) -> DriftReport:
    """Compare hooked layer outputs of both models on the same inputs: where error starts, how it grows."""
    n = len(samples)
    missing = [s.loaded.source for s in (orig, comp) if s.graph is None]
    if missing:
        return DriftReport(samples=n, threshold_db=threshold_db,
                           note=f"per-layer drift needs eager modules or exported programs; not available for {', '.join(missing)} (TorchScript)")
    try:
        a = _run_capture(orig, samples, batch_size)
        b = _run_capture(comp, samples, batch_size)
    except Exception as e:  # drift is a diagnostic: never fail the verdict over it
        return DriftReport(samples=n, threshold_db=threshold_db, note=f"per-layer drift unavailable: {_first_line(e)}")
    rows = []
    # A layer apply folded its BatchNorm into computes what the original's BatchNorm output: compare those.
    folded = {str(f.get("layer")): str(f.get("bn")) for f in (comp.manifest or {}).get("folded", []) or []
              if isinstance(f, dict)}
    for name, (cls, ra) in a.items():
        if name in folded and folded[name] in a:
            ra = a[folded[name]][1]
        if name not in b or b[name][1].shape != ra.shape:
            continue
        rb = b[name][1]
        rel = float((ra - rb).norm() / ra.norm().clamp_min(1e-30))
        rows.append(LayerDrift(name=name, module=cls, snr_db=M.snr(ra, rb), cosine=M.cosine_similarity(ra, rb),
                               rel_error=rel))
    note = "" if rows else "no layer names in common: drift needs the same module structure in both models"
    first_err = next((r.name for r in rows if r.snr_db < NOISE_FLOOR_DB), None)
    first_bad = next((r.name for r in rows if r.snr_db < threshold_db), None)
    worst = min(rows, key=lambda r: r.snr_db).name if rows and first_err else None
    return DriftReport(samples=n, threshold_db=threshold_db, layers=rows, first_error=first_err,
                       first_degraded=first_bad, worst=worst, note=note)
