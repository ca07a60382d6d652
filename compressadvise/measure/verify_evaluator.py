"""The user's evaluator for verify: imported and run with its prints kept off stdout, its metrics as rows."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator

from compressadvise.model.loading import import_callable
from compressadvise.model.samples import InvalidSamples
from compressadvise.measure.verify_outputs import MetricRow, _first_line


class EvaluatorFailed(InvalidSamples):
    """The user's evaluator raised or returned something that is not a dict of numbers (exit 6)."""


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """User code's prints go to stderr while it runs: stdout carries --json and must stay
    parseable. Both sys.stdout and file descriptor 1 (C extensions, subprocesses) move."""
    real = sys.stdout
    if real is not None:
        real.flush()
    try:
        saved: int | None = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no fd 1 to move (closed)
        saved = None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if real is not None:
            real.flush()  # what it wrote to sys.__stdout__ directly still goes to stderr
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _evaluator_name(func: Callable) -> str:
    mod, name = getattr(func, "__module__", None), getattr(func, "__qualname__", None)
    return f"{mod}:{name}" if mod and name else repr(func)


def load_evaluator(spec: str | Callable) -> Callable:
    if callable(spec):
        return spec
    try:
        with _stdout_to_stderr():  # a module that prints as it imports
            return import_callable(str(spec), "evaluator")
    except SystemExit as e:  # its exit code is not ours to report
        raise EvaluatorFailed(f"evaluator {spec} called exit({e.code!r}) while being imported") from e


def run_evaluator(func: Callable, model: Any, which: str) -> dict[str, float]:
    name = _evaluator_name(func)
    try:
        with _stdout_to_stderr():
            result = func(model)
    except SystemExit as e:  # sys.exit() inside the evaluator: its failure (exit 6), not our exit code
        raise EvaluatorFailed(f"evaluator {name} called exit({e.code!r}) on the {which} model",
                              hint="return a dict of metrics instead of exiting") from e
    except Exception as e:
        raise EvaluatorFailed(f"evaluator {name} raised {type(e).__name__} on the {which} model: "
                              f"{_first_line(e)}") from e
    if not isinstance(result, dict) or not result:
        raise EvaluatorFailed(f"evaluator {name} returned {type(result).__name__} for the {which} model; "
                              "it must return a non-empty dict of metric name -> number")
    out = {}
    for k, v in result.items():
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise EvaluatorFailed(f"evaluator {name} metric {k!r} is {type(v).__name__}, not a number") from None
    return out


def evaluator_rows(o: dict[str, float], c: dict[str, float]) -> list[MetricRow]:
    return [MetricRow(name=k, original=o[k], compressed=c[k], delta=c[k] - o[k]) for k in o if k in c]
