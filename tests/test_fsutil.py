"""Atomic writes: never a half-written file, never a stray temp file, even on Ctrl-C."""
from __future__ import annotations

import os
import signal

import pytest

from compressadvise.errors import OutputExists
from compressadvise.fsutil import atomic_dir, write_text_atomic


def test_ctrl_c_during_a_write_is_held_until_the_file_is_whole(tmp_path, monkeypatch):
    real_replace = os.replace

    def replace_after_ctrl_c(src, dst):  # Ctrl-C lands between writing the temp file and the rename
        os.kill(os.getpid(), signal.SIGINT)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_after_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _check_deferred(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_deferred(tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(tmp_path / "out.json", "{}")
    assert (tmp_path / "out.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "out.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        (d / "a").write_text("1")
    with pytest.raises(OutputExists):
        with atomic_dir(final):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(final, force=True) as d:
            (d / "b").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in final.iterdir()] == ["a"]
