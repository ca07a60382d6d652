"""Writing outputs safely: never over an input, never a surprise overwrite, unwritable places found
before any work, and nothing left behind by a killed run.

Each test builds its own hostile output path; only the module fixture runs a real `apply`.
"""
from __future__ import annotations

from cli_helpers import call_main

import errno
import os
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from compressadvise.errors import OutputExists, OutputNotWritable
from compressadvise.fsutil import PID_MARKER, atomic_dir, sweep_stale, write_text_atomic
from compressadvise.plan.planfile import save_plan
from compressadvise.knowledge.schema import Plan, PlanModel, PlanTarget, Step


def run_cli(capsys, *args: str) -> tuple[int, str]:
    """(exit code, stderr) of the real CLI, in this process."""
    capsys.readouterr()
    code = call_main(*args)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A small torch.export file: two layers above coremltools' 2048-element threshold."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    path = tmp_path_factory.mktemp("model") / "m.pt2"
    torch.export.save(torch.export.export(m, (torch.randn(1, 64),)), str(path))
    return path


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory) -> Path:
    plan = Plan(target=PlanTarget(name="ane-a17", os=18), model=PlanModel(sha256=None),
                steps=[Step(technique="palettization", slot="weights", params={"nbits": 6}, layers=["0", "2"])])
    return save_plan(plan, tmp_path_factory.mktemp("plan") / "plan.yaml")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _temp_folder(parent: Path, name: str, pid: int | None, age_s: float = 3600.0, host: str | None = None) -> Path:
    d = parent / name
    d.mkdir()
    (d / "model.mlpackage").mkdir()  # what a killed apply leaves: a big half-written package
    if pid is not None:
        (d / PID_MARKER).write_text(f"{pid} {host or socket.gethostname()}\n")
    old = time.time() - age_s
    os.utime(d, (old, old))
    return d


# ------------------------------------------------------------------ 1. never over the input
@pytest.mark.parametrize("force", [False, True])
def test_recommend_out_is_the_model_is_refused(tmp_path, model_file, capsys, force):
    model = tmp_path / "m.pt2"
    model.write_bytes(model_file.read_bytes())
    link = tmp_path / "hardlink.pt2"
    os.link(model, link)  # same inode, other name: still the input
    before = model.read_bytes()
    for out in (model, link):
        code, err = run_cli(capsys, "recommend", "--no-measure", model, "--out", out, *(["--force"] if force else []))
        assert code == 9, err
        assert "is the input model" in err and err.count("\n") == 1
    assert model.read_bytes() == before


def test_recommend_existing_out_needs_force(tmp_path, model_file, capsys):
    out = tmp_path / "plan.yaml"
    out.write_text("keep me\n")
    code, err = run_cli(capsys, "recommend", "--no-measure", model_file, "--out", out)
    assert code == 9 and "--force" in err
    assert out.read_text() == "keep me\n"
    code, err = run_cli(capsys, "recommend", "--no-measure", model_file, "--out", out, "--force")
    assert code == 0, err
    assert out.read_text().startswith("# compressadvise plan")


def test_search_out_is_checked_before_measuring(tmp_path, model_file, capsys):
    out = tmp_path / "chosen.yaml"
    out.write_text("keep me\n")
    started = time.perf_counter()
    code, err = run_cli(capsys, "search", model_file, "--max-size-mb", "0.01", "--out", out, "--workers", "1")
    assert code == 9 and "--force" in err
    code, err = run_cli(capsys, "search", model_file, "--max-size-mb", "0.01", "--out", model_file, "--force")
    assert code == 9 and "is the input model" in err
    assert time.perf_counter() - started < 20  # refused up front, not after the search
    assert out.read_text() == "keep me\n"


def test_report_never_writes_over_its_inputs(tmp_path, model_file, plan_file, capsys):
    plan = tmp_path / "plan.yaml"
    plan.write_bytes(plan_file.read_bytes())
    code, err = run_cli(capsys, "report", model_file, "--plan", plan, "--out", plan, "--force")
    assert code == 9 and "is the input plan" in err
    assert plan.read_bytes() == plan_file.read_bytes()


