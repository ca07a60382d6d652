"""The `compressadvise` command: a thin Typer layer over the library API.

Each command lives in `commands/<name>.py` and registers itself; errors become one line on
stderr and a documented exit code (see errors.EXIT_CODES), with a traceback only under --debug.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import sysconfig
from types import FrameType
from typing import Any

import typer

from compressadvise.errors import EXIT_CODES, CompressAdviseError

try:  # Typer >= 0.25 vendors click
    from typer._click.exceptions import ClickException as _ClickException
    from typer.exceptions import Abort as _Abort
except ImportError:  # pragma: no cover - older Typer on click itself
    from click.exceptions import Abort as _Abort
    from click.exceptions import ClickException as _ClickException
from compressadvise.ui.cli_help import CleanGroup

app = typer.Typer(
    name="compressadvise",
    help="Expert model-compression advice you can run: analyze, recommend, apply, verify.",
    cls=CleanGroup,
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion; names complete from the knowledge base
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Command modules, in the order `--help` lists them; each has register(app).
COMMAND_MODULES = ["analyze", "recommend", "knowledge", "apply", "export", "verify", "sensitivity", "report", "walkthrough"]
STATE: dict[str, Any] = {"debug": False, "interrupts": 0, "pending": False, "profile_previous": None}


def _print_version(value: bool) -> None:
    if value:  # eager: before click asks for a command
        from compressadvise import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library warnings (accepted anywhere "
                               "on the command line)."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True,
                                 callback=_print_version),
) -> None:
    STATE["debug"] = STATE["debug"] or debug  # main() takes --debug out of argv wherever it was


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"compressadvise.commands.{name}").register(app)


_register()


def _quiet_libraries() -> None:
    """Keep torch/coremltools warnings and log chatter out of the user's terminal."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("coremltools", "torch", "torchao", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


class Interrupted(BaseException):
    """Ctrl-C, raised past click's own handler so it keeps exit code 130 (1 means 'budget missed')."""


# ------------------------------------------------------------------ Ctrl-C at a safe point
# A signal handler raises into whatever code runs. Inside third-party code that is unsafe:
# coremltools wraps optional imports in bare `except:` (Ctrl-C during `import coremltools`
# became "scikit-learn is required", or was swallowed and the run went on). So the handler
# raises only when every frame between it and main() is ours, the stdlib or the CLI driver
# (typer/click pass BaseException through). Otherwise it notes the Ctrl-C and a profile hook
# raises the moment a call returns into our code with such a stack: a sampling timer would
# mostly land in torch/coremltools again, since they run most of the time.
FORCE_AFTER = 3  # Ctrl-C presses after which we raise wherever we are (a third-party call that never returns)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # compressadvise/
_DRIVERS = ("typer", "click")
_STDLIB_DIRS = tuple({os.path.abspath(sysconfig.get_paths()[k]) + os.sep for k in ("stdlib", "platstdlib")})
_THIRD_PARTY: dict[str, bool] = {}  # by file name, cached: the profile hook runs on every return
_OURS: dict[str, bool] = {}


def _third_party(filename: str) -> bool:
    """Code that may swallow an exception raised into it (anything but ours, the stdlib, typer/click)."""
    if filename.startswith("<"):
        return False  # <frozen importlib._bootstrap>, generated code: the frames around it decide
    path = os.path.abspath(filename)
    if path.startswith(_PACKAGE_DIR):
        return False
    parts = path.split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:
            i = parts.index(marker)
            return i + 1 >= len(parts) or parts[i + 1] not in _DRIVERS
    return not path.startswith(_STDLIB_DIRS)  # user code (evaluators, factories) counts as third-party


def _safe_point(frame: FrameType | None) -> bool:
    while frame is not None and frame.f_code is not main.__code__:
        name = frame.f_code.co_filename
        if name not in _THIRD_PARTY:
            _THIRD_PARTY[name] = _third_party(name)
        if _THIRD_PARTY[name]:
            return False
        frame = frame.f_back
    return True


