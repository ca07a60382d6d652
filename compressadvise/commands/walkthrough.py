"""`compressadvise walkthrough` (a guided session) and `compressadvise learn` (short lessons).

Both ask questions in the terminal; with piped stdin (CI) they fail fast and point to the
non-interactive commands unless --yes accepts every default.
"""
from __future__ import annotations

import shlex
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from compressadvise.commands.common import (DATA, FORCE, INPUT_SHAPE, JSON, MAX_ACCURACY_DROP, MAX_LATENCY_MS, MAX_SIZE_MB, MODEL_ARG, OS,
                     SAMPLES, TARGET, TRUST_PICKLE, Data, check_name, value_of)
from compressadvise.ui.cli_help import complete_lesson

INTERRUPTED = 130  # the shell convention for Ctrl-C


def register(app: typer.Typer) -> None:
    app.command("walkthrough")(walkthrough_cmd)
    app.command("learn")(learn_cmd)


@contextmanager
def _keyboard_interrupts() -> Iterator[None]:
    """Ctrl-C as KeyboardInterrupt for the session, so it can save and say how to resume."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ui_console(json_out: bool):
    from compressadvise.ui.render import err, out

    return err if json_out else out


def walkthrough_cmd(
    model: Optional[str] = MODEL_ARG,
    out: str = typer.Option("compressadvise-session", "--out", "-o", help="Folder for the session, plan, compressed model and report."),
    resume: Optional[str] = typer.Option(
        None, "--resume", metavar="OUT",
        help="Continue an interrupted session in this folder. The saved session grants nothing: give "
        "--trust-pickle, a module:function MODEL and the session's --eval again (--eval none goes on "
        "without the evaluator); otherwise it stops with exit 2 before importing anything."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Accept every default without asking (scripted use, CI)."),
    force: bool = FORCE,
    target: Optional[str] = TARGET,
    os: Optional[int] = OS,
    max_size_mb: Optional[float] = MAX_SIZE_MB,
    max_latency_ms: Optional[float] = MAX_LATENCY_MS,
    max_accuracy_drop: Optional[float] = MAX_ACCURACY_DROP,
    data: Optional[Data] = DATA,
    samples: Optional[str] = SAMPLES,
    evaluator: Optional[str] = typer.Option(
        None, "--eval", help="Default answer: your evaluator module:function. With --resume: the session's "
        "evaluator again to run it, or 'none' to continue without it."),
    input_shape: Optional[str] = INPUT_SHAPE,
    trust_pickle: bool = TRUST_PICKLE,
    json_out: bool = JSON,
) -> None:
    """A guided session: pick a model, target and budgets, review the plan, apply, verify, report.

    --target, --os, the budgets, --data, --samples and --input-shape are the default answers to
    the session's questions (with --yes, the answers).

    session.json keeps the answers, never trust: on --resume, unpickling and any code to import
    (a module:function model, the evaluator) must be named on the command line again.
    """
    from compressadvise.ui import walkthrough as W
    from compressadvise.commands.common import parse_shape

    console = _ui_console(json_out)
    if not yes:
        W.require_terminal(console.file)
    folder = Path(resume or out)
    if resume is None:  # --out a file, or an unwritable place: one line before any question is asked
        from compressadvise.fsutil import check_output

        check_output(folder, force=True, kind="folder")
    defaults = _default_answers(target=target, os=os, max_size_mb=max_size_mb, max_latency_ms=max_latency_ms,
                                max_accuracy_drop=max_accuracy_drop, data=value_of(data), samples=samples,
                                eval=evaluator, input_shape=parse_shape(input_shape))
    try:
        with _keyboard_interrupts():
            session = W.run(folder, model=model, resume=resume is not None, force=force, interactive=not yes,
                            console=console, trust_pickle=trust_pickle, defaults=defaults)
    except W.Interrupted as e:
        _say_interrupted(e, folder, W.SESSION_FILE)
        raise typer.Exit(INTERRUPTED) from None
    if json_out:
        import sys

        sys.stdout.write(W.session_json(session, folder) + "\n")


def _default_answers(**given: Any) -> dict[str, Any]:
    """The command-line values that default the session's answers (the ones given, 0 included)."""
    return {k: v for k, v in given.items() if v is not None}


def _say_interrupted(e: Exception, folder: Path, session_file: str) -> None:
    """On stderr: where the interrupted session stopped and the one-line command that resumes it."""
    from compressadvise.ui.render import err

    err.print(f"\n[yellow]interrupted[/] during '{e}': everything written so far is complete "
              f"({folder / session_file} keeps your answers).")
    err.print(f"resume with: compressadvise walkthrough --resume {shlex.quote(str(folder))}", markup=False, highlight=False,
              soft_wrap=True)  # one line, so it can be copied


