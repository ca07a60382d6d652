"""The roofline estimate's arithmetic against figures computed by hand, and calibration."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compressadvise.model.analysis import analyze
from compressadvise.errors import InvalidKnowledge
from compressadvise.measure.estimate import (LayerCompression, calibrate, detect_compression, estimate_layer,
                                     from_plan, load_calibration, mode_of_setting, roofline)
from compressadvise.knowledge.base import builtin
from compressadvise.knowledge.schema import Figure, LayerPrediction, ModeSupport
from compressadvise.measure.verify import _from_module

BW, FP16, INT8 = 100.0, 2.0, 4.0  # GB/s, TOPS, TOPS


MODES = [ModeSupport(mode="palettize", min_os=16, behaviour="accelerated"),
         ModeSupport(mode="linear_int4", min_os=18, behaviour="decompressed"),
         ModeSupport(mode="w8a8", min_os=17, behaviour="accelerated")]


def make_target(**figs: float):
    """A hand-made profile (the shipped ones change as the knowledge base grows)."""
    base = builtin().target("ane-a17")
    figures = {k: Figure(value=v, unit="x", source="test") for k, v in figs.items()}
    return base.model_copy(update={"figures": figures, "modes": MODES, "baseline_bytes_per_param": 2.0})


@pytest.fixture(scope="module")
def fc_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 128))
    report = analyze(_from_module(model), input_shape=[1, 256], stats=False)
    layer = report.layers[0]
    assert (layer.macs, layer.activation_elements, layer.params) == (32768, 128, 256 * 128 + 128)
    return layer


def test_fp16_layer_is_memory_bound(fc_layer):
    tgt = make_target(memory_bandwidth_gbs=BW, peak_fp16_tops=FP16, peak_int8_tops=INT8)
    e = estimate_layer(fc_layer, tgt, 18, None, 2.0)
    weights = (256 * 128 + 128) * 2  # 65,792 bytes at fp16
    act = 128 * 2  # output activations at fp16
    assert e.weight_bytes_moved == weights
    assert e.memory_ms == pytest.approx((weights + act) / (BW * 1e9) * 1e3)  # 6.6048e-4 ms
    assert e.compute_ms == pytest.approx(2 * 32768 / (FP16 * 1e12) * 1e3)  # 3.2768e-5 ms
    assert e.bound == "memory" and e.ms == pytest.approx(6.6048e-4)


def test_decompression_behaviour_by_os(fc_layer):
    tgt = make_target(memory_bandwidth_gbs=BW, peak_fp16_tops=FP16)
    pal4 = 256 * 128 * 4 / 8 + 16 * 2 + 128 * 2  # indices + LUT + fp16 bias = 16,672 bytes
    comp = LayerCompression(bytes=pal4, setting="4-bit palettization", mode="palettize")
    ios18 = estimate_layer(fc_layer, tgt, 18, comp, 2.0)
    assert ios18.weight_bytes_moved == pal4  # just-in-time: compressed bytes streamed
    assert ios18.ms == pytest.approx((16672 + 256) / (BW * 1e9) * 1e3)  # 1.6928e-4 ms
    ios16 = estimate_layer(fc_layer, tgt, 16, comp, 2.0)
    assert ios16.weight_bytes_moved == 65792  # decompressed at load: fp16 traffic
    assert ios16.ms == pytest.approx(6.6048e-4)
    # a mode the target only decompresses (int4 on the Neural Engine) streams fp16 even on iOS 18
    int4 = LayerCompression(bytes=pal4, setting="4-bit linear_quantization per_block", mode="linear_int4")
    assert estimate_layer(fc_layer, tgt, 18, int4, 2.0).weight_bytes_moved == 65792


def test_compute_bound_layer_and_int8_roof(fc_layer):
    tgt = make_target(memory_bandwidth_gbs=BW, peak_fp16_tops=FP16, peak_int8_tops=INT8)
    heavy = fc_layer.model_copy(update={"macs": 10**9})
    e = estimate_layer(heavy, tgt, 18, None, 2.0)
    assert e.bound == "compute" and e.ms == pytest.approx(2e9 / 2e12 * 1e3)  # 1 ms
    w8a8 = LayerCompression(bytes=256 * 128 + 128 * 2, setting="w8a8", mode="w8a8", int8_activations=True)
    assert estimate_layer(heavy, tgt, 18, w8a8, 2.0).ms == pytest.approx(0.5)  # 4 TOPS roof
    # W8A8 needs iOS 17 on this target: on iOS 16 it runs at the fp16 roof
    assert estimate_layer(heavy, tgt, 16, w8a8, 2.0).ms == pytest.approx(1.0)


def test_missing_figures_are_said_not_guessed(fc_layer):
    report = analyze(_from_module(nn.Sequential(nn.Linear(256, 128))), input_shape=[1, 256], stats=False)
    est = roofline(report, make_target(memory_bandwidth_gbs=BW), 18)
    assert est.label == "estimate" and est.layers[0].compute_ms == 0.0
    assert any("peak_fp16_tops" in n for n in est.notes)
    none = roofline(report, make_target(peak_fp16_tops=FP16), 18)
    assert none.layers == [] and any("memory_bandwidth_gbs" in n for n in none.notes)


def test_whole_model_sums_layers_and_skips_layers_without_macs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 10))
    report = analyze(_from_module(model), input_shape=[1, 64], stats=False)
    est = roofline(report, make_target(memory_bandwidth_gbs=BW, peak_fp16_tops=FP16), 18)
    assert [x.name for x in est.layers] == ["0", "2"]
    by_hand = ((64 * 64 + 64) * 2 + 64 * 2 + (64 * 10 + 10) * 2 + 10 * 2) / (BW * 1e9) * 1e3
    assert est.total_ms == pytest.approx(by_hand)
    assert any("without MACs" in n for n in est.notes)


def test_calibration_scales_by_measured_figures(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    report = analyze(_from_module(model), input_shape=[1, 64], stats=False)
    tgt = make_target(memory_bandwidth_gbs=BW, peak_fp16_tops=FP16)
    orig = roofline(report, tgt, 18)
    comp = roofline(report, tgt, 18, {"0": LayerCompression(bytes=100.0, setting="x", mode="palettize")})
    a, b = orig.layers[0].ms, orig.layers[1].ms
    path = tmp_path / "cal.yaml"
    path.write_text(f"model: original\ntotal_ms: {4 * (a + b)}\nlayers:\n  '0': {3 * a}\n")
    o, c = calibrate(orig, comp, load_calibration(path))
    assert o.calibrated and c.calibrated and o.label == "estimate"
    assert o.layers[0].ms == pytest.approx(3 * a)  # its own figure
    # the other layer takes the remaining measured time: (4(a+b) - 3a) / b
    assert o.layers[1].ms == pytest.approx(4 * (a + b) - 3 * a)
    assert o.total_ms == pytest.approx(4 * (a + b))
    assert c.layers[0].ms == pytest.approx(3 * comp.layers[0].ms)  # same factor on the compressed model


def test_calibration_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: original\ntotal_msec: 1.0\n")
    with pytest.raises(InvalidKnowledge, match=r"bad.yaml:2: unknown key 'total_msec'"):
        load_calibration(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("model: original\n")
    with pytest.raises(InvalidKnowledge, match="total_ms or per-layer"):
        load_calibration(empty)


def test_settings_map_to_runtime_modes():
    assert mode_of_setting("4-bit palettization per_grouped_channel gs=16") == "palettize_grouped"
    assert mode_of_setting("3-bit palettization per_tensor") == "palettize_3bit"
    assert mode_of_setting("8-bit palettization per_tensor") == "palettize"
    assert mode_of_setting("4-bit linear_quantization per_block bs=32") == "linear_per_block"
    assert mode_of_setting("8-bit linear_quantization per_channel") == "linear_int8"
    assert mode_of_setting("fp16 (unchanged)") is None
    rows = [LayerPrediction(name="a", setting="4-bit palettization per_tensor", bytes_before=100, bytes_after=30),
            LayerPrediction(name="b", setting="fp16 (unchanged)", bytes_before=100, bytes_after=100)]
    got = from_plan(rows)
    assert set(got) == {"a"} and got["a"].bytes == 30 and got["a"].mode == "palettize"


def test_detects_palettized_and_int8_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    report = analyze(_from_module(model), input_shape=[1, 128], stats=False)
    pal = copy.deepcopy(model)
    with torch.no_grad():  # hand-made 4-bit LUT: 16 distinct values in the first layer
        levels = torch.linspace(-0.1, 0.1, 16)
        idx = torch.randint(0, 16, pal[0].weight.shape)
        pal[0].weight.copy_(levels[idx])
    found = detect_compression(pal, report)
    assert set(found) == {"0"}
    assert found["0"].bytes == pytest.approx(128 * 64 * 4 / 8 + 16 * 2 + 64 * 2)
    assert found["0"].mode == "palettize"

    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    q = copy.deepcopy(model)
    quantize_(q, Int8WeightOnlyConfig())
    found = detect_compression(q, report)
    assert found["0"].mode == "linear_int8" and not found["0"].int8_activations
    # int8 data + fp32 per-row scales + fp16 bias
    assert found["0"].bytes == pytest.approx(128 * 64 + 64 * 4 + 64 * 2)

    dyn = copy.deepcopy(model)
    quantize_(dyn, Int8DynamicActivationInt8WeightConfig())
    found = detect_compression(dyn, report)
    assert found["2"].mode == "w8a8" and found["2"].int8_activations
