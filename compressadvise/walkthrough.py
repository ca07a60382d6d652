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

import datetime as _dt
import importlib.util
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import BaseModel, ValidationError

from .errors import CompressAdviseError, InvalidKnowledge, OutputExists
from .fsutil import write_text_atomic

if TYPE_CHECKING:
    from rich.console import Console

    from .analysis import ModelReport
    from .knowledge import Knowledge
    from .loading import LoadedModel
    from .schema import Plan

SESSION_VERSION = 1
STAGES = ("model", "target", "evaluation", "plan", "apply", "finish")
SESSION_FILE = "session.json"
PLAN_FILE = "plan.yaml"
APPLY_DIR = "compressed"
VERIFY_FILE = "verify.json"
REPORT_FILE = "report.html"
COMMANDS_FILE = "reproduce.sh"
DEFAULT_OUT = "compressadvise-session"
DEFAULT_TARGET = "ane-a17"
ABSMAX_STD = 10.0  # one weight this many std out sets a per-tensor scale on its own
SIZE_MARGIN = 1.25  # package metadata and kept layers: a file lands above the weights estimate


class NotInteractive(CompressAdviseError):
    """The walkthrough needs a terminal (exit 2, like other usage errors)."""

    exit_code = 2


class ResumeRefused(CompressAdviseError):
    """The saved session names code that the command line does not name again (usage, exit 2)."""

    exit_code = 2


class Interrupted(Exception):
    """Ctrl-C or end of input during the session; the session file stays valid."""


# ------------------------------------------------------------------ session state
class StepDecision(BaseModel):
    step: int
    technique: str
    action: Literal["accept", "skip", "change"]
    changes: list[str] = []


class Session(BaseModel):
    """Every answer so far; written to OUT/session.json after each stage."""

    session_version: int = SESSION_VERSION
    model: str | None = None  # None = the bundled example
    trust_pickle: bool = False  # the latest run's --trust-pickle; never read back as a grant
    input_shape: list[int] | None = None  # for models that carry no example input
    done: list[str] = []
    target: str | None = None
    os: int | None = None
    max_size_mb: float = 0.0
    max_latency_ms: float = 0.0
    max_accuracy_drop: float = 0.0
    data: Literal["none", "calibration", "training"] = "none"
    samples: str | None = None  # "bundled", a sample file/folder, or None
    evaluator: str | None = None
    fidelity_only: bool = False
    plan: dict[str, Any] | None = None  # the plan under review (schema.Plan as JSON)
    reviewed: int = 0
    decisions: list[StepDecision] = []
    apply_status: str = ""
    apply_dir: str | None = None
    verify_file: str | None = None
    passed: bool | None = None
    verdicts: list[dict[str, Any]] = []
    next_moves: list[str] = []
    report_file: str | None = None
    commands: list[str] = []
    interrupted_at: str | None = None
    updated: str = ""

    def next_stage(self) -> str | None:
        return next((s for s in STAGES if s not in self.done), None)


def session_path(out: Path) -> Path:
    return out / SESSION_FILE


def save_session(out: Path, session: Session) -> Path:
    session.updated = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return write_text_atomic(session_path(out), session.model_dump_json(indent=2) + "\n")


def load_session(out: Path) -> Session:
    path = session_path(out)
    if not path.is_file():
        from .errors import InputNotFound

        raise InputNotFound(f"{path}: no walkthrough session to resume",
                            hint="start one with `compressadvise walkthrough --out DIR`")
    try:
        return Session.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidKnowledge(f"{path}: not a walkthrough session ({where}: {first.get('msg')})") from None


# ------------------------------------------------------------------ expert observations
class ExpertNotes(BaseModel):
    largest: list[str]
    fragile: list[str]
    skipped: list[str]


def _fragile_reasons(x: Any, heavy_kurtosis: float) -> list[str]:
    s = x.stats
    why = []
    if s and s.nonfinite:
        why.append(f"{s.nonfinite} NaN/inf weights")
    if s and s.kurtosis > heavy_kurtosis:
        why.append(f"heavy-tailed weights (kurtosis {s.kurtosis:.1f}; 3 is normal)")
    if s and s.absmax_over_std > ABSMAX_STD:
        why.append(f"an outlier {s.absmax_over_std:.0f} std from the mean sets any per-tensor scale")
    if x.is_first:
        why.append("first layer: its error flows through every later layer")
    if x.is_classifier or x.is_last:
        why.append("last layer: writes the outputs directly")
    if x.type == "depthwise_conv":
        why.append("depthwise: few weights per channel, little redundancy")
    if x.tied_to:
        why.append(f"tied to {x.tied_to}: compressing one changes both")
    return why


