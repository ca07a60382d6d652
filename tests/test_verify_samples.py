"""Sample files: .npz/.pt/.safetensors, folders, labels, slices, and clear refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from compressadvise.errors import InputNotFound
from compressadvise.model.samples import InvalidSamples, load_samples, random_samples


def data(n=6):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 1, 8, 8)), rng.integers(0, 10, n)


def test_npz_with_labels_slices_and_names(tmp_path):
    x, y = data()
    np.savez(tmp_path / "s.npz", inputs=x, labels=y, slices=np.array([0, 1, 0, 1, 0, 1]),
             slice_names=np.array(["indoor", "outdoor"]), class_names=np.array([str(i) for i in range(10)]))
    s = load_samples(tmp_path / "s.npz")
    assert len(s) == 6 and s.inputs[0].dtype == torch.float32  # float64 becomes float32
    assert torch.equal(s.labels, torch.from_numpy(y))
    assert s.slices == ["indoor", "outdoor"] * 3 and s.class_names[3] == "3"


def test_pt_and_safetensors_and_multi_input(tmp_path):
    from safetensors.torch import save_file

    x, y = data()
    torch.save({"inputs": torch.from_numpy(x).float(), "labels": torch.from_numpy(y), "slices": ["a"] * 6},
               tmp_path / "s.pt")
    s = load_samples(tmp_path / "s.pt")
    assert s.shapes() == [[6, 1, 8, 8]] and s.slices == ["a"] * 6
    save_file({"inputs_0": torch.zeros(4, 3), "inputs_1": torch.ones(4, 2, dtype=torch.int64)}, str(tmp_path / "m.safetensors"))
    m = load_samples(tmp_path / "m.safetensors")
    assert m.shapes() == [[4, 3], [4, 2]] and m.labels is None
    assert [t.shape[0] for t in m.batch(1, 3)] == [2, 2]


def test_folder_of_files_is_concatenated(tmp_path):
    x, y = data(6)
    np.savez(tmp_path / "a.npz", inputs=x[:4], labels=y[:4])
    np.savez(tmp_path / "b.npz", inputs=x[4:], labels=y[4:])
    (tmp_path / "README.txt").write_text("ignored")
    s = load_samples(tmp_path)
    assert len(s) == 6 and torch.equal(s.labels, torch.from_numpy(y))
    np.savez(tmp_path / "c.npz", inputs=x[:2])  # no labels: inconsistent folder
    with pytest.raises(InvalidSamples, match="some sample files have labels"):
        load_samples(tmp_path)


@pytest.mark.parametrize("content,match", [
    ({"images": np.zeros((2, 3))}, "no 'inputs' key"),
    ({"inputs": np.zeros((3, 2)), "labels": np.zeros(2)}, "2 labels for 3 samples"),
    ({"inputs_0": np.zeros((3, 2)), "inputs_1": np.zeros((2, 2))}, "inputs_1 has 2 samples, inputs_0 has 3"),
    ({"inputs": np.zeros((3, 2)), "slices": np.array([1, 2])}, "2 slice entries for 3 samples"),
    ({"inputs": np.array(5.0)}, "no samples"),
    ({"inputs": np.array(["a", "b"])}, "must be a numeric array"),
])
def test_bad_sample_files_say_what_is_wrong(tmp_path, content, match):
    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(InvalidSamples, match=match):
        load_samples(tmp_path / "bad.npz")


def test_refusals_and_missing(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "obj.npz", inputs=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InvalidSamples, match="object arrays"):
        load_samples(tmp_path / "obj.npz")
    torch.save({"inputs": torch.zeros(2), "obj": torch.nn.Linear(2, 2)}, tmp_path / "code.pt")
    with pytest.raises(InvalidSamples, match="plain data"):
        load_samples(tmp_path / "code.pt")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(InvalidSamples, match="unsupported sample file type"):
        load_samples(tmp_path / "x.csv")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidSamples, match="not a readable .npz"):
        load_samples(tmp_path / "junk.npz")
    with pytest.raises(InputNotFound):
        load_samples(tmp_path / "nope.npz")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InvalidSamples, match="holds no sample files"):
        load_samples(tmp_path / "emptydir")


def test_bundled_and_random():
    b = load_samples("bundled")
    assert b.kind == "bundled" and b.shapes() == [[360, 1, 8, 8]] and b.labels.dtype == torch.int64
    r = random_samples((torch.zeros(1, 3, 4, 4), torch.tensor([[3, 7]])), n=5)
    assert r.kind == "random" and r.shapes() == [[5, 3, 4, 4], [5, 2]]
    assert int(r.inputs[1].max()) <= 7 and "weak evidence" in r.warnings[0]
    with pytest.raises(InvalidSamples, match="no example input"):
        random_samples(None)
