"""`compressadvise verify` as CI meets it: the table, --json, and documented exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from compressadvise.ui.cli import main
from compressadvise.examples import digits
from test_verify_models import broken, digits_subset, export, palettize

FAST = ["--reps", "3", "--warmup", "1"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("verify_cli")
    m = digits.trained_model()
    return {"pal4": str(export(palettize(m, 4), d / "pal4.pt2")),
            "broken": str(export(broken(m), d / "broken.pt2")),
            "samples": str(digits_subset(d / "digits60.npz"))}


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def test_table_with_accuracy_worst_class_latency_and_estimate(capsys, models, monkeypatch):
    from compressadvise.ui import render

    monkeypatch.setattr(render.out, "width", 200)  # no wrapping inside table cells
    code, out, err = cli(capsys, "verify", "bundled", models["pal4"], "--samples", models["samples"],
                         "--target", "ane-a17", "--max-accuracy-drop", "5", *FAST)
    assert code == 0, err
    for text in ("Before / after", "top-1 accuracy", "latency median (eager)", "measured here",
                 "Per class", "Per-layer drift", "error starts at stem", "estimate", "Budgets", "PASS",
                 "all budgets met", "on-device timing is unavailable here"):
        assert text in out, text
    assert "worst class" in out or "no class lost accuracy" in out


def test_budget_missed_exits_1_with_json(capsys, models):
    code, out, err = cli(capsys, "verify", "bundled", models["broken"], "--samples", models["samples"],
                         "--max-accuracy-drop", "1", "--no-latency", "--no-drift", "--json")
    assert code == 1
    data = json.loads(out)
    assert data["passed"] is False and data["budgets"][0]["passed"] is False
    assert err.startswith("error: budget missed: accuracy drop")


def test_json_passes_with_exit_0(capsys, models):
    code, out, _ = cli(capsys, "verify", "bundled", models["pal4"], "--samples", models["samples"],
                       "--max-size-mb", "1", "--no-drift", "--json", *FAST)
    data = json.loads(out)
    assert code == 0 and data["passed"] is True
    assert data["latency"]["label"] == "measured" and data["budgets"][0]["name"] == "size"


@pytest.mark.parametrize("make_args,code,text", [
    (lambda m, p: ["bundled", "/no/such/model.pt2"], 3, "no such file"),
    (lambda m, p: ["bundled", m["pal4"], "--samples", str(p / "rgb.npz")], 6, "failed on samples"),
    (lambda m, p: ["bundled", m["pal4"], "--samples", str(p / "nope.npz")], 3, "no such sample file"),
    (lambda m, p: ["bundled", m["pal4"], "--eval", "no_such_module_q:f"], 3, "cannot import evaluator"),
    (lambda m, p: ["bundled", m["pal4"], "--metric", "output=bleu"], 6, "bad metric override"),
    (lambda m, p: ["bundled", m["pal4"], "--target", "toaster"], 2, "unknown target 'toaster'"),
    (lambda m, p: ["bundled", m["pal4"], "--compute-units", "GPU_ONLY"], 2, "--compute-units"),
])
def test_bad_input_is_one_line_with_its_exit_code(capsys, models, tmp_path, make_args, code, text):
    np.savez(tmp_path / "rgb.npz", inputs=np.zeros((2, 3, 8, 8), np.float32))
    got, _, err = cli(capsys, "verify", *make_args(models, tmp_path), "--no-latency", "--no-drift")
    assert got == code, err
    assert text in err and "Traceback" not in err


def test_gate_exit_code_from_a_real_process(models):
    """The exit code a CI runner sees, through the installed entry point's main()."""
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    r = subprocess.run([sys.executable, "-c", "from compressadvise.ui.cli import main; main()", "verify", "bundled",
                        models["broken"], "--samples", models["samples"], "--max-accuracy-drop", "1",
                        "--no-latency", "--no-drift"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "MISS" in r.stdout and "budget missed" in r.stderr and "Traceback" not in r.stderr