def expert_notes(report: "ModelReport", plan: "Plan | None", knowledge: "Knowledge | None" = None) -> ExpertNotes:
    """The three things an expert looks at first: where the bytes are, what looks fragile,
    and what the plan will leave alone (and why). "Heavy-tailed" is the knowledge's cited
    `threshold.heavy_kurtosis`, the value the playbooks' rules compare with."""
    from .knowledge import builtin
    from .render import human_bytes

    heavy = (knowledge or builtin()).thresholds["heavy_kurtosis"]

    weights = [x for x in report.layers if len(x.weight_shape) >= 2]
    largest = [f"{x.name} ({x.type}, {x.weight_shape}): {x.share:.0%} of the weights, "
               f"{human_bytes(x.bytes_fp16)} at fp16" for x in sorted(weights, key=lambda x: -x.params)[:3]]
    scored = [(x, _fragile_reasons(x, heavy)) for x in weights]
    scored = sorted((t for t in scored if t[1]), key=lambda t: (-len(t[1]), t[0].index))
    fragile = [f"{x.name}: {'; '.join(why)}" for x, why in scored[:5]]
    skipped: dict[str, str] = {}
    for step in plan.steps if plan else []:
        for sk in step.skipped:
            skipped.setdefault(sk.layer, f"{sk.layer}: {sk.reason}" + (f" [{sk.code}]" if sk.code else ""))
    small = [x.name for x in report.layers if len(x.weight_shape) < 2]
    lines = list(skipped.values())
    if small:
        lines.append(f"{', '.join(small[:4])}{'...' if len(small) > 4 else ''}: 1-D parameters "
                     "(normalization, biases) are tiny and stay fp16")
    if plan is not None and not plan.steps:
        lines.append("no compression step applies with the default target and no budgets yet")
    return ExpertNotes(largest=largest, fragile=fragile or ["nothing stands out in the weight statistics"],
                       skipped=lines or ["nothing: every weight layer is in scope"])


# ------------------------------------------------------------------ what to try after a miss
def next_moves(plan: "Plan", missed: list[str], report: "ModelReport", knowledge: "Knowledge",
               *, data: str = "none", worst_layer: str | None = None) -> list[str]:
    """The next recommended moves for the budgets that were missed, most promising first: the
    playbooks' cited `outcome` rules (playbooks/next_moves.yaml), evaluated by the engine."""
    from .engine import next_moves as evaluate

    return evaluate(plan, report, missed, knowledge, data=data, worst_layer=worst_layer).messages()


# ------------------------------------------------------------------ the reproducible commands
def reproduce_commands(session: Session, out: Path, *, steps: bool = True) -> list[str]:
    """The exact non-interactive commands that redo this session (for CI); `steps` False when
    the reviewed plan has nothing to apply."""
    q = lambda v: shlex.quote(str(v))  # noqa: E731
    model = q(session.model) if session.model else ""
    budgets = [f"--{flag} {value:g}" for flag, value in (
        ("max-size-mb", session.max_size_mb), ("max-latency-ms", session.max_latency_ms),
        ("max-accuracy-drop", session.max_accuracy_drop)) if value]
    tgt = [f"--target {q(session.target)}"] + ([f"--os {session.os}"] if session.os else [])
    plan, comp, ver = q(out / PLAN_FILE), q(out / APPLY_DIR), q(out / VERIFY_FILE)
    trust = ["--trust-pickle"] if session.trust_pickle else []
    samples = [f"--samples {q(session.samples)}"] if session.samples else []
    shape = [f"--input-shape {','.join(map(str, session.input_shape))}"] if session.input_shape else []
    evaluator = [f"--eval {q(session.evaluator)}"] if session.evaluator else []
    answers = [f"--{flag} {q(v)}" for flag, v in (
        ("target", session.target), ("os", session.os), ("data", session.data),
        ("samples", session.samples), ("eval", session.evaluator)) if v]
    cmds = [_cmd("compressadvise recommend", model, *tgt, *budgets, f"--data {session.data}", *shape,
                 f"--out {q(out / 'recommended-plan.yaml')} --force", *trust,
                 "  # the plan before your review; plan.yaml holds your reviewed version")]
    if steps:
        cmds += [
            _cmd("compressadvise apply", model, f"--plan {plan} --out {comp} --force", *samples, *shape, *trust),
            _cmd("compressadvise verify", model or "bundled", comp, *samples, *evaluator, *tgt, *budgets,
                 f"--plan {plan}", *trust, f"--json > {ver}",
                 "  # verify has no --input-shape: give it --samples" if shape and not samples else ""),
            # --model: the report never imports a module:function read from the apply manifest.
            _cmd("compressadvise report", comp, f"--model {model}" if model else "",
                 f"--plan {plan} --verify {ver} --out {q(out / REPORT_FILE)} --force", *trust),
        ]
    else:
        cmds.append(_cmd("compressadvise report", model, f"--plan {plan} --out {q(out / REPORT_FILE)} --force",
                         *shape, *trust))
    cmds.append(_cmd("compressadvise walkthrough", model, "--out NEW_DIR --yes", *answers, *budgets, *shape, *trust,
                     "  # the whole session again, taking the recommended steps as they are"))
    return cmds


