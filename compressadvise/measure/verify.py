"""Verify a compressed model against the original: fidelity, accuracy, slices, drift, latency, size.

The judge for `apply` and for search: both models run on the same real samples, latency is
measured interleaved on this machine, target latency is a labelled roofline estimate (calibrated
per op type by a device profile, or measured on the device when the profile is of this very
build), and every budget gets a verdict saying what it was checked against.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field

from compressadvise.errors import BadModel, InputNotFound
from compressadvise.measure.estimate import ModelEstimate
from compressadvise.measure.latency import LatencyReport, Timing
from compressadvise.measure.metrics import ResultModel, count_text, size_text
from compressadvise.model.samples import InvalidSamples, Samples, load_samples, random_samples
from compressadvise.measure.verify_budgets import BudgetVerdict, Budgets, _estimates, judge
from compressadvise.measure.verify_budgets import ACCURACY_KEY  # re-exported
from compressadvise.measure.verify_drift import DriftReport, drift_report
from compressadvise.measure.verify_lm import LanguageModelReport, lm_report
from compressadvise.measure.verify_drift import DRIFT_THRESHOLD_DB, LayerDrift, capture_layers  # re-exported
from compressadvise.measure.verify_evaluator import evaluator_rows, load_evaluator, run_evaluator
from compressadvise.measure.verify_evaluator import EvaluatorFailed  # re-exported
from compressadvise.measure.verify_outputs import (MetricRow, OutputFidelity, SliceReport, _check_structure, _nonfinite, _slices,
                             accuracy_rows, check_labels, fidelity_report, parse_metric_overrides, run_model)
from compressadvise.measure.verify_outputs import SliceRow, flatten_outputs, slice_report  # re-exported
from compressadvise.measure.verify_resolve import ModelSide, _named_spec, _resolve, _Side
from compressadvise.measure.verify_resolve import _from_module, disk_size  # re-exported

if TYPE_CHECKING:
    import torch


# ------------------------------------------------------------------ result schema
class SamplesInfo(ResultModel):
    source: str
    kind: Literal["file", "bundled", "random"]
    count: int
    input_shapes: list[list[int]]
    has_labels: bool
    has_slices: bool


class CoreMLInfo(ResultModel):
    available: bool
    note: str = ""
    compute_units: str | None = None
    timing: Timing | None = None
    planned_vs_built: str | None = Field(None, description="from the apply manifest: layers and size vs the plan")
    parity_layers: int | None = Field(None, description="layers whose .mlpackage weight was compared with the torch side's")
    parity_max_abs_diff: float | None = Field(None, description="measured at apply: max |Core ML - torch| weight")
    device_profile: str | None = Field(None, description="the device profile written (--write-device-profile)")


class VerifyResult(ResultModel):
    original: ModelSide
    compressed: ModelSide
    samples: SamplesInfo
    fidelity: list[OutputFidelity]
    accuracy: list[MetricRow] = Field([], description="measured task metrics from the sample labels")
    evaluator: list[MetricRow] = Field([], description="measured metrics from the user's evaluator")
    slices: list[SliceReport] = []
    language_model: LanguageModelReport | None = Field(None, description=(
        "measured when the samples are token ids and an output is next-token logits"))
    drift: DriftReport | None = None
    latency: LatencyReport | None = None
    coreml: CoreMLInfo | None = None
    estimate: dict[str, ModelEstimate] | None = Field(None, description="target roofline, 'original'/'compressed'")
    target_size_bytes: dict[str, float] | None = Field(None, description="estimate: weight bytes on the target")
    budgets: list[BudgetVerdict] = []
    passed: bool = True
    warnings: list[str] = []

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    def missed(self) -> list[BudgetVerdict]:
        return [b for b in self.budgets if not b.passed]

    def _summary(self) -> tuple[str, list[tuple[str, str]]]:
        """The verdict first, then size, fidelity per output, task metrics and each budget."""
        missed = self.missed()
        verdict = "passed" if self.passed else (f"missed {', '.join(b.name for b in missed)}" if missed else "failed")
        rows = [("verdict", verdict), ("samples", f"{self.samples.count} ({self.samples.kind})")]
        o, c = self.original.size_bytes, self.compressed.size_bytes
        if o and c:
            rows.append(("size", f"{size_text(o)} -> {size_text(c)} (x{o / c:.2f})"))
        rows += [(f.name, _key_metrics(f)) for f in self.fidelity[:3]]
        rows += [(m.name, f"{m.original:.4g} -> {m.compressed:.4g}{m.unit} ({m.delta:+.3g})")
                 for m in [*self.accuracy, *self.evaluator][:4]]
        rows += [(f"budget {b.name}", f"{'passed' if b.passed else 'missed'}: {_num(b.value)} vs {_num(b.limit)}"
                  f"{b.unit} ({b.basis})") for b in self.budgets]
        if self.warnings:
            rows.append(("warnings", count_text(len(self.warnings), "warning")))
        return "VerifyResult", rows


# The figures that say most about one output of each kind (all are in `metrics`).
_KEY_METRICS = {"logits": ("top1_agreement", "snr_db"), "dense": ("psnr_db", "cosine"), "mask": ("iou",)}


def _key_metrics(f: OutputFidelity) -> str:
    return ", ".join(f"{m} {f.metrics[m]:.4g}" for m in _KEY_METRICS[f.kind] if m in f.metrics)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


# ------------------------------------------------------------------ the entry point
def _budgets(budgets: Any) -> Budgets:
    """Budgets, a dict (None = no budget, 0 = a strict zero), or a plan's Constraints (0 = none)."""
    if budgets is None:
        return Budgets()
    if isinstance(budgets, Budgets):
        return budgets
    if isinstance(budgets, dict):
        unknown = sorted(set(budgets) - set(Budgets.model_fields) - {"size_from"})
        if unknown:  # Budgets, a result model, would ignore them: a typo must not drop a budget
            from compressadvise.errors import BadArgument, did_you_mean

            valid = [n for n in Budgets.model_fields if n != "size_from"]
            raise BadArgument(f"budgets: unknown key {unknown[0]!r} ({did_you_mean(unknown[0], valid)})")
        return Budgets(**budgets)
    names = ("max_accuracy_drop", "max_latency_ms", "max_size_mb", "size_fraction", "bits_per_weight")
    return Budgets(**{k: (getattr(budgets, k, 0.0) or None) for k in names})


