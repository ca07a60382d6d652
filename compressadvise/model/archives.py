"""Inspect PyTorch zip archives before torch opens them, executing nothing.

`torch.export.load` trusts its input: it unpickles entries marked `use_pickle` with
weights_only=False, falls back to a full unpickle for sample inputs, loads AOTInductor shared
libraries, hands symbolic-shape strings to sympy (which evals them), execs the archive's guard
code and pastes names from the archive into the Python source it generates for the graph.
`torch.jit.load` is confined to TorchScript, but its error for a foreign pickle is blank.
So the loader reads the archive's bytes and JSON here first and refuses, with the reason, what
torch would execute; `trust_pickle` skips the content checks (the structure is still checked).
"""
from __future__ import annotations

import ast
import contextlib
import functools
import io
import json
import logging
import pickletools
import re
import zipfile
import zlib
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from compressadvise.errors import BadModel, UntrustedPickle

_MAX_ENTRY = 1 << 30  # bytes of one JSON/pickle entry read into memory (a zip bomb stops here)
TRUST_HINT = "pass --trust-pickle only if you trust its author"
_CODE = "loading would run code stored in the file"

# ------------------------------------------------------------------ the zip container


class Archive:
    """A zip archive as torch's reader sees it: every entry inside one top folder (the first
    entry's), names matched case-insensitively (miniz does), so duplicates are refused."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._zip = zipfile.ZipFile(path)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise BadModel(f"{path} looks like a zip archive but is corrupt or truncated ({e})") from e
        if not infos or "/" not in infos[0].filename:
            raise BadModel(f"{path}: zip archive without the top folder every PyTorch archive has")
        self.root = infos[0].filename.split("/", 1)[0] + "/"
        self._entries: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if not info.filename.startswith(self.root):
                raise BadModel(f"{path}: entry {quote(info.filename)} is outside the archive's "
                               f"folder {quote(self.root)} (torch refuses such archives)")
            rel = info.filename[len(self.root):]
            if info.is_dir() or not rel:
                continue
            if rel.lower() in self._entries:
                raise BadModel(f"{path}: entry {quote(rel)} appears twice: which copy torch reads "
                               "is undefined, so the archive cannot be checked")
            self._entries[rel.lower()] = info

    def size(self, rel: str) -> int:
        info = self._entries.get(rel.lower())
        return info.file_size if info is not None else 0

    def names(self) -> list[str]:
        return [info.filename[len(self.root):] for info in self._entries.values()]

    def has(self, rel: str) -> bool:
        return rel.lower() in self._entries

    def read(self, rel: str) -> bytes:
        info = self._entries.get(rel.lower())
        if info is None:
            raise BadModel(f"{self.path}: archive entry {quote(rel)} is missing")
        if info.file_size > _MAX_ENTRY:
            raise BadModel(f"{self.path}: archive entry {quote(rel)} is implausibly large "
                           f"({info.file_size} bytes)")
        try:
            return self._zip.read(info)
        except (zipfile.BadZipFile, zlib.error, OSError, EOFError, RuntimeError, NotImplementedError) as e:
            raise BadModel(f"{self.path}: archive entry {quote(rel)} is unreadable ({e})") from e

    def open(self, rel: str) -> IO[bytes]:
        """A seekable stream over one entry: torch.load can read just the pickle from it."""
        info = self._entries.get(rel.lower())
        if info is None:
            raise BadModel(f"{self.path}: archive entry {quote(rel)} is missing")
        return self._zip.open(info)

    def json(self, rel: str) -> Any:
        try:
            return json.loads(self.read(rel).decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise BadModel(f"{self.path}: archive entry {quote(rel)} is not valid JSON "
                           f"({first_line(e)})") from e

    def close(self) -> None:
        self._zip.close()


def quote(text: str, limit: int = 80) -> str:
    """A name from the file, quoted and cut, safe in a one-line message."""
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 4] + "...'"


def first_line(err: BaseException) -> str:
    """The line of an error message that says what went wrong (torch's weights_only errors
    open with a paragraph of advice; the reason is on its own line further down)."""
    text = str(err)
    reason = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (reason.group(1).strip() if reason else lines[0] if lines else type(err).__name__)[:200]


def _untrusted(path: Path, what: str) -> UntrustedPickle:
    return UntrustedPickle(f"{path}: {what}: {_CODE}", hint=TRUST_HINT)


# ------------------------------------------------------------------ torch.export (.pt2)
# Constants mirror torch/export/pt2_archive/constants.py (torch 2.13).
_WEIGHTS_DIR, _CONSTANTS_DIR, _AOTI_DIR = "data/weights/", "data/constants/", "data/aotinductor/"
_PICKLED_CONSTANT_PREFIXES = ("custom_obj_", "opaque_obj_")  # torchbind / pickle.loads payloads


def check_pt2(path: Path, torch: Any, trust_pickle: bool) -> None:
    """Refuse a .pt2 that is malformed (BadModel) or that torch.export.load would make run
    code from the file (UntrustedPickle, unless trusted)."""
    arc = Archive(path)
    try:
        if arc.read("archive_format").strip() != b"pt2":
            raise BadModel(f"{path}: not a torch.export archive (archive_format is not 'pt2')")
        names = arc.names()
        # torch loads every models/ entry, naming the program by cutting 5 characters (".json")
        programs = {n[len("models/"):-len(".json")]: n for n in names if n.startswith("models/")}
        if "model" not in programs:
            raise BadModel(f"{path}: torch.export archive without models/model.json")
        aoti = [n for n in names if n.lower().startswith(_AOTI_DIR)]
        if aoti and not trust_pickle:
            raise _untrusted(path, f"it holds AOTInductor compiled code ({quote(aoti[0])}), "
                             "a native library torch would load")
        for model, entry in programs.items():
            _check_model(arc, torch, model, entry, set(names), trust_pickle)
    finally:
        arc.close()


def _check_model(arc: Archive, torch: Any, model: str, entry: str, names: set[str],
                 trust_pickle: bool) -> None:
    program = arc.json(entry)
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise BadModel(f"{arc.path}: {entry} is not a serialized exported program")
    samples = f"data/sample_inputs/{model}.pt"
    if not arc.has(samples):  # torch reads it unconditionally
        raise BadModel(f"{arc.path}: archive entry {quote(samples)} is missing")
    if not trust_pickle:
        _check_program(arc.path, program)
        _check_sample_inputs(arc, torch, samples)
    for folder, kind in ((_WEIGHTS_DIR, "weight"), (_CONSTANTS_DIR, "constant")):
        if f"{folder}{model}.pt" in names:  # exact match, as torch tests it
            continue  # legacy single-pickle payload: goes through the strict artifact loader
        config_entry = f"{folder}{model}_{kind}s_config.json"
        _check_payload_config(arc, torch, arc.json(config_entry), config_entry, folder, kind, trust_pickle)


def _check_payload_config(arc: Archive, torch: Any, config: Any, where: str, folder: str, kind: str,
                          trust_pickle: bool) -> None:
    entries = config.get("config") if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise BadModel(f"{arc.path}: {where} is not a payload config (no 'config' object)")
    for fqn, meta in entries.items():
        if not isinstance(meta, dict) or not isinstance(meta.get("path_name"), str):
            raise BadModel(f"{arc.path}: {where}: {kind} {quote(fqn)} has no path_name")
        name = meta["path_name"]
        if not arc.has(folder + name):
            raise BadModel(f"{arc.path}: archive entry {quote(folder + name)} "
                           f"({kind} {quote(fqn)}) is missing")
        if trust_pickle:
            continue
        if name.startswith(_PICKLED_CONSTANT_PREFIXES):  # torchbind / plain pickle.loads objects
            raise _untrusted(arc.path, f"{kind} {quote(fqn)} is a pickled Python object "
                             f"({quote(folder + name)}), not a tensor")
        if meta.get("use_pickle"):  # tensor subclasses (torchao weights): torch unpickles them fully
            restricted_load(arc.path, torch, lambda: arc.open(folder + name),
                            f"{kind} {quote(fqn)} is stored as a pickle ({quote(folder + name)}) that "
                            "holds more than tensors", folder + name)
        if not _is_name(fqn):
            raise _untrusted(arc.path, f"{kind} name {quote(fqn)} is not a plain name "
                             "(torch pastes it into generated Python code)")


def restricted_load(path: Path, torch: Any, opener: Callable[[], IO[bytes]], what: str, where: str,
                    devices: tuple[str, ...] = ("meta", "cpu")) -> Any:
    """Load a torch.save payload with torch's restricted unpickler (weights_only: torch's own
    types and those registered as safe, e.g. torchao's tensor subclasses). A check loads onto
    the meta device first, reading the pickle but not the tensor bytes. A pickle naming
    anything else could run code: UntrustedPickle, saying `what` it is."""
    retried = False
    while True:
        for device in devices:
            try:
                with opener() as f:
                    return torch.load(f, weights_only=True, map_location=device)
            except Exception as e:
                err = e
                if _names_foreign_code(e):
                    break  # another device would not help
        if not _names_foreign_code(err):
            raise BadModel(f"{path}: corrupt torch.export archive ({where}: {first_line(err)})") from err
        if retried or "torchao." not in str(err) or not _import_torchao():
            raise _untrusted(path, what) from err
        retried = True


def _names_foreign_code(err: Exception) -> bool:
    return "Unsupported global" in str(err) or "GLOBAL" in str(err)


def _import_torchao() -> bool:
    """torchao registers its tensor subclasses as safe globals on import: a torchao-quantized
    export (what `apply` writes) then loads without trusting the file."""
    import sys

    if "torchao" in sys.modules:
        return False  # already registered: the refusal stands
    from compressadvise.backends import import_quietly
    from compressadvise.errors import Unavailable

    try:
        import_quietly("torchao")
    except Unavailable:
        return False
    return True


def _check_sample_inputs(arc: Archive, torch: Any, entry: str) -> None:
    """Sample inputs must load with weights_only=True (torch would fall back to a full
    unpickle) and their keys must be plain (torch pastes them into guard code it execs)."""
    if arc.size(entry) == 0:
        return  # saved without example inputs
    value = restricted_load(arc.path, torch, lambda: arc.open(entry),
                            f"its sample inputs ({entry}) are a full pickle, not tensors", entry)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if not (isinstance(key, int) or (isinstance(key, str) and _is_plain(key))):
                    raise _untrusted(arc.path, f"a sample input key {quote(str(key))} is not plain text "
                                     "(torch pastes it into the guard code it runs)")
                stack.append(inner)
        elif isinstance(item, (list, tuple)):
            stack.extend(item)


def strict_artifact_loader(torch: Any, path: Path) -> Callable[[Any], Any]:
    """A drop-in for torch's `deserialize_torch_artifact` without its weights_only=False
    fallback: legacy payloads and sample inputs load as plain tensors or are refused."""

    def load(serialized: Any) -> Any:
        if isinstance(serialized, (dict, tuple)):
            return serialized
        if len(serialized) == 0:
            return {}
        artifact = restricted_load(path, torch, lambda: io.BytesIO(serialized),
                                   "a payload in it is a full pickle, not tensors", "a payload",
                                   devices=("cpu",))
        if not isinstance(artifact, (tuple, dict)):
            raise BadModel(f"{path}: corrupt torch.export payload (a {type(artifact).__name__})")
        return artifact

    return load


class _LogCapture(logging.Filter):
    """Drops torch's log records during a load (one, with a traceback, per failed archive) and
    keeps the first exception they carry: the real reason behind torch's generic error."""

    def __init__(self) -> None:
        super().__init__()
        self.first: BaseException | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.first is None and record.exc_info and record.exc_info[1] is not None:
            self.first = record.exc_info[1]
        return False

    def reason(self, err: BaseException) -> str:
        return first_line(self.first if self.first is not None else err)


