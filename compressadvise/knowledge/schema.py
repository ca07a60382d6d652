"""Schemas for techniques, target profiles, playbook rules and plans (pydantic, strict keys).

Unknown keys are errors (a typo such as `prioritty` must not silently drop a setting).
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from compressadvise.measure.metrics import Summarized  # short reprs and notebook displays

PLAN_VERSION = 1
SLOTS = ("sparsity", "weights", "activations")
LAYER_TYPES = ("linear", "conv", "depthwise_conv", "embedding", "norm", "attention", "recurrent", "other")
COMPRESSIBLE = ["linear", "conv", "depthwise_conv", "embedding", "attention"]
# Weight kinds that are inventoried but that no backend compresses yet, and why (said per layer in
# plans and in analysis findings rather than left out silently).
UNSUPPORTED_KINDS = {
    "recurrent": ("recurrent (LSTM/GRU) weight: no configured backend compresses it yet "
                  "(coremltools.optimize.torch handles Linear, Conv2d, Embedding, MultiheadAttention; torchao Linear)"),
}


def _finite(value: Any) -> Any:
    """NaN passes every range check (`nan < min` is false) and inf breaks the size sums, so no
    free-form parameter may hold either, however deep in a list or mapping."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number, not NaN or infinity")
    if isinstance(value, (list, tuple)):
        for v in value:
            _finite(v)
    elif isinstance(value, dict):
        for v in value.values():
            _finite(v)
    return value


FiniteAny = Annotated[Any, AfterValidator(_finite)]
Params = dict[str, FiniteAny]


class Strict(BaseModel):
    # allow_inf_nan=False: every float field refuses .nan and .inf, with the key's file:line.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Citation(Strict):
    source: str = Field(description="short name of the source, e.g. 'coremltools optimization guide'")
    ref: str | None = Field(None, description="section, table or item, e.g. 'C: Hardware'")
    url: str | None = None
    note: str | None = None

    def text(self) -> str:
        parts = [self.source]
        if self.ref:
            parts.append(self.ref)
        if self.url:
            parts.append(self.url)
        return ", ".join(parts)


# ---------------------------------------------------------------- techniques
class ParamSpec(Strict):
    type: Literal["int", "float", "str", "bool"]
    description: str
    default: FiniteAny = None
    choices: list[FiniteAny] | None = None
    min: float | None = None
    max: float | None = None

    def check(self, name: str, value: Any) -> str | None:
        """Return an error message, or None when the value fits."""
        py = {"int": int, "float": (int, float), "str": str, "bool": bool}[self.type]
        if isinstance(value, bool) and self.type != "bool" or not isinstance(value, py):
            return f"parameter '{name}' must be {self.type}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):  # would pass min/max below
            return f"parameter '{name}' must be a finite number, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"parameter '{name}'={value!r} not in {self.choices}"
        if self.min is not None and value < self.min:
            return f"parameter '{name}'={value!r} below minimum {self.min}"
        if self.max is not None and value > self.max:
            return f"parameter '{name}'={value!r} above maximum {self.max}"
        return None


class SizeModel(Strict):
    formula: str = Field(description="CEL arithmetic over the size variables; bytes of one weight tensor")
    note: str | None = None


class ModeRequirement(Strict):
    mode: str = Field(description="runtime mode the target must support, e.g. palettize_grouped")
    when: str | None = Field(None, description="CEL condition over step facts; always when absent")


class BackendImpl(Strict):
    backend: str = Field(description="a registered backend id (compressadvise.backends.names()), "
                         "or guidance; checked against the registry at knowledge load")
    config: str = Field(description="the library's config or function name")
    note: str | None = None


class Threshold(Strict):
    value: float = Field(description="the cut-off, in the unit of the fact it is compared with")
    description: str = Field(description="what crossing it means")
    citation: list[Citation] = Field(min_length=1)


class Technique(Strict):
    name: str
    title: str
    summary: str
    slot: Literal["sparsity", "weights", "activations", "none"]
    data: Literal["none", "calibration", "training"]
    guidance_only: bool = False
    form: Literal["palettize", "quantize", "prune", "activations", "sparse_palettize", "sparse_quantize"] | None = Field(
        None, description="the stored weight form the backends leave, which apply's read-back checks for "
        "(absent: checked as quantize)")
    parameters: dict[str, ParamSpec] = {}
    size: SizeModel | None = None
    requires: list[ModeRequirement] = []
    backends: list[BackendImpl] = []
    risks: list[str] = []
    search_grid: list[dict[str, FiniteAny]] = Field([], description=(
        "candidate settings `sensitivity` and `search` measure by default: each entry maps parameters to a "
        "value or a list of values, expanded as a product (first key outermost)"))
    thresholds: dict[str, Threshold] = Field({}, description=(
        "named, cited cut-offs: a rule condition writes `threshold.NAME` (replaced by the value when the "
        "playbook loads) and the tool's own notes read the same value"))
    citation: list[Citation] = Field(min_length=1)

    def defaults(self) -> dict[str, Any]:
        return {k: p.default for k, p in self.parameters.items() if p.default is not None}


