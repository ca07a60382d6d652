"""Hostile model files: nothing in a model file runs before the user says they trust it, and
malformed files give one line and exit 4, never a traceback.

Each test builds its own hostile file from a real torch.export / TorchScript / safetensors
file; the ones that carry code prove it by running it once trusted (the marker file appears).
"""
from __future__ import annotations

from cli_helpers import call_main

import io
import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import compressadvise as ca
from compressadvise.errors import BadModel, InputNotFound, UntrustedPickle


# ------------------------------------------------------------------ helpers
def run_cli(capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of the real CLI, in this process."""
    capsys.readouterr()
    code = call_main(*args)
    return code, capsys.readouterr().err


def run_subprocess(*args: str) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter: sees everything torch prints, tracebacks included."""
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-c", "from compressadvise.ui.cli import main; main()", *args],
                          capture_output=True, text=True, env=env, timeout=300)


class Gadget:
    """Unpickles by calling eval: writes the marker file, then returns a valid tensor."""

    def __init__(self, marker: Path, shape: tuple[int, ...], param: bool = False):
        self.marker, self.shape, self.param = marker, shape, param

    def __reduce__(self):
        tensor = f"__import__('torch').ones({self.shape})"
        if self.param:
            tensor = f"__import__('torch').nn.Parameter({tensor})"
        return (eval, (f"(open({str(self.marker)!r}, 'w').close(), {tensor})[1]",))


