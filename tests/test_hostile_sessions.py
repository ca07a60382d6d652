"""Files the tool writes are data, never code or trust.

Each test builds its own hostile file: a walkthrough session.json that grants --trust-pickle or
names code to import, an `apply` manifest naming a Python factory, a model that cannot be
loaded. Code a file names is a module in the current folder that writes a marker when it is
imported; the marker must never appear unless the user named that code on the command line.
"""
from __future__ import annotations

from cli_helpers import call_main

import json
import shlex
import signal
import sys
from pathlib import Path

import pytest
import torch

from compressadvise.ui import walkthrough as W

EVIL = "open({marker!r}, 'w').write('imported')\n"


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    """Run in tmp_path (user modules are imported from the current folder) and forget them after."""
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    handler = signal.getsignal(signal.SIGINT)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("ca_hostile_"):
            del sys.modules[name]
    signal.signal(signal.SIGINT, handler)


def cli(capsys, *args: str) -> tuple[int, str]:
    """Exit code and everything printed (stdout + stderr) of one in-process CLI call."""
    code = call_main(*args)
    out = capsys.readouterr()
    return code, " ".join((out.out + out.err).split())


def evil_module(folder: Path, name: str, body: str = "") -> Path:
    """A module in `folder` that leaves a marker file when imported; returns the marker's path."""
    marker = folder / f"{name}.imported"
    (folder / f"{name}.py").write_text(EVIL.format(marker=str(marker)) + body)
    return marker


class _Payload:
    """Pickles as a call to exec: unpickling the file runs this code."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def hostile_pickle(path: Path, marker: Path) -> Path:
    torch.save(_Payload(EVIL.format(marker=str(marker))), path)
    return path


def write_session(out: Path, **fields) -> Path:
    """A session.json written by hand, the way an attacker (or an old version) would."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / W.SESSION_FILE
    path.write_text(json.dumps({"session_version": 1, **fields}))
    return path


# ------------------------------------------------------------------ 1. session.json grants no trust
@pytest.mark.parametrize("done", [[], ["model", "target"]])
def test_saved_trust_pickle_never_unpickles(capsys, tmp_path, done):
    marker = tmp_path / "pickle.ran"
    model = hostile_pickle(tmp_path / "evil.pt", marker)
    out = tmp_path / "session"
    write_session(out, model=str(model), trust_pickle=True, done=done, target="ane-a17", os=18)
    code, text = cli(capsys, "walkthrough", "--resume", str(out), "--yes")
    assert code == 5, text
    assert not marker.exists(), "a saved session granted --trust-pickle"
    assert "--trust-pickle" in text and "Traceback" not in text
    assert "ignored" in text  # the old key is read and said to be ignored
    assert json.loads((out / W.SESSION_FILE).read_text())["trust_pickle"] is False


def test_untrusted_pickle_in_a_new_session_leaves_no_folder(capsys, tmp_path):
    marker = tmp_path / "pickle.ran"
    model = hostile_pickle(tmp_path / "evil.pt", marker)
    out = tmp_path / "session"
    code, text = cli(capsys, "walkthrough", str(model), "--out", str(out), "--yes")
    assert code == 5 and not marker.exists(), text
    assert not out.exists()


def test_saved_evaluator_is_not_imported_on_resume(capsys, tmp_path):
    marker = evil_module(tmp_path, "ca_hostile_eval", "def run(model):\n    return {'accuracy': 1.0}\n")
    out = tmp_path / "session"
    write_session(out, model=None, done=["model", "target", "evaluation"], target="ane-a17", os=18,
                  samples="bundled", evaluator="ca_hostile_eval:run")
    code, text = cli(capsys, "walkthrough", "--resume", str(out), "--yes")
    assert code == 2, text
    assert not marker.exists(), "a saved session chose code to import"
    assert "--eval ca_hostile_eval:run" in text and "--eval none" in text
    assert text.count("error:") == 1 and "Traceback" not in text


def _resume_without_apply(monkeypatch, tmp_path, evaluator: str | None, eval_now: str) -> tuple[W.Session, str]:
    """Resume a session with an evaluator, apply/verify/report switched off (nothing slow runs)."""
    from io import StringIO

    from rich.console import Console

    monkeypatch.setattr(W, "available", lambda module: False)
    out = tmp_path / "session"
    write_session(out, model=None, done=["model", "target", "evaluation"], target="ane-a17", os=18,
                  samples="bundled", evaluator=evaluator)
    console = Console(file=StringIO(), width=200)
    session = W.run(out, resume=True, interactive=False, console=console, defaults={"eval": eval_now})
    return session, " ".join(console.file.getvalue().split())