# ---------------------------------------------------------------- targets
class Figure(Strict):
    value: float
    unit: str
    source: str
    note: str | None = None


class ModeSupport(Strict):
    mode: str
    min_os: int = Field(0, description="minimum OS major (iOS numbering); 0 = any")
    behaviour: Literal["accelerated", "decompressed", "unsupported"]
    streams: Literal["compressed", "full"] | None = Field(None, description=(
        "what each inference reads from memory once the weights are not expanded at load: the "
        "compressed bytes or full-size ones; default: full when behaviour is decompressed"))
    runtime: bool = Field(False, description=(
        "a runtime feature (e.g. Core ML states for a KV cache), not a compression mode: no technique requires it"))
    note: str | None = None


class Decompression(Strict):
    """When the runtime expands compressed weights, from an OS major on (the latest entry wins)."""

    min_os: int = Field(0, description="from this OS major on (iOS numbering); 0 = any")
    at: Literal["load", "just_in_time"] = Field(description=(
        "load: expanded once when the model loads, so inference streams full-size weights; "
        "just_in_time: kept compressed in memory and expanded as each layer runs"))
    summary: str = Field(description="one line shown with a latency estimate")
    source: str


class StatedFact(Strict):
    """A yes/no property of a target, stated with where it comes from."""

    value: bool
    source: str


class Storage(Strict):
    """Layers the runtime stores wider than the baseline before an OS major (uncompressed)."""

    module_types: list[str] = Field(description="module classes as analysis names them, e.g. LSTM")
    before_os: int = Field(description="applies below this OS major (iOS numbering)")
    bytes_per_param: float
    source: str


class FallbackOp(Strict):
    """Operations the target's accelerator does not run: Core ML moves them to another unit."""

    name: str = Field(description="short id of the entry, e.g. recurrent")
    mil: list[str] = Field(description="Core ML (MIL) op types it covers, as a converted program names them")
    torch: list[str] = Field([], description=(
        "torch ops (aten overload packets, e.g. lstm) and torch.nn classes (LSTM) that convert to them"))
    min_dilation: int | None = Field(None, description="only convolutions with a dilation at least this")
    dtype: Literal["fp32"] | None = Field(None, description="only ops computing in this dtype (a Core ML program)")
    runs_on: Literal["CPU", "GPU", "CPU or GPU"]
    confidence: Literal["documented", "measured", "reported"] = Field(description=(
        "documented by the vendor, measured (by whom, in the source), or reported by practitioners"))
    reason: str
    source: str
    url: str | None = None

    def condition(self) -> str:
        """When the entry applies, in words ('' when always): the docs page and `targets NAME` print it."""
        return ", ".join(w for w in (f"dilation >= {self.min_dilation}" if self.min_dilation else "",
                                     f"computes in {self.dtype}" if self.dtype else "") if w)


class Placement(Strict):
    """Which ops leave the accelerator, and what a switch between compute units costs."""

    accelerator: str = Field(description="the unit the target profile describes, e.g. NE")
    fallback_ops: list[FallbackOp] = []
    switch: str = Field(description="what a switch between units costs, and why")
    switch_source: str


