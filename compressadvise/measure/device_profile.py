"""Device profiles: latencies measured on a real device, to calibrate the roofline per op type.

A profile is a JSON file (schema `compressadvise.device-profile/1`, docs/device-profiles.md)
filled from Xcode's Core ML performance report, by `verify --write-device-profile` on a Mac
(MLComputePlan), or by hand. It is data only: nothing in it is executed.

How its figures are used:
- an op's time is its measured `ms`, else its share of the estimated costs times the
  end-to-end median;
- MIL op types map to our layer types (OP_FAMILIES); per family, factor = the profile's ms on
  those ops / the roofline ms of those layers, on the model the profile was measured on;
- the profile's time on ops no estimated layer stands for (activations, pooling, reshapes,
  casts, CPU fallbacks) is `other_ms`, added to both models' totals: the roofline ignores them;
- layers of a family the profile has no ops for take the whole-model factor (noted).
When the profile's model sha256 is the compressed model's, its median *is* the compressed
latency ("measured on DEVICE"); otherwise the figures are "calibrated from DEVICE profile".
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from compressadvise.errors import BadArgument, InputNotFound, InvalidKnowledge

if TYPE_CHECKING:
    from compressadvise.knowledge.base import Knowledge
    from compressadvise.knowledge.schema import Plan, Target
    from compressadvise.measure.estimate import ModelEstimate
    from compressadvise.model.analysis import ModelReport

SCHEMA = "compressadvise.device-profile/1"
MAX_BYTES = 50 * 1024 * 1024  # a profile of a large model is a few MB of ops; this stops /dev/zero & co.
ROOFLINE_LABEL = "estimate (roofline)"
ComputeDevice = Literal["NE", "GPU", "CPU"]

# One row per family: the MIL operators Core ML runs for it, and the layer types (LayerInfo.type)
# whose roofline it calibrates. Conv2d (grouped or not) converts to `conv`; Linear to `linear`, or
# `matmul`/`einsum` inside attention; LSTM/GRU/RNN to `lstm`/`gru`/`rnn`; Embedding to `gather`.
# Every other op (activations, norms, pooling, reshapes, casts) has no estimated layer: other_ms.
OP_FAMILIES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    #              MIL op types                                    layer types
    "conv":      (("conv", "conv_transpose"),                      ("conv", "depthwise_conv")),
    "linear":    (("linear", "matmul", "einsum"),                  ("linear", "attention")),
    "recurrent": (("lstm", "gru", "rnn"),                          ("recurrent",)),
    "gather":    (("gather", "gather_nd", "gather_along_axis"),    ("embedding",)),
}
_BY_OP = {op: fam for fam, (ops, _) in OP_FAMILIES.items() for op in ops}
_BY_LAYER = {t: fam for fam, (_, types) in OP_FAMILIES.items() for t in types}


# ------------------------------------------------------------------ the file
class ProfileModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["original", "compressed"] = Field(
        "original", description="which model was measured: the original or the compressed build")
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$", description=(
        "hex sha256 of the measured model file, or of the .mlpackage folder (compressadvise.fsutil.sha256_path)"))
    name: str | None = Field(None, description="free text, e.g. the .mlpackage file name")


class LatencyFigures(BaseModel):
    model_config = ConfigDict(extra="forbid")

    median: float = Field(gt=0, description="end-to-end prediction latency in ms, > 0 (the figure calibrated on)")
    p90: float | None = Field(None, ge=0, description="ms")
    p99: float | None = Field(None, ge=0, description="ms")
    min: float | None = Field(None, ge=0, description="ms")
    reps: int | None = Field(None, ge=1, description="predictions timed")

    @model_validator(mode="after")
    def _ordered(self) -> "LatencyFigures":
        given = [(n, v) for n, v in (("min", self.min), ("median", self.median), ("p90", self.p90),
                                     ("p99", self.p99)) if v is not None]
        for (a, x), (b, y) in zip(given, given[1:]):
            if x > y:
                raise ValueError(f"{a} ({x:g} ms) is above {b} ({y:g} ms)")
        return self


class ProfileOp(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the op's output name in the Core ML program")
    type: str = Field(min_length=1, description="the MIL operator, e.g. conv, linear, relu (an 'ios18.' prefix is ignored);")
    device: ComputeDevice = Field(description="the compute unit Core ML runs it on")
    supported: list[ComputeDevice] = Field([], description="the units that could run it")
    cost: float | None = Field(None, ge=0, le=1, description="estimated cost (MLComputePlan's): its share of the whole, 0 to 1")
    ms: float | None = Field(None, ge=0, description="measured time; without it: cost / sum(costs) x median")


class DeviceProfile(BaseModel):
    """Latencies of one model measured on one device, OS and choice of compute units."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    schema_: Literal["compressadvise.device-profile/1"] = Field(alias="schema", description="format version")
    device: str = Field(min_length=1, description="free text, shown in labels (e.g. iPhone 15 Pro);")
    os: str = Field(min_length=1, description="free text (e.g. iOS 18.1);")
    target: str | None = Field(None, description="the target profile it calibrates (`compressadvise targets`)")
    compute_units: Literal["CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL"] = Field(
        "ALL", description="the compute units the model was loaded with")
    source: Literal["xcode-performance-report", "mlcomputeplan", "manual"] = Field(
        "manual", description="where the figures come from")
    model: ProfileModel = Field(ProfileModel(), description="the model measured")
    latency_ms: LatencyFigures = Field(description="end-to-end prediction latency")
    ops: list[ProfileOp] = Field([], description="per op, in program order; empty: one whole-model factor")
    notes: list[str] = Field([], description="free text: how the figures were taken")

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def load_device_profile(path: str | os.PathLike) -> DeviceProfile:
    """Read and check a profile; every problem is one line naming the file (and line) and the field."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFound(f"{path}: no such device profile",
                            hint="write one from Xcode's Core ML performance report (docs/device-profiles.md)")
    from compressadvise.knowledge.yamlio import _read_text, validate

    text = _read_text(path, str(path), MAX_BYTES, "a device profile").removeprefix("\ufeff")  # an editor's BOM
    data = _parse(text, path)
    if not isinstance(data, dict):
        raise InvalidKnowledge(f"{path}:1: a device profile is a JSON object (schema, device, os, latency_ms, ops)")
    try:
        profile = DeviceProfile.model_validate(data)
    except ValidationError:
        validate(DeviceProfile, data, str(path), _key_lines(text, path), context="device profile")
        raise  # pragma: no cover - validate raised the one-line error
    _check_target_name(profile, path, text)
    return profile


def _parse(text: str, path: Path) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a number JSON allows")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as e:
        raise InvalidKnowledge(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise InvalidKnowledge(f"{path}: malformed JSON: {str(e).splitlines()[0]}") from None


def _key_lines(text: str, path: Path) -> dict[tuple, int]:
    """Line of each key path, only when an error needs one (JSON parses as YAML flow style)."""
    from compressadvise.knowledge.yamlio import read_yaml

    try:
        return read_yaml(path, text=text)[1]
    except InvalidKnowledge:
        return {}


def _check_target_name(profile: DeviceProfile, path: Path, text: str) -> None:
    if profile.target is None:
        return
    from compressadvise.errors import did_you_mean
    from compressadvise.knowledge.base import builtin
    from compressadvise.knowledge.yamlio import line_of

    known = list(builtin().targets)
    if profile.target not in known:
        line = line_of(_key_lines(text, path), ("target",))
        raise InvalidKnowledge(f"{path}:{line}: device profile: 'target': unknown target {profile.target!r} "
                               f"({did_you_mean(profile.target, known)})")


def as_profile(profile: Any) -> DeviceProfile:
    """A DeviceProfile from a path, a dict (as the JSON holds it) or a DeviceProfile."""
    if isinstance(profile, DeviceProfile):
        return profile
    if isinstance(profile, dict):
        try:
            return DeviceProfile.model_validate(profile)
        except ValidationError as e:
            from compressadvise.errors import bad_argument

            keys = [f.alias or n for n, f in DeviceProfile.model_fields.items()]
            raise bad_argument("device_profile", e, keys) from None
    if isinstance(profile, (str, os.PathLike)):
        return load_device_profile(profile)
    raise BadArgument(f"device_profile: a path, a dict or a DeviceProfile, not {type(profile).__name__}")


def save_device_profile(profile: DeviceProfile, path: str | os.PathLike) -> Path:
    from compressadvise.fsutil import write_text_atomic

    return write_text_atomic(path, json.dumps(profile.dump(), indent=2) + "\n")


def profile_target(profile: DeviceProfile, target: str | None) -> str:
    """The target to calibrate: --target, else the profile's; a disagreement is a usage error."""
    if profile.target and target and profile.target != target:
        raise BadArgument(f"the device profile ({profile.device}) calibrates target {profile.target!r}, "
                          f"not {target!r}", hint=f"pass --target {profile.target}, or a profile measured for {target}")
    resolved = target or profile.target
    if resolved is None:
        raise BadArgument("a device profile calibrates a target's estimate: pass --target",
                          hint='or name it in the profile: "target": "ane-a17"')
    return resolved