def learn_cmd(
    topic: Optional[str] = typer.Argument(None, metavar="TOPIC", autocompletion=complete_lesson, help="Lesson to run; omit to list them."),
    choice: Optional[str] = typer.Option(None, "--choice", help="Answer to the lesson's question (else asked, or its default)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask: use the default setting."),
    json_out: bool = JSON,
) -> None:
    """Short lessons with a live experiment on the bundled example (real numbers, a few seconds each)."""
    from compressadvise.ui import learn as L
    from compressadvise.ui import walkthrough as W

    console = _ui_console(json_out)
    if topic is None:
        _list_lessons(console, json_out)
        if yes or json_out or not _is_terminal(console):
            return
        ui = W.UI(console, True)
        with _keyboard_interrupts():
            try:
                topic = ui.choose("Lesson", "", [(n, "") for n in L.LESSONS], next(iter(L.LESSONS)))
            except (KeyboardInterrupt, W.Interrupted):
                raise typer.Exit(INTERRUPTED) from None
    if topic not in L.LESSONS:
        check_name("lesson", topic, list(L.LESSONS))
    lesson = L.LESSONS[topic]
    if choice is not None and choice not in lesson.question.choices:
        raise typer.BadParameter(f"--choice for {topic} must be one of {', '.join(lesson.question.choices)}")
    interactive = not yes and choice is None and _is_terminal(console)
    ui = W.UI(console, interactive)
    with _keyboard_interrupts():
        try:
            console.print(f"[bold]{lesson.title}[/]")
            for paragraph in lesson.intro:
                console.print(paragraph, markup=False)
            q = lesson.question
            answer = choice if choice is not None else ui.choose(q.text, q.explain, [(c, "") for c in q.choices], q.default)
            while True:
                with console.status("running the experiment"):
                    result = L.run_lesson(topic, answer)
                if json_out:
                    from compressadvise.ui.render import emit_json

                    emit_json(result.model_dump(mode="json"))
                show_lesson(console, result, lesson)
                if not interactive:
                    break
                # Your turn: rerun the experiment with another setting and compare.
                answer = ui.choose("Try another setting", "", [(c, "") for c in q.choices] + [("done", "")], "done")
                if answer == "done":
                    break
        except (KeyboardInterrupt, W.Interrupted):
            console.print("\n[yellow]interrupted[/]: lessons write nothing, there is nothing to clean up")
            raise typer.Exit(INTERRUPTED) from None


def _is_terminal(console) -> bool:
    import sys

    return bool(sys.stdin and sys.stdin.isatty() and console.is_terminal)


def _list_lessons(console, json_out: bool) -> None:
    from compressadvise.ui import learn as L

    if json_out:
        from compressadvise.ui.render import emit_json

        emit_json([{"topic": n, "title": les.title} for n, les in L.LESSONS.items()])
        return
    console.print("[bold]Lessons[/] (each runs a live experiment on the bundled digits model):")
    for name, les in L.LESSONS.items():
        console.print(f"  [bold]{name}[/]  {les.title}")
    console.print("run one with `compressadvise learn TOPIC`", markup=False)


def show_lesson(console, result, lesson) -> None:
    from rich.markup import escape
    from rich.table import Table

    from compressadvise.ui.learn import human

    t = Table(title=f"{result.title} (measured on {result.samples} held-out digits; float top-1 "
              f"{result.float_accuracy:.2f}%)", show_edge=False)
    for col in ("setting", "top-1 %", "lost", "weight dB", "output dB", "size (est.)"):
        t.add_column(col, justify="left" if col == "setting" else "right", overflow="fold",
                     min_width=20 if col == "setting" else None, no_wrap=col != "setting")
    for r in result.rows:
        t.add_row(escape(r.setting) + (f"\n[dim]{escape(r.note)}[/]" if r.note else ""), f"{r.accuracy:.2f}", f"{r.drop:+.2f}",
                  "-" if r.snr_db is None else f"{r.snr_db:.1f}", _db(r.output_snr_db), human(r.size_bytes))
    console.print(t)
    console.print("[bold]What this shows[/]")
    for line in result.takeaways:
        console.print(f" • {escape(line)}")
    console.print("[dim]weight dB / output dB: signal-to-noise ratio of the weights and of the logits "
                  "against the float model (higher is closer).[/]")
    console.print(f"[dim]{result.basis}. One sample is {100 / result.samples:.2f} points of top-1. "
                  f"Ran in {result.seconds:.1f} s. Sources: {escape('; '.join(lesson.sources))}.[/]")


def _db(x: float | None) -> str:
    return "identical" if x is None else f"{x:.1f}"
