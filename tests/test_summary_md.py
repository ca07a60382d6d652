"""`verify --summary-md`: the pull-request Markdown (verdict, budgets, sizes, accuracy, worst
classes, evidence), written even when a budget is missed, and the ready CI workflow in docs/."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
import yaml

from cli_helpers import call_main, run_captured
from compressadvise.measure.verify import VerifyResult, verify
from compressadvise.measure.verify_outputs import SliceReport, SliceRow
from compressadvise.ui.summary_md import MAX_ROWS, md_escape, summary_markdown
from test_verify_models import broken

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "docs" / "ci" / "compressadvise.yml"
GUIDE = ROOT / "docs" / "guides" / "ci-gates.md"
# Where pip would be pointed at a package source: none may appear (pip uses the runner's own config).
PACKAGE_SOURCE = re.compile(r"--(extra-)?index-url|--find-links|\bpip\b.*\s-[if]\s|://")


@pytest.fixture(scope="module")
def missed() -> VerifyResult:
    """The bundled model against a sign-flipped copy: accuracy collapses, the size budget is unmeetable."""
    from compressadvise.examples import digits

    m = digits.trained_model()
    return verify(m, broken(m), samples="bundled", latency=False, drift=False, target="ane-a17",
                  budgets={"max_accuracy_drop": 1.0, "max_size_mb": 0.01})


def _table_rows(md: str, first_header: str) -> list[list[str]]:
    """The body rows of the table whose header starts with `first_header`, split on unescaped |."""
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", ln)[1:-1]])
    return rows


# ---------------------------------------------------------------- the Markdown
def test_missed_budgets_are_the_headline_and_marked_in_the_table(missed):
    md = summary_markdown(missed)
    assert md.startswith("### ❌ compressadvise verify: 2 of 2 budgets missed (accuracy drop, size)")
    rows = {r[0]: r for r in _table_rows(md, "budget")}
    assert set(rows) == {"accuracy drop", "size"}
    assert all("missed" in r[3] and "❌" in r[3] for r in rows.values())
    assert rows["size"][1] == "≤ 0.01 MB" and rows["size"][4] == "estimate: weights on the target"
    assert "measured: top-1 on the labelled samples" in rows["accuracy drop"][4]


def test_sizes_accuracy_classes_fidelity_and_evidence(missed):
    md = summary_markdown(missed)
    assert "| on disk |" in md and "| same |" in md  # the same serialised format on both sides
    assert "| weights on the target |" in md and "estimate (same format on both sides)" in md
    assert "| on ane-a17 (iOS 18) |" in md and "estimate (roofline)" in md  # latency: labelled estimate
    acc = {r[0]: r for r in _table_rows(md, "metric")}
    assert acc["top-1 accuracy"][1] == "99.17%" and acc["top-1 accuracy"][2] == "0.00%"
    assert acc["top-1 accuracy"][3] == "-99.17 points" and acc["top-1 accuracy"][4] == "measured (labels)"
    classes = _table_rows(md, "class")
    assert len(classes) == 10 and classes[-1][0] == "8"  # worst first: the best original class last
    assert "top-1 agreement 0.00%" in md and "KL divergence" in md
    assert "**Evidence:** 360 labelled samples" in md and "0.28 points" in md
    assert len(md) < 4000  # a PR comment, not a report


def test_passing_run_says_so_and_lists_no_class_table(missed):
    ok = missed.model_copy(update={"budgets": [], "passed": True, "slices": [
        SliceReport(by="class", metric="top-1 accuracy %", rows=[SliceRow(name="a", count=3, original=50.0,
                                                                           compressed=60.0, change=10.0)])]})
    md = summary_markdown(ok)
    assert md.startswith("### ➖ compressadvise verify: no budgets given")
    assert "No class lost accuracy (1 classes" not in md and "No class lost accuracy" in md
    assert "| class |" not in md


def test_names_are_escaped_and_class_rows_capped(missed):
    names = ["a|b", "`tick`", "*bold*", "<b>html</b>", "[link](x)", "multi\nline"]
    rows = [SliceRow(name=names[i % len(names)] + str(i), count=10, original=100.0, compressed=100.0 - i,
                     change=-float(i)) for i in range(1, 16)]
    rows.append(SliceRow(name="steady", count=10, original=90.0, compressed=90.0, change=0.0))
    weird = missed.model_copy(update={"slices": [SliceReport(by="class", metric="top-1 accuracy %", rows=rows)],
                                      "warnings": ["output `x|y` looks odd"]})
    md = summary_markdown(weird)
    table = _table_rows(md, "class")
    assert len(table) == MAX_ROWS and all(len(r) == 5 for r in table)  # no | inside a name split a row
    assert table[0][0] == r"\<b\>html\</b\>15" and table[-1][0] == r"a\|b6"  # worst first
    shown = {r[0] for r in table}
    assert {r"\`tick\`13", r"\*bold\*14", r"\[link\](x)10", "multi line11"} <= shown
    assert md_escape("multi\nline") == "multi line"  # a newline would end the table row
    assert "6 other classes: 5 more lost accuracy (changes -5.00 to +0.00" in md
    assert r"> ⚠️ output \`x\|y\` looks odd" in md
    assert "`" not in md.replace("`--json`", "").replace(r"\`", "")  # no code span a name could open


def test_sizes_of_different_formats_are_flagged(missed):
    comp = missed.compressed.model_copy(update={"mlpackage": "out/model.mlpackage", "size_bytes": 1000,
                                                "size_basis": "Core ML package on disk (measured)"})
    md = summary_markdown(missed.model_copy(update={"compressed": comp}))
    assert "original: serialised state dict (measured); compressed: Core ML package on disk (measured)" in md
    assert "| 301.62 KB | 1.00 KB | formats differ |" in md  # no ratio between an fp32 file and a package
    assert "Not like for like on disk: the compressed size is a Core ML package" in md
    assert "the target row compares the same format" in md


@pytest.mark.parametrize("update,text", [
    ({"count": 60}, "60 labelled samples (bundled digits held-out set): one sample moves accuracy by 1.7 points. Few"),
    ({"has_labels": False}, "unlabelled samples (bundled digits held-out set): accuracy is a proxy"),
    ({"kind": "random", "has_labels": False}, "**Evidence: weak.** 360 random inputs")])
def test_evidence_says_how_far_the_samples_go(missed, update, text):
    weaker = missed.model_copy(update={"samples": missed.samples.model_copy(update=update)})
    assert text in summary_markdown(weaker)


# ---------------------------------------------------------------- the CLI
def test_cli_writes_the_summary_even_when_a_budget_is_missed(tmp_path, capsys):
    path = tmp_path / "step_summary.md"
    path.write_text("# earlier step output\n")  # $GITHUB_STEP_SUMMARY is appended to
    code, out, err = run_captured(capsys, "verify", "bundled", "bundled", "--samples", "bundled",
                                  "--max-size-mb", "0.1", "--no-latency", "--no-drift", "--summary-md", path)
    assert code == 1 and "budget missed: size" in err
    text = path.read_text()
    assert text.startswith("# earlier step output\n\n### ❌ compressadvise verify: budget missed (size)")
    assert "| size | ≤ 0.1 MB | 0.297 MB | ❌ **missed** |" in text
    assert "Budgets" in out  # the terminal tables still go to stdout


def test_cli_dash_prints_markdown_instead_of_tables(capsys):
    code, out, _ = run_captured(capsys, "verify", "bundled", "bundled", "--no-latency", "--no-drift",
                                "--max-size-mb", "1", "--summary-md", "-")
    assert code == 0 and out.startswith("### ✅ compressadvise verify: budget met") and "━" not in out


@pytest.mark.parametrize("extra,code,text", [(["--json", "--summary-md", "-"], 2, "both write to stdout"),
                                             (["--summary-md", "{tmp}"], 3, "is a folder")])
def test_cli_refuses_an_unwritable_summary_before_the_run(tmp_path, capsys, extra, code, text):
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    got, _, err = run_captured(capsys, "verify", "bundled", "/no/such/model.pt2", *args)
    assert got == code and text in " ".join(err.split())  # checked before the model is looked for


# ---------------------------------------------------------------- the ready workflow
def _commands(run: str) -> list[list[str]]:
    """Each `compressadvise ...` command of a `run:` script, up to a shell operator (>, |, ;)."""
    found = []
    for line in run.replace("\\\n", " ").splitlines():
        lex = shlex.shlex(line.strip(), posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        words = list(lex)
        if words and words[0] == "compressadvise":
            found.append(words[1:next((i for i, w in enumerate(words) if set(w) <= set("<>|&;")), len(words))])
    return found


def test_workflow_runs_real_commands_and_publishes_the_summary():
    from compressadvise.ui.cli import app

    text = WORKFLOW.read_text(encoding="utf-8")
    assert not PACKAGE_SOURCE.search(text), PACKAGE_SOURCE.search(text)
    wf = yaml.safe_load(text)
    assert "pull_request" in wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as True
    steps = [s for job in wf["jobs"].values() for s in job["steps"]]
    uses = {s["uses"].split("@")[0]: s for s in steps if "uses" in s}
    assert uses["actions/setup-python"]["with"]["python-version"] == "3.11"
    runs = "\n".join(s.get("run", "") for s in steps)
    assert runs.index("pip install torch==") < runs.index('pip install "compressadvise[compress]"')
    group = typer.main.get_command(app)
    commands = [c for s in steps for c in _commands(s.get("run", ""))]
    assert [c[0] for c in commands] == ["apply", "verify"]
    for argv in commands:  # parsed as the CLI would: an unknown option or a bad budget fails here
        group.commands[argv[0]].make_context(argv[0], argv[1:])
    verify_argv = commands[1]
    assert "--summary-md" in verify_argv and "--max-accuracy-drop" in verify_argv
    publish = next(s for s in steps if "GITHUB_STEP_SUMMARY" in s.get("run", ""))
    assert publish["if"] == "always()" and uses["actions/upload-artifact"]["if"] == "always()"
    assert "summary.md" in uses["actions/upload-artifact"]["with"]["path"]


def test_ci_guide_links_the_workflow_and_shows_the_summary():
    text = GUIDE.read_text(encoding="utf-8")
    assert "](../ci/compressadvise.yml)" in text and "--summary-md" in text
    assert not PACKAGE_SOURCE.search(text), PACKAGE_SOURCE.search(text)
