"""Hostile runtime conditions: a SIGKILLed parent, Ctrl-C at any moment, evaluators that print
or exit, labels the model cannot predict, and CLI values that make no sense.

Each test builds its own hostile input and goes through the real entry point (a subprocess
where signals or pipes matter, `compressadvise.ui.cli.main` in-process otherwise).
"""
from __future__ import annotations

from cli_helpers import call_main

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from compressadvise.ui.cli import main

ENTRY = [sys.executable, "-c", "from compressadvise.console import main; main()"]  # the console script
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
BOX = str.maketrans("", "", "│╭╮╰╯─")


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr (rich boxes removed, whitespace collapsed) of one in-process call."""
    code = call_main(*args)
    out = capsys.readouterr()
    return code, out.out, " ".join(out.err.translate(BOX).split())


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    """Run in tmp_path (evaluators are imported from the current folder) and forget them after."""
    monkeypatch.chdir(tmp_path)
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("ca_rt_"):
            del sys.modules[name]


def _digits(path: Path, labels: np.ndarray | None = None, n: int = 40) -> Path:
    """The first n bundled held-out digits as a sample file, with these labels if given."""
    import torch

    from compressadvise.examples import digits

    x, y = digits.samples()
    lab = y[:n] if labels is None else labels
    if path.suffix == ".pt":
        torch.save({"inputs": torch.from_numpy(x[:n]), "labels": torch.from_numpy(lab)}, path)
    else:
        np.savez(path, inputs=x[:n], labels=lab)
    return path


# ------------------------------------------------------------------ 1. SIGKILL of the parent
def _drain(pipe, done: threading.Event) -> None:
    while pipe.read(65536):
        pass
    done.set()  # EOF: every process holding the write end has gone


def _grandchildren(family: list[psutil.Process], pid: int) -> int:
    """Processes below the children: the workers the fork server forked."""
    n = 0
    for p in family:
        try:
            n += p.ppid() != pid
        except psutil.NoSuchProcess:
            pass
    return n


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigkill_of_sensitivity_takes_fork_server_and_workers_with_it(tmp_path):
    proc = subprocess.Popen([*ENTRY, "sensitivity", "--workers", "2", "--cache", str(tmp_path / "cache")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=ENV)
    eof = threading.Event()
    threading.Thread(target=_drain, args=(proc.stdout, eof), daemon=True).start()
    parent = psutil.Process(proc.pid)
    family: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 180
        # resource tracker + fork server + 2 workers forked from it
        while time.monotonic() < deadline and proc.poll() is None:
            family = parent.children(recursive=True)
            if _grandchildren(family, proc.pid) >= 2:
                break
            time.sleep(0.2)
        assert _grandchildren(family, proc.pid) >= 2, f"no workers started: {family}"
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(map(_alive, family)) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [p.pid for p in family if _alive(p)]
        assert not alive, f"processes outlived their SIGKILLed parent: {alive}"
        assert eof.wait(10), "the caller's pipe is still held open"
    finally:
        for p in family:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


# ------------------------------------------------------------------ 2. Ctrl-C while heavy imports run
@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plan") / "plan.yaml"
    try:
        main(["recommend", "--no-measure", "--out", str(path)])
    except SystemExit as e:
        assert not e.code
    return path


# coremltools runs `try: import sklearn / except: _HAS_SKLEARN = False`: a Ctrl-C raised there is
# swallowed. This entry point holds that one import for a while (once), so the test can press
# Ctrl-C exactly inside it; it says when through the marker file.
SLOW_SKLEARN = """
import os, sys, time
class HoldSklearn:
    def find_spec(self, name, path=None, target=None):
        marker = os.environ.pop("CA_RT_MARKER", None) if name == "sklearn" else None
        if marker:
            open(marker, "w").close()
            time.sleep(2)
        return None
