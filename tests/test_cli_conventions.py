"""The CLI behaves like the ecosystem's: output that survives a pipe, examples and hints that run
when pasted, clean placeholders, completion of the knowledge base's names, usage errors on one line."""
from __future__ import annotations

import re
import shlex

import pytest
import typer

from cli_helpers import call_main, run_captured
from compressadvise.ui.cli import app
from compressadvise.ui.cli_help import EXAMPLES, complete_explainable, complete_lesson, complete_target

PIPED = [["rules"], ["targets"], ["techniques"], ["analyze", "--top", "0"], ["recommend", "--no-measure"],
         ["rules", "--target", "ane-a17"]]


def _piped(capsys, monkeypatch, columns: int, args: list[str]) -> str:
    monkeypatch.setenv("COLUMNS", str(columns))
    code, out, err = run_captured(capsys, *args)
    assert code == 0, err
    return out


@pytest.mark.parametrize("args", PIPED, ids=" ".join)
def test_piped_output_does_not_depend_on_the_terminal_width(capsys, monkeypatch, args):
    """stdout that is not a terminal (capsys, like `| cat`) prints every column in full."""
    narrow, wide = _piped(capsys, monkeypatch, 60, args), _piped(capsys, monkeypatch, 200, args)
    strip = lambda text: re.sub(r"\d+(\.\d+)? s\b", "", text)  # noqa: E731 - a wall time may differ
    assert strip(narrow) == strip(wide)
    assert "…" not in narrow


def test_piped_tables_keep_identifiers_and_every_column(capsys, monkeypatch):
    from compressadvise.knowledge.base import builtin

    k = builtin()
    targets = _piped(capsys, monkeypatch, 60, ["targets"])
    for t in k.targets.values():
        for mode in t.accelerates(t.default_os):
            assert re.search(rf"(?<![\w]){re.escape(mode)}(?![\w])", targets), mode  # never 'joint_compressio n'
    rules = _piped(capsys, monkeypatch, 60, ["rules"])
    assert all(code in rules.split() for code in k.rules)
    analyze = _piped(capsys, monkeypatch, 60, ["analyze", "--top", "0"])
    header = next(ln for ln in analyze.splitlines() if ln.lstrip().startswith("layer"))
    for column in ("shape", "MACs", "kurt", "fp16", "div o/i"):  # dropped to fit a terminal, never a pipe
        assert column in header


def test_a_narrow_terminal_wraps_words_never_splits_them():
    from rich.console import Console
    from rich.table import Table

    from compressadvise.ui.render import _keep_words

    t = Table()
    t.add_column("name")
    t.add_column("modes")
    t.add_row("ane-a17", "palettize, palettize_per_channel_scale, joint_compression")
    _keep_words(t)
    console = Console(width=30, record=True, force_terminal=True)
    console.print(t, crop=False)
    text = console.export_text()
    assert "palettize_per_channel_scale" in text and "joint_compression" in text and "…" not in text


def _leaf_commands() -> dict[str, object]:
    root = typer.main.get_command(app)
    found: dict[str, object] = {}

    def walk(cmd, path: str) -> None:
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, f"{path} {name}".strip())
        else:
            found[path] = cmd
    walk(root, "")
    return found


def _parse(words: list[str]) -> None:
    """Parse a command line the way a run would (options, choices, callbacks), without running it."""
    root = typer.main.get_command(app)
    ctx = root.make_context("compressadvise", list(words), resilient_parsing=False)
    cmd, args = root, _rest(ctx)
    while getattr(cmd, "commands", None):
        name, cmd, args = cmd.resolve_command(ctx, args)
        ctx = cmd.make_context(name, args, parent=ctx)
        args = _rest(ctx) if getattr(cmd, "commands", None) else []


def _rest(ctx) -> list[str]:
    """The words a group left for its subcommand (click renamed protected_args in 8.2)."""
    return [*getattr(ctx, "_protected_args", getattr(ctx, "protected_args", [])), *ctx.args]


def test_every_command_has_examples_that_parse():
    leaves = _leaf_commands()
    assert set(leaves) <= set(EXAMPLES), set(leaves) - set(EXAMPLES)
    for path, lines in EXAMPLES.items():
        assert path in leaves, f"examples for a command that does not exist: {path}"
        for line in lines:
            words = shlex.split(line.split(" | ")[0])
            assert words[0] == "compressadvise" and " ".join(words[1:]).startswith(path), line
            _parse(words[1:])


