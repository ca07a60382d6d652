"""Hostile knowledge, plan and cache files: each test builds its own bad input and expects one
clear line on stderr with a documented exit code (never a traceback, never 70)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from compressadvise.ui.cli import main
from compressadvise.errors import InputNotFound, InvalidKnowledge
from compressadvise.plan.planfile import load_plan
from compressadvise.knowledge.schema import ParamSpec
from compressadvise.measure.sensitivity import Cache

# 10 "lol"s, then eight levels of ten aliases each: 10^9 leaves once expanded, in 372 bytes.
BOMB = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 10) + "]\n" for i in range(8))

PLAN = """plan_version: 1
target: {name: ane-a17, os: 17}
steps:
  - technique: pruning
    slot: sparsity
    params:
      sparsity: VALUE
"""


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    cap = capsys.readouterr()
    return int(e.value.code or 0), cap.out, cap.err


def assert_one_line(err: str, code: int, expected: int) -> None:
    assert code == expected, err
    assert "Traceback" not in err and "internal error" not in err
    assert len(err.strip().splitlines()) == 1, err


def playbook(tmp_path: Path, *rules: str, name: str = "hostile") -> Path:
    """A team playbook in tmp_path; each rule is a YAML block of `  - code: ...` lines."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"playbook: {name}\ntitle: Hostile probe\nversion: 1\ndescription: test\nrules:\n"
                    + "".join(rules))
    return path


def rule(code: str, when: str, scope: str = "model") -> str:
    return (f"  - code: {code}\n    title: probe\n    scope: {scope}\n    when: '{when}'\n"
            "    action: {kind: advise, message: probe}\n    why: probe\n    rationale: probe\n"
            "    citation: [{source: test}]\n")


def line_of(path: Path, needle: str) -> int:
    return next(i for i, ln in enumerate(path.read_text().splitlines(), 1) if needle in ln)


# ------------------------------------------------------------------ 1. alias bombs
def test_alias_bomb_playbook_refused_fast(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    t0 = time.perf_counter()
    code, _, err = cli(capsys, "playbooks", "validate", str(path))
    assert time.perf_counter() - t0 < 2.0
    assert_one_line(err, code, 6)
    assert f"{path}:1: YAML aliases (&/*) are not allowed" in err


def test_alias_bomb_plan_refused_fast(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text("plan_version: 1\ntarget: {name: ane-a17}\n" + BOMB.replace("a: &a", "x: &a"))
    t0 = time.perf_counter()
    code, _, err = cli(capsys, "apply", "--plan", str(path), "--out", str(tmp_path / "out"))
    assert time.perf_counter() - t0 < 2.0
    assert_one_line(err, code, 6)
    assert f"{path}:3: YAML aliases (&/*) are not allowed" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text,line", [
    ("plan_version: 1\ntarget: &t {name: ane-a17}\n", 2),  # an anchor alone is refused too
    ("plan_version: 1\ntarget: &t [*t]\n", 2),  # recursive: used to overflow the stack (exit 70)
    ("plan_version: 1\nbase: &b {os: 17}\ntarget:\n  <<: *b\n  name: ane-a17\n", 2),  # merge key
])
def test_anchors_and_aliases_refused_in_plans(tmp_path, text, line):
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(InvalidKnowledge, match=rf"plan.yaml:{line}: YAML aliases \(&/\*\) are not allowed"):
        load_plan(path)


