"""Load a Hugging Face model folder (config.json + weights), offline, never running its code.

With `transformers` installed (the `hf` extra) the folder becomes a runnable eager module built
from transformers' own classes; custom modeling code (`auto_map`) is never imported, so such a
folder, like any folder without transformers, gives a weight inventory only (the safetensors or
state-dict loaders of loading.py, which check every file before reading it).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from compressadvise.errors import BadModel
from compressadvise.fsutil import sha256_file
from compressadvise.model.archives import first_line, quote
from compressadvise.model.loading import (LoadedModel, json_object, _check_safetensors_header, _load_safetensors,
                                          _load_torch_pickle, _read_safetensors_header, _sniff)

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
CONFIG_LIMIT = 1 << 20  # a real config is a few KB: anything near this is not one
INDEX_LIMIT = 64 << 20  # a shard index lists every tensor name once
HF_HINT = "pip install 'compressadvise[hf]' to get the graph, roles and a runnable model"
MAX_TOKENS = 16  # example sequence length: enough to trace and count MACs, cheap to run


def is_hf_folder(path: Path) -> bool:
    """A directory holding config.json and weights in one of the layouts save_pretrained writes."""
    path = Path(path)
    return (path.is_dir() and (path / CONFIG).is_file()
            and any((path / w).is_file() for w in (SAFETENSORS, INDEX, PICKLE)))


def load_hf_folder(path: Path, *, trust_pickle: bool) -> LoadedModel:
    """The folder as a runnable transformers module where possible, else its weight inventory."""
    path = Path(path)
    config = _read_json(path / CONFIG, CONFIG_LIMIT, "config")
    weights = _weight_files(path)
    digest = _digest(path / CONFIG, weights)
    model_type = config.get("model_type")
    model_type = model_type if isinstance(model_type, str) and model_type else "unknown model type"
    if "auto_map" in config:
        return _weight_only(path, weights, digest, trust_pickle, [
            f"Hugging Face folder: {model_type} with custom modeling code (auto_map): that code is not "
            "run (it would execute files from the folder); weight inventory only"])
    try:
        transformers = _import_transformers()
    except ImportError:
        return _weight_only(path, weights, digest, trust_pickle, [
            f"Hugging Face folder: {model_type}, weight inventory only (transformers is not installed): {HF_HINT}"])
    if weights[0].suffix == ".safetensors":
        _safetensors_shards(weights, digest)  # every header checked before transformers reads the file
    try:
        model, cls_name = _from_pretrained(transformers, path, config, _load_dtype(config, weights))
    except Exception as e:  # an unknown model type, a mismatched checkpoint...: the weights still count
        return _weight_only(path, weights, digest, trust_pickle, [
            f"Hugging Face folder: {model_type}: transformers could not build it "
            f"({type(e).__name__}: {first_line(e)[:200]}); weight inventory only"])
    notes = [f"Hugging Face folder: {model_type} via transformers {cls_name}"]
    saved = config.get("dtype", config.get("torch_dtype"))
    first = next(model.parameters(), None)
    loaded_as = str(first.dtype).removeprefix("torch.") if first is not None else ""
    if isinstance(saved, str) and saved != loaded_as:
        notes.append(f"weights saved as {saved[:20]} are loaded as {loaded_as}" + (
            " (memory grows to 4 bytes a weight)" if loaded_as == "float32" else
            " (Core ML stores fp16; bfloat16 values beyond +-65,504 would not fit)"))
    example = _example_inputs(model, notes)
    return LoadedModel(source=str(path), format="hf_folder", sha256=digest, has_graph=True, module=model,
                       example_inputs=example, notes=notes)


# ------------------------------------------------------------------ the folder's files
def _read_json(path: Path, limit: int, what: str) -> dict[str, Any]:
    """A JSON object from a file of bounded size; BadModel (one line) for anything else."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise BadModel(f"{path}: {size:,} bytes is too large for a Hugging Face {what} file "
                           f"(at most {limit:,})")
        raw = path.read_bytes()
    except OSError as e:
        raise BadModel(f"{path}: cannot read it ({e.strerror or e})") from e
    return json_object(raw, f"{path}: not a Hugging Face {what} file")


def _weight_files(path: Path) -> list[Path]:
    """The weight files, preferring safetensors (no pickle) as transformers does."""
    if (path / SAFETENSORS).is_file():
        return [path / SAFETENSORS]
    if (path / INDEX).is_file():
        return _shards(path)
    return [path / PICKLE]