def _cmd(*parts: str) -> str:
    return " ".join(p for p in parts if p)


# ------------------------------------------------------------------ prompting
class UI:
    """Questions with a one-line explanation and a default; `interactive=False` takes defaults."""

    def __init__(self, console: "Console", interactive: bool):
        self.console = console
        self.interactive = interactive

    def say(self, *things: Any) -> None:
        self.console.print(*things)

    def heading(self, number: int, title: str) -> None:
        from rich.rule import Rule

        self.console.print()
        self.console.print(Rule(f"[bold]{number}/6  {title}[/]", align="left"))

    def _read(self, question: str, explain: str, default: str) -> str:
        if explain:
            self.console.print(f"  [dim]{explain}[/]")
        from rich.markup import escape

        prompt = escape(f"? {question} [{default}]: ")
        if not self.interactive:
            self.console.print(f"{prompt}{escape(default)}  [dim](default)[/]")
            return default
        try:
            answer = self.console.input(prompt)
        except EOFError:
            raise Interrupted("end of input") from None
        return answer.strip() or default

    def choose(self, question: str, explain: str, options: list[tuple[str, str]], default: str) -> str:
        """A menu answered by value, or by number when the values are not numbers themselves."""
        values = [v for v, _ in options]
        numbered = not any(_is_number(v) for v in values)
        for i, (value, label) in enumerate(options, 1):
            mark = "*" if value == default else " "
            index = f"{i}. " if numbered else ""
            self.console.print(f"  {mark}{index}[bold]{value}[/]{'  ' + label if label else ''}", highlight=False)
        while True:
            answer = self._read(question, explain, default)
            explain = ""
            if answer in values:
                return answer
            if numbered and answer.isdigit() and 1 <= int(answer) <= len(values):
                return values[int(answer) - 1]
            self.console.print(f"  [red]please answer {'1-%d or ' % len(values) if numbered else ''}"
                               f"one of: {', '.join(values)}[/]")

    def number(self, question: str, explain: str, default: float, *, minimum: float = 0.0) -> float:
        while True:
            answer = self._read(question, explain, f"{default:g}")
            explain = ""
            try:
                value = float(answer)
            except ValueError:
                self.console.print("  [red]please answer with a number[/]")
                continue
            if value < minimum:
                self.console.print(f"  [red]please answer {minimum:g} or more[/]")
                continue
            return value

    def text(self, question: str, explain: str, default: str) -> str:
        return self._read(question, explain, default)

    def confirm(self, question: str, explain: str, default: bool = True) -> bool:
        while True:
            answer = self._read(question, explain, "y" if default else "n").lower()
            explain = ""
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no"):
                return False
            self.console.print("  [red]please answer y or n[/]")


def _esc(text: str) -> str:
    """Text from elsewhere (reasons, notes, errors) printed literally, never read as Rich markup."""
    from rich.markup import escape

    return escape(text)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------ the session
@dataclass
class Context:
    out: Path
    session: Session
    ui: UI
    knowledge: "Knowledge"
    defaults: dict[str, Any] = field(default_factory=dict)
    loaded: "LoadedModel | None" = None
    report: "ModelReport | None" = None
    plan: "Plan | None" = None
    verify_result: Any = None
    stage: str = ""

    def save(self) -> None:
        save_session(self.out, self.session)


def available(module: str) -> bool:
    """Whether an optional part of compressadvise (apply, verify, report) is in this build."""
    try:
        return importlib.util.find_spec(f"compressadvise.{module}") is not None
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
    from .knowledge import builtin
    from .render import out as stdout_console

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
        from .schema import Plan

        ctx.plan = Plan.model_validate(s.plan)


def _load_and_analyze(ctx: Context) -> None:
    from .analysis import analyze
    from .loading import load_model

    with ctx.ui.console.status("loading the model"):
        ctx.loaded = load_model(ctx.session.model, trust_pickle=ctx.session.trust_pickle)
    if ctx.loaded.has_graph and not ctx.loaded.example_inputs and ctx.session.input_shape is None \
            and "model" not in ctx.session.done:
        ctx.session.input_shape = _ask_shape(ctx)
    if ctx.session.input_shape:
        import torch

        # apply (Core ML conversion) and verify (random inputs) both read the example input.
        ctx.loaded.example_inputs = (torch.zeros(*ctx.session.input_shape),)
    with ctx.ui.console.status("analyzing the model"):
        ctx.report = analyze(ctx.loaded, input_shape=ctx.session.input_shape)