def _samples(samples: Any, orig: _Side) -> Samples:
    if isinstance(samples, Samples):
        return samples
    if samples is not None:
        return load_samples(samples)
    if orig.loaded.format == "bundled":
        return load_samples("bundled")
    return random_samples(orig.loaded.example_inputs)


def _labels(labels: Any, samples: Samples) -> "torch.Tensor | None":
    import torch

    if labels is None:
        return samples.labels
    t = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(labels)
    if t.dim() == 0 or t.shape[0] != len(samples):
        raise InvalidSamples(f"{t.shape[0] if t.dim() else 0} labels for {len(samples)} samples")
    return t


def verify(
    original: Any = None,
    compressed: Any = None,
    *,
    samples: Any = None,
    labels: Any = None,
    evaluator: str | Callable | None = None,
    target: str | None = None,
    os: int | None = None,
    budgets: Any = None,
    latency: bool = True,
    compile: bool = False,
    reps: int = 30,
    warmup: int = 5,
    metrics: dict[str, str] | list[str] | None = None,
    plan: Any = None,
    calibration: Any = None,
    device_profile: Any = None,
    write_device_profile: Any = None,
    compute_units: str = "ALL",
    batch_size: int = 64,
    drift: bool = True,
    drift_samples: int = 64,
    trust_pickle: bool = False,
    progress: Callable[[str], None] | None = None,
) -> VerifyResult:
    """Compare `compressed` with `original` on samples and judge the budgets.

    original/compressed: LoadedModel, nn.Module, model path, `apply` output folder, or
    None/"bundled" for the bundled example (an `apply` folder holding a state dict is rebuilt
    by the factory its manifest names only when `original` is that same factory).
    samples: Samples, a sample file or folder, "bundled", or None (bundled samples for the
    bundled model, else random inputs with a warning). evaluator: `module:function` (or a
    callable) receiving the model and returning a dict of metrics; its `accuracy` key (else
    the first) feeds the accuracy budget, in points. device_profile: a device profile (path, dict or
    DeviceProfile) calibrating both target estimates per op type; it sets the target when `target`
    is None and must agree with it otherwise. write_device_profile: a path to write the profile of
    the timed .mlpackage to (macOS only: Core ML's timing and compute plan).
    """
    say = progress or (lambda _msg: None)
    budget = _budgets(budgets)
    profile, target = _profile_and_target(device_profile, target, calibration)
    if write_device_profile is not None:
        _check_profile_output(write_device_profile, original, compressed, device_profile)
    overrides = parse_metric_overrides(metrics)
    if compressed is None:
        raise InputNotFound("no compressed model given", hint="verify ORIGINAL COMPRESSED")
    say("loading models")
    orig = _resolve(original, trust_pickle)
    if budget.relative():
        from compressadvise.model.analysis import analyze

        facts = analyze(orig.loaded, stats=False)
        budget = budget.resolved(facts.total_bytes_fp16, facts.total_params)
    comp = _resolve(compressed, trust_pickle, named=_named_spec(original))  # its factory, if any, is the user's
    smp = _samples(samples, orig)
    lab = _labels(labels, smp)
    _check_target(target)
    func = load_evaluator(evaluator) if evaluator is not None else None
    result = _compare(orig, comp, smp, lab, smp.source if labels is None else "labels", overrides, batch_size, say)
    _diagnose(result, orig, comp, smp, func, drift=drift, drift_samples=drift_samples, batch_size=batch_size,
              latency=latency, reps=reps, warmup=warmup, compile=compile, say=say)
    result.coreml = _with_build(_coreml(comp, smp, target, compute_units, write_device_profile, reps, warmup), comp)
    if target is not None:
        say("estimating target latency")
        result.estimate, result.target_size_bytes, notes = _estimates(orig, comp, smp, target, os, calibration, plan,
                                                                      profile)
        result.estimate["compressed"].notes.extend(notes)
    return judge(result, budget)


