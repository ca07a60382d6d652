"""Load a model from any supported format, detected by content, never unpickling by default.

Formats: TorchScript archives, torch.export programs (.pt2), state dicts (weights_only
torch.load), .safetensors (lazy, tensor by tensor), a Python factory `module:function`, the
bundled example, and a full pickled nn.Module only with `trust_pickle=True`. Archives are
inspected before torch opens them (archives.py): what torch would execute is refused.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from compressadvise.model.archives import check_pt2, check_torchscript, first_line, pt2_loading, quote
from compressadvise.errors import BadModel, CompressAdviseError, InputNotFound, UntrustedPickle
from compressadvise.fsutil import sha256_file

if TYPE_CHECKING:  # torch is imported lazily: `rules`/`explain` must start fast
    import torch

BUNDLED = "bundled"
_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ST_SIZES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}

FORMAT_NOTES = {
    "state_dict": "state dict: weight inventory only (no graph): MACs, activation sizes and "
    "Core ML conversion need the model code (`module:function`) or an exported program",
    "safetensors": "safetensors: weight inventory only (no graph): MACs, activation sizes and "
    "Core ML conversion need the model code (`module:function`) or an exported program",
}


@dataclass
class LoadedModel:
    """A model plus where it came from. `module` is set when eager PyTorch code is available."""

    source: str
    format: str
    sha256: str
    has_graph: bool
    module: Any = None  # torch.nn.Module (eager) when available
    exported: Any = None  # torch.export.ExportedProgram
    scripted: Any = None  # torch.jit.ScriptModule
    example_inputs: tuple | None = None
    notes: list[str] = field(default_factory=list)
    _tensors: Callable[[], Iterator[tuple[str, "torch.Tensor"]]] | None = None
    tensor_count: int | None = None  # known without reading, for progress bars
    # Streamed tensors live in fresh buffers that are freed one by one, so a later tensor may
    # reuse a freed address: storage identity means nothing (and safetensors cannot tie anyway).
    streamed: bool = False
    # Set by model.deploy.deployable: the BatchNorms folded into their convs (the form that ships).
    folds: tuple = ()
    deployed: bool = False
    program_module: Any = None  # a .pt2's runnable graph with those folds applied (sensitivity runs it)
    traced_program: Any = None  # an eager module's torch.export trace, when analysis needed one

    def tensors(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Yield (name, tensor) one at a time: large files are never materialised twice."""
        if self._tensors is not None:
            yield from self._tensors()
            return
        src = self.module or self.scripted
        if src is None and self.exported is not None:
            # Parameters only: the program's signature tells them from buffers (running statistics).
            params = set(self.exported.graph_signature.parameters)
            yield from ((n, t) for n, t in self.exported.state_dict.items() if n in params)
            return
        if src is not None:
            # remove_duplicate=False keeps tied weights visible; analysis counts them once.
            # Parameters only: buffers such as BatchNorm running statistics are not weights.
            for name, t in src.named_parameters(remove_duplicate=False):
                yield name, t.detach()

    @property
    def weight_only(self) -> bool:
        """No module, script or program: parameters and buffers cannot be told apart by the format."""
        return self.module is None and self.scripted is None and self.exported is None

    def buffers(self) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Non-parameter tensors the format marks as such (running statistics, masks, position ids);
        a weight-only file marks none (analysis recognises the usual names)."""
        src = self.module or self.scripted
        if src is not None:
            yield from ((n, b.detach()) for n, b in src.named_buffers())
        elif self.exported is not None:
            sd, consts = self.exported.state_dict, self.exported.constants
            for n in self.exported.graph_signature.buffers:
                b = sd.get(n, consts.get(n))
                if b is not None:
                    yield n, b

    def runnable(self) -> Any:
        """Something callable on inputs, or None for weight-only formats."""
        if self.module is not None:
            return self.module
        if self.scripted is not None:
            return self.scripted
        if self.program_module is not None:
            return self.program_module
        if self.exported is not None:
            return self.exported.module()
        return None


def _sniff(path: Path) -> str:
    """Guess the format from the file's bytes, not its extension."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise InputNotFound(f"{path}: cannot read it ({e.strerror or e})") from e
    if len(head) == 0:
        raise BadModel(f"{path} is empty")
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise BadModel(f"{path} looks like a zip archive but is corrupt or truncated ({e})") from e
        # Top-level entries only: a TorchScript archive of a model from a package named `models`
        # holds code/__torch__/models/..., which is no exported program.
        tops = {tuple(n.split("/")[1:2]) for n in names}
        if ("archive_format",) in tops or ("models",) in tops:
            return "exported"
        if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch_pickle"
        raise BadModel(f"{path} is a zip archive but not a PyTorch model")
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < 100_000_000:
            if n + 8 > path.stat().st_size:
                raise BadModel(f"{path}: corrupt safetensors file (header length {n} runs past "
                               f"the end of the file, {path.stat().st_size} bytes)")
            return "safetensors"
    if head[:1] == b"\x80":
        return "torch_pickle"  # legacy (pre-zip) torch.save format
    raise BadModel(
        f"{path} is not a recognised model format",
        hint="supported: TorchScript, torch.export .pt2, state dict, .safetensors, module:function",
    )