def _ask_shape(ctx: Context) -> list[int] | None:
    from .commands.common import parse_shape

    ui = ctx.ui
    default = ",".join(map(str, ctx.defaults["input_shape"])) if ctx.defaults.get("input_shape") else "skip"
    while True:
        answer = ui.text("Input shape, e.g. 1,3,224,224 ('skip' if unknown)",
                         "the model carries no example input: conversion, MACs and random test inputs need one",
                         default)
        if answer in ("skip", ""):
            return None
        try:
            return parse_shape(answer)
        except Exception:  # typer.BadParameter: say it and ask again
            ui.say("  [red]the shape must look like 1,3,224,224[/]")
            if not ui.interactive:
                return None


# ------------------------------------------------------------------ 1. model
def stage_model(ctx: Context) -> None:
    from rich.markup import escape
    from rich.table import Table

    from .engine import recommend
    from .render import bar, human_bytes, human_count

    ui, r = ctx.ui, None
    ui.heading(1, "Model")
    if ctx.session.model is None:
        ui.say("No model given: using the bundled example, a small CNN for 8x8 handwritten digits "
               "(pass a file, e.g. `compressadvise walkthrough model.pt2`, for your own).")
    _load_and_analyze(ctx)
    r = ctx.report
    ui.say(f"[bold]{r.source}[/]: {r.family} ({'; '.join(r.family_evidence)})")
    ui.say(f"{human_count(r.total_params)} parameters, {human_bytes(r.total_bytes_fp16)} at fp16, "
           f"{len(r.layers)} weight layers")
    t = Table(show_edge=False, title="Where the parameters are")
    for col in ("type", "layers", "share", ""):
        t.add_column(col, justify="right" if col in ("layers", "share") else "left")
    for name, b in sorted(r.layer_types.items(), key=lambda kv: -kv[1].params):
        t.add_row(name, str(b.count), f"{b.share:.1%}", bar(b.share))
    ui.say(t)
    target = ctx.defaults.get("target") or DEFAULT_TARGET
    if target not in ctx.knowledge.targets:
        target = sorted(ctx.knowledge.targets)[0]
    preview = recommend(r, target=target, knowledge=ctx.knowledge)
    notes = expert_notes(r, preview, ctx.knowledge)
    ui.say("\n[bold]What an expert notices first[/]")
    for title, lines in (("Largest layers (compression there decides the size)", notes.largest),
                         ("Fragile-looking layers", notes.fragile),
                         (f"Layers that will be skipped, and why (default plan for {target})", notes.skipped)):
        ui.say(f" [bold]{title}[/]")
        for line in lines:
            ui.say(f"   • {escape(line)}")
    for f in r.findings[:5]:
        ui.say(f" [yellow]finding:[/] {escape(f)}")


# ------------------------------------------------------------------ 2. target and budgets
def _os_options(t: Any) -> list[tuple[str, str]]:
    versions = sorted({m.min_os for m in t.modes if m.min_os >= t.min_os} | {t.min_os, t.default_os})
    opts = []
    for v in versions:
        new = [m.mode for m in t.modes if m.min_os == v and m.behaviour != "unsupported"]
        opts.append((str(v), f"adds {', '.join(new)}" if new else ""))
    return opts


def stage_target(ctx: Context) -> None:
    from .render import human_bytes

    ui, s, k, r = ctx.ui, ctx.session, ctx.knowledge, ctx.report
    ui.heading(2, "Target and budgets")
    names = sorted(k.targets)
    default = ctx.defaults.get("target") or (DEFAULT_TARGET if DEFAULT_TARGET in names else names[0])
    s.target = ui.choose("Target device", "where the model will run; decides which compression modes load and run fast",
                         [(n, k.targets[n].title) for n in names], default)
    t = k.target(s.target)
    s.os = None
    if t.coreml:
        opts = _os_options(t)
        os_default = str(ctx.defaults.get("os") or t.default_os)
        if os_default not in [v for v, _ in opts]:
            opts.append((os_default, ""))
        s.os = int(ui.choose(f"Minimum {t.os_family or 'OS'} version (iOS numbering)",
                             "older OS versions cannot load newer compression modes",
                             opts, os_default))
    else:
        s.os = t.default_os or None
    from .engine import recommend

    preview = recommend(r, target=s.target, os=s.os, knowledge=k)
    reach = preview.prediction.bytes_after if preview.prediction and preview.steps else r.total_bytes_fp16
    suggested = round_up(reach * SIZE_MARGIN / 1e6)
    s.max_size_mb = ui.number("Size budget in MB (0 = none)",
                              f"download/disk size you can afford; default: what the data-free plan reaches "
                              f"({human_bytes(reach)} of {human_bytes(r.total_bytes_fp16)} at fp16, estimate) "
                              f"plus {SIZE_MARGIN - 1:.0%} for file overhead",
                              _given(ctx, "max_size_mb", suggested))
    s.max_latency_ms = ui.number("Latency budget in ms per inference (0 = none)",
                                 "checked against a roofline estimate for the target until you measure on the device",
                                 _given(ctx, "max_latency_ms", 0.0))
    s.max_accuracy_drop = ui.number("Accuracy you can lose, in points (0 = none given)",
                                    "top-1 points (or your evaluator's metric) the compressed model may lose",
                                    _given(ctx, "max_accuracy_drop", 1.0))
    s.data = ui.choose("Data you have for compression",
                       "more data unlocks stronger techniques (calibration: W8A8, sensitive k-means; training: QAT)",
                       [("none", "data-free techniques only"),
                        ("calibration", "~128 real inputs, no labels needed"),
                        ("training", "a training set and time to fine-tune")],
                       ctx.defaults.get("data") or "none")


