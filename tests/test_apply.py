"""`apply`: plans carried out through coremltools and torchao, read back and checked.

Every model is built here with fixed seeds; nothing is downloaded. Core ML artefacts are
checked by re-opening the saved .mlpackage (spec + weights, no prediction: macOS-only).
"""
from __future__ import annotations

import hashlib
import json
import signal
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import compressadvise as ca
from compressadvise.backends.apply import check_tensor, load_artifact
from compressadvise.errors import (BadModel, CompressionFailed, InvalidKnowledge, OutputExists,
                                   Unavailable)
from compressadvise.model.loading import LoadedModel
from compressadvise.knowledge.schema import Plan, PlanModel, PlanTarget, Step

SMALL = ["fc1", "fc2"]


def _loaded(module: nn.Module, example: tuple, name: str) -> LoadedModel:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode() + v.numpy().tobytes())
    return LoadedModel(source=f"test:{name}", format="factory", sha256=h.hexdigest(), has_graph=True,
                       module=module.eval(), example_inputs=example)


def small_mlp() -> LoadedModel:
    """64 -> 128 -> 64 -> 10: two layers above coremltools' 2048-element threshold."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict([("fc1", nn.Linear(64, 128)), ("act1", nn.ReLU()),
                                   ("fc2", nn.Linear(128, 64)), ("act2", nn.ReLU()), ("head", nn.Linear(64, 10))]))
    return _loaded(m, (torch.randn(1, 64),), "small_mlp")


def big_mlp() -> LoadedModel:
    """~330K parameters: container overhead is small next to the weights (size check)."""
    torch.manual_seed(1)
    m = nn.Sequential(OrderedDict([("fc1", nn.Linear(256, 512)), ("act1", nn.ReLU()),
                                   ("fc2", nn.Linear(512, 384)), ("act2", nn.ReLU()), ("head", nn.Linear(384, 10))]))
    return _loaded(m, (torch.randn(1, 256),), "big_mlp")


def plan(*steps: Step, target: str = "ane-a17", os: int = 18, sha: str | None = None) -> Plan:
    return Plan(target=PlanTarget(name=target, os=os), model=PlanModel(sha256=sha), steps=list(steps))


def step(technique: str, slot: str = "weights", layers=SMALL, **params) -> Step:
    return Step(technique=technique, slot=slot, params=params, layers=list(layers))


def layer(manifest: dict, name: str) -> dict:
    return next(x for x in manifest["layers"] if x["name"] == name)


def evidence(manifest: dict, name: str, side: str) -> str:
    return " ".join(e.get(side, {}).get("evidence") or "" for e in layer(manifest, name)["steps"])


@pytest.fixture(scope="module")
def samples_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("samples") / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, inputs=rng.standard_normal((48, 64)).astype("float32"),
             labels=rng.integers(0, 10, 48))
    return path


# ------------------------------------------------------------------ the bundled example
@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    from compressadvise.examples import digits

    model = ca.load_model(None)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    recommended = ca.recommend(model, target="ane-a17")
    out = tmp_path_factory.mktemp("bundled") / "out"
    result = ca.apply(model, recommended, out)
    return model, before, result, digits


def test_bundled_plan_gives_both_artefacts_and_a_manifest(bundled):
    model, before, result, _ = bundled
    m = json.loads((result.out_dir / "manifest.json").read_text())
    assert m["torch_artifact"] == "model.pt2" and (result.out_dir / "model.pt2").is_file()
    assert m["mlpackage"] == "model.mlpackage" and (result.out_dir / "model.mlpackage" / "Manifest.json").is_file()
    assert (result.out_dir / m["plan"]).is_file()
    assert m["input_sha256"] == model.sha256
    assert {"torch", "coremltools", "torchao", "numpy"} <= set(m["versions"])
    applied = [x for x in m["layers"] if x["status"] == "applied"]
    assert applied, "the recommended plan compressed nothing"
    for x in applied:  # each applied layer carries read-back evidence from both sides
        assert "distinct values" in evidence(m, x["name"], "torch")
        assert "constexpr_lut_to_dense" in evidence(m, x["name"], "coreml")
    skipped = [x for x in m["layers"] if x["status"] == "skipped"]
    assert all(e.get("reason") for x in skipped for e in x["steps"])
    assert m["coreml"]["op_counts"]["constexpr_lut_to_dense"] == len(applied)
    assert m["sizes"]["weight_file_bytes"]["label"] == "measured"
    assert m["sizes"]["plan_estimate_bytes"]["label"] == "estimate"
    # the input model is never modified
    after = model.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bundled_artefact_loads_and_keeps_accuracy(bundled):
    model, _, result, digits = bundled
    x, y = digits.samples()
    loaded = load_artifact(result.out_dir)
    with torch.no_grad():
        ref = (model.module(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
        got = (loaded.runnable()(torch.from_numpy(x)).argmax(1).numpy() == y).mean()
    assert got >= ref - 0.02, f"8-bit palettization lost {ref - got:.3f} top-1 (measured)"
    # the weights in the artefact really are palettized: <= 256 distinct values per tensor
    ep = torch.export.load(str(result.torch_artifact))
    assert ep.state_dict["conv.weight"].unique().numel() <= 256 < model.module.conv.weight.unique().numel()


# ------------------------------------------------------------------ technique x backend
def test_palettization_per_layer_overrides_on_both_sides(tmp_path):
    """Per-type overrides beat the step's parameters; per-name overrides beat both."""
    p = plan(Step(technique="palettization", slot="weights", layers=SMALL,
                  params={"nbits": 4, "granularity": "per_grouped_channel", "group_size": 16},
                  op_type_params={"linear": {"nbits": 6}}, op_name_params={"fc2": {"nbits": 2}}))
    m = ca.apply(small_mlp(), p, tmp_path / "o").manifest
    assert "LUT 64 entries" in evidence(m, "fc1", "coreml") and "LUT 4 entries" in evidence(m, "fc2", "coreml")
    assert "<= 4 for 2 bits" in evidence(m, "fc2", "torch") and "8 group(s)" in evidence(m, "fc1", "torch")
    assert "<= 64 for 6 bits" in evidence(m, "fc1", "torch")
    assert layer(m, "head")["status"].startswith("unchanged")