def test_ampersands_and_stars_in_text_are_not_aliases(tmp_path, capsys):
    """Conditions use && and formulas use *: neither may be mistaken for YAML anchors."""
    path = playbook(tmp_path, rule("HST001", "model.params > 3 && model.params * 2 > 0 && target.coreml"))
    code, out, err = cli(capsys, "playbooks", "validate", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["rules"] == 1


def test_builtin_knowledge_uses_no_anchors():
    import yaml

    from compressadvise.knowledge.base import knowledge_root

    root = knowledge_root()
    files = [p for kind in ("playbooks", "techniques", "targets") for p in sorted((root / kind).glob("*.yaml"))]
    assert len(files) > 20
    for p in files:
        for event in yaml.parse(p.read_text(), Loader=yaml.CSafeLoader):
            assert not isinstance(event, yaml.AliasEvent) and not getattr(event, "anchor", None), p


# ------------------------------------------------------------------ 2. not UTF-8
@pytest.mark.parametrize("raw,byte,offset", [
    (b"\xff\xfep\x00l\x00a\x00y\x00", "0xff", 0),  # UTF-16 with its byte-order mark
    ("playbook: caf\u00e9\n".encode("latin-1"), "0xe9", 13),
])
def test_non_utf8_playbook(tmp_path, capsys, raw, byte, offset):
    path = tmp_path / "latin.yaml"
    path.write_bytes(raw)
    code, _, err = cli(capsys, "playbooks", "validate", str(path))
    assert_one_line(err, code, 6)
    assert f"{path}: not UTF-8 text (byte {byte} at offset {offset})" in err


def test_non_utf8_plan(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_bytes(b"plan_version: 1\ntarget: {name: \xe4ne}\n")
    with pytest.raises(InvalidKnowledge, match=r"plan.yaml: not UTF-8 text \(byte 0xe4 at offset 31\)"):
        load_plan(path)


# ------------------------------------------------------------------ 3. NaN and infinity
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "[0.5, .nan]"])
def test_plan_param_nan_inf_refused(tmp_path, capsys, value):
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN.replace("VALUE", value))
    code, _, err = cli(capsys, "apply", "--plan", str(path), "--out", str(tmp_path / "out"))
    assert_one_line(err, code, 6)
    assert f"{path}:7: plan: 'steps.0.params.sparsity': must be a finite number" in err