def round_up(x: float, digits: int = 2) -> float:
    """Round up to `digits` significant digits (a budget suggestion should not sit below the estimate)."""
    import math

    if x <= 0:
        return 0.0
    scale = 10 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(x * scale - 1e-9) / scale


def _given(ctx: Context, key: str, fallback: float) -> float:
    """A budget passed on the command line (0 included) wins over the suggested default."""
    value = ctx.defaults.get(key)
    return float(fallback if value is None else value)


# ------------------------------------------------------------------ 3. evaluation first
def stage_evaluation(ctx: Context) -> None:
    ui, s = ctx.ui, ctx.session
    ui.heading(3, "Evaluation first")
    ui.say("Decide how you will judge the compressed model before compressing it: fixed samples with "
           "labels, or your own evaluator.")
    bundled = s.model is None or s.model == "bundled"
    while True:
        _ask_samples(ctx, bundled)
        _ask_evaluator(ctx)
        s.fidelity_only = s.samples is None and s.evaluator is None
        if not s.fidelity_only:
            break
        ui.say("[yellow]warning:[/] with no samples and no evaluator, verify runs both models on random "
               "inputs: it can only compare their outputs (fidelity). Accuracy, per-class effects and "
               "calibration-based techniques cannot be judged.")
        if ui.confirm("Continue with fidelity-only checks?", "answer n to give samples or an evaluator", True):
            break
    if s.data == "calibration" and s.samples is None:
        ui.say("[yellow]note:[/] you said calibration data exists: pass it as the samples so apply can use it.")


def _ask_evaluator(ctx: Context) -> None:
    from .verify import load_evaluator

    ui, s = ctx.ui, ctx.session
    while True:
        answer = ui.text("Your evaluator, module:function returning a dict of metrics ('none' to skip)",
                         "it receives the model; its 'accuracy' key feeds the accuracy budget",
                         ctx.defaults.get("eval") or "none")
        s.evaluator = None if answer in ("none", "") else answer
        if s.evaluator is None:
            return
        try:
            load_evaluator(s.evaluator)  # importable now, not after a minute of compression
            return
        except CompressAdviseError as e:
            ui.say(f"  [red]{_esc(e.one_line())}[/]")
            if not ui.interactive:
                raise


def _ask_samples(ctx: Context, bundled: bool) -> None:
    from .samples import load_samples

    ui, s = ctx.ui, ctx.session
    default = ctx.defaults.get("samples") or ("bundled" if bundled else "none")
    while True:
        answer = ui.text("Evaluation samples (a .npz/.pt/.safetensors file or folder, 'bundled', or 'none')",
                         "real inputs with labels measure accuracy; 'bundled' = the 360 held-out digits" if bundled
                         else "real inputs with labels measure accuracy; 'none' = random inputs, fidelity only",
                         default)
        if answer in ("none", ""):
            s.samples = None
            return
        try:
            smp = load_samples(answer)
        except CompressAdviseError as e:
            ui.say(f"  [red]{_esc(e.one_line())}[/]")
            if not ui.interactive:
                raise
            continue
        s.samples = answer
        ui.say(f"  {len(smp)} samples" + (" with labels" if smp.labels is not None else " without labels")
               + (" and slices" if smp.slices else ""))
        if smp.labels is None:
            ui.say("  [yellow]no labels: accuracy is judged by agreement with the original model (a proxy)[/]")
        return


# ------------------------------------------------------------------ 4. recommendations
def _plan_line(plan: "Plan", budget_mb: float) -> str:
    from .render import human_bytes

    p = plan.prediction
    if p is None:
        return ""
    verdict = ""
    if budget_mb:
        ok = p.bytes_after / 1e6 <= budget_mb
        verdict = f"  [{'green' if ok else 'red'}]{'meets' if ok else 'misses'} the {budget_mb:g} MB budget[/]"
    return (f"predicted size: {human_bytes(p.bytes_before)} -> {human_bytes(p.bytes_after)} "
            f"({p.ratio:.2f}x) [dim](estimate)[/]{verdict}")


