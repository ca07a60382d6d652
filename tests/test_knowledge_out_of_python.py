"""Expert knowledge lives in the YAML, evaluated by the one engine (issue 14, item 4).

The walkthrough's next moves are cited `outcome` rules (playbooks/next_moves.yaml); the
heavy-tail kurtosis threshold is one cited value (techniques/palettization.yaml) that the rules
and the walkthrough read; the sensitivity/search candidate grid is each technique's
`search_grid`; search asks the engine which settings the layer rules allow.
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import re
import shutil
from pathlib import Path

import pytest

from compressadvise.ui import walkthrough as W
from compressadvise.plan.engine import LayerRules, next_moves
from compressadvise.errors import InvalidKnowledge
from compressadvise.knowledge.base import builtin, knowledge_root, load_knowledge
from compressadvise.measure.sensitivity import Setting, default_grid
from compressadvise.knowledge.yamlio import read_yaml

ROOT = knowledge_root()
ALL_MISSED = ["accuracy drop", "size", "latency"]


@pytest.fixture(scope="module")
def bundled():
    from compressadvise import analyze, recommend

    k = builtin()
    report = analyze(None)
    return report, recommend(report, target="ane-a17", knowledge=k), k


def _playbook(tmp_path: Path, rule: str) -> Path:
    p = tmp_path / "team.yaml"
    p.write_text("playbook: team\ntitle: t\nversion: 1\ndescription: d\nrules:\n" + rule)
    return p


OUTCOME_RULE = """  - code: TEAM001
    title: t
    scope: outcome
    when: '"size" in outcome.missed'
    action: {{kind: {kind}, message: "{message}"}}
    why: w
    rationale: r
    citation: [{{source: s, ref: r}}]
