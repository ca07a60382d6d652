"""Rule engine on a small hand-written playbook: firing, conflicts, scopes, sizes, round-trip."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import compressadvise as ca
from compressadvise.plan.engine import recommend
from compressadvise.errors import InvalidKnowledge
from compressadvise.knowledge.base import load_knowledge
from compressadvise.model.loading import LoadedModel
from compressadvise.plan.planfile import load_plan, save_plan

KB = Path(__file__).parent / "fixtures" / "kb"


@pytest.fixture(scope="module")
def kb():
    return load_knowledge(root=KB)


@pytest.fixture(scope="module")
def report():
    torch.manual_seed(0)
    m = nn.Sequential()
    for name, (i, o) in {"l0": (64, 64), "l1": (64, 96), "l2": (96, 72), "l3": (72, 24), "l4": (24, 128)}.items():
        m.add_module(name, nn.Linear(i, o))
    return ca.analyze(LoadedModel("test", "factory", "abc", has_graph=True, module=m))


def fp16(w: int, b: int) -> int:
    return (w + b) * 2


def status(plan, code):
    return {e.code: e.status for e in plan.trace}[code]


def test_default_plan_sizes_and_scopes(kb, report):
    plan = recommend(report, target="test-ane", knowledge=kb)
    assert [s.technique for s in plan.steps] == ["palettization"]
    step = plan.steps[0]
    assert step.params["nbits"] == 8 and step.rules[0] == "TST001"
    skipped = {s.layer: s.code for s in step.skipped}
    assert skipped == {"l0": "TST004", "l4": "TST006", "l3": "backend"}
    assert step.layers == ["l1", "l2"]
    layers = {x.name: x.bytes_after for x in plan.layers}
    # 8-bit per-tensor LUT: n*8/8 + 256 entries * 2 bytes, bias stays fp16
    assert layers["l1"] == 6144 + 512 + 96 * 2
    assert layers["l2"] == 6912 + 512 + 72 * 2
    assert layers["l3"] == fp16(1728, 24)
    assert layers["l0"] == fp16(4096, 64) and layers["l4"] == fp16(3072, 128)
    assert plan.prediction.bytes_before == 22336 * 2
    assert plan.prediction.bytes_after == sum(layers.values())
    assert step.predicted_bytes_after == plan.prediction.bytes_after
    assert status(plan, "TST002") == "not_matched"
    assert "constraints.required_ratio > 3.0" in {e.code: e.detail for e in plan.trace}["TST002"]
    assert [a.code for a in plan.advisories] == ["TST007", "TST009"]
    assert status(plan, "TST008") == "not_matched"


def test_budget_conflict_grouped_lut_and_fallbacks(kb, report):
    plan = recommend(report, target="test-ane", knowledge=kb, constraints={"max_size_mb": 0.01})
    step = plan.steps[0]
    assert step.rules[0] == "TST002"
    assert status(plan, "TST003") == "outranked"  # same priority, fewer conditions
    assert status(plan, "TST001") == "outranked"
    assert step.op_name_params == {"l4": {"nbits": 8, "granularity": "per_tensor"}}
    assert status(plan, "TST006") == "outranked"
    skips = {s.layer: s.reason for s in step.skipped}
    assert "not divisible by group_size 16" in skips["l2"]
    layers = {x.name: x for x in plan.layers}
    assert layers["l1"].bytes_after == 6144 * 4 // 8 + (96 // 16) * 16 * 2 + 96 * 2
    assert layers["l2"].bytes_after == fp16(6912, 72)
    assert layers["l4"].bytes_after == 3072 + 512 + 128 * 2
    assert layers["l4"].setting == "8-bit palettization per_tensor"
    assert plan.prediction.meets_size_budget is False


def test_unsupported_mode_falls_back_to_next_candidate(kb, report):
    plan = recommend(report, target="test-ane", os=17, knowledge=kb, constraints={"max_size_mb": 0.01})
    assert status(plan, "TST002") == "unsupported"
    assert status(plan, "TST003") == "unsupported"
    assert plan.steps[0].rules[0] == "TST001"
    assert "palettize_grouped" in {e.code: e.detail for e in plan.trace}["TST002"]


def test_plan_round_trip(kb, report, tmp_path):
    plan = recommend(report, target="test-ane", knowledge=kb, constraints={"max_size_mb": 0.01})
    path = save_plan(plan, tmp_path / "plan.yaml")
    again = load_plan(path)
    assert again == plan
    assert again.playbooks == {"basic": 3}
    text = path.read_text()
    assert "estimate" in text and text.startswith("# compressadvise plan")


def test_hand_written_plan_validates(tmp_path):
    p = tmp_path / "hand.yaml"
    p.write_text("plan_version: 1\ntarget: {name: test-ane}\nsteps:\n"
                 "  - {technique: palettization, slot: weights, params: {nbits: 6}, layers: [l1]}\n")
    plan = load_plan(p)
    assert plan.steps[0].params == {"nbits": 6}
    p.write_text("plan_version: 1\ntarget: {name: test-ane}\nsteps:\n  - {technique: x, slot: weights, colour: red}\n")
    with pytest.raises(InvalidKnowledge, match=r"hand.yaml:4: plan: unknown key 'colour'"):
        load_plan(p)
    p.write_text("plan_version: 9\ntarget: {name: t}\n")
    with pytest.raises(InvalidKnowledge, match="plan_version 9"):
        load_plan(p)


def _kb_with(tmp_path, rule_yaml: str) -> Path:
    root = tmp_path / "kb"
    shutil.copytree(KB, root)
    (root / "playbooks" / "bad.yaml").write_text(
        "playbook: bad\ntitle: t\nversion: 1\ndescription: d\nrules:\n" + rule_yaml)
    return root


RULE = """  - code: BAD001
    title: t
    scope: {scope}
    when: '{when}'
    action: {action}
    why: w
    rationale: r
    citation: [{{source: s}}]