def _show_step(ctx: Context, i: int) -> None:
    from rich.markup import escape as e

    from .render import human_bytes

    ui, k, step = ctx.ui, ctx.knowledge, ctx.plan.steps[i]
    tech = k.techniques.get(step.technique)
    params = ", ".join(f"{a}={b}" for a, b in step.params.items() if a != "weight_threshold")
    ui.say(f"\n[bold]Step {i + 1} of {len(ctx.plan.steps)}: {tech.title if tech else step.technique}[/] ({step.slot})")
    ui.say(f"  settings: {params}")
    ui.say(f"  why: {e(step.why)}")
    for code in step.rules:
        cr = k.rules.get(code)
        if cr is None:
            continue
        cites = "; ".join(c.text() for c in cr.rule.citation)
        ui.say(f"  lesson [bold]{code}[/] {e(cr.rule.title)}\n    [dim]source: {e(cites)}[/]")
    ui.say(f"  compresses {len(step.layers)} layer(s): {', '.join(step.layers) or 'none'}")
    for name, ov in step.op_name_params.items():
        ui.say(f"  override {name}: " + ", ".join(f"{a}={b}" for a, b in ov.items()))
    for sk in step.skipped:
        ui.say(f"  [yellow]keeps[/] {sk.layer}: {e(sk.reason)} [dim]\\[{sk.code}][/]")
    ui.say(f"  size after this step: {human_bytes(step.predicted_bytes_after or 0)} [dim](estimate)[/]")


def _change_step(ctx: Context, i: int) -> list[str]:
    """Let the user edit bits, granularity, group/block size and kept layers; re-predict live."""
    from . import whatif

    ui, k, s = ctx.ui, ctx.knowledge, ctx.session
    changes: list[str] = []
    while True:
        step = ctx.plan.steps[i]
        spec = k.technique(step.technique).parameters
        options = [(name, f"now {step.params.get(name, spec[name].default)}") for name in _editable(step.params, spec)]
        options.append(("keep", "keep layers at full precision: " + (", ".join(step.layers) or "none left")))
        options.append(("done", "finish changing this step"))
        what = ui.choose("Change what", "", options, "done")
        if what == "done":
            return changes
        try:
            if what == "keep":
                names = ui.text("Layers to keep (comma-separated)", "they stay at fp16; the size estimate updates", "")
                chosen = [n.strip() for n in names.split(",") if n.strip()]
                if not chosen:
                    continue
                ctx.plan = whatif.keep_layers(ctx.plan, i, chosen, ctx.report, k)
                changes.append(f"keep {', '.join(chosen)}")
            else:
                p = spec[what]
                current = step.params.get(what, p.default)
                if p.choices:
                    raw = ui.choose(what, p.description, [(str(c), "") for c in p.choices], str(current))
                else:
                    raw = ui.text(what, p.description, str(current))
                value = _typed(raw, p.type)
                ctx.plan = whatif.set_param(ctx.plan, i, what, value, ctx.report, k)
                changes.append(f"{what}={value}")
        except (InvalidKnowledge, ValueError) as e:
            ui.say(f"  [red]{_esc(e.one_line() if isinstance(e, CompressAdviseError) else str(e))}[/]")
            continue
        ui.say(f"  {_plan_line(ctx.plan, s.max_size_mb)}")
        skipped = [sk for sk in ctx.plan.steps[i].skipped if sk.code == "backend"]
        for sk in skipped:
            ui.say(f"  [yellow]backend skips[/] {sk.layer}: {_esc(sk.reason)}")


