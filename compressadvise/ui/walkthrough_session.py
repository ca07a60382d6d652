"""Session state for the walkthrough: its file names, errors, the saved session and the reproducible commands."""
from __future__ import annotations

import datetime as _dt
import json
import shlex
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from compressadvise.errors import CompressAdviseError, InvalidKnowledge
from compressadvise.fsutil import write_text_atomic

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
        from compressadvise.errors import InputNotFound

        raise InputNotFound(f"{path}: no walkthrough session to resume",
                            hint="start one with `compressadvise walkthrough --out DIR`")
    try:
        return Session.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidKnowledge(f"{path}: not a walkthrough session ({where}: {first.get('msg')})") from None


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


def session_json(session: Session, out: Path) -> str:
    return json.dumps({"out": str(out), **session.model_dump(mode="json")}, indent=2)