def test_linear_quantization_override_changes_storage_type(tmp_path):
    p = plan(Step(technique="linear_quantization", slot="weights", layers=SMALL, params={"nbits": 8},
                  op_name_params={"fc2": {"nbits": 4, "granularity": "per_block", "block_size": 32, "mode": "linear"}}))
    m = ca.apply(small_mlp(), p, tmp_path / "o").manifest
    assert "stored as int8" in evidence(m, "fc1", "coreml")
    assert "stored as int4" in evidence(m, "fc2", "coreml")
    assert "<= 16 for 4 bits" in evidence(m, "fc2", "torch") and "<= 256 for 8 bits" in evidence(m, "fc1", "torch")


def test_pruning_n_m_and_joint_forms(tmp_path):
    m = ca.apply(small_mlp(), plan(step("pruning", "sparsity", pattern="n_m", n=2, m=4)), tmp_path / "a").manifest
    assert "sparsity 50.0%" in evidence(m, "fc1", "coreml") and "sparsity 50.0%" in evidence(m, "fc1", "torch")
    m = ca.apply(small_mlp(), plan(step("joint_compression", sparsity=0.5, nbits=4, granularity="per_tensor")),
                 tmp_path / "b").manifest
    assert "constexpr_lut_to_sparse" in evidence(m, "fc2", "coreml")
    assert "besides the pruned zeros" in evidence(m, "fc2", "torch")
    m = ca.apply(small_mlp(), plan(step("joint_sparse_quantization", sparsity=0.5, nbits=8)), tmp_path / "c").manifest
    assert "constexpr_sparse_blockwise_shift_scale" in evidence(m, "fc1", "coreml")


