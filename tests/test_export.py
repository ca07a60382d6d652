"""`export`: a plan as coremltools OptimizationConfig YAML / a torchao snippet that rebuilds, with the
library alone, the very weights `apply` builds (issue 21, item 8).

Everything runs on the bundled example. The coremltools file's own recipe (its header) is run as
a user would run it: fold, torch.export, ct.convert, then the YAML's optimize calls; the saved
.mlpackage is re-opened and its weights decompressed with coremltools' own pass (no prediction:
macOS-only), then compared with apply's .mlpackage.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import compressadvise as ca
from compressadvise.backends.export import comment, export_plan
from compressadvise.errors import Unavailable
from compressadvise.knowledge.schema import Plan, PlanTarget, Skip, Step
from compressadvise.plan.planfile import save_plan
from cli_helpers import run_captured


def plan(*steps: Step, target: str = "ane-a17", os: int = 18) -> Plan:
    return Plan(target=PlanTarget(name=target, os=os), steps=list(steps))


def step(technique: str, layers: list[str], slot: str = "weights", **params) -> Step:
    return Step(technique=technique, slot=slot, params=params, layers=layers)


# Prune conv and fc, then palettize conv and quantize fc on top (joint calls, keyed by the names the
# prune call creates); stem (its BatchNorm folded in) at 2 bits despite its size; dw is planned too
# but under coremltools' weight_threshold.
MIXED = plan(step("pruning", ["conv", "fc"], slot="sparsity", sparsity=0.5),
             Step(technique="palettization", slot="weights", params={"nbits": 4}, layers=["conv", "stem", "dw"],
                  op_name_params={"stem": {"nbits": 2, "weight_threshold": 0}}),
             step("linear_quantization", ["fc"], nbits=8))
SINGLE = plan(Step(technique="palettization", slot="weights", params={"nbits": 4}, layers=["conv", "fc"],
                   op_name_params={"fc": {"nbits": 2, "granularity": "per_grouped_channel", "group_size": 16}}))
TORCHAO = plan(step("int8_weight_only", ["fc", "conv"]), step("intx_weight_only", ["classifier"], nbits=4, mode="linear"),
               target="x86-cpu", os=0)


def recipe(text: str) -> str:
    """The header's 'Reproduce with coremltools alone' lines, as the Python they comment."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# Reproduce with coremltools alone"))
    code = []
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        code.append(line[4:])
    return "\n".join(code)


def run_recipe(result, folder: Path, monkeypatch) -> Path:
    """Write the file where its recipe looks for it and run the recipe on the bundled model."""
    from compressadvise.examples.digits import trained_model

    (folder / result.filename).write_text(result.text)
    monkeypatch.chdir(folder)
    exec(recipe(result.text), {"model": trained_model()})  # noqa: S102 - the exporter's own output
    return folder / "model.mlpackage"


def coreml_weights(path: Path, consts: list[str]) -> dict[str, tuple[list[str], np.ndarray]]:
    """Per original const: (the constexpr ops producing it, its decompressed value)."""
    from compressadvise.backends import coremltools_coreml as C

    prog = C.load_program(path)
    evidence = C.inspect_program(prog, consts)
    from compressadvise.backends.apply_coreml import _decompress_one, _ops_by_name

    ops = _ops_by_name(prog)
    return {c: (sorted(evidence[c].ops), _decompress_one(prog, ops, evidence[c].head)) for c in consts}


def assert_same_coreml(ours: Path, applied: Path, consts: list[str]) -> float:
    mine, theirs = coreml_weights(ours, consts), coreml_weights(applied, consts)
    worst = 0.0
    for c in consts:
        assert mine[c][0] == theirs[c][0] and mine[c][0], (c, mine[c][0], theirs[c][0])
        worst = max(worst, float(np.abs(mine[c][1] - theirs[c][1]).max()))
    assert worst == 0.0, f"max |exported - apply| = {worst}"
    return worst


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    """apply's builds (what the exports must reproduce)."""
    base = tmp_path_factory.mktemp("applied")
    return {name: ca.apply(None, p, base / name, allow_partial=True)  # stem, conv: planned, left alone
            for name, p in (("mixed", MIXED), ("torchao", TORCHAO))}