# ------------------------------------------------------------------ 2. apply --out is a folder
@pytest.mark.parametrize("case", ["out_is_model", "out_is_a_file", "out_holds_model", "out_is_a_foreign_folder"])
def test_apply_never_moves_the_input_or_a_file(tmp_path, model_file, plan_file, capsys, case):
    work = tmp_path / "work"
    work.mkdir()
    model = work / "m.pt2"
    model.write_bytes(model_file.read_bytes())
    (work / "notes.txt").write_text("mine\n")
    out = {"out_is_model": model, "out_is_a_file": work / "notes.txt", "out_holds_model": work,
           "out_is_a_foreign_folder": tmp_path / "foreign"}[case]
    if case == "out_is_a_foreign_folder":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work\n")
    before = _snapshot(tmp_path)
    code, err = run_cli(capsys, "apply", model, "--plan", plan_file, "--out", out, "--force")
    assert code == 9, err
    assert err.startswith("error: --out") and err.count("\n") == 1
    assert _snapshot(tmp_path) == before  # nothing moved to a hidden .old, nothing replaced
    assert not list(tmp_path.rglob(".*.old"))


def test_walkthrough_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, model_file, capsys):
    model = tmp_path / "m.pt2"
    model.write_bytes(model_file.read_bytes())
    for out, code in ((model, 9), (model / "session", 3)):
        got, err = run_cli(capsys, "walkthrough", model, "--out", out, "--yes", "--force")
        assert got == code and err.startswith("error: ") and err.count("\n") == 1, err
    assert model.read_bytes() == model_file.read_bytes()


def test_atomic_dir_refuses_to_replace_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(OutputExists, match="is a file"):
        with atomic_dir(f, force=True):
            pass
    assert f.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------ 3. unwritable, found out first
def test_unwritable_out_fails_fast_before_any_work(tmp_path, model_file, plan_file):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    script = ("import sys\nfrom compressadvise.ui.cli import main\n"
              "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    print('RESULT', e.code, 'coremltools' in sys.modules)\n")
    # a path under a regular file, or under /proc: both fail for root too (root ignores chmod)
    for out in (blocker / "out", Path("/proc/compressadvise-out")):
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", script, "apply", str(model_file), "--plan", str(plan_file),
                               "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert time.perf_counter() - started < 60
        assert proc.stdout.split()[-3:] == ["RESULT", "3", "False"], proc.stdout + proc.stderr  # no conversion began
        assert "cannot write" in proc.stderr and str(out) in proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_recommend_under_a_file_or_proc_is_exit_3(tmp_path, model_file, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for out in (blocker / "plan.yaml", "/proc/compressadvise-plan.yaml"):
        code, err = run_cli(capsys, "recommend", "--no-measure", model_file, "--out", out)
        assert code == 3 and "cannot write" in err, err


def test_a_failed_final_write_is_exit_3_with_the_cause(tmp_path, model_file, capsys, monkeypatch):
    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", disk_full)
    out = tmp_path / "plan.yaml"
    code, err = run_cli(capsys, "recommend", "--no-measure", model_file, "--out", out)
    assert code == 3, err
    assert str(out) in err and os.strerror(errno.ENOSPC) in err and "internal error" not in err
    assert list(tmp_path.iterdir()) == []  # no stray temp file either


def test_a_failed_swap_puts_the_previous_output_back(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "manifest.json").write_text("old")
    real = os.replace

    def fail_second_rename(src, dst):
        if Path(dst) == final and Path(src).name.endswith(".tmp"):  # new output in: fails; old one back: works
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second_rename)
    with pytest.raises(OutputNotWritable, match=os.strerror(errno.EROFS)):
        with atomic_dir(final, force=True) as tmp:
            (tmp / "manifest.json").write_text("new")
    assert (final / "manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_not_writable_is_still_an_oserror():
    """Callers that shrug off a failed write (the sensitivity cache, the Vega cache) keep doing so."""
    with pytest.raises(OSError):
        write_text_atomic("/proc/compressadvise-cache.json", "{}")


def test_written_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "report.html", "<html></html>")
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
        with atomic_dir(tmp_path / "out") as d:
            (d / "a").write_text("1")
        assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755  # not mkdtemp's 0700
    finally:
        os.umask(mask)


