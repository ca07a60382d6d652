"""Loader: every format detected by content, inventories match ground truth, pickles refused."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import compressadvise as ca
from compressadvise.errors import BadModel, InputNotFound, UntrustedPickle
from models import TinyCNN, TinyLM, unique_params


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return TinyCNN().eval()


def _save_all(m, tmp_path):
    x = torch.randn(1, 3, 8, 8)
    paths = {}
    paths["torchscript"] = tmp_path / "m.ts"  # odd extensions on purpose: detection is by content
    torch.jit.save(torch.jit.trace(m, x), paths["torchscript"])
    paths["exported"] = tmp_path / "m.bin"
    torch.export.save(torch.export.export(m, (x,)), paths["exported"])
    paths["state_dict"] = tmp_path / "m.pth"
    torch.save(m.state_dict(), paths["state_dict"])
    paths["safetensors"] = tmp_path / "weights.data"
    save_file(m.state_dict(), paths["safetensors"])
    return paths


def test_every_format_detected_and_counted(cnn, tmp_path):
    truth = unique_params(cnn)
    for fmt, path in _save_all(cnn, tmp_path).items():
        loaded = ca.load_model(path)
        assert loaded.format == fmt
        report = ca.analyze(loaded)
        assert report.total_params == truth, fmt
        assert {x.name for x in report.layers} >= {"stem", "dw", "pw", "head"}
        assert report.layer("dw").type == "depthwise_conv", fmt
        if fmt != "safetensors":  # safetensors keeps no module order (noted in the report)
            assert report.layer("stem").is_first and report.layer("head").is_last
        assert report.has_graph == (fmt in ("torchscript", "exported"))
        if not report.has_graph:
            assert any("no graph" in n for n in report.notes)


def test_factory_and_macs():
    loaded = ca.load_model("models:cnn_factory")
    assert loaded.format == "factory"
    r = ca.analyze(loaded, input_shape=[1, 3, 8, 8])
    stem = r.layer("stem")
    # conv MACs = output elements x (in_channels/groups x kh x kw)
    assert stem.macs == 16 * 8 * 8 * 3 * 3 * 3
    assert r.layer("dw").macs == 16 * 8 * 8 * 9
    assert r.layer("head").macs == 32 * 10
    assert r.macs_total == sum(x.macs for x in r.layers if x.macs)


def test_exported_program_macs_from_graph(cnn, tmp_path):
    path = _save_all(cnn, tmp_path)["exported"]
    r = ca.analyze(path)
    assert r.layer("pw").macs == 32 * 8 * 8 * 16


def test_tied_weights_counted_once(tmp_path):
    lm = TinyLM().eval()
    r = ca.analyze(_loaded_module(lm))
    assert r.total_params == unique_params(lm)
    assert r.layer("lm_head").tied_to == "embed"
    assert r.tied_groups == [["embed.weight", "lm_head.weight"]]
    assert r.family == "decoder_lm"
    # torch.save keeps the sharing, so a state dict shows the tie too
    torch.save(lm.state_dict(), tmp_path / "lm.pt")
    r2 = ca.analyze(tmp_path / "lm.pt")
    assert r2.total_params == unique_params(lm)


def _loaded_module(m):
    from compressadvise.model.loading import LoadedModel

    return LoadedModel("test", "factory", "0", has_graph=True, module=m)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/compressadvise_pwned",))


def test_malicious_pickle_not_executed(tmp_path):
    marker = "/tmp/compressadvise_pwned"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2, 2), "payload": Boom()}, path)
    with pytest.raises(UntrustedPickle) as e:
        ca.load_model(path)
    assert "--trust-pickle" in e.value.one_line()
    assert not os.path.exists(marker)


def test_full_module_pickle_needs_trust(cnn, tmp_path):
    path = tmp_path / "full.pt"
    torch.save(cnn, path)
    with pytest.raises(UntrustedPickle):
        ca.load_model(path)
    loaded = ca.load_model(path, trust_pickle=True)
    assert loaded.format == "pickle"
    assert ca.analyze(loaded).total_params == unique_params(cnn)


def test_bad_inputs(cnn, tmp_path):
    with pytest.raises(InputNotFound):
        ca.load_model(tmp_path / "missing.pt")
    with pytest.raises(InputNotFound):
        ca.load_model(tmp_path)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(BadModel, match="empty"):
        ca.load_model(empty)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello, this is not a model at all")
    with pytest.raises(BadModel, match="not a recognised"):
        ca.load_model(junk)
    paths = _save_all(cnn, tmp_path)
    for fmt in ("exported", "torchscript", "state_dict", "safetensors"):
        data = paths[fmt].read_bytes()
        cut = tmp_path / f"cut_{fmt}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(BadModel):
            ca.analyze(ca.load_model(cut))
    torch.save({}, tmp_path / "nothing.pt")
    with pytest.raises(BadModel):
        ca.load_model(tmp_path / "nothing.pt")


def test_nan_weights_are_findings(tmp_path):
    m = TinyCNN()
    with torch.no_grad():
        m.pw.weight[0, 0] = float("nan")
        m.pw.weight[1, 0] = float("inf")
    torch.save(m.state_dict(), tmp_path / "nan.pt")
    r = ca.analyze(tmp_path / "nan.pt")
    assert r.layer("pw").stats.nonfinite == 2
    assert any("pw" in f and "NaN" in f for f in r.findings)
    assert r.layer("pw").stats.std == r.layer("pw").stats.std  # finite stats from finite values


def test_input_not_modified(cnn, tmp_path):
    path = _save_all(cnn, tmp_path)["state_dict"]
    before = path.read_bytes()
    ca.analyze(path)
    assert path.read_bytes() == before


def test_streamed_safetensors_never_look_tied(tmp_path):
    """The safetensors reader frees each tensor's buffer before reading the next, so a later
    tensor can land at a freed address: that must not count it as tied (it was, intermittently)."""
    tensors = {f"block{i}.norm.weight": torch.full((16,), float(i)) for i in range(300)}
    save_file(tensors, tmp_path / "many.safetensors")
    report = ca.analyze(tmp_path / "many.safetensors")
    assert report.total_params == 300 * 16
    assert report.tied_groups == []


def test_pt2_with_dynamic_batch_is_analyzed(tmp_path):
    """Sizes in a program exported with a dynamic batch are symbols: MACs come from their example
    values (int() on them raised a data-dependent guard error: exit 70)."""
    from compressadvise.model.analysis import analyze

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(model, (torch.rand(4, 3, 8, 8),), dynamic_shapes={"input": {0: batch}})
    torch.export.save(ep, tmp_path / "dyn.pt2")
    report = analyze(str(tmp_path / "dyn.pt2"), stats=False)
    macs = {x.name: x.macs for x in report.layers}
    assert macs == {"0": 4 * 8 * 6 * 6 * 27, "2": 4 * 4 * 288}
