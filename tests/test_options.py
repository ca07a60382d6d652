"""Options shared by several commands are declared once (commands/common.py): the same help,
default and type wherever they appear; fixed-value options are choices; budgets are checked
while parsing; `recommend --size-fraction` plans against that fraction of the fp16 size."""
from __future__ import annotations

import json

import pytest
import typer

from cli_helpers import call_main

# Option -> the commands that must have it (more may).
SHARED = {
    "--target": {"recommend", "search", "sensitivity", "verify", "report", "walkthrough", "rules"},
    "--os": {"recommend", "search", "sensitivity", "verify", "report", "walkthrough"},
    "--max-size-mb": {"recommend", "search", "verify", "report", "walkthrough"},
    "--size-fraction": {"recommend", "search"},
    "--bits-per-weight": {"recommend", "search"},
    "--max-latency-ms": {"recommend", "search", "verify", "report", "walkthrough"},
    "--max-accuracy-drop": {"recommend", "verify", "report", "walkthrough"},
    "--data": {"recommend", "report", "walkthrough"},
    "--samples": {"apply", "sensitivity", "search", "verify", "walkthrough"},
    "--force": {"recommend", "search", "apply", "report", "walkthrough"},
    "--json": {"analyze", "recommend", "search", "sensitivity", "verify", "apply", "report", "walkthrough"},
    "--trust-pickle": {"analyze", "recommend", "search", "sensitivity", "verify", "apply", "report", "walkthrough"},
    "--input-shape": {"analyze", "recommend", "apply", "report", "walkthrough"},
    "--executor": {"sensitivity", "search"},
}


def _commands() -> dict:
    from compressadvise.ui.cli import app

    return dict(typer.main.get_command(app).commands)


def _options(cmd) -> dict:
    return {o: p for p in cmd.params if p.param_type_name == "option" for o in p.opts}


def _signature(p) -> tuple:
    """What a user sees of an option: help, default, value type (an enum for choices), bounds, repeatable."""
    return (p.help, p.default, p.type_descriptor.annotation, p.min, p.max, p.multiple, p.is_flag)


@pytest.mark.parametrize("option", sorted(SHARED))
def test_shared_option_is_one_declaration(option):
    cmds = _commands()
    having = {name: _options(c)[option] for name, c in cmds.items() if option in _options(c)}
    assert SHARED[option] <= set(having), f"{option} missing on {SHARED[option] - set(having)}"
    signatures = {name: _signature(p) for name, p in having.items()}
    first = next(iter(signatures.values()))
    assert all(s == first for s in signatures.values()), signatures
    assert first[0], f"{option} has no help"


def test_target_default_is_said_in_help():
    from compressadvise.commands.common import DEFAULT_TARGET

    p = _options(_commands()["recommend"])["--target"]
    assert p.default is None and f"Default: {DEFAULT_TARGET}" in p.help


@pytest.mark.parametrize("args,option", [
    (["recommend", "--data", "lots"], "--data"),
    (["report", "--data", "lots"], "--data"),
    (["walkthrough", "--yes", "--data", "lots"], "--data"),
    (["sensitivity", "--executor", "threads"], "--executor"),
    (["search", "--max-size-mb", "1", "--executor", "threads"], "--executor"),
    (["search", "--max-size-mb", "1", "--lessons", "ignore"], "--lessons"),
    (["analyze", "--sort", "colour"], "--sort"),
    (["verify", "bundled", "bundled", "--compute-units", "GPU_ONLY"], "--compute-units"),
])
def test_bad_choice_is_a_usage_error(capsys, args, option):
    assert call_main(*args) == 2
    err = capsys.readouterr().err
    assert option in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["recommend", "verify", "report", "walkthrough"])
@pytest.mark.parametrize("option,value", [("--max-size-mb", "-1"), ("--max-latency-ms", "nan"),
                                          ("--max-accuracy-drop", "-0.5")])
def test_nonsense_budget_is_a_usage_error_on_every_command(capsys, command, option, value):
    args = [command, *(["bundled", "bundled"] if command == "verify" else []), option, value]
    if command == "walkthrough":
        args.append("--yes")
    assert call_main(*args) == 2
    err = capsys.readouterr().err
    assert f"{option} must be" in " ".join(err.split()) and "Traceback" not in err


def test_one_size_budget_only(capsys):
    assert call_main("recommend", "--max-size-mb", "1", "--size-fraction", "0.5") == 2
    assert "give one size budget" in capsys.readouterr().err


def test_choices_match_the_library():
    from compressadvise.commands.common import Data, ExecutorKind
    from compressadvise.commands.verify import ComputeUnits
    from compressadvise.measure.executors import EXECUTORS
    from compressadvise.measure.latency import COMPUTE_UNITS
    from compressadvise.knowledge.schema import Constraints

    assert tuple(e.value for e in ExecutorKind) == EXECUTORS
    assert tuple(c.value for c in ComputeUnits) == COMPUTE_UNITS
    assert {d.value for d in Data} == set(Constraints.model_fields["data"].annotation.__args__)


def test_recommend_size_fraction_is_that_share_of_fp16(capsys):
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import MB

    assert call_main("recommend", "--no-measure", "--size-fraction", "0.25", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    fp16 = analyze(None).total_bytes_fp16
    assert plan["constraints"]["max_size_mb"] * MB == pytest.approx(0.25 * fp16)
    assert plan["prediction"]["meets_size_budget"] == (plan["prediction"]["bytes_after"] <= 0.25 * fp16)


def test_recommend_bits_per_weight_is_per_parameter(capsys):
    from compressadvise.model.analysis import analyze
    from compressadvise.plan.engine import MB

    assert call_main("recommend", "--no-measure", "--bits-per-weight", "4", "--json") == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["constraints"]["max_size_mb"] * MB == pytest.approx(4 * analyze(None).total_params / 8)
