"""The CLI as a user meets it: exit codes, one-line errors, no traceback, --json, fast starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cli_helpers import run_captured
from models import TinyCNN

EXE = [sys.executable, "-c", "from compressadvise.ui.cli import main; main()"]


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_analyze_bundled_json_schema():
    r = run("analyze", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["schema_version"] == "1"
    assert data["family"] == "cnn"
    assert data["total_params"] == 73930
    assert {x["name"] for x in data["layers"]} >= {"stem", "dw", "pw", "conv", "fc", "classifier"}


def test_analyze_table_and_recommend(tmp_path, capsys):
    # in this process (the real entry point, a subprocess's start-up saved): the exit codes and
    # output of a real process are test_analyze_bundled_json_schema's and the error cases'
    code, out, err = run_captured(capsys, "analyze", "--top", "3", "--sort", "macs")
    assert code == 0, err
    assert "Layers (3 of 7, by macs)" in out and "conv" in out
    plan = tmp_path / "plan.yaml"
    code, out, err = run_captured(capsys, "recommend", "--no-measure", "--out", plan)  # measuring: test_recommend_measured
    assert code == 0, err
    assert plan.exists() and "estimate" in out
    code, out, _ = run_captured(capsys, "recommend", "--json", "--no-measure")
    assert json.loads(out)["prediction"]["label"] == "estimate"


def test_the_replay_hint_runs_as_printed(tmp_path):
    import re
    import shlex

    r = run("recommend", "--no-measure", "--out", "plan.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    hint = re.search(r"replay with `compressadvise ([^`]+)`", " ".join(r.stdout.split())).group(1)
    r = run(*shlex.split(hint), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "compressed" / "manifest.json").exists()


def test_version_exits_zero():
    from compressadvise import __version__

    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == __version__


@pytest.mark.parametrize("args,code,text", [
    (["analyze", "/nonexistent/model.pt"], 3, "no such file"),
    (["recommend", "--target", "toaster"], 2, "unknown target 'toaster'"),
    (["recommend", "--target", "ane-a71"], 2, "did you mean 'ane-a17'"),
    (["explain", "ZZZ999"], 2, "unknown rule, technique or target 'ZZZ999'"),
    (["explain", "palettisation"], 2, "did you mean 'palettization'"),
    (["learn", "palettisation"], 2, "did you mean 'palettization'"),
    (["analyze", "--sort", "colour"], 2, "--sort"),
    (["frobnicate"], 2, "No such command"),
])
def test_errors_are_one_line_with_exit_codes(args, code, text):
    r = run(*args)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert text in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_pickle_refused_then_allowed(tmp_path):
    torch.save(TinyCNN(), tmp_path / "full.pt")
    r = run("analyze", str(tmp_path / "full.pt"))
    assert r.returncode == 5 and "--trust-pickle" in r.stderr and "Traceback" not in r.stderr
    r = run("analyze", str(tmp_path / "full.pt"), "--trust-pickle", "--json", cwd=os.path.dirname(__file__))
    assert r.returncode == 0, r.stderr


def test_corrupt_file_exit_4(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(b"PK\x03\x04garbage")
    r = run("analyze", str(tmp_path / "bad.pt2"))
    assert r.returncode == 4 and "corrupt" in r.stderr and "Traceback" not in r.stderr


def test_debug_shows_traceback():
    r = run("--debug", "analyze", "/nonexistent/model.pt")
    assert r.returncode == 3 and "Traceback" in r.stderr


def test_explain_takes_a_target_or_a_technique(capsys):
    """A target's page shows when it decompresses weights (what the roofline streams) by OS."""
    from cli_helpers import run_captured as call_main

    code, out, _ = call_main(capsys, "explain", "ane-a17")
    assert code == 0 and "Weight decompression" in out and "just in time" in out and "iOS 17" in out
    code, out, _ = call_main(capsys, "explain", "x86-cpu", "--json")
    d = json.loads(out)
    assert code == 0 and d["explains"] == "target" and d["decompression"][0]["at"] == "just_in_time"
    assert "Int8 compute: a fast path" in d["markdown"]
    code, out, _ = call_main(capsys, "explain", "palettization", "--json")
    assert code == 0 and json.loads(out)["explains"] == "technique"
    code, _, err = call_main(capsys, "explain", "no-such-thing")
    assert code == 2 and "`compressadvise rules`, `techniques` and `targets` list them" in err


def test_knowledge_commands_do_not_import_torch():
    code = ("import sys\nfrom compressadvise.ui.cli import app\n"
            "for args in (['rules','--json'], ['techniques','--json'], ['targets','--json'], ['playbooks','validate'],\n"
            "             ['explain','x86-cpu'], ['explain','palettization','--json'], ['explain','wgt001']):\n"
            "    try:\n        app(args=args, prog_name='compressadvise')\n    except SystemExit as e:\n        assert not e.code, e.code\n"
            "bad = [m for m in ('torch', 'coremltools', 'torchao') if m in sys.modules]\n"
            "assert not bad, bad\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