def checked_profile(profile: Any, target: str | None) -> tuple[DeviceProfile, str]:
    """The profile (loaded from a path, or a dict) and the target it calibrates, before any work."""
    prof = as_profile(profile)
    return prof, profile_target(prof, target)


# ------------------------------------------------------------------ labels
def calibrated_label(device: str) -> str:
    return f"calibrated from {device} profile"


def measured_label(device: str) -> str:
    return f"measured on {device}"


# ------------------------------------------------------------------ fitting
def op_family(op_type: str) -> str | None:
    """The family a MIL op times; None for ops no estimated layer stands for."""
    return _BY_OP.get(op_type.rsplit(".", 1)[-1].lower())


def op_times(profile: DeviceProfile) -> list[float]:
    """Each op's ms: measured, else its share of the costs times the end-to-end median."""
    costs = sum(op.cost or 0.0 for op in profile.ops)
    median = profile.latency_ms.median
    return [op.ms if op.ms is not None else (op.cost / costs * median if op.cost and costs > 0 else 0.0)
            for op in profile.ops]


@dataclass
class ProfileFit:
    """Per-family factors (profile ms / roofline ms), the whole-model factor, and other_ms."""

    device: str
    os: str
    compute_units: str
    fitted_on: str
    factors: dict[str, float]
    default: float
    other_ms: float
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return calibrated_label(self.device)

    def factor(self, layer_type: str) -> float:
        return self.factors.get(_BY_LAYER.get(layer_type, ""), self.default)

    def summary(self) -> dict[str, Any]:
        return {"device": self.device, "os": self.os, "compute_units": self.compute_units,
                "fitted_on": self.fitted_on, "factors": dict(self.factors), "default_factor": self.default,
                "other_ms": self.other_ms}