# ------------------------------------------------------------------ coremltools
def test_coremltools_calls_rebuild_apply_weights(applied, tmp_path, monkeypatch):
    result = export_plan(MIXED, "coremltools")
    assert [(p.function, p.joint) for p in result.passes] == [
        ("prune_weights", False), ("palettize_weights", False), ("palettize_weights", True),
        ("linear_quantize_weights", True)]  # stem fresh, conv on top of its pruning: two calls, as apply
    manifest = applied["mixed"].manifest
    built = {x["name"]: e["coreml"]["const"] for x in manifest["layers"] for e in x["steps"] if "coreml" in e}
    assert result.names == {x: built[x] for x in ("conv", "stem", "fc")}
    assert result.names["stem"] == "p_stem_weight_to_fp16"  # the folded weight keeps its torch name
    assert f"conv -> {built['conv']}" in result.text  # the file says which names it keys by
    assert any(n.startswith("dw: kept fp16") and "weight_threshold" in n for n in result.notes)
    assert any("kept fp16 (no step names them): pw, classifier" in n for n in result.notes)
    assert any("BatchNorm folded first (stem_bn into stem)" in n for n in result.notes)
    ours = run_recipe(result, tmp_path, monkeypatch)
    assert_same_coreml(ours, applied["mixed"].mlpackage, list(result.names.values()))


def test_single_call_yaml_loads_with_from_yaml(tmp_path, monkeypatch):
    """One optimize call: one YAML document, read by `from_yaml` as it stands (the weights of the
    calls the YAML holds are compared with apply's above)."""
    import coremltools.optimize.coreml as cto

    from compressadvise.backends import coremltools_coreml as C

    result = export_plan(SINGLE, "coremltools", filename="palettize.yaml")
    assert len(result.passes) == 1 and "---" not in result.text
    path = tmp_path / "palettize.yaml"
    path.write_text(result.text)
    config = cto.OptimizationConfig.from_yaml(str(path))
    assert config.op_name_configs == result.passes[0].configs
    assert config.op_name_configs["p_fc_weight_to_fp16"].group_size == 16  # the per-layer override kept
    assert "OptimizationConfig.from_yaml('palettize.yaml')" in result.text
    ours = run_recipe(result, tmp_path, monkeypatch)
    evidence = C.inspect_program(C.load_program(ours), list(result.names.values()))
    assert [evidence[result.names[x]].lut_entries for x in ("conv", "fc")] == [16, 4]


def test_steps_coreml_cannot_express_are_noted():
    from compressadvise.backends.export import prepare
    from compressadvise.backends.export_coreml import _usable

    notes: list[str] = []
    usable = _usable(prepare(plan(step("palettization", ["conv"]), step("dkm", ["fc"])), None), 18, notes)
    assert [j.technique for j in usable] == ["palettization"]
    assert any(n.startswith("step 2 (dkm, layers fc) is not in this file: a training-time step") for n in notes)
    assert any("apply builds this plan in torch" in n for n in notes)
    with pytest.raises(Unavailable, match="nothing in this plan can be expressed with coremltools.*DKMPalettizer"):
        export_plan(plan(step("dkm", ["fc"])), "coremltools")


# ------------------------------------------------------------------ torchao
def test_torchao_snippet_rebuilds_apply_weights(applied):
    from compressadvise.examples.digits import trained_model

    result = export_plan(TORCHAO, "torchao")
    assert result.names == {"fc": "fc", "classifier": "classifier"}
    assert any(n.startswith("conv: kept float") and "nn.Linear only" in n for n in result.notes)
    scope: dict = {}
    exec(result.text, scope)  # noqa: S102 - the exporter's own output
    model = scope["compress"](trained_model())
    built = torch.export.load(str(applied["torchao"].torch_artifact)).state_dict
    for name in ("fc.weight", "classifier.weight"):
        mine, theirs = dict(model.named_parameters())[name], built[name]
        assert type(mine) is type(theirs) and type(mine).__name__ != "Parameter"
        for inner in theirs.__tensor_flatten__()[0]:  # integer data, scales, zero points
            assert torch.equal(getattr(mine, inner), getattr(theirs, inner)), (name, inner)
        assert float((mine.dequantize() - theirs.dequantize()).abs().max()) == 0.0