"""


# ------------------------------------------------------------------ next moves
def test_next_moves_come_from_cited_outcome_rules(bundled):
    report, plan, k = bundled
    out = next_moves(plan, report, ALL_MISSED, k)
    outcome = {c for c, r in k.rules.items() if r.rule.scope == "outcome"}
    assert len(outcome) >= 10 and {r.playbook for c, r in k.rules.items() if c in outcome} == {"next_moves"}
    assert out.moves and {m.code for m in out.moves} <= outcome
    for m in out.moves:
        rule = k.rules[m.code].rule
        assert rule.citation and all(c.ref for c in rule.citation)
        assert "{" not in m.message, m.message  # every placeholder was filled in
    assert {e.code for e in out.trace} == outcome  # every outcome rule is traced, fired or not
    assert {e.code for e in out.trace if e.status == "fired"} == {m.code for m in out.moves}
    # the walkthrough shows exactly the engine's moves, and holds no rules of its own
    assert W.next_moves(plan, ALL_MISSED, report, k) == out.messages()
    src = inspect.getsource(W.next_moves)
    assert "nbits" not in src and "supported" not in src


def test_a_per_step_move_names_its_step_and_the_techniques_own_ladder(bundled):
    report, plan, k = bundled
    moves = next_moves(plan, report, ["size"], k).moves
    lower = next(m for m in moves if m.code == "NXT009")
    assert lower.step == 1 and lower.message.startswith("step 1: lower nbits 8 -> 6")
    # the ladder is the technique's nbits choices: linear quantization goes 8 -> 4, not 8 -> 6
    lq = plan.model_copy(deep=True)
    lq.steps[0].technique, lq.steps[0].params = "linear_quantization", {"nbits": 8, "granularity": "per_channel"}
    msgs = next_moves(lq, report, ["size"], k).messages()
    assert any("lower nbits 8 -> 4" in m for m in msgs) and not any("8 -> 6" in m for m in msgs)


def test_no_budget_missed_means_no_moves(bundled):
    report, plan, k = bundled
    out = next_moves(plan, report, [], k)
    assert out.moves == () and all(e.status == "not_matched" for e in out.trace)


@pytest.mark.parametrize("kind,message,error", [
    ("advise", "use {outcome.nope} bits", "placeholder"),
    ("advise", "use {layer.name} bits", "placeholder"),
    ("keep", "keep it", "needs? scope|outcome rules advise"),
])
def test_outcome_rules_are_checked_on_load(tmp_path, kind, message, error):
    with pytest.raises(InvalidKnowledge, match=error):
        load_knowledge([_playbook(tmp_path, OUTCOME_RULE.format(kind=kind, message=message))])


def test_a_team_outcome_rule_adds_a_move(tmp_path, bundled):
    report, plan, _ = bundled
    k = load_knowledge([_playbook(tmp_path, OUTCOME_RULE.format(
        kind="advise", message="ask the model owners for {outcome.kept_layers} layer(s) back"))])
    out = next_moves(plan, report, ["size"], k)
    assert any(m.code == "TEAM001" and m.message.startswith("ask the model owners for ") for m in out.moves)


# ------------------------------------------------------------------ one kurtosis threshold
def test_kurtosis_threshold_is_one_cited_value():
    k = builtin()
    assert k.thresholds["heavy_kurtosis"] == 20.0
    th = k.techniques["palettization"].thresholds["heavy_kurtosis"]
    assert th.value == 20.0 and th.citation and all(c.ref for c in th.citation)
    users = {c for c, r in k.rules.items() if "threshold.heavy_kurtosis" in r.rule.when}
    assert {"WGT004", "WGT005", "LLM005"} <= users
    for code, r in k.rules.items():  # no rule spells a kurtosis cut-off of its own
        assert not re.search(r"kurtosis\s*[<>]=?\s*[0-9]", r.rule.when), code
    assert "20.0" in k.rules["WGT005"].condition.conjuncts[3][0]  # substituted before CEL compiles
    assert not hasattr(W, "KURTOSIS_HEAVY")


def test_the_walkthrough_reads_the_same_threshold():
    import torch
    from torch import nn

    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import LoadedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[2].weight[0, :8] = 40.0
    report = analyze(LoadedModel(source="test", format="module", sha256="", has_graph=True, module=model))
    kurt = next(x.stats.kurtosis for x in report.layers if x.name == "2")
    k = builtin()
    flagged = lambda kn: any(line.startswith("2:") and "kurtosis" in line  # noqa: E731
                             for line in W.expert_notes(report, None, kn).fragile)
    assert kurt > k.thresholds["heavy_kurtosis"] and flagged(k)
    assert not flagged(dataclasses.replace(k, thresholds={**k.thresholds, "heavy_kurtosis": kurt + 1.0}))


def test_an_unknown_threshold_is_a_load_error(tmp_path):
    rule = OUTCOME_RULE.format(kind="advise", message="m").replace(
        '\'"size" in outcome.missed\'', "'model.max_kurtosis > threshold.heavy_kurtoses'")
    with pytest.raises(InvalidKnowledge, match="unknown threshold 'heavy_kurtoses'"):
        load_knowledge([_playbook(tmp_path, rule)])


# ------------------------------------------------------------------ the candidate grid
def _expand(name: str) -> list[Setting]:
    data, _ = read_yaml(ROOT / "techniques" / f"{name}.yaml")
    out = []
    for entry in data.get("search_grid", []):
        axes = [v if isinstance(v, list) else [v] for v in entry.values()]
        out += [Setting.of(name, **dict(zip(entry, combo))) for combo in itertools.product(*axes)]
    return out


def test_the_grid_equals_the_yaml():
    k = builtin()
    with_grid = [n for n, t in k.techniques.items() if t.search_grid]
    assert set(with_grid) == {"palettization", "linear_quantization"}
    assert default_grid() == [s for n in with_grid for s in _expand(n)]
    for name in k.techniques:
        assert default_grid([name]) == _expand(name)
    # the values the Python grid held before it moved to the YAML
    old = [Setting.of("palettization", nbits=n, granularity="per_tensor") for n in (8, 6, 4, 3, 2)]
    old += [Setting.of("palettization", nbits=n, granularity="per_grouped_channel", group_size=g)
            for n in (8, 6, 4, 3, 2) for g in (4, 8, 16)]
    old += [Setting.of("linear_quantization", nbits=n, granularity="per_channel", mode=m)
            for n in (8, 4) for m in ("linear_symmetric", "linear")]
    old += [Setting.of("linear_quantization", nbits=4, granularity="per_block", block_size=b, mode=m)
            for b in (16, 32, 128) for m in ("linear_symmetric", "linear")]
    assert set(default_grid()) == set(old) and len(default_grid()) == len(old)


def test_a_grid_value_the_technique_refuses_is_a_load_error(tmp_path):
    for kind in ("techniques", "targets"):
        shutil.copytree(ROOT / kind, tmp_path / kind)
    f = tmp_path / "techniques" / "palettization.yaml"
    f.write_text(f.read_text().replace("  - {nbits: 8, granularity: per_tensor}", "  - {nbits: 5, granularity: per_tensor}"))
    with pytest.raises(InvalidKnowledge, match=r"palettization.yaml:\d+: search_grid: parameter 'nbits'=5"):
        load_knowledge(root=tmp_path, builtin_playbooks=False)


# ------------------------------------------------------------------ search asks the engine
def test_layer_rules_decide_as_recommend_does(bundled):
    report, plan, k = bundled
    rules = LayerRules.of(k, report, plan.target.name, plan.target.os, plan.constraints)
    by_name = {x.name: x for x in report.layers}
    step = plan.steps[0]
    for sk in step.skipped:
        if sk.code != "backend":
            assert rules.decide(by_name[sk.layer], step.technique, step.params).code == sk.code
    for name in step.layers:
        decided = rules.decide(by_name[name], step.technique, step.params)
        assert decided is None or decided.rule.action.kind == "override"


def test_search_uses_no_private_engine_helpers():
    import compressadvise.plan.search as S

    src = inspect.getsource(S.lesson_candidates)
    assert "LayerRules" in src and not re.search(r"import .*\b_[a-z]", src)
    assert not re.search(r"from \.(engine|sensitivity) import .*\b_[a-z]", inspect.getsource(W))


def test_outlier_threshold_is_one_cited_value():
    """LLM005 and the walkthrough's fragile-layer notes once used 20 and 10 std: one cited value now."""
    k = builtin()
    th = k.techniques["linear_quantization"].thresholds["outlier_absmax_std"]
    assert k.thresholds["outlier_absmax_std"] == th.value == 20.0 and th.citation
    assert "threshold.outlier_absmax_std" in k.rules["LLM005"].rule.when
    for code, r in k.rules.items():  # no rule spells an outlier cut-off of its own
        assert not re.search(r"absmax_over_std\s*[<>]=?\s*[0-9]", r.rule.when), code
    import compressadvise.ui.walkthrough_notes as notes

    assert not hasattr(notes, "ABSMAX_STD")