def _by_family(profile: DeviceProfile) -> tuple[dict[str, float], float]:
    """The profile's ms per family, and the ms of ops in no family."""
    measured: dict[str, float] = {}
    other = 0.0
    for op, t in zip(profile.ops, op_times(profile)):
        fam = op_family(op.type)
        if fam is None:
            other += t
        else:
            measured[fam] = measured.get(fam, 0.0) + t
    return measured, other


def fit_profile(est: ModelEstimate, profile: DeviceProfile, fitted_on: str = "original") -> ProfileFit:
    """Fit the factors on the roofline of the model the profile was measured on."""
    measured, other = _by_family(profile)
    estimated: dict[str, float] = {}
    for r in est.layers:
        if (fam := _BY_LAYER.get(r.type)) is not None:
            estimated[fam] = estimated.get(fam, 0.0) + r.ms
    notes: list[str] = []
    factors = {f: ms / estimated[f] for f, ms in measured.items() if ms > 0 and estimated.get(f, 0.0) > 0}
    for f, ms in measured.items():
        if f not in factors and ms > 0:
            other += ms
            notes.append(f"the profile's {f} ops ({ms:.4g} ms) match no estimated layer: counted with the other ops")
    if factors:
        default = sum(measured[f] for f in factors) / sum(estimated[f] for f in factors)
    else:
        why = "has latency only (no ops)" if not profile.ops else "has no op timing an estimated layer"
        notes.append(f"the profile {why}: every layer takes one whole-model factor")
        other = 0.0
        default = profile.latency_ms.median / est.total_ms if est.total_ms > 0 else 1.0
    missing = sorted(f for f in estimated if f not in factors)
    loose = sorted({r.type for r in est.layers if r.type not in _BY_LAYER})
    if factors and (missing or loose):
        notes.append(f"no profile ops for the {', '.join(missing + loose)} layers: they take the whole-model "
                     f"factor {default:.3g}")
    return ProfileFit(device=profile.device, os=profile.os, compute_units=profile.compute_units,
                      fitted_on=fitted_on, factors=factors, default=default, other_ms=other, notes=notes)