def _editable(params: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    """The parameters a newcomer may change; group/block size only with their granularity."""
    needs = {"group_size": "per_grouped_channel", "block_size": "per_block"}
    return [name for name in ("nbits", "granularity", "group_size", "block_size", "sparsity")
            if name in spec and (name not in needs or params.get("granularity") == needs[name])]


def _typed(raw: str, kind: str) -> Any:
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "bool":
        return raw.lower() in ("1", "true", "yes", "y")
    return raw


def stage_plan(ctx: Context) -> None:
    from .engine import recommend
    from .plan import save_plan
    from .schema import Plan

    ui, s = ctx.ui, ctx.session
    ui.heading(4, "Recommendations")
    if s.plan is None:
        ctx.plan = recommend(ctx.report, target=s.target, os=s.os, knowledge=ctx.knowledge, constraints={
            "max_size_mb": s.max_size_mb, "max_latency_ms": s.max_latency_ms,
            "max_accuracy_drop": s.max_accuracy_drop, "data": s.data})
        s.plan, s.reviewed = ctx.plan.model_dump(mode="json"), 0
        ctx.save()
    else:
        ctx.plan = Plan.model_validate(s.plan)
        ui.say(f"(continuing the review at step {s.reviewed + 1})")
    ui.say(f"{len(ctx.plan.steps)} step(s) for {ctx.plan.target.name} (OS {ctx.plan.target.os}); "
           + _plan_line(ctx.plan, s.max_size_mb))
    if not ctx.plan.steps:
        ui.say("[yellow]no compression step fired for these answers[/]: see the advice below")
    i = s.reviewed
    while i < len(ctx.plan.steps):
        _show_step(ctx, i)
        tech = ctx.plan.steps[i].technique
        action = ui.choose("Accept, skip or change this step", "skip drops it from the plan; change edits its settings",
                           [("accept", ""), ("skip", ""), ("change", "")], "accept")
        changes: list[str] = []
        if action == "skip":
            from .whatif import drop_step

            ctx.plan = drop_step(ctx.plan, i, ctx.report, ctx.knowledge)
            ui.say(f"  step dropped; {_plan_line(ctx.plan, s.max_size_mb)}")
        elif action == "change":
            changes = _change_step(ctx, i)
            i += 1
        else:
            i += 1
        s.decisions.append(StepDecision(step=len(s.decisions) + 1, technique=tech, action=action, changes=changes))
        s.plan, s.reviewed = ctx.plan.model_dump(mode="json"), i
        ctx.save()
    if ctx.plan.advisories:
        from rich.markup import escape

        ui.say("\n[bold]Advice from the playbooks[/]")
        for a in ctx.plan.advisories[:8]:
            where = f" ({', '.join(a.layers[:3])}{'...' if len(a.layers) > 3 else ''})" if a.layers else ""
            ui.say(f" • [bold]{a.code}[/] {escape(a.message)}{where}")
    save_plan(ctx.plan, ctx.out / PLAN_FILE)
    ui.say(f"\nplan written to [bold]{ctx.out / PLAN_FILE}[/]; " + _plan_line(ctx.plan, s.max_size_mb))


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
        ui.say(f"[yellow]apply is not available in this build[/]: the plan is saved; run "
               f"`compressadvise apply --plan {ctx.out / PLAN_FILE} --out {ctx.out / APPLY_DIR}` once it is.")
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


def _run_apply(ctx: Context) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from . import apply as apply_mod

    s = ctx.session
    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    console=ctx.ui.console, transient=True)
    task = prog.add_task("applying", total=None)

    def progress(label: str, done: int, total: int) -> None:
        prog.update(task, description=label, completed=done, total=total or None)

    out = ctx.out / APPLY_DIR
    with prog:
        # force: the folder is this session's own output (a rerun after an interrupted apply).
        return apply_mod.apply(ctx.loaded, ctx.plan, out, force=True, samples=s.samples, progress=progress,
                               input_shape=s.input_shape, knowledge=ctx.knowledge)


def _show_apply(ctx: Context, result: Any) -> None:
    m = result.manifest
    applied = sum(len(st.get("layers_applied", [])) for st in m.get("steps", []))
    ctx.ui.say(f"applied {len(m.get('steps', []))} step(s), {applied} layer compression(s) in "
               f"{result.seconds:.1f} s -> [bold]{result.out_dir}[/]")
    for note in m.get("notes", [])[:4]:
        ctx.ui.say(f"  [yellow]note:[/] {_esc(note)}")


def _run_verify(ctx: Context) -> None:
    from .verify import Budgets, verify

    ui, s = ctx.ui, ctx.session
    budgets = Budgets(max_accuracy_drop=s.max_accuracy_drop or None, max_latency_ms=s.max_latency_ms or None,
                      max_size_mb=s.max_size_mb or None)
    with ui.console.status("verifying") as status:
        result = verify(ctx.loaded, s.apply_dir, samples=s.samples, evaluator=s.evaluator, target=s.target,
                        os=s.os, budgets=budgets, plan=ctx.plan, reps=10, warmup=2,
                        trust_pickle=s.trust_pickle, progress=lambda msg: status.update(msg))
    write_text_atomic(ctx.out / VERIFY_FILE, result.to_json() + "\n")
    s.verify_file = str(ctx.out / VERIFY_FILE)
    s.passed = result.passed
    s.verdicts = [v.model_dump(mode="json") for v in result.budgets]
    ctx.verify_result = result
    _show_before_after(ctx, result)
    if not result.passed:
        worst = result.drift.first_degraded or result.drift.worst if result.drift else None
        from .engine import next_moves as evaluate

        moves = evaluate(ctx.plan, ctx.report, [v.name for v in result.missed()], ctx.knowledge,
                         data=s.data, worst_layer=worst).moves
        s.next_moves = [f"{m.message} [{m.code}]" for m in moves]  # the code: `compressadvise explain` it
        ui.say("\n[bold red]A budget was missed.[/] Next recommended moves:")
        for move in s.next_moves:
            ui.say(f" • {_esc(move)}")
        ui.say(f"[dim]rerun `compressadvise walkthrough --resume {ctx.out}` after editing, or start a new session[/]")
    else:
        s.next_moves = []
        ui.say("[bold green]every budget met[/]")