def test_the_walkthrough_flags_outliers_at_the_rules_threshold():
    import torch
    from torch import nn

    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import LoadedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        w = model[2].weight
        w[0, 0] = w.mean() + 15 * w.std()  # 15 std: over the old 10, under the cited 20
    report = analyze(LoadedModel(source="test", format="module", sha256="", has_graph=True, module=model))
    std = next(x.stats.absmax_over_std for x in report.layers if x.name == "2")
    assert 10.0 < std < 20.0
    k = builtin()
    flagged = lambda kn: any(line.startswith("2:") and "outlier" in line  # noqa: E731
                             for line in W.expert_notes(report, None, kn).fragile)
    assert not flagged(k)
    assert flagged(dataclasses.replace(k, thresholds={**k.thresholds, "outlier_absmax_std": std - 1.0}))


@pytest.mark.parametrize("kind", ["techniques", "targets"])
def test_a_name_defined_twice_is_a_load_error_at_its_line(tmp_path, kind):
    """Two files naming one technique (or target) in a knowledge root: file:line of the second,
    and where the first was defined."""
    import shutil

    from compressadvise.knowledge.base import knowledge_root, load_knowledge

    src = knowledge_root()
    for d in ("techniques", "targets", "playbooks"):
        shutil.copytree(src / d, tmp_path / d)
    first = sorted((tmp_path / kind).glob("*.yaml"))[0]
    (tmp_path / kind / "zz_copy.yaml").write_text(first.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(InvalidKnowledge, match=rf"zz_copy.yaml:\d+: {kind[:-1]} '.+' already defined in .*{first.name}"):
        load_knowledge(root=tmp_path)