class Target(Strict):
    name: str
    title: str
    vendor: Literal["apple", "nvidia", "generic"]
    kind: Literal["ane", "apple_gpu", "apple_cpu", "x86_cpu", "nvidia_gpu"]
    coreml: bool
    compute_units: list[str]
    backends: list[str]
    os_family: str | None = None
    default_os: int = 0
    min_os: int = 0
    baseline_bytes_per_param: float = Field(2.0, description="bytes per weight when not compressed")
    modes: list[ModeSupport]
    decompression: list[Decompression] = Field([], description=(
        "when compressed weights are expanded, by OS; none listed: at load (no traffic credit)"))
    storage: list[Storage] = Field([], description="layer types stored wider than the baseline on older OS versions")
    int8_compute: StatedFact | None = Field(None, description=(
        "int8 math much faster than fp16 (an int8 fast path); absent: no"))
    figures: dict[str, Figure]
    placement: Placement | None = Field(None, description=(
        "ops the accelerator lacks (they fall back to another unit); absent: none known"))
    notes: list[str] = []
    citation: list[Citation] = Field(min_length=1)

    def supports(self, os: int) -> list[str]:
        return [m.mode for m in self.modes if m.behaviour != "unsupported" and m.min_os <= os]

    def accelerates(self, os: int) -> list[str]:
        return [m.mode for m in self.modes if m.behaviour == "accelerated" and m.min_os <= os]

    def mode(self, name: str) -> ModeSupport | None:
        return next((m for m in self.modes if m.mode == name), None)

    def stored_bytes(self, module_type: str | None, os: int) -> float:
        """Bytes per uncompressed weight of a layer of that module class at that OS (the baseline unless listed)."""
        wide = [x.bytes_per_param for x in self.storage if module_type in x.module_types and os < x.before_os]
        return max(wide, default=self.baseline_bytes_per_param)


# ---------------------------------------------------------------- playbooks
class LayerSelect(Strict):
    types: list[str] | None = Field(None, description="layer types the step covers")
    names: list[str] | None = Field(None, description="glob patterns of layer names")
    where: str | None = Field(None, description="CEL condition over layer facts")

    @field_validator("types")
    @classmethod
    def _types(cls, v: list[str] | None) -> list[str] | None:
        for t in v or []:
            if t not in LAYER_TYPES:
                raise ValueError(f"unknown layer type {t!r} (known: {', '.join(LAYER_TYPES)})")
        return v


class Action(Strict):
    kind: Literal["compress", "override", "keep", "advise"]
    technique: str | None = None
    params: Params = {}
    layers: LayerSelect | None = None
    slots: list[Literal["sparsity", "weights", "activations"]] | None = None
    message: str | None = Field(None, description="for advise: the recommended move, imperative; in an "
                                "outcome rule `{namespace.fact}` is replaced by the fact's value")


class Rule(Strict):
    code: str = Field(pattern=r"^[A-Z]{2,5}[0-9]{3}$")
    title: str
    scope: Literal["model", "layer", "outcome"] = Field(description=(
        "model: once per plan; layer: once per layer of each planned step; outcome: after a verify "
        "missed a budget, once per plan step when the condition uses step facts, else once"))
    when: str
    action: Action
    priority: int = Field(50, ge=0, le=100)
    why: str = Field(description="one line: why this lesson holds")
    rationale: str
    example: str | None = None
    citation: list[Citation] = Field(min_length=1)
    tags: list[str] = []


class Playbook(Strict):
    playbook: str
    title: str
    version: int
    description: str
    rules: list[Rule]


# ---------------------------------------------------------------- plans
class Skip(Strict):
    layer: str
    reason: str
    code: str | None = Field(None, description="rule that asked for it, or the backend behaviour")


class Step(Strict):
    technique: str
    slot: str
    params: Params = {}
    layers: list[str] = Field(default_factory=list, description="layers the step compresses")
    op_type_params: dict[str, Params] = {}
    op_name_params: dict[str, Params] = {}
    skipped: list[Skip] = []
    rules: list[str] = []
    why: str = ""
    predicted_bytes_after: int | None = Field(None, description="estimate: model size after this step")

    def params_for(self, layer: Any) -> dict[str, Any]:
        """Step params < op_type_params (layer type, then module class) < op_name_params, like
        coremltools' OptimizationConfig (global < op type < op name). No technique defaults."""
        p = dict(self.params)
        for key in (layer.type, getattr(layer, "module_type", None) or ""):
            p.update(self.op_type_params.get(key, {}))
        p.update(self.op_name_params.get(layer.name, {}))
        return p

    def setting_for(self, layer: Any, tech: "Technique") -> Any:
        """The one resolver: this step's normalised `Setting` on one layer (technique defaults
        first). Apply, sizing, the engine, search, what-if and the manifest all ask here."""
        from compressadvise.plan.setting import Setting
        return Setting.resolve(tech, self.params_for(layer))


class Advisory(Strict):
    code: str
    title: str
    message: str
    why: str = ""
    layers: list[str] = []


class TraceEntry(Strict):
    code: str
    status: Literal["fired", "not_matched", "outranked", "unsupported", "error"]
    detail: str
    layers: list[str] = []