def test_torchao_notes_what_it_cannot_express():
    result = export_plan(MIXED, "torchao")
    notes = " | ".join(result.notes)
    assert "step 2 (palettization, layers conv, stem) is not in this file: torchao has no implementation" in notes
    assert "2:4 (semi-structured)" in notes and "needs CUDA" in notes
    assert "apply builds step 3 (linear_quantization) with coremltools.torch" in notes
    assert "deploys through Core ML" in notes
    with pytest.raises(Unavailable, match="nothing in this plan can be expressed with torchao"):
        export_plan(plan(step("palettization", ["conv", "fc"])), "torchao")


def test_free_text_from_the_plan_stays_in_comments():
    evil = "LAY001\nimport os; os.system('echo pwned')\u2028--- \r\n\"\"\""
    p = plan(Step(technique="int8_weight_only", slot="weights", layers=["fc"],
                  skipped=[Skip(layer="classifier", reason=evil, code="LAY002")]), target="x86-cpu", os=0)
    text = export_plan(p, "torchao").text
    compile(text, "plan_torchao.py", "exec")
    assert not any(line.startswith(("import os", "---", '"""LAY')) for line in text.splitlines()[6:])
    assert comment(evil).count("\n") == 0 and "\u2028" not in comment(evil)


# ------------------------------------------------------------------ CLI
def test_cli_out_force_json_and_errors(tmp_path, capsys):
    plan_file = tmp_path / "plan.yaml"
    save_plan(TORCHAO, plan_file)
    code, out, _ = run_captured(capsys, "export", plan_file, "--to", "torchao")
    assert code == 0 and out.startswith('"""torchao recipe') and "quantize_" in out  # the file itself
    target = tmp_path / "recipe.py"
    code, out, _ = run_captured(capsys, "export", plan_file, "--to", "torchao", "--out", target, "--json")
    data = json.loads(out)
    assert code == 0 and set(data) >= {"to", "path", "text", "notes"} and data["to"] == "torchao"
    assert data["path"] == str(target) and target.read_text() == data["text"]
    assert any("conv" in n for n in data["notes"])
    code, _, err = run_captured(capsys, "export", plan_file, "--to", "torchao", "--out", target)
    assert code == 9 and "--force" in err
    code, out, _ = run_captured(capsys, "export", plan_file, "--to", "torchao", "--out", target, "--force")
    assert code == 0 and "wrote" in out and "not in the file" in out
    assert run_captured(capsys, "export", plan_file, "--to", "tensorrt")[0] == 2
    assert run_captured(capsys, "export", plan_file)[0] == 2  # --to is required
    bad = tmp_path / "bad.yaml"
    bad.write_text(plan_file.read_text().replace("technique: int8_weight_only", "technique: int8_weightonly", 1))
    code, _, err = run_captured(capsys, "export", bad, "--to", "torchao")
    assert code == 6 and "unknown technique" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, _, err = run_captured(capsys, "export", plan_file, "--to", "coremltools", "--model", tmp_path / "none.pt")
    assert code == 3 and "Traceback" not in err


def test_cli_coremltools_json_names_its_calls(tmp_path, capsys):
    plan_file = tmp_path / "plan.yaml"
    save_plan(SINGLE, plan_file)
    code, out, _ = run_captured(capsys, "export", plan_file, "--to", "coremltools", "--json")
    data = json.loads(out)
    assert code == 0 and data["path"] is None and data["text"].startswith("# coremltools OptimizationConfig")
    assert data["calls"] == [{"step": 1, "technique": "palettization", "function": "palettize_weights",
                              "joint_compression": False, "ops": ["p_conv_weight_to_fp16", "p_fc_weight_to_fp16"]}]
    assert run_captured(capsys, "export", plan_file, "--to", "coremltools", "--out", plan_file, "--force")[0] == 9


def test_torchao_source_is_read_back_without_eval():
    """The read-back check walks the generated source's AST: a name it did not import, a private
    attribute or any other expression is refused, never run."""
    import ast

    from compressadvise.backends.export_torchao import _rebuild
    from compressadvise.errors import CompressionFailed

    assert _rebuild(ast.parse("dict(a=[1, -2.5], b=(None,))", mode="eval").body, {"dict": dict}) == \
        {"a": [1, -2.5], "b": (None,)}
    for hostile in ("__import__('os').system('true')", "dict.__class__", "(lambda: 1)()", "x + 1"):
        with pytest.raises(CompressionFailed):
            _rebuild(ast.parse(hostile, mode="eval").body, {"dict": dict, "x": 1})
