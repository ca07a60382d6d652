"""Candidate settings and layers for sensitivity: default grids, `--techniques` parsing, applicability."""
from __future__ import annotations

import fnmatch
import itertools
from typing import Any, Iterable

from compressadvise.model.analysis import LayerInfo, ModelReport
from compressadvise.errors import InvalidKnowledge
from compressadvise.knowledge.base import Knowledge, builtin
from compressadvise.knowledge.schema import COMPRESSIBLE
from compressadvise.plan.setting import Setting
from compressadvise.plan.sizing import NotApplicable, layer_bytes, weight_bytes


def grid_techniques(k: Knowledge | None = None) -> tuple[str, ...]:
    """Techniques with a default candidate grid (a `search_grid` in their YAML)."""
    k = k or builtin()
    return tuple(name for name, t in k.techniques.items() if t.search_grid)


def default_grid(techniques: Iterable[str] | None = None, k: Knowledge | None = None) -> list[Setting]:
    """The default candidates: each technique's `search_grid` (techniques/*.yaml), expanded in
    order; every technique that has one when `techniques` is None."""
    k = k or builtin()
    out: list[Setting] = []
    for name in grid_techniques(k) if techniques is None else techniques:
        for entry in k.techniques[name].search_grid if name in k.techniques else []:
            axes = [v if isinstance(v, list) else [v] for v in entry.values()]
            out += [Setting.of(name, **dict(zip(entry, combo))) for combo in itertools.product(*axes)]
    return out


def parse_settings(specs: Iterable[str], k: Knowledge) -> list[Setting]:
    """Parse `--techniques` entries: a technique name (its default grid) or a grid such as
    `palettization:nbits=4|3,granularity=per_grouped_channel,group_size=8|16`."""
    out: list[Setting] = []
    for spec in specs:
        for part in _split_specs(spec):
            name, _, rest = part.partition(":")
            name = name.strip()
            if name not in k.techniques:
                raise InvalidKnowledge(f"unknown technique {name!r} in --techniques",
                                       hint=f"known: {', '.join(sorted(k.techniques))}")
            if not rest:
                grid = default_grid([name], k)
                if not grid:
                    raise InvalidKnowledge(f"no default candidate grid for {name!r}: give its parameters, "
                                           f"e.g. {name}:nbits=8")
                out.extend(grid)
                continue
            out.extend(_expand(k, name, rest))
    return list(dict.fromkeys(out))


def _split_specs(spec: str) -> list[str]:
    """'palettization;linear_quantization:nbits=8' -> two specs (';' or whitespace separated)."""
    return [s for s in spec.replace(";", " ").split() if s]


def _expand(k: Knowledge, technique: str, text: str) -> list[Setting]:
    tech = k.techniques[technique]
    axes: list[tuple[str, list[Any]]] = []
    for item in text.split(","):
        key, eq, values = item.partition("=")
        key = key.strip()
        spec = tech.parameters.get(key)
        if not eq or spec is None:
            raise InvalidKnowledge(f"--techniques: {technique} has no parameter {key!r}",
                                   hint=f"has: {', '.join(tech.parameters)}")
        vals = [_coerce(spec.type, v.strip()) for v in values.split("|")]
        for v in vals:
            if msg := spec.check(key, v):
                raise InvalidKnowledge(f"--techniques: {technique}: {msg}")
        axes.append((key, vals))
    combos: list[dict[str, Any]] = [{}]
    for key, vals in axes:
        combos = [{**c, key: v} for c in combos for v in vals]
    defaults = {kk: v for kk, v in tech.defaults().items() if kk != "weight_threshold"}
    return [Setting.of(technique, **normalise({**defaults, **c})) for c in combos]


def _coerce(kind: str, text: str) -> Any:
    try:
        return {"int": int, "float": float, "bool": lambda s: s.lower() in ("1", "true", "yes"),
                "str": str}[kind](text)
    except ValueError:
        raise InvalidKnowledge(f"--techniques: {text!r} is not a valid {kind}") from None


def normalise(p: dict[str, Any]) -> dict[str, Any]:
    """Drop parameters that do not apply to the chosen granularity (so equal settings compare equal)."""
    p = dict(p)
    if p.get("granularity") != "per_grouped_channel":
        p.pop("group_size", None)
    if p.get("granularity") != "per_block":
        p.pop("block_size", None)
    for key, default in (("lut_dtype", "fp16"), ("enable_per_channel_scale", False)):
        if p.get(key) == default:
            p.pop(key)
    return p


def candidate_layers(report: ModelReport, patterns: Iterable[str] | None = None) -> list[LayerInfo]:
    """Weight layers a technique can compress: 2-D+ weights of compressible types, not tied aliases."""
    pats = list(patterns or [])
    out = []
    for x in report.layers:
        if x.type not in COMPRESSIBLE or len(x.weight_shape) < 2 or x.tied_to:
            continue
        if pats and not any(fnmatch.fnmatchcase(x.name, p) for p in pats):
            continue
        out.append(x)
    return out


def setting_bytes(k: Knowledge, layer: LayerInfo, s: Setting, baseline: float) -> int:
    """Whole-layer bytes under a setting (estimate from the technique's formula); raises NotApplicable."""
    if s.is_fp16:
        return layer_bytes(layer, None, baseline)
    w = weight_bytes(k, s.technique, layer, {**s.p, "weight_threshold": 0}, baseline)
    return layer_bytes(layer, w, baseline)


def applicable(k: Knowledge, layer: LayerInfo, settings: list[Setting], baseline: float) -> list[Setting]:
    """Settings the backend can apply to this layer (divisible dims); weight_threshold is not
    applied here: every candidate layer is measured, whatever its size."""
    out = []
    for s in settings:
        try:
            setting_bytes(k, layer, s, baseline)
        except NotApplicable:
            continue
        if backend_skips(layer, s):
            continue
        out.append(s)
    return out


def backend_skips(layer: LayerInfo, s: Setting) -> str | None:
    """Cases the size formulas accept but coremltools leaves alone without an error."""
    p = s.p
    if s.technique == "linear_quantization" and p.get("granularity") == "per_block":
        if int(p.get("block_size", 0) or 0) >= layer.in_channels:
            # checked in coremltools.optimize.torch._utils.validation_utils: blocks must be
            # narrower than the input axis, else the layer is skipped (use per_channel instead)
            return f"block_size {p.get('block_size')} >= {layer.in_channels} input channels: coremltools skips it"
    return None
