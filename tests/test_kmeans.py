"""One k-means for every palettized weight (backends/kmeans.py): the search's measurement, the
torch side and the .mlpackage's LUTs are the same clustering."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import compressadvise as ca
from compressadvise.backends import kmeans
from compressadvise.measure.sensitivity_eval import compress_weight
from compressadvise.plan.setting import Setting
from real_models.catalog import REAL_MODELS
from test_apply import small_mlp
from test_apply_built import _coreml, _plan


def _ours(w: torch.Tensor, nbits: int, rows: int) -> np.ndarray:
    """`w` with each group of `rows` output channels replaced by its centroids."""
    flat = w.detach().reshape(w.shape[0], -1).numpy()
    out = []
    for i in range(0, flat.shape[0], rows):
        lut, idx = kmeans.cluster(flat[i:i + rows], nbits)
        out.append(lut[idx].reshape(flat[i:i + rows].shape))
    return np.concatenate(out).reshape(tuple(w.shape))


GROUPED = {"nbits": 4, "granularity": "per_grouped_channel", "group_size": 16}


def _library(w: torch.Tensor, params: dict) -> np.ndarray:
    """compress_weight through optimize.torch's PostTrainingPalettizer (the reference: for scalar LUTs
    compress_weight runs backends/kmeans.py)."""
    from unittest import mock

    from compressadvise.measure import sensitivity_eval

    with mock.patch.object(sensitivity_eval, "_shared_kmeans", lambda *a: None):
        return compress_weight(w, Setting.of("palettization", **params)).numpy()


def _shipped_vs_measured(tmp_path, name: str) -> tuple[dict, dict, float]:
    """apply of small_mlp's fc1/fc2 at GROUPED for iOS 18: (manifest, the layer's Core ML record,
    max |decompressed .mlpackage weight - the search's measurement of it| / max |measurement|)."""
    from compressadvise.backends import coremltools_coreml as C
    from compressadvise.backends.apply_coreml import _decompress_one, _ops_by_name

    out = ca.apply(small_mlp(), _plan("palettization", "weights", GROUPED, 18), tmp_path / "o")
    prog = C.load_program(out.mlpackage)
    rec = _coreml(out.manifest, name)
    shipped = _decompress_one(prog, _ops_by_name(prog), C.inspect_program(prog, [rec["const"]])[rec["const"]].head)
    w = small_mlp().module.get_submodule(name).weight.detach()
    measured = compress_weight(w, Setting.of("palettization", **GROUPED)).numpy()
    gap = float(np.abs(shipped.reshape(measured.shape) - measured).max()) / float(np.abs(measured).max())
    return out.manifest, rec, gap


@pytest.mark.parametrize("layer, params", [
    ("features.17.conv.2.weight", {"nbits": 4}),  # one LUT for 320 x 960
    ("features.6.conv.2.weight", {"nbits": 6, "granularity": "per_grouped_channel", "group_size": 4}),
    ("features.12.conv.1.0.weight", {"nbits": 4, "granularity": "per_grouped_channel", "group_size": 16}),  # depthwise
])
def test_the_same_clustering_as_optimize_torch_on_pretrained_weights(layer, params):
    spec = REAL_MODELS["mobilenet_v2"]
    if not spec.installed():
        pytest.skip(spec.skip_reason())
    w = dict(spec.build()[0].named_parameters())[layer].detach()
    lib = _library(w, params)
    mine = _ours(w, params["nbits"], params.get("group_size", w.shape[0]))
    searched = compress_weight(w, Setting.of("palettization", **params)).numpy()  # what the search measures
    assert np.array_equal(mine.astype(np.float32), lib.astype(np.float32))
    assert np.array_equal(searched.astype(np.float32), lib.astype(np.float32))
    assert len(np.unique(mine)) > 2 ** params["nbits"] // 2  # a real clustering, not a collapsed one


@pytest.mark.parametrize("shape, params", [
    ((40, 24), {"nbits": 2}),
    ((32, 8, 5), {"nbits": 3, "granularity": "per_grouped_channel", "group_size": 8}),  # Conv1d
    ((16, 4, 3, 3), {"nbits": 8, "granularity": "per_grouped_channel", "group_size": 4}),
    ((48, 64), {"nbits": 6, "granularity": "per_grouped_channel", "group_size": 16}),
])
def test_compress_weight_is_the_librarys_palettization(shape, params):
    """The search's measurement of a scalar LUT setting equals PostTrainingPalettizer's weights, fp16
    and fp32 inputs, heavy tails included."""
    g = torch.Generator().manual_seed(len(shape) * 7 + params["nbits"])
    w = torch.randn(shape, generator=g) * torch.rand(shape, generator=g).pow(4) * 0.1
    for x in (w, w.half()):
        got = compress_weight(x, Setting.of("palettization", **params))
        assert got.dtype == x.dtype and got.shape == x.shape
        assert np.array_equal(got.numpy(), _library(x, params))


def test_a_group_with_fewer_values_than_centroids_pads_its_lut():
    lut, idx = kmeans.cluster(np.array([0.5, -0.25, 0.5, 0.125], dtype=np.float16), 3)
    assert lut.shape == (8,) and list(lut[:3]) == [-0.25, 0.125, 0.5] and not lut[3:].any()
    assert list(lut[idx]) == [0.5, -0.25, 0.5, 0.125]


@pytest.mark.parametrize("name", ["fc1", "fc2"])
def test_the_mlpackage_holds_the_luts_the_search_measured(tmp_path, name):
    """Grouped 4-bit LUTs, built by apply (memory-bounded native route): the layer's decompressed
    .mlpackage weight is the search's measurement of it to fp16 storage, and the torch side did not
    cluster a second time."""
    manifest, rec, gap = _shipped_vs_measured(tmp_path, name)
    assert "custom mode" in rec["lut_kmeans"] and "clustered once" in rec["parity"]
    assert gap <= 1e-3
    steps = next(x for x in manifest["layers"] if x["name"] == name)["steps"]
    torch_rec = next(e["torch"] for e in steps if "torch" in e)
    assert "the .mlpackage's weight" in torch_rec["backend"]  # taken from the LUTs, not re-clustered


def test_coremltools_own_kmeans_ships_other_luts(tmp_path, monkeypatch):
    """Why the custom mode: with coremltools' kmeans mode (scikit-learn's k-means++ on these small
    groups) the .mlpackage's LUTs are not the ones the search measured."""
    monkeypatch.setattr(kmeans, "shared", lambda p, joint: False)
    assert _shipped_vs_measured(tmp_path, "fc1")[2] > 1e-2