def test_evaluator_given_again_is_kept_and_none_drops_it(monkeypatch, tmp_path):
    marker = evil_module(tmp_path, "ca_hostile_ok", "def run(model):\n    return {'accuracy': 1.0}\n")
    kept, _ = _resume_without_apply(monkeypatch, tmp_path, "ca_hostile_ok:run", "ca_hostile_ok:run")
    assert kept.evaluator == "ca_hostile_ok:run" and kept.done == list(W.STAGES)
    assert any("--eval ca_hostile_ok:run" in c for c in kept.commands)
    assert not marker.exists()  # apply and verify are off here: nothing needed it yet
    dropped, said = _resume_without_apply(monkeypatch, tmp_path / "again", "ca_hostile_ok:run", "none")
    assert dropped.evaluator is None and not any("--eval" in c for c in dropped.commands)
    assert "without the evaluator" in said


def test_saved_factory_model_is_not_imported_on_resume(capsys, tmp_path):
    marker = evil_module(tmp_path, "ca_hostile_factory", "def make():\n    raise RuntimeError('factory ran')\n")
    out = tmp_path / "session"
    write_session(out, model="ca_hostile_factory:make", done=["model"], target="ane-a17", os=18)
    code, text = cli(capsys, "walkthrough", "--resume", str(out), "--yes")
    assert code == 2, text
    assert not marker.exists(), "a saved session chose a factory to import"
    assert "walkthrough ca_hostile_factory:make --resume" in text


def test_reproduce_script_quotes_every_value(tmp_path):
    """reproduce.sh is run by a shell: each value from the session must stay one inert word."""
    hostile = {"model": "m.pt; touch PWNED", "target": "ane-a17 $(touch PWNED)", "samples": "`touch PWNED`.npz",
               "evaluator": "ev'il:run && touch PWNED"}
    s = W.Session(os=18, max_size_mb=1.0, data="calibration", input_shape=[1, 3, 8, 8], **hostile)
    out = tmp_path / "out dir; touch PWNED"
    seen = set()
    for steps in (True, False):
        for cmd in W.reproduce_commands(s, out, steps=steps):
            line = cmd.split("  # ")[0].replace(" > ", " ")  # the comment and verify's redirect
            for word in shlex.split(line):
                if "PWNED" in word:
                    assert word in hostile.values() or word.startswith(str(out)), (word, cmd)
                    seen.add(word)
    assert set(hostile.values()) <= seen  # every hostile value did reach a command


# ------------------------------------------------------------------ 2. manifest.json names no code
def _run_dir(tmp_path: Path, source: str, fmt: str = "factory") -> Path:
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import recommend
    from compressadvise.plan.planfile import save_plan

    run = tmp_path / "run"
    run.mkdir()
    save_plan(recommend(analyze(None), target="ane-a17"), run / "plan.yaml")
    (run / "manifest.json").write_text(json.dumps({"input": {"source": source, "format": fmt}, "plan": "plan.yaml"}))
    return run


def test_report_never_imports_a_factory_named_by_the_manifest(capsys, tmp_path):
    marker = evil_module(tmp_path, "ca_hostile_rep", "def make():\n    raise RuntimeError('factory ran')\n")
    run = _run_dir(tmp_path, "ca_hostile_rep:make")
    html = tmp_path / "r.html"
    code, text = cli(capsys, "report", str(run), "--out", str(html))
    assert code == 0, text
    assert not marker.exists(), "the manifest chose code to import"
    assert "names a Python factory" in text and "--model" in text
    assert "names a Python factory" in html.read_text()


def test_report_model_option_loads_the_original_the_user_names(capsys, tmp_path):
    (tmp_path / "ca_hostile_good.py").write_text(
        "from compressadvise.examples import digits\n\ndef make():\n    return digits.trained_model()\n")
    run = _run_dir(tmp_path, "ca_hostile_good:make")
    from compressadvise.ui import report as R

    inp = R.gather(run, model="ca_hostile_good:make")
    assert inp.read["model"] == "ca_hostile_good:make" and inp.report.layers
    assert not any("factory" in n for n in inp.notes)
    code, text = cli(capsys, "report", str(tmp_path / "nope.pt"), "--model", "ca_hostile_good:make",
                     "--out", str(tmp_path / "x.html"))
    assert code == 2 and "--model" in text, text  # --model names the original of a run folder only


