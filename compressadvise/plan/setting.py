"""One per-layer compression setting: a technique and the parameters that matter for it.

A `Setting` is what a plan step resolves to on one layer (`Step.setting_for`), what sensitivity
measures and search picks, and what the report and the roofline read. It is built once and
carried as data; its `label` is display text only and nothing parses it back.

Normalisation (`Setting.resolve`): technique defaults are filled in from the technique YAML,
then parameters that do not matter for the chosen form are dropped (group_size unless
per_grouped_channel, block_size unless per_block or a block pruning pattern, n/m unless n:m),
so two spellings of the same compression have one `key`.

Backend parameters (`BACKEND_PARAMS`, today weight_threshold) say which tensors the backend
touches, not how a tensor is compressed: they ride along in `backend`, outside `key`, `label`
and equality, and come back in `all_params` for the backend and its skip rules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from compressadvise.model.analysis import LayerInfo
    from compressadvise.knowledge.base import Knowledge
    from compressadvise.knowledge.schema import Technique

BACKEND_PARAMS = frozenset({"weight_threshold"})
FP16_LABEL = "fp16 (unchanged)"


def unchanged_label(bytes_per_param: float) -> str:
    """An uncompressed layer in the dtype the target stores it in (fp32 on a host CPU, fp16 on Core ML)."""
    name = {4.0: "fp32", 2.0: "fp16", 1.0: "int8"}.get(float(bytes_per_param), f"{bytes_per_param:g} B/weight")
    return f"{name} (unchanged)"


def _items(params: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


def _relevant(tech: "Technique", p: dict[str, Any]) -> dict[str, Any]:
    """Drop the parameters the chosen granularity / pattern ignores."""
    names = tech.parameters
    gran, pattern = p.get("granularity"), p.get("pattern")
    drop: set[str] = set()
    if gran != "per_grouped_channel":
        drop.add("group_size")
    if "granularity" in names and gran != "per_block":
        drop.add("block_size")
    elif "pattern" in names and "granularity" not in names and pattern != "block":
        drop.add("block_size")
    if "pattern" in names and pattern != "n_m":
        drop |= {"n", "m"}
    return {k: v for k, v in p.items() if k not in drop}


@dataclass(frozen=True)
class Setting:
    """One candidate or resolved setting. `params` excludes backend parameters (see module doc)."""

    technique: str
    params: tuple[tuple[str, Any], ...] = ()
    backend: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    # ------------------------------------------------------------ construction
    @classmethod
    def of(cls, technique: str, **params: Any) -> "Setting":
        """As given (no defaults): sensitivity grids and tests spell their settings this way."""
        core = {k: v for k, v in params.items() if k not in BACKEND_PARAMS}
        extra = {k: v for k, v in params.items() if k in BACKEND_PARAMS}
        return cls(technique, _items(core), _items(extra))

    @classmethod
    def resolve(cls, tech: "Technique", params: Mapping[str, Any]) -> "Setting":
        """Normalised: technique defaults < params, then only what matters for this form."""
        merged = _relevant(tech, {**tech.defaults(), **params})
        return cls.of(tech.name, **merged)

    @classmethod
    def normalised(cls, k: "Knowledge", technique: str, params: Mapping[str, Any]) -> "Setting":
        """`resolve` by technique name; an unknown technique (or fp16) is kept as given."""
        tech = k.techniques.get(technique)
        return cls.resolve(tech, params) if tech is not None else cls.of(technique, **params)

    # ------------------------------------------------------------ views
    @property
    def p(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def all_params(self) -> dict[str, Any]:
        """What the backend and its skip rules read: the setting plus backend parameters."""
        return {**self.p, **dict(self.backend)}

    @property
    def key(self) -> str:
        """Stable id, e.g. 'palettization:granularity=per_tensor,nbits=4' (joins and caches)."""
        return self.technique + ":" + ",".join(f"{k}={v}" for k, v in self.params)

    @property
    def is_fp16(self) -> bool:
        return self.technique == "fp16"

    @property
    def label(self) -> str:
        """The one label builder, e.g. '4-bit linear_quantization per_channel asym',
        'pruning 75%', 'pruning 2:4'. Display only."""
        if self.is_fp16:
            return FP16_LABEL
        p = self.p
        if "nbits" not in p and ("pattern" in p or "sparsity" in p):
            if p.get("pattern") == "n_m":
                return f"{self.technique} {p.get('n', 2)}:{p.get('m', 4)}"
            from compressadvise.plan.sizing import pruned_fraction
            return f"{self.technique} {pruned_fraction(p):.0%}"
        bits = f"{p['nbits']}-bit " if "nbits" in p else ""
        gran = p.get("granularity", "")
        extra = {"per_grouped_channel": f" gs={p.get('group_size')}",
                 "per_block": f" bs={p.get('block_size')}"}.get(gran, "")
        mode = " asym" if p.get("mode") == "linear" else ""
        return f"{bits}{self.technique} {gran}{extra}{mode}".strip()

    # ------------------------------------------------------------ knowledge
    def modes(self, k: "Knowledge") -> list[str]:
        """Runtime modes this setting needs, from the technique's `requires` (CEL `when`)."""
        if self.is_fp16 or self.technique not in k.techniques:
            return []
        from compressadvise.knowledge.facts import step_facts
        facts = {"step": step_facts(self.p, self.technique, k.techniques[self.technique].slot)}
        return [mode for mode, cond in k.requirement_programs.get(self.technique, [])
                if cond is None or cond(facts)]

    def primary_mode(self, k: "Knowledge") -> str | None:
        """The most specific mode (the YAML lists the general one first), for one-mode views."""
        modes = self.modes(k)
        return modes[-1] if modes else None

    def weight_bytes(self, k: "Knowledge", layer: "LayerInfo", baseline: float, sparsity: float = 0.0) -> float:
        """Bytes of the layer's weight under this setting (technique size formula); raises
        sizing.NotApplicable where the backend would leave it alone."""
        from compressadvise.plan.sizing import weight_bytes
        return weight_bytes(k, self.technique, layer, self.all_params, baseline, sparsity)

    # ------------------------------------------------------------ data
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"technique": self.technique, "params": self.p}
        if self.backend:
            d["backend"] = dict(self.backend)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Setting":
        return cls.of(d["technique"], **dict(d.get("params", {})), **dict(d.get("backend", {})))


FP16 = Setting("fp16", ())


def stacked_label(settings: list[Setting]) -> str:
    """One layer's settings in step order, e.g. 'pruning 50% + 4-bit palettization per_tensor'."""
    return " + ".join(s.label for s in settings) or FP16_LABEL


def stacked_key(settings: list[Setting]) -> str:
    return " + ".join(s.key for s in settings)
