"""Where a plan runs: a target profile and an OS major, resolved once (like black's `Mode`).

Library entry points still take `target=` / `os=` (the API and the CLI speak names); they call
`Deployment.resolve` once and pass the value down, so the default OS and the minimum-OS check
live here only. What the deployment does with a runtime mode (accelerates it, loads it but
decompresses, cannot load it) and when it expands compressed weights (at load, or just in time)
are read from the target's YAML, never from an OS number written in Python.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Literal

from compressadvise.errors import InvalidKnowledge
from compressadvise.knowledge.schema import Decompression, Target

if TYPE_CHECKING:
    from compressadvise.knowledge.base import Knowledge

Behaviour = Literal["accelerated", "decompressed", "unsupported"]
AT_LOAD = Decompression(at="load", summary="compressed weights are decompressed at load (size win only, "
                        "full-size traffic)", source="default: the target lists no decompression entry")


@dataclass(frozen=True)
class Deployment:
    target: Target
    os: int

    @classmethod
    def resolve(cls, k: Knowledge | None, target: str | Target, os: int | None = None, *,
                check: bool = True) -> Deployment:
        """The target's default OS when none is given; `check` refuses an OS below a Core ML
        target's minimum (the error `recommend` has always raised)."""
        tgt = target if isinstance(target, Target) else _knowledge(k).target(target)
        os_major = tgt.default_os if os is None else int(os)
        if check and tgt.coreml and os_major and os_major < tgt.min_os:
            raise InvalidKnowledge(f"target {tgt.name} needs OS {tgt.min_os} or later (got {os_major})")
        return cls(tgt, os_major)

    @property
    def name(self) -> str:
        return self.target.name

    # ---------------------------------------------------------------- modes
    @property
    def supported(self) -> list[str]:
        return self.target.supports(self.os)

    @property
    def accelerated(self) -> list[str]:
        return self.target.accelerates(self.os)

    def behaviour(self, mode: str) -> Behaviour:
        """What this deployment does with a mode; one it does not list, or lists from a later
        OS, it cannot load."""
        m = self.target.mode(mode)
        if m is None or m.min_os > self.os:
            return "unsupported"
        return m.behaviour

    def missing(self, needed: Iterable[str]) -> list[str]:
        """The modes a setting needs that this deployment cannot load."""
        ok = set(self.supported)
        return [m for m in needed if m not in ok]

    # ---------------------------------------------------------------- weights in memory
    @property
    def decompression(self) -> Decompression:
        """The target's decompression entry in force at this OS (at load when none is)."""
        live = [d for d in self.target.decompression if d.min_os <= self.os]
        return max(live, key=lambda d: d.min_os) if live else AT_LOAD

    @property
    def jit_decompression(self) -> bool:
        return self.decompression.at == "just_in_time"

    def streams_compressed(self, mode: str | None) -> bool:
        """Whether inference reads a layer's compressed bytes (not full-size ones) from memory."""
        if not self.jit_decompression:
            return False  # expanded at load: memory traffic as if uncompressed
        m = self.target.mode(mode) if mode else None
        if m is None:
            return True  # a mode the profile does not list: nothing says it is expanded
        if m.streams is not None:
            return m.streams == "compressed"
        return m.behaviour != "decompressed"

    # ---------------------------------------------------------------- compute
    @property
    def int8_compute(self) -> bool:
        """An int8 fast path, as the target's YAML states it (with its source)."""
        return bool(self.target.int8_compute and self.target.int8_compute.value)


def _knowledge(k: Knowledge | None) -> Knowledge:
    if k is not None:
        return k
    from compressadvise.knowledge.base import builtin
    return builtin()
