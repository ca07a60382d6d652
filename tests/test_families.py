"""Three model families on two or more targets each: the plans differ the way the rules promise,
the trace cites the rules, and predicted sizes match hand-computed bytes (estimates).

Hand computations use the technique size formulas (see techniques/*.yaml); biases stay fp16
(2 bytes) on Core ML targets, fp32 (4 bytes) on the host CPU, bf16 (2 bytes) on CUDA.
"""
from __future__ import annotations

from kb_helpers import fired, plan_for, report, status, step


def layer_bytes(plan, name: str) -> int:
    return next(x.bytes_after for x in plan.layers if x.name == name)


def skipped(s) -> dict[str, str]:
    return {x.layer: x.code for x in s.skipped}


def cited(plan) -> set[str]:
    """Every rule code the plan cites: steps, advisories and fired trace entries."""
    return {c for s in plan.steps for c in s.rules} | {a.code for a in plan.advisories} | fired(plan)


# ------------------------------------------------------------------ depthwise-separable CNN
def test_cnn_neural_engine_vs_mac_gpu_at_a_4x_budget():
    ane = plan_for("dwcnn", "ane-a17", ratio=3.5)
    gpu = plan_for("dwcnn", "mac-gpu", ratio=3.5)
    w_ane, w_gpu = step(ane, "weights"), step(gpu, "weights")
    # ANE: 4-bit LUTs per 16 channels; Mac GPU: int4 with per-block scales (LOW001 vs LOW002)
    assert (w_ane.technique, w_ane.params["nbits"], w_ane.params["granularity"]) == \
        ("palettization", 4, "per_grouped_channel")
    assert (w_gpu.technique, w_gpu.params["nbits"], w_gpu.params["granularity"]) == \
        ("linear_quantization", 4, "per_block")
    assert w_ane.rules[0] == "LOW001" and w_gpu.rules[0] == "LOW002"
    # both keep the small stem and head (LAY001, LAY002); tiny depthwise tensors fall under
    # the backend's 2048-element threshold
    for s in (w_ane, w_gpu):
        assert skipped(s) == {"stem": "LAY001", "head": "LAY002", "dw1": "backend", "dw2": "backend"}
    # dw3 has one input channel: blocks of 32 inputs cannot apply, LAY008 falls back per channel
    assert w_gpu.op_name_params["dw3"] == {"granularity": "per_channel"} and "LAY008" in w_gpu.rules
    assert "dw3" not in w_ane.op_name_params
    # sizes (estimate), by hand: pw3 is [256, 256, 1, 1] with a 256 bias
    assert layer_bytes(ane, "pw3") == 65536 * 4 // 8 + (256 // 16) * 16 * 2 + 256 * 2  # grouped LUT
    # per-block int4 with zero-point: 2048 blocks of 32, each an fp16 scale and an int4 zero-point
    assert layer_bytes(gpu, "pw3") == 65536 * 4 // 8 + 2048 * 2 + 2048 * 4 // 8 + 256 * 2
    # dw3 fallback: int4 per channel, asymmetric (scale + int4 zero-point per row)
    assert layer_bytes(gpu, "dw3") == 2304 * 4 // 8 + 256 * 2 + 256 * 4 // 8 + 256 * 2
    assert ane.prediction.bytes_after == sum(x.bytes_after for x in ane.layers)
    assert ane.prediction.label == "estimate"
    assert {"LOW001", "LAY001", "LAY002", "WFL003"} <= cited(ane)
    assert {"LOW002", "LAY008"} <= cited(gpu)


def test_cnn_older_os_falls_back_and_explains():
    plan = plan_for("dwcnn", "ane-a17", 17, ratio=3.5)
    w = step(plan, "weights")
    assert status(plan, "LOW001") == "unsupported"  # grouped LUTs need iOS 18
    assert (w.technique, w.params["nbits"], w.params["granularity"]) == ("palettization", 6, "per_tensor")
    assert {"LOW008", "TGT005"} <= {a.code for a in plan.advisories}
    assert plan.prediction.meets_size_budget is False  # honest: 6 bits cannot reach 3.5x
    # 6-bit per-tensor LUT on pw3: 6/8 byte per weight + 64 fp16 entries
    assert layer_bytes(plan, "pw3") == 65536 * 6 // 8 + 64 * 2 + 256 * 2


