"""Sensitivity and search results as report input: their models, `load_sensitivity` and labels."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from compressadvise.errors import InputNotFound, InvalidKnowledge

Basis = Literal["measured", "estimate"]


# ------------------------------------------------------------------ sensitivity input
class SensitivityLayer(BaseModel):
    name: str
    value: float = Field(description="metric lost when only this layer is compressed (higher = more sensitive)")
    setting: str = ""


class ParetoPoint(BaseModel):
    name: str
    bytes: float = Field(description="model size in bytes for this configuration")
    value: float = Field(description="fidelity metric of this configuration")
    kind: Literal["original", "uniform", "candidate", "chosen"] = "candidate"
    size_basis: Basis = "estimate"
    value_basis: Basis = "measured"


class Sensitivity(BaseModel):
    label: Basis = "measured"
    metric: str = "top-1 accuracy"
    unit: str = "%"
    higher_is_better: bool = Field(True, description="for the points' values; layer values: higher = more sensitive")
    setting: str = Field("", description="the compression each layer was probed with")
    layers: list[SensitivityLayer] = []
    points: list[ParetoPoint] = []
    # From `sensitivity` results: each layer compressed alone, per setting label (the plan's
    # per-layer wording), so whole-model fidelity can be predicted for the plan and uniform settings.
    peak: float | None = Field(None, description="max |reference output|, the PSNR peak")
    single_mse: dict[str, dict[str, float]] = Field({}, description="layer -> setting key -> measured output MSE")
    single_bytes: dict[str, dict[str, float]] = Field({}, description="layer -> setting key -> bytes (estimate)")
    labels: dict[str, str] = Field({}, description="setting key -> readable label")
    settings: dict[str, dict[str, Any]] = Field({}, description="setting key -> {technique, params}")


PSNR_METRIC = "output PSNR vs the original"


def load_sensitivity(path: str | os.PathLike) -> Sensitivity:
    """Read sensitivity results (JSON): the output of `compressadvise.measure.sensitivity` (a
    SensitivityReport), of `compressadvise.plan.search` (a SearchResult), or this simple form:

        {"metric": "top-1 accuracy", "unit": "%", "setting": "4-bit palettization",
         "layers": [{"name": "conv", "value": 1.4}],          # drop when only this layer is compressed
         "points": [{"name": "uniform 8-bit", "bytes": 77716, "value": 99.1, "kind": "uniform"}]}

    `layers` may also be a {name: value} mapping; point sizes may be given as `size_bytes`.
    """
    data = _read_json(path, "sensitivity results")
    try:
        if "measurements" in data and "ranking" in data:
            return _from_sensitivity_report(data)
        if "candidates" in data and "frontier_size" in data:
            return _from_search_result(data)
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidKnowledge(f"{path}: unreadable sensitivity/search result ({type(e).__name__}: {e})") from None
    if isinstance(data.get("layers"), dict):
        data["layers"] = [{"name": k, "value": v} for k, v in data["layers"].items()]
    for p in data.get("points", []) or []:
        if isinstance(p, dict) and "bytes" not in p and "size_bytes" in p:
            p["bytes"] = p.pop("size_bytes")
    try:
        return Sensitivity.model_validate(data)
    except ValueError as e:
        raise InvalidKnowledge(f"{path}: not valid sensitivity results: {_first_error(e)}") from None


def _from_sensitivity_report(d: dict[str, Any]) -> Sensitivity:
    """`sensitivity` results: layers ranked by measured output MSE (x the median layer)."""
    mse: dict[str, dict[str, float]] = {}
    size: dict[str, dict[str, float]] = {}
    labels: dict[str, str] = {}
    settings: dict[str, dict[str, Any]] = {}
    for m in d["measurements"]:
        if "output_mse" in m.get("metrics", {}):
            key = m["setting"]  # the measured Setting's key; re-keyed against the knowledge in build()
            mse.setdefault(m["layer"], {})[key] = float(m["metrics"]["output_mse"])
            size.setdefault(m["layer"], {})[key] = float(m["bytes"])
            labels[key] = m["label"]
            settings[key] = {"technique": m["technique"], "params": m.get("params", {})}
    return Sensitivity(
        metric="output MSE when compressed alone", unit="x the median layer", higher_is_better=False,
        setting=f"geometric mean over {len(d.get('settings', []))} settings",
        layers=[SensitivityLayer(name=r["layer"], value=float(r["vs_median"])) for r in d["ranking"]],
        peak=float(d["peak"]), single_mse=mse, single_bytes=size, labels=labels, settings=settings)


def keyed(s: Sensitivity | None, k: Any) -> Sensitivity | None:
    """Measurements keyed by the normalised Setting key (technique defaults filled in), the key
    the plan's rows carry: the join never compares label text."""
    if s is None or not s.settings:
        return s
    from compressadvise.plan.setting import Setting

    new = {old: Setting.normalised(k, d["technique"], d.get("params", {})).key for old, d in s.settings.items()}
    rk = lambda per: {new.get(key, key): v for key, v in per.items()}  # noqa: E731
    return s.model_copy(update={
        "single_mse": {n: rk(v) for n, v in s.single_mse.items()},
        "single_bytes": {n: rk(v) for n, v in s.single_bytes.items()},
        "labels": rk(s.labels), "settings": rk(s.settings)})


def row_key(row: Any, k: Any) -> str:
    """A plan row's setting key (stacked steps joined by ' + '); '' for fp16 or an older plan
    whose rows carry only a label."""
    from compressadvise.plan.setting import Setting, stacked_key

    per = [Setting.normalised(k, d["technique"], d.get("params", {})) for d in getattr(row, "settings", None) or []]
    return stacked_key(per)


def _from_search_result(d: dict[str, Any]) -> Sensitivity:
    """`search` results: measured candidates and the predicted size-vs-PSNR frontier."""
    points = []
    chosen = d.get("chosen", {}).get("name")
    for c in d["candidates"]:
        psnr = c.get("measured", {}).get("psnr_db")
        if psnr is not None and math.isfinite(psnr):
            points.append(ParetoPoint(name=f"search: {c['name']}", bytes=float(c["estimate"]["bytes"]), value=psnr,
                                      kind="chosen" if c["name"] == chosen else "candidate"))
    for i, f in enumerate(d["frontier_size"]):
        if math.isfinite(f["predicted_psnr_db"]):
            points.append(ParetoPoint(name=f"frontier {i + 1} ({f['compressed_layers']} layers)", bytes=float(f["bytes"]),
                                      value=float(f["predicted_psnr_db"]), value_basis="estimate"))
    layers = [SensitivityLayer(name=x["layer"], value=float(x["vs_median"]), setting=x.get("setting", ""))
              for x in d.get("layers", []) if x.get("vs_median") is not None]
    return Sensitivity(metric=PSNR_METRIC, unit="dB", setting="as searched", layers=layers, points=points)


def _read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputNotFound(f"{p}: no such {what} file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidKnowledge(f"{p}: unreadable {what} ({e})") from None
    if not isinstance(data, dict):
        raise InvalidKnowledge(f"{p}: {what} must be a JSON object")
    return data


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg')}"
    return str(e).splitlines()[0]


def _sens_label(s: Sensitivity | None) -> str:
    if s is None:
        return ""
    if s.single_mse or s.metric == PSNR_METRIC:  # sensitivity/search results: a ratio
        return "output MSE compressed alone (x the median layer)"
    return f"{s.metric} lost ({s.unit})"