_TORCH_LOGGERS = ("torch.export", "torch.export.pt2_archive._package", "torch._export.serde.serialize")


@contextlib.contextmanager
def pt2_loading(torch: Any, path: Path, trust_pickle: bool) -> Iterator[_LogCapture]:
    """Around torch.export.load: quiet torch's loggers (capturing the first error) and, unless
    trusted, swap in the strict artifact loader."""
    import importlib

    capture = _LogCapture()
    loggers = [(lg, lg.level) for lg in map(logging.getLogger, _TORCH_LOGGERS)]
    for lg, _ in loggers:
        lg.addFilter(capture)
        lg.setLevel(logging.WARNING)  # records must reach the filter even if torch is quietened
    serialize = importlib.import_module("torch._export.serde.serialize")
    original = getattr(serialize, "deserialize_torch_artifact", None)
    if not trust_pickle and original is not None:
        serialize.deserialize_torch_artifact = strict_artifact_loader(torch, path)
    try:
        yield capture
    finally:
        if original is not None:
            serialize.deserialize_torch_artifact = original
        for lg, level in loggers:
            lg.removeFilter(capture)
            lg.setLevel(level)


# ---- the exported program's JSON: strings torch evaluates or pastes into Python source
# Names: nodes, tensors, arguments, parameters (coremltools adds `_COREML_/weight/n_bits`
# buffers). Without quotes, brackets, `=`, `:` or spaces a name cannot become code in the
# `def forward(...)` line or the getattr(self, "...") calls torch.fx writes.
_NAME_RE = re.compile(r"[\w.\-/]*")
_TARGET_RE = re.compile(r"[\w.\-:#]*")  # operator names: torch.ops.aten.add.Tensor, #ns:op
_SKIP_KEYS = {"metadata", "in_spec", "out_spec", "torch_version"}  # free text torch only parses