def _import_torch():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
    return torch


def tensor_hash(items: Iterator[tuple[str, Any]]) -> str:
    torch = _import_torch()
    h = hashlib.sha256()
    for name, t in items:
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        t = t.detach().contiguous().cpu()
        # numpy has no bfloat16: hash its bytes through a same-sized integer view
        # (the array's own buffer, not a bytes copy: a large tensor is not held twice)
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().reshape(-1))
    return h.hexdigest()


def _flatten_state_dict(obj: Any, torch) -> dict[str, Any] | None:
    """Accept {name: tensor} and the common {"state_dict": {...}} / {"model": {...}} wrappers."""
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in ("state_dict", "model", "model_state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict):
                found = _flatten_state_dict(inner, torch)
                if found is not None:
                    return found
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        return tensors or None
    return None


def _read_safetensors_header(path: Path) -> tuple[dict[str, Any], int, int]:
    """The header object, where the data starts and how many data bytes follow."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))  # _sniff checked 8 + n <= file size
        raw = f.read(n)
        size = os.fstat(f.fileno()).st_size
    header = json_object(raw, f"{path}: corrupt safetensors header", offset=8)
    return header, 8 + n, size - 8 - n


def json_object(raw: bytes, what: str, offset: int = 0) -> dict[str, Any]:
    """`raw` as a JSON object, or a one-line BadModel starting with `what` (safetensors headers,
    Hugging Face config files)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadModel(f"{what} (not UTF-8 at byte {offset + e.start})") from e
    except (ValueError, RecursionError) as e:
        raise BadModel(f"{what} (not JSON: {str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from e
    if not isinstance(obj, dict):
        raise BadModel(f"{what} (a JSON {type(obj).__name__}, not an object)")
    return obj


def _check_safetensors_header(path: Path, header: dict[str, Any], data_len: int) -> list[str]:
    """Validate every entry before any tensor is read; returns the names in storage order.
    Unchecked offsets read the header's own bytes as weights, or crash mid-analysis."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise BadModel(f"{path}: corrupt safetensors header (__metadata__ must be an object of strings)")
    spans = sorted((_check_safetensors_entry(path, name, entry, data_len), name)
                   for name, entry in header.items() if name != "__metadata__")
    for ((_, prev_end), prev), ((start, _), name) in zip(spans, spans[1:]):
        if start < prev_end:
            raise BadModel(f"{path}: corrupt safetensors header (tensors {quote(prev)} and "
                           f"{quote(name)} overlap)")
    return [name for _, name in spans]


def _check_safetensors_entry(path: Path, name: str, entry: Any, data_len: int) -> tuple[int, int]:
    def bad(why: str) -> BadModel:
        return BadModel(f"{path}: corrupt safetensors header (tensor {quote(name)} {why})")

    if not isinstance(entry, dict):
        raise bad(f"is a JSON {type(entry).__name__}, not an object with dtype, shape and data_offsets")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise bad(f"has unknown dtype {_brief(dtype)}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {_brief(shape)}, not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise bad(f"has data_offsets {_brief(offsets)}, not [start, end]")
    start, end = offsets
    if start < 0 or end < start:
        raise bad(f"has data_offsets [{start}, {end}]: negative or reversed")
    if end > data_len:
        raise bad(f"runs past the end of the file (to byte {end} of {data_len} data bytes)")
    nbytes = math.prod(shape) * _ST_SIZES[dtype]
    if nbytes != end - start:
        raise bad(f"has shape {shape} of {dtype} ({nbytes} bytes) but data_offsets span {end - start} bytes")
    return start, end


def _brief(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:56] + "..."


def _load_safetensors(path: Path, digest: str) -> LoadedModel:
    header, data_start, data_len = _read_safetensors_header(path)
    # The file keeps no module order; the storage order (data offsets) is the best guess.
    names = _check_safetensors_header(path, header, data_len)

    def iterate() -> Iterator[tuple[str, Any]]:
        # Plain reads into a fresh buffer per tensor (not one long-lived mmap): resident memory
        # stays at about the largest tensor instead of growing with the file.
        torch = _import_torch()
        with open(path, "rb") as f:
            for name in names:
                meta = header[name]
                start, end = meta["data_offsets"]
                f.seek(data_start + start)
                buf = bytearray(end - start)
                if f.readinto(buf) != len(buf):  # the file shrank since it was checked
                    raise BadModel(f"{path}: truncated safetensors file (tensor {quote(name)})")
                dtype = getattr(torch, _ST_DTYPES[meta["dtype"]])
                t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                yield name, t.reshape(meta["shape"])

    notes = [FORMAT_NOTES["safetensors"], "safetensors keeps no module order: layer positions "
             "(first/last/boundary) follow the file's storage order"]
    return LoadedModel(str(path), "safetensors", digest, has_graph=False, notes=notes,
                       _tensors=iterate, tensor_count=len(names), streamed=True)


def mmap_safetensors(path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """Every tensor of a .safetensors file as a view of one copy-on-write memory map, for a factory
    to assign into a model built on the meta device (`load_state_dict(..., assign=True)`): nothing is
    copied or upcast, pages are read when touched, and writes (apply compressing in place) stay
    private to the process: the file is never modified. The header is checked as the loader does."""
    import mmap

    torch = _import_torch()
    path = Path(path)
    if _sniff(path) != "safetensors":
        raise BadModel(f"{path} is not a safetensors file")
    header, data_start, data_len = _read_safetensors_header(path)
    names = _check_safetensors_header(path, header, data_len)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if data_len else None
    out = {}
    for name in names:
        meta = header[name]
        start, end = meta["data_offsets"]
        dtype = getattr(torch, _ST_DTYPES[meta["dtype"]])
        if end == start:
            out[name] = torch.empty(meta["shape"], dtype=dtype)
            continue
        flat = torch.frombuffer(mm, dtype=dtype, count=(end - start) // _ST_SIZES[meta["dtype"]],
                                offset=data_start + start)
        out[name] = flat.reshape(meta["shape"])
    return out


def _load_torch_pickle(path: Path, digest: str, trust_pickle: bool) -> LoadedModel:
    torch = _import_torch()
    try:
        obj = torch.load(str(path), weights_only=True, mmap=True, map_location="cpu")
    except RuntimeError as e:
        if "mmap" in str(e):  # legacy (non-zip) files cannot be memory-mapped
            obj = _weights_only_load(torch, path, trust_pickle)
        else:
            raise BadModel(f"{path}: could not read the archive ({first_line(e)})") from e
    except Exception as e:
        obj = _refuse_or_unpickle(torch, path, e, trust_pickle)
    if isinstance(obj, torch.nn.Module):
        return LoadedModel(str(path), "pickle", digest, has_graph=True, module=obj.eval(),
                           notes=["full pickle loaded with --trust-pickle (code from the file ran)"])
    sd = _flatten_state_dict(obj, torch)
    if not sd:
        raise BadModel(f"{path} holds no tensors (an empty model or not a state dict)")
    return LoadedModel(str(path), "state_dict", digest, has_graph=False,
                       notes=[FORMAT_NOTES["state_dict"]], _tensors=lambda: iter(sd.items()))


def _weights_only_load(torch, path: Path, trust_pickle: bool) -> Any:
    try:
        return torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as e:
        return _refuse_or_unpickle(torch, path, e, trust_pickle)


def _refuse_or_unpickle(torch, path: Path, err: Exception, trust_pickle: bool) -> Any:
    import pickle

    text = str(err)
    is_code = isinstance(err, pickle.UnpicklingError) or "weights_only" in text or "GLOBAL" in text
    if not is_code:
        raise BadModel(f"{path}: corrupt or truncated PyTorch file ({first_line(err)})") from err
    if not trust_pickle:
        raise UntrustedPickle(
            f"{path} is a full pickle: loading it would run code stored in the file",
            hint="export it (torch.export.save / torch.jit.save) or save a state dict; "
            "or pass --trust-pickle if you trust its author",
        )
    # Reachable only behind the explicit --trust-pickle flag.
    return torch.load(str(path), weights_only=False, map_location="cpu")


_MODEL_SUFFIXES = {"pt", "pt2", "pth", "bin", "ckpt", "ts", "safetensors", "onnx", "mlpackage", "mlmodel"}


def is_callable_spec(spec: str) -> bool:
    """`pkg.mod:func`, every part a Python identifier. Anything else (`train:best.pt2`, a path
    with a colon) is never imported: a mistyped model path must not run ./train.py. Nor is
    `model.pt:x`, a model file name, though its parts are identifiers (it would import ./model.py)."""
    modname, sep, fn = spec.partition(":")
    parts = modname.split(".")
    return (bool(sep) and fn.isidentifier() and all(part.isidentifier() for part in parts)
            and not (len(parts) > 1 and parts[-1].lower() in _MODEL_SUFFIXES))


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """`module:function` -> the function, importing from the current folder too (user code).
    `what` names it in errors, e.g. "factory" or "evaluator"."""
    spec = str(spec)
    if not is_callable_spec(spec):
        raise InputNotFound(f"{what} {spec!r} must look like module:function "
                            "(Python identifiers, e.g. mypkg.models:build)")
    modname, _, fn = spec.partition(":")
    sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(modname)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0]
        raise InputNotFound(f"cannot import {what} module {modname!r}: {type(e).__name__}: {first}") from e
    finally:
        sys.path.pop(0)
    func = getattr(mod, fn, None)
    if not callable(func):
        raise InputNotFound(f"{what} module {modname!r} has no callable {fn!r}")
    return func


def _load_factory(spec: str) -> LoadedModel:
    torch = _import_torch()
    factory = import_callable(spec, "factory")
    try:
        model = factory()
    except Exception as e:
        raise BadModel(f"factory {spec!r} raised {type(e).__name__}: {e}") from e
    example = None
    if isinstance(model, tuple):  # a factory may return (module, example_inputs)
        model, example = model
    if not isinstance(model, torch.nn.Module):
        raise BadModel(f"factory {spec!r} returned {type(model).__name__}, not an nn.Module")
    model.eval()
    digest = tensor_hash(model.state_dict().items())
    return LoadedModel(spec, "factory", digest, has_graph=True, module=model,
                       example_inputs=example)


def load_model(source: str | os.PathLike | None = None, *, trust_pickle: bool = False) -> LoadedModel:
    """Load a model. `None` or "bundled" gives the bundled digits example."""
    if source is None or str(source) == BUNDLED:
        from compressadvise.examples import digits

        return digits.load()
    spec = str(source)
    path = Path(spec)
    if not path.exists():
        if is_callable_spec(spec):
            return _load_factory(spec)
        hint = "a factory must look like package.module:function" if ":" in spec else None
        raise InputNotFound(f"{spec}: no such file", hint=hint)
    if path.is_dir():
        from compressadvise.model.hf import is_hf_folder, load_hf_folder  # lazy: hf imports this module

        if is_hf_folder(path):
            return load_hf_folder(path, trust_pickle=trust_pickle)
        raise InputNotFound(f"{spec} is a directory, not a model file")
    fmt = _sniff(path)
    digest = sha256_file(path)
    if fmt == "safetensors":
        return _load_safetensors(path, digest)
    if fmt == "torch_pickle":
        return _load_torch_pickle(path, digest, trust_pickle)
    if fmt == "torchscript":
        return _load_torchscript(path, digest)
    return _load_exported(path, digest, trust_pickle)


def _load_torchscript(path: Path, digest: str) -> LoadedModel:
    check_torchscript(path)  # a clear reason for a foreign pickle (torch's own error is blank)
    torch = _import_torch()
    try:
        scripted = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise BadModel(f"{path}: corrupt TorchScript archive ({first_line(e)})") from e
    return LoadedModel(str(path), "torchscript", digest, has_graph=True, scripted=scripted)


def _load_exported(path: Path, digest: str, trust_pickle: bool) -> LoadedModel:
    torch = _import_torch()
    check_pt2(path, torch, trust_pickle)  # before torch: it would run what the archive holds
    with pt2_loading(torch, path, trust_pickle) as log:
        try:
            ep = torch.export.load(str(path))
        except CompressAdviseError:
            raise
        except Exception as e:
            raise BadModel(f"{path}: corrupt torch.export archive ({log.reason(e)})") from e
    example = None
    if ep.example_inputs is not None:
        example = tuple(ep.example_inputs[0])
    return LoadedModel(str(path), "exported", digest, has_graph=True, exported=ep,
                       example_inputs=example)
