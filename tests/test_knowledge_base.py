"""The built-in knowledge base: it loads, it is complete, and what it names exists."""
from __future__ import annotations

import importlib
import re
import shutil
from pathlib import Path

import pytest

from compressadvise.errors import InvalidKnowledge
from compressadvise.knowledge.base import knowledge_root, load_knowledge

ROOT = knowledge_root()
REQUIRED_TECHNIQUES = {
    "palettization", "linear_quantization", "activation_quantization", "pruning",
    "joint_compression", "joint_sparse_quantization", "sensitive_kmeans", "gptq", "sparsegpt",
    "int8_weight_only", "int8_dynamic", "intx_weight_only", "int4_weight_only", "float8",
    "semi_sparse", "qat", "dkm", "distillation",
}
REQUIRED_TARGETS = {"ane-a17", "ane-a14", "mac-gpu", "apple-cpu", "x86-cpu", "nvidia-gpu"}
SOURCES = Path("/work/shared/knowledge/sources.md")


@pytest.fixture(scope="module")
def kb():
    return load_knowledge()


def test_loads_and_counts(kb):
    assert len(kb.rules) >= 40
    assert len(kb.playbooks) >= 6
    assert REQUIRED_TECHNIQUES <= set(kb.techniques)
    assert REQUIRED_TARGETS <= set(kb.targets)
    assert kb.techniques["distillation"].guidance_only
    assert {kb.techniques[t].data for t in ("qat", "dkm", "gradual_pruning")} == {"training"}  # apply runs them


@pytest.mark.parametrize("kind", ["techniques", "targets", "playbooks"])
def test_every_yaml_file_passes_the_validator_alone(kind, tmp_path):
    """Each file loads on its own (playbooks next to the techniques and targets they name)."""
    files = sorted((ROOT / kind).glob("*.yaml"))
    assert files
    for f in files:
        root = tmp_path / f.stem
        for k in ("techniques", "targets", "playbooks"):
            (root / k).mkdir(parents=True)
        if kind == "playbooks":
            for k in ("techniques", "targets"):
                for g in (ROOT / k).glob("*.yaml"):
                    shutil.copy(g, root / k / g.name)
        shutil.copy(f, root / kind / f.name)
        k = load_knowledge(root=root)
        loaded = {"techniques": k.techniques, "targets": k.targets, "playbooks": k.playbooks}[kind]
        assert len(loaded) == 1, f.name
        if kind == "playbooks":
            assert len(k.rules) >= 4, f"{f.name}: a playbook should carry several rules"


def test_validator_rejects_a_broken_copy(tmp_path):
    """The validator is live: a typo in a copied playbook is reported with file and line."""
    root = tmp_path / "kb"
    for k in ("techniques", "targets", "playbooks"):
        shutil.copytree(ROOT / k, root / k)
    pb = root / "playbooks" / "weights.yaml"
    pb.write_text(pb.read_text().replace("model.max_kurtosis > threshold.heavy_kurtosis",
                                      "model.max_kurtossis > threshold.heavy_kurtosis"))
    with pytest.raises(InvalidKnowledge, match=r"weights\.yaml:\d+: rule WGT004: unknown fact 'model\.max_kurtossis'"):
        load_knowledge(root=root)


def _resolve(dotted: str):
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def test_backend_config_names_exist_in_installed_libraries(kb):
    checked = 0
    for tech in kb.techniques.values():
        for impl in tech.backends:
            if impl.backend == "guidance":
                continue
            for name in (p.strip() for p in impl.config.split("+")):
                assert re.fullmatch(r"[A-Za-z_][\w.]*", name), f"{tech.name}: {name!r} is not a dotted name"
                prefix = {"torchao": "torchao.", "coremltools.coreml": "coremltools.optimize.coreml",
                          "coremltools.torch": "coremltools.optimize.torch"}[impl.backend]
                assert name.startswith(prefix), f"{tech.name}: {name} is not under {prefix}"
                assert callable(_resolve(name)), f"{tech.name}: {name}"
                checked += 1
    assert checked >= 25


