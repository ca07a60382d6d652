"""Backends as registered handlers; apply's orchestration through a fake backend.

The fake backend (compressadvise.backends.fake) compresses in plain torch, so these tests run
`apply` end to end (resolve -> preflight -> steps -> save -> read-back -> manifest) in well
under a second each, without coremltools or torchao.
"""
from __future__ import annotations

import copy
import hashlib
import re
import shutil
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from torch import nn

import compressadvise as ca
from compressadvise.backends.apply_gate import PlanNotBuilt
from compressadvise import backends as B
from compressadvise.backends import fake  # noqa: F401  (registers the `fake` backend)
from compressadvise.errors import CompressionFailed, InvalidKnowledge, Unavailable
from compressadvise.knowledge.base import builtin, knowledge_root, load_knowledge
from compressadvise.model.loading import LoadedModel
from compressadvise.knowledge.schema import Plan, PlanModel, PlanTarget, Step

REAL = ("coremltools.torch", "coremltools.coreml", "torchao")


# ------------------------------------------------------------------ helpers
def _loaded(module: nn.Module, name: str) -> LoadedModel:
    """No example input: the torch artefact is a state dict (no torch.export: fast)."""
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode() + v.numpy().tobytes())
    return LoadedModel(source=f"test:{name}", format="factory", sha256=h.hexdigest(), has_graph=True,
                       module=module.eval())


def mlp() -> LoadedModel:
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict([("fc1", nn.Linear(64, 128)), ("act", nn.ReLU()), ("fc2", nn.Linear(128, 64))]))
    return _loaded(m, "mlp")


def embed_mlp() -> LoadedModel:
    torch.manual_seed(0)
    m = nn.Sequential(OrderedDict([("embed", nn.Embedding(512, 64)), ("fc", nn.Linear(64, 64))]))
    return _loaded(m, "embed_mlp")


def plan(*steps: Step, target: str = "fake-cpu") -> Plan:
    return Plan(target=PlanTarget(name=target), model=PlanModel(), steps=list(steps))


def step(technique: str, layers=("fc1", "fc2"), slot: str = "weights", op_name_params=None, **params) -> Step:
    return Step(technique=technique, slot=slot, params=params, layers=list(layers),
                op_name_params=op_name_params or {})


def entry(manifest: dict, name: str) -> list[dict]:
    return next(x for x in manifest["layers"] if x["name"] == name)["steps"]


@B.register_backend
class Lazy:
    """Claims palettization and changes nothing: the read-back must catch it."""

    id = "lazy"
    side = "torch"

    @property
    def techniques(self) -> dict[str, str]:
        return B.implemented(self.id)

    def unavailable(self, job, ctx):
        return None

    def layer_support(self, job, lj, module):
        return None

    def run(self, model, job, ctx):
        return B.run_handler(self.id, model, job, ctx)


@B.handles("lazy", "palettization", api="nothing at all")
def _no_op(model, job, ctx):
    return model


@pytest.fixture(scope="module")
def kb():
    """The built-in knowledge plus two CPU targets deploying through the test backends."""
    k = copy.copy(builtin())
    x86 = k.targets["x86-cpu"]
    k.targets = {**k.targets,
                 "fake-cpu": x86.model_copy(update={"name": "fake-cpu", "backends": ["fake"]}),
                 "lazy-cpu": x86.model_copy(update={"name": "lazy-cpu", "backends": ["lazy"]})}
    return k


@pytest.fixture
def kb_root(tmp_path) -> Path:
    """A writable copy of the knowledge base (techniques, targets, playbooks)."""
    root = tmp_path / "kb"
    for kind in ("techniques", "targets", "playbooks"):
        shutil.copytree(knowledge_root() / kind, root / kind)
    return root