def test_plan_float_fields_and_overrides_refuse_nan(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("plan_version: 1\ntarget: {name: ane-a17}\nconstraints:\n  max_size_mb: .nan\n")
    with pytest.raises(InvalidKnowledge, match=r"plan.yaml:4: plan: 'constraints.max_size_mb': .*finite"):
        load_plan(path)
    path.write_text("plan_version: 1\ntarget: {name: ane-a17}\nsteps:\n  - technique: palettization\n"
                    "    slot: weights\n    op_name_params:\n      fc: {nbits: .nan}\n")
    with pytest.raises(InvalidKnowledge, match=r"plan.yaml:7: plan: 'steps.0.op_name_params.fc.nbits': .*finite"):
        load_plan(path)


def test_playbook_param_nan_refused(tmp_path, capsys):
    path = playbook(tmp_path, rule("HST002", "target.coreml").replace(
        "action: {kind: advise, message: probe}",
        "action: {kind: compress, technique: pruning, params: {sparsity: .nan}}"))
    code, _, err = cli(capsys, "playbooks", "validate", str(path))
    assert_one_line(err, code, 6)
    assert f"{path}:{line_of(path, 'action:')}: rule HST002: 'action.params.sparsity': must be a finite" in err


def test_paramspec_check_refuses_nan_from_code():
    """Plans built in code skip the YAML schema: the range check itself must not let NaN through."""
    spec = ParamSpec(type="float", description="fraction", min=0.0, max=1.0)
    assert "finite" in spec.check("sparsity", float("nan"))
    assert spec.check("sparsity", 0.5) is None


# ------------------------------------------------------------------ 4. runtime CEL errors
def test_overflow_at_recommend_names_rule_and_line(tmp_path, capsys):
    # 16 * 10^15 fits in int64 (the load-time stand-in); the bundled model's 73,930 params do not
    path = playbook(tmp_path, rule("HST003", "model.params * 1000000000000000 > 0"))
    code, _, _ = cli(capsys, "playbooks", "validate", str(path))
    assert code == 0
    code, _, err = cli(capsys, "recommend", "--playbooks", str(path))
    assert_one_line(err, code, 6)
    assert f"{path}:{line_of(path, 'when:')}: rule HST003: condition failed at evaluation: arithmetic overflow" in err


def test_division_by_zero_at_recommend_names_rule_and_line(tmp_path, capsys):
    path = playbook(tmp_path, rule("HST004", "1 / (layer.params - layer.params) > 0", scope="layer"))
    code, _, err = cli(capsys, "recommend", "--playbooks", str(path))
    assert_one_line(err, code, 6)
    assert f"{path}:{line_of(path, 'when:')}: rule HST004: condition failed at evaluation: division by zero" in err


def test_overflow_on_stand_ins_refused_at_load(tmp_path, capsys):
    path = playbook(tmp_path, rule("HST005", "model.params * 1000000000000 * 1000000000000 > 0"))
    code, _, err = cli(capsys, "playbooks", "validate", str(path))
    assert_one_line(err, code, 6)
    assert f"{path}:{line_of(path, 'when:')}: rule HST005: cannot evaluate: arithmetic overflow" in err


# ------------------------------------------------------------------ 5. comprehensions
def test_comprehension_macros_fire(tmp_path, capsys):
    path = playbook(tmp_path,
                    rule("HST010", 'target.supports.exists(m, m.startsWith("palettize"))'),
                    rule("HST011", 'target.supports.all(m, m != "no_such_mode") && '
                                   'target.supports.exists_one(m, m == "sparse_nm")'),
                    rule("HST012", 'size(target.supports.filter(m, m.startsWith("linear"))) == 3 && '
                                   'target.supports.map(m, m + "!").size() > 0'),
                    rule("HST013", 'target.supports.exists(m, m == "no_such_mode")'),
                    rule("HST014", 'target.supports.exists(a, target.accelerates.exists(b, a == b))'))
    code, out, err = cli(capsys, "recommend", "--playbooks", str(path), "--target", "ane-a17", "--no-measure", "--json")
    assert code == 0, err
    status = {e["code"]: e["status"] for e in json.loads(out)["trace"]}
    assert {c: status[c] for c in ("HST010", "HST011", "HST012", "HST013", "HST014")} == {
        "HST010": "fired", "HST011": "fired", "HST012": "fired", "HST013": "not_matched", "HST014": "fired"}


@pytest.mark.parametrize("when,message", [
    ("target.supports.exists(a, target.supports.exists(b, target.supports.exists(c, a == c)))",
     "comprehensions (all, exists, exists_one, filter, map) nest 3 deep (at most 2)"),
    ('target.supports.map(a, a + a).map(b, b + b).size() > 0',
     "may not range over another comprehension's result"),
    ("target.supports.exists(model, model == \"x\")", "comprehension variable 'model' hides"),
    ("target.supports.exists(m, n == \"x\")", "unknown name 'n'"),
    ("model.params > 0 || " + " || ".join(["model.params > 1"] * 120), "characters long (at most 2000)"),
])
def test_costly_or_wrong_comprehensions_refused_with_line(tmp_path, capsys, when, message):
    path = playbook(tmp_path, rule("HST020", when))
    code, _, err = cli(capsys, "playbooks", "validate", str(path))
    assert_one_line(err, code, 6)
    assert f"{path}:{line_of(path, 'when:')}: rule HST020: " in err and message in err


# ------------------------------------------------------------------ 6. sensitivity cache
@pytest.mark.parametrize("content", ["[1, 2]", "5", '"x"', "null", "{}", "[[[[[[[[[[" * 10000,
                                     "VALID_BUT_NO_RESULT", "VALID_BUT_BAD_METRICS"])
def test_cache_entry_of_wrong_shape_is_a_miss_and_rewritten(tmp_path, content):
    cache = Cache(tmp_path)
    key = ("a" * 64, "fc=palettization:nbits=4", "s" * 64)
    good = {"metrics": {"output_mse": 0.5, "psnr_db": float("inf")}, "proxies": {"weight_rel_error": 0.1},
            "seconds": 1.0}
    cache.put(*key, good)
    entry = next(tmp_path.rglob("*.json"))
    if content.startswith("VALID"):
        data = json.loads(entry.read_text())
        if content == "VALID_BUT_NO_RESULT":
            del data["result"]
        else:
            data["result"]["metrics"] = ["not", "a", "mapping"]
        content = json.dumps(data)
    entry.write_text(content)
    assert cache.get(*key) is None and cache.misses == 1
    cache.put(*key, good)  # what measure() does after a miss
    assert Cache(tmp_path).get(*key) == good


def test_cache_root_that_is_a_file(tmp_path):
    f = tmp_path / "cache.json"
    f.write_text("{}")
    with pytest.raises(InputNotFound, match="must be a folder"):
        Cache(f)
    with pytest.raises(InputNotFound, match="must be a folder"):
        Cache(f / "sub")
    assert Cache(f, enabled=False).get("a", "b", "c") is None  # --no-cache never looks at it


def test_cli_cache_file_refused_before_measuring(tmp_path, capsys, monkeypatch):
    import compressadvise.measure.sensitivity as S

    def no_measuring(*a, **k):
        raise AssertionError("measured despite a bad --cache")

    monkeypatch.setattr(S, "measure", no_measuring)
    f = tmp_path / "cache"
    f.write_text("not a folder")
    code, _, err = cli(capsys, "sensitivity", "--cache", str(f), "--workers", "1", "--executor", "serial",
                       "--max-samples", "4")
    assert_one_line(err, code, 3)
    assert f"sensitivity cache {f} is a file: the cache must be a folder" in err
    assert f.read_text() == "not a folder"