def test_target_figures_have_sources_and_latency_inputs(kb):
    for t in kb.targets.values():
        assert t.figures, t.name
        for name, fig in t.figures.items():
            assert fig.source.strip() and fig.value > 0 and fig.unit, f"{t.name}.{name}"
        assert "memory_bandwidth_gbs" in t.figures and "peak_fp16_tops" in t.figures, t.name


def test_modes_are_consistent_between_techniques_targets_and_rules(kb):
    target_modes = {m.mode for t in kb.targets.values() for m in t.modes if not m.runtime}  # runtime: no technique
    needed = {r.mode for t in kb.techniques.values() for r in t.requires}
    assert needed <= target_modes, f"modes no target describes: {needed - target_modes}"
    assert target_modes <= needed, f"target modes no technique needs: {target_modes - needed}"
    for cr in kb.rules.values():  # a mode named in a condition must exist (typos never match)
        for mode in re.findall(r'"(\w+)" in target\.(?:supports|accelerates)', cr.rule.when):
            assert mode in target_modes, f"{cr.code}: unknown mode {mode!r}"


def test_apple_os_levels_match_the_availability_table(kb):
    """iOS 16: per-tensor LUTs, int8, sparsity; iOS 17: W8A8; iOS 18: grouped/3-bit/int8 LUTs,
    int4, per-block, joint compression (coremltools 'What's New')."""
    for name in ("ane-a17", "ane-a14", "mac-gpu", "apple-cpu"):
        t = kb.targets[name]
        assert {"palettize", "linear_int8", "sparse"} <= set(t.supports(16))
        assert "w8a8" not in t.supports(16) and "w8a8" in t.supports(17)
        later = {"palettize_grouped", "palettize_3bit", "palettize_int8_lut", "linear_int4",
                 "linear_per_block", "joint_compression"}
        assert not later & set(t.supports(17)) and later <= set(t.supports(18))
    assert "w8a8" in kb.targets["ane-a17"].accelerates(17)
    assert "w8a8" not in kb.targets["mac-gpu"].accelerates(18)
    assert "linear_per_block" in kb.targets["mac-gpu"].accelerates(18)
    assert "linear_per_block" not in kb.targets["ane-a17"].accelerates(18)
    assert "sparse_nm" in kb.targets["apple-cpu"].accelerates(18)
    assert not {"cuda_int4", "cuda_float8", "cuda_semi_sparse"} & set(kb.targets["x86-cpu"].supports(0))


def test_rules_are_documented(kb):
    known_sources = {"coremltools optimization guide", "Apple coreai-models compression sweeps",
                     "Model Compression in Practice (Hohman et al., CHI 2024)",
                     "Talaria (Hohman et al., CHI 2024)", "Compress and Compare (Boggust et al., VIS 2024)",
                     "measured on the host (torchao 0.18.0, torch 2.13 CPU)", "torchao documentation",
                     "NVIDIA H100 Tensor Core GPU datasheet", "hollance/neural-engine"}
    prefixes: dict[str, str] = {}
    for cr in kb.rules.values():
        r = cr.rule
        assert "\n" not in r.why.strip() and len(r.why) <= 160, f"{r.code}: why must be one line"
        assert len(r.rationale.split()) >= 20 and r.example, f"{r.code}: rationale and example"
        assert all(c.source in known_sources for c in r.citation), f"{r.code}: unknown source"
        assert all(c.ref for c in r.citation), f"{r.code}: citations need a ref"
        if r.action.kind == "advise":
            assert r.action.message and len(r.action.message) > 40
        prefix = re.match(r"[A-Z]+", r.code).group(0)
        assert prefixes.setdefault(prefix, cr.playbook) == cr.playbook, f"{prefix} spans playbooks"


@pytest.mark.skipif(not SOURCES.exists(), reason="shared source notes not available")
def test_cited_figures_appear_in_the_source_notes(kb):
    """Spot-check that headline numbers quoted in rules are the ones in the source notes."""
    notes = SOURCES.read_text()
    for figure in ("76.09", "75.55", "66.81", "23.09", "72.26", "0.77 ms", "16.51", "17.41",
                   "18,763", "14.8 ms", "70.60", "68.81", "5.92x", "73.4%"):
        assert figure in notes
        assert any(figure in (cr.rule.rationale + (cr.rule.action.message or "") + cr.rule.why)
                   for cr in kb.rules.values()), figure
