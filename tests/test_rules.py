"""Every built-in rule, seen firing on one small model/target/budget and staying quiet on another.

A case is (model, target, os, probe playbook, constraints). "Fires" means the rule's trace
entry has status "fired" (a compress rule must also have won its slot); "quiet" means any
other status. Probe playbooks (tests/fixtures/kb_probes) stand in for team rules that request
a risky step, so the built-in guard rules can be seen acting on it. An `outcome` rule (a next
move after verify) is seen on the plan plus the budgets it missed (`missed`): its trace entry
joins the plan's trace and each move its advisories.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from kb_helpers import knowledge, plan_for, report, status


@dataclass(frozen=True)
class Case:
    model: str
    target: str
    os: int | None = None
    probe: str | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    missed: tuple[str, ...] | None = None  # budgets a verify run missed (outcome rules only)

    def plan(self):
        plan = plan_for(self.model, self.target, self.os, self.probe, **self.budget)
        if self.missed is None:
            return plan
        from compressadvise.plan.engine import next_moves
        from compressadvise.knowledge.schema import Advisory

        k = knowledge(self.probe)
        out = next_moves(plan, report(self.model), self.missed, k, data=plan.constraints.data)
        moves = [Advisory(code=m.code, title=k.rules[m.code].rule.title, message=m.message) for m in out.moves]
        return plan.model_copy(update={"trace": plan.trace + list(out.trace), "advisories": plan.advisories + moves})

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.budget.items())
        return f"{self.model}@{self.target}" + (f"/os{self.os}" if self.os else "") + \
            (f"+{self.probe}" if self.probe else "") + (f"[{extra}]" if extra else "") + \
            (f" missed {','.join(self.missed)}" if self.missed is not None else "")


def C(model: str, target: str, os: int | None = None, probe: str | None = None, **budget: Any) -> Case:
    return Case(model, target, os, probe, budget)


def M(missed: str, model: str, target: str, os: int | None = None, probe: str | None = None, **budget: Any) -> Case:
    """An outcome case: the plan, then a verify run that missed the comma-separated budgets."""
    return Case(model, target, os, probe, budget, tuple(x for x in missed.split(",") if x))


LAT = {"latency": 1.0}
CAL = {"data": "calibration"}
TRAIN = {"data": "training"}

# code: (a case where it must fire, a case where it must stay quiet)
TABLE: dict[str, tuple[Case, Case]] = {
    # workflow
    "WFL001": (C("dwcnn", "ane-a17"), C("dwcnn", "ane-a17", drop=1.0)),
    "WFL002": (C("dwcnn", "ane-a17"), C("dwcnn", "ane-a17", ratio=1.5)),
    "WFL003": (C("dwcnn", "ane-a17", ratio=3.5), C("dwcnn", "ane-a17", ratio=1.5)),
    "WFL004": (C("mlp", "ane-a17", ratio=10.0), C("mlp", "ane-a17", ratio=5.0)),
    "WFL005": (C("dwcnn", "ane-a17", **LAT), C("dwcnn", "x86-cpu", **LAT)),
    "WFL006": (C("nonfinite", "ane-a17"), C("mlp", "ane-a17")),
    "WFL007": (C("dwcnn", "ane-a17", drop=1.0), C("dwcnn", "ane-a17")),
    "WFL009": (C("dwcnn", "ane-a17"), C("wide_mlp", "ane-a17")),
    "WFL008": (C("dwcnn", "ane-a17", **TRAIN), C("dwcnn", "ane-a17", **CAL)),
    # weight-only
    "WGT001": (C("dwcnn", "ane-a17"), C("dwcnn", "mac-gpu")),
    "WGT002": (C("dwcnn", "ane-a17", ratio=2.5), C("dwcnn", "ane-a17", ratio=3.5)),
    "WGT003": (C("encoder", "mac-gpu"), C("encoder", "ane-a17")),
    "WGT004": (C("heavy_tailed", "ane-a17", 17), C("heavy_tailed", "ane-a17", 18)),
    "WGT005": (C("heavy_tailed", "ane-a17", ratio=2.5), C("heavy_tailed", "ane-a17", 17, ratio=2.5)),
    "WGT006": (C("heavy_tailed", "ane-a17", 17), C("heavy_tailed", "mac-gpu")),
    # low-bit
    "LOW001": (C("dwcnn", "ane-a17", ratio=3.5), C("dwcnn", "ane-a17", 17, ratio=3.5)),
    "LOW002": (C("encoder", "mac-gpu", ratio=3.5), C("encoder", "mac-gpu", 17, ratio=3.5)),
    "LOW003": (C("dwcnn", "ane-a17", ratio=3.5, **CAL), C("dwcnn", "ane-a17", ratio=3.5)),
    "LOW004": (C("dwcnn", "ane-a17", 17, ratio=3.5, **TRAIN), C("dwcnn", "ane-a17", 17, ratio=3.5)),
    "LOW005": (C("dwcnn", "ane-a17", ratio=3.5, **TRAIN), C("dwcnn", "ane-a17", ratio=3.5, **CAL)),
    "LOW006": (C("dwcnn", "ane-a17", probe="pal4_tensor"),
               C("dwcnn", "ane-a17", probe="pal4_tensor", **TRAIN)),
    "LOW007": (C("mlp", "ane-a17", ratio=6.0), C("mlp", "ane-a17", ratio=4.0)),
    "LOW008": (C("dwcnn", "ane-a17", 17, ratio=3.5), C("mlp", "ane-a17", 17, ratio=3.5)),
    "LOW009": (C("dwcnn", "ane-a17", ratio=6.0, **TRAIN), C("dwcnn", "ane-a17", ratio=6.0, **CAL)),
    # activations
    "ACT001": (C("dwcnn", "ane-a17", **LAT, **CAL), C("dwcnn", "ane-a17", **LAT, **TRAIN)),
    "ACT002": (C("dwcnn", "ane-a17", **LAT, **CAL), C("dwcnn", "ane-a17", ratio=3.5, **LAT, **CAL)),
    "ACT003": (C("encoder", "mac-gpu", **LAT), C("encoder", "ane-a17", **LAT)),
    "ACT004": (C("dwcnn", "ane-a17", **LAT), C("dwcnn", "ane-a17", **LAT, **CAL)),
    "ACT005": (C("dwcnn", "ane-a17", drop=0.5, **LAT, **CAL), C("dwcnn", "ane-a17", drop=2.0, **LAT, **CAL)),
    "ACT006": (C("dwcnn", "ane-a17", 16, **LAT), C("dwcnn", "ane-a17", 17, **LAT)),
    "ACT007": (C("dwcnn", "ane-a14", **LAT, **CAL), C("dwcnn", "ane-a17", **LAT, **CAL)),
    # sparsity
    "SPR001": (C("dwcnn", "ane-a17", **LAT, **TRAIN), C("dwcnn", "ane-a17", **LAT, **CAL)),
    "SPR002": (C("mlp", "apple-cpu", **LAT, **TRAIN), C("dwcnn", "apple-cpu", **LAT, **TRAIN)),
    "SPR003": (C("mlp", "apple-cpu", **LAT, **CAL), C("mlp", "apple-cpu", **LAT, **TRAIN)),
    "SPR004": (C("mlp", "mac-gpu", **LAT, **TRAIN), C("mlp", "apple-cpu", **LAT, **TRAIN)),
    "SPR005": (C("dwcnn", "ane-a17", **LAT, **TRAIN), C("mlp", "ane-a17", **LAT, **TRAIN)),
    "SPR006": (C("sparse", "ane-a17"), C("mlp", "ane-a17")),
    "SPR007": (C("dwcnn", "ane-a17", ratio=5.0, **TRAIN), C("dwcnn", "ane-a17", 17, ratio=5.0, **TRAIN)),
    "SPR008": (C("dwcnn", "ane-a17", **LAT, **TRAIN), C("dwcnn", "ane-a17", 17, **LAT, **TRAIN)),
    "SPR009": (C("mlp", "apple-cpu", **LAT, **CAL), C("mlp", "apple-cpu", **LAT)),
    # layer selection
    "LAY001": (C("dwcnn", "ane-a17"), C("mlp", "ane-a17")),
    "LAY002": (C("dwcnn", "ane-a17"), C("decoder_lm", "ane-a17")),
    "LAY003": (C("encoder", "ane-a17", ratio=3.5), C("encoder", "ane-a17", ratio=2.5)),
    "LAY004": (C("encoder", "mac-gpu", ratio=3.5), C("encoder", "mac-gpu")),
    "LAY005": (C("decoder_lm", "ane-a17"), C("encoder", "ane-a17")),
    "LAY006": (C("decoder_lm", "ane-a17", **LAT, **CAL), C("decoder_lm", "ane-a17", **LAT)),
    "LAY007": (C("prime_mlp", "ane-a17", ratio=3.5), C("mlp", "ane-a17", ratio=3.5)),
    "LAY011": (C("mlp", "ane-a17", ratio=3.5), C("mlp", "ane-a17", ratio=2.5)),
    "LAY008": (C("mlp", "mac-gpu", ratio=3.5), C("encoder", "mac-gpu", ratio=3.5)),
    "LAY009": (C("encoder", "x86-cpu", ratio=1.5), C("encoder", "ane-a17")),
    # per target
    "TGT001": (C("dwcnn", "ane-a17", 16), C("dwcnn", "ane-a17", 17)),
    "TGT002": (C("mlp", "ane-a17", probe="int4_per_block"), C("mlp", "mac-gpu", probe="int4_per_block")),
    "TGT003": (C("encoder", "mac-gpu", **LAT), C("encoder", "mac-gpu")),
    "TGT004": (C("dwcnn", "ane-a17", ratio=3.5, **LAT), C("dwcnn", "ane-a17", 17, ratio=3.5, **LAT)),
    "TGT005": (C("dwcnn", "ane-a17", 17, ratio=3.5), C("dwcnn", "ane-a17", 18, ratio=3.5)),
    "TGT006": (C("mlp", "apple-cpu", **LAT), C("mlp", "apple-cpu", **LAT, **CAL)),
    "TGT010": (C("decoder_lm", "ane-a17"), C("dwcnn", "ane-a17")),  # an embedding look-up vs convs only
    # LLMs and transformers
    "LLM001": (C("decoder_lm", "ane-a17"), C("decoder_lm", "ane-a17", 16)),
    "LLM002": (C("decoder_lm", "ane-a17", ratio=3.5), C("decoder_lm", "ane-a17", ratio=2.5)),
    "LLM003": (C("encoder", "mac-gpu", ratio=3.5, **CAL), C("dwcnn", "mac-gpu", ratio=3.5, **CAL)),
    "LLM004": (C("decoder_lm", "ane-a17"), C("dwcnn", "ane-a17")),
    "LLM005": (C("heavy_tailed", "mac-gpu", ratio=3.5), C("mlp", "mac-gpu", ratio=3.5)),
    "LLM006": (C("encoder", "ane-a17", **LAT, **CAL), C("dwcnn", "ane-a17", **LAT, **CAL)),
    "LLM007": (C("encoder", "ane-a17", probe="pal4_tensor"), C("encoder", "ane-a17", 17, probe="pal4_tensor")),
    "LLM008": (C("llama", "ane-a17"), C("llama_short", "ane-a17")),  # 1.05 MB of KV cache vs 4 KB
    "LLM009": (C("decoder_lm", "mac-gpu", **LAT), C("decoder_lm", "mac-gpu", 17, **LAT)),
    # host CPU (measured)
    "CPU001": (C("mlp", "x86-cpu", ratio=1.5), C("mlp", "x86-cpu")),
    "CPU002": (C("mlp", "x86-cpu", ratio=1.5, **LAT), C("mlp", "x86-cpu", **LAT)),
    "CPU003": (C("mlp", "x86-cpu", ratio=3.0), C("mlp", "x86-cpu", ratio=1.5)),
    "CPU004": (C("decoder_lm", "x86-cpu"), C("decoder_lm", "nvidia-gpu")),
    "CPU005": (C("mlp", "x86-cpu", **LAT), C("dwcnn", "x86-cpu", **LAT)),
    "CPU006": (C("dwcnn", "x86-cpu", ratio=1.5), C("mlp", "x86-cpu", ratio=1.5)),
    # NVIDIA GPU
    "GPU001": (C("decoder_lm", "nvidia-gpu", **LAT), C("decoder_lm", "x86-cpu", **LAT)),
    "GPU002": (C("encoder", "nvidia-gpu", **LAT), C("encoder", "x86-cpu", **LAT)),
    "GPU003": (C("mlp", "nvidia-gpu", ratio=1.5), C("mlp", "x86-cpu", ratio=1.5)),
    "GPU004": (C("mlp", "nvidia-gpu", **LAT, **TRAIN), C("mlp", "nvidia-gpu", **LAT, **CAL)),
    # next moves after a missed budget (outcome rules)
    "NXT001": (M("accuracy drop", "dwcnn", "ane-a17"), M("accuracy drop", "dwcnn", "ane-a17", 17)),
    "NXT002": (M("accuracy drop", "dwcnn", "ane-a17", 17, probe="pal4_tensor"),
               M("accuracy drop", "dwcnn", "ane-a17", 17)),
    "NXT003": (M("accuracy drop", "dwcnn", "ane-a17", probe="lin8_tensor"), M("accuracy drop", "encoder", "mac-gpu")),
    "NXT004": (M("accuracy drop", "encoder", "mac-gpu", ratio=3.5), M("accuracy drop", "encoder", "mac-gpu")),
    "NXT005": (M("finite outputs", "dwcnn", "ane-a17", probe="pal4_tensor"), M("size", "dwcnn", "ane-a17", probe="pal4_tensor")),
    "NXT006": (M("accuracy drop", "dwcnn", "ane-a17"), M("accuracy drop", "mlp", "x86-cpu")),
    "NXT007": (M("accuracy drop", "dwcnn", "ane-a17"), M("accuracy drop", "dwcnn", "ane-a17", **CAL)),
    "NXT008": (M("size", "dwcnn", "ane-a17", 17), M("size", "dwcnn", "ane-a17")),
    "NXT009": (M("size", "dwcnn", "ane-a17"), M("size", "dwcnn", "ane-a17", 17)),
    "NXT010": (M("size", "dwcnn", "ane-a17"), M("latency", "dwcnn", "ane-a17")),
    "NXT011": (M("size", "mlp", "x86-cpu"), M("size", "dwcnn", "ane-a17")),
    "NXT012": (M("latency", "dwcnn", "ane-a17"), M("latency", "dwcnn", "ane-a14")),
    "NXT013": (M("latency", "dwcnn", "ane-a17"), M("", "dwcnn", "ane-a17")),
}


def test_table_covers_every_rule():
    """A new built-in rule without a fires/quiet case here fails the suite."""
    codes = set(knowledge().rules)
    assert codes - TABLE.keys() == set(), "rules without a test case"
    assert TABLE.keys() - codes == set(), "test cases for rules that no longer exist"


@pytest.mark.parametrize("code", sorted(TABLE))
def test_rule_fires(code):
    case = TABLE[code][0]
    plan = case.plan()
    entry = next(e for e in plan.trace if e.code == code)
    assert entry.status == "fired", f"{code} on {case}: {entry.status} ({entry.detail})"
    rule = knowledge(case.probe).rules[code].rule
    if rule.action.kind == "compress":  # the winning rule is cited by its step
        assert any(s.rules and s.rules[0] == code for s in plan.steps)
    elif rule.action.kind == "advise":
        assert code in {a.code for a in plan.advisories}
    else:  # keep/override: cited by the step it changed, with the layers named in the trace
        assert entry.layers and any(code in s.rules for s in plan.steps)


@pytest.mark.parametrize("code", sorted(TABLE))
def test_rule_quiet(code):
    case = TABLE[code][1]
    plan = case.plan()
    assert status(plan, code) != "fired", f"{code} fired on {case}"
    assert code not in {a.code for a in plan.advisories}
    assert all(code not in s.rules for s in plan.steps)


def test_unsupported_fallback_is_traced():
    """A GPU-only technique proposed for the host CPU is set aside, and the next rule wins."""
    plan = plan_for("decoder_lm", "x86-cpu", ratio=3.0)
    assert status(plan, "GPU001") == "unsupported"
    assert "cuda_int4" in next(e.detail for e in plan.trace if e.code == "GPU001")
    assert [s.technique for s in plan.steps] == ["int8_weight_only"]