def test_cnn_default_8bit_per_tensor_lut_and_w8_sizes():
    ane = plan_for("dwcnn", "ane-a17")
    gpu = plan_for("dwcnn", "mac-gpu")
    assert step(ane, "weights").rules[0] == "WGT001" and step(gpu, "weights").rules[0] == "WGT003"
    # pw1 [128, 32, 1, 1]: 8-bit per-tensor LUT (256 fp16 entries) vs int8 per channel (128 fp16 scales)
    assert layer_bytes(ane, "pw1") == 4096 + 256 * 2 + 128 * 2
    assert layer_bytes(gpu, "pw1") == 4096 + 128 * 2 + 128 * 2


def test_cnn_latency_budget_w8a8_only_on_a17():
    a17 = plan_for("dwcnn", "ane-a17", latency=1.0, data="calibration")
    a14 = plan_for("dwcnn", "ane-a14", latency=1.0, data="calibration")
    assert [s.slot for s in a17.steps] == ["weights", "activations"]
    assert step(a17, "activations").rules[0] == "ACT001" and step(a17, "weights").rules[0] == "ACT002"
    assert step(a14, "activations") is None and "ACT007" in {a.code for a in a14.advisories}
    assert step(a14, "weights").technique == "palettization"


# ------------------------------------------------------------------ transformer encoder
def test_encoder_neural_engine_vs_mac_gpu_at_a_4x_budget():
    ane = plan_for("encoder", "ane-a17", ratio=3.5)
    gpu = plan_for("encoder", "mac-gpu", ratio=3.5)
    w_ane, w_gpu = step(ane, "weights"), step(gpu, "weights")
    entry, exit_ = "encoder.layers.0.self_attn.in_proj", "encoder.layers.1.linear2"
    # the encoder stack's entry and exit layers get 8 bits: LUTs on the ANE, int8 on the GPU
    assert w_ane.op_name_params[entry] == {"nbits": 8, "granularity": "per_tensor"} and "LAY003" in w_ane.rules
    assert w_gpu.op_name_params[exit_] == {"nbits": 8, "granularity": "per_channel"} and "LAY004" in w_gpu.rules
    assert skipped(w_ane) == {"proj": "LAY001", "out": "LAY002"}
    # in_proj is [192, 64] with a 192 bias: 8-bit per-tensor LUT
    assert layer_bytes(ane, entry) == 12288 + 256 * 2 + 192 * 2
    # linear1 [256, 64]: 4-bit grouped LUT (16 groups) vs int4 per-block (bs 32) with zero-point
    assert layer_bytes(ane, "encoder.layers.0.linear1") == 16384 // 2 + 16 * 16 * 2 + 256 * 2
    assert layer_bytes(gpu, "encoder.layers.0.linear1") == 16384 // 2 + 512 * 2 + 512 // 2 + 256 * 2


def test_encoder_latency_w8a8_on_ane_weight_only_on_gpu():
    ane = plan_for("encoder", "ane-a17", latency=1.0, data="calibration")
    gpu = plan_for("encoder", "mac-gpu", latency=1.0, data="calibration")
    assert step(ane, "activations") is not None and step(gpu, "activations") is None
    assert {"ACT001", "LLM006"} <= cited(ane)
    assert {"ACT003", "TGT003", "WGT003"} <= cited(gpu)


def test_encoder_host_cpu_quantizes_linear_layers_only():
    plan = plan_for("encoder", "x86-cpu", ratio=1.5)
    w = step(plan, "weights")
    assert w.technique == "int8_weight_only" and w.rules[0] == "CPU001"
    # nn.MultiheadAttention's packed in_proj is not an nn.Linear: torchao leaves it alone
    assert not any("in_proj" in n for n in w.layers) and "encoder.layers.0.linear1" in w.layers
    assert skipped(w)["out"] == "LAY009"
    # fp32 baseline on the host: linear1 [256, 64] int8 + (fp32 scale, int8 zero-point) per row
    assert layer_bytes(plan, "encoder.layers.0.linear1") == 16384 + 256 * 5 + 256 * 4
    assert plan.prediction.bytes_before == report("encoder").total_params * 4


