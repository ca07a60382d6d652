"""Memory-bounded apply (issue 19): a small OpenELM-shaped decoder (benchmarks/llm_scale.py, ~3.7M
parameters, fp16 weights memory-mapped from a safetensors file) through the layer-by-layer path
builds the same artefact as the all-in-memory path, reports its peak RSS, and leaves the input alone.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

import compressadvise as ca
from compressadvise.backends import apply as apply_mod
from compressadvise.backends import coremltools_coreml as C
from compressadvise.knowledge.schema import Plan, PlanTarget, Step
from compressadvise.model.loading import load_model

ROOT = Path(__file__).resolve().parent.parent
SPEC = "benchmarks.llm_scale:openelm_tiny"
INT4 = {"nbits": 4, "granularity": "per_block", "block_size": 32, "mode": "linear"}


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory):
    """The tiny decoder's fp16 weights written once; the factory reads them from $LLM_SCALE_CACHE."""
    cache = tmp_path_factory.mktemp("llm_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_SCALE_CACHE", str(cache))
        mp.syspath_prepend(str(ROOT))
        mp.chdir(ROOT)
        from benchmarks import llm_scale

        path = llm_scale.weights_path("tiny")
        llm_scale.write_weights(llm_scale.SIZES["tiny"], path)
        yield llm_scale, path


def _plan(module: torch.nn.Module) -> Plan:
    layers = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)] + ["token_embeddings"]
    return Plan(target=PlanTarget(name="mac-gpu", os=18),
                steps=[Step(technique="linear_quantization", slot="weights", params=INT4, layers=layers)])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pt2_state(out: Path) -> dict[str, torch.Tensor]:
    ep = torch.export.load(str(out / "model.pt2"))
    return {k: v for k, v in ep.state_dict.items()}


def _coreml_weights(out: Path) -> dict[str, list]:
    """Every constexpr op's stored arrays (quantized data, scales, offsets), by op name."""
    prog = C.load_program(out / "model.mlpackage")
    found = {}
    for op in C._ops(prog):
        if op.op_type.startswith("constexpr_"):
            found[op.name] = [v.val for v in op.inputs.values() if getattr(v, "val", None) is not None]
    return found


@pytest.fixture(scope="module")
def both(decoder, tmp_path_factory: pytest.TempPathFactory):
    """The same plan through both paths: bounded (apply loads the factory itself: in place) and
    all in memory (the path every plan took before)."""
    llm_scale, path = decoder
    before = _sha(path)
    plan = _plan(llm_scale.openelm_tiny()[0])
    base = tmp_path_factory.mktemp("apply")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)
        mp.setattr(sys, "path", [str(ROOT), *sys.path])
        bounded = ca.apply(SPEC, plan, base / "bounded")
        mp.setattr(apply_mod, "BOUNDED", False)
        in_memory = ca.apply(SPEC, plan, base / "in_memory")
    return bounded, in_memory, path, before, plan


def test_bounded_builds_the_all_in_memory_artefact(both) -> None:
    bounded, in_memory, *_ = both
    mb, mm = bounded.manifest, in_memory.manifest
    assert mb["resources"]["path"].startswith("memory-bounded")
    assert mm["resources"]["path"].startswith("all in memory")
    # the .mlpackage: identical weight files and the same compressed arrays op by op
    assert _sha(bounded.mlpackage / "Data/com.apple.CoreML/weights/weight.bin") == \
        _sha(in_memory.mlpackage / "Data/com.apple.CoreML/weights/weight.bin")
    wb, wm = _coreml_weights(bounded.out_dir), _coreml_weights(in_memory.out_dir)
    assert wb.keys() == wm.keys() and len(wb) >= 17
    for name in wb:
        for a, b in zip(wb[name], wm[name]):
            assert (a == b).all(), name
    # the .pt2: the same tensors (the .mlpackage's weights, decompressed), in the input's fp16
    sb, sm = _pt2_state(bounded.out_dir), _pt2_state(in_memory.out_dir)
    assert sb.keys() == sm.keys()
    for name in sb:
        torch.testing.assert_close(sb[name], sm[name], rtol=0, atol=0)
    assert sb["layers.0.ffn.proj_1.weight"].dtype == torch.float16
    assert len(sb["layers.0.ffn.proj_1.weight"].unique()) > 16  # per-block grid: many blocks, many values
    for key in ("weight_file_bytes", "mlpackage_bytes", "torch_artifact_bytes", "applied_estimate_bytes"):
        assert mb["sizes"][key]["value"] == mm["sizes"][key]["value"], key
    assert mb["planned_vs_built"]["layers_built"] == mm["planned_vs_built"]["layers_built"] == 17
    steps = [{k: s[k] for k in ("technique", "layers_applied")} for s in mb["steps"]]
    assert steps == [{k: s[k] for k in ("technique", "layers_applied")} for s in mm["steps"]]


def test_manifest_reports_peak_rss_by_stage(both) -> None:
    bounded, *_ = both
    res = json.loads((bounded.out_dir / "manifest.json").read_text())["resources"]
    assert res["label"] == "measured" and res["peak_rss_mb"] > 100
    stages = res["by_stage"]
    # the bounded native route: Core ML converts first, the torch side compresses after the save
    order = list(stages)
    assert order.index("Core ML: conversion") < order.index("torch: step 1 linear_quantization") \
        < order.index("Core ML: read back")
    assert all(s["peak_rss_mb"] <= res["peak_rss_mb"] and s["seconds"] >= 0 for s in stages.values())
    assert max(s["peak_rss_mb"] for s in stages.values()) == res["peak_rss_mb"]


def test_input_file_and_callers_model_left_alone(both, tmp_path: Path) -> None:
    bounded, _, path, before, plan = both
    assert _sha(path) == before  # compressed in place in memory: the mapped file is copy-on-write
    # A caller's model is never compressed in place: the copy shares each weight until its layer runs.
    loaded = load_model(SPEC)
    kept = {n: p.detach().clone() for n, p in loaded.module.named_parameters()}
    result = ca.apply(loaded, plan, tmp_path / "out")
    for n, p in loaded.module.named_parameters():
        assert torch.equal(p.detach(), kept[n]), n
    assert result.manifest["resources"]["path"].startswith("memory-bounded")
    assert _sha(result.mlpackage / "Data/com.apple.CoreML/weights/weight.bin") == \
        _sha(bounded.mlpackage / "Data/com.apple.CoreML/weights/weight.bin")
    a, b = _pt2_state(result.out_dir), _pt2_state(bounded.out_dir)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_mmap_safetensors_is_copy_on_write(decoder) -> None:
    from compressadvise.model.loading import mmap_safetensors

    _, path = decoder
    before = _sha(path)
    state = mmap_safetensors(path)
    w = state["layers.0.ffn.proj_2.weight"]
    assert w.dtype == torch.float16 and tuple(w.shape) == (256, 256)
    w.mul_(0)  # a write lands in this process's private pages
    assert _sha(path) == before
    assert not mmap_safetensors(path)["layers.0.ffn.proj_2.weight"].eq(0).all()