def _state_dict_run(tmp_path: Path, module: str) -> tuple[Path, Path]:
    """An apply folder whose torch artefact is a state dict that `module:make` (a module in the
    current folder that leaves a marker when imported) would rebuild: (marker, folder)."""
    marker = evil_module(tmp_path, module, "import torch\n\ndef make():\n    return torch.nn.Linear(4, 2)\n")
    run = tmp_path / "applied"
    run.mkdir()
    torch.save(torch.nn.Linear(4, 2).state_dict(), run / "state_dict.pt")
    (run / "manifest.json").write_text(json.dumps({
        "input": {"source": f"{module}:make", "format": "factory"}, "torch_artifact": "state_dict.pt",
        "torch_format": "state_dict", "backends_used": []}))
    return marker, run


def test_verify_never_imports_a_factory_named_by_the_manifest(capsys, tmp_path):
    marker, run = _state_dict_run(tmp_path, "ca_hostile_ver")
    code, text = cli(capsys, "verify", "bundled", str(run), "--no-latency", "--no-drift")
    assert code == 4, text
    assert not marker.exists(), "the manifest chose code to import"
    assert "verify ca_hostile_ver:make" in text and text.count("error:") == 1
    # Named on the command line, the same factory is the user's choice: it rebuilds the model.
    code, text = cli(capsys, "verify", "ca_hostile_ver:make", str(run), "--no-latency", "--no-drift",
                     "--samples", str(_linear_samples(tmp_path)))
    assert code == 0, text
    assert marker.exists()


@pytest.mark.parametrize("manifest", [[], {"torch_artifact": "state_dict.pt", "torch_format": "state_dict",
                                             "input": "ca_hostile_x:make"}])
def test_verify_refuses_a_malformed_manifest_in_one_line(capsys, tmp_path, manifest):
    run = tmp_path / "applied"
    run.mkdir()
    torch.save(torch.nn.Linear(4, 2).state_dict(), run / "state_dict.pt")
    (run / "manifest.json").write_text(json.dumps(manifest))
    code, text = cli(capsys, "verify", "bundled", str(run), "--no-latency", "--no-drift")
    assert code == 4 and "manifest.json" in text and "internal error" not in text, text


def _linear_samples(tmp_path: Path) -> Path:
    import numpy as np

    path = tmp_path / "lin.npz"
    np.savez(path, inputs=np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    return path


# ------------------------------------------------------------------ 3. a failed load leaves no session
def test_a_walkthrough_that_fails_loading_leaves_nothing_behind(capsys, tmp_path):
    out = tmp_path / "out"
    code, text = cli(capsys, "walkthrough", str(tmp_path / "missing.pt"), "--out", str(out), "--yes")
    assert code == 3, text
    assert not out.exists()
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip archive")
    code, text = cli(capsys, "walkthrough", str(corrupt), "--out", str(out), "--yes")
    assert code == 4, text
    assert not out.exists()
    # The same folder takes the next session; it stops at the (missing) samples, after the model.
    code, text = cli(capsys, "walkthrough", "--out", str(out), "--yes", "--samples", str(tmp_path / "nope.npz"))
    assert code == 3 and "no such sample file" in text, text
    assert json.loads((out / W.SESSION_FILE).read_text())["done"] == ["model", "target"]


def test_a_leftover_session_that_never_loaded_its_model_is_replaced(capsys, tmp_path):
    out = tmp_path / "out"
    write_session(out, model=str(tmp_path / "missing.pt"), done=[])  # what an older version left
    code, text = cli(capsys, "walkthrough", "--out", str(out), "--yes", "--samples", str(tmp_path / "nope.npz"))
    assert code == 3 and "no such sample file" in text, text
    assert json.loads((out / W.SESSION_FILE).read_text())["model"] is None
    (out / "mine.txt").write_text("keep")  # a folder holding other files is still refused
    write_session(out, done=[])
    code, _ = cli(capsys, "walkthrough", "--out", str(out), "--yes")
    assert code == 9 and (out / "mine.txt").read_text() == "keep"


def test_load_artifact_never_imports_a_factory_named_by_the_manifest(tmp_path):
    """The library call itself (not only `verify`) refuses a factory the manifest names."""
    from compressadvise.backends.apply import load_artifact
    from compressadvise.errors import BadModel

    marker, run = _state_dict_run(tmp_path, "ca_hostile_art")
    with pytest.raises(BadModel, match="never chooses code"):
        load_artifact(run)
    assert not marker.exists(), "the manifest chose code to import"
    assert isinstance(load_artifact(run, factory="ca_hostile_art:make").module, torch.nn.Linear)
    assert marker.exists()
