"""Plan files: versioned YAML that `apply` replays. Hand-written plans use the same schema."""
from __future__ import annotations

from pathlib import Path

from compressadvise.errors import InvalidKnowledge
from compressadvise.fsutil import write_text_atomic
from compressadvise.knowledge.schema import Plan
from compressadvise.knowledge.yamlio import dump_yaml, read_yaml, validate

HEADER = (
    "# compressadvise plan: replay with `compressadvise apply MODEL --plan THIS_FILE --out DIR`.\n"
    "# Sizes under `prediction` and `predicted_bytes_after` are estimates from the technique\n"
    "# formulas; `apply` writes the measured sizes into its manifest.\n"
)


def plan_to_yaml(plan: Plan) -> str:
    return HEADER + dump_yaml(plan.model_dump(mode="json"))


def save_plan(plan: Plan, path: str | Path) -> Path:
    return write_text_atomic(path, plan_to_yaml(plan))


def load_plan(path: str | Path) -> Plan:
    data, lines = read_yaml(path)
    if not isinstance(data, dict):
        raise InvalidKnowledge(f"{path}:1: a plan must be a mapping (plan_version, target, steps)")
    return validate(Plan, data, str(path), lines, context="plan")