def _profile_and_target(device_profile: Any, target: str | None, calibration: Any) -> tuple[Any, str | None]:
    """The device profile, loaded and checked, and the target it calibrates (before any model runs)."""
    if device_profile is None:
        return None, target
    from compressadvise.errors import BadArgument
    from compressadvise.measure.device_profile import checked_profile

    if calibration is not None:
        raise BadArgument("give a calibration YAML or a device profile, not both",
                          hint="a device profile calibrates per op type and supersedes --calibration")
    return checked_profile(device_profile, target)


def _check_profile_output(path: Any, original: Any, compressed: Any, device_profile: Any) -> None:
    """--write-device-profile: Core ML must run here, and the file must be writable and no input."""
    from compressadvise.errors import Unavailable
    from compressadvise.fsutil import check_output
    from compressadvise.measure.latency import coreml_available

    ok, why = coreml_available()
    if not ok:
        raise Unavailable(f"cannot write a device profile here: {why.split(': ', 1)[-1].split('; ')[0]}",
                          hint="fill one by hand from Xcode's Core ML performance report instead: open the "
                               ".mlpackage in Xcode 15+, Performance tab; see docs/device-profiles.md")
    check_output(path, force=True, inputs={"original model": original, "compressed model": compressed,
                                           "device profile": device_profile})  # never overwrites an input


def _check_target(target: str | None) -> None:
    """Fail fast on an unknown target name, before any model runs."""
    if target is not None:
        from compressadvise.knowledge.base import builtin

        builtin().target(target)


def _compare(orig: _Side, comp: _Side, smp: Samples, lab: "torch.Tensor | None", label_source: str,
             overrides: dict[str, Any], batch_size: int, say: Callable[[str], None]) -> VerifyResult:
    """Both models on the same samples: output fidelity, label accuracy and slices (the result so far)."""
    warnings = list(smp.warnings)
    say(f"running both models on {len(smp)} samples")
    ref = run_model(orig.fn, smp, batch_size, "the original model")
    bad = sum(_nonfinite(t) for t in ref.values())
    if bad:
        raise BadModel(f"the original model outputs {bad} NaN/inf value(s) on these samples: "
                       "fidelity cannot be measured against it", hint="check the samples' scaling and dtype")
    check_labels(lab, ref, label_source)
    test = run_model(comp.fn, smp, batch_size, "the compressed model")
    _check_structure(ref, test)
    fid = fidelity_report(ref, test, overrides)
    if any(f.nonfinite for f in fid):
        warnings.append("the compressed model outputs NaN/inf: its metrics are not meaningful")
    acc, _ = accuracy_rows(ref, test, lab) if lab is not None else ([], None)
    if lab is not None and not acc:
        warnings.append("labels given but no output fits them (class logits or an output shaped like the labels)")
    return VerifyResult(
        original=orig.info(), compressed=comp.info(),
        samples=SamplesInfo(source=smp.source, kind=smp.kind, count=len(smp), input_shapes=smp.shapes(),
                            has_labels=lab is not None, has_slices=smp.slices is not None),
        fidelity=fid, accuracy=acc, slices=_slices(smp, ref, test, lab), warnings=warnings,
        language_model=lm_report(smp.inputs, ref, test))


