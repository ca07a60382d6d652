"""Atomic writes, output checks and content hashing."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

from compressadvise.errors import CompressAdviseError, OutputExists, OutputNotWritable

PID_MARKER = ".compressadvise.pid"  # inside our temp folders: who owns it (pid host)
UNMARKED_GRACE_S = 60.0  # a temp folder without a marker may be a run between mkdtemp and the marker
FORCE_HINT = "pass --force to replace it"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """A file's sha256, or one over a folder (an .mlpackage): every file's relative POSIX path and
    hash, in sorted order, so the digest does not depend on the file system's listing order."""
    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    h = hashlib.sha256()
    for f in sorted((f for f in p.rglob("*") if f.is_file()), key=lambda f: f.relative_to(p).as_posix()):
        h.update(f"{f.relative_to(p).as_posix()}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends: a signal handler raises wherever it lands, and one
    landing inside mkstemp or between write and rename would leave a stray temp file."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(*caught[0])  # e.g. the CLI's handler, or Python's KeyboardInterrupt
        elif caught and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


def _cause(e: OSError) -> str:
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        return str(e.args[0][0][-1])  # copytree: a list of (src, dst, why); the first says enough
    return e.strerror or str(e) or type(e).__name__


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn an OSError while writing `path` into one line naming the path and the cause (exit 3)."""
    try:
        yield
    except CompressAdviseError:
        raise
    except OSError as e:
        raise OutputNotWritable(f"cannot write {path}: {_cause(e)}",
                                hint="check the folder exists, is writable and has free space") from e


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write via a temp file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with _interrupts_deferred():
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                os.fchmod(fd, _file_mode(path))
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(text)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
    return path


def _umask() -> int:
    """The process umask, read without setting it (os.umask's set-and-restore races other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    """mkstemp makes 0600 files: a replaced file keeps its mode, a new one gets what open() would."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


# ---------------------------------------------------------------- checks before any work
def check_output(path: str | os.PathLike, *, force: bool, inputs: Mapping[str, Any] | None = None,
                 kind: Literal["file", "folder"] = "file") -> Path:
    """Refuse, before any work, an output that would overwrite an input (even with --force), an
    existing output without --force, the wrong kind of thing (a folder for a file or the reverse),
    or a location that cannot be written. `inputs` maps a label ("model") to a path (or None)."""
    path = Path(path)
    for label, src in _existing_inputs(inputs or {}):
        if _same_file(path, src):
            raise OutputExists(f"--out {path} is the input {label}: it is never overwritten",
                               hint="choose another --out")
        if kind == "folder" and _inside(src, path):
            raise OutputExists(f"--out {path} holds the input {label} ({src}): replacing the folder would "
                               "delete it", hint="choose another --out")
    if path.exists() or path.is_symlink():
        if kind == "folder" and not path.is_dir():
            raise OutputExists(f"--out {path} is a file, not a folder: it is never replaced",
                               hint="give a new or existing output folder")
        if kind == "file" and path.is_dir():
            raise OutputExists(f"--out {path} is a folder, not a file", hint="give a file path")
        if not force:
            raise OutputExists(f"{path} already exists", hint=FORCE_HINT)
    check_writable(path)
    return path


def check_writable(path: str | os.PathLike) -> None:
    """The nearest existing folder above `path` must be a folder we can create files in: probed for
    real (root passes every permission check, but not a read-only or virtual file system)."""
    path = Path(path).absolute()
    base = next(p for p in path.parents if p.exists() or p.is_symlink())
    if not base.is_dir():
        raise OutputNotWritable(f"cannot write {path}: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputNotWritable(f"cannot write {path}: {base} is not writable ({os.strerror(errno.EACCES)})")
    try:
        fd, probe = tempfile.mkstemp(prefix=".compressadvise-probe.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputNotWritable(f"cannot write {path}: {base}: {_cause(e)}") from e


def _existing_inputs(inputs: Mapping[str, Any]) -> Iterator[tuple[str, Path]]:
    for label, src in inputs.items():
        if isinstance(src, (str, os.PathLike)) and str(src) and os.path.exists(src):
            yield label, Path(src)


def _same_file(out: Path, src: Path) -> bool:
    """Same inode (catches symlinks and hard links), not just the same spelling."""
    try:
        return out.exists() and os.path.samefile(out, src)
    except OSError:
        return False


def _inside(src: Path, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    return folder.resolve() in src.resolve().parents


# ---------------------------------------------------------------- atomic output folders
@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename.

    An interrupted run leaves only a `.tmp` folder, never a half-written output that looks done;
    one a killed run left behind is removed by the next run (see `sweep_stale`).
    """
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise OutputExists(f"{final} is a file, not a folder: it is never replaced",
                           hint="give a new or existing output folder")
    if final.exists() and not force:
        raise OutputExists(f"{final} already exists", hint=FORCE_HINT)
    started = time.time()
    with writing(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(final, before=started)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        with writing(final):
            (tmp / PID_MARKER).write_text(f"{os.getpid()} {socket.gethostname()}\n")
            tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the output from the rest of a team
        yield tmp
        with writing(final):
            (tmp / PID_MARKER).unlink(missing_ok=True)
            _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, final: Path) -> None:
    """Two renames when replacing; a failure between them puts the previous output back."""
    if not final.exists():
        os.replace(tmp, final)
        return
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    with _interrupts_deferred():
        os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(old, final)
            raise
    shutil.rmtree(old, ignore_errors=True)


def sweep_stale(final: str | os.PathLike, *, before: float) -> list[Path]:
    """Remove `.{name}.*.tmp` folders beside `final` that earlier, killed runs left (SIGKILL skips
    every cleanup): only those older than `before` whose owner is gone. Returns what was removed."""
    final = Path(final)
    prefix = f".{final.name}."
    removed = []
    with contextlib.suppress(OSError), os.scandir(final.parent) as entries:
        for entry in entries:
            if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
                continue
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False) and _abandoned(Path(entry.path), before):
                    shutil.rmtree(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _abandoned(folder: Path, before: float) -> bool:
    mtime = folder.stat().st_mtime
    if mtime >= before:
        return False  # made during this run: another live process, surely
    try:
        pid_text, _, host = (folder / PID_MARKER).read_text().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):  # no marker: killed before writing it, or an older version's folder
        return mtime < before - UNMARKED_GRACE_S
    if host and host != socket.gethostname():
        return False  # a shared file system: that host's process cannot be checked from here
    return pid > 0 and not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


@contextlib.contextmanager
def temp_files_in(folder: str | os.PathLike) -> Iterator[Path]:
    """Point `tempfile`'s default folder into `folder` for the block, then delete it: libraries'
    own temporaries (coremltools writes each converted or compressed model as a `tmp*.mlpackage`
    and only removes it at exit) land in our temp folder, which a later run sweeps if this one is
    killed, instead of piling up in the system temp folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(folder, ignore_errors=True)