sys.meta_path.insert(0, HoldSklearn())
from compressadvise.console import main
main()
"""


def _interrupt_apply(plan: Path, out: Path, *, delay: float = 0.0, marker: Path | None = None) -> tuple[int, str]:
    env = {**ENV, "CA_RT_MARKER": str(marker)} if marker else ENV
    cmd = [sys.executable, "-c", SLOW_SKLEARN] if marker else ENTRY
    proc = subprocess.Popen([*cmd, "apply", "--plan", str(plan), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 180
        while marker and not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    return proc.returncode, err


def _assert_interrupted(code: int, err: str, out: Path) -> None:
    assert code == 130, err
    assert "interrupted" in err and "Traceback" not in err and "scikit-learn" not in err, err
    assert err.count("interrupted") == 1 and not out.exists()


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5, 2.5])
def test_ctrl_c_during_imports_always_exits_130_and_writes_nothing(tmp_path, plan, delay):
    out = tmp_path / "out"
    _assert_interrupted(*_interrupt_apply(plan, out, delay=delay), out)


def test_ctrl_c_inside_a_guarded_third_party_import_is_not_swallowed(tmp_path, plan):
    out, marker = tmp_path / "out", tmp_path / "importing-sklearn"
    code, err = _interrupt_apply(plan, out, delay=0.5, marker=marker)
    assert marker.exists(), err
    _assert_interrupted(code, err, out)


def test_a_ctrl_c_held_while_the_cli_imports_is_exit_130(monkeypatch, tmp_path, capsys):
    """The console script notes a Ctrl-C that comes while Typer/Rich/torch import (before the
    CLI's own handler exists); main() then exits 130 before running the command."""
    import compressadvise.console as console

    monkeypatch.setattr(console, "PRESSED", [signal.SIGINT])
    out = tmp_path / "plan.yaml"
    code, _, err = cli(capsys, "recommend", "--out", str(out))
    assert code == 130 and "interrupted" in err and not out.exists()


# ------------------------------------------------------------------ 3. evaluators
EVALUATORS = """\
import os, sys
print("importing the evaluator")
def chatty(model):
    print("evaluating...")
    sys.stdout.flush()
    os.write(1, b"straight to fd 1\\n")
    return {"accuracy": 50.0}
def bye(model):
    sys.exit(3)
def bye_quietly(model):
    raise SystemExit
"""


def test_evaluator_prints_do_not_break_json(capfd, tmp_path):
    (tmp_path / "ca_rt_eval.py").write_text(EVALUATORS)
    code, out, err = cli(capfd, "verify", "bundled", "bundled", "--samples", "bundled", "--eval", "ca_rt_eval:chatty",
                         "--no-latency", "--no-drift", "--json")
    assert code == 0, err
    data = json.loads(out)  # stdout is the JSON and nothing else
    assert [r["name"] for r in data["evaluator"]] == ["accuracy"]
    assert "evaluating..." in err and "straight to fd 1" in err and "importing the evaluator" in err


@pytest.mark.parametrize("fn,shown", [("bye", "exit(3)"), ("bye_quietly", "exit(None)")])
def test_evaluator_exit_is_an_evaluator_failure(capfd, tmp_path, fn, shown):
    (tmp_path / "ca_rt_eval.py").write_text(EVALUATORS)
    code, out, err = cli(capfd, "verify", "bundled", "bundled", "--samples", "bundled", "--eval", f"ca_rt_eval:{fn}",
                         "--no-latency", "--no-drift", "--json")
    assert code == 6, err
    assert f"evaluator ca_rt_eval:{fn} called {shown}" in err and err.count("error:") == 1
    assert "Traceback" not in err and "importing the evaluator" not in out


# ------------------------------------------------------------------ 4. labels the model cannot predict
@pytest.mark.parametrize("name,bad", [("bad.npz", 10), ("bad.pt", -1)])
def test_labels_outside_the_output_range_are_refused(capsys, tmp_path, name, bad):
    labels = np.full(40, bad, dtype=np.int64)  # accuracy 0% -> 0%: the gate would pass on nothing
    samples = _digits(tmp_path / name, labels)
    code, out, err = cli(capsys, "verify", "bundled", "bundled", "--samples", str(samples),
                         "--max-accuracy-drop", "1", "--no-latency", "--no-drift")
    assert code == 6, err
    assert str(samples) in err and f"label {bad} at sample 0" in err and "10 classes" in err, err
    assert err.count("error:") == 1 and "Traceback" not in err


def test_labels_inside_the_range_still_verify(capsys, tmp_path):
    code, out, err = cli(capsys, "verify", "bundled", "bundled", "--samples", str(_digits(tmp_path / "ok.npz")),
                         "--max-accuracy-drop", "1", "--no-latency", "--no-drift", "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"][0]["name"] == "top-1 accuracy"


# ------------------------------------------------------------------ 5. --input-shape
@pytest.mark.parametrize("shape,text", [
    ("1,x,3", "positive integers separated by ','"),
    ("x1,3", "positive integers separated by ','"),
    ("1,-3", "positive integers separated by ','"),
    ("1,3,", "positive integers separated by ','"),
    ("1,0,8,8", "must be > 0"),
    ("100000000,64", "would allocate 6,400,000,000 floats (25.6 GB)"),
    ("9" * 60, "digits"),
])
def test_bad_input_shape_is_a_usage_error(capsys, shape, text):
    code, _, err = cli(capsys, "analyze", "--input-shape", shape, "--no-stats")
    assert code == 2, err
    assert text in err and "Traceback" not in err


def test_input_shape_with_x_separators_still_parses(capsys):
    code, out, err = cli(capsys, "analyze", "--input-shape", "1x1x8x8", "--no-stats", "--json")
    assert code == 0, err
    assert json.loads(out)["input_shape"] == [1, 1, 8, 8]


# ------------------------------------------------------------------ 6. search budgets
@pytest.mark.parametrize("option,value,text", [
    ("--size-fraction", "7", "--size-fraction must be in (0, 1]"),
    ("--size-fraction", "-1", "--size-fraction must be in (0, 1]"),
    ("--size-fraction", "0", "--size-fraction must be in (0, 1]"),
    ("--size-fraction", "nan", "--size-fraction must be in (0, 1]"),
    ("--bits-per-weight", "33", "--bits-per-weight must be in (0, 32]"),
    ("--bits-per-weight", "0", "--bits-per-weight must be in (0, 32]"),
    ("--max-size-mb", "-5", "--max-size-mb must be a finite number > 0"),
    ("--max-size-mb", "inf", "--max-size-mb must be a finite number > 0"),
    ("--max-latency-ms", "0", "--max-latency-ms must be a finite number > 0"),
    ("--max-latency-ms", "nan", "--max-latency-ms must be a finite number > 0"),
])
def test_nonsense_search_budget_is_a_usage_error_before_loading(capsys, monkeypatch, option, value, text):
    import compressadvise.measure.sensitivity as S

    def no_loading(*a, **k):
        raise AssertionError("loaded the model before checking the budget")

    monkeypatch.setattr(S, "prepare", no_loading)
    code, _, err = cli(capsys, "search", option, value, "--workers", "1")
    assert code == 2, err
    assert text in err and "Traceback" not in err
