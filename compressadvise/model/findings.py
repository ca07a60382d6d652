"""Findings from the layer inventory: the lines `analyze` prints under the table."""
from __future__ import annotations

from typing import Any


def layer_findings(layers: list[Any], tied: dict[str, str]) -> list[str]:
    """Dead, recurrent, non-finite and tied layers: what the inventory says an expert should notice."""
    out = []
    dead = [x for x in layers if x.is_dead]
    if dead:
        out.append(f"{len(dead)} layer(s) no output depends on ({', '.join(x.name for x in dead[:5])}"
                   f"{', ...' if len(dead) > 5 else ''}): dead weights, left out of plans "
                   f"({sum(x.params for x in dead):,} parameters)")
    rec = [x for x in layers if x.is_recurrent]
    if rec:
        share = sum(x.share for x in rec)
        from compressadvise.knowledge.schema import UNSUPPORTED_KINDS

        out.append(f"{len(rec)} recurrent weight matrices ({share:.0%} of parameters, e.g. {rec[0].name}) "
                   f"are inventoried; {UNSUPPORTED_KINDS['recurrent']}")
    for layer in layers:
        if layer.stats and layer.stats.nonfinite:
            out.append(f"{layer.name}: {layer.stats.nonfinite} NaN/inf weight value(s)")
    for name, owner in tied.items():
        out.append(f"{name} shares storage with {owner} (tied weight, counted once)")
    return out