# ------------------------------------------------------------------ the registry
def test_registry_lists_backends_without_importing_a_library():
    code = ("import sys; from compressadvise import backends as B; from compressadvise.knowledge.base import builtin; "
            "builtin(); print(','.join(B.names())); "
            "print([m for m in ('torch', 'coremltools', 'torchao') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].split(",") == list(REAL)
    assert out[1] == "[]"


def test_each_real_backend_satisfies_its_protocol_and_reports_its_handlers():
    for bid in REAL:
        backend = B.get(bid)
        proto = B.TorchBackend if B.REGISTRY[bid].side == "torch" else B.CoremlBackend
        assert isinstance(backend, proto), bid
        assert backend.id == bid and backend.side == B.REGISTRY[bid].side
        assert set(backend.techniques) == set(B.handlers(bid)) and backend.techniques, bid
    assert "palettization" in B.get("coremltools.torch").techniques
    assert "int8_weight_only" in B.get("torchao").techniques
    assert "int8_weight_only" not in B.get("coremltools.coreml").techniques


def test_a_second_handler_for_the_same_technique_is_refused():
    with pytest.raises(ValueError, match="already has a handler for palettization"):
        B.handles("fake", "palettization")(lambda model, job, ctx: model)


def test_a_class_missing_the_protocol_is_not_registered():
    class Broken:
        id = "broken"
        side = "torch"

    with pytest.raises(TypeError, match="Backend protocol"):
        B.register_backend(Broken)
    assert "broken" not in B.names()


def test_a_backend_without_a_handler_for_the_step_is_unavailable():
    job = B.StepJob(index=0, technique="gptq", slot="weights", kind="quantize", params={}, layers=[])
    with pytest.raises(Unavailable, match="fake has no handler for gptq"):
        B.run_handler("fake", None, job, B.Context(target=None, os=0))


# ------------------------------------------------------------------ names in YAML
def _edit(path: Path, old: str, new: str) -> int:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    return text[:text.index(old)].count("\n") + 1


def test_an_unknown_backend_in_a_technique_is_an_error_with_file_and_line(kb_root):
    path = kb_root / "techniques" / "palettization.yaml"
    line = _edit(path, "backend: coremltools.torch", "backend: coremltools.nope")
    with pytest.raises(InvalidKnowledge, match=re.escape(f"{path}:{line}: technique palettization: "
                                                         "unknown backend 'coremltools.nope'")):
        load_knowledge(root=kb_root)


def test_a_registered_backend_can_be_named_in_a_technique(kb_root):
    _edit(kb_root / "techniques" / "palettization.yaml", "backend: coremltools.torch", "backend: fake")
    k = load_knowledge(root=kb_root)
    assert "fake" in [b.backend for b in k.techniques["palettization"].backends]
    assert [b.backend for b in k.techniques["distillation"].backends] == ["guidance"]


def test_an_unknown_backend_in_a_target_is_an_error_with_file_and_line(kb_root):
    path = kb_root / "targets" / "x86-cpu.yaml"
    line = _edit(path, "backends: [torchao]", "backends: [torchaoo]")
    with pytest.raises(InvalidKnowledge, match=re.escape(f"{path}:{line}: target x86-cpu: unknown backend 'torchaoo'")):
        load_knowledge(root=kb_root)


def test_each_appliable_technique_names_the_form_the_read_back_checks():
    forms = {name: t.form for name, t in builtin().techniques.items()}
    assert forms["palettization"] == forms["sensitive_kmeans"] == "palettize"
    assert {forms[t] for t in ("linear_quantization", "gptq", "int8_weight_only", "int8_dynamic",
                               "intx_weight_only", "int4_weight_only", "float8")} == {"quantize"}
    assert {forms[t] for t in ("pruning", "sparsegpt", "semi_sparse")} == {"prune"}
    assert (forms["joint_compression"], forms["joint_sparse_quantization"]) == ("sparse_palettize", "sparse_quantize")
    assert forms["activation_quantization"] == "activations"
    assert (forms["dkm"], forms["qat"], forms["gradual_pruning"]) == ("palettize", "quantize", "prune")  # trained
    assert forms["distillation"] is None  # guidance only
    assert all(t.form for t in builtin().techniques.values() if not t.guidance_only)


# ------------------------------------------------------------------ apply through the fake backend
def test_apply_runs_the_whole_orchestration_through_the_fake_backend(tmp_path, kb):
    p = plan(step("palettization", nbits=4, op_name_params={"fc2": {"nbits": 2}}))
    result = ca.apply(mlp(), p, tmp_path / "out", knowledge=kb)
    m = result.manifest
    assert m["backends_used"] == ["fake"]
    assert m["steps"][0]["torch_backend"] == "fake"
    assert m["steps"][0]["layers_applied"] == ["fc1", "fc2"]
    assert m["torch_format"] == "state_dict" and m["mlpackage"] is None
    fc1, fc2 = entry(m, "fc1")[0], entry(m, "fc2")[0]
    assert fc1["params"]["nbits"] == 4 and fc2["params"]["nbits"] == 2  # resolved per layer
    assert fc1["torch"]["status"] == "applied" and "<= 16 for 4 bits" in fc1["torch"]["evidence"]
    assert "<= 4 for 2 bits" in fc2["torch"]["evidence"]  # the read-back checked each layer's own nbits
    assert m["sizes"]["applied_estimate_bytes"]["value"] > 0
    assert (result.out_dir / "plan.yaml").is_file() and (result.out_dir / "manifest.json").is_file()
    state = torch.load(result.torch_artifact, weights_only=True)
    assert state["fc2.weight"].unique().numel() <= 4


def test_pruning_then_palettization_keep_the_zeros(tmp_path, kb):
    p = plan(step("pruning", slot="sparsity", sparsity=0.5), step("palettization", nbits=4))
    m = ca.apply(mlp(), p, tmp_path / "out", knowledge=kb).manifest
    first, second = entry(m, "fc1")
    assert first["technique"] == "pruning" and "sparsity 50.0%" in first["torch"]["evidence"]
    assert second["technique"] == "palettization" and "besides the pruned zeros" in second["torch"]["evidence"]


def test_a_layer_the_backend_turns_down_is_a_reported_skip_and_left_out_of_the_estimate(tmp_path, kb):
    with pytest.raises(PlanNotBuilt) as e:  # planned but not built: the gate refuses it
        ca.apply(embed_mlp(), plan(step("palettization", layers=["embed", "fc"], nbits=4)), tmp_path / "a",
                 knowledge=kb)
    [row] = e.value.gate["rows"]
    assert row["layer"] == "embed" and "fake backend handles nn.Linear weights only" in row["reason"]
    both = ca.apply(embed_mlp(), plan(step("palettization", layers=["embed", "fc"], nbits=4)), tmp_path / "a",
                    knowledge=kb, allow_partial=True).manifest
    [skip] = [e["torch"] for e in entry(both, "embed")]
    assert skip["status"] == "skipped" and "fake backend handles nn.Linear weights only" in skip["reason"]
    only_fc = ca.apply(embed_mlp(), plan(step("palettization", layers=["fc"], nbits=4)), tmp_path / "b",
                       knowledge=kb).manifest
    built = both["sizes"]["applied_estimate_bytes"]["value"]
    assert built == only_fc["sizes"]["applied_estimate_bytes"]["value"]  # built, not planned: embed stays fp


def test_a_step_the_backend_runs_but_does_not_compress_is_caught_and_nothing_is_written(tmp_path, kb):
    out = tmp_path / "out"
    with pytest.raises(CompressionFailed, match="read-back: compression did not happen for fc1"):
        ca.apply(mlp(), plan(step("palettization", nbits=2), target="lazy-cpu"), out, knowledge=kb)
    assert not out.exists()


def test_an_unavailable_step_is_refused_before_any_work(tmp_path, kb):
    out = tmp_path / "out"
    with pytest.raises(Unavailable, match="prunes unstructured only"):
        ca.apply(mlp(), plan(step("pruning", slot="sparsity", pattern="n_m")), out, knowledge=kb)
    assert not out.exists()


def test_a_technique_no_target_backend_implements_is_refused(tmp_path, kb):
    with pytest.raises(Unavailable, match="no backend for fake-cpu implements gptq"):
        ca.apply(mlp(), plan(step("gptq")), tmp_path / "out", knowledge=kb)


def test_a_backend_never_invents_a_default_parameter():
    """Handlers read resolved settings (technique defaults from the YAML, via Step.setting_for);
    an unresolved dict is an error naming the parameter, not a silent default of its own (the
    backends once defaulted nbits to 4 in one place and 8 in another)."""
    from compressadvise.backends import need
    from compressadvise.backends.coremltools_torch import _palettizer_options, _quantizer_options
    from compressadvise.errors import CompressionFailed
    from compressadvise.knowledge.base import builtin
    from compressadvise.plan.setting import Setting

    k = builtin()
    with pytest.raises(CompressionFailed, match="'nbits' missing"):
        _palettizer_options({"granularity": "per_tensor"})
    with pytest.raises(CompressionFailed, match="'block_size' missing"):
        _quantizer_options({"nbits": 4, "granularity": "per_block"})
    resolved = Setting.resolve(k.techniques["linear_quantization"], {"nbits": 4, "granularity": "per_block"})
    assert _quantizer_options(resolved.all_params)["block_size"] == need(resolved.all_params, "block_size") == 32
    assert _palettizer_options(Setting.resolve(k.techniques["palettization"], {}).all_params)["n_bits"] == 8