def test_calibrated_techniques_go_through_the_torch_side(tmp_path, samples_file):
    for tech, slot, params, op in (("sensitive_kmeans", "weights", {"nbits": 4, "calibration_samples": 16}, "lut"),
                                   ("gptq", "weights", {"nbits": 4, "calibration_samples": 16}, "uint4"),
                                   ("sparsegpt", "sparsity", {"sparsity": 0.5, "calibration_samples": 16}, "sparse")):
        m = ca.apply(small_mlp(), plan(step(tech, slot, **params)), tmp_path / tech, samples=samples_file).manifest
        assert m["steps"][0]["torch_backend"] == "coremltools.torch"
        assert m["steps"][0]["coreml_backend"].startswith("ct.convert")
        assert op in evidence(m, "fc1", "coreml"), (tech, evidence(m, "fc1", "coreml"))


def test_calibrated_technique_without_samples_is_refused(tmp_path):
    with pytest.raises(InvalidKnowledge, match="needs calibration data"):
        ca.apply(small_mlp(), plan(step("sensitive_kmeans")), tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("technique,params", [("int8_weight_only", {}), ("int8_dynamic", {}),
                                              ("intx_weight_only", {"nbits": 4})])
def test_torchao_configs_on_cpu(tmp_path, technique, params):
    model = small_mlp()
    result = ca.apply(model, plan(step(technique, **params), target="x86-cpu", os=0), tmp_path / "o")
    m = result.manifest
    assert m["mlpackage"] is None and m["steps"][0]["torch_backend"] == "torchao"
    assert "torch.int8 storage" in evidence(m, "fc1", "torch")
    x = torch.randn(4, 64)
    with torch.no_grad():
        ref, got = model.module(x), load_artifact(result.out_dir).runnable()(x)
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


@pytest.mark.skipif(torch.cuda.is_available(), reason="refusal is for machines without CUDA")
@pytest.mark.parametrize("technique", ["int4_weight_only", "float8", "semi_sparse"])
def test_gpu_only_configs_are_refused_before_any_work(tmp_path, technique):
    slot = "sparsity" if technique == "semi_sparse" else "weights"
    with pytest.raises(Unavailable, match="CUDA"):
        ca.apply(small_mlp(), plan(step(technique, slot), target="x86-cpu", os=0), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_w8a8_from_the_torch_side_ships_quantized_activations(tmp_path, samples_file):
    """Core ML's own activation calibration needs macOS; LinearQuantizer's observers run here, and
    the .mlpackage read back has int8 weights and a quantize/dequantize pair before each layer."""
    with pytest.raises(InvalidKnowledge, match="needs calibration data"):
        ca.apply(small_mlp(), plan(step("activation_quantization", "activations")), tmp_path / "none")
    model = small_mlp()
    result = ca.apply(model, plan(step("activation_quantization", "activations", calibration_samples=16), os=17),
                      tmp_path / "o", samples=samples_file)
    m = result.manifest
    assert m["steps"][0]["torch_backend"] == "coremltools.torch"
    for name in SMALL:
        assert "input through quantize" in evidence(m, name, "coreml") and "int8" in evidence(m, name, "coreml")
        assert "input quantized to uint8" in evidence(m, name, "torch")
    assert m["coreml"]["op_counts"].get("constexpr_affine_dequantize", 0) + \
        m["coreml"]["op_counts"].get("constexpr_blockwise_shift_scale", 0) >= 2
    x = torch.randn(8, 64)
    with torch.no_grad():
        ref, got = model.module(x), load_artifact(result.out_dir).runnable()(x)
    assert not torch.equal(ref, got) and (got - ref).abs().max() < 0.1 * ref.abs().max()  # quantized, close


# ------------------------------------------------------------------ measured size vs estimate
@pytest.mark.parametrize("steps", [
    [step("palettization", layers=SMALL, nbits=4)],
    # two steps (joint sparse + palettized); fc2 has 196,608 elements, past the fp16 percentile
    # overflow that makes coremltools' own magnitude pruner prune nothing
    [step("pruning", "sparsity", sparsity=0.5), step("palettization", nbits=4)],
], ids=["palettize-4bit", "prune-then-palettize"])
def test_measured_weight_file_within_2pct_of_estimate(tmp_path, steps):
    m = ca.apply(big_mlp(), plan(*steps), tmp_path / "o").manifest
    sizes = m["sizes"]
    measured = sizes["weight_file_bytes"]["value"]
    estimate = sizes["weight_file_estimate_bytes"]["value"]
    assert sizes["weight_file_bytes"]["label"] == "measured" and sizes["weight_file_estimate_bytes"]["label"] == "estimate"
    assert abs(measured - estimate) / measured <= 0.02, sizes
    assert measured < 0.3 * big_params() * 2  # really compressed vs fp16
    if len(steps) == 2:
        assert "sparsity 50.0%" in evidence(m, "fc2", "coreml")


def big_params() -> int:
    return sum(p.numel() for p in big_mlp().module.parameters())


# ------------------------------------------------------------------ malformed plans
@pytest.mark.parametrize("bad,match", [
    (step("palettise"), "unknown technique 'palettise'"),
    (step("palettization", layers=["fc1", "fc3"]), "layer 'fc3' does not exist"),
    (step("palettization", nbits=5), "not in"),
    (step("palettization", nbitz=4), "has no parameter 'nbitz'"),
    (step("pruning", "weights"), "does not match the technique's slot"),
    (step("distillation", "none"), "guidance only"),
    (step("palettization", layers=[]), "lists no layers"),
])
def test_malformed_plans_give_clear_errors(tmp_path, bad, match):
    with pytest.raises(InvalidKnowledge, match=match):
        ca.apply(small_mlp(), plan(bad), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_unknown_layer_suggests_close_names(tmp_path):
    with pytest.raises(InvalidKnowledge) as e:
        ca.apply(small_mlp(), plan(step("palettization", layers=["fc_1"])), tmp_path / "o")
    assert "fc1" in e.value.one_line()


def test_plan_for_another_model_is_refused(tmp_path):
    with pytest.raises(InvalidKnowledge, match="another model"):
        ca.apply(small_mlp(), plan(step("palettization"), sha="0" * 64), tmp_path / "o")


def test_divisibility_pitfall_is_caught_before_work(tmp_path):
    with pytest.raises(CompressionFailed, match="not divisible by group_size 48") as e:
        ca.apply(small_mlp(), plan(step("palettization", nbits=4, granularity="per_grouped_channel", group_size=48)),
                 tmp_path / "o")
    assert e.value.exit_code == 8 and not (tmp_path / "o").exists()


def test_weights_only_input_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in small_mlp().module.state_dict().items()}, str(path))
    with pytest.raises(BadModel, match="weights only"):
        ca.apply(str(path), plan(step("palettization")), tmp_path / "o")


# ------------------------------------------------------------------ honesty checks
def test_silent_no_op_is_caught_by_core_ml_read_back(tmp_path):
    """An uncompressed program where compression was claimed must fail, not ship."""
    from compressadvise import backends as B
    from compressadvise.backends.apply import _check_coreml
    from compressadvise.backends import coremltools_coreml as C

    model = small_mlp()
    mlmodel, _ = C.convert(model.module, model.example_inputs, 18)
    lj = B.LayerJob(name="fc1", module="fc1", param="weight", tensor="fc1.weight", shape=[128, 64], params={"nbits": 4})
    assert not C.map_layers(mlmodel, [lj], {})
    C.save(mlmodel, tmp_path / "m.mlpackage")
    job = B.StepJob(index=0, technique="palettization", slot="weights", kind="palettize", params={}, layers=[lj])
    outcome = {(0, "fc1", "coreml"): {"status": "applied", "const": lj.const}}
    with pytest.raises(CompressionFailed, match="stayed dense"):
        _check_coreml(tmp_path / "m.mlpackage", [job], outcome, "test")


def test_torch_read_back_rejects_uncompressed_weights():
    w = torch.randn(32, 64)
    assert not check_tensor(w, "palettize", {"nbits": 4})[0]
    assert not check_tensor(w, "prune", {"sparsity": 0.5})[0]
    q = torch.round(w * 7 / w.abs().amax(1, keepdim=True))  # a real 4-bit per-channel grid
    assert check_tensor(q, "quantize", {"nbits": 4, "granularity": "per_channel"})[0]


def test_a_step_every_backend_turns_down_is_refused(tmp_path):
    """torchao quantizes nn.Linear only: a step listing only an Embedding compresses nothing."""
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict([("embed", nn.Embedding(512, 32)), ("fc", nn.Linear(32, 8))]))
    model = _loaded(m, (torch.randint(0, 512, (1, 4)),), "embed")
    with pytest.raises(CompressionFailed, match="compressed none of its 1 layer"):
        ca.apply(model, plan(step("int8_weight_only", layers=["embed"]), target="x86-cpu", os=0), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force_and_interrupts_leave_nothing(tmp_path, monkeypatch):
    out = tmp_path / "o"
    p = plan(step("pruning", "sparsity", sparsity=0.5))
    ca.apply(small_mlp(), p, out)
    with pytest.raises(OutputExists):
        ca.apply(small_mlp(), p, out)
    first = json.loads((out / "manifest.json").read_text())

    import compressadvise.backends.apply as A

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "_coreml_side", boom)
    with pytest.raises(KeyboardInterrupt):
        ca.apply(small_mlp(), p, out, force=True)
    assert json.loads((out / "manifest.json").read_text()) == first  # the old output is intact
    assert [x.name for x in tmp_path.iterdir()] == ["o"]  # no half-written temp folder left


