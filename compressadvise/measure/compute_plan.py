"""A device profile from Core ML itself (macOS only): timing plus MLComputePlan's per-op view.

MLComputePlan (coremltools 8+, macOS 14.4+) says, for each op of a compiled ML program, the
compute unit Core ML prefers, the units that support it, and an estimated cost (its share of
the whole). Where it is missing (older coremltools or macOS, a neural-network model) the
profile keeps the end-to-end latency only, with a note saying why. coremltools is imported
inside the functions: it is slow to import and noisy off macOS.
"""
from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from compressadvise.measure.device_profile import SCHEMA, DeviceProfile, LatencyFigures, ProfileModel, ProfileOp

if TYPE_CHECKING:
    from compressadvise.measure.latency import Timing

LATENCY_ONLY = "the profile has the end-to-end latency only"


def _operations(block: Any) -> Iterator[Any]:
    """The block's operations in program order, each followed by those of its nested blocks
    (loops and conditionals hold theirs in `op.blocks`)."""
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _operations(inner)


def _device(dev: Any) -> str | None:
    from coremltools.models import compute_device as cd

    for cls, label in ((cd.MLNeuralEngineComputeDevice, "NE"), (cd.MLGPUComputeDevice, "GPU"),
                       (cd.MLCPUComputeDevice, "CPU")):
        if isinstance(dev, cls):
            return label
    return None


def _op(plan: Any, op: Any) -> ProfileOp | None:
    """One op's record; None when Core ML cannot say where it runs (constants, for one)."""
    usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
    device = _device(usage.preferred_compute_device) if usage is not None else None
    if device is None:
        return None
    supported = [d for d in (_device(x) for x in usage.supported_compute_devices) if d is not None]
    cost = plan.get_estimated_cost_for_mlprogram_operation(op)
    name = op.outputs[0].name if op.outputs else op.operator_name
    return ProfileOp(name=name, type=op.operator_name, device=device, supported=list(dict.fromkeys(supported)),
                     cost=min(max(float(cost.weight), 0.0), 1.0) if cost is not None else None)


def plan_ops(model: Any, compute_units: str) -> tuple[list[ProfileOp], list[str]]:
    """Every op of the compiled model's main function with its unit and cost, or ([], [why])."""
    try:
        from coremltools.models.compute_plan import MLComputePlan
    except ImportError:
        return [], [f"coremltools has no MLComputePlan (it needs coremltools 8 or later): {LATENCY_ONLY}"]
    import coremltools as ct

    try:
        plan = MLComputePlan.load_from_path(model.get_compiled_model_path(),
                                            compute_units=getattr(ct.ComputeUnit, compute_units))
    except Exception as e:  # macOS before 14.4, or a model Core ML cannot plan: the timing still stands
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        return [], [f"no compute plan ({reason}; it needs macOS 14.4 or later): {LATENCY_ONLY}"]
    program = plan.model_structure.program
    main = program.functions.get("main") if program is not None else None
    if main is None:
        return [], [f"not an ML program with a main function (per-op costs exist for ML programs only): {LATENCY_ONLY}"]
    ops, skipped = [], 0
    for op in _operations(main.block):
        rec = _op(plan, op)
        if rec is None:
            skipped += 1
        else:
            ops.append(rec)
    notes = [f"{skipped} op(s) without a compute unit (constants) left out"] if skipped else []
    return ops, notes


def mac_name() -> str:
    """The Mac's chip, e.g. 'Mac (Apple M2 Pro)': sysctl names it on macOS."""
    chip = ""
    if sys.platform == "darwin":
        import subprocess

        try:
            chip = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                  timeout=5, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            chip = ""
    return f"Mac ({chip or platform.machine() or 'unknown chip'})"


def mac_profile(mlpackage: str, model: Any, timing: Timing, compute_units: str,
                target: str | None = None) -> DeviceProfile:
    """The profile of the .mlpackage just timed on this Mac: the timing, and MLComputePlan's ops."""
    from compressadvise.fsutil import sha256_path

    ops, notes = plan_ops(model, compute_units)
    version = platform.mac_ver()[0]
    return DeviceProfile(
        schema=SCHEMA, device=mac_name(), os=f"macOS {version}" if version else platform.platform(),
        target=target, compute_units=compute_units, source="mlcomputeplan",
        model=ProfileModel(role="compressed", sha256=sha256_path(mlpackage), name=Path(mlpackage).name),
        latency_ms=LatencyFigures(median=max(timing.median_ms, 1e-9), p90=timing.p90_ms, p99=timing.p99_ms,
                                  min=timing.min_ms, reps=timing.reps),
        ops=ops, notes=["written by `compressadvise verify --write-device-profile`", *notes])
