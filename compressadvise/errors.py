"""Errors with documented exit codes, so the CLI can gate CI pipelines.

Every error the user can cause maps to one line on stderr and one exit code; the table
below is the single source for the docs' exit-code page.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from pydantic import ValidationError

EXIT_CODES: dict[int, str] = {
    0: "success (and, for `verify`, every budget met)",
    1: "a budget was missed (`verify` gate) ",
    2: "bad command-line usage (unknown option, missing argument), or a bad library API argument",
    3: "input not found or not readable, or output location not writable",
    4: "model file corrupt, empty or in an unsupported format",
    5: "refused to unpickle an untrusted file (pass --trust-pickle to allow code execution)",
    6: "invalid knowledge, playbook, plan or sample file (schema or expression error), or a failing --eval evaluator",
    7: "requested technique or backend is unavailable on this machine",
    8: "compression failed, was a silent no-op (caught by the read-back check), or the build differs from the plan "
       "(`apply`: a planned layer not compressed, or weights over 2% off the predicted size; --allow-partial accepts it)",
    9: "output already exists (use --force)",
    70: "internal error (a bug: please report it, rerun with --debug for the traceback)",
}


class CompressAdviseError(Exception):
    """Base class: a user-facing problem with a one-line message and an exit code."""

    exit_code = 70

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint
        if hint:  # a library caller's traceback shows notes, not one_line(): the hint must not vanish
            self.add_note(hint)

    def one_line(self) -> str:
        msg = str(self)
        return f"{msg} ({self.hint})" if self.hint else msg


class BudgetMissed(CompressAdviseError):
    exit_code = 1


class BadArgument(CompressAdviseError, ValueError):
    """A wrong argument to the library API (unknown key, wrong type, out of range): the API's
    usage error, exit 2 like a bad option. Also a ValueError, which is what Python code expects."""

    exit_code = 2


class InputNotFound(CompressAdviseError):
    exit_code = 3


class BadModel(CompressAdviseError):
    exit_code = 4


class UntrustedPickle(CompressAdviseError):
    exit_code = 5


class InvalidKnowledge(CompressAdviseError):
    exit_code = 6


class Unavailable(CompressAdviseError):
    exit_code = 7


class CompressionFailed(CompressAdviseError):
    exit_code = 8


class OutputExists(CompressAdviseError):
    exit_code = 9


class OutputNotWritable(CompressAdviseError, OSError):
    """The output location cannot be written (read-only, full, under a file). Also an OSError,
    so code that tolerates a failed write (caches) keeps doing so."""

    exit_code = 3


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """"did you mean 'ane-a17'? known: ..." for a mistyped name ('ane-a71', 'palettisation',
    'max_sise_mb'): the closest known names, case-insensitively, then all of them."""
    import difflib

    known = sorted(known)
    by_lower = {k.lower(): k for k in known}
    close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)]
    guess = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{guess}known: {', '.join(known)}"


def bad_argument(what: str, error: "ValidationError", valid: Iterable[str]) -> BadArgument:
    """One line from pydantic's first complaint about a value the caller gave (not a file):
    the bad key, and for an unknown key the valid ones, instead of pydantic's multi-line report."""
    first = error.errors()[0]
    key = ".".join(str(x) for x in first["loc"])
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        # in the message, not a hint: str(e) is all that `except ... as e: print(e)` shows
        guess = did_you_mean(key, valid).replace("known: ", "valid: ")
        return BadArgument(f"{what}: unknown key {key!r}{more} ({guess})")
    return BadArgument(f"{what}: {key!r}: {first['msg']} (got {first.get('input')!r}){more}")