class LayerPrediction(Strict):
    name: str
    setting: str = Field(description="readable label of `settings`; display only, never parsed")
    settings: list[dict[str, Any]] = Field(
        default_factory=list, description="the layer's settings in step order ({technique, params}); empty = fp16")
    bytes_before: int
    bytes_after: int


class PlanModel(Strict):
    source: str = ""
    sha256: str | None = None
    format: str = ""
    total_params: int = 0


class PlanTarget(Strict):
    name: str
    os: int = 0


class Constraints(Strict):
    max_size_mb: float = 0.0
    max_latency_ms: float = 0.0
    max_accuracy_drop: float = 0.0
    data: Literal["none", "calibration", "training"] = "none"


class Prediction(Strict):
    label: Literal["estimate"] = "estimate"
    bytes_before: int
    bytes_after: int
    ratio: float
    meets_size_budget: bool | None = None
    latency_ms_before: float | None = Field(None, description="latency on the target without the plan (latency_basis)")
    latency_ms_after: float | None = Field(None, description="latency on the target with the plan (latency_basis)")
    latency_basis: str | None = Field(None, description=(
        "what the latencies are: 'estimate (roofline)' or 'calibrated from DEVICE profile' (a device profile)"))


class Measured(Strict):
    """One plan measured in memory on samples: its weights-slot settings and the output fidelity."""
    settings: str = Field(description="the weights settings measured, e.g. '4-bit palettization per_grouped_channel'")
    bytes_after: int = Field(description="estimate: model size with these settings")
    metrics: dict[str, float] = Field(description="measured: psnr_db, snr_db, top1_agreement, kl_divergence, accuracy")
    passed: bool


class PlanFidelity(Strict):
    """What recommend measured before promising: the plan applied in memory to the deployable
    weights, run on samples, against a floor; gentler settings tried when the floor was missed."""
    label: str = Field(description="'measured on N samples', or 'weak evidence: N random inputs'")
    evidence: Literal["samples", "random", "none"]
    samples: int = 0
    floor: dict[str, float] = Field({}, description="metric -> minimum the plan must reach")
    measured: list[Measured] = Field([], description="each plan measured, the recommended one last")
    unmeasured: list[str] = Field([], description="steps or layers the measurement did not cover, and why")
    note: str = ""


class WayForward(Strict):
    """One way to a budget the plan misses: a rule's move, the scheme's arithmetic, or the floor."""
    code: str = Field(description="the outcome rule's code, or BUDGET for the arithmetic and the floor")
    message: str
    predicted_bytes: int | None = Field(None, description="estimate: model size if taken (None: not sized)")
    cost: str = Field("", description="what it costs: data, time, OS, accuracy")


# ---------------------------------------------------------------- placement (a plan's and a report's)
class PlacedOp(Strict):
    id: int
    op: str
    layer: str = ""
    runs_on: str
    entry: str = Field(description="the target table's entry that matched, e.g. recurrent")
    confidence: str
    reason: str
    source: str


class Boundary(Strict):
    producer: str = Field(description="op (and layer) whose output crosses")
    consumer: str
    from_unit: str
    to_unit: str
    bytes: int | None = Field(None, description="the crossing tensor at fp16 (None: shape unknown)")
    ms: float | None = Field(None, description="estimate: write + read at the memory bandwidth (lower bound)")


class PlacementReport(Strict):
    label: Literal["estimate"] = "estimate"
    target: str
    accelerator: str | None = Field(None, description="the unit the target profile describes (None: no table)")
    basis: str = Field(description="where the ops came from: the graph kind, or the layer inventory")
    ops_total: int = 0
    fallback: list[PlacedOp] = []
    boundaries: list[Boundary] = []
    switches_counted: bool = Field(True, description="False when the ops have no order or edges (weights only)")
    switch_ms: float | None = Field(None, description="estimate: the boundaries' copy cost (lower bound)")
    rule: str = Field("TGT010", description="the rule that explains fallbacks (playbooks/targets.yaml)")
    notes: list[str] = []

    def units(self) -> list[str]:
        return sorted({p.runs_on for p in self.fallback})

    def preview(self, n: int = 3) -> str:
        """'lstm at rnn (CPU), embedding at emb (CPU)' for the first ops, grouped by op type."""
        groups: dict[tuple[str, str], list[PlacedOp]] = {}
        for p in self.fallback:
            groups.setdefault((p.op, p.runs_on), []).append(p)
        parts = []
        for (op, unit), rows in list(groups.items())[:n]:
            where = rows[0].layer or "?"
            more = f" and {len(rows) - 1} more" if len(rows) > 1 else ""
            parts.append(f"{op} at {where}{more} ({unit})")
        rest = len(groups) - n
        return ", ".join(parts) + (f", {rest} more op type(s)" if rest > 0 else "")