def _is_name(text: str) -> bool:
    return _NAME_RE.fullmatch(text) is not None


def _is_plain(text: str) -> bool:
    """Printable text without quotes or backslashes: it cannot end a string literal."""
    return text.isprintable() and not any(c in text for c in "'\"\\")


def _check_program(path: Path, program: dict) -> None:
    stack: list[tuple[str, Any]] = [("", program)]
    while stack:
        key, value = stack.pop()
        if key in _SKIP_KEYS:
            continue
        if key == "expr_str":
            _check_code(path, value, _SympyChecker(), "a symbolic shape expression")
        elif key == "guards_code":
            for guard in value if isinstance(value, list) else [value]:
                _check_code(path, guard, _GuardChecker(), "a shape guard")
        elif isinstance(value, dict):
            stack.extend(value.items())
        elif isinstance(value, list):
            stack.extend((key, v) for v in value)
        elif isinstance(value, str):
            ok = (_is_plain(value) if key in ("as_string", "as_strings")
                  else _TARGET_RE.fullmatch(value) if key == "target" else _is_name(value))
            if not ok:
                raise _untrusted(path, f"the graph's {key or 'value'} {quote(value)} is not a "
                                 "plain name (torch pastes it into the Python code it generates)")


def _check_code(path: Path, text: Any, checker: "_CodeChecker", what: str) -> None:
    if not isinstance(text, str):
        raise BadModel(f"{path}: {what} in the graph is not a string")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        tree = None
    bad = "unparsable" if tree is None else checker.first_bad(tree)
    if bad:
        raise _untrusted(path, f"{what} in the graph, {quote(text)}, is not plain arithmetic "
                         f"({bad}); torch evaluates it as Python")