def test_exported_program_input_is_compressed_on_the_core_ml_side(tmp_path):
    # No eager code: Core ML compresses; the torch artefact is the program carrying the .mlpackage's
    # weights (decompressed), so verify runs what ships.
    model = small_mlp()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model.module, model.example_inputs), str(path))
    m = ca.apply(str(path), plan(step("palettization", nbits=4)), tmp_path / "o").manifest
    assert m["torch_artifact"] == "model.pt2" and m["mlpackage"] == "model.mlpackage"
    assert "constexpr_lut_to_dense" in evidence(m, "fc1", "coreml")
    assert "no torch-side compression (no eager code)" in m["torch_note"]
    w = dict(load_artifact(tmp_path / "o").tensors())["fc1.weight"]
    assert len(torch.unique(w)) <= 16


def test_state_dict_fallback_rebuilds_from_the_factory(tmp_path, monkeypatch):
    """No example input to export with: a state dict + the factory recipe, reloadable."""
    import compressadvise.backends.apply as A

    model = ca.load_model(None)
    monkeypatch.setattr(A, "_example_inputs", lambda *a: None)
    result = ca.apply(model, plan(step("int8_weight_only", layers=["fc"]), target="x86-cpu", os=0), tmp_path / "o")
    assert result.manifest["torch_format"] == "state_dict"
    rebuilt = load_artifact(result.out_dir).runnable()
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), model.module(x), atol=0.2)
    assert type(rebuilt.fc.weight).__name__ == "Int8Tensor"


# ------------------------------------------------------------------ CLI
def run_cli(*args: str) -> int:
    from compressadvise.ui.cli import main

    handler = signal.getsignal(signal.SIGINT)
    try:
        main(list(args))
        return 0
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        signal.signal(signal.SIGINT, handler)


def test_cli_apply_bundled_json_exit_codes(tmp_path, capsys):
    from compressadvise.plan.planfile import save_plan

    plan_file = tmp_path / "plan.yaml"  # a quick hand-written plan: the recommended one is tested above
    save_plan(plan(step("linear_quantization", layers=["conv", "fc"])), plan_file)
    out = tmp_path / "out"
    assert run_cli("apply", "--plan", str(plan_file), "--out", str(out), "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mlpackage"].endswith("model.mlpackage") and data["manifest"]["torch_artifact"] == "model.pt2"
    assert run_cli("apply", "--plan", str(plan_file), "--out", str(out)) == 9
    assert "--force" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(plan_file.read_text().replace("technique: linear_quantization", "technique: palettise", 1))
    assert run_cli("apply", "--plan", str(bad), "--out", str(tmp_path / "o2")) == 6
    assert "unknown technique" in capsys.readouterr().err