def _raise_now() -> None:
    if STATE["pending"]:
        STATE["pending"] = False
        sys.setprofile(STATE["profile_previous"])
    raise Interrupted()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    STATE["interrupts"] += 1
    if _safe_point(frame) or STATE["interrupts"] >= FORCE_AFTER:
        _raise_now()
    if not STATE["pending"]:
        STATE.update(pending=True, profile_previous=sys.getprofile())
        sys.setprofile(_on_return)
        # A long library call (a conversion) may take a while to return: say what is happening.
        sys.stderr.write(f"stopping as soon as the current library call returns "
                         f"(Ctrl-C {FORCE_AFTER - STATE['interrupts']} more time(s) to stop at once)\n")


def _on_return(frame: FrameType, event: str, arg: Any) -> None:
    """Profile hook while a Ctrl-C waits: raise as a call returns into our code with a safe stack
    (the exception then comes out of that call, in our frame)."""
    if event != "return" or frame.f_back is None:
        return
    name = frame.f_back.f_code.co_filename
    if name not in _OURS:
        _OURS[name] = os.path.abspath(name).startswith(_PACKAGE_DIR)
    # Someone else holding Ctrl-C (fsutil's atomic commit) means: not yet, or we would split it.
    if _OURS[name] and signal.getsignal(signal.SIGINT) is _interrupt and _safe_point(frame.f_back):
        _raise_now()


def _install_handlers() -> Any:
    STATE.update(interrupts=0, pending=False, profile_previous=None)
    return signal.signal(signal.SIGINT, _interrupt)


def _restore_handlers(previous: Any) -> None:
    if STATE["pending"]:
        STATE["pending"] = False
        sys.setprofile(STATE["profile_previous"])
    signal.signal(signal.SIGINT, previous)


def _pressed_while_starting() -> bool:
    """A Ctrl-C the console script held while this module and its imports loaded."""
    console = sys.modules.get("compressadvise.console")
    return bool(console is not None and console.PRESSED)


def _take_debug(argv: list[str]) -> tuple[list[str], bool]:
    """--debug anywhere before `--` (click accepts a group option only before the subcommand, so
    "rerun with --debug" would fail when pasted after it): removed here, set for the run."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept = [a for a in argv[:end] if a != "--debug"] + argv[end:]
    return kept, len(kept) != len(argv)


def main(argv: list[str] | None = None) -> None:
    argv, debug = _take_debug(list(argv if argv is not None else sys.argv[1:]))
    STATE["debug"] = debug
    if not debug:
        _quiet_libraries()
    previous = _install_handlers()
    try:
        try:
            if _pressed_while_starting():
                raise Interrupted()
            # Not standalone: usage errors come here, to be one line like every other error.
            code = app(args=argv, prog_name="compressadvise", standalone_mode=False)
        finally:
            if STATE["pending"]:  # a Ctrl-C still waiting for a safe point when the command ends
                _raise_now()
    except CompressAdviseError as e:
        if debug:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"error: {e.one_line()}\n")
        sys.exit(e.exit_code)
    except _ClickException as e:
        if e.format_message().strip():  # empty: the bare command, whose help was the answer
            sys.stderr.write(f"error: {_usage_line(e)}\n")
        sys.exit(e.exit_code)
    except _Abort:
        sys.stderr.write("aborted\n")
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt):
        sys.stderr.write("interrupted: outputs are written atomically, nothing half-written was left\n")
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        sys.stderr.write(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)\n")
        sys.exit(70)
    finally:
        _restore_handlers(previous)  # main() may be called in-process (tests, notebooks)
    # Always an exit, as click's standalone mode did (callers and tests rely on SystemExit):
    # typer.Exit(n) from a command returns n here, a command that returns gives None.
    sys.exit(code if isinstance(code, int) else 0)


def _usage_line(e: Exception) -> str:
    """click's usage error, on one line, with the help to read: Typer's framed panel splits a
    long message over lines a CI log or a grep would have whole."""
    message = " ".join(e.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    return f"{message} (see `{ctx.command_path} --help`)" if ctx is not None else message


def exit_codes_markdown() -> str:
    rows = "\n".join(f"| {code} | {text.strip()} |" for code, text in EXIT_CODES.items())
    return "| code | meaning |\n| --- | --- |\n" + rows + "\n"


if __name__ == "__main__":
    main()