# ------------------------------------------------------------------ 4. what a killed run leaves
def test_sweep_removes_only_abandoned_temp_folders(tmp_path):
    final = tmp_path / "out"
    dead = _temp_folder(tmp_path, ".out.dead.tmp", _dead_pid())
    unmarked = _temp_folder(tmp_path, ".out.unmarked.tmp", None)
    live = _temp_folder(tmp_path, ".out.live.tmp", os.getpid())
    fresh = _temp_folder(tmp_path, ".out.fresh.tmp", _dead_pid(), age_s=-5)  # made after the run started
    young = _temp_folder(tmp_path, ".out.young.tmp", None, age_s=5)  # maybe a run about to write its marker
    foreign = _temp_folder(tmp_path, ".out.foreign.tmp", _dead_pid(), host="another-host")
    other = _temp_folder(tmp_path, ".other.x.tmp", _dead_pid())  # not ours to judge
    removed = sweep_stale(final, before=time.time())
    assert sorted(removed) == sorted([dead, unmarked])
    assert all(d.is_dir() for d in (live, fresh, young, foreign, other))
    assert not dead.exists() and not unmarked.exists()


@pytest.fixture(scope="module")
def applied(tmp_path_factory, model_file, plan_file):
    """One real apply, with a stale temp folder of a killed run and one of a live run beside the
    output, and a private system temp folder to see where coremltools puts its packages."""
    root = tmp_path_factory.mktemp("apply")
    private_tmp = root / "system-tmp"
    private_tmp.mkdir()
    out = root / "out"
    dead = _temp_folder(root, ".out.123.tmp", _dead_pid())
    live = _temp_folder(root, ".out.456.tmp", os.getpid())
    packages: list[Path] = []
    real_mkdtemp = tempfile.mkdtemp

    def spy(suffix=None, prefix=None, dir=None):
        path = real_mkdtemp(suffix, prefix, dir)
        if suffix == ".mlpackage":  # coremltools' _create_mlpackage
            packages.append(Path(path))
        return path

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(private_tmp))
        mp.setattr(tempfile, "mkdtemp", spy)
        from compressadvise.backends.apply import apply

        result = apply(str(model_file), str(plan_file), out)
        left_in_tmp = sorted(p.name for p in private_tmp.iterdir())
    return {"root": root, "out": out, "result": result, "dead": dead, "live": live, "packages": packages,
            "left_in_tmp": left_in_tmp}


def test_apply_sweeps_a_killed_runs_temp_folder_but_not_a_live_one(applied):
    assert applied["result"].manifest["mlpackage"] == "model.mlpackage"
    assert not applied["dead"].exists()
    assert applied["live"].is_dir() and (applied["live"] / PID_MARKER).is_file()
    assert sorted(p.name for p in applied["root"].iterdir()) == [".out.456.tmp", "out", "system-tmp"]


def test_coremltools_temp_packages_stay_inside_our_temp_folder(applied):
    assert applied["packages"], "coremltools wrote no temporary package: the spy missed it"
    for p in applied["packages"]:  # .out.XXXX.tmp/.scratch/tmpYYYY.mlpackage, beside the output
        assert p.parent.name == ".scratch" and p.parent.parent.parent == applied["root"], p
        assert p.parent.parent.name.startswith(".out.") and p.parent.parent.name.endswith(".tmp")
        assert not p.exists()
    assert not any(n.endswith(".mlpackage") for n in applied["left_in_tmp"]), applied["left_in_tmp"]
    # the output holds neither the marker nor the scratch folder
    assert sorted(p.name for p in applied["out"].iterdir()) == ["manifest.json", "model.mlpackage", "model.pt2", "plan.yaml"]