def apply_fit(est: ModelEstimate, fit: ProfileFit) -> ModelEstimate:
    """Each layer's roofline ms times its family's factor, plus the profile's other_ms."""
    rows = [r.model_copy(update={"scale": r.scale * (f := fit.factor(r.type)), "ms": r.ms * f}) for r in est.layers]
    per = ", ".join(f"{k} x{v:.3g}" for k, v in fit.factors.items()) or f"all x{fit.default:.3g}"
    note = (f"{fit.label}: roofline scaled per op type ({per}), plus {fit.other_ms:.4g} ms the profile spent "
            "in ops the roofline does not cover")
    return est.model_copy(update={
        "layers": rows, "total_ms": sum(r.ms for r in rows) + fit.other_ms, "calibrated": True,
        "basis": fit.label, "profile": fit.summary(), "notes": [*est.notes, *fit.notes, note]})


def calibrate_with_profile(orig_est: ModelEstimate, comp_est: ModelEstimate | None, profile: DeviceProfile, *,
                           compressed_sha256: Iterable[str] = ()) -> tuple[ModelEstimate, ModelEstimate | None]:
    """Both estimates calibrated by the profile. `compressed_sha256`: the compressed model's hashes
    (its file, its .mlpackage): a profile of that very build makes its latency the profile's median."""
    sha = (profile.model.sha256 or "").lower()
    measured = bool(sha) and comp_est is not None and sha in {h.lower() for h in compressed_sha256 if h}
    on_comp = comp_est is not None and (measured or profile.model.role == "compressed")
    basis = comp_est if on_comp and comp_est is not None else orig_est
    if not basis.layers:
        note = f"{profile.device} profile not applied: no roofline estimate to calibrate"
        orig_est = orig_est.model_copy(update={"notes": [*orig_est.notes, note]})
        if comp_est is not None:
            comp_est = comp_est.model_copy(update={"notes": [*comp_est.notes, note]})
    else:
        fit = fit_profile(basis, profile, "compressed" if on_comp else "original")
        orig_est = apply_fit(orig_est, fit)
        comp_est = apply_fit(comp_est, fit) if comp_est is not None else None
    if measured and comp_est is not None:
        comp_est = comp_est.model_copy(update={
            "total_ms": profile.latency_ms.median, "basis": measured_label(profile.device), "calibrated": True,
            "profile": {**(comp_est.profile or _plain_summary(profile)), "measured_ms": profile.latency_ms.median},
            "notes": [*comp_est.notes, f"the profile was measured on this compressed model (sha256 {sha[:12]}...): "
                      "its latency is the profile's median"]})
    elif sha and on_comp and comp_est is not None:
        comp_est = comp_est.model_copy(update={"notes": [
            *comp_est.notes, "the profile's model sha256 is not this compressed model's: calibrated, not measured"]})
    return orig_est, comp_est


def _plain_summary(profile: DeviceProfile) -> dict[str, Any]:
    return {"device": profile.device, "os": profile.os, "compute_units": profile.compute_units}


# ------------------------------------------------------------------ planning (search, recommend)
def fit_for_planning(report: ModelReport, target: Target, os_major: int, profile: DeviceProfile) -> ProfileFit | None:
    """Factors fitted on the original model's roofline on the target: what search plans with.
    None when the model has no roofline (no MACs, or a target without memory_bandwidth_gbs)."""
    from compressadvise.measure.estimate import roofline

    est = roofline(report, target, os_major)
    if not est.layers:
        return None
    fit = fit_profile(est, profile, "original")
    if profile.model.role == "compressed":
        fit.notes.append("the profile was measured on a compressed model but is fitted on the original's roofline "
                         "here, which understates the factors: profile the original model for planning")
    return fit


def plan_latency(plan: Plan, report: ModelReport, k: Knowledge, profile: Any) -> Plan:
    """The plan with its latency before/after on the target, calibrated by the profile (recommend)."""
    from compressadvise.measure.estimate import from_plan, roofline

    profile, _ = checked_profile(profile, plan.target.name)
    if plan.prediction is None:
        return plan
    tgt = k.target(plan.target.name)
    before = roofline(report, tgt, plan.target.os)
    if not before.layers:
        update: dict[str, Any] = {"latency_basis": "not estimated: " + "; ".join(before.notes[:1])}
    else:
        after = roofline(report, tgt, plan.target.os, from_plan(plan.layers, k))
        o, c = calibrate_with_profile(before, after, profile)
        update = {"latency_ms_before": o.total_ms, "latency_ms_after": c.total_ms if c else None,
                  "latency_basis": o.basis_label()}
    return plan.model_copy(update={"prediction": plan.prediction.model_copy(update=update)})