class RuntimeMemory(Strict):
    """A decoder's memory when it runs: the compressed weights plus the KV cache at a context."""
    label: Literal["estimate"] = "estimate"
    context_length: int
    weights_bytes: int = Field(description="the plan's predicted weights")
    kv_cache_bytes: int = Field(description="2 x layers x KV heads x head dim x context x 2 bytes (fp16)")
    total_bytes: int
    basis: str


class DecoderState(Strict):
    """One Core ML state (a registered fp16 torch buffer updated in place each call)."""
    name: str
    shape: list[int]
    dtype: Literal["fp16"] = "fp16"
    layers: list[int] | None = None  # the model's layers this buffer holds, in order (None: every layer)


class DecoderDeployment(Strict):
    """How a causal LM's KV cache ships to Core ML, chosen from the target's runtime modes at its OS."""
    kind: Literal["stateful_kv", "fixed_context"] = Field(description=(
        "stateful_kv: keys and values kept as Core ML states (iOS 18 / macOS 15), one token per call; "
        "fixed_context: no cache, every call runs the whole window"))
    context_length: int
    states: list[DecoderState] = []
    inputs: list[str] = Field([], description="the converted model's inputs, in words")
    basis: str = Field(description="the target mode entry the choice was read from")
    note: str = Field(description="what this form costs or loses")
    macs_per_token_cached: int | None = Field(None, description="estimate: MACs for the last token of the window with a cache")
    macs_per_token_fixed: int | None = Field(None, description="estimate: MACs per generated token without one (whole window)")


class Plan(Summarized, Strict):
    plan_version: int = PLAN_VERSION
    generated_by: str = "compressadvise"
    model: PlanModel = PlanModel()
    target: PlanTarget
    constraints: Constraints = Constraints()
    playbooks: dict[str, int] = {}
    steps: list[Step] = []
    advisories: list[Advisory] = []
    prediction: Prediction | None = None
    layers: list[LayerPrediction] = []
    trace: list[TraceEntry] = []
    fidelity: PlanFidelity | None = Field(None, description="measured output fidelity of the plan (recommend --measure)")
    ways_forward: list[WayForward] = Field([], description="ranked ways to a size budget the plan misses")
    placement: PlacementReport | None = Field(None, description=(
        "estimate: ops the target's accelerator lacks and the unit switches, from the model's op graph"))
    memory: RuntimeMemory | None = Field(None, description="a decoder's weights + KV cache at its context")
    decoder: DecoderDeployment | None = Field(None, description="a causal LM's KV-cache conversion for Core ML")

    @field_validator("plan_version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != PLAN_VERSION:
            raise ValueError(f"plan_version {v} is not supported (this tool reads {PLAN_VERSION})")
        return v

    def _summary(self) -> tuple[str, list[tuple[str, str]]]:
        """Target, steps, the predicted size against the budgets, and what else the plan says."""
        from compressadvise.measure.metrics import size_text

        rows = [("target", f"{self.target.name} (OS {self.target.os})" if self.target.os else self.target.name),
                ("steps", "; ".join(_step_text(s) for s in self.steps) or "none (nothing to compress)")]
        if self.prediction:
            p = self.prediction
            rows.append(("size", f"{size_text(p.bytes_before)} -> {size_text(p.bytes_after)} (x{p.ratio:.2f}, estimate)"))
        budgets = {k: v for k, v in self.constraints.model_dump().items() if v not in (0.0, "none")}
        if budgets:
            meets = self.prediction.meets_size_budget if self.prediction else None
            fit = "" if meets is None else ", size fits" if meets else ", size missed (estimate)"
            rows.append(("budgets", ", ".join(f"{k} {v}" for k, v in budgets.items()) + fit))
        if self.fidelity:
            rows.append(("fidelity", self.fidelity.label))
        rows += [(name, str(len(items))) for name, items in (("advisories", self.advisories),
                                                           ("ways forward", self.ways_forward)) if items]
        return "Plan", rows


def _step_text(s: Step) -> str:
    bits = f" {s.params['nbits']}-bit" if "nbits" in s.params else ""
    return f"{s.technique}{bits} on {len(s.layers)} layer{'s' if len(s.layers) != 1 else ''}"