def saved(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def rewrite(src: Path, dst: Path, edits: dict[str, bytes | None]) -> Path:
    """Copy a zip archive, replacing (bytes), dropping (None) or adding entries, named below
    the archive's top folder."""
    with zipfile.ZipFile(src) as z:
        names = z.namelist()
        root = names[0].split("/")[0] + "/"
        with zipfile.ZipFile(dst, "w") as out:
            for name in names:
                rel = name[len(root):]
                if rel not in edits:
                    out.writestr(name, z.read(name))
                elif edits[rel] is not None:
                    out.writestr(name, edits[rel])
            for rel, data in edits.items():
                if root + rel not in names and data is not None:
                    out.writestr(root + rel, data)
    return dst


def read_json(src: Path, rel: str) -> Any:
    with zipfile.ZipFile(src) as z:
        return json.loads(z.read(z.namelist()[0].split("/")[0] + "/" + rel))


def edit_json(src: Path, dst: Path, rel: str, edit: Callable[[Any], Any]) -> Path:
    return rewrite(src, dst, {rel: json.dumps(edit(read_json(src, rel))).encode()})


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.c = torch.tensor([1.0, 2.0, 3.0])  # a plain tensor attribute: a lifted constant

    def forward(self, x):
        return (self.fc(x) + self.c).reshape(x.shape[0] * 3)


@pytest.fixture(scope="module")
def pt2(tmp_path_factory) -> Path:
    """A clean .pt2 with a dynamic batch size (so symbolic shape expressions are in it)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clean") / "tiny.pt2"
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(Tiny().eval(), (torch.randn(4, 4),), dynamic_shapes=({0: batch},))
    torch.export.save(ep, path)
    return path


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "pwned"


def refused(path: Path, marker: Path) -> UntrustedPickle:
    with pytest.raises(UntrustedPickle) as e:
        ca.load_model(path)
    assert not marker.exists(), "the file's code ran before it was refused"
    assert "would run code stored in the file" in str(e.value) and "--trust-pickle" in e.value.one_line()
    assert "\n" not in e.value.one_line()
    return e.value


# ------------------------------------------------------------------ 1. .pt2 pickles
def test_clean_pt2_loads_and_runs(pt2):
    loaded = ca.load_model(pt2)
    assert loaded.format == "exported" and loaded.example_inputs[0].shape == (4, 4)
    assert loaded.runnable()(torch.randn(6, 4)).shape == (18,)


def test_pt2_pickled_weight_refused_until_trusted(pt2, tmp_path, marker, capsys):
    config = read_json(pt2, "data/weights/model_weights_config.json")
    entry = config["config"]["fc.weight"]
    entry["use_pickle"] = True
    evil = rewrite(pt2, tmp_path / "evil.pt2", {
        "data/weights/model_weights_config.json": json.dumps(config).encode(),
        "data/weights/" + entry["path_name"]: saved(Gadget(marker, (3, 4), param=True)),
    })
    err = refused(evil, marker)
    assert "'fc.weight' is stored as a pickle" in str(err)
    for command in ("analyze", "recommend"):
        code, stderr = run_cli(capsys, command, evil)
        assert code == 5 and stderr.startswith("error:") and "--trust-pickle" in stderr, stderr
        assert not marker.exists()
    loaded = ca.load_model(evil, trust_pickle=True)  # the gadget really is code, and a tensor
    assert marker.exists() and loaded.format == "exported"


def test_pt2_pickled_plain_tensor_still_loads(pt2, tmp_path):
    """Tensor subclasses (torchao's quantized weights) are pickled too: a pickle torch's
    restricted unpickler accepts names no foreign code and loads without trust."""
    config = read_json(pt2, "data/weights/model_weights_config.json")
    entry = config["config"]["fc.weight"]
    entry["use_pickle"] = True
    weight = nn.Parameter(torch.full((3, 4), 0.5))
    path = rewrite(pt2, tmp_path / "pickled.pt2", {
        "data/weights/model_weights_config.json": json.dumps(config).encode(),
        "data/weights/" + entry["path_name"]: saved(weight),
    })
    assert dict(ca.load_model(path).tensors())["fc.weight"].eq(0.5).all()


def test_pt2_pickled_constant_refused(pt2, tmp_path, marker):
    config = read_json(pt2, "data/constants/model_constants_config.json")
    (fqn, entry), = config["config"].items()
    entry["use_pickle"] = True
    evil = rewrite(pt2, tmp_path / "evil.pt2", {
        "data/constants/model_constants_config.json": json.dumps(config).encode(),
        "data/constants/" + entry["path_name"]: saved(Gadget(marker, (3,))),
    })
    assert f"constant {fqn!r} is stored as a pickle" in str(refused(evil, marker))
    ca.load_model(evil, trust_pickle=True)
    assert marker.exists()


def test_pt2_pickled_sample_inputs_refused(pt2, tmp_path, marker):
    """torch loads sample inputs weights_only, then falls back to a full unpickle."""
    evil = rewrite(pt2, tmp_path / "evil.pt2",
                   {"data/sample_inputs/model.pt": saved(((Gadget(marker, (4, 4)),), {}))})
    assert "sample inputs" in str(refused(evil, marker))
    ca.load_model(evil, trust_pickle=True)
    assert marker.exists()


def test_pt2_legacy_weights_pickle_refused(pt2, tmp_path, marker):
    """A legacy single-file payload goes through the same weights_only=False fallback."""
    evil = rewrite(pt2, tmp_path / "evil.pt2", {"data/weights/model.pt": saved({
        "fc.weight": Gadget(marker, (3, 4)), "fc.bias": torch.zeros(3)})})
    assert "full pickle" in str(refused(evil, marker))


def test_pt2_native_code_refused(pt2, tmp_path, marker):
    evil = rewrite(pt2, tmp_path / "evil.pt2", {"data/aotinductor/model/model.so": b"\x7fELF"})
    assert "AOTInductor" in str(refused(evil, marker))


# ------------------------------------------------------------------ 1b. .pt2 strings torch runs
def _first_expr(node: Any) -> dict | None:
    if isinstance(node, dict):
        if isinstance(node.get("expr_str"), str):
            return node
        children = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return None
    return next((found for child in children if (found := _first_expr(child)) is not None), None)


def test_pt2_sympy_expression_refused(pt2, tmp_path, marker):
    """sympy.sympify evals the expression strings of symbolic shapes."""
    def inject(program: dict) -> dict:
        node = _first_expr(program)
        node["expr_str"] = f"Add({node['expr_str']}, Integer(0*len(open({str(marker)!r}, 'w').name)))"
        return program

    evil = edit_json(pt2, tmp_path / "evil.pt2", "models/model.json", inject)
    assert "symbolic shape expression" in str(refused(evil, marker))
    ca.load_model(evil, trust_pickle=True)
    assert marker.exists()


def test_pt2_guard_code_refused(pt2, tmp_path, marker):
    """ExportedProgram.module() compiles the archive's guards_code into its forward."""
    def inject(program: dict) -> dict:
        program["guards_code"].append(f"open({str(marker)!r}, 'w').close() is None")
        return program

    evil = edit_json(pt2, tmp_path / "evil.pt2", "models/model.json", inject)
    assert "shape guard" in str(refused(evil, marker))
    ca.load_model(evil, trust_pickle=True).runnable()(torch.randn(4, 4))  # guards run per call
    assert marker.exists()


def test_pt2_input_name_refused(pt2, tmp_path, marker):
    """Input names are pasted into the Python source torch.fx generates and execs."""
    payload = f"x=open({str(marker)!r}, 'w').close()"
    text = json.dumps(read_json(pt2, "models/model.json")).replace('"x"', json.dumps(payload))
    evil = rewrite(pt2, tmp_path / "evil.pt2", {"models/model.json": text.encode()})
    assert "is not a plain name" in str(refused(evil, marker))
    ca.load_model(evil, trust_pickle=True)
    assert marker.exists()


class DictInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, batch):
        return self.fc(next(iter(batch.values())))


def test_pt2_input_key_refused(tmp_path, marker):
    """A dict input's key ends up inside the guard code torch generates and execs: an
    honestly exported model with such a key is enough, no tampering needed."""
    spelled = "+".join(f"chr({ord(c)})" for c in str(marker))  # no quotes: repr keeps it as is
    key = f'"+str(open({spelled}, chr(119)).close())+"'
    path = tmp_path / "dict.pt2"
    torch.export.save(torch.export.export(DictInput().eval(), ({key: torch.randn(2, 4)},)), path)
    assert "sample input key" in str(refused(path, marker))
    ca.load_model(path, trust_pickle=True).runnable()({key: torch.randn(2, 4)})
    assert marker.exists()


# ------------------------------------------------------------------ 5. malformed .pt2
@pytest.mark.parametrize("case", ["weights config", "sample inputs", "weight bytes", "duplicate"])
def test_junk_pt2_is_one_line_exit_4(pt2, tmp_path, case):
    config = "data/weights/model_weights_config.json"
    first_weight = "data/weights/" + read_json(pt2, config)["config"]["fc.weight"]["path_name"]
    edits = {"weights config": {config: b"{not json"}, "sample inputs": {"data/sample_inputs/model.pt": None},
             "weight bytes": {first_weight: None}}
    bad = tmp_path / "bad.pt2"
    if case == "duplicate":
        rewrite(pt2, bad, {})
        with zipfile.ZipFile(bad, "a") as z, pytest.warns(UserWarning):  # a second model.json
            z.writestr(z.namelist()[0].split("/")[0] + "/models/model.json", b"{}")
    else:
        rewrite(pt2, bad, edits[case])
    r = run_subprocess("analyze", str(bad))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 4, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in r.stderr, r.stderr


def test_junk_pt2_missing_configs(pt2, tmp_path):
    bad = rewrite(pt2, tmp_path / "bad.pt2", {"data/constants/model_constants_config.json": None})
    with pytest.raises(BadModel, match="model_constants_config.json' is missing"):
        ca.load_model(bad)
    bad = rewrite(pt2, tmp_path / "bad2.pt2", {"data/weights/model_weights_config.json": b'{"config": 5}'})
    with pytest.raises(BadModel, match="not a payload config"):
        ca.load_model(bad)


# ------------------------------------------------------------------ 2. TorchScript
class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.fc = nn.Linear(5, 2)

    def forward(self, x):
        y = self.bn(self.conv(x)).mean((2, 3)).unsqueeze(1)
        out, _ = self.lstm(y)
        return self.fc(out[:, -1]) * torch.tensor([1.0, 2.0])  # a constant: constants.pkl


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ts") / "net.ts"
    with pytest.warns(torch.jit.TracerWarning):  # the torch.tensor constant, on purpose
        torch.jit.save(torch.jit.trace(Net().eval(), torch.randn(1, 3, 8, 8)), path)
    return path


class SystemCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_torchscript_from_torch_loads(scripted, tmp_path):
    assert ca.load_model(scripted).format == "torchscript"
    path = tmp_path / "script.ts"  # scripting writes other globals than tracing (type tags, lists)
    torch.jit.save(torch.jit.script(Net().eval()), path)
    assert ca.load_model(path).runnable()(torch.randn(1, 3, 8, 8)).shape == (1, 2)


@pytest.mark.parametrize("entry", ["constants.pkl", "data.pkl"])
def test_torchscript_foreign_global_refused_with_reason(scripted, tmp_path, marker, capsys, entry):
    import pickle

    evil = rewrite(scripted, tmp_path / "evil.ts", {entry: pickle.dumps((SystemCall(marker),), protocol=2)})
    with pytest.raises(BadModel, match=rf"{entry} names the Python callable '(posix|os)\.system'"):
        ca.load_model(evil)
    code, stderr = run_cli(capsys, "analyze", evil)
    assert code == 4 and stderr.count("\n") == 1 and "torch.jit.save" in stderr, stderr
    assert not marker.exists()


def test_torchscript_foreign_opcode_refused(scripted, tmp_path):
    import pickle

    evil = rewrite(scripted, tmp_path / "evil.ts", {"constants.pkl": pickle.dumps((print,), protocol=4)})
    with pytest.raises(BadModel, match="pickle opcode STACK_GLOBAL"):
        ca.load_model(evil)


# ------------------------------------------------------------------ 3. module:function
@pytest.mark.parametrize("spec", ["train:best.pt2", "models/x.pt:foo", "train.pt2:foo", "train:",
                                  "train:best:x"])
def test_missing_path_with_colon_is_not_imported(tmp_path, monkeypatch, spec):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "imported"
    (tmp_path / "train.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef best():\n    pass\n")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "x.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(InputNotFound) as e:
        ca.load_model(spec)
    assert e.value.exit_code == 3 and "no such file" in str(e.value)
    assert not marker.exists()
    sys.modules.pop("train", None)


def test_evaluator_spec_must_be_identifiers(tmp_path, monkeypatch):
    from compressadvise.model.loading import import_callable

    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "imported"
    (tmp_path / "train.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(InputNotFound, match="must look like module:function"):
        import_callable("train:best.pt2", "evaluator")
    assert not marker.exists()


def test_model_help_says_factories_run_code():
    from compressadvise.commands.common import MODEL_ARG

    assert "imports and runs" in MODEL_ARG.help


# ------------------------------------------------------------------ 4. safetensors headers
def st_file(path: Path, header: Any, data: bytes = b"\0" * 16, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def f32(offsets: Any, shape: Any = (2,)) -> dict:
    shape = list(shape) if isinstance(shape, tuple) else shape
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


@pytest.mark.parametrize("header,why", [
    ({"w": f32([-8, 0])}, "'w' has data_offsets [-8, 0]: negative"),
    ({"w": f32([8, 0])}, "'w' has data_offsets [8, 0]: negative or reversed"),
    ({"a": f32([0, 8]), "b": f32([4, 12])}, "tensors 'a' and 'b' overlap"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "'w' has data_offsets None, not [start, end]"),
    ({"w": f32([0, 8], (3,))}, "'w' has shape [3] of F32 (12 bytes) but data_offsets span 8"),
    ({"w": f32([0, 8], (-2,))}, "'w' has shape"),
    ({"w": f32([0, 8], "2")}, "'w' has shape '2', not a list"),
    ({"w": 5}, "'w' is a JSON int, not an object"),
    ({"w": [1, 2]}, "'w' is a JSON list"),
    ({"w": f32([0, 64], (16,))}, "'w' runs past the end of the file"),
    ({"w": {"dtype": "F8", "shape": [2], "data_offsets": [0, 2]}}, "'w' has unknown dtype 'F8'"),
    ({"w": f32([0, 8.0])}, "'w' has data_offsets [0, 8.0], not [start, end]"),
    ({"__metadata__": {"format": 1}, "w": f32([0, 8])}, "__metadata__ must be an object of strings"),
    ({"__metadata__": ["x"], "w": f32([0, 8])}, "__metadata__ must be an object of strings"),
    (b'{"w\xff": 1}', "not UTF-8 at byte 11"),
    (b'{"w": ', "not JSON"),
])
def test_bad_safetensors_header_is_bad_model(tmp_path, capsys, header, why):
    path = st_file(tmp_path / "bad.safetensors", header)
    with pytest.raises(BadModel) as e:
        ca.load_model(path)  # checked up front, before any tensor is read
    assert why in str(e.value) and "\n" not in e.value.one_line()
    code, stderr = run_cli(capsys, "analyze", path)
    assert code == 4 and stderr.startswith("error:") and stderr.count("\n") == 1, stderr


def test_safetensors_header_past_eof(tmp_path):
    path = st_file(tmp_path / "cut.safetensors", {"w": f32([0, 8])}, data=b"", length=4096)
    with pytest.raises(BadModel, match="header length 4096 runs past the end"):
        ca.load_model(path)


def test_valid_safetensors_edge_cases_load(tmp_path):
    """Metadata, an empty tensor and a gap between tensors are all fine."""
    header = {"__metadata__": {"format": "pt"}, "empty": f32([0, 0], (0, 3)),
              "w": f32([0, 8]), "b": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]}}
    path = st_file(tmp_path / "ok.safetensors", header, data=struct.pack("<2f", 1.5, 2.5) + b"\0" * 8
                   + struct.pack("<q", 7))
    tensors = dict(ca.load_model(path).tensors())
    assert tensors["w"].tolist() == [1.5, 2.5] and tensors["b"].tolist() == [7]
    assert tensors["empty"].shape == (0, 3)
