"""A guided session for newcomers: model -> target and budgets -> evaluation -> plan -> apply and
verify -> finish, one question at a time, each with a one-line explanation and a default.

Prompts are plain line-based questions rendered with Rich (`Console.input`), not a full-screen
app: they work in any terminal, under pexpect/tmux, over SSH and with screen readers, and
Ctrl-C is an ordinary KeyboardInterrupt. The answers are saved atomically to OUT/session.json
after every stage (and after every reviewed plan step), so an interrupted session leaves only
complete files and `compressadvise walkthrough --resume OUT` continues where it stopped.
`--yes` (UI.interactive False) answers every question with its default.

session.json is data the tool wrote, never a grant: on resume, --trust-pickle, a module:function
model and the evaluator count only when given on the command line again (`resolve_grants`).
"""
from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from compressadvise.errors import CompressAdviseError, InvalidKnowledge, OutputExists
from compressadvise.fsutil import write_text_atomic

# The parts, split along this module's sections: walkthrough_session (state, file names, the
# reproducible commands), walkthrough_ui (prompting, the context), walkthrough_notes (expert notes,
# next moves), walkthrough_setup (stages 1-3), walkthrough_review (stage 4), walkthrough_apply
# (the work behind stages 5 and 6). Stages 5 and 6 stay here: they look up `available`, which
# tests monkeypatch on this module.
from compressadvise.ui.walkthrough_apply import _run_apply, _run_verify, _show_apply, _write_report
from compressadvise.ui.walkthrough_notes import ExpertNotes, expert_notes, next_moves  # re-exported
from compressadvise.ui.walkthrough_review import stage_plan  # re-exported
from compressadvise.ui.walkthrough_session import (APPLY_DIR, COMMANDS_FILE, DEFAULT_OUT, DEFAULT_TARGET, PLAN_FILE,  # re-exported
                                  REPORT_FILE, SESSION_FILE, SESSION_VERSION, STAGES, VERIFY_FILE, Interrupted,
                                  NotInteractive, ResumeRefused, Session, StepDecision, load_session,
                                  reproduce_commands, save_session, session_json, session_path)
from compressadvise.ui.walkthrough_setup import SIZE_MARGIN, round_up, stage_evaluation, stage_model, stage_target  # re-exported
from compressadvise.ui.walkthrough_setup import _load_and_analyze
from compressadvise.ui.walkthrough_ui import UI, Context, require_terminal  # re-exported
from compressadvise.ui.walkthrough_ui import _esc

if TYPE_CHECKING:
    from rich.console import Console


# ------------------------------------------------------------------ the session
PARTS = {"apply": "backends.apply", "verify": "measure.verify", "report": "ui.report"}


def available(part: str) -> bool:
    """Whether an optional part of compressadvise (apply, verify, report) is in this build."""
    try:
        return importlib.util.find_spec(f"compressadvise.{PARTS[part]}") is not None
    except (ImportError, ValueError):
        return False