class _CodeChecker:
    """Allow-list over an expression's syntax tree: arithmetic, comparisons, constants and
    the calls/attributes a subclass allows. No lambdas, comprehensions or dunder access."""

    _OK = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Tuple, ast.List,
           ast.Load, ast.operator, ast.unaryop, ast.boolop, ast.cmpop, ast.keyword)

    def first_bad(self, tree: ast.AST) -> str | None:
        for node in ast.walk(tree):
            bad = self._bad(node)
            if bad:
                return bad
        return None

    def _bad(self, node: ast.AST) -> str | None:
        if isinstance(node, self._OK):
            return None
        if isinstance(node, ast.Constant):
            v = node.value
            ok = v is None or isinstance(v, (bool, int, float)) or (isinstance(v, str) and _is_plain(v))
            return None if ok else f"constant {quote(repr(v), 40)}"
        if isinstance(node, ast.Name):
            return None if self.name_ok(node.id) else f"name {node.id!r}"
        if isinstance(node, ast.Call):
            return None if self.callee_ok(node.func) else "a call it does not allow"
        if isinstance(node, ast.Attribute):
            return None if self.attr_ok(node) else f"attribute {node.attr!r}"
        if isinstance(node, ast.Subscript):
            return None if self.subscript_ok(node) else "a subscript it does not allow"
        return f"{type(node).__name__} syntax"

    def name_ok(self, name: str) -> bool:
        return False

    def callee_ok(self, func: ast.AST) -> bool:
        return isinstance(func, ast.Name) and self.name_ok(func.id)

    def attr_ok(self, node: ast.Attribute) -> bool:
        return False

    def subscript_ok(self, node: ast.Subscript) -> bool:
        return False


class _SympyChecker(_CodeChecker):
    """`srepr` output such as Mul(Integer(2), Symbol('s0', positive=True)): calls of sympy
    classes and torch's sympy functions, sympy singletons (oo, true) and symbol names."""

    _SYMBOL = re.compile(r"[a-z]+[0-9]+")  # s0, u3: never a Python builtin

    def name_ok(self, name: str) -> bool:
        return self._SYMBOL.fullmatch(name) is not None or _is_sympy_class(name)