"""


@pytest.mark.parametrize("when,action,scope,message", [
    ("model.params >", "{kind: advise, message: m}", "model", r"bad.yaml:9: rule BAD001: syntax error"),
    ("model.colour == 1", "{kind: advise, message: m}", "model", r"bad.yaml:9: rule BAD001: unknown fact 'model.colour'"),
    ("model.size_mb + 1 > 2.0", "{kind: advise, message: m}", "model", r"bad.yaml:9: rule BAD001: type error"),
    ("layer.is_first", "{kind: advise, message: m}", "model", r"'layer' facts are not available"),
    ("model.params", "{kind: advise, message: m}", "model", r"must be true or false"),
    ("true", "{kind: compress, technique: nope}", "model", r"bad.yaml:6: rule BAD001: unknown technique 'nope'"),
    ("true", "{kind: compress, technique: palettization, params: {nbits: 5}}", "model", r"nbits'=5 not in"),
    ("true", "{kind: compress, technique: palettization, params: {bits: 4}}", "model", r"has no parameter 'bits'"),
    ("true", "{kind: keep}", "model", r"keep actions need scope: layer"),
])
def test_bad_rules_rejected_with_file_and_line(tmp_path, when, action, scope, message):
    root = _kb_with(tmp_path, RULE.format(when=when, action=action, scope=scope))
    with pytest.raises(InvalidKnowledge, match=message):
        load_knowledge(root=root)


def test_schema_errors_name_line_and_key(tmp_path):
    root = _kb_with(tmp_path, RULE.format(when="true", action="{kind: advise, message: m}", scope="model")
                    + "    prioritty: 3\n")
    with pytest.raises(InvalidKnowledge, match=r"bad.yaml:14: rule BAD001: unknown key 'prioritty'"):
        load_knowledge(root=root)
    root2 = _kb_with(tmp_path / "2", RULE.format(when="true", action="{kind: advise, message: m}", scope="model")
                     + RULE.format(when="true", action="{kind: advise, message: m}", scope="model"))
    with pytest.raises(InvalidKnowledge, match=r"bad.yaml:14: rule BAD001: duplicate rule code"):
        load_knowledge(root=root2)
    root3 = _kb_with(tmp_path / "3", "  - code: [unclosed\n")
    with pytest.raises(InvalidKnowledge, match=r"bad.yaml:\d+: malformed YAML"):
        load_knowledge(root=root3)


def test_user_playbooks_add_rules_and_broken_ones_fail(tmp_path, report):
    extra = tmp_path / "team.yaml"
    extra.write_text("playbook: team\ntitle: t\nversion: 1\ndescription: d\nrules:\n"
                     + RULE.format(when="model.params > 1000", action="{kind: advise, message: team says hi}",
                                   scope="model").replace("BAD001", "TEAM001"))
    k = load_knowledge([extra], root=KB)
    plan = recommend(report, target="test-ane", knowledge=k)
    assert "TEAM001" in [a.code for a in plan.advisories]
    extra.write_text(extra.read_text().replace("model.params > 1000", "model.params >"))
    with pytest.raises(InvalidKnowledge, match="team.yaml"):
        load_knowledge([extra], root=KB)


def test_unknown_target(kb, report):
    with pytest.raises(InvalidKnowledge, match="unknown target 'nope'"):
        recommend(report, target="nope", knowledge=kb)


def test_rules_filter_by_target(kb):
    from compressadvise.commands.knowledge import _possible_on

    tgt = kb.target("test-ane")
    assert _possible_on(kb.rule("TST001"), tgt)  # target.coreml holds
    nvidia = tgt.model_copy(update={"name": "gpu", "kind": "nvidia_gpu", "vendor": "nvidia", "coreml": False})
    assert not _possible_on(kb.rule("TST001"), nvidia)
    assert _possible_on(kb.rule("TST003"), nvidia)  # reads no target fact


def test_layer_advice_without_any_step(kb, report):
    plan = recommend(report, target="test-cpu", knowledge=kb)
    assert plan.steps == []
    assert plan.prediction.bytes_before == plan.prediction.bytes_after == 22336 * 4
    advice = {a.code: a.layers for a in plan.advisories}
    assert advice["TST009"] == ["l4"]


def test_n_m_pruning_sized_from_n_and_m(kb, report):
    from compressadvise.plan.sizing import pruned_fraction, size_variables

    params = {"pattern": "n_m", "n": 2, "m": 4, "sparsity": 0.75, "weight_threshold": 0}
    assert pruned_fraction(params) == 0.5
    assert size_variables(report.layer("l1"), params, 2.0)["sparsity"] == 0.5
    assert pruned_fraction({"pattern": "unstructured", "sparsity": 0.75}) == 0.75
