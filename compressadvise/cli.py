"""The `compressadvise` command: a thin Typer layer over the library API.

Each command lives in `commands/<name>.py` and registers itself; errors become one line on
stderr and a documented exit code (see errors.EXIT_CODES), with a traceback only under --debug.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys

import typer

from .errors import EXIT_CODES, CompressAdviseError

app = typer.Typer(
    name="compressadvise",
    help="Expert model-compression advice you can run: analyze, recommend, apply, verify.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# Command modules, in the order `--help` lists them; each has register(app).
COMMAND_MODULES = ["analyze", "recommend", "knowledge", "apply", "verify", "sensitivity", "report", "walkthrough"]
STATE = {"debug": False}


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and library warnings."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    STATE["debug"] = debug
    if version:
        from . import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


def _register() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f".commands.{name}", __package__).register(app)


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


def _interrupt(signum, frame) -> None:
    raise Interrupted()


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    if not debug:
        _quiet_libraries()
    previous = signal.signal(signal.SIGINT, _interrupt)
    try:
        # Standalone mode: click prints usage errors itself (exit 2) and handles --help.
        app(args=argv, prog_name="compressadvise")
    except CompressAdviseError as e:
        if debug:
            import traceback

            traceback.print_exc()
        sys.stderr.write(f"error: {e.one_line()}\n")
        sys.exit(e.exit_code)
    except (Interrupted, KeyboardInterrupt):
        sys.stderr.write("interrupted: outputs are written atomically, nothing half-written was left\n")
        sys.exit(130)
    except Exception as e:
        if debug:
            raise
        sys.stderr.write(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)\n")
        sys.exit(70)
    finally:
        signal.signal(signal.SIGINT, previous)  # main() may be called in-process (tests, notebooks)


def exit_codes_markdown() -> str:
    rows = "\n".join(f"| {code} | {text.strip()} |" for code, text in EXIT_CODES.items())
    return "| code | meaning |\n| --- | --- |\n" + rows + "\n"


if __name__ == "__main__":
    main()