def test_help_has_clean_placeholders_and_examples(capsys):
    for args in (["verify", "--help"], ["search", "--help"], ["--help"], ["analyze", "--help"]):
        code, out, _ = run_captured(capsys, *args)
        assert code == 0
        for junk in ("<str>", "<bool>", "<list[str]>", "<float>", "<int>", "{original}", "[[MODEL]]"):
            assert junk not in out, (args, junk)
    assert "Examples:" in out and "ORIGINAL" not in out  # analyze's help
    assert "[MODEL]" in out


def test_debug_is_accepted_anywhere(capsys):
    code, _, err = run_captured(capsys, "analyze", "/nonexistent/model.pt", "--debug")
    assert code == 3 and "Traceback" in err  # --debug after the subcommand shows the traceback


def test_usage_errors_are_one_line(capsys):
    code, _, err = run_captured(capsys, "recommend", "--target", "ane-a71")
    assert code == 2 and err.count("\n") == 1 and "did you mean 'ane-a17'" in err
    assert "(see `compressadvise recommend --help`)" in err
    code, _, err = run_captured(capsys, "analyze", "--bogus")
    assert code == 2 and err.strip() == "error: No such option: --bogus (see `compressadvise analyze --help`)"


def test_completion_of_knowledge_names():
    assert complete_target("ane") == ["ane-a14", "ane-a17"]
    assert "palettization" in complete_explainable("palet") and "WGT001" in complete_explainable("wgt")
    assert complete_lesson("gr") == ["granularity"]


def test_completion_runs_through_the_shell_protocol(monkeypatch, capsys):
    """What bash's completion function asks: the names come back, one per line."""
    monkeypatch.setenv("_COMPRESSADVISE_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", "compressadvise recommend --target ane")
    monkeypatch.setenv("COMP_CWORD", "3")
    code = call_main()
    assert code == 0 and capsys.readouterr().out.split() == ["ane-a14", "ane-a17"]


def test_the_search_hint_in_ways_forward_names_the_model_and_target(tmp_path):
    from compressadvise.knowledge.base import builtin
    from compressadvise.model.analysis import analyze
    from compressadvise.model.loading import load_model
    from compressadvise.plan.engine import recommend

    report = analyze(load_model(None))
    plan = recommend(report, target="ane-a14", constraints={"max_size_mb": 0.03}, knowledge=builtin())
    hints = [w.message for w in plan.ways_forward if "compressadvise search" in w.message]
    assert hints, [w.message for w in plan.ways_forward]
    command = re.search(r"`(compressadvise search [^`]+)`", hints[0]).group(1)
    assert "--target ane-a14" in command
    _parse(shlex.split(command)[1:])


def test_a_size_fraction_means_the_same_bytes_in_recommend_report_and_verify():
    """--size-fraction is of the fp16 size wherever it is taken (report plans with it, verify gates it)."""
    from compressadvise.measure.verify_budgets import Budgets
    from compressadvise.ui import report as R

    inp = R.gather(None, constraints={"max_size_mb": 0.0, "size_fraction": 0.3, "bits_per_weight": None})
    fp16 = inp.report.total_bytes_fp16
    assert inp.plan.constraints.max_size_mb == pytest.approx(0.3 * fp16 / 1e6)
    b = Budgets(size_fraction=0.3).resolved(fp16, inp.report.total_params)
    assert b.max_size_mb == pytest.approx(0.3 * fp16 / 1e6) and "0.3 of the original's fp16 size" in b.size_from
    from compressadvise.plan.search_results import Budget

    assert Budget.of(size_fraction=0.3, report=inp.report, baseline=4.0).max_bytes == pytest.approx(0.3 * fp16)  # fp32 target too
    bits = Budgets(bits_per_weight=4).resolved(fp16, inp.report.total_params)
    assert bits.max_size_mb == pytest.approx(4 * inp.report.total_params / 8 / 1e6)
    from compressadvise.errors import BadArgument

    with pytest.raises(BadArgument, match="one size budget"):
        Budgets(size_fraction=0.3, max_size_mb=1).resolved(fp16, 1)
