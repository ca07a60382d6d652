"""The walkthrough's prompting UI, the context every stage receives, and the terminal check."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compressadvise.ui.walkthrough_session import Interrupted, NotInteractive, Session, save_session

if TYPE_CHECKING:
    from rich.console import Console

    from compressadvise.model.analysis import ModelReport
    from compressadvise.knowledge.base import Knowledge
    from compressadvise.model.loading import LoadedModel
    from compressadvise.knowledge.schema import Plan


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
        # A rule spans the console: in a pipe that is unbounded (render.PIPE_WIDTH), so cap it.
        self.console.print(Rule(f"[bold]{number}/6  {title}[/]", align="left"), width=min(self.console.width, 100))

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


# ------------------------------------------------------------------ the context of a session
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