def _diagnose(result: VerifyResult, orig: _Side, comp: _Side, smp: Samples, func: Callable | None, *,
              drift: bool, drift_samples: int, batch_size: int, latency: bool, reps: int, warmup: int,
              compile: bool, say: Callable[[str], None]) -> None:
    """The evaluator's metrics, per-layer drift and interleaved latency, each when asked for."""
    if func is not None:
        say("running the evaluator")
        result.evaluator = evaluator_rows(run_evaluator(func, orig.fn, "original"),
                                          run_evaluator(func, comp.fn, "compressed"))
    if drift:
        say("comparing layer outputs (drift)")
        result.drift = drift_report(orig, comp, smp.subset(min(drift_samples, len(smp))), batch_size)
    if latency:
        from compressadvise.measure.latency import measure

        say("timing both models (interleaved)")
        result.latency = measure({"original": orig.fn, "compressed": comp.fn}, smp.batch(0, 1),
                                 reps=reps, warmup=warmup, compile=compile)


def _with_build(info: CoreMLInfo | None, comp: _Side) -> CoreMLInfo | None:
    """What apply proved about the .mlpackage it built: planned vs built and torch <-> Core ML parity
    (the evidence, Core ML being unable to run here, that the fidelity above is the artefact's)."""
    if comp.manifest is None or comp.mlpackage is None:
        return info
    from compressadvise.backends.apply_gate import parity_summary, summarize

    info = info or CoreMLInfo(available=False)
    gate = comp.manifest.get("planned_vs_built")
    if isinstance(gate, dict) and "layers_planned" in gate:
        info.planned_vs_built = summarize(gate)
    info.parity_layers, info.parity_max_abs_diff = parity_summary(comp.manifest)
    return info


def _coreml(comp: _Side, smp: Samples, target: str | None, compute_units: str,
            write_profile: Any = None, reps: int = 30, warmup: int = 5) -> CoreMLInfo | None:
    """Time the .mlpackage on a Mac (and write its device profile when asked); elsewhere say
    plainly that on-device timing is unavailable."""
    from compressadvise.measure.latency import coreml_available, coreml_model, coreml_timing

    if comp.mlpackage is None and target is None and write_profile is None:
        return None
    ok, why = coreml_available()
    if not ok:
        return CoreMLInfo(available=False, note=why)
    if comp.mlpackage is None:
        if write_profile is not None:
            raise InputNotFound(f"no .mlpackage to profile for {write_profile}: the compressed model is not an "
                                "`apply` output with a Core ML package", hint="apply the plan with a Core ML target")
        return CoreMLInfo(available=True, note="no .mlpackage to time (the apply output has none)")
    model = coreml_model(comp.mlpackage, compute_units)  # compiled once: timed, then its compute plan read
    names = [i.name for i in model.get_spec().description.input]
    feed = {n: t.numpy() for n, t in zip(names, smp.batch(0, 1))}
    timing = coreml_timing(comp.mlpackage, feed, compute_units=compute_units, reps=reps, warmup=warmup, model=model)
    info = CoreMLInfo(available=True, compute_units=compute_units, timing=timing,
                      note=f"measured on this Mac with compute units {compute_units}")
    if write_profile is not None:
        from compressadvise.measure.compute_plan import mac_profile
        from compressadvise.measure.device_profile import save_device_profile

        profile = mac_profile(comp.mlpackage, model, timing, compute_units, target)
        info.device_profile = str(save_device_profile(profile, write_profile))
        info.note += f"; device profile written to {info.device_profile} ({len(profile.ops)} ops)"
    return info


