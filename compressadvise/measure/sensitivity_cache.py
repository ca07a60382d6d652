"""The on-disk sensitivity cache: one JSON entry per (model, assignment, samples), written atomically."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressadvise.fsutil import write_text_atomic
from compressadvise.plan.setting import Setting

if TYPE_CHECKING:
    from compressadvise.model.samples import Samples

CACHE_VERSION = "2"  # 2: measured on the deployable form (BatchNorm folded)
CACHE_ENV = "COMPRESSADVISE_SENSITIVITY_CACHE"


# ------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    try:
        home = Path.home()
    except (RuntimeError, KeyError):  # no $HOME and no passwd entry (some containers)
        import tempfile

        home = Path(tempfile.gettempdir())
    return Path(os.environ.get("XDG_CACHE_HOME") or home / ".cache") / "compressadvise" / "sensitivity"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _valid_result(result: Any) -> bool:
    """The shape `evaluate` writes: metrics and proxies as name -> number, seconds a number."""
    return (isinstance(result, dict)
            and all(isinstance(result.get(part), dict) and all(_is_number(v) for v in result[part].values())
                    for part in ("metrics", "proxies"))
            and _is_number(result.get("seconds", 0.0)))


class Cache:
    """One JSON file per (model sha256, layer(s) and setting(s), samples hash); atomic writes.

    Anything unexpected in an entry (not JSON, not an object, a field missing or of the wrong
    type) is a miss, and the entry is rewritten once measured again."""

    def __init__(self, root: str | Path | None = None, *, enabled: bool = True):
        self.root = Path(root) if root else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0
        if enabled:
            self._check_root()

    def _check_root(self) -> None:
        """Fail before any measuring when entries could never be written: a file is in the way,
        or the nearest existing folder is read-only."""
        from compressadvise.errors import InputNotFound

        hint = "pass --cache FOLDER, or --no-cache"
        base = next((p for p in (self.root, *self.root.absolute().parents) if p.exists()), None)
        if base is None:
            return
        if not base.is_dir():
            what = "is a file" if base == self.root else f"is under the file {base}"
            raise InputNotFound(f"sensitivity cache {self.root} {what}: the cache must be a folder", hint=hint)
        from compressadvise.fsutil import check_writable

        try:  # the one writability probe (a real file: root passes os.access on a read-only mount)
            check_writable(self.root / ".entry")
        except OSError:
            raise InputNotFound(f"sensitivity cache {self.root}: {base} is not writable", hint=hint) from None

    def _path(self, model_sha: str, item_key: str, samples_hash: str) -> Path:
        digest = hashlib.sha256(f"{CACHE_VERSION}\n{item_key}\n{samples_hash}".encode()).hexdigest()[:40]
        return self.root / model_sha[:24] / f"{digest}.json"

    def get(self, model_sha: str, item_key: str, samples_hash: str) -> dict[str, Any] | None:
        if not self.enabled:
            self.misses += 1
            return None
        path = self._path(model_sha, item_key, samples_hash)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # RecursionError: '[[[[...' nested too deep
            data = None
        if (not isinstance(data, dict) or data.get("model_sha256") != model_sha or data.get("item") != item_key
                or data.get("samples") != samples_hash or not _valid_result(data.get("result"))):
            self.misses += 1
            return None
        self.hits += 1
        return data["result"]

    def put(self, model_sha: str, item_key: str, samples_hash: str, result: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from compressadvise.errors import CompressAdviseError, InputNotFound

        data = {"version": CACHE_VERSION, "model_sha256": model_sha, "item": item_key,
                "samples": samples_hash, "result": result}
        path = self._path(model_sha, item_key, samples_hash)
        try:  # a failure stops the run loudly; what was measured so far is cached and resumes
            write_text_atomic(path, json.dumps(data, allow_nan=True))
        except CompressAdviseError:
            raise
        except OSError as e:  # disk full, a folder where the entry goes
            raise InputNotFound(f"cannot write the sensitivity cache entry {path} ({e.strerror or e})",
                                hint="pass --cache FOLDER, or --no-cache") from None


def item_key(assign: dict[str, Setting]) -> str:
    return ";".join(f"{layer}={s.key}" for layer, s in sorted(assign.items()))


def samples_hash(samples: "Samples", n: int) -> str:
    h = hashlib.sha256()
    for t in samples.inputs:
        h.update(str(tuple(t[:n].shape)).encode())
        h.update(t[:n].contiguous().numpy().tobytes())
    if samples.labels is not None:
        h.update(samples.labels[:n].contiguous().numpy().tobytes())
    return h.hexdigest()
