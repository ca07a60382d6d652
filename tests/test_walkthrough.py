"""The guided walkthrough, the what-if sizing behind it, and the `learn` lessons.

The two pseudo-terminal tests drive the real CLI with pexpect: one answers every prompt of a
full session on the bundled example (including a step change), the other presses Ctrl-C while
`apply` runs and then resumes the session.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from compressadvise.ui import learn, walkthrough as W

from compressadvise.plan import whatif
from compressadvise.errors import InvalidKnowledge, OutputExists

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]|\x1b\][^\x07]*\x07")
STAGES = list(W.STAGES)


@pytest.fixture(scope="module")
def bundled():
    from compressadvise import analyze, recommend
    from compressadvise.knowledge.base import builtin

    k = builtin()
    report = analyze(None)
    return report, recommend(report, target="ane-a17", knowledge=k), k


# ------------------------------------------------------------------ what-if sizing
def test_whatif_predicts_smaller_for_fewer_bits(bundled):
    report, plan, k = bundled
    assert plan.steps and plan.steps[0].technique == "palettization"
    before = plan.prediction.bytes_after
    four = whatif.set_param(plan, 0, "nbits", 4, report, k)
    assert four.steps[0].params["nbits"] == 4
    assert four.prediction.bytes_after < before
    # The same change made by hand gives the same figure as the engine's own sizing.
    again = whatif.predict(four, report, k)
    assert again.prediction.bytes_after == four.prediction.bytes_after
    assert plan.steps[0].params["nbits"] == 8  # the input plan is left alone


def test_whatif_keep_layers_and_invalid_values(bundled):
    report, plan, k = bundled
    big = plan.steps[0].layers[0]
    kept = whatif.keep_layers(plan, 0, [big], report, k)
    assert big not in kept.steps[0].layers
    assert any(s.layer == big and s.code == whatif.USER_KEEP for s in kept.steps[0].skipped)
    assert kept.prediction.bytes_after > plan.prediction.bytes_after
    with pytest.raises(InvalidKnowledge):
        whatif.set_param(plan, 0, "nbits", 5, report, k)
    with pytest.raises(InvalidKnowledge):
        whatif.keep_layers(plan, 0, ["no_such_layer"], report, k)
    # Grouped LUTs need iOS 18: refused for an OS 17 plan.
    old = plan.model_copy(deep=True)
    old.target.os = 17
    assert "palettize_grouped" in (whatif.check_param(old, 0, "granularity", "per_grouped_channel", k) or "")
    dropped = whatif.drop_step(plan, 0, report, k)
    assert not dropped.steps and dropped.prediction.bytes_after == dropped.prediction.bytes_before


# ------------------------------------------------------------------ expert notes and next moves
def test_expert_notes_on_the_bundled_model(bundled):
    report, plan, _ = bundled
    notes = W.expert_notes(report, plan)
    biggest = max((x for x in report.layers if len(x.weight_shape) >= 2), key=lambda x: x.params)
    assert notes.largest[0].startswith(biggest.name)
    first = next(x.name for x in report.layers if x.is_first)
    assert any(line.startswith(first) and "first layer" in line for line in notes.fragile)
    for step in plan.steps:
        for sk in step.skipped:
            assert any(line.startswith(sk.layer) for line in notes.skipped)


def test_expert_notes_flag_heavy_tails_in_a_model_built_here():
    import torch
    from torch import nn

    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import LoadedModel

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():
        model[2].weight[0, :8] = 40.0  # a few huge weights in the middle layer
    loaded = LoadedModel(source="test", format="module", sha256="", has_graph=True, module=model)
    notes = W.expert_notes(analyze(loaded), None)
    assert any(line.startswith("2:") and "kurtosis" in line for line in notes.fragile)


def test_next_moves_follow_the_missed_budget(bundled):
    report, plan, k = bundled
    acc = W.next_moves(plan, ["accuracy drop"], report, k, data="none")
    assert any("grouped LUTs" in m for m in acc)
    assert any("calibration" in m for m in acc)
    old = plan.model_copy(deep=True)
    old.target.os = 17
    assert not any("grouped LUTs" in m for m in W.next_moves(old, ["accuracy drop"], report, k))
    size = W.next_moves(plan, ["size"], report, k)
    assert any("nbits 8 -> 6" in m for m in size)
    lat = W.next_moves(plan, ["latency"], report, k)
    assert any("W8A8" in m for m in lat)
    assert W.next_moves(plan, [], report, k) == []


def test_round_up_never_suggests_a_budget_below_the_estimate():
    for x in (0.07925, 0.1, 1.234, 12.01, 0.000123):
        r = W.round_up(x)
        assert r >= x and r <= x * 1.11
    assert W.round_up(0.07925) == 0.08


# ------------------------------------------------------------------ session files and commands
def test_session_round_trip_and_refusals(tmp_path):
    s = W.Session(model=None, target="ane-a17", os=18, max_size_mb=0.1, done=["model", "target"])
    W.save_session(tmp_path, s)
    back = W.load_session(tmp_path)
    assert back.target == "ane-a17" and back.next_stage() == "evaluation"
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(OutputExists):
        W.prepare_out(tmp_path, resume=False, force=False)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / W.APPLY_DIR).mkdir()
    W.prepare_out(tmp_path, resume=False, force=True)  # clears this tool's outputs, nothing else
    assert not (tmp_path / W.SESSION_FILE).exists() and not (tmp_path / W.APPLY_DIR).exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / W.SESSION_FILE).write_text('{"done": 3}')
    with pytest.raises(InvalidKnowledge) as e:
        W.load_session(tmp_path)
    assert e.value.exit_code == 6


def test_reproduce_commands_use_real_options(tmp_path):
    """Every --flag of every printed command is an option the real command declares."""
    import typer.main

    from compressadvise.ui.cli import app

    s = W.Session(model="my model.pt2", target="ane-a17", os=18, max_size_mb=0.1, max_accuracy_drop=1.0,
                  data="calibration", samples="cal.npz", evaluator="ev:run", input_shape=[1, 3, 8, 8])
    cmds = W.reproduce_commands(s, tmp_path)
    group = typer.main.get_command(app)
    names = [c.split()[1] for c in cmds]
    assert names == ["recommend", "apply", "verify", "report", "walkthrough"]
    for cmd in cmds:
        words = shlex.split(cmd.split("#")[0].split(">")[0])
        sub = group.get_command(None, words[1])
        declared = {o for p in sub.params for o in p.opts}
        for word in words[2:]:
            if word.startswith("--"):
                assert word in declared, (words[1], word)
        if words[1] != "report":  # the report reads the apply folder, which names the model
            assert "my model.pt2" in words, cmd
    assert "--samples cal.npz" in cmds[1]  # calibration data reaches apply
    assert "--input-shape 1,3,8,8" in cmds[1] and "--input-shape 1,3,8,8" in cmds[-1]
    assert "--eval ev:run" in cmds[2]
    empty = W.reproduce_commands(s, tmp_path, steps=False)
    assert [c.split()[1] for c in empty] == ["recommend", "report", "walkthrough"]
    for cmd in empty:
        words = shlex.split(cmd.split("#")[0])
        declared = {o for p in group.get_command(None, words[1]).params for o in p.opts}
        assert all(w in declared for w in words if w.startswith("--")), cmd


def test_choose_menus_answer_by_value_for_numeric_options():
    from io import StringIO

    from rich.console import Console

    answers = iter(["2", "7", "8"])
    console = Console(file=StringIO(), width=100)
    console.input = lambda prompt="": next(answers)  # type: ignore[method-assign]
    ui = W.UI(console, interactive=True)
    # "2" is a value here, not the second entry; "7" is refused and asked again.
    assert ui.choose("bits", "", [("1", ""), ("2", ""), ("8", "")], "8") == "2"
    assert ui.choose("bits", "", [("1", ""), ("2", ""), ("8", "")], "1") == "8"
    assert "please answer" in console.file.getvalue()
    named = W.UI(console, interactive=False)
    assert named.choose("target", "", [("a", ""), ("b", "")], "b") == "b"


def test_apply_stage_degrades_clearly_when_apply_is_missing(bundled, tmp_path, monkeypatch):
    from io import StringIO

    from rich.console import Console

    report, plan, k = bundled
    console = Console(file=StringIO(), width=100)
    ctx = W.Context(out=tmp_path, session=W.Session(), ui=W.UI(console, interactive=False), knowledge=k,
                    report=report, plan=plan)
    monkeypatch.setattr(W, "available", lambda module: module != "apply")
    W.stage_apply(ctx)
    assert ctx.session.apply_status.startswith("unavailable")
    assert "apply is not available in this build" in " ".join(console.file.getvalue().split())
    assert not (tmp_path / W.APPLY_DIR).exists()


def _cli(*args: str, stdin=subprocess.DEVNULL, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="100")
    return subprocess.run([sys.executable, "-m", "compressadvise.ui.cli", *args], stdin=stdin, capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_piped_stdin_fails_fast_with_the_non_interactive_commands(tmp_path):
    out = tmp_path / "s"
    r = _cli("walkthrough", "--out", str(out))
    assert r.returncode == 2
    assert "not a terminal" in r.stderr and "--yes" in r.stderr and "compressadvise recommend" in r.stderr
    assert not out.exists()


# ------------------------------------------------------------------ learn
@pytest.mark.parametrize("topic", list(learn.LESSONS))
def test_each_lesson_runs_a_real_experiment(topic):
    result = learn.run_lesson(topic)
    assert result.rows and result.takeaways
    assert result.seconds < 10
    for row in result.rows:
        assert 0.0 <= row.accuracy <= 100.0
        assert abs(row.drop - (result.float_accuracy - row.accuracy)) < 1e-6
    assert result.float_accuracy > 95.0  # the trained digits model, measured


def test_palettization_lesson_shows_the_lut_advantage_at_low_bits():
    r = learn.run_lesson("palettization", "2")
    fp16, pal, lin_t, _ = r.rows
    assert pal.snr_db > lin_t.snr_db  # k-means levels fit the weights better than a uniform grid
    assert pal.size_bytes < fp16.size_bytes / 4
    eight = learn.run_lesson("palettization", "8")
    assert eight.rows[1].snr_db > pal.snr_db  # more bits, less error: the measurement is real


def test_granularity_and_sparsity_numbers_move_the_right_way():
    g = learn.run_lesson("granularity", "3")
    per_tensor, per_channel = g.rows[0], g.rows[3]
    assert per_channel.snr_db >= per_tensor.snr_db - 0.1
    assert per_channel.size_bytes > per_tensor.size_bytes  # every LUT is stored
    s = learn.run_lesson("sparsity", "0.9")
    fifty, ninety = s.rows[1], s.rows[2]
    assert ninety.size_bytes < fifty.size_bytes and ninety.snr_db < fifty.snr_db
    with pytest.raises(InvalidKnowledge):
        learn.run_lesson("sparsity", "0.3")


def test_learn_cli_lists_and_runs_without_a_terminal():
    from typer.testing import CliRunner

    from compressadvise.ui.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["learn"])
    assert r.exit_code == 0 and "sensitive-layers" in r.stdout
    r = runner.invoke(app, ["learn", "w8a8", "--choice", "16", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert data["topic"] == "w8a8" and data["choice"] == "16" and data["samples"] == 296
    assert runner.invoke(app, ["learn", "w8a8", "--choice", "5"]).exit_code == 2


# ------------------------------------------------------------------ pseudo-terminal sessions
pexpect = pytest.importorskip("pexpect")


def _spawn(*args: str, log: Path):
    env = dict(os.environ, COLUMNS="100", LINES="50")
    child = pexpect.spawn(sys.executable, ["-m", "compressadvise.ui.cli", *args], env=env, encoding="utf-8",
                          timeout=180, dimensions=(50, 100))
    child.logfile_read = log.open("w")
    return child


def _screen(log: Path) -> str:
    """What the terminal showed, without escape codes and with line wrapping undone."""
    return " ".join(ANSI.sub("", log.read_text()).split())


def _no_temp_files(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old")]
    assert not leftovers, leftovers


@pytest.mark.slow
def test_walkthrough_end_to_end_in_a_terminal(tmp_path):
    from compressadvise.plan.planfile import load_plan

    out = tmp_path / "session"
    log = tmp_path / "screen.log"
    child = _spawn("walkthrough", "--out", str(out), log=log)
    answers = [
        ("Target device", ""), ("Minimum iOS version", ""), (r"Size budget in MB", ""),
        ("Latency budget", ""), ("Accuracy you can lose", "2"), ("Data you have", "none"),
        ("Evaluation samples", ""), ("Your evaluator", ""),
        ("Accept, skip or change", "change"), ("Change what", "nbits"), (r"\? nbits", "4"),
        ("Change what", "granularity"), (r"\? granularity", "per_grouped_channel"),
        ("Change what", "done"), ("Apply the plan now", "y"),
    ]
    for pattern, answer in answers:
        child.expect(pattern)
        child.sendline(answer)
    child.expect(pexpect.EOF, timeout=240)
    child.close()
    screen = _screen(log)
    assert child.exitstatus == 0, screen[-3000:]

    # The screens: expert notes, live size updates, before/after, the commands for CI.
    assert "What an expert notices first" in screen and "Fragile-looking layers" in screen
    sizes = re.findall(r"predicted size: [\d.]+ KB -> ([\d.]+) KB", screen)
    assert len(sizes) >= 3 and float(sizes[1]) < float(sizes[0]), sizes  # 8 -> 4 bits, shown live
    assert "Reproduce this session without questions" in screen

    session = json.loads((out / W.SESSION_FILE).read_text())
    assert session["done"] == STAGES and session["interrupted_at"] is None
    assert session["decisions"][0]["action"] == "change"
    plan = load_plan(out / W.PLAN_FILE)
    assert plan.steps[0].params["nbits"] == 4
    assert plan.steps[0].params["granularity"] == "per_grouped_channel"
    script = (out / W.COMMANDS_FILE).read_text()
    assert "compressadvise apply" in script and str(out / W.PLAN_FILE) in script
    if W.available("apply"):
        assert "Before / after" in screen
        manifest = json.loads((out / W.APPLY_DIR / "manifest.json").read_text())
        assert manifest["steps"][0]["technique"] == "palettization"
        verify = json.loads((out / W.VERIFY_FILE).read_text())
        assert {b["name"] for b in verify["budgets"]} >= {"accuracy drop", "size"}
        assert session["passed"] == verify["passed"]
        if not verify["passed"]:
            assert session["next_moves"] and "Next recommended moves" in screen
    else:
        assert "apply is not available in this build" in screen
    if W.available("report"):
        assert (out / W.REPORT_FILE).read_text().lstrip().lower().startswith("<!doctype html")
    _no_temp_files(out)


def test_walkthrough_interrupted_during_apply_leaves_valid_files_and_resumes(tmp_path):
    from compressadvise.plan.planfile import load_plan

    out = tmp_path / "session"
    log = tmp_path / "screen.log"
    child = _spawn("walkthrough", "--out", str(out), log=log)
    for pattern in ("Target device", "Minimum iOS version", "Size budget", "Latency budget",
                    "Accuracy you can lose", "Data you have", "Evaluation samples", "Your evaluator",
                    "Accept, skip or change"):
        child.expect(pattern)
        child.sendline("")
    applying = W.available("apply")
    if applying:
        child.expect("Apply the plan now")
        child.sendline("y")
        child.expect(["applying", "torch: step", "Core ML"])  # apply has started
    else:
        child.expect("apply is not available")
    child.sendintr()
    child.expect(pexpect.EOF, timeout=120)
    child.close()
    screen = _screen(log)
    if applying:
        assert child.exitstatus == 130, screen[-2000:]
        assert f"walkthrough --resume {out}" in screen
        session = json.loads((out / W.SESSION_FILE).read_text())  # valid JSON, not half-written
        assert session["done"] == STAGES[:4] and session["interrupted_at"] == "apply"
        assert load_plan(out / W.PLAN_FILE).steps  # the plan file is complete
        # apply writes through a temp folder: either nothing or a complete output is left.
        comp = out / W.APPLY_DIR
        assert not comp.exists() or (comp / "manifest.json").is_file()
    _no_temp_files(out)

    resume_log = tmp_path / "resume.log"
    child = _spawn("walkthrough", "--resume", str(out), log=resume_log)
    if applying:
        child.expect("Apply the plan now")
        child.sendline("n")
    child.expect(pexpect.EOF, timeout=180)
    child.close()
    screen = _screen(resume_log)
    assert child.exitstatus == 0, screen[-2000:]
    assert "resuming" in screen and "done so far: model, target, evaluation, plan" in screen
    session = json.loads((out / W.SESSION_FILE).read_text())
    assert session["done"] == STAGES and (out / W.COMMANDS_FILE).is_file()
    _no_temp_files(out)
