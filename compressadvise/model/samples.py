"""Sample inputs for evaluation: the user's real data, the bundled digits, or (last resort) random.

A sample file is `.npz`, `.pt` (read with torch.load(weights_only=True): tensors, lists and
strings only, no code) or `.safetensors`, holding:

- `inputs`: the model input, samples on the first axis; or `inputs_0`, `inputs_1`, ... for a
  model with several inputs (all with the same number of samples);
- `labels` (optional): class indices (N,) for top-1/top-5, or float targets shaped like the
  output for MSE;
- `slices` (optional): a slice id or name per sample (e.g. skin tone, device, lighting), so
  accuracy changes are reported per slice; `slice_names` (optional) names integer ids;
- `class_names` (optional): names for the label indices (.npz/.pt only).

A directory means every sample file in it (sorted by name), concatenated. Float64 inputs
become float32 (what models run in).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from compressadvise.errors import InputNotFound, InvalidKnowledge

if TYPE_CHECKING:
    import torch

SUFFIXES = (".npz", ".pt", ".pth", ".safetensors")
BUNDLED = "bundled"
RANDOM_COUNT = 32
RANDOM_WARNING = ("no sample inputs given: using {n} random inputs shaped like the model's example "
                  "input; fidelity figures from random inputs are weak evidence (real inputs exercise "
                  "the value ranges and paths the model sees in use), and accuracy cannot be measured")


class InvalidSamples(InvalidKnowledge):
    """A sample file that cannot be used (exit code 6, like other invalid input files)."""


@dataclass
class Samples:
    """Evaluation inputs with optional labels and per-sample slice names."""

    inputs: list["torch.Tensor"]  # one tensor per model input, samples on axis 0
    labels: "torch.Tensor | None" = None
    slices: list[str] | None = None
    class_names: list[str] | None = None
    source: str = ""
    kind: Literal["file", "bundled", "random"] = "file"
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def batch(self, start: int, stop: int) -> tuple["torch.Tensor", ...]:
        return tuple(t[start:stop] for t in self.inputs)

    def subset(self, n: int) -> "Samples":
        """The first n samples (for costly passes such as per-layer drift)."""
        return Samples([t[:n] for t in self.inputs],
                       None if self.labels is None else self.labels[:n],
                       None if self.slices is None else self.slices[:n],
                       self.class_names, self.source, self.kind, list(self.warnings))

    def shapes(self) -> list[list[int]]:
        return [list(t.shape) for t in self.inputs]


def load_samples(source: str | Path | None) -> Samples:
    """Load `bundled`, a sample file, or a directory of sample files."""
    if source is None or str(source) == BUNDLED:
        return bundled_samples()
    path = Path(source)
    if not path.exists():
        raise InputNotFound(f"{path}: no such sample file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise InvalidSamples(f"{path}: folder holds no sample files ({', '.join(SUFFIXES)})")
        return _concat([_build(_load_file(p), str(p)) for p in files], str(path))
    return _build(_load_file(path), str(path))


def bundled_samples() -> Samples:
    import torch

    from compressadvise.examples import digits

    x, y = digits.samples()
    return Samples([torch.from_numpy(x)], torch.from_numpy(y), None, [str(i) for i in range(10)],
                   source="bundled digits held-out set", kind="bundled")


def random_samples(example_inputs: tuple | None, n: int = RANDOM_COUNT, seed: int = 0) -> Samples:
    """Random inputs shaped like the example input (batch axis replaced by n), with a warning."""
    import torch

    if not example_inputs:
        raise InvalidSamples("no sample inputs given and the model carries no example input to "
                             "shape random ones", hint="pass --samples FILE")
    gen = torch.Generator().manual_seed(seed)
    inputs = []
    for ex in example_inputs:
        shape = (n, *ex.shape[1:])
        if ex.is_floating_point():
            inputs.append(torch.randn(shape, generator=gen, dtype=ex.dtype))
        else:  # token ids and the like: stay inside the range the example uses
            hi = max(int(ex.max()) + 1, 2) if ex.numel() else 2
            inputs.append(torch.randint(0, hi, shape, generator=gen, dtype=ex.dtype))
    return Samples(inputs, source="random", kind="random", warnings=[RANDOM_WARNING.format(n=n)])


# ------------------------------------------------------------------ file formats
def _load_file(path: Path) -> dict[str, Any]:
    if path.suffix == ".npz":
        return _load_npz(path)
    if path.suffix in (".pt", ".pth"):
        return _load_pt(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    raise InvalidSamples(f"{path}: unsupported sample file type {path.suffix!r}",
                         hint=f"use one of {', '.join(SUFFIXES)}")


def _load_npz(path: Path) -> dict[str, Any]:
    import zipfile

    import numpy as np

    if not zipfile.is_zipfile(path):
        raise InvalidSamples(f"{path}: not a readable .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise InvalidSamples(f"{path}: holds object arrays (pickled Python objects), which are "
                                 "not loaded", hint="store numbers or fixed-width strings") from e
        raise InvalidSamples(f"{path}: not a readable .npz file ({e})") from e
    except Exception as e:
        raise InvalidSamples(f"{path}: not a readable .npz file ({str(e).splitlines()[0][:200]})") from e


def _load_pt(path: Path) -> dict[str, Any]:
    import torch

    try:
        obj = torch.load(str(path), weights_only=True, map_location="cpu")
    except Exception as e:
        raise InvalidSamples(f"{path}: not a readable tensor file with plain data "
                             f"({str(e).splitlines()[0][:200]})",
                             hint="save a dict of tensors with torch.save; objects that need code are refused") from e
    if isinstance(obj, torch.Tensor):
        return {"inputs": obj}
    if not isinstance(obj, dict):
        raise InvalidSamples(f"{path}: expected a dict with key 'inputs', found {type(obj).__name__}")
    return obj


def _load_safetensors(path: Path) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    except Exception as e:
        raise InvalidSamples(f"{path}: corrupt safetensors file ({str(e).splitlines()[0][:200]})") from e


# ------------------------------------------------------------------ validation
def _tensor(value: Any, what: str, where: str) -> "torch.Tensor":
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        t = value
    elif isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        t = torch.from_numpy(value if value.flags.c_contiguous else value.copy())  # keeps 0-d as 0-d
    else:
        raise InvalidSamples(f"{where}: '{what}' must be a numeric array, got {_describe(value)}")
    return t.float() if t.dtype == torch.float64 else t


def _describe(value: Any) -> str:
    dtype = getattr(value, "dtype", None)
    return f"{type(value).__name__} of {dtype}" if dtype is not None else type(value).__name__


def _names(value: Any, what: str, where: str) -> list[str]:
    import numpy as np
    import torch

    if isinstance(value, torch.Tensor):
        return [str(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, np.ndarray):
        return [str(v) for v in value.reshape(-1).tolist()]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise InvalidSamples(f"{where}: '{what}' must be a list or array, got {_describe(value)}")


def _input_keys(data: dict[str, Any], where: str) -> list[str]:
    if "inputs" in data:
        return ["inputs"]
    keys = sorted((k for k in data if k.startswith("inputs_") and k[7:].isdigit()), key=lambda k: int(k[7:]))
    if not keys:
        raise InvalidSamples(f"{where}: no 'inputs' key (found: {', '.join(sorted(map(str, data))) or 'nothing'})",
                             hint="store the model input under 'inputs' (or inputs_0, inputs_1...)")
    return keys


def _build(data: dict[str, Any], where: str) -> Samples:
    inputs = [_tensor(data[k], k, where) for k in _input_keys(data, where)]
    n = int(inputs[0].shape[0]) if inputs[0].dim() else 0
    if n == 0:
        raise InvalidSamples(f"{where}: 'inputs' holds no samples (need a leading sample axis)")
    for i, t in enumerate(inputs[1:], 1):
        if t.dim() == 0 or t.shape[0] != n:
            raise InvalidSamples(f"{where}: inputs_{i} has {t.shape[0] if t.dim() else 0} samples, inputs_0 has {n}")
    labels = None
    if "labels" in data:
        labels = _tensor(data["labels"], "labels", where)
        if labels.dim() == 0 or labels.shape[0] != n:
            raise InvalidSamples(f"{where}: {labels.shape[0] if labels.dim() else 0} labels for {n} samples")
    slices = None
    if "slices" in data:
        slices = _names(data["slices"], "slices", where)
        if len(slices) != n:
            raise InvalidSamples(f"{where}: {len(slices)} slice entries for {n} samples")
        if "slice_names" in data:
            names = _names(data["slice_names"], "slice_names", where)
            slices = [names[int(s)] if s.isdigit() and int(s) < len(names) else s for s in slices]
    class_names = _names(data["class_names"], "class_names", where) if "class_names" in data else None
    return Samples(inputs, labels, slices, class_names, source=where, kind="file")


def _concat(built: list[Samples], where: str) -> Samples:
    import torch

    first = built[0]
    for b in built[1:]:
        if len(b.inputs) != len(first.inputs) or any(x.shape[1:] != y.shape[1:] for x, y in zip(b.inputs, first.inputs)):
            raise InvalidSamples(f"{where}: sample files disagree on input shapes "
                                 f"({first.shapes()} vs {b.shapes()})")
        if (b.labels is None) != (first.labels is None) or (b.slices is None) != (first.slices is None):
            raise InvalidSamples(f"{where}: some sample files have labels/slices and others do not")
    inputs = [torch.cat([b.inputs[i] for b in built]) for i in range(len(first.inputs))]
    labels = torch.cat([b.labels for b in built]) if first.labels is not None else None
    slices = [s for b in built for s in b.slices] if first.slices is not None else None
    return Samples(inputs, labels, slices, first.class_names, source=where, kind="file")


# ------------------------------------------------------------------ text, for language models
TEXT_LIMIT = 64 << 20  # bytes of text read for --text: far more than an evaluation needs
DEFAULT_SEQ_LEN = 128


def text_samples(text: str | Path, folder: str | Path, *, seq_len: int | None = None,
                 max_sequences: int = 64) -> Samples:
    """Token-id sequences from a text file, tokenized by a Hugging Face folder's tokenizer.json
    (the `tokenizers` library reads it as data: no tokenizer code runs), cut into sequences of
    `seq_len` tokens (default: 128, or the model's context when shorter)."""
    import torch

    path, folder = Path(text), Path(folder)
    if not path.is_file():
        raise InputNotFound(f"{path}: no such text file")
    tok = folder / "tokenizer.json"
    if not tok.is_file():
        raise InvalidSamples(f"{folder}: no tokenizer.json: --text needs a Hugging Face folder with its tokenizer",
                             hint="or tokenize yourself and pass --samples FILE with an int64 array (sequences x tokens)")
    if path.stat().st_size > TEXT_LIMIT:
        raise InvalidSamples(f"{path}: over {TEXT_LIMIT >> 20} MB of text; an evaluation needs far less")
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tok)).encode(path.read_text(encoding="utf-8", errors="replace")).ids
    length = min(seq_len or DEFAULT_SEQ_LEN, _context(folder) or DEFAULT_SEQ_LEN)
    n = min(len(ids) // length, max_sequences)
    if n < 1 or length < 2:
        raise InvalidSamples(f"{path}: {len(ids)} tokens, fewer than one sequence of {length}",
                             hint="give more text or a smaller --seq-len")
    seqs = torch.tensor(ids[: n * length], dtype=torch.int64).reshape(n, length)
    return Samples([seqs], source=f"{path} ({n} sequences x {length} tokens, {tok.name})", kind="file")


def _context(folder: Path) -> int | None:
    """The model's context length from config.json (GPT-2 names it n_positions)."""
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = cfg.get(key) if isinstance(cfg, dict) else None
        if type(v) is int and v > 1:
            return v
    return None
