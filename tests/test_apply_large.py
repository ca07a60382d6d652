"""Memory-bounded apply (issue 19): a small OpenELM-shaped decoder (benchmarks/llm_scale.py, ~3.7M
parameters, fp16 weights memory-mapped from a safetensors file) through the layer-by-layer path
builds the same artefact as the all-in-memory path, reports its peak RSS, and leaves the input alone.
Its heads scale by layer (KV heads 2, 3, 3, 4), as OpenELM's do: the KV cache ships as one pair of
Core ML states per head count, read back from the saved package.
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


# ---------------------------------------------------------------- its KV cache, heads scaled by layer
def test_openelm_config_keeps_heads_per_layer() -> None:
    """OpenELM-270M's published config: heads listed per layer (query 12..20, KV 3..5). The cache counts
    each layer's own KV heads: 63 over 16 layers, not 16 x the largest."""
    from compressadvise.model.decoder import from_config

    q = [12] * 5 + [16] * 7 + [20] * 4
    cfg = {"architectures": ["OpenELMForCausalLM"], "num_transformer_layers": 16, "model_dim": 1280, "head_dim": 64,
           "num_query_heads": q, "num_kv_heads": [h // 4 for h in q], "max_context_length": 2048}
    kv = from_config(cfg, "config.json")
    assert (kv.layers, kv.kv_heads, kv.head_dim, kv.max_context, kv.heads) == (16, 5, 64, 2048, 20)
    assert kv.bytes_at(2048) == 2 * 63 * 64 * 2048 * 2 < 2 * 16 * 5 * 64 * 2048 * 2
    assert kv.query_heads_total() == sum(q) and kv.heads_per_layer == q
    same = from_config({**cfg, "num_kv_heads": [4] * 16}, "config.json")
    assert same.kv_heads_per_layer is None and same.kv_heads == 4  # one count for every layer: the plain form


def _tiny_plan(context: int, os: int = 18):
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import recommend

    return recommend(analyze(load_model(SPEC), stats=False), target="ane-a17", os=os, context_length=context)


def test_states_hold_each_layer_once_and_the_cache_exactly(decoder) -> None:
    from compressadvise.model.analysis import analyze

    plan, kv = _tiny_plan(64), analyze(load_model(SPEC), stats=False).kv
    assert kv.kv_heads_per_layer == [2, 3, 3, 4]  # the tiny decoder's layer-wise scaling
    states = plan.decoder.states
    assert [s.name for s in states] == [f"{n}_h{h}" for h in (2, 3, 4) for n in ("key_cache", "value_cache")]
    held = sorted(i for s in states[0::2] for i in s.layers)
    assert held == list(range(kv.layers))
    assert sum(2 * s.shape[0] * s.shape[2] * s.shape[3] * s.shape[4] for s in states) == kv.bytes_at(64)
    assert plan.memory.kv_cache_bytes == kv.bytes_at(64)


def test_grouped_cache_wrapper_matches_the_full_sequence(decoder) -> None:
    from compressadvise.backends import export_decoder as D

    llm_scale, _ = decoder
    model = llm_scale.openelm_tiny()[0]
    states = _tiny_plan(64).decoder.states
    check = D.check_wrapper(model, states, tokens=10)
    assert check["ok"], check
    ids = torch.arange(6).unsqueeze(0) * 31 % 4096
    with torch.no_grad():  # the check can fail: a cache emptied between calls gives other logits
        full = model(ids)
        w = D.wrap(model, states)
        w(ids[:, :5], D.causal_mask(0, 5))
        for s in states:
            getattr(w, s.name).zero_()
        wrong = w(ids[:, 5:6], D.causal_mask(5, 1))
    assert (wrong - full[:, 5:6]).abs().max() > 1e-2


def test_bounded_apply_ships_the_planned_states(decoder, tmp_path: Path) -> None:
    """The path the 1.1B benchmark takes: a factory loaded in place, compressed layer by layer, the
    KV cache converted as the plan's states; the saved package's states are read back, and the
    torch.export program's cache, run a token a call, gives the torch artefact's logits."""
    from compressadvise.backends import export_decoder as D

    plan = _tiny_plan(32)
    result = ca.apply(SPEC, plan, tmp_path / "out")
    record = result.manifest["coreml"]["decoder"]
    assert result.manifest["resources"]["path"].startswith("memory-bounded")
    want = [{"name": s.name, "shape": s.shape, "dtype": "float16"} for s in plan.decoder.states]
    states, ops = D.states_in(result.mlpackage)
    assert sorted(states, key=lambda s: s["name"]) == sorted(want, key=lambda s: s["name"])
    assert ops["write_state"] >= 2 * 4 and record["wrapper_check"]["ok"]
    assert record["torch_program"]["cache_buffers"] == [s.name for s in plan.decoder.states]
    run = torch.export.load(str(result.out_dir / D.KV_PROGRAM)).module()
    shipped = torch.export.load(str(result.out_dir / "model.pt2")).module()
    ids = torch.arange(16).unsqueeze(0) * 13 % 4096  # model.pt2 takes the example's 16 tokens
    with torch.no_grad():
        full = shipped(ids)
        steps = [run(ids[:, :12], D.causal_mask(0, 12))] + [run(ids[:, i:i + 1], D.causal_mask(i, 1))
                                                             for i in range(12, 16)]
    assert (torch.cat(steps, 1).float() - full.float()).abs().max() <= 5e-3 * full.abs().max()
