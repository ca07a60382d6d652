"""The `compressadvise` console script: holds Ctrl-C from its first moment.

The CLI imports Typer, Rich and then torch or coremltools; a Ctrl-C while those modules load
would otherwise end in a KeyboardInterrupt traceback from inside an import (exit -2). This
module imports nothing heavy: it notes the press, and `cli.main` turns it into exit 130.
"""
from __future__ import annotations

import signal
from types import FrameType

PRESSED: list[int] = []  # Ctrl-C presses before cli.main took over


def _note(signum: int, frame: FrameType | None) -> None:
    PRESSED.append(signum)


def main() -> None:
    signal.signal(signal.SIGINT, _note)
    from compressadvise.ui.cli import main as cli_main

    cli_main()