def _shards(path: Path) -> list[Path]:
    """Shard files named by the index, each a plain file name inside the folder (no ../ escapes)."""
    index = _read_json(path / INDEX, INDEX_LIMIT, "shard index")
    wmap = index.get("weight_map")
    if not isinstance(wmap, dict) or not wmap:
        raise BadModel(f"{path / INDEX}: corrupt shard index (no weight_map object)")
    shards: list[Path] = []
    for name, shard in wmap.items():
        if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
            raise BadModel(f"{path / INDEX}: corrupt shard index (tensor {quote(name)} names shard "
                           f"{quote(str(shard))}, not a file name in the folder)")
        if path / shard not in shards:
            shards.append(path / shard)
    missing = [s.name for s in shards if not s.is_file()]
    if missing:
        raise BadModel(f"{path}: shard {quote(missing[0])} named by {INDEX} is missing"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return shards


def _digest(config: Path, weights: list[Path]) -> str:
    """One hash over the config and every weight file, each named, so a renamed shard differs."""
    h = hashlib.sha256()
    for f in (config, *weights):
        h.update(f"{f.name}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


def _weight_only(path: Path, weights: list[Path], digest: str, trust_pickle: bool,
                 notes: list[str]) -> LoadedModel:
    """The inventory of the weight files through the single-file loaders (checked before read)."""
    if weights[0].name == PICKLE:
        loaded = _load_torch_pickle(weights[0], digest, trust_pickle)
    else:
        loaded = _safetensors_shards(weights, digest)
    loaded.source, loaded.notes = str(path), [*notes, *loaded.notes]
    if loaded.format != "pickle":  # a full pickle (--trust-pickle) keeps its own format: it is a module
        loaded.format = "hf_folder"
    return loaded


def _safetensors_shards(files: list[Path], digest: str) -> LoadedModel:
    parts = []
    for f in files:
        if _sniff(f) != "safetensors":
            raise BadModel(f"{f}: not a safetensors file")
        header, _, data_len = _read_safetensors_header(f)
        _check_safetensors_header(f, header, data_len)
        parts.append(_load_safetensors(f, digest))
    if len(parts) == 1:
        return parts[0]

    def iterate() -> Iterator[tuple[str, Any]]:
        for part in parts:
            yield from part.tensors()

    first = parts[0]
    return LoadedModel(first.source, "safetensors", digest, has_graph=False, notes=list(first.notes),
                       _tensors=iterate, tensor_count=sum(p.tensor_count or 0 for p in parts), streamed=True)


# ------------------------------------------------------------------ transformers
@contextlib.contextmanager
def _hushed() -> Iterator[None]:
    """backends.quiet() plus transformers' own logger (its handler bypasses the root logger)."""
    from compressadvise.backends import quiet

    lg = logging.getLogger("transformers")
    level = lg.level
    with quiet():
        try:
            if not lg.isEnabledFor(logging.DEBUG):  # --debug leaves it alone (quiet() does too)
                lg.setLevel(logging.ERROR)
            yield
        finally:
            lg.setLevel(level)


def _import_transformers() -> Any:
    """transformers, imported offline and quietly; ImportError when it is missing."""
    import importlib

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # read at import: no network, even by accident
    with _hushed():
        return importlib.import_module("transformers")


def _model_class(transformers: Any, config: dict[str, Any]) -> tuple[Any, str]:
    """The built-in class the folder was saved from (keeps an LM head and its tie), else AutoModel.
    Only a transformers PreTrainedModel subclass is accepted: the name comes from an untrusted file."""
    arch = config.get("architectures")
    name = arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else ""
    if name.isidentifier() and not name.startswith("_"):
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a lazy submodule that fails to import: fall back
            cls = None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls, name
    return transformers.AutoModel, "AutoModel"


HALF_ABOVE = 2 << 30  # bytes of fp16/bf16 weights (~1B parameters) above which they stay 2 bytes a weight


def _load_dtype(config: dict[str, Any], weights: list[Path]) -> str:
    """float32 for CPU analysis, tracing and conversion, as before; but a large half-precision
    checkpoint stays half (fp16; bf16 becomes fp16, what Core ML stores): doubling a 3B model to
    12 GB of float32 is what makes apply run out of memory."""
    saved = config.get("dtype", config.get("torch_dtype"))
    size = sum(w.stat().st_size for w in weights if w.is_file())
    return "float16" if saved in ("float16", "bfloat16") and size > HALF_ABOVE else "float32"


def _from_pretrained(transformers: Any, path: Path, config: dict[str, Any], dtype: str = "float32") -> tuple[Any, str]:
    import copy

    import torch

    extra: dict[str, Any] = {"use_cache": False} if "use_cache" in config else {}  # no cache objects in outputs
    with _hushed():  # the class lookup imports the modeling code (and torchao, chattily)
        cls, name = _model_class(transformers, config)
        model = cls.from_pretrained(str(path), local_files_only=True, trust_remote_code=False,
                                    dtype=getattr(torch, dtype), weights_only=True, **extra)
    # Tuples of tensors out, as tracing, export and conversion want them. Only the top module's
    # config says so: submodules share the loaded config, and an inner model returning a tuple
    # breaks its wrapper (LlamaForCausalLM reads `outputs.last_hidden_state`).
    model.config = copy.copy(model.config)
    model.config.return_dict = False
    return model.eval(), name


def _example_inputs(model: Any, notes: list[str]) -> tuple | None:
    """Token ids (text) or a zero image (vision) from the config, checked by one forward pass:
    an input the model cannot take (an encoder-decoder wants decoder ids too) is worse than none."""
    import torch

    example = _inputs_from_config(model.config, torch)
    if example is None:
        notes.append("no example input could be built from config.json: MACs and conversion need --input-shape")
        return None
    try:
        with torch.no_grad(), _hushed():
            model(*example)
    except Exception as e:
        notes.append(f"the example input {list(example[0].shape)} built from config.json does not run "
                     f"({type(e).__name__}: {first_line(e)[:160]}): no MACs or conversion without one")
        return None
    return example


def _inputs_from_config(cfg: Any, torch: Any) -> tuple | None:
    vocab = _positive_int(getattr(cfg, "vocab_size", None))
    if vocab:
        limit = _positive_int(getattr(cfg, "max_position_embeddings", None)) or MAX_TOKENS
        seq = min(MAX_TOKENS, limit)
        return ((torch.arange(seq, dtype=torch.int64) % vocab).unsqueeze(0),)
    size, channels = getattr(cfg, "image_size", None), _positive_int(getattr(cfg, "num_channels", None))
    hw = [size, size] if _positive_int(size) else list(size) if isinstance(size, (list, tuple)) else []
    if channels and len(hw) == 2 and all(_positive_int(d) and d <= 4096 for d in hw):
        return (torch.zeros(1, channels, *hw),)
    return None


def _positive_int(v: Any) -> int:
    return v if type(v) is int and v > 0 else 0