def prepare_out(out: Path, *, resume: bool, force: bool) -> None:
    """Refuse to mix two sessions in one folder; --force clears this tool's own outputs only."""
    if resume:
        return
    has_session = session_path(out).exists()
    if has_session and _never_loaded(out):
        session_path(out).unlink()  # a session that failed loading its model: nothing to resume
        has_session = False
    if has_session and not force:
        raise OutputExists(f"{out} already holds a walkthrough session",
                           hint=f"continue it with --resume {out}, or pass --force to start over")
    if out.exists() and any(out.iterdir()) and not force and not has_session:
        raise OutputExists(f"{out} exists and is not empty", hint="choose another --out or pass --force")
    if force:
        import shutil

        for name in (SESSION_FILE, PLAN_FILE, VERIFY_FILE, REPORT_FILE, COMMANDS_FILE):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / APPLY_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _never_loaded(out: Path) -> bool:
    """The folder holds only a session that failed before its model loaded (older versions left one)."""
    if [p.name for p in out.iterdir()] != [SESSION_FILE]:
        return False
    try:
        s = Session.model_validate_json(session_path(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return not s.done and s.interrupted_at is None  # an interrupted one says "resume": keep it


def _discard(out: Path, created: bool) -> None:
    """Remove a new session that never got past loading its model, so the folder can be reused."""
    session_path(out).unlink(missing_ok=True)
    if created:
        try:
            out.rmdir()  # only when empty: never anything but our own file
        except OSError:
            pass


def names_code(spec: str) -> bool:
    """A module:function spec, which loading imports (the rule of loading.load_model), not a file."""
    return (not Path(spec).exists() and ":" in spec and not spec.startswith(("/", "."))
            and "/" not in spec.split(":")[0])


def resolve_grants(session: Session, out: Path, *, model: str | None, trust_pickle: bool,
                   evaluator: str | None) -> list[str]:
    """On resume, what may run comes from the command line now, never from session.json: returns
    notes to show; raises ResumeRefused when the session names code the command line does not."""
    notes = []
    if session.trust_pickle and not trust_pickle:
        notes.append("the session's saved trust_pickle is ignored: a saved file never grants trust "
                     "(pass --trust-pickle again to allow unpickling)")
    session.trust_pickle = trust_pickle
    where = session_path(out)
    if session.model and names_code(session.model) and model != session.model:
        raise ResumeRefused(f"{where} names the Python factory {session.model}: a saved session never "
                            "chooses code to import",
                            hint=f"resume with `compressadvise walkthrough {shlex.quote(session.model)} "
                            f"--resume {shlex.quote(str(out))}` to import it again")
    if session.evaluator and evaluator != session.evaluator:
        if "evaluation" not in session.done:
            session.evaluator = None  # the evaluation stage asks again, defaulting to --eval
        elif evaluator == "none":
            notes.append(f"continuing without the evaluator {session.evaluator} (--eval none)")
            session.evaluator = None
        else:
            raise ResumeRefused(f"{where} names the evaluator {session.evaluator}: a saved session never "
                                "chooses code to import",
                                hint=f"resume with --eval {shlex.quote(session.evaluator)} to run it again, "
                                "or --eval none to go on without it")
    return notes


def run(out: str | Path, *, model: str | None = None, resume: bool = False, force: bool = False,
        interactive: bool = True, console: "Console | None" = None, trust_pickle: bool = False,
        defaults: dict[str, Any] | None = None) -> Session:
    """Run (or resume) a walkthrough session writing into `out`; returns the final session.

    Raises Interrupted on Ctrl-C / end of input after saving the session; everything already
    written stays complete and valid. On resume, `trust_pickle`, `model` and `defaults["eval"]`
    decide what may run (see `resolve_grants`); a new session that fails before its model is
    loaded leaves no session behind.
    """
    from compressadvise.knowledge.base import builtin
    from compressadvise.ui.render import out as stdout_console

    out = Path(out)
    created = not out.exists()
    prepare_out(out, resume=resume, force=force)
    session = load_session(out) if resume else Session(model=model, trust_pickle=trust_pickle)
    if resume and model and session.model != model:
        raise InvalidKnowledge(f"{out} is a session for {session.model or 'the bundled example'}, not {model}")
    session.interrupted_at = None
    ctx = Context(out=out, session=session, ui=UI(console or stdout_console, interactive),
                  knowledge=builtin(), defaults=dict(defaults or {}))
    if not resume:
        ctx.save()
    stages: dict[str, Callable[[Context], None]] = {
        "model": stage_model, "target": stage_target, "evaluation": stage_evaluation,
        "plan": stage_plan, "apply": stage_apply, "finish": stage_finish,
    }
    if resume:
        ctx.ui.say(f"resuming {session_path(out)}: done so far: {', '.join(session.done) or 'nothing'}")
        if session.next_stage() is None:
            ctx.ui.say("this session is complete; its commands are in " + str(out / COMMANDS_FILE))
            return session
        for note in resolve_grants(session, out, model=model, trust_pickle=trust_pickle,
                                   evaluator=ctx.defaults.get("eval")):
            ctx.ui.say(f"[yellow]note:[/] {_esc(note)}")
        ctx.save()  # the grants of this run, not the file's
    try:
        for name in STAGES:
            ctx.stage = name
            if name in session.done:
                _restore(ctx, name)
                continue
            stages[name](ctx)
            session.done.append(name)
            ctx.save()
    except (KeyboardInterrupt, Interrupted, EOFError):
        session.interrupted_at = ctx.stage
        ctx.save()
        raise Interrupted(ctx.stage) from None
    except Exception:
        if not resume and "model" not in session.done:
            _discard(out, created)  # else the next walkthrough here exits 9 over a session holding nothing
        raise
    return session


def _restore(ctx: Context, stage: str) -> None:
    """Rebuild what a completed stage left in memory, without asking again."""
    s = ctx.session
    if stage == "model":
        _load_and_analyze(ctx)
    elif stage == "plan" and s.plan is not None:
        from compressadvise.knowledge.schema import Plan

        ctx.plan = Plan.model_validate(s.plan)


# ------------------------------------------------------------------ 5. apply and verify
def stage_apply(ctx: Context) -> None:
    ui, s = ctx.ui, ctx.session
    ui.heading(5, "Apply and verify")
    if not ctx.plan or not ctx.plan.steps:
        s.apply_status = "nothing to apply: the plan has no steps"
        ui.say(s.apply_status)
        return
    if not available("apply"):
        s.apply_status = "unavailable: apply is not available in this build"
        model = f"{shlex.quote(s.model)} " if s.model else ""
        ui.say(f"[yellow]apply is not available in this build[/]: the plan is saved; run "
               f"`compressadvise apply {model}--plan {shlex.quote(str(ctx.out / PLAN_FILE))} "
               f"--out {shlex.quote(str(ctx.out / APPLY_DIR))}` once it is.")
        return
    if not ui.confirm("Apply the plan now?", f"writes {ctx.out / APPLY_DIR} (Core ML package and torch model); "
                      "a small model takes under a minute", True):
        s.apply_status = "skipped by the user"
        return
    try:
        result = _run_apply(ctx)
    except CompressAdviseError as e:
        # The plan and the commands are still worth writing: report the failure and go on.
        s.apply_status = f"failed: {e.one_line()}"
        ui.say(f"[red]apply failed:[/] {_esc(e.one_line())}")
        return
    s.apply_dir = str(result.out_dir)
    s.apply_status = "applied"
    ctx.save()
    _show_apply(ctx, result)
    if not available("verify"):
        ui.say("[yellow]verify is not available in this build[/]: the compressed model was not checked.")
        return
    try:
        _run_verify(ctx)
    except CompressAdviseError as e:
        ui.say(f"[red]verify failed:[/] {_esc(e.one_line())}")


# ------------------------------------------------------------------ 6. finish
def stage_finish(ctx: Context) -> None:
    ui, s, out = ctx.ui, ctx.session, ctx.out
    ui.heading(6, "Finish")
    if ctx.plan is not None and not (out / PLAN_FILE).exists():
        from compressadvise.plan.planfile import save_plan

        save_plan(ctx.plan, out / PLAN_FILE)
    if available("report"):
        _write_report(ctx)
    else:
        ui.say("[dim]the HTML report is not available in this build[/]")
    s.commands = reproduce_commands(s, out, steps=bool(ctx.plan and ctx.plan.steps))
    script = ("#!/bin/sh\n# Non-interactive commands reproducing this walkthrough session (for CI).\nset -e\n"
              + "\n".join(s.commands) + "\n")
    write_text_atomic(out / COMMANDS_FILE, script)
    ui.say("[bold]Written:[/]")
    for label, path in (("session", out / SESSION_FILE), ("plan", out / PLAN_FILE),
                        ("compressed model", out / APPLY_DIR), ("verification", out / VERIFY_FILE),
                        ("report", out / REPORT_FILE), ("commands", out / COMMANDS_FILE)):
        if path.exists():
            ui.say(f"  {label}: {path}")
    ui.say("\n[bold]Reproduce this session without questions (CI):[/]")
    for c in s.commands:
        ui.console.print(c, markup=False, highlight=False, soft_wrap=True)