def _show_before_after(ctx: Context, r: Any) -> None:
    from rich.table import Table

    from .render import human_bytes

    t = Table(title="Before / after", show_edge=False)
    for col in ("", "original", "compressed", "basis"):
        t.add_column(col, justify="right" if col in ("original", "compressed") else "left")
    if r.original.size_bytes and r.compressed.size_bytes:
        t.add_row("size", human_bytes(r.original.size_bytes), human_bytes(r.compressed.size_bytes),
                  f"{r.original.size_basis} / {r.compressed.size_basis}")
    if r.target_size_bytes:
        t.add_row(f"weights on {r.estimate['compressed'].target if r.estimate else 'the target'}",
                  human_bytes(r.target_size_bytes.get("original", 0)), human_bytes(r.target_size_bytes.get("compressed", 0)),
                  "estimate")
    for row in r.accuracy + r.evaluator:
        t.add_row(row.name, f"{row.original:.2f}", f"{row.compressed:.2f}", "measured")
    for f in r.fidelity[:1]:
        for key in ("top1_agreement", "snr_db", "cosine"):
            if key in f.metrics:
                t.add_row(f"{f.name} {key}", "", f"{f.metrics[key]:.4g}", "measured vs original")
    if r.latency is not None:
        o, c = r.latency.best("original"), r.latency.best("compressed")
        if o is not None and c is not None:
            t.add_row("latency here (ms)", f"{o.median_ms:.3f}", f"{c.median_ms:.3f}",
                      f"measured on this machine ({o.mode})")
    if r.estimate:
        e_o, e_c = r.estimate.get("original"), r.estimate.get("compressed")
        if e_o is not None and e_c is not None and e_c.total_ms > 0:
            t.add_row(f"latency on {e_c.target} (ms)", f"{e_o.total_ms:.4f}", f"{e_c.total_ms:.4f}", "estimate (roofline)")
    ctx.ui.say(t)
    for v in r.budgets:
        mark = "[green]PASS[/]" if v.passed else "[red]MISS[/]"
        value = f"{v.value:.4g} {v.unit}" if v.value is not None else "-"
        limit = f"{v.limit:g} {v.unit}" if v.limit is not None else ""
        ctx.ui.say(f"  {mark} {v.name}: {value} (limit {limit}) [dim]{_esc(v.basis)}[/]")
    for w in r.warnings[:3]:
        ctx.ui.say(f"  [yellow]warning:[/] {_esc(w)}")


# ------------------------------------------------------------------ 6. finish
def stage_finish(ctx: Context) -> None:
    ui, s, out = ctx.ui, ctx.session, ctx.out
    ui.heading(6, "Finish")
    if ctx.plan is not None and not (out / PLAN_FILE).exists():
        from .plan import save_plan

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


def _write_report(ctx: Context) -> None:
    from .report import write_report

    s, out = ctx.session, ctx.out
    # This session's own apply folder (not a path read back from session.json); the original is the
    # model analyzed here, so the report never resolves it from the manifest.
    applied = out / APPLY_DIR
    source = applied if s.apply_dir and (applied / "manifest.json").is_file() else None
    original = ctx.report if ctx.report is not None else s.model
    verify = out / VERIFY_FILE if (out / VERIFY_FILE).is_file() else None
    try:
        with ctx.ui.console.status("writing the HTML report"):
            write_report(source if source is not None else original, out / REPORT_FILE, force=True,
                         model=original if source is not None else None, plan=ctx.plan, verify=verify,
                         target=s.target, os_version=s.os, knowledge=ctx.knowledge, trust_pickle=s.trust_pickle)
        s.report_file = str(out / REPORT_FILE)
    except CompressAdviseError as e:
        ctx.ui.say(f"[yellow]the HTML report could not be written:[/] {_esc(e.one_line())}")


# ------------------------------------------------------------------ terminal checks
def require_terminal(console_file: Any) -> None:
    """Fail fast instead of waiting for answers that cannot come (piped stdin, CI)."""
    stdin_tty = sys.stdin is not None and sys.stdin.isatty()
    out_tty = bool(getattr(console_file, "isatty", lambda: False)())
    if stdin_tty and out_tty:
        return
    which = "stdin" if not stdin_tty else "the output"
    raise NotInteractive(
        f"walkthrough asks questions and {which} is not a terminal",
        hint="pass --yes to accept every default, or use the non-interactive commands: "
        "`compressadvise recommend MODEL --target T --out plan.yaml`, "
        "`compressadvise apply MODEL --plan plan.yaml --out DIR`, "
        "`compressadvise verify MODEL DIR --samples FILE`")


def session_json(session: Session, out: Path) -> str:
    return json.dumps({"out": str(out), **session.model_dump(mode="json")}, indent=2)