@functools.lru_cache(maxsize=None)
def _is_sympy_class(name: str) -> bool:
    """A sympy expression class or singleton (Integer, Max, oo), or one of torch's sympy
    functions (FloorDiv, ToFloat): building these computes, it cannot run code."""
    import sympy
    from torch.utils._sympy import functions

    for namespace in (sympy, functions):
        obj = getattr(namespace, name, None)
        if (isinstance(obj, type) and issubclass(obj, sympy.Basic)) or isinstance(obj, sympy.Basic):
            return True
    return False


class _GuardChecker(_CodeChecker):
    """Guards such as `L['x'].size()[0] <= 64` or `math.isnan(L['y'])`: input sizes and
    strides, math functions, torch.sym_* helpers and a few numeric builtins."""

    _NAMES = {"L", "math", "torch", "inf", "IsNonOverlappingAndDenseIndicator",
              "cast_symbool_to_symint_guardless", "abs", "int", "float", "bool", "min", "max",
              "round", "len"}
    _TENSOR_ATTRS = {"size", "stride", "storage_offset", "dim", "numel", "shape"}

    def name_ok(self, name: str) -> bool:
        return name in self._NAMES

    def callee_ok(self, func: ast.AST) -> bool:
        return (isinstance(func, ast.Name) and func.id in self._NAMES - {"L", "math", "torch"}) or \
            (isinstance(func, ast.Attribute) and self.attr_ok(func))

    def attr_ok(self, node: ast.Attribute) -> bool:
        base = node.value.id if isinstance(node.value, ast.Name) else None
        if base == "math":
            return not node.attr.startswith("_")
        if base == "torch":
            return node.attr.startswith(("sym_", "_sym_"))
        return base not in ("math", "torch") and node.attr in self._TENSOR_ATTRS

    def subscript_ok(self, node: ast.Subscript) -> bool:
        key = node.slice
        if isinstance(key, ast.UnaryOp) and isinstance(key.op, ast.USub):
            key = key.operand
        return isinstance(key, ast.Constant) and isinstance(key.value, (int, str))


# ------------------------------------------------------------------ TorchScript
# The globals torch's own TorchScript pickler writes (torch/csrc/jit/serialization/pickler.cpp)
# and its unpickler resolves; `__torch__.*` are the archive's own compiled TorchScript classes.
_TS_GLOBALS = {
    ("collections", "OrderedDict"), ("builtins", "complex"), ("torch", "device"),
    *(("torch._utils", n) for n in ("_rebuild_tensor_v2", "_rebuild_qtensor", "_rebuild_sparse_tensor")),
    *(("torch.jit._pickle", n) for n in ("build_intlist", "build_floatlist", "build_doublelist",
                                         "build_boollist", "build_tensorlist", "build_tensor_from_id",
                                         "restore_type_tag")),
    ("__main__", "TensorID"), ("__main__", "IntList"),  # archives from before torch 1.3
}
_TS_TORCH_NAME = re.compile(r"[A-Za-z0-9]*Storage|per_(tensor|channel)_(affine|symmetric)(_float_qparams)?")
_TS_FOREIGN_OPS = {"STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"}  # never written by torch.jit


def check_torchscript(path: Path) -> None:
    """Every pickle in a TorchScript archive may name only torch's own types; anything else
    means the archive was not written by torch.jit.save (and names code to run)."""
    arc = Archive(path)
    try:
        for rel in arc.names():
            if rel.endswith((".pkl", ".debug_pkl")):
                _check_ts_pickle(path, rel, arc.read(rel))
    finally:
        arc.close()


def _check_ts_pickle(path: Path, rel: str, data: bytes) -> None:
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in _TS_FOREIGN_OPS:
                raise BadModel(f"{path}: refused TorchScript archive: {rel} uses the pickle opcode "
                               f"{op.name}, which torch.jit.save never writes (it would import "
                               "and call Python objects named by the file)")
            if op.name == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                if not _ts_global_ok(module, name):
                    raise BadModel(
                        f"{path}: refused TorchScript archive: {rel} names the Python callable "
                        f"{quote(module + '.' + name)}; a TorchScript pickle may name only torch's "
                        "own types, so this file was not written by torch.jit.save and could run "
                        "arbitrary code")
    except ValueError as e:  # pickletools' own "corrupt pickle" error
        raise BadModel(f"{path}: corrupt TorchScript archive ({rel}: {first_line(e)})") from e


def _ts_global_ok(module: str, name: str) -> bool:
    if (module, name) in _TS_GLOBALS:
        return True
    if module == "torch":
        return _TS_TORCH_NAME.fullmatch(name) is not None
    return (module == "__torch__" or module.startswith("__torch__.")) and name.isidentifier()
