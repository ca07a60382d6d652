"""Each fidelity/task metric on hand-made cases whose answers are worked out by hand."""
from __future__ import annotations

import math

import pytest
import torch

from compressadvise.measure import metrics as M
from compressadvise.errors import InvalidKnowledge
from compressadvise.measure.verify import parse_metric_overrides


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_psnr_uses_peak_of_reference():
    ref = t([1.0, -1.0, 1.0, -1.0])
    # every element off by 0.1: MSE 0.01, peak 1 -> 10*log10(1/0.01) = 20 dB
    assert M.psnr(ref, ref + 0.1) == pytest.approx(20.0, abs=1e-4)
    # peak 2 -> 4x the signal power: +6.02 dB
    assert M.psnr(2 * ref, 2 * ref + 0.1) == pytest.approx(20.0 + 10 * math.log10(4), abs=1e-4)
    assert M.psnr(ref, ref) == math.inf


def test_snr_is_signal_over_noise_energy():
    ref, test = t([3.0, 4.0]), t([3.0, 3.0])
    # signal 9 + 16 = 25, noise 1 -> 10*log10(25)
    assert M.snr(ref, test) == pytest.approx(10 * math.log10(25), abs=1e-6)
    assert M.snr(ref, ref) == math.inf
    assert M.snr(t([0.0, 0.0]), t([1.0, 0.0])) == -math.inf


def test_cosine_is_a_per_sample_mean():
    assert M.cosine_similarity(t([1.0, 2.0]), t([2.0, 4.0])) == pytest.approx(1.0)
    assert M.cosine_similarity(t([1.0, 0.0]), t([0.0, 1.0])) == pytest.approx(0.0)
    # one identical sample, one orthogonal: mean 0.5 (a global cosine would give another figure)
    assert M.cosine_similarity(t([1.0, 0.0], [0.0, 3.0]), t([1.0, 0.0], [3.0, 0.0])) == pytest.approx(0.5)
    assert M.cosine_similarity(t([0.0, 0.0]), t([0.0, 0.0])) == 1.0
    assert M.cosine_similarity(t([0.0, 0.0]), t([1.0, 0.0])) == 0.0


def test_max_abs_error_and_mse():
    ref, test = t([1.0, 2.0, 3.0]), t([1.5, 2.0, 1.0])
    assert M.max_abs_error(ref, test) == pytest.approx(2.0)
    assert M.mse(ref, test) == pytest.approx((0.25 + 0 + 4) / 3)


def test_top1_agreement_and_topk_accuracy():
    ref = t([0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.0, 0.1, 0.9], [0.5, 0.4, 0.1])
    test = t([0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.0, 0.1, 0.9], [0.3, 0.6, 0.1])
    assert M.top1_agreement(ref, test) == pytest.approx(0.75)
    labels = torch.tensor([0, 1, 1, 0])
    assert M.topk_accuracy(ref, labels, 1) == pytest.approx(75.0)  # the third is wrong
    assert M.topk_accuracy(ref, labels, 2) == pytest.approx(100.0)  # ...but class 1 is its second best
    assert M.topk_accuracy(ref, labels, 5) == pytest.approx(100.0)  # k clipped to the class count


def test_kl_divergence_known_value():
    ref = torch.log(t([0.5, 0.5]))
    test = torch.log(t([0.9, 0.1]))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # = 0.5*ln(25/9) = 0.5108
    assert M.kl_divergence(ref, test) == pytest.approx(expected, abs=1e-6)
    assert M.kl_divergence(ref, ref) == pytest.approx(0.0, abs=1e-12)
    # logits shifted by a constant give the same softmax
    assert M.kl_divergence(ref, ref + 3.0) == pytest.approx(0.0, abs=1e-9)


def test_iou_binary_and_class_maps():
    a = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0]], dtype=torch.bool)
    assert M.iou(a, b) == pytest.approx(1 / 3)
    assert M.iou(torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)) == 1.0
    # probabilities are thresholded at 0.5, logits at 0
    assert M.iou(t([0.9, 0.8, 0.1, 0.2]), t([0.7, 0.4, 0.6, 0.0])) == pytest.approx(1 / 3)
    assert M.iou(t([3.0, 2.0, -1.0, -2.0]), t([1.0, -1.0, 2.0, -5.0])) == pytest.approx(1 / 3)
    # class map: class 0 IoU 1/2, class 1 IoU 0/2 -> 0, class 2 IoU 1/1 -> mean 0.5
    ref = torch.tensor([0, 0, 1, 2])
    test = torch.tensor([0, 1, 0, 2])
    assert M.iou(ref, test) == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert M.pixel_agreement(ref, test) == pytest.approx(0.5)


@pytest.mark.parametrize("tensor,kind", [
    (torch.randn(4, 10), "logits"),
    (torch.randn(4, 3, 8, 8), "dense"),
    (torch.randn(4, 1), "dense"),
    (torch.randn(4, 8, 8) > 0, "mask"),
    (torch.randint(0, 5, (4, 8, 8)), "mask"),
    ((torch.randn(4, 1, 8, 8) > 0).float(), "mask"),
])
def test_metric_family_chosen_from_the_output(tensor, kind):
    assert M.choose_kind(tensor) == kind


def test_fidelity_reports_the_family_metrics():
    ref = torch.randn(8, 10)
    noisy = ref + 0.01 * torch.randn(8, 10)
    logits = M.fidelity(ref, noisy, "logits")
    assert set(logits) == {"top1_agreement", "kl_divergence", "snr_db", "cosine", "max_abs_error"}
    assert logits["snr_db"] > 20 and logits["cosine"] > 0.99
    dense = M.fidelity(ref, noisy, "dense")
    assert "psnr_db" in dense and "top1_agreement" not in dense
    assert set(M.fidelity(ref > 0, noisy > 0, "mask")) == {"iou", "pixel_agreement"}


def test_metric_overrides_parse_and_reject():
    assert parse_metric_overrides(["output=psnr", "mask=iou"]) == {"output": "dense", "mask": "mask"}
    assert parse_metric_overrides({"logits": "kl"}) == {"logits": "logits"}
    with pytest.raises(InvalidKnowledge, match="bad metric override"):
        parse_metric_overrides(["output=bleu"])
    with pytest.raises(InvalidKnowledge):
        parse_metric_overrides(["=psnr"])


def test_result_json_keeps_infinity_valid():
    from compressadvise.measure.verify import OutputFidelity

    f = OutputFidelity(name="o", shape=[1], kind="dense", kind_source="auto", metrics={"psnr_db": math.inf})
    assert '"Infinity"' in f.model_dump_json()