# ------------------------------------------------------------------ decoder LM, tied embeddings
def test_decoder_lm_neural_engine_tied_embedding():
    plan = plan_for("decoder_lm", "ane-a17", ratio=3.5)
    w = step(plan, "weights")
    assert w.rules[0] == "LOW001"
    assert skipped(w) == {"lm_head": "LAY005"}  # the tied alias is stored once, at embed
    assert w.op_name_params["embed"] == {"nbits": 6} and "LLM002" in w.rules
    # embed [512, 64]: 6-bit indices, 32 groups of 16 rows with 64-entry fp16 LUTs
    assert layer_bytes(plan, "embed") == 32768 * 6 // 8 + 32 * 64 * 2
    assert layer_bytes(plan, "lm_head") == 0  # shares embed's storage
    assert {"LLM001", "LLM004", "LAY005"} <= cited(plan)


def test_decoder_lm_gpu_vs_host_cpu():
    gpu = plan_for("decoder_lm", "nvidia-gpu", latency=5.0)
    cpu = plan_for("decoder_lm", "x86-cpu", latency=5.0, ratio=1.5)
    wg, wc = step(gpu, "weights"), step(cpu, "weights")
    assert (wg.technique, wg.rules[0]) == ("int4_weight_only", "GPU001")
    assert status(cpu, "GPU001") == "unsupported" and (wc.technique, wc.rules[0]) == ("int8_weight_only", "CPU001")
    # int4 groups of 128 inputs: 64-input projections cannot be grouped and are listed as backend skips
    assert skipped(wg)["blocks.0.q_proj"] == "backend" and "blocks.0.fc2" in wg.layers
    # fc2 [64, 256] on CUDA: packed int4 + bf16 scale and zero-point per group of 128, bf16 bias
    assert layer_bytes(gpu, "blocks.0.fc2") == 16384 // 2 + (16384 // 128) * 4 + 64 * 2
    assert "embed" not in wg.layers and "embed" not in wc.layers  # torchao: Linear layers only
    assert {"CPU004", "CPU005"} <= cited(cpu)


# ------------------------------------------------------------------ remaining size formulas
def test_per_block_int4_without_zero_point_and_divisibility_fallbacks():
    gpu = plan_for("mlp", "mac-gpu", probe="int4_per_block")  # linear_symmetric, bs 32
    # fc1 [256, 256]: int4 + one fp16 scale per 32 inputs, no zero-point
    assert layer_bytes(gpu, "fc1") == 65536 // 2 + 2048 * 2 + 256 * 2
    # fc3 has 200 inputs (not a multiple of 32): per-channel scales instead of a silent skip
    assert step(gpu, "weights").op_name_params["fc3"] == {"granularity": "per_channel"}
    assert layer_bytes(gpu, "fc3") == 51200 // 2 + 256 * 2 + 256 * 2
    ane = plan_for("mlp", "ane-a17", ratio=3.5)
    # fc2 has 200 outputs (not a multiple of 16): regrouped by 10, which divides (LAY011): 20 LUTs
    assert step(ane, "weights").op_name_params["fc2"] == {"granularity": "per_grouped_channel", "group_size": 10}
    assert layer_bytes(ane, "fc2") == 51200 // 2 + 20 * 16 * 2 + 200 * 2
    # 211 outputs (prime): only 1 divides, one 16-entry LUT per channel (LAY007)
    prime = plan_for("prime_mlp", "ane-a17", ratio=3.5)
    assert step(prime, "weights").op_name_params["fc2"] == {"granularity": "per_grouped_channel", "group_size": 1}
    assert layer_bytes(prime, "fc2") == 211 * 256 // 2 + 211 * 16 * 2 + 211 * 2


def test_joint_compression_size():
    plan = plan_for("dwcnn", "ane-a17", ratio=5.0, data="training")
    w = step(plan, "weights")
    assert (w.technique, w.rules[0]) == ("joint_compression", "SPR007")
    # pw3: mask bit per weight + 4-bit indices for the kept half + 16 LUTs of 16 fp16 entries
    assert layer_bytes(plan, "pw3") == 65536 // 8 + 32768 // 2 + 16 * 16 * 2 + 256 * 2
    assert skipped(w)["dw3"] == "SPR005"  # the joint step prunes too: depthwise stays dense
    assert plan.prediction.ratio > 3.5
